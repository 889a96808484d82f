//! The TLS record layer after the handshake, free of I/O: sealing outgoing
//! records and opening incoming ones in place, for TLS 1.3 and TLS 1.2 with
//! the AEAD suites rustls negotiates (AES-128/256-GCM, ChaCha20-Poly1305).
//!
//! rustls does the handshake and hands over the traffic keys
//! ([`rustls::kernel`]); from then on a connection's TLS state is two
//! [`RecordKey`]s (a few hundred bytes of key schedule each) and the caller
//! owns every buffer, so a quiet connection holds no buffer at all.

use aws_lc_rs::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

/// Record header length.
pub const HEADER_LEN: usize = 5;
/// AEAD tag length (all supported suites).
pub const TAG_LEN: usize = 16;
/// Most plaintext one record carries (2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// Most ciphertext a record may carry: TLS 1.3 allows plaintext + 256,
/// TLS 1.2 plaintext + 2048; we accept the TLS 1.2 bound for both.
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 2048;
/// Bytes a sealed record adds to its plaintext, at most (header, TLS 1.2's
/// explicit nonce or TLS 1.3's inner content type, tag).
pub const MAX_OVERHEAD: usize = HEADER_LEN + 8 + TAG_LEN;
/// Records sealed under one key before it is replaced (TLS 1.3) — well
/// under AES-GCM's confidentiality limit of 2^24.5 records.
pub const KEY_UPDATE_AFTER: u64 = 1 << 24;
/// Consecutive empty application-data records tolerated (as rustls does):
/// they cost a decryption each and carry nothing.
pub const MAX_EMPTY_RECORDS: u8 = 32;

/// TLS content types.
pub mod content {
    /// change_cipher_spec
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    /// alert
    pub const ALERT: u8 = 21;
    /// handshake
    pub const HANDSHAKE: u8 = 22;
    /// application_data
    pub const APPLICATION_DATA: u8 = 23;
}

/// Handshake message type of a TLS 1.3 KeyUpdate.
pub const KEY_UPDATE: u8 = 24;

/// Why a record could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record header is not a TLS record we accept here.
    #[error("bad TLS record header")]
    BadHeader,
    /// The record is longer than TLS allows.
    #[error("TLS record too long")]
    TooLong,
    /// Authentication failed (bad_record_mac).
    #[error("TLS record failed authentication")]
    BadMac,
    /// A TLS 1.3 record with no content type (all padding).
    #[error("TLS record without a content type")]
    NoContentType,
    /// The sequence number would wrap.
    #[error("TLS sequence number exhausted")]
    SequenceExhausted,
    /// A suite or version these records cannot carry.
    #[error("unsupported TLS suite or version")]
    Unsupported,
}

/// The protocol version the records follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// TLS 1.2: real content types, AAD with sequence number; AES-GCM
    /// carries an explicit nonce.
    Tls12,
    /// TLS 1.3: every record looks like application data; the real content
    /// type follows the plaintext.
    Tls13,
}

impl Version {
    /// The version rustls negotiated, if we carry it.
    pub fn from_rustls(v: ProtocolVersion) -> Result<Version, RecordError> {
        match v {
            ProtocolVersion::TLSv1_3 => Ok(Version::Tls13),
            ProtocolVersion::TLSv1_2 => Ok(Version::Tls12),
            _ => Err(RecordError::Unsupported),
        }
    }
}

/// One direction's traffic key: the AEAD, its IV and the next sequence number.
pub struct RecordKey {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    version: Version,
    /// TLS 1.2 AES-GCM: an 8-byte explicit nonce leads each record.
    explicit_nonce: bool,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or IV.
        f.debug_struct("RecordKey")
            .field("version", &self.version)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// A record opened in place: its content type and where its plaintext is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The real content type.
    pub content_type: u8,
    /// Plaintext, as a range of the buffer given to [`RecordKey::open`].
    pub plaintext: std::ops::Range<usize>,
    /// Bytes of the buffer the record took.
    pub record_len: usize,
}

