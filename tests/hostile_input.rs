//! Hostile clients, round two: frames that start and never finish, a
//! ClientInfo after the handshake, and a receiver that stops reading (its
//! connection must be reset, not left pinning kernel memory).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::proc_net;
use common::*;
use derpd::proto::Frame;
use derpd::relay::RelayConfig;
use tokio::io::AsyncReadExt;

/// A ClientInfo frame after the handshake is skipped like any frame the
/// relay does not act on, whatever its length (Tailscale's relay does the
/// same); the connection keeps relaying.
#[tokio::test]
async fn client_info_after_the_handshake_is_skipped() {
    let server = start().await;
    let (mut a, ka) = our_client(&server).await;
    let (b, kb) = ts_client(&server).await;
    let before = metric(&server, "derp_unknown_frames_total");
    let mut bytes = raw_frame(0x02, &[7u8; 10]);
    bytes.extend_from_slice(&raw_frame(0x02, &[7u8; 300]));
    a.send_raw(&bytes).await.unwrap();
    a.send_packet(from_ts(&kb.public), b"still relaying")
        .await
        .unwrap();
    let (src, got) = tokio::time::timeout(ARRIVES, b.recv_one())
        .await
        .expect("the packet after the ClientInfo frames arrives")
        .unwrap();
    assert_eq!(from_ts(&src), ka.public());
    assert_eq!(got.as_ref(), b"still relaying");
    assert_eq!(metric(&server, "derp_unknown_frames_total"), before + 2.0);
}

/// A frame whose header arrived must be finished within the frame timeout;
/// a client that sends nothing at all is not affected.
#[tokio::test]
async fn a_frame_that_never_finishes_closes_the_connection() {
    let server = start_with(
        RelayConfig {
            frame_timeout: Some(Duration::from_millis(500)),
            ..RelayConfig::default()
        },
        None,
    )
    .await;
    let (quiet, kq) = ts_client(&server).await;
    let (b, kb) = ts_client(&server).await;
    for (what, stalled) in [
        // A SendPacket announcing 100 bytes, 10 of them sent.
        ("a half-sent packet", {
            let mut v = header(0x04, 100);
            v.extend_from_slice(&[1u8; 10]);
            v
        }),
        // The header of a frame type the relay skips, body cut short.
        ("a half-skipped frame", {
            let mut v = header(0x16, 5000);
            v.extend_from_slice(&[2u8; 100]);
            v
        }),
        // Only part of a header.
        ("half a header", vec![0x04, 0x00]),
    ] {
        let (mut a, _) = our_client(&server).await;
        let before = metric(&server, "derp_frame_timeouts_total");
        a.send_raw(&stalled).await.unwrap();
        let (mut s, _, _) = a.into_parts();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(ARRIVES, s.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "{what}: the relay closed the connection");
        assert_eq!(
            metric(&server, "derp_frame_timeouts_total"),
            before + 1.0,
            "{what}"
        );
    }
    // The quiet client, connected all along, still relays.
    quiet.send_one(kb.public, b"quiet is fine").await.unwrap();
    let (src, got) = tokio::time::timeout(ARRIVES, b.recv_one())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((src, got.as_ref()), (kq.public, &b"quiet is fine"[..]));
}

/// A receiver cut off by the write timeout is reset: its socket leaves the
/// relay's kernel at once instead of sitting in FIN-WAIT-1 with the unsent
/// data for as long as the client keeps acknowledging window probes.
#[tokio::test]
async fn a_cut_receiver_is_reset_and_frees_its_kernel_buffers() {
    let server = start_with(
        RelayConfig {
            write_timeout: Some(Duration::from_millis(300)),
            ..RelayConfig::default()
        },
        None,
    )
    .await;
    let (mut sender, _) = our_client(&server).await;
    // Handshaken, then never reads (but keeps its socket open).
    let (frozen, kf) = our_client(&server).await;
    let (frozen_stream, _, _) = frozen.into_parts();
    let frozen_addr = frozen_stream.local_addr().unwrap();
    let big = Bytes::from(vec![0xABu8; 60_000]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server, "derp_write_timeouts_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the frozen receiver was never cut"
        );
        for _ in 0..8 {
            sender.queue(&Frame::SendPacket {
                dst: kf.public(),
                payload: big.clone(),
            });
        }
        sender.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Gone from the relay's side within a few seconds (a graceful close
    // would keep it, with its queue, for minutes).
    assert!(
        eventually(|| proc_net::find(server.addr, frozen_addr).is_none()).await,
        "the relay's socket of the cut receiver still exists (state {:?})",
        proc_net::find(server.addr, frozen_addr).map(|r| r.state)
    );
    drop(frozen_stream);
}

