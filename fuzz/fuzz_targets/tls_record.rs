//! The TLS record layer that takes over after the handshake
//! (`tls::record`): hostile records never panic and never reach past their
//! own length, post-handshake messages parse or fail cleanly, and whatever
//! the input is, sealing it as plaintext and opening it again gives it back
//! (both versions, AES-GCM and ChaCha20-Poly1305).
#![no_main]

use derpd::tls::record::{
    content, parse_post_handshake, RecordKey, Version, MAX_PLAINTEXT,
};
use libfuzzer_sys::fuzz_target;
use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::ConnectionTrafficSecrets;

fn secrets(chacha: bool) -> ConnectionTrafficSecrets {
    let (key, iv) = (AeadKey::from([7; 32]), Iv::new([9; 12]));
    if chacha {
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
    } else {
        ConnectionTrafficSecrets::Aes256Gcm { key, iv }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let version = if sel & 1 == 0 { Version::Tls13 } else { Version::Tls12 };
    let chacha = sel & 2 != 0;

    // Hostile bytes from a peer: open record after record.
    let mut rx = RecordKey::new(version, 0, secrets(chacha)).unwrap();
    let mut buf = rest.to_vec();
    let mut at = 0;
    while at < buf.len() {
        match rx.open(&mut buf[at..]) {
            Ok(Some(o)) => {
                assert!(o.record_len <= buf.len() - at, "record past the input");
                assert!(o.plaintext.end <= o.record_len, "plaintext past the record");
                if o.content_type == content::HANDSHAKE {
                    let _ = parse_post_handshake(&buf[at..][o.plaintext.clone()]);
                }
                at += o.record_len;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let _ = parse_post_handshake(rest);

    // The input as plaintext: sealed and opened, it comes back unchanged.
    let mut tx = RecordKey::new(version, 5, secrets(chacha)).unwrap();
    let mut rx = RecordKey::new(version, 5, secrets(chacha)).unwrap();
    let mut wire = Vec::new();
    for chunk in rest.chunks(MAX_PLAINTEXT) {
        tx.seal_record(&mut wire, content::APPLICATION_DATA, chunk).unwrap();
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let o = rx.open(&mut wire[at..]).unwrap().expect("a whole record");
        assert_eq!(o.content_type, content::APPLICATION_DATA);
        out.extend_from_slice(&wire[at..][o.plaintext.clone()]);
        at += o.record_len;
    }
    assert_eq!(out, rest);
});
