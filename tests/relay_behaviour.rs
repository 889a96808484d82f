//! Relay semantics over real loopback TCP: handshake rejections, packet
//! routing, PeerGone, Ping/Pong, NotePreferred, unknown frames, mesh-only
//! frames, duplicate connections and slow receivers.
//!
//! Checklist items are referenced as `(N)` (conformance-checklist.md).

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{eventually, header, metric, our_client, raw_frame, ARRIVES, QUIET};
use crypto_box::aead::Aead;
use derpd::client::{Client, ClientError};
use derpd::proto::frame::peer_present_flags;
use derpd::proto::handshake::seal_client_info;
use derpd::proto::limits::{DISCO_MAGIC, MAGIC};
use derpd::proto::{
    ClientInfo, Frame, FrameDecoder, MeshKey, NodePrivate, NodePublic, PeerGoneReason, Role,
};
use derpd::relay::RelayConfig;
use derpd::server::Server;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

type TcpClient = Client<TcpStream>;

// ---------------------------------------------------------------- helpers

const PING: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 0x2A];

fn unknown_key() -> NodePublic {
    NodePrivate::generate().public()
}

/// A payload that looks like disco: magic + 56 more bytes (62 in total).
fn disco_payload() -> Vec<u8> {
    let mut p = DISCO_MAGIC.to_vec();
    p.extend_from_slice(&[0x5A; 56]);
    p
}

fn counter(server: &Server, series: &str) -> u64 {
    metric(server, series) as u64
}

/// Waits for `series` to reach `want`; panics with the last value otherwise.
async fn wait_metric(server: &Server, series: &str, want: f64) {
    let ok = eventually(|| metric(server, series) == want).await;
    assert!(ok, "{series} = {}, want {want}", metric(server, series));
}

/// The next frame, which must arrive within ARRIVES.
async fn next(c: &mut TcpClient) -> Frame {
    timeout(ARRIVES, c.recv())
        .await
        .expect("a frame arrives in time")
        .expect("connection is open")
}

/// The next RecvPacket (KeepAlives skipped), within ARRIVES.
async fn next_packet(c: &mut TcpClient) -> (NodePublic, Bytes) {
    timeout(ARRIVES, c.recv_packet())
        .await
        .expect("a packet arrives in time")
        .expect("connection is open")
}

/// Asserts nothing but KeepAlives arrives within QUIET.
async fn assert_quiet(c: &mut TcpClient, who: &str) {
    let deadline = Instant::now() + QUIET;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match c.recv_timeout(left).await {
            Ok(None) => return,
            Ok(Some(Frame::KeepAlive)) => continue,
            Ok(Some(f)) => panic!("{who} received unexpected {f:?}"),
            Err(e) => panic!("{who}'s connection failed: {e}"),
        }
    }
}