/// Sends `request` on a fresh connection and returns the status code of
/// the answer (0 when the relay closed without one).
async fn status_of(server: &derpd::server::Server, request: &str) -> u16 {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(ARRIVES, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Framing that proxies may read differently (request smuggling) is
/// refused as Go's `net/http` refuses it, and counted by reason.
#[tokio::test]
async fn ambiguous_request_framing_is_refused_like_go() {
    let server = start().await;
    let m = |r: &str| {
        metric(
            &server,
            &format!("derpd_http_request_errors_total{{reason=\"{r}\"}}"),
        )
    };
    let upgrade = "GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n";
    let probe = "GET /derp/probe HTTP/1.1\r\nHost: derp.example.com\r\n";
    for (what, request, status, reason) in [
        (
            "no Host on an upgrade",
            format!("{upgrade}\r\n"),
            400,
            "missing_host",
        ),
        (
            "no Host on a probe",
            "GET /derp/probe HTTP/1.1\r\n\r\n".to_owned(),
            400,
            "missing_host",
        ),
        (
            "two Hosts",
            format!("{probe}Host: other.example.com\r\n\r\n"),
            400,
            "missing_host",
        ),
        (
            "negative length",
            format!("{probe}Content-Length: -1\r\n\r\n"),
            400,
            "bad_content_length",
        ),
        (
            "huge length",
            format!("{probe}Content-Length: 99999999999999999999\r\n\r\n"),
            400,
            "bad_content_length",
        ),
        (
            "duplicated length",
            format!("{probe}Content-Length: 0\r\nContent-Length: 0\r\n\r\n"),
            400,
            "bad_content_length",
        ),
        (
            "gzip",
            format!("{probe}Transfer-Encoding: gzip\r\n\r\n"),
            501,
            "unsupported_transfer_encoding",
        ),
        (
            "chunked twice",
            format!("{probe}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400,
            "bad_transfer_encoding",
        ),
        (
            "chunked with a length",
            format!("{probe}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"),
            400,
            "bad_transfer_encoding",
        ),
    ] {
        let before = m(reason);
        assert_eq!(status_of(&server, &request).await, status, "{what}");
        assert_eq!(m(reason), before + 1.0, "{what}");
    }
    // The same requests, well framed, are served.
    assert_eq!(
        status_of(&server, &format!("{probe}Connection: close\r\n\r\n")).await,
        200
    );
    assert_eq!(
        status_of(&server, "GET /derp/probe HTTP/1.0\r\n\r\n").await,
        200,
        "HTTP/1.0 needs no Host"
    );
    // A later request on a kept-alive connection is held to the Host rule too.
    let two = format!("{probe}\r\nGET /derp/probe HTTP/1.1\r\nConnection: close\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, two.as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(ARRIVES, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 400"), "{text}");
}

/// A client that never finishes its request head (slowloris) is closed at
/// the handshake deadline and counted.
#[tokio::test]
async fn slow_request_heads_are_closed_and_counted() {
    let server = start_with(
        RelayConfig {
            handshake_timeout: Duration::from_millis(400),
            ..RelayConfig::default()
        },
        None,
    )
    .await;
    let before = metric(
        &server,
        "derpd_http_request_errors_total{reason=\"head_timeout\"}",
    );
    assert_eq!(
        status_of(&server, "GET /derp HTTP/1.1\r\nHost: x\r\nUpgr").await,
        0
    );
    assert_eq!(
        metric(
            &server,
            "derpd_http_request_errors_total{reason=\"head_timeout\"}"
        ),
        before + 1.0
    );
}
