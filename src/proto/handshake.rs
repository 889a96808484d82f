//! The DERP handshake: ServerKey → ClientInfo → ServerInfo, with NaCl-box
//! sealing of the two JSON documents.
//!
//! Both boxes are `crypto_box` (X25519 + XSalsa20-Poly1305, tag first). The
//! ClientInfo box is sealed with the client's private key and the server's
//! public key, so opening it proves the client holds the key it claims.

use std::fmt;

use bytes::Bytes;
use crypto_box::aead::{Aead, AeadCore, KeyInit, OsRng};
use crypto_box::SalsaBox;
use crypto_secretbox::Kdf;
use serde_json::Value;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use super::frame::Frame;
use super::key::{decode_hex32, NodePrivate, NodePublic, KEY_LEN};
use super::limits::{NONCE_LEN, PROTOCOL_VERSION};

/// Why a handshake step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client's first frame was not ClientInfo.
    #[error("first frame from client was type {0:#04x}, not ClientInfo")]
    FirstFrameNotClientInfo(u8),
    /// The server's first frame was not ServerKey.
    #[error("first frame from server was type {0:#04x}, not ServerKey")]
    FirstFrameNotServerKey(u8),
    /// The frame after ClientInfo was not ServerInfo.
    #[error("frame after ClientInfo was type {0:#04x}, not ServerInfo")]
    SecondFrameNotServerInfo(u8),
    /// The sealed box did not open with the claimed keys.
    #[error("sealed info box did not open (wrong key or corrupted)")]
    BoxOpenFailed,
    /// The opened JSON is not a valid info document.
    #[error("invalid info JSON: {0}")]
    BadJson(String),
    /// A `meshKey` was present but not 64 hex digits.
    #[error("meshKey must be exactly 64 hex digits")]
    BadMeshKey,
    /// The server announced a protocol version we do not speak.
    #[error("server speaks protocol version {0}, want {PROTOCOL_VERSION}")]
    UnsupportedVersion(i64),
}

/// The region's pre-shared mesh key. Compared in constant time; never printed.
#[derive(Clone)]
pub struct MeshKey([u8; KEY_LEN]);

impl MeshKey {
    /// Parses 64 hex digits, ignoring surrounding whitespace (as in a key file).
    pub fn from_hex(s: &str) -> Result<MeshKey, HandshakeError> {
        decode_hex32(s.trim())
            .map(MeshKey)
            .map_err(|_| HandshakeError::BadMeshKey)
    }

    /// A new random key from the OS RNG.
    pub fn generate() -> MeshKey {
        MeshKey(crypto_box::SecretKey::generate(&mut OsRng).to_bytes())
    }

    /// Wraps raw bytes.
    pub fn from_bytes(b: [u8; KEY_LEN]) -> MeshKey {
        MeshKey(b)
    }

    /// The 64-hex text form, as sent in ClientInfo. Handle with care.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether the key is all zeros (never grants mesh rights).
    pub fn is_zero(&self) -> bool {
        self.0.ct_eq(&[0u8; KEY_LEN]).into()
    }

    /// Constant-time equality; a zero key never matches.
    pub fn matches(&self, other: &MeshKey) -> bool {
        !self.is_zero() && bool::from(self.0.ct_eq(&other.0))
    }
}

impl Drop for MeshKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MeshKey(<redacted>)")
    }
}

/// What a client says about itself in ClientInfo.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// The mesh key, if presented.
    pub mesh_key: Option<MeshKey>,
    /// Client protocol version (informational).
    pub version: i64,
    /// Client will answer server pings.
    pub can_ack_pings: bool,
    /// Client is a monitoring prober.
    pub is_prober: bool,
    /// Opaque application name.
    pub app_name: Option<String>,
}

impl ClientInfo {
    /// Parses ClientInfo JSON with Go `encoding/json` semantics: keys match
    /// case-insensitively, unknown keys are ignored, `null` leaves a field at
    /// its default, and a present `meshKey` must be exactly 64 hex digits.
    pub fn from_json(json: &[u8]) -> Result<ClientInfo, HandshakeError> {
        let value: Value =
            serde_json::from_slice(json).map_err(|e| HandshakeError::BadJson(e.to_string()))?;
        let Value::Object(map) = value else {
            return Err(HandshakeError::BadJson("not a JSON object".into()));
        };
        let mut info = ClientInfo::default();
        let type_err = |k: &str| HandshakeError::BadJson(format!("wrong type for {k:?}"));
        for (k, v) in &map {
            if k.eq_ignore_ascii_case("meshKey") {
                let s = v.as_str().ok_or(HandshakeError::BadMeshKey)?;
                let key = decode_hex32(s).map_err(|_| HandshakeError::BadMeshKey)?;
                info.mesh_key = Some(MeshKey(key));
            } else if v.is_null() {
                continue;
            } else if k.eq_ignore_ascii_case("version") {
                info.version = v.as_i64().ok_or_else(|| type_err(k))?;
            } else if k.eq_ignore_ascii_case("CanAckPings") {
                info.can_ack_pings = v.as_bool().ok_or_else(|| type_err(k))?;
            } else if k.eq_ignore_ascii_case("IsProber") {
                info.is_prober = v.as_bool().ok_or_else(|| type_err(k))?;
            } else if k.eq_ignore_ascii_case("AppName") {
                info.app_name = Some(v.as_str().ok_or_else(|| type_err(k))?.to_owned());
            }
        }
        Ok(info)
    }