/// Asserts the server closes the connection without sending another frame
/// (KeepAlives aside).
async fn assert_closed(c: &mut TcpClient, why: &str) {
    let r = timeout(ARRIVES, async {
        loop {
            match c.recv().await {
                Ok(Frame::KeepAlive) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{why}: connection still open after {ARRIVES:?}"));
    match r {
        Err(ClientError::Closed) | Err(ClientError::Io(_)) => {}
        Ok(f) => panic!("{why}: got {f:?} instead of a close"),
        Err(e) => panic!("{why}: unexpected error {e}"),
    }
}

/// Pings and waits for the matching Pong: afterwards the server's reader has
/// handled everything sent before. Returns the other frames seen meanwhile.
async fn sync(c: &mut TcpClient, tag: u8) -> Vec<Frame> {
    let data = [tag; 8];
    c.send(&Frame::Ping(data)).await.unwrap();
    let mut seen = Vec::new();
    loop {
        match next(c).await {
            Frame::Pong(d) if d == data => return seen,
            Frame::KeepAlive => {}
            f => seen.push(f),
        }
    }
}

/// A raw TCP connection upgraded to DERP, with the ServerKey frame read.
async fn raw_after_server_key(server: &Server) -> TcpStream {
    let mut s = common::upgraded_stream(server, "GET").await;
    let mut sk = [0u8; 45];
    timeout(ARRIVES, s.read_exact(&mut sk))
        .await
        .expect("ServerKey in time")
        .expect("read ServerKey");
    assert_eq!(&sk[..5], &[1, 0, 0, 0, 40]);
    assert_eq!(&sk[5..13], &MAGIC);
    assert_eq!(&sk[13..], &server.relay.public_key().0);
    s
}

/// Asserts the server closes `s` without sending a single byte.
async fn assert_raw_closed(s: &mut TcpStream, why: &str) {
    let got = timeout(ARRIVES, async {
        let mut out = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{why}: connection still open after {ARRIVES:?}"));
    assert!(
        got.is_empty(),
        "{why}: server sent {got:02x?} before closing"
    );
}

/// A ClientInfo frame whose box holds arbitrary `json`, sealed to `server`.
fn seal_json(client: &NodePrivate, server: &NodePublic, json: &[u8]) -> Vec<u8> {
    let secret_hex = client.to_text();
    let secret: [u8; 32] = hex::decode(secret_hex.strip_prefix("privkey:").unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let b = crypto_box::SalsaBox::new(
        &crypto_box::PublicKey::from(server.0),
        &crypto_box::SecretKey::from(secret),
    );
    let nonce = [7u8; 24];
    let sealed = b.encrypt((&nonce).into(), json).expect("seal");
    let mut body = client.public().0.to_vec();
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&sealed);
    raw_frame(0x02, &body)
}

/// A stream wrapper that records every byte read, to check frame layouts.
struct Tap {
    inner: TcpStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Tap {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = buf.filled()[before..].to_vec();
            self.seen.lock().unwrap().extend_from_slice(&new);
        }
        r
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------- handshake

/// (4) A first frame other than ClientInfo closes the connection with no
/// further frame.
#[tokio::test]
async fn first_frame_not_client_info_closes() {
    let server = common::start().await;
    let mut s = raw_after_server_key(&server).await;
    s.write_all(&raw_frame(0x12, &PING)).await.unwrap();
    assert_raw_closed(&mut s, "Ping as first frame").await;

    let mut s = raw_after_server_key(&server).await;
    s.write_all(&raw_frame(0x04, &[0u8; 40])).await.unwrap();
    assert_raw_closed(&mut s, "SendPacket as first frame").await;
    assert_eq!(counter(&server, "derp_current_connections"), 0);
}

/// (5) ClientInfo bodies under 56 or over 262144 bytes close the connection.
#[tokio::test]
async fn client_info_length_limits() {
    let server = common::start().await;
    let mut s = raw_after_server_key(&server).await;
    s.write_all(&raw_frame(0x02, &[0u8; 55])).await.unwrap();
    assert_raw_closed(&mut s, "ClientInfo of 55 bytes").await;

    let mut s = raw_after_server_key(&server).await;
    s.write_all(&header(0x02, 262_145)).await.unwrap();
    assert_raw_closed(&mut s, "ClientInfo announcing 262145 bytes").await;
}

/// (6) A ClientInfo sealed to the wrong server key closes the connection
/// without ServerInfo.
#[tokio::test]
async fn client_info_for_wrong_server_key_closes() {
    let server = common::start().await;
    let mut s = raw_after_server_key(&server).await;
    let frame = seal_client_info(
        &NodePrivate::generate(),
        &unknown_key(),
        &ClientInfo::default(),
    );
    s.write_all(&frame.to_bytes()).await.unwrap();
    assert_raw_closed(&mut s, "ClientInfo sealed to another key").await;
}

/// (10) A meshKey that is not 64 hex digits rejects the ClientInfo; the same
/// sealing with valid JSON is accepted (control).
#[tokio::test]
async fn bad_mesh_key_in_client_info_closes() {
    let server = common::start_with(RelayConfig::default(), Some(MeshKey::generate())).await;
    let server_key = server.relay.public_key();

    // Control: our hand-sealed box is accepted with valid JSON.
    let mut s = raw_after_server_key(&server).await;
    s.write_all(&seal_json(
        &NodePrivate::generate(),
        &server_key,
        br#"{"version":2}"#,
    ))
    .await
    .unwrap();
    let mut buf = BytesMut::new();
    let mut dec = FrameDecoder::new(Role::Client);
    let f = timeout(ARRIVES, async {
        loop {
            if let Some(f) = dec.decode(&mut buf).unwrap() {
                return f;
            }
            assert!(s.read_buf(&mut buf).await.unwrap() > 0, "closed");
        }
    })
    .await
    .expect("ServerInfo in time");
    assert!(matches!(f, Frame::ServerInfo { .. }), "{f:?}");

    for json in [
        r#"{"meshKey":"abcdefg","version":2}"#.to_owned(),
        format!(r#"{{"meshKey":"{}"}}"#, "f".repeat(68)),
    ] {
        let mut s = raw_after_server_key(&server).await;
        s.write_all(&seal_json(
            &NodePrivate::generate(),
            &server_key,
            json.as_bytes(),
        ))
        .await
        .unwrap();
        assert_raw_closed(&mut s, &json).await;
    }
}

// ---------------------------------------------------------------- relay

/// (14, 15) 0→1 arrives exactly once at 1 with source = key 0; nothing at 0 or 2.
#[tokio::test]
async fn packet_goes_only_to_its_destination() {
    let server = common::start().await;
    let (mut c0, k0) = our_client(&server).await;
    let (mut c1, k1) = our_client(&server).await;
    let (mut c2, _k2) = our_client(&server).await;

    c0.send_packet(k1.public(), b"hello, one").await.unwrap();
    let (src, payload) = next_packet(&mut c1).await;
    assert_eq!(src, k0.public());
    assert!(!src.is_zero());
    assert_eq!(&payload[..], b"hello, one");

    assert_quiet(&mut c1, "client 1 (second copy)").await;
    assert_quiet(&mut c0, "client 0").await;
    assert_quiet(&mut c2, "client 2").await;
}

/// (16, 23) A non-disco packet to an unknown key: nothing comes back, and it
/// is counted as an `unknown_dest` drop.
#[tokio::test]
async fn unknown_destination_is_dropped_silently() {
    let server = common::start().await;
    let series = r#"derp_packets_dropped_total{kind="other",reason="unknown_dest"}"#;
    let before = metric(&server, series);
    let (mut c, _) = our_client(&server).await;
    c.send_packet(unknown_key(), b"to nobody").await.unwrap();
    wait_metric(&server, series, before + 1.0).await;
    assert_quiet(&mut c, "sender").await;
}

/// (24, 28) A disco packet to an unknown key gets PeerGone(key, NotHere).
#[tokio::test]
async fn disco_to_unknown_key_gets_peer_gone_not_here() {
    let server = common::start().await;
    let (mut c, _) = our_client(&server).await;
    let nobody = unknown_key();
    c.send_packet(nobody, &disco_payload()).await.unwrap();
    assert_eq!(
        next(&mut c).await,
        Frame::PeerGone {
            key: nobody,
            reason: PeerGoneReason::NotHere
        }
    );
    assert_quiet(&mut c, "sender").await;
    assert_eq!(
        metric(
            &server,
            r#"derp_packets_dropped_total{kind="disco",reason="unknown_dest"}"#
        ),
        1.0
    );
    assert_eq!(counter(&server, "derp_peer_gone_not_here_frames_total"), 1);
}

/// (25) NotHere replies are rate-limited per sender with a burst of 3.
#[tokio::test]
async fn not_here_replies_burst_of_three() {
    let server = common::start().await;
    let (mut c, _) = our_client(&server).await;
    let nobody = unknown_key();
    let payload = Bytes::from(disco_payload());
    for _ in 0..8 {
        c.queue(&Frame::SendPacket {
            dst: nobody,
            payload: payload.clone(),
        });
    }
    c.flush().await.unwrap();
    let mut gone = 0;
    for _ in 0..20 {
        match c.recv_timeout(QUIET).await.expect("connection open") {
            None => break,
            Some(Frame::KeepAlive) => {}
            Some(Frame::PeerGone { key, reason }) => {
                assert_eq!((key, reason), (nobody, PeerGoneReason::NotHere));
                gone += 1;
            }
            Some(f) => panic!("unexpected {f:?}"),
        }
    }
    assert_eq!(
        gone, 3,
        "PeerGone(NotHere) replies for 8 back-to-back packets"
    );
    assert_eq!(
        metric(
            &server,
            r#"derp_packets_dropped_total{kind="disco",reason="unknown_dest"}"#
        ),
        8.0
    );
}

/// (17) A payload of exactly 64 KiB is relayed intact.
#[tokio::test]
async fn max_size_payload_is_relayed() {
    let server = common::start().await;
    let (mut a, ka) = our_client(&server).await;
    let (mut b, kb) = our_client(&server).await;
    let payload: Vec<u8> = (0..65_536u32).map(|i| (i * 7 % 251) as u8).collect();
    a.send_packet(kb.public(), &payload).await.unwrap();
    let (src, got) = next_packet(&mut b).await;
    assert_eq!(src, ka.public());
    assert_eq!(got.len(), 65_536);
    assert!(got[..] == payload[..], "payload corrupted");
}

/// (17, 18) SendPacket with a payload over 64 KiB, or a body under 32 bytes,
/// disconnects the sender.
#[tokio::test]
async fn bad_send_packet_lengths_disconnect() {
    let server = common::start().await;
    let (_peer, kp) = our_client(&server).await;

    let (mut c, _) = our_client(&server).await;
    let mut bytes = header(0x04, 32 + 65_537);
    bytes.extend_from_slice(&kp.public().0);
    c.send_raw(&bytes).await.unwrap();
    assert_closed(&mut c, "SendPacket announcing 65537-byte payload").await;

    let (mut c, _) = our_client(&server).await;
    c.send_raw(&raw_frame(0x04, &[9u8; 31])).await.unwrap();
    assert_closed(&mut c, "SendPacket with 31-byte body").await;

    // An empty payload is fine.
    let (mut c, kc) = our_client(&server).await;
    c.send_packet(kc.public(), b"").await.unwrap();
    let (src, got) = next_packet(&mut c).await;
    assert_eq!((src, got.len()), (kc.public(), 0));
}

/// (21) A client may send to its own key.
#[tokio::test]
async fn send_to_self() {
    let server = common::start().await;
    let (mut c, k) = our_client(&server).await;
    c.send_packet(k.public(), b"me").await.unwrap();
    let (src, got) = next_packet(&mut c).await;
    assert_eq!(src, k.public());
    assert_eq!(&got[..], b"me");
}

/// (26, 27, 28) When A, who sent to B, disconnects, B gets exactly one
/// PeerGone(A, Disconnected); a client that never sent disconnects silently.
#[tokio::test]
async fn peer_gone_after_sender_disconnects() {
    let server = common::start().await;
    let (mut a, ka) = our_client(&server).await;
    let (mut b, kb) = our_client(&server).await;
    a.send_packet(kb.public(), b"hi b").await.unwrap();
    assert_eq!(next_packet(&mut b).await.0, ka.public());
    drop(a);
    assert_eq!(
        next(&mut b).await,
        Frame::PeerGone {
            key: ka.public(),
            reason: PeerGoneReason::Disconnected
        }
    );
    assert_quiet(&mut b, "b after one PeerGone").await;
    assert_eq!(
        counter(&server, "derp_peer_gone_disconnected_frames_total"),
        1
    );

    let (c, _) = our_client(&server).await;
    wait_metric(&server, "derp_current_connections", 2.0).await;
    drop(c);
    wait_metric(&server, "derp_current_connections", 1.0).await;
    assert_quiet(&mut b, "b after a silent client left").await;
}

// ---------------------------------------------------------------- ping etc.

/// (29, 30) Ping/Pong, including longer pings.
#[tokio::test]
async fn ping_is_answered_with_pong() {
    let server = common::start().await;
    let (mut c, _) = our_client(&server).await;
    c.send(&Frame::Ping(PING)).await.unwrap();
    assert_eq!(next(&mut c).await, Frame::Pong(PING));

    for len in [9usize, 1000] {
        let mut body: Vec<u8> = (0..len).map(|i| (i % 200) as u8 + 1).collect();
        body[..8].copy_from_slice(&[0xA0 + len as u8 % 16; 8]);
        c.send_raw(&raw_frame(0x12, &body)).await.unwrap();
        let want: [u8; 8] = body[..8].try_into().unwrap();
        assert_eq!(next(&mut c).await, Frame::Pong(want), "ping of {len} bytes");
    }
    assert_eq!(counter(&server, "derp_pongs_sent_total"), 3);
}

/// (30) Pings under 8 or over 1000 bytes disconnect.
#[tokio::test]
async fn bad_ping_lengths_disconnect() {
    let server = common::start().await;
    let (mut c, _) = our_client(&server).await;
    c.send_raw(&raw_frame(0x12, &[1u8; 7])).await.unwrap();
    assert_closed(&mut c, "7-byte Ping").await;

    let (mut c, _) = our_client(&server).await;
    c.send_raw(&raw_frame(0x12, &[1u8; 1001])).await.unwrap();
    assert_closed(&mut c, "1001-byte Ping").await;
}

/// (33) NotePreferred drives `derp_current_home_connections`.
#[tokio::test]
async fn note_preferred_home_gauge() {
    let server = common::start().await;
    let home = "derp_current_home_connections";
    let (mut c, _) = our_client(&server).await;
    assert_eq!(metric(&server, home), 0.0);

    c.send(&Frame::NotePreferred(true)).await.unwrap();
    sync(&mut c, 1).await;
    assert_eq!(metric(&server, home), 1.0);

    c.send(&Frame::NotePreferred(true)).await.unwrap();
    sync(&mut c, 2).await;
    assert_eq!(metric(&server, home), 1.0, "repeated NotePreferred(1)");

    c.send(&Frame::NotePreferred(false)).await.unwrap();
    sync(&mut c, 3).await;
    assert_eq!(metric(&server, home), 0.0);

    // Any non-zero byte counts as true.
    c.send_raw(&raw_frame(0x07, &[0x7F])).await.unwrap();
    sync(&mut c, 4).await;
    assert_eq!(metric(&server, home), 1.0);

    drop(c);
    wait_metric(&server, home, 0.0).await;
}

/// (34) NotePreferred with a body other than 1 byte disconnects.
#[tokio::test]
async fn note_preferred_bad_length_disconnects() {
    let server = common::start().await;
    let (mut c, _) = our_client(&server).await;
    c.send_raw(&raw_frame(0x07, &[1, 1])).await.unwrap();
    assert_closed(&mut c, "2-byte NotePreferred").await;
}

/// (35) Unknown frame types (0x16 with a 5000-byte body) and a client Pong
/// are skipped; the connection keeps relaying.
#[tokio::test]
async fn unknown_frames_are_skipped() {
    let server = common::start().await;
    let (mut a, ka) = our_client(&server).await;
    let (mut b, kb) = our_client(&server).await;
    let mut bytes = raw_frame(0x16, &[0xEE; 5000]);
    bytes.extend_from_slice(&raw_frame(0x13, &[3u8; 8]));
    bytes.extend_from_slice(&raw_frame(0xFF, &[]));
    a.send_raw(&bytes).await.unwrap();
    let seen = sync(&mut a, 9).await;
    assert!(seen.is_empty(), "unexpected frames {seen:?}");
    a.send_packet(kb.public(), b"still here").await.unwrap();
    let (src, got) = next_packet(&mut b).await;
    assert_eq!(src, ka.public());
    assert_eq!(&got[..], b"still here");
}

// ---------------------------------------------------------------- mesh

/// (36, 47) Mesh-only frames from clients without (or with a different)
/// mesh key disconnect them and are counted.
#[tokio::test]
async fn mesh_frames_from_non_mesh_clients_disconnect() {
    let server = common::start_with(RelayConfig::default(), Some(MeshKey::generate())).await;
    let refusals = "derp_mesh_frame_refusals_total";
    let (_target, kt) = our_client(&server).await;
    let mut forward = kt.public().0.to_vec();
    forward.extend_from_slice(&kt.public().0);
    forward.extend_from_slice(b"payload");
    let cases: [(&str, Vec<u8>); 3] = [
        ("WatchConns", raw_frame(0x10, &[])),
        ("ClosePeer", raw_frame(0x11, &kt.public().0)),
        ("ForwardPacket", raw_frame(0x0A, &forward)),
    ];
    let mut want = 0.0;
    for (name, bytes) in &cases {
        let (mut c, _) = our_client(&server).await;
        c.send_raw(bytes).await.unwrap();
        assert_closed(&mut c, name).await;
        want += 1.0;
        wait_metric(&server, refusals, want).await;
    }

    // A different (valid) mesh key makes a regular client.
    let key = NodePrivate::generate();
    let info = ClientInfo {
        mesh_key: Some(MeshKey::generate()),
        ..Default::default()
    };
    let mut c = Client::connect_with(&server.url(), &key, info)
        .await
        .unwrap();
    c.send(&Frame::WatchConns).await.unwrap();
    assert_closed(&mut c, "WatchConns with the wrong mesh key").await;
    wait_metric(&server, refusals, want + 1.0).await;
    assert_eq!(metric(&server, "derp_watchers"), 0.0);
}

/// (42, 45, 46) WatchConns floods PeerPresent for every key (itself
/// included, 51-byte bodies, flags 0x01 regular / 0x02 mesh), then reports
/// later connects and final disconnects.
#[tokio::test]
async fn watch_conns_reports_presence() {
    let mk = MeshKey::generate();
    let server = common::start_with(RelayConfig::default(), Some(mk.clone())).await;
    let (_r1, k1) = our_client(&server).await;

    let mkey = NodePrivate::generate();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let tap = Tap {
        inner: stream,
        seen: seen.clone(),
    };
    let info = ClientInfo {
        mesh_key: Some(mk.clone()),
        ..Default::default()
    };
    let mut m = Client::upgrade_and_handshake(tap, &server.addr.to_string(), &mkey, info)
        .await
        .expect("mesh client connects");
    m.send(&Frame::WatchConns).await.unwrap();

    let mut present = HashMap::new();
    for _ in 0..2 {
        match timeout(ARRIVES, m.recv()).await.unwrap().unwrap() {
            Frame::PeerPresent { key, addr, flags } => {
                let addr = addr.expect("address present");
                assert_eq!(addr.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
                assert_ne!(addr.port(), 0);
                present.insert(key, flags);
            }
            f => panic!("expected PeerPresent, got {f:?}"),
        }
    }
    let want: HashMap<_, _> = [
        (k1.public(), peer_present_flags::IS_REGULAR),
        (mkey.public(), peer_present_flags::IS_MESH_PEER),
    ]
    .into();
    assert_eq!(present, want);
    {
        let seen = seen.lock().unwrap();
        for k in [k1.public(), mkey.public()] {
            let mut prefix = vec![0x09, 0, 0, 0, 51];
            prefix.extend_from_slice(&k.0);
            assert!(contains(&seen, &prefix), "51-byte PeerPresent for {k:?}");
        }
    }
    wait_metric(&server, "derp_watchers", 1.0).await;

    let (r2, k2) = our_client(&server).await;
    match timeout(ARRIVES, m.recv()).await.unwrap().unwrap() {
        Frame::PeerPresent { key, flags, .. } => {
            assert_eq!((key, flags), (k2.public(), peer_present_flags::IS_REGULAR));
        }
        f => panic!("expected PeerPresent, got {f:?}"),
    }
    drop(r2);
    assert_eq!(
        timeout(ARRIVES, m.recv()).await.unwrap().unwrap(),
        Frame::PeerGone {
            key: k2.public(),
            reason: PeerGoneReason::Disconnected
        }
    );
}

/// (49, 55) ForwardPacket from a mesh client is delivered with the forwarded
/// source; ClosePeer closes the target but not the requester.
#[tokio::test]
async fn mesh_forward_packet_and_close_peer() {
    let mk = MeshKey::generate();
    let server = common::start_with(RelayConfig::default(), Some(mk.clone())).await;
    let (mut target, kt) = our_client(&server).await;
    let (mut bystander, _) = our_client(&server).await;
    let mkey = NodePrivate::generate();
    let info = ClientInfo {
        mesh_key: Some(mk),
        ..Default::default()
    };
    let mut m = Client::connect_with(&server.url(), &mkey, info)
        .await
        .expect("mesh client connects");

    let remote_src = unknown_key();
    m.send(&Frame::ForwardPacket {
        src: remote_src,
        dst: kt.public(),
        payload: Bytes::from_static(b"forwarded"),
    })
    .await
    .unwrap();
    let (src, got) = next_packet(&mut target).await;
    assert_eq!(src, remote_src);
    assert_eq!(&got[..], b"forwarded");
    assert_eq!(counter(&server, "derp_packets_forwarded_in_total"), 1);

    m.send(&Frame::ClosePeer { key: kt.public() })
        .await
        .unwrap();
    assert_closed(&mut target, "ClosePeer target").await;
    wait_metric(&server, "derp_current_connections", 2.0).await;
    let seen = sync(&mut m, 5).await;
    assert!(seen.is_empty(), "mesh client saw {seen:?}");
    assert_quiet(&mut bystander, "bystander").await;
}

// ---------------------------------------------------------------- duplicates

/// (37, 38, 39, 40) Two connections with one key: the newest receives, the
/// older stays open and takes over once it sends; gauges track the dup.
#[tokio::test]
async fn duplicate_connections_last_writer_receives() {
    let server = common::start().await;
    let url = server.url();
    let key = NodePrivate::generate();
    let k = key.public();
    let (mut s, ks) = our_client(&server).await;
    let mut older = Client::connect(&url, &key).await.unwrap();
    let mut newer = Client::connect(&url, &key).await.unwrap();
    assert_eq!(metric(&server, "derp_current_dup_client_keys"), 1.0);
    assert_eq!(metric(&server, "derp_current_dup_client_conns"), 2.0);
    assert_eq!(metric(&server, "derp_current_connections"), 3.0);

    // (37) The newest receives; the older is not closed.
    s.send_packet(k, b"one").await.unwrap();
    let (src, got) = next_packet(&mut newer).await;
    assert_eq!((src, &got[..]), (ks.public(), &b"one"[..]));
    assert_quiet(&mut older, "older duplicate").await;

    // (39) The older sends something and becomes the receiver.
    let seen = sync(&mut older, 1).await;
    assert!(seen.is_empty(), "older saw {seen:?}");
    s.send_packet(k, b"two").await.unwrap();
    let (src, got) = next_packet(&mut older).await;
    assert_eq!((src, &got[..]), (ks.public(), &b"two"[..]));
    assert_quiet(&mut newer, "newer duplicate").await;

    // (38, 40) The active one leaves: gauges back to 0, the other receives.
    drop(older);
    wait_metric(&server, "derp_current_dup_client_keys", 0.0).await;
    wait_metric(&server, "derp_current_dup_client_conns", 0.0).await;
    s.send_packet(k, b"three").await.unwrap();
    let (src, got) = next_packet(&mut newer).await;
    assert_eq!((src, &got[..]), (ks.public(), &b"three"[..]));
    assert_quiet(&mut s, "sender").await;
}

/// (40) With three connections of one key, when the active (newest) one
/// leaves, the most recent remaining sender takes over, not the oldest.
/// Upstream `derpserver.TestServerDupClients` records every registration and
/// every send in the key's send history (`activity_promotes_primary_when_nil`
/// expects the middle connection after the newest leaves).
#[tokio::test]
async fn active_duplicate_leaving_promotes_most_recent_sender() {
    let server = common::start().await;
    let url = server.url();
    let key = NodePrivate::generate();
    let k = key.public();
    let (mut s, _) = our_client(&server).await;
    let mut oldest = Client::connect(&url, &key).await.unwrap();
    let mut middle = Client::connect(&url, &key).await.unwrap();
    // The middle connection is active and sends something.
    let seen = sync(&mut middle, 1).await;
    assert!(seen.is_empty(), "middle saw {seen:?}");
    let mut newest = Client::connect(&url, &key).await.unwrap();
    assert_eq!(metric(&server, "derp_current_dup_client_conns"), 3.0);

    s.send_packet(k, b"to newest").await.unwrap();
    assert_eq!(&next_packet(&mut newest).await.1[..], b"to newest");

    drop(newest);
    wait_metric(&server, "derp_current_dup_client_conns", 2.0).await;
    s.send_packet(k, b"after newest left").await.unwrap();
    assert_quiet(&mut oldest, "oldest duplicate (never sent)").await;
    let (_, got) = next_packet(&mut middle).await;
    assert_eq!(&got[..], b"after newest left");
}

/// (41) Closing one of two duplicates sends no PeerGone to a peer it had
/// sent to; closing the last one does.
#[tokio::test]
async fn peer_gone_only_when_last_duplicate_leaves() {
    let server = common::start().await;
    let url = server.url();
    let key = NodePrivate::generate();
    let k = key.public();
    let (mut peer, kp) = our_client(&server).await;
    let mut first = Client::connect(&url, &key).await.unwrap();
    let second = Client::connect(&url, &key).await.unwrap();

    first.send_packet(kp.public(), b"from first").await.unwrap();
    assert_eq!(next_packet(&mut peer).await.0, k);

    drop(first);
    wait_metric(&server, "derp_current_dup_client_keys", 0.0).await;
    wait_metric(&server, "derp_current_connections", 2.0).await;
    assert_quiet(&mut peer, "peer after one duplicate left").await;

    drop(second);
    assert_eq!(
        next(&mut peer).await,
        Frame::PeerGone {
            key: k,
            reason: PeerGoneReason::Disconnected
        }
    );
    assert_quiet(&mut peer, "peer after the last duplicate left").await;
}

// ---------------------------------------------------------------- slow receiver

/// (19, 20, 57) A receiver that never reads does not stall the sender's
/// packets to a healthy receiver; it is disconnected after the write timeout
/// and its full queue drops its oldest packets.
#[tokio::test]
async fn slow_receiver_is_cut_off_without_stalling_others() {
    let config = RelayConfig {
        write_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let server = common::start_with(config, None).await;
    let (mut sender, ks) = our_client(&server).await;
    let (mut healthy, kh) = our_client(&server).await;
    // Handshakes, then never reads.
    let (mut frozen, kf) = our_client(&server).await;
    // Deriving a public key is a scalar multiplication: do it once.
    let (ks, kh, kf) = (ks.public(), kh.public(), kf.public());

    let timeouts = "derp_write_timeouts_total";
    let queue_head = r#"derp_packets_dropped_total{kind="other",reason="queue_head"}"#;
    let big = Bytes::from(vec![0xABu8; 60_000]);
    let small = Bytes::from(vec![0xCDu8; 200]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut delivered = 0u32;
    let mut frozen_sent = 0u32;
    for i in 0u32..1_000_000 {
        // Each round, in one write: two 60 KB packets (to fill the socket
        // buffers) and 24 small ones for the frozen client (fewer than the
        // queue depth, so only a stalled writer lets its queue overflow),
        // and one packet for the healthy client, which must arrive.
        for n in 0..26 {
            sender.queue(&Frame::SendPacket {
                dst: kf,
                payload: if n < 2 { big.clone() } else { small.clone() },
            });
            frozen_sent += 1;
        }
        sender.queue(&Frame::SendPacket {
            dst: kh,
            payload: Bytes::copy_from_slice(&i.to_be_bytes()),
        });
        sender.flush().await.unwrap();
        let (src, got) = next_packet(&mut healthy).await;
        assert_eq!(src, ks);
        assert_eq!(
            &got[..],
            &i.to_be_bytes()[..],
            "healthy receiver lost a packet"
        );
        delivered += 1;
        let cut_off =
            metric(&server, timeouts) >= 1.0 && metric(&server, "derp_current_connections") == 2.0;
        if cut_off || Instant::now() > deadline {
            break;
        }
    }
    assert!(
        metric(&server, timeouts) >= 1.0,
        "no write timeout after {frozen_sent} packets to the frozen client"
    );
    wait_metric(&server, "derp_current_connections", 2.0).await;
    assert!(
        metric(&server, queue_head) > 0.0,
        "no queue_head drops after {frozen_sent} packets"
    );

    // The healthy receiver still gets everything afterwards.
    for i in 0u32..20 {
        sender.send_packet(kh, &i.to_be_bytes()).await.unwrap();
        let (_, got) = next_packet(&mut healthy).await;
        assert_eq!(&got[..], &i.to_be_bytes()[..]);
        delivered += 1;
    }
    assert!(delivered > 20);

    // The frozen client got some of its packets, then the connection ends.
    let mut got = 0u32;
    let end = timeout(Duration::from_secs(30), async {
        for _ in 0..100_000 {
            match frozen.recv().await {
                Ok(Frame::RecvPacket { .. }) => got += 1,
                Ok(_) => {}
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await
    .expect("frozen connection ends once drained");
    assert!(
        matches!(end, Some(ClientError::Closed) | Some(ClientError::Io(_))),
        "{end:?}"
    );
    assert!(got < frozen_sent, "frozen client got all {got} packets");
}

/// Checklist 31: at most one pong is pending; pings arriving meanwhile get
/// no answer. 100 pings in one write are handled in one pass of the reader,
/// so most of them find the pong slot taken.
#[tokio::test]
async fn pings_while_a_pong_is_pending_are_dropped() {
    let server = common::start().await;
    let (mut c, _) = our_client(&server).await;
    let mut burst = Vec::new();
    for i in 0u8..100 {
        burst.extend_from_slice(&raw_frame(0x12, &[i; 8]));
    }
    c.send_raw(&burst).await.unwrap();
    // Sentinel pings after the burst (re-sent while the slot is still
    // taken): once a sentinel's pong is in, every burst pong is.
    let mut pongs = Vec::new();
    let mut sentinels = 0;
    'outer: for _ in 0..100 {
        c.send(&Frame::Ping([0xEE; 8])).await.unwrap();
        sentinels += 1;
        while let Some(f) = c.recv_timeout(QUIET).await.unwrap() {
            match f {
                Frame::Pong(d) if d == [0xEE; 8] => break 'outer,
                Frame::Pong(d) => pongs.push(d[0]),
                Frame::KeepAlive => {}
                f => panic!("unexpected {f:?}"),
            }
        }
    }
    assert!(!pongs.is_empty(), "the first ping is answered");
    assert_eq!(pongs[0], 0, "the first ping's pong comes first");
    assert!(pongs.len() < 50, "{} of 100 pings answered", pongs.len());
    assert!(
        pongs.windows(2).all(|w| w[0] < w[1]),
        "pongs echo pings in order"
    );
    assert_eq!(
        metric(&server, "derp_pings_received_total"),
        100.0 + sentinels as f64
    );
    server.shutdown().await;
}

/// Checklist 32: an idle client receives empty KeepAlive frames on the
/// keepalive period (shortened here; 60 s + up to 5 s in production).
#[tokio::test]
async fn idle_clients_receive_keepalives() {
    let server = common::start_with(
        RelayConfig {
            keepalive_interval: Duration::from_millis(100),
            keepalive_jitter: Duration::ZERO,
            ..Default::default()
        },
        None,
    )
    .await;
    let (mut c, _) = our_client(&server).await;
    for _ in 0..3 {
        assert_eq!(next(&mut c).await, Frame::KeepAlive);
    }
    server.shutdown().await;
}
