//! The relay's TLS records, probed with a client that writes records by
//! hand (`common::tls_raw`) and with stock OpenSSL: every finding of the
//! outside review of the old record layer, against the real listener.
//!
//! rustls owns the records; these tests pin what a client sees on the wire:
//! a KeyUpdate right behind Finished is answered under the old key before
//! the response, KeyUpdate floods and oversized records end the connection
//! with the fatal alert rustls chose, a forged record gets bad_record_mac,
//! and nothing (in particular no close_notify) follows a fatal alert.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use common::ca::TestCa;
use common::tls_raw::{self, alerts, RawTls, Received};
use common::*;
use derpd::config::{CertMode, TlsSettings};
use derpd::proto::handshake::seal_client_info;
use derpd::proto::{ClientInfo, Frame, FrameDecoder, NodePrivate, Role};
use derpd::relay::RelayConfig;
use derpd::server::{Server, ServerConfig};
use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

const HOST: &str = "derp.test";
const REQUEST: &[u8] =
    b"GET /generate_204 HTTP/1.1\r\nHost: derp.test\r\nConnection: close\r\n\r\n";

/// A relay serving a manual certificate for `HOST` issued by `ca`.
async fn tls_server(ca: &TestCa) -> (Server, tempfile::TempDir) {
    tls_server_with(ca, RelayConfig::default()).await
}

async fn tls_server_with(ca: &TestCa, relay: RelayConfig) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let leaf = ca.leaf(&[HOST]);
    std::fs::write(dir.path().join(format!("{HOST}.crt")), &leaf.crt_pem).unwrap();
    std::fs::write(dir.path().join(format!("{HOST}.key")), &leaf.key_pem).unwrap();
    let mut config = ServerConfig::loopback_ephemeral();
    config.relay = relay;
    config.hostname = HOST.into();
    config.tls = Some(TlsSettings {
        mode: CertMode::Manual,
        certdir: dir.path().to_owned(),
        acme_directory: String::new(),
        acme_email: None,
        acme_ca_file: None,
    });
    let server = Server::start(config, NodePrivate::generate(), None)
        .await
        .expect("server starts");
    (server, dir)
}

fn raw_config(ca: &TestCa) -> Arc<rustls::ClientConfig> {
    tls_raw::client_config(ca.roots(), TLS13_AES_128_GCM_SHA256)
}

/// Runs a blocking client on its own thread while the relay runs.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("client thread")
}

async fn raw_client(server: &Server, ca: &TestCa) -> RawTls {
    let (addr, config) = (server.addr, raw_config(ca));
    blocking(move || RawTls::connect(addr, config, HOST))
        .await
        .expect("TLS 1.3 handshake")
}

/// Complete TLS records in `bytes` (all of them: the stream is whole).
fn count_records(mut bytes: &[u8]) -> usize {
    let mut n = 0;
    while bytes.len() >= 5 {
        let len = 5 + u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
        bytes = &bytes[len.min(bytes.len())..];
        n += 1;
    }
    n
}

/// The DERP upgrade and handshake over a hand-driven TLS client.
fn derp_handshake(c: &mut RawTls) {
    c.send_data(
        b"GET /derp HTTP/1.1\r\nHost: derp.test\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
    )
    .unwrap();
    let mut buf = BytesMut::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        buf.extend_from_slice(&c.recv_data(1));
    };
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{buf:?}");
    buf.advance(head_end);
    let mut decoder = FrameDecoder::new(Role::Client);
    let mut next_frame = |c: &mut RawTls, buf: &mut BytesMut| loop {
        if let Some(frame) = decoder.decode(buf).unwrap() {
            return frame;
        }
        buf.extend_from_slice(&c.recv_data(1));
    };
    let Frame::ServerKey { key: server_key } = next_frame(c, &mut buf) else {
        panic!("expected ServerKey");
    };
    let key = NodePrivate::generate();
    c.send_data(&seal_client_info(&key, &server_key, &ClientInfo::default()).to_bytes())
        .unwrap();
    let frame = next_frame(c, &mut buf);
    assert!(matches!(frame, Frame::ServerInfo { .. }), "{frame:?}");
}