impl RecordKey {
    /// A key for `version` from rustls' extracted secrets, starting at `seq`.
    pub fn new(
        version: Version,
        seq: u64,
        secrets: ConnectionTrafficSecrets,
    ) -> Result<RecordKey, RecordError> {
        #[allow(unreachable_patterns)]
        let (alg, key, iv, gcm) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv, true),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv, true),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&CHACHA20_POLY1305, key, iv, false)
            }
            _ => return Err(RecordError::Unsupported),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Unsupported)?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::Unsupported)?;
        Ok(RecordKey {
            key: LessSafeKey::new(key),
            iv,
            seq,
            version,
            explicit_nonce: gcm && version == Version::Tls12,
        })
    }

    /// The sequence number of the next record.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The protocol version.
    pub fn version(&self) -> Version {
        self.version
    }

    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    fn advance(&mut self) -> Result<(), RecordError> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or(RecordError::SequenceExhausted)?;
        Ok(())
    }

    /// Starts a record at the end of `out`: reserves its header (and TLS
    /// 1.2's explicit nonce). Append at most [`MAX_PLAINTEXT`] bytes of
    /// plaintext to `out`, then call [`RecordKey::seal`] with the returned
    /// start.
    pub fn begin(&self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        let pre = HEADER_LEN + if self.explicit_nonce { 8 } else { 0 };
        out.resize(start + pre, 0);
        start
    }

    /// Seals the record begun at `start` (everything after its header is
    /// plaintext of `content_type`): encrypts in place and appends the tag.
    pub fn seal(
        &mut self,
        out: &mut Vec<u8>,
        start: usize,
        content_type: u8,
    ) -> Result<(), RecordError> {
        let body = start + HEADER_LEN + if self.explicit_nonce { 8 } else { 0 };
        debug_assert!(out.len() - body <= MAX_PLAINTEXT);
        let nonce = self.nonce();
        let mut aad = [0u8; 13];
        let (outer_type, aad) = match self.version {
            Version::Tls13 => {
                out.push(content_type);
                let len = (out.len() - body + TAG_LEN) as u16;
                aad[..5].copy_from_slice(&tls13_aad(len));
                (content::APPLICATION_DATA, &aad[..5])
            }
            Version::Tls12 => {
                let len = (out.len() - body) as u16;
                aad = tls12_aad(self.seq, content_type, len);
                (content_type, &aad[..])
            }
        };
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[body..],
            )
            .map_err(|_| RecordError::BadMac)?;
        out.extend_from_slice(tag.as_ref());
        let len = (out.len() - start - HEADER_LEN) as u16;
        out[start] = outer_type;
        out[start + 1..start + 3].copy_from_slice(&[3, 3]);
        out[start + 3..start + 5].copy_from_slice(&len.to_be_bytes());
        if self.explicit_nonce {
            out[start + HEADER_LEN..start + HEADER_LEN + 8].copy_from_slice(&nonce[4..]);
        }
        self.advance()
    }

    /// Seals one whole record of `content_type` carrying `plaintext`.
    pub fn seal_record(
        &mut self,
        out: &mut Vec<u8>,
        content_type: u8,
        plaintext: &[u8],
    ) -> Result<(), RecordError> {
        let start = self.begin(out);
        out.extend_from_slice(plaintext);
        self.seal(out, start, content_type)
    }

    /// The length of the record at the start of `buf` once its header is
    /// there (`Ok(None)` before that), checking the header.
    pub fn record_len(&self, buf: &[u8]) -> Result<Option<usize>, RecordError> {
        let Some(h) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let ok_type = match self.version {
            Version::Tls13 => h[0] == content::APPLICATION_DATA,
            Version::Tls12 => matches!(
                h[0],
                content::APPLICATION_DATA | content::ALERT | content::HANDSHAKE
            ),
        };
        if !ok_type || h[1] != 3 || h[2] != 3 {
            return Err(RecordError::BadHeader);
        }
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        if len > MAX_CIPHERTEXT {
            return Err(RecordError::TooLong);
        }
        Ok(Some(HEADER_LEN + len))
    }

    /// Opens the record at the start of `buf` in place. `Ok(None)` until the
    /// whole record is there.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<Opened>, RecordError> {
        let Some(record_len) = self.record_len(buf)? else {
            return Ok(None);
        };
        if buf.len() < record_len {
            return Ok(None);
        }
        let outer_type = buf[0];
        let explicit = if self.explicit_nonce { 8 } else { 0 };
        if record_len < HEADER_LEN + explicit + TAG_LEN {
            return Err(RecordError::BadMac);
        }
        let mut nonce = self.nonce();
        if self.explicit_nonce {
            nonce[4..].copy_from_slice(&buf[HEADER_LEN..HEADER_LEN + 8]);
        }
        let body = HEADER_LEN + explicit;
        let mut aad = [0u8; 13];
        let aad: &[u8] = match self.version {
            Version::Tls13 => {
                aad[..5].copy_from_slice(&tls13_aad((record_len - HEADER_LEN) as u16));
                &aad[..5]
            }
            Version::Tls12 => {
                let plain_len = (record_len - body - TAG_LEN) as u16;
                aad = tls12_aad(self.seq, outer_type, plain_len);
                &aad
            }
        };
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf[body..record_len],
            )
            .map_err(|_| RecordError::BadMac)?;
        let (content_type, plain_len) = match self.version {
            // Inner plaintext: content, content type, zero padding.
            Version::Tls13 => match plain.iter().rposition(|&b| b != 0) {
                Some(at) => (plain[at], at),
                None => return Err(RecordError::NoContentType),
            },
            Version::Tls12 => (outer_type, plain.len()),
        };
        if plain_len > MAX_PLAINTEXT {
            return Err(RecordError::TooLong);
        }
        let opened = Opened {
            content_type,
            plaintext: body..body + plain_len,
            record_len,
        };
        self.advance()?;
        Ok(Some(opened))
    }
}

