//! What hostile TLS input costs the relay, next to what ordinary traffic
//! costs: the server session (`tls::session`, rustls' unbuffered
//! connection) processing, in memory,
//!
//! * `flood_200_key_update_records`: 200 KeyUpdate records in a row (rustls
//!   ends the connection at the 33rd);
//! * `packed_3276_key_updates`: one record holding 3,276 KeyUpdates
//!   (refused at the first: a key change must end its record);
//! * `plain_200_records`: 200 small application-data records, the same
//!   record count as the flood;
//! * `handshake`: a whole TLS 1.3 handshake (both sides), the price of any
//!   new connection, for scale.
//!
//! The client's records are sealed outside the timed part. Run with
//! `cargo bench --bench tls_session` (add `-- --quick` for a fast pass).

#[path = "../tests/common/tls_raw.rs"]
mod tls_raw;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use derpd::tls::session::Session;
use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
use tls_raw::RecordKey;

const HOST: &str = "derp.test";

/// A handshaken session and the client's input for it.
fn prepared(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
    input: impl FnOnce(
        &mut RecordKey,
        &mut rustls::kernel::KernelConnection<rustls::client::ClientConnectionData>,
    ) -> Vec<u8>,
) -> (Session, Vec<u8>) {
    let (session, mut h) = tls_raw::in_memory_pair(server, client.clone(), HOST);
    let mut tx = RecordKey::new(h.secrets.tx.0, h.secrets.tx.1);
    let bytes = input(&mut tx, &mut h.kernel);
    (session, bytes)
}

/// Feeds `input` and lets the session process it; returns whether it
/// ended the connection.
fn feed(session: &mut Session, input: &[u8]) -> bool {
    session.incoming_mut().extend_from_slice(input);
    let failed = session.process().is_err();
    let n = session.plaintext().len();
    session.consume_plaintext(n);
    let n = session.pending_out().len();
    session.advance_out(n);
    failed
}

fn benches(c: &mut Criterion) {
    let (server, roots) = tls_raw::self_signed_server(HOST);
    let client = tls_raw::client_config(roots, TLS13_AES_128_GCM_SHA256);
    let mut g = c.benchmark_group("tls_session");

    g.bench_function("flood_200_key_update_records", |b| {
        b.iter_batched(
            || {
                prepared(&server, &client, |tx, kernel| {
                    let mut wire = Vec::new();
                    for _ in 0..200 {
                        wire.extend(tx.seal(
                            tls_raw::HANDSHAKE,
                            &tls_raw::KEY_UPDATE_NOT_REQUESTED,
                            0,
                        ));
                        let (seq, secrets) = kernel.update_tx_secret().unwrap();
                        *tx = RecordKey::new(seq, secrets);
                    }
                    wire
                })
            },
            |(mut s, input)| assert!(black_box(feed(&mut s, &input)), "refused"),
            BatchSize::SmallInput,
        )
    });

    g.bench_function("packed_3276_key_updates", |b| {
        b.iter_batched(
            || {
                prepared(&server, &client, |tx, _| {
                    tx.seal(
                        tls_raw::HANDSHAKE,
                        &tls_raw::KEY_UPDATE_NOT_REQUESTED.repeat(3276),
                        0,
                    )
                })
            },
            |(mut s, input)| assert!(black_box(feed(&mut s, &input)), "refused"),
            BatchSize::SmallInput,
        )
    });

    g.bench_function("plain_200_records", |b| {
        b.iter_batched(
            || {
                prepared(&server, &client, |tx, _| {
                    (0..200)
                        .flat_map(|_| tx.seal(tls_raw::APPLICATION_DATA, b"hello", 0))
                        .collect()
                })
            },
            |(mut s, input)| assert!(!black_box(feed(&mut s, &input)), "accepted"),
            BatchSize::SmallInput,
        )
    });

    g.bench_function("handshake", |b| {
        b.iter(|| black_box(tls_raw::in_memory_pair(&server, client.clone(), HOST)))
    });
    g.finish();
}

criterion_group! {
    name = tls;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(tls);