/// Connects a hand-driven client to a fresh relay, lets `send` write what
/// it likes, and returns everything the relay sent back until it closed.
async fn relay_answer_to(send: impl FnOnce(&mut RawTls) + Send + 'static) -> Vec<Received> {
    let ca = TestCa::new();
    let (server, _dir) = tls_server(&ca).await;
    let mut c = raw_client(&server, &ca).await;
    let seen = blocking(move || {
        send(&mut c);
        c.recv_until_closed()
    })
    .await;
    server.shutdown().await;
    seen
}

fn assert_fatal_alert_then_close(seen: &[Received], description: u8) {
    assert_eq!(
        alerts(seen),
        vec![(2, description)],
        "one fatal alert ({description}), no close_notify: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&Received::Closed), "{seen:?}");
    assert!(
        !seen
            .iter()
            .any(|r| matches!(r, Received::Record(tls_raw::APPLICATION_DATA, _))),
        "no data after the bad input: {seen:?}"
    );
}

/// Finding 1: a client's KeyUpdate(update_requested) in the same write as
/// its Finished. The relay must answer with its own KeyUpdate under the
/// key it announced, then send the response under the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_update_behind_finished_is_answered_under_the_old_key_before_the_response() {
    let ca = TestCa::new();
    let (server, _dir) = tls_server(&ca).await;
    let (addr, config) = (server.addr, raw_config(&ca));
    let (response, records, rx_seq) = blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(ARRIVES)).unwrap();
        let name = ServerName::try_from(HOST).unwrap();
        let mut conn = ClientConnection::new(config, name).unwrap();
        tls_raw::handshake_to_finished(&mut tcp, &mut conn).unwrap();
        // Finished, KeyUpdate(update_requested) and the request: one write.
        conn.refresh_traffic_keys().unwrap();
        conn.writer().write_all(REQUEST).unwrap();
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire).unwrap();
        }
        tcp.write_all(&wire).unwrap();
        let mut received = Vec::new();
        let mut response = Vec::new();
        while !response.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0u8; 16 << 10];
            let n = tcp.read(&mut buf).expect("the relay answers");
            assert!(n > 0, "closed before answering: {response:?}");
            received.extend_from_slice(&buf[..n]);
            conn.read_tls(&mut &buf[..n]).unwrap();
            conn.process_new_packets()
                .expect("every record decrypts under the keys the relay announced");
            let _ = conn.reader().read_to_end(&mut response);
        }
        #[allow(deprecated)] // the buffered client's only way to its keys
        let secrets = conn.dangerous_extract_secrets().unwrap();
        (response, count_records(&received), secrets.rx.0)
    })
    .await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 204"), "{response}");
    // The client's receiving key counts records since its last change: had
    // the relay not sent a KeyUpdate, every record after Finished would be
    // under one key.
    assert!(
        rx_seq < records as u64,
        "{records} records after Finished, {rx_seq} under the current key: no KeyUpdate came"
    );
    server.shutdown().await;
}