fn tls13_aad(ciphertext_len: u16) -> [u8; 5] {
    let l = ciphertext_len.to_be_bytes();
    [content::APPLICATION_DATA, 3, 3, l[0], l[1]]
}

fn tls12_aad(seq: u64, content_type: u8, plaintext_len: u16) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = content_type;
    a[9] = 3;
    a[10] = 3;
    a[11..].copy_from_slice(&plaintext_len.to_be_bytes());
    a
}

/// A post-handshake message the peer sent, as far as a server cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostHandshake {
    /// KeyUpdate; `true` when the peer asks us to update our key too.
    KeyUpdate {
        /// update_requested
        requested: bool,
    },
}

/// Parses the handshake messages of one TLS 1.3 record's plaintext. Only
/// whole KeyUpdate messages are accepted: a client has nothing else to send
/// a server after the handshake, and no real client splits a 5-byte
/// message across records.
pub fn parse_post_handshake(mut msg: &[u8]) -> Result<Vec<PostHandshake>, RecordError> {
    let mut out = Vec::new();
    if msg.is_empty() {
        return Err(RecordError::BadHeader);
    }
    while !msg.is_empty() {
        let [typ, a, b, c, rest @ ..] = msg else {
            return Err(RecordError::BadHeader);
        };
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if *typ != KEY_UPDATE || len != 1 || rest.is_empty() {
            return Err(RecordError::BadHeader);
        }
        let requested = match rest[0] {
            0 => false,
            1 => true,
            _ => return Err(RecordError::BadHeader),
        };
        out.push(PostHandshake::KeyUpdate { requested });
        msg = &rest[1..];
    }
    Ok(out)
}

/// The KeyUpdate(update_not_requested) handshake message.
pub const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];

