//! Interop with Tailscale's own Rust DERP client (`ts_derp` 0.6), which we
//! did not write: handshake, relaying both ways, size limits, PeerGone,
//! duplicate connections and pings against a real relay on loopback.

mod common;

use common::*;
use derpd::client::ClientError;
use derpd::proto::{Frame, PeerGoneReason};
use tokio::time::timeout;

/// Largest payload ts_derp can put in one frame: its codec caps a frame body
/// at 64 KiB, and the destination key takes 32 bytes of it.
const TS_DERP_MAX_PAYLOAD: usize = (64 << 10) - 32;

#[tokio::test]
async fn two_ts_derp_clients_exchange_packets_both_ways() {
    let server = start().await;
    let (a, ka) = ts_client(&server).await;
    let (b, kb) = ts_client(&server).await;

    for i in 0..20u8 {
        let msg = vec![i; 100 + i as usize];
        a.send_one(kb.public, &msg).await.unwrap();
        let (src, got) = timeout(ARRIVES, b.recv_one()).await.unwrap().unwrap();
        assert_eq!(src, ka.public);
        assert_eq!(got.as_ref(), &msg[..]);

        b.send_one(ka.public, b"reply").await.unwrap();
        let (src, got) = timeout(ARRIVES, a.recv_one()).await.unwrap().unwrap();
        assert_eq!(src, kb.public);
        assert_eq!(got.as_ref(), b"reply");
    }
    assert_eq!(metric(&server, "derp_packets_sent_total"), 40.0);
    server.shutdown().await;
}

#[tokio::test]
async fn ts_derp_upgrading_with_post_and_an_ip_host_is_accepted() {
    let server = start().await;
    let (a, ka) = ts_client_with(&server, &ts_keys::NodeKeyPair::random(), "POST").await;
    let (b, kb) = ts_client(&server).await;
    a.send_one(kb.public, b"via POST").await.unwrap();
    let (src, got) = timeout(ARRIVES, b.recv_one()).await.unwrap().unwrap();
    assert_eq!((src, got.as_ref()), (ka.public, &b"via POST"[..]));
    server.shutdown().await;
}

#[tokio::test]
async fn ts_derp_and_our_client_interoperate() {
    let server = start().await;
    let (a, ka) = ts_client(&server).await;
    let (mut b, kb) = our_client(&server).await;
    a.send_one(to_ts(&kb.public()), b"from ts_derp")
        .await
        .unwrap();
    let (src, got) = timeout(ARRIVES, b.recv_packet()).await.unwrap().unwrap();
    assert_eq!(src, from_ts(&ka.public));
    assert_eq!(&got[..], b"from ts_derp");
    b.send_packet(from_ts(&ka.public), b"from derpd")
        .await
        .unwrap();
    let (src, got) = timeout(ARRIVES, a.recv_one()).await.unwrap().unwrap();
    assert_eq!(from_ts(&src), kb.public());
    assert_eq!(got.as_ref(), b"from derpd");
    server.shutdown().await;
}

#[tokio::test]
async fn largest_packets_arrive_intact() {
    let server = start().await;
    let (a, ka) = ts_client(&server).await;
    let (b, kb) = ts_client(&server).await;
    // The largest packet ts_derp can carry, with a recognisable pattern.
    let big: Vec<u8> = (0..TS_DERP_MAX_PAYLOAD)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    a.send_one(kb.public, &big).await.unwrap();
    let (src, got) = timeout(ARRIVES, b.recv_one()).await.unwrap().unwrap();
    assert_eq!(src, ka.public);
    assert_eq!(got.as_ref(), &big[..]);

    // Our own client carries exactly the protocol maximum, 64 KiB.
    let (mut c, kc) = our_client(&server).await;
    let (mut d, kd) = our_client(&server).await;
    let max: Vec<u8> = (0..derpd::proto::limits::MAX_PACKET_SIZE)
        .map(|i| (i % 253) as u8)
        .collect();
    c.send_packet(kd.public(), &max).await.unwrap();
    let (src, got) = timeout(ARRIVES, d.recv_packet()).await.unwrap().unwrap();
    assert_eq!(src, kc.public());
    assert_eq!(&got[..], &max[..]);
    server.shutdown().await;
}

