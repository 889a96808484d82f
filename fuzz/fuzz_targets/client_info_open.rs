//! The server's ClientInfo open path never panics. Mode byte 0: the rest is
//! the box itself (nonce, then ciphertext), as a hostile client sends it.
//! Otherwise the rest is sealed by a real client key as the plaintext, so
//! open + JSON parse run on arbitrary contents, and must agree with parsing
//! the plaintext directly.
#![no_main]

use crypto_box::aead::Aead;
use crypto_box::{SalsaBox, SecretKey};
use derpd::proto::handshake::open_client_info;
use derpd::proto::{ClientInfo, NodePrivate};
use libfuzzer_sys::fuzz_target;

const NONCE_LEN: usize = 24;
const SERVER: [u8; 32] = [7; 32];
const CLIENT: [u8; 32] = [9; 32];

fuzz_target!(|data: &[u8]| {
    let server = NodePrivate::from_bytes(SERVER);
    let client = NodePrivate::from_bytes(CLIENT).public();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode == 0 {
        if rest.len() < NONCE_LEN {
            return;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().unwrap();
        let opened = open_client_info(&server, &client, &nonce, sealed);
        // Shorter than the Poly1305 tag: can never open.
        assert!(sealed.len() >= 16 || opened.is_err());
        return;
    }
    let client_sk = SecretKey::from(CLIENT);
    let server_pk = SecretKey::from(SERVER).public_key();
    let nonce = [mode; NONCE_LEN];
    let sealed = SalsaBox::new(&server_pk, &client_sk)
        .encrypt(&nonce.into(), rest)
        .unwrap();
    let opened = open_client_info(&server, &client, &nonce, &sealed);
    assert_eq!(opened.is_ok(), ClientInfo::from_json(rest).is_ok());
    if let Ok(info) = opened {
        // What parsed once re-serializes to JSON that parses again.
        assert!(ClientInfo::from_json(&info.to_json()).is_ok());
    }
});