    /// The JSON a Go client would send for this info.
    pub fn to_json(&self) -> Vec<u8> {
        let mut m = serde_json::Map::new();
        if let Some(k) = &self.mesh_key {
            m.insert("meshKey".into(), Value::String(k.to_hex()));
        }
        if self.version != 0 {
            m.insert("version".into(), self.version.into());
        }
        m.insert("CanAckPings".into(), self.can_ack_pings.into());
        if self.is_prober {
            m.insert("IsProber".into(), true.into());
        }
        if let Some(a) = &self.app_name {
            m.insert("AppName".into(), Value::String(a.clone()));
        }
        serde_json::to_vec(&Value::Object(m)).expect("a JSON map always serializes")
    }
}

/// What the server tells a client in ServerInfo.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerInfo {
    /// Protocol version; always 2 from this server.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: i64,
    /// Advisory client send rate in bytes/s (0 = unspecified).
    #[serde(
        rename = "TokenBucketBytesPerSecond",
        alias = "tokenBucketBytesPerSecond",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub token_bucket_bytes_per_second: i64,
    /// Advisory client burst in bytes (0 = unspecified).
    #[serde(
        rename = "TokenBucketBytesBurst",
        alias = "tokenBucketBytesBurst",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub token_bucket_bytes_burst: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl ServerInfo {
    /// The info this server sends: version 2 and the advisory rate, if any.
    pub fn current(rate: i64, burst: i64) -> ServerInfo {
        ServerInfo {
            version: PROTOCOL_VERSION as i64,
            token_bucket_bytes_per_second: rate,
            token_bucket_bytes_burst: burst,
        }
    }
}

/// A private key prepared for handshakes: its X25519 form is parsed once
/// (aws-lc's X25519, several times faster than a portable implementation),
/// so each handshake costs one scalar multiplication.
pub struct HandshakeSecret(aws_lc_rs::agreement::PrivateKey);

impl fmt::Debug for HandshakeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandshakeSecret(..)")
    }
}

impl HandshakeSecret {
    /// Prepares `key`.
    pub fn new(key: &NodePrivate) -> HandshakeSecret {
        let bytes = zeroize::Zeroizing::new(key.to_box_key().to_bytes());
        HandshakeSecret(
            aws_lc_rs::agreement::PrivateKey::from_private_key(
                &aws_lc_rs::agreement::X25519,
                &bytes[..],
            )
            .expect("any 32 bytes are an X25519 private key"),
        )
    }

    /// The public key of this private key (aws-lc's X25519 base-point
    /// multiplication).
    pub fn public(&self) -> NodePublic {
        let public = self
            .0
            .compute_public_key()
            .expect("an X25519 private key always has a public key");
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(public.as_ref());
        NodePublic(key)
    }

    /// The NaCl box between this key and `peer` (X25519, then HSalsa20, as
    /// `crypto_box_beforenm`). A low-order `peer` key (whose shared secret
    /// is all zeros, so anyone could seal to it) is refused.
    pub fn peer_box(&self, peer: &NodePublic) -> Result<PeerBox, HandshakeError> {
        let peer =
            aws_lc_rs::agreement::UnparsedPublicKey::new(&aws_lc_rs::agreement::X25519, peer.0);
        aws_lc_rs::agreement::agree(&self.0, peer, HandshakeError::BoxOpenFailed, |shared| {
            let shared = crypto_secretbox::Key::clone_from_slice(shared);
            let key = zeroize::Zeroizing::new(<crypto_secretbox::XSalsa20Poly1305 as Kdf>::kdf(
                &shared,
                &Default::default(),
            ));
            Ok(PeerBox(crypto_secretbox::XSalsa20Poly1305::new(&key)))
        })
    }
}

/// A precomputed NaCl box to one peer: seals and opens without further
/// key agreement (the server opens ClientInfo and seals ServerInfo with it).
pub struct PeerBox(crypto_secretbox::XSalsa20Poly1305);

impl fmt::Debug for PeerBox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerBox(..)")
    }
}