/// The close_notify alert.
pub const CLOSE_NOTIFY: [u8; 2] = [1, 0];

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(kind: u8) -> ConnectionTrafficSecrets {
        let iv = Iv::new([7; 12]);
        match kind {
            // (AES-128 keys cannot be made outside rustls; the TLS tests
            // run every suite through real handshakes.)
            0 => ConnectionTrafficSecrets::Aes256Gcm {
                key: AeadKey::from([2; 32]),
                iv,
            },
            _ => ConnectionTrafficSecrets::Chacha20Poly1305 {
                key: AeadKey::from([3; 32]),
                iv,
            },
        }
    }

    fn pair(version: Version, kind: u8) -> (RecordKey, RecordKey) {
        (
            RecordKey::new(version, 5, secrets(kind)).unwrap(),
            RecordKey::new(version, 5, secrets(kind)).unwrap(),
        )
    }

    #[test]
    fn sealed_records_open_to_the_same_plaintext_for_every_suite_and_version() {
        for version in [Version::Tls12, Version::Tls13] {
            for kind in 0..2 {
                let (mut tx, mut rx) = pair(version, kind);
                let mut wire = Vec::new();
                let texts: [&[u8]; 3] = [b"hello", &[0u8; MAX_PLAINTEXT], b""];
                for t in texts {
                    tx.seal_record(&mut wire, content::APPLICATION_DATA, t)
                        .unwrap();
                }
                tx.seal_record(&mut wire, content::ALERT, &CLOSE_NOTIFY)
                    .unwrap();
                let mut at = 0;
                for want in texts {
                    let o = rx.open(&mut wire[at..]).unwrap().unwrap();
                    assert_eq!(o.content_type, content::APPLICATION_DATA);
                    assert_eq!(&wire[at..][o.plaintext.clone()], want, "{version:?} {kind}");
                    at += o.record_len;
                }
                let o = rx.open(&mut wire[at..]).unwrap().unwrap();
                assert_eq!(o.content_type, content::ALERT);
                assert_eq!(&wire[at..][o.plaintext], &CLOSE_NOTIFY);
                assert_eq!(at + o.record_len, wire.len());
                assert_eq!((tx.seq(), rx.seq()), (9, 9));
            }
        }
    }

    #[test]
    fn partial_records_wait_and_tampered_ones_fail() {
        let (mut tx, mut rx) = pair(Version::Tls13, 0);
        let mut wire = Vec::new();
        tx.seal_record(&mut wire, content::APPLICATION_DATA, b"payload")
            .unwrap();
        for cut in 0..wire.len() {
            let mut part = wire[..cut].to_vec();
            assert_eq!(rx.open(&mut part), Ok(None), "cut at {cut}");
        }
        assert_eq!(rx.seq(), 5, "nothing consumed");
        let mut bad = wire.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(rx.open(&mut bad), Err(RecordError::BadMac));
        // The same record under the next sequence number fails too (replay).
        let mut ok = wire.clone();
        rx.open(&mut ok).unwrap().unwrap();
        let mut replay = wire.clone();
        assert_eq!(rx.open(&mut replay), Err(RecordError::BadMac));
    }

    #[test]
    fn headers_are_checked_before_waiting_for_the_body() {
        let rx = RecordKey::new(Version::Tls13, 0, secrets(0)).unwrap();
        assert_eq!(rx.record_len(&[23, 3, 3, 0]), Ok(None));
        assert_eq!(rx.record_len(&[23, 3, 3, 0, 20]), Ok(Some(25)));
        assert_eq!(
            rx.record_len(&[22, 3, 3, 0, 20]),
            Err(RecordError::BadHeader)
        );
        assert_eq!(
            rx.record_len(&[23, 3, 1, 0, 20]),
            Err(RecordError::BadHeader)
        );
        assert_eq!(
            rx.record_len(&[23, 3, 3, 0x48, 1]),
            Err(RecordError::TooLong)
        );
        let rx12 = RecordKey::new(Version::Tls12, 0, secrets(0)).unwrap();
        assert_eq!(rx12.record_len(&[21, 3, 3, 0, 26]), Ok(Some(31)));
        assert_eq!(
            rx12.record_len(&[20, 3, 3, 0, 1]),
            Err(RecordError::BadHeader)
        );
    }

    #[test]
    fn all_padding_tls13_records_and_short_records_are_errors() {
        let (mut tx, mut rx) = pair(Version::Tls13, 1);
        let mut wire = Vec::new();
        let start = tx.begin(&mut wire);
        wire.extend_from_slice(&[0; 4]);
        // Seal as if the content type were 0: the inner plaintext is all zeros.
        tx.seal(&mut wire, start, 0).unwrap();
        assert_eq!(rx.open(&mut wire), Err(RecordError::NoContentType));
        let mut short = vec![23, 3, 3, 0, 3, 1, 2, 3];
        assert_eq!(rx.open(&mut short), Err(RecordError::BadMac));
    }

    #[test]
    fn key_updates_parse_and_anything_else_is_refused() {
        assert_eq!(
            parse_post_handshake(&[24, 0, 0, 1, 1, 24, 0, 0, 1, 0]),
            Ok(vec![
                PostHandshake::KeyUpdate { requested: true },
                PostHandshake::KeyUpdate { requested: false }
            ])
        );
        for bad in [
            &[][..],
            &[24, 0, 0, 1],
            &[24, 0, 0, 1, 2],
            &[24, 0, 0, 2, 0, 0],
            &[4, 0, 0, 1, 0],
            &[24, 0, 0],
        ] {
            assert!(parse_post_handshake(bad).is_err(), "{bad:?}");
        }
    }
}