#[tokio::test]
async fn packet_over_the_protocol_maximum_disconnects_the_sender() {
    let server = start().await;
    let (b, kb) = ts_client(&server).await;
    let (mut c, _) = our_client(&server).await;
    // A SendPacket whose body announces 32 + 65537 bytes: refused on the
    // header alone, before the body is buffered.
    let mut frame = vec![0x04];
    frame.extend_from_slice(&((32 + 65_537) as u32).to_be_bytes());
    frame.extend_from_slice(&from_ts(&kb.public).0);
    frame.extend_from_slice(&[0u8; 1000]);
    let _ = c.send_raw(&frame).await;
    let end = timeout(ARRIVES, async {
        loop {
            match c.recv().await {
                Ok(Frame::KeepAlive) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("server closes the connection");
    assert!(
        matches!(end, Err(ClientError::Closed) | Err(ClientError::Io(_))),
        "{end:?}"
    );
    // Nothing reached the destination.
    assert!(timeout(QUIET, b.recv_one()).await.is_err());
    server.shutdown().await;
}

#[tokio::test]
async fn peer_that_leaves_is_reported_gone_to_those_it_sent_to() {
    let server = start().await;
    let (a, ka) = ts_client(&server).await;
    let (mut b, kb) = our_client(&server).await;
    let a_key = from_ts(&ka.public);
    a.send_one(to_ts(&kb.public()), b"hello").await.unwrap();
    timeout(ARRIVES, b.recv_packet()).await.unwrap().unwrap();
    b.send_packet(a_key, b"hi back").await.unwrap();
    timeout(ARRIVES, a.recv_one()).await.unwrap().unwrap();

    drop(a);
    let f = timeout(ARRIVES, b.recv()).await.unwrap().unwrap();
    assert_eq!(
        f,
        Frame::PeerGone {
            key: a_key,
            reason: PeerGoneReason::Disconnected
        }
    );
    // Exactly one.
    assert_eq!(b.recv_timeout(QUIET).await.unwrap(), None);

    // Sending a disco packet to the key that left gets PeerGone(NotHere).
    let mut disco = derpd::proto::limits::DISCO_MAGIC.to_vec();
    disco.resize(100, 0x55);
    b.send_packet(a_key, &disco).await.unwrap();
    let f = timeout(ARRIVES, b.recv()).await.unwrap().unwrap();
    assert_eq!(
        f,
        Frame::PeerGone {
            key: a_key,
            reason: PeerGoneReason::NotHere
        }
    );
    assert_eq!(
        metric(
            &server,
            "derp_packets_dropped_total{kind=\"disco\",reason=\"unknown_dest\"}"
        ),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn second_connection_with_the_same_key_takes_over_without_closing_the_first() {
    let server = start().await;
    let keys = ts_keys::NodeKeyPair::random();
    let (first, _) = ts_client_with(&server, &keys, "GET").await;
    let (second, _) = ts_client_with(&server, &keys, "GET").await;
    let (sender, ks) = ts_client(&server).await;
    assert!(eventually(|| metric(&server, "derp_current_dup_client_keys") == 1.0).await);
    assert_eq!(metric(&server, "derp_current_dup_client_conns"), 2.0);

    // The newest connection receives.
    sender.send_one(keys.public, b"to newest").await.unwrap();
    let (_, got) = timeout(ARRIVES, second.recv_one()).await.unwrap().unwrap();
    assert_eq!(got.as_ref(), b"to newest");
    assert!(timeout(QUIET, first.recv_one()).await.is_err());

    // The first is still open: once it sends, it becomes the active one.
    first.send_one(ks.public, b"still here").await.unwrap();
    let (src, got) = timeout(ARRIVES, sender.recv_one()).await.unwrap().unwrap();
    assert_eq!((src, got.as_ref()), (keys.public, &b"still here"[..]));
    sender.send_one(keys.public, b"to first").await.unwrap();
    let (_, got) = timeout(ARRIVES, first.recv_one()).await.unwrap().unwrap();
    assert_eq!(got.as_ref(), b"to first");

    // When one leaves, the other is a plain client again and receives.
    drop(first);
    assert!(eventually(|| metric(&server, "derp_current_dup_client_keys") == 0.0).await);
    assert_eq!(metric(&server, "derp_current_dup_client_conns"), 0.0);
    sender.send_one(keys.public, b"to survivor").await.unwrap();
    let (_, got) = timeout(ARRIVES, second.recv_one()).await.unwrap().unwrap();
    assert_eq!(got.as_ref(), b"to survivor");
    server.shutdown().await;
}

#[tokio::test]
async fn ping_gets_its_pong() {
    let server = start().await;
    let (mut c, _) = our_client(&server).await;
    let data = [1, 2, 3, 4, 5, 6, 7, 0x2A];
    c.send(&Frame::Ping(data)).await.unwrap();
    let f = timeout(ARRIVES, c.recv()).await.unwrap().unwrap();
    assert_eq!(f, Frame::Pong(data));
    assert_eq!(metric(&server, "derp_pongs_sent_total"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_burst_arrives_in_order_and_its_last_packet_always_arrives() {
    // 500 packets back to back from one ts_derp client to another. The relay
    // may drop the oldest queued ones when the receiver lags (drop-head
    // policy), but what arrives is in order and the newest is never lost.
    let server = start().await;
    let (a, ka) = ts_client(&server).await;
    let (b, kb) = ts_client(&server).await;
    let n = 500u32;
    let recv = tokio::spawn(async move {
        let mut received = 0u32;
        let mut next = 0u32;
        while next < n {
            let (src, got) = timeout(ARRIVES, b.recv_one()).await.unwrap().unwrap();
            assert_eq!(src, ka.public);
            let seq = u32::from_be_bytes(got.as_ref()[..4].try_into().unwrap());
            assert!(seq >= next, "out of order: {seq} after {next}");
            next = seq + 1;
            received += 1;
        }
        received
    });
    for i in 0..n {
        let mut p = vec![0u8; 1200];
        p[..4].copy_from_slice(&i.to_be_bytes());
        a.send_one(kb.public, &p).await.unwrap();
    }
    let received = recv.await.unwrap();
    let dropped = metric(
        &server,
        "derp_packets_dropped_total{kind=\"other\",reason=\"queue_head\"}",
    );
    assert_eq!(received as f64 + dropped, n as f64);
    server.shutdown().await;
}
