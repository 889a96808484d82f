//! The server TLS session (`tls::session`, rustls' unbuffered connection
//! and our buffers) past authentication: every input runs a real TLS 1.3
//! handshake in memory, then the fuzzer's operations are sealed under the
//! client's real keys (so they authenticate) and fed through the same read
//! path the relay uses: records of any content type with any padding and
//! size, KeyUpdates (the client's keys move on), forged and raw bytes,
//! interleaved server writes and close_notify.
//!
//! Properties: nothing panics; plaintext comes out in order and unchanged
//! while the input is well formed; after a failure no more plaintext comes
//! out, nothing more is encrypted, and close_notify is never queued.
#![no_main]

#[path = "../../tests/common/tls_raw.rs"]
mod tls_raw;

use std::io::IoSlice;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tls_raw::RecordKey;

const HOST: &str = "derp.test";

struct Configs {
    server: Arc<rustls::ServerConfig>,
    clients: [Arc<rustls::ClientConfig>; 3],
}

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let (server, roots) = tls_raw::self_signed_server(HOST);
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        let clients = [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ]
        .map(|suite| tls_raw::client_config(roots.clone(), suite));
        Configs { server, clients }
    })
}

/// Reads fuzzer bytes as operations.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

fuzz_target!(|data: &[u8]| {
    let mut ops = Ops(data);
    let Some(sel) = ops.byte() else { return };
    let c = configs();
    let client = c.clients[sel as usize % 3].clone();
    let (mut server, h) = tls_raw::in_memory_pair(&c.server, client, HOST);
    let mut kernel = h.kernel;
    let mut tx = RecordKey::new(h.secrets.tx.0, h.secrets.tx.1);

    let mut expected = Vec::new();
    let mut got = Vec::new();
    let mut well_formed = true;
    while let Some(op) = ops.byte() {
        let wire = match op % 6 {
            // Application data, maybe padded.
            0 => {
                let len = ops.byte().unwrap_or(0) as usize * 70;
                let pad = ops.byte().unwrap_or(0) as usize;
                let payload = ops.bytes(len).to_vec();
                expected.extend_from_slice(&payload);
                tx.seal(tls_raw::APPLICATION_DATA, &payload, pad)
            }
            // Any inner content type, any size, any padding.
            1 => {
                let inner = ops.byte().unwrap_or(0);
                let len = u16::from_le_bytes([ops.byte().unwrap_or(0), ops.byte().unwrap_or(0)]);
                let pad = ops.byte().unwrap_or(0) as usize * 16;
                let payload = ops.bytes(len as usize).to_vec();
                well_formed = false;
                tx.seal(inner, &payload, pad)
            }
            // A KeyUpdate; our key moves on as the server's should.
            2 => {
                let requested = ops.byte().unwrap_or(0) & 1 == 1;
                let msg = if requested {
                    tls_raw::KEY_UPDATE_REQUESTED
                } else {
                    tls_raw::KEY_UPDATE_NOT_REQUESTED
                };
                let record = tx.seal(tls_raw::HANDSHAKE, &msg, 0);
                let (seq, secrets) = kernel.update_tx_secret().unwrap();
                tx = RecordKey::new(seq, secrets);
                record
            }
            // A forged record (one bit flipped).
            3 => {
                let payload = ops.bytes(32).to_vec();
                let mut record = tx.seal(tls_raw::APPLICATION_DATA, &payload, 0);
                let at = ops.byte().unwrap_or(0) as usize % record.len();
                record[at] ^= 1 << (ops.byte().unwrap_or(0) % 8);
                well_formed = false;
                record
            }
            // Raw bytes.
            4 => {
                let len = ops.byte().unwrap_or(0) as usize;
                well_formed = false;
                ops.bytes(len).to_vec()
            }
            // The server writes (vectored) in between.
            _ => {
                let a = ops.bytes(ops.0.len().min(40)).to_vec();
                let before = server.pending_out().len();
                let failed = server.failure().is_some();
                let result = server.encrypt(&[IoSlice::new(&a), IoSlice::new(b"x")]);
                if failed {
                    assert!(result.is_err(), "encrypted after a failure");
                    assert_eq!(server.pending_out().len(), before, "output after a failure");
                }
                Vec::new()
            }
        };
        // Fed in two pieces, as reads split records.
        let cut = wire.len() / 2;
        for piece in [&wire[..cut], &wire[cut..]] {
            let failed_before = server.failure().is_some();
            server.incoming_mut().extend_from_slice(piece);
            let result = server.process();
            if failed_before {
                assert!(result.is_err(), "a failed session recovered");
            }
            let n = server.plaintext().len();
            if failed_before {
                assert_eq!(n, 0, "plaintext after a failure");
            }
            got.extend_from_slice(server.plaintext());
            server.consume_plaintext(n);
            let out_len = server.pending_out().len();
            server.advance_out(out_len);
        }
        if server.failure().is_some() {
            let before = server.pending_out().len();
            server.close_notify();
            assert_eq!(server.pending_out().len(), before, "close_notify after a failure");
        }
    }
    if well_formed && server.failure().is_none() {
        assert_eq!(got, expected, "plaintext in order and unchanged");
    }
    if server.failure().is_none() {
        assert!(expected.starts_with(&got) || !well_formed);
    }
});