/// One try of stock OpenSSL: `K` (KeyUpdate, update_requested) once the
/// handshake is done, then a request. Returns what s_client printed.
fn openssl_try(port: u16, ca_file: &std::path::Path) -> Result<String, String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("openssl")
        .args(["s_client", "-tls1_3", "-crlf", "-servername", HOST])
        .arg("-connect")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(ca_file)
        .arg("-verify_return_error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("openssl: {e}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(bool, Vec<u8>)>();
    let pipes: [(bool, Box<dyn Read + Send>); 2] = [
        (false, Box::new(child.stdout.take().unwrap())),
        (true, Box::new(child.stderr.take().unwrap())),
    ];
    // Readers end when the child is killed and its pipes close.
    for (is_err, mut pipe) in pipes {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 || tx.send((is_err, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut out = String::new();
    let mut err = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // s_client reads a line starting with K as the KeyUpdate command once
    // it is connected; the request goes only after it says it sent one.
    stdin.write_all(b"K\n").unwrap();
    let mut sent_request = false;
    let result = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => err.push_str(&String::from_utf8_lossy(&b)),
            Ok((false, b)) => out.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => break Err(format!("no answer in time\nstdout: {out}\nstderr: {err}")),
        }
        if !sent_request && (err.contains("KEYUPDATE") || out.contains("KEYUPDATE")) {
            sent_request = true;
            stdin
                .write_all(b"GET /generate_204 HTTP/1.1\nHost: derp.test\n\n")
                .unwrap();
        }
        if out.contains("HTTP/1.1 204") {
            break Ok(out.clone());
        }
        if err.contains("alert") || err.contains("error:") {
            break Err(format!("stdout: {out}\nstderr: {err}"));
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Finding 1 as the reviewer saw it: stock OpenSSL typing `K` and then a
/// request failed with "bad record mac" in 8 to 32 of 60 tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_key_update_then_request_is_answered_every_time() {
    let ca = TestCa::new();
    let (server, dir) = tls_server(&ca).await;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let port = server.addr.port();
    let failures = blocking(move || {
        (0..60)
            .filter_map(|i| {
                openssl_try(port, &ca_file)
                    .err()
                    .map(|e| format!("try {i}: {e}"))
            })
            .collect::<Vec<_>>()
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} of 60 failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    server.shutdown().await;
}

/// Finding 2: 3,276 KeyUpdates packed in one record. A key change must end
/// at a record boundary (RFC 8446 §5.1): unexpected_message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_key_updates_is_refused_with_unexpected_message() {
    let seen = relay_answer_to(|c| {
        let payload = tls_raw::KEY_UPDATE_NOT_REQUESTED.repeat(3276);
        let record = c.seal(tls_raw::HANDSHAKE, &payload, 0);
        c.send(&record).unwrap();
    })
    .await;
    assert_fatal_alert_then_close(&seen, tls_raw::UNEXPECTED_MESSAGE);
}

/// Finding 2: KeyUpdate records in a row are capped (rustls allows 32
/// between data records, as BoringSSL does); a client under the cap keeps
/// its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_update_records_in_a_row_are_capped_and_the_connection_closed() {
    let ca = TestCa::new();
    let (server, _dir) = tls_server(&ca).await;
    let mut under = raw_client(&server, &ca).await;
    let mut flood = raw_client(&server, &ca).await;
    let (answer, seen) = blocking(move || {
        let mut wire = Vec::new();
        for _ in 0..20 {
            wire.extend(under.seal_key_update(false));
        }
        under.send(&wire).unwrap();
        under.send_data(REQUEST).unwrap();
        let answer = String::from_utf8_lossy(&under.recv_data(12)).into_owned();
        let mut wire = Vec::new();
        for _ in 0..200 {
            wire.extend(flood.seal_key_update(false));
        }
        // The relay may close before taking it all.
        let _ = flood.send(&wire);
        (answer, flood.recv_until_closed())
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert_eq!(seen.last(), Some(&Received::Closed), "closed: {seen:?}");
    // rustls reports this limit without choosing an alert; what matters is
    // that no orderly close_notify follows the error and no data either.
    assert!(
        alerts(&seen).iter().all(|&(level, _)| level == 2),
        "only a fatal alert, if any: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|r| matches!(r, Received::Record(tls_raw::APPLICATION_DATA, _))),
        "{seen:?}"
    );
    server.shutdown().await;
}

/// Finding 4: a TLS 1.3 record over 2^14+256 bytes of ciphertext (16 KiB of
/// content plus 2,000 bytes of padding) gets record_overflow; one of
/// exactly 2^14 bytes of content is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_record_is_refused_with_record_overflow() {
    let ca = TestCa::new();
    let (server, _dir) = tls_server(&ca).await;
    let mut full = raw_client(&server, &ca).await;
    let mut over = raw_client(&server, &ca).await;
    let (answer, seen) = blocking(move || {
        // A request padded with headers to exactly 2^14 bytes of content.
        let mut request = b"GET /generate_204 HTTP/1.1\r\nHost: derp.test\r\nX-Pad: ".to_vec();
        let end = b"\r\nConnection: close\r\n\r\n";
        request.resize((1 << 14) - end.len(), b'a');
        request.extend_from_slice(end);
        let record = full.seal(tls_raw::APPLICATION_DATA, &request, 0);
        assert_eq!(record.len(), 5 + (1 << 14) + 1 + 16);
        full.send(&record).unwrap();
        let answer = String::from_utf8_lossy(&full.recv_data(12)).into_owned();
        let record = over.seal(tls_raw::APPLICATION_DATA, &[b'G'; 1 << 14], 2000);
        assert!(record.len() - 5 > (1 << 14) + 256);
        over.send(&record).unwrap();
        (answer, over.recv_until_closed())
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert_fatal_alert_then_close(&seen, tls_raw::RECORD_OVERFLOW);
    server.shutdown().await;
}

/// Finding 3, HTTP phase: a record with a bad tag gets bad_record_mac (not
/// a silent close) and no close_notify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_record_before_the_request_gets_bad_record_mac() {
    let seen = relay_answer_to(|c| {
        let mut record = c.seal(tls_raw::APPLICATION_DATA, REQUEST, 0);
        *record.last_mut().unwrap() ^= 1;
        c.send(&record).unwrap();
    })
    .await;
    assert_fatal_alert_then_close(&seen, tls_raw::BAD_RECORD_MAC);
}

/// Finding 3, DERP phase: after the DERP handshake, a record with a bad tag
/// gets bad_record_mac and no close_notify (the relay used to send an
/// orderly close_notify here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_record_during_derp_gets_bad_record_mac_and_no_close_notify() {
    let seen = relay_answer_to(|c| {
        derp_handshake(c);
        // A ping frame, forged.
        let mut record = c.seal(
            tls_raw::APPLICATION_DATA,
            &[0x12, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8],
            0,
        );
        let at = record.len() - 3;
        record[at] ^= 0x40;
        c.send(&record).unwrap();
    })
    .await;
    assert_fatal_alert_then_close(&seen, tls_raw::BAD_RECORD_MAC);
}

/// Kept from the old layer: part of a record counts as a frame in progress,
/// so a client that stops mid-record is closed by `--frame-timeout`; a
/// quiet client is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_record_counts_for_the_frame_timeout() {
    let ca = TestCa::new();
    let relay = RelayConfig {
        frame_timeout: Some(Duration::from_millis(500)),
        ..RelayConfig::default()
    };
    let (server, _dir) = tls_server_with(&ca, relay).await;
    let mut quiet = raw_client(&server, &ca).await;
    let mut stalled = raw_client(&server, &ca).await;
    let before = metric(&server, "derp_frame_timeouts_total");
    let (seen, pong) = blocking(move || {
        derp_handshake(&mut quiet);
        derp_handshake(&mut stalled);
        let record = stalled.seal(
            tls_raw::APPLICATION_DATA,
            &[0x12, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8],
            0,
        );
        stalled.send(&record[..9]).unwrap();
        let seen = stalled.recv_until_closed();
        // The quiet client, connected all along: a ping gets its pong.
        quiet
            .send_data(&[0x12, 0, 0, 0, 8, 9, 9, 9, 9, 9, 9, 9, 9])
            .unwrap();
        (seen, quiet.recv_data(13))
    })
    .await;
    assert_eq!(seen.last(), Some(&Received::Closed), "{seen:?}");
    assert_eq!(metric(&server, "derp_frame_timeouts_total"), before + 1.0);
    assert_eq!(pong, [0x13, 0, 0, 0, 8, 9, 9, 9, 9, 9, 9, 9, 9]);
    server.shutdown().await;
}