impl PeerBox {
    /// Seals `plaintext` under a fresh random nonce.
    pub fn seal(&self, plaintext: &[u8]) -> ([u8; NONCE_LEN], Bytes) {
        // From aws-lc's per-thread DRBG: no system call per handshake.
        let mut nonce = crypto_secretbox::Nonce::default();
        aws_lc_rs::rand::fill(&mut nonce).expect("the system RNG works");
        let sealed = self
            .0
            .encrypt(&nonce, plaintext)
            .expect("sealing into a Vec cannot fail");
        (nonce.into(), Bytes::from(sealed))
    }

    /// Opens a box sealed by the peer.
    pub fn open(&self, nonce: &[u8; NONCE_LEN], sealed: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        self.0
            .decrypt(nonce.into(), sealed)
            .map_err(|_| HandshakeError::BoxOpenFailed)
    }

    /// Client side: the ClientInfo frame for `info`, sealed with this box
    /// (the client's key and the server's), announcing `client`.
    pub fn seal_client_info(&self, client: NodePublic, info: &ClientInfo) -> Frame {
        let (nonce, sealed) = self.seal(&info.to_json());
        Frame::ClientInfo {
            key: client,
            nonce,
            sealed,
        }
    }

    /// Client side: opens ServerInfo and checks the protocol version.
    pub fn open_server_info(
        &self,
        nonce: &[u8; NONCE_LEN],
        sealed: &[u8],
    ) -> Result<ServerInfo, HandshakeError> {
        parse_server_info(&self.open(nonce, sealed)?)
    }

    /// Server side: opens and parses a client's ClientInfo.
    pub fn open_client_info(
        &self,
        nonce: &[u8; NONCE_LEN],
        sealed: &[u8],
    ) -> Result<ClientInfo, HandshakeError> {
        ClientInfo::from_json(&self.open(nonce, sealed)?)
    }

    /// Server side: the ServerInfo frame sealed to the client.
    pub fn seal_server_info(&self, info: &ServerInfo) -> Frame {
        let json = serde_json::to_vec(info).expect("ServerInfo always serializes");
        let (nonce, sealed) = self.seal(&json);
        Frame::ServerInfo { nonce, sealed }
    }
}

fn seal(ours: &NodePrivate, theirs: &NodePublic, plaintext: &[u8]) -> ([u8; NONCE_LEN], Bytes) {
    let b = SalsaBox::new(&theirs.to_box_key(), &ours.to_box_key());
    let nonce = SalsaBox::generate_nonce(&mut OsRng);
    let sealed = b
        .encrypt(&nonce, plaintext)
        .expect("sealing into a Vec cannot fail");
    (nonce.into(), Bytes::from(sealed))
}

fn open(
    ours: &NodePrivate,
    theirs: &NodePublic,
    nonce: &[u8; NONCE_LEN],
    sealed: &[u8],
) -> Result<Vec<u8>, HandshakeError> {
    let b = SalsaBox::new(&theirs.to_box_key(), &ours.to_box_key());
    b.decrypt(nonce.into(), sealed)
        .map_err(|_| HandshakeError::BoxOpenFailed)
}

/// The server's first frame.
pub fn server_key_frame(server: &NodePublic) -> Frame {
    Frame::ServerKey { key: *server }
}

/// Client side: builds the ClientInfo frame for `info`, sealed to the server.
pub fn seal_client_info(client: &NodePrivate, server: &NodePublic, info: &ClientInfo) -> Frame {
    let (nonce, sealed) = seal(client, server, &info.to_json());
    Frame::ClientInfo {
        key: client.public(),
        nonce,
        sealed,
    }
}

/// Server side: opens a ClientInfo box for the key the client claims.
pub fn open_client_info(
    server: &NodePrivate,
    client: &NodePublic,
    nonce: &[u8; NONCE_LEN],
    sealed: &[u8],
) -> Result<ClientInfo, HandshakeError> {
    let json = open(server, client, nonce, sealed)?;
    ClientInfo::from_json(&json)
}

/// Server side: builds the ServerInfo frame sealed to the client.
pub fn seal_server_info(server: &NodePrivate, client: &NodePublic, info: &ServerInfo) -> Frame {
    let json = serde_json::to_vec(info).expect("ServerInfo always serializes");
    let (nonce, sealed) = seal(server, client, &json);
    Frame::ServerInfo { nonce, sealed }
}

/// Client side: opens ServerInfo and checks the protocol version.
pub fn open_server_info(
    client: &NodePrivate,
    server: &NodePublic,
    nonce: &[u8; NONCE_LEN],
    sealed: &[u8],
) -> Result<ServerInfo, HandshakeError> {
    parse_server_info(&open(client, server, nonce, sealed)?)
}

/// Parses an opened ServerInfo and checks the protocol version.
fn parse_server_info(json: &[u8]) -> Result<ServerInfo, HandshakeError> {
    let info: ServerInfo =
        serde_json::from_slice(json).map_err(|e| HandshakeError::BadJson(e.to_string()))?;
    if info.version != PROTOCOL_VERSION as i64 {
        return Err(HandshakeError::UnsupportedVersion(info.version));
    }
    Ok(info)
}
