//! Node keys: the 32-byte Curve25519 keys that name DERP clients and servers,
//! and their text forms (`nodekey:<hex>` for public keys, `privkey:<hex>` for
//! private keys).

use std::fmt;
use std::str::FromStr;

use crypto_box::aead::OsRng;
use zeroize::Zeroize;

/// Length in bytes of every DERP key.
pub const KEY_LEN: usize = 32;

/// Text prefix of a public node key.
pub const NODE_PUBLIC_PREFIX: &str = "nodekey:";
/// Text prefix of a private node key.
pub const NODE_PRIVATE_PREFIX: &str = "privkey:";

/// Why a key's text form could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// The text does not start with the expected type prefix.
    #[error("key must start with {0:?}")]
    MissingPrefix(&'static str),
    /// The hex part is not exactly 64 hex digits.
    #[error("key must be exactly 64 hex digits after the prefix")]
    BadHex,
}

/// A node's public key, as carried on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodePublic(pub [u8; KEY_LEN]);

impl NodePublic {
    /// The all-zero key, used by the protocol to mean "no key".
    pub const ZERO: NodePublic = NodePublic([0; KEY_LEN]);

    /// Reads a key from the first 32 bytes of `b`; `None` if `b` is shorter.
    pub fn from_slice(b: &[u8]) -> Option<NodePublic> {
        b.get(..KEY_LEN)
            .map(|k| NodePublic(k.try_into().expect("slice has key length")))
    }

    /// Whether this is the all-zero key.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; KEY_LEN]
    }

    /// The key as 64 lowercase hex digits, no prefix (as in `Derp-Public-Key`).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits without a prefix.
    pub fn from_hex(s: &str) -> Result<NodePublic, KeyParseError> {
        decode_hex32(s).map(NodePublic)
    }

    /// A short form for logs: the first 8 hex digits, like Tailscale's `ShortString`.
    pub fn short(&self) -> String {
        format!("[{}]", &hex::encode(&self.0[..4]))
    }

    pub(crate) fn to_box_key(self) -> crypto_box::PublicKey {
        crypto_box::PublicKey::from(self.0)
    }
}

impl fmt::Display for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{NODE_PUBLIC_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for NodePublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePublic({})", self.short())
    }
}

impl FromStr for NodePublic {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix(NODE_PUBLIC_PREFIX)
            .ok_or(KeyParseError::MissingPrefix(NODE_PUBLIC_PREFIX))?;
        NodePublic::from_hex(hex)
    }
}

/// A node's private key. Never printed: `Debug` and `Display` are redacted.
#[derive(Clone)]
pub struct NodePrivate([u8; KEY_LEN]);

impl NodePrivate {
    /// Generates a new random (clamped) private key from the OS RNG.
    pub fn generate() -> NodePrivate {
        let secret = crypto_box::SecretKey::generate(&mut OsRng);
        NodePrivate(clamp(secret.to_bytes()))
    }

    /// Wraps raw private-key bytes (clamping them as X25519 does).
    pub fn from_bytes(b: [u8; KEY_LEN]) -> NodePrivate {
        NodePrivate(clamp(b))
    }

    /// The matching public key.
    pub fn public(&self) -> NodePublic {
        NodePublic(*self.to_box_key().public_key().as_bytes())
    }

    /// The text form `privkey:<64 hex>`. Handle with care: this is the secret.
    pub fn to_text(&self) -> String {
        format!("{NODE_PRIVATE_PREFIX}{}", hex::encode(self.0))
    }

    /// Parses the text form `privkey:<64 hex>`.
    pub fn from_text(s: &str) -> Result<NodePrivate, KeyParseError> {
        let hex = s
            .trim()
            .strip_prefix(NODE_PRIVATE_PREFIX)
            .ok_or(KeyParseError::MissingPrefix(NODE_PRIVATE_PREFIX))?;
        decode_hex32(hex).map(NodePrivate::from_bytes)
    }

    pub(crate) fn to_box_key(&self) -> crypto_box::SecretKey {
        crypto_box::SecretKey::from(self.0)
    }
}

impl Drop for NodePrivate {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for NodePrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodePrivate(<redacted>)")
    }
}

fn clamp(mut b: [u8; KEY_LEN]) -> [u8; KEY_LEN] {
    b[0] &= 248;
    b[31] = (b[31] & 127) | 64;
    b
}

/// Decodes exactly 64 hex digits (either case) into 32 bytes.
pub(crate) fn decode_hex32(s: &str) -> Result<[u8; KEY_LEN], KeyParseError> {
    let mut out = [0u8; KEY_LEN];
    if s.len() != 2 * KEY_LEN {
        return Err(KeyParseError::BadHex);
    }
    hex::decode_to_slice(s, &mut out).map_err(|_| KeyParseError::BadHex)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_text_round_trip() {
        let k = NodePrivate::generate().public();
        let text = k.to_string();
        assert!(text.starts_with("nodekey:"));
        assert_eq!(text.len(), 8 + 64);
        assert_eq!(text.parse::<NodePublic>().unwrap(), k);
        assert_eq!(NodePublic::from_hex(&k.to_hex()).unwrap(), k);
    }

    #[test]
    fn private_key_text_round_trip_and_redaction() {
        let p = NodePrivate::generate();
        let q = NodePrivate::from_text(&p.to_text()).unwrap();
        assert_eq!(p.public(), q.public());
        assert_eq!(format!("{p:?}"), "NodePrivate(<redacted>)");
    }

    #[test]
    fn bad_key_texts_are_rejected() {
        assert_eq!(
            "abcd".parse::<NodePublic>(),
            Err(KeyParseError::MissingPrefix(NODE_PUBLIC_PREFIX))
        );
        assert_eq!(
            "nodekey:abcd".parse::<NodePublic>(),
            Err(KeyParseError::BadHex)
        );
        let not_hex = format!("nodekey:{}", "zz".repeat(32));
        assert_eq!(not_hex.parse::<NodePublic>(), Err(KeyParseError::BadHex));
        assert!(NodePrivate::from_text(&format!("nodekey:{}", "00".repeat(32))).is_err());
    }

    #[test]
    fn generated_private_keys_are_clamped() {
        let p = NodePrivate::generate();
        assert_eq!(p.0[0] & 7, 0);
        assert_eq!(p.0[31] & 0xC0, 0x40);
    }
}
