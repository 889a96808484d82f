//! The HTTP side of the relay, driven with hand-written requests over raw
//! TCP: the byte-exact DERP upgrade, fast start, pipelining, and the plain
//! HTTP endpoints (probes, captive-portal check, home page, errors).
//!
//! Checklist items are referenced as `(N)` (conformance-checklist.md).

mod common;

use bytes::{Bytes, BytesMut};
use common::{our_client, ARRIVES, QUIET};
use derpd::client::Client;
use derpd::proto::handshake::{open_server_info, seal_client_info};
use derpd::proto::limits::MAGIC;
use derpd::proto::{ClientInfo, Frame, FrameDecoder, NodePrivate, NodePublic, Role};
use derpd::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

// ---------------------------------------------------------------- helpers

async fn connect(server: &Server) -> TcpStream {
    let s = TcpStream::connect(server.addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    s
}

/// 64 lowercase hex digits, computed independently of the crate.
fn lower_hex(k: &NodePublic) -> String {
    k.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 45 bytes of the ServerKey frame for `key`.
fn server_key_frame(key: &NodePublic) -> Vec<u8> {
    let mut v = vec![0x01, 0, 0, 0, 40];
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&key.0);
    v
}

/// Reads until the end of a response head (`\r\n\r\n`). Returns the head;
/// bytes read past it stay in `buf`.
async fn read_head(s: &mut TcpStream, buf: &mut BytesMut) -> String {
    timeout(ARRIVES, async {
        loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = buf.split_to(i + 4);
                return String::from_utf8(head.to_vec()).expect("ASCII head");
            }
            assert!(buf.len() < 64 << 10, "response head too large");
            let n = s.read_buf(buf).await.expect("read response head");
            assert!(n > 0, "EOF before end of response head: {buf:?}");
        }
    })
    .await
    .expect("response head in time")
}

/// A parsed HTTP response.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// Reads one response (head + `Content-Length` body) from a kept-alive
/// connection. `no_body`: the request was HEAD (or the status has no body).
async fn read_response(s: &mut TcpStream, buf: &mut BytesMut, no_body: bool) -> Resp {
    let head = read_head(s, buf).await;
    let status = status_of(&head);
    let mut resp = Resp {
        status,
        head,
        body: Vec::new(),
    };
    if no_body || status == 204 || status == 304 || (100..200).contains(&status) {
        return resp;
    }
    let len: usize = resp
        .header("content-length")
        .unwrap_or_else(|| panic!("no content-length in {:?}", resp.head))
        .parse()
        .unwrap();
    timeout(ARRIVES, async {
        while buf.len() < len {
            let n = s.read_buf(buf).await.expect("read body");
            assert!(n > 0, "EOF in body");
        }
    })
    .await
    .expect("body in time");
    resp.body = buf.split_to(len).to_vec();
    resp
}

/// Sends one request (`Connection: close` is added) and reads the response.
async fn request(server: &Server, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut s = connect(server).await;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", server.addr);
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = BytesMut::new();
    read_response(&mut s, &mut buf, method == "HEAD").await
}

/// Reads everything until the peer closes (or resets) the connection.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    timeout(ARRIVES, async {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server closes the connection")
}

/// Decodes the next server frame from `s` (client role).
async fn read_frame(s: &mut TcpStream, buf: &mut BytesMut, dec: &mut FrameDecoder) -> Frame {
    timeout(ARRIVES, async {
        loop {
            if let Some(f) = dec.decode(buf).expect("well-formed server frame") {
                return f;
            }
            buf.reserve(4096);
            let n = s.read_buf(buf).await.expect("read frame");
            assert!(n > 0, "EOF while waiting for a frame");
        }
    })
    .await
    .expect("frame in time")
}

fn upgrade_request(method: &str, host: &str, extra: &str) -> String {
    format!(
        "{method} /derp HTTP/1.1\r\nHost: {host}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n{extra}\r\n"
    )
}

// ---------------------------------------------------------------- upgrade

/// (2, 3, 64) The raw upgrade answer is byte-exact, and the ServerKey frame
/// follows immediately, carrying the same key as `Derp-Public-Key`.
#[tokio::test]
async fn upgrade_response_is_byte_exact_and_followed_by_server_key() {
    let server = common::start().await;
    let key = server.relay.public_key();
    let mut s = connect(&server).await;
    let host = server.addr.to_string();
    s.write_all(upgrade_request("GET", &host, "").as_bytes())
        .await
        .unwrap();

    let mut expected = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n",
        lower_hex(&key)
    )
    .into_bytes();
    expected.extend_from_slice(&server_key_frame(&key));

    let mut got = vec![0u8; expected.len()];
    timeout(ARRIVES, s.read_exact(&mut got))
        .await
        .expect("101 + ServerKey in time")
        .expect("read 101 + ServerKey");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected)
    );
    assert_eq!(got, expected);

    // Nothing else until the client sends ClientInfo.
    let mut one = [0u8; 1];
    assert!(
        timeout(QUIET, s.read(&mut one)).await.is_err(),
        "server sent more than 101 + ServerKey before ClientInfo"
    );
}

/// (88) `POST /derp` with an IP-literal `Host` upgrades too, and the
/// handshake completes on it.
#[tokio::test]
async fn post_upgrade_with_ip_literal_host() {
    let server = common::start().await;
    let mut s = connect(&server).await;
    let host = format!("127.0.0.1:{}", server.addr.port());
    s.write_all(upgrade_request("POST", &host, "").as_bytes())
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    let head = read_head(&mut s, &mut buf).await;
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    let key = NodePrivate::generate();
    let client = timeout(
        ARRIVES,
        Client::handshake(s, buf, &key, ClientInfo::default()),
    )
    .await
    .expect("handshake in time")
    .expect("handshake succeeds after POST upgrade");
    assert_eq!(client.server_key(), server.relay.public_key());
    assert_eq!(client.server_info().version, 2);
}

/// (12, 13) Fast start: the request and ClientInfo go out in one write; the
/// server answers with no HTTP response at all, ServerKey first, then a
/// ServerInfo that opens with the client's key.
#[tokio::test]
async fn fast_start_sends_no_http_response() {
    let server = common::start().await;
    let server_key = server.relay.public_key();
    let key = NodePrivate::generate();
    let mut s = connect(&server).await;
    let host = server.addr.to_string();
    let mut burst = upgrade_request("GET", &host, "Derp-Fast-Start: 1\r\n").into_bytes();
    burst
        .extend_from_slice(&seal_client_info(&key, &server_key, &ClientInfo::default()).to_bytes());
    s.write_all(&burst).await.unwrap();

    let mut first = vec![0u8; 45];
    timeout(ARRIVES, s.read_exact(&mut first))
        .await
        .expect("ServerKey in time")
        .expect("read ServerKey");
    assert!(
        !first.starts_with(b"HTTP"),
        "fast start got an HTTP response: {:?}",
        String::from_utf8_lossy(&first)
    );
    assert_eq!(first, server_key_frame(&server_key));

    let mut buf = BytesMut::new();
    let mut dec = FrameDecoder::new(Role::Client);
    match read_frame(&mut s, &mut buf, &mut dec).await {
        Frame::ServerInfo { nonce, sealed } => {
            let info = open_server_info(&key, &server_key, &nonce, &sealed)
                .expect("ServerInfo opens with the client key");
            assert_eq!(info.version, 2);
        }
        f => panic!("expected ServerInfo, got {f:?}"),
    }

    // The connection is a working client: a packet to itself comes back.
    let me = key.public();
    s.write_all(
        &Frame::SendPacket {
            dst: me,
            payload: Bytes::from_static(b"fast"),
        }
        .to_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(
        read_frame(&mut s, &mut buf, &mut dec).await,
        Frame::RecvPacket {
            src: me,
            payload: Bytes::from_static(b"fast"),
        }
    );
}

/// (12) ClientInfo and a SendPacket written in one write right after the
/// upgrade, before ServerInfo was read, are both processed; likewise when
/// they ride in the same write as the request itself.
#[tokio::test]
async fn pipelined_frames_after_client_info_are_processed() {
    let server = common::start().await;
    let server_key = server.relay.public_key();
    let (mut bob, bob_key) = our_client(&server).await;
    let bob_pub = bob_key.public();
    let host = server.addr.to_string();

    // 1. After reading the 101 and ServerKey.
    let alice = NodePrivate::generate();
    let mut s = connect(&server).await;
    s.write_all(upgrade_request("GET", &host, "").as_bytes())
        .await
        .unwrap();
    let mut buf = BytesMut::new();
    let head = read_head(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut dec = FrameDecoder::new(Role::Client);
    assert_eq!(
        read_frame(&mut s, &mut buf, &mut dec).await,
        Frame::ServerKey { key: server_key }
    );
    let mut burst = BytesMut::new();
    seal_client_info(&alice, &server_key, &ClientInfo::default()).encode(&mut burst);
    Frame::SendPacket {
        dst: bob_pub,
        payload: Bytes::from_static(b"pipelined-1"),
    }
    .encode(&mut burst);
    s.write_all(&burst).await.unwrap();

    let (src, payload) = timeout(ARRIVES, bob.recv_packet())
        .await
        .expect("pipelined packet arrives")
        .expect("bob receives");
    assert_eq!(src, alice.public());
    assert_eq!(&payload[..], b"pipelined-1");
    assert!(
        matches!(
            read_frame(&mut s, &mut buf, &mut dec).await,
            Frame::ServerInfo { .. }
        ),
        "first frame after ServerKey is ServerInfo"
    );

    // 2. In the same write as the request head (no fast start).
    let carol = NodePrivate::generate();
    let mut s2 = connect(&server).await;
    let mut burst = upgrade_request("GET", &host, "").into_bytes();
    burst.extend_from_slice(
        &seal_client_info(&carol, &server_key, &ClientInfo::default()).to_bytes(),
    );
    burst.extend_from_slice(
        &Frame::SendPacket {
            dst: bob_pub,
            payload: Bytes::from_static(b"pipelined-2"),
        }
        .to_bytes(),
    );
    s2.write_all(&burst).await.unwrap();
    let (src, payload) = timeout(ARRIVES, bob.recv_packet())
        .await
        .expect("packet pipelined with the request arrives")
        .expect("bob receives");
    assert_eq!(src, carol.public());
    assert_eq!(&payload[..], b"pipelined-2");
    let mut buf2 = BytesMut::new();
    let head = read_head(&mut s2, &mut buf2).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut dec2 = FrameDecoder::new(Role::Client);
    assert_eq!(
        read_frame(&mut s2, &mut buf2, &mut dec2).await,
        Frame::ServerKey { key: server_key }
    );
    assert!(matches!(
        read_frame(&mut s2, &mut buf2, &mut dec2).await,
        Frame::ServerInfo { .. }
    ));
}

// ---------------------------------------------------------------- plain HTTP

/// (63) `/derp` without an Upgrade header is 426 with Go's body.
#[tokio::test]
async fn derp_without_upgrade_is_426() {
    let server = common::start().await;
    let r = request(&server, "GET", "/derp", &[]).await;
    assert_eq!(r.status, 426, "{r:?}");
    assert_eq!(r.body, b"DERP requires connection upgrade\n");
    // An unexpected Upgrade value is no upgrade either.
    let r = request(&server, "GET", "/derp", &[("Upgrade", "h2c")]).await;
    assert_eq!(r.status, 426, "{r:?}");
}

/// (62) Probe endpoints: GET and HEAD → 200 with CORS; POST → 405.
#[tokio::test]
async fn probe_endpoints() {
    let server = common::start().await;
    for path in ["/derp/probe", "/derp/latency-check"] {
        for method in ["GET", "HEAD"] {
            let r = request(&server, method, path, &[]).await;
            assert_eq!(r.status, 200, "{method} {path}: {r:?}");
            assert_eq!(
                r.header("access-control-allow-origin"),
                Some("*"),
                "{method} {path}: {r:?}"
            );
            assert!(r.body.is_empty());
        }
        let r = request(&server, "POST", path, &[]).await;
        assert_eq!(r.status, 405, "POST {path}: {r:?}");
    }
}

/// (66, 67, 68) `/generate_204` and its challenge/response header.
#[tokio::test]
async fn generate_204_challenges() {
    let server = common::start().await;
    let r = request(&server, "GET", "/generate_204", &[]).await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("x-tailscale-response"), None);
    assert_eq!(
        r.header("cache-control"),
        Some("no-cache, no-store, must-revalidate, no-transform, max-age=0")
    );

    for (challenge, want) in [
        ("input", "response input"),
        (
            "ts_derp99b.tailscale.com",
            "response ts_derp99b.tailscale.com",
        ),
    ] {
        let r = request(
            &server,
            "GET",
            "/generate_204",
            &[("X-Tailscale-Challenge", challenge)],
        )
        .await;
        assert_eq!(r.status, 204, "{r:?}");
        assert_eq!(r.header("x-tailscale-response"), Some(want), "{r:?}");
    }

    let long = "a".repeat(65);
    for bad in ["has space", long.as_str(), "slash/y", "bang!"] {
        let r = request(
            &server,
            "GET",
            "/generate_204",
            &[("X-Tailscale-Challenge", bad)],
        )
        .await;
        assert_eq!(r.status, 204, "{bad:?}: {r:?}");
        assert_eq!(r.header("x-tailscale-response"), None, "{bad:?}: {r:?}");
    }
    // 64 characters is still fine.
    let max = "b".repeat(64);
    let r = request(
        &server,
        "GET",
        "/generate_204",
        &[("X-Tailscale-Challenge", &max)],
    )
    .await;
    assert_eq!(
        r.header("x-tailscale-response"),
        Some(format!("response {max}").as_str())
    );
}

/// Home page and unknown paths.
#[tokio::test]
async fn home_page_and_unknown_path() {
    let server = common::start().await;
    let r = request(&server, "GET", "/", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("text/html")),
        "{r:?}"
    );
    assert!(!r.body.is_empty());
    let r = request(&server, "GET", "/no/such/thing", &[]).await;
    assert_eq!(r.status, 404, "{r:?}");
}

/// Garbage that ends like a head (e.g. a TLS ClientHello sent to the plain
/// port) gets a 400 and the connection is closed.
#[tokio::test]
async fn malformed_request_is_400_and_closed() {
    let server = common::start().await;
    let mut s = connect(&server).await;
    s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x9a\x7f garbage\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
}

/// A request head over 16 KiB gets 431.
#[tokio::test]
async fn oversized_head_is_431() {
    let server = common::start().await;
    let mut s = connect(&server).await;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nX-Big: {}\r\n\r\n",
        server.addr,
        "a".repeat(17 << 10)
    );
    // The server may close before reading everything; that is fine.
    let _ = s.write_all(req.as_bytes()).await;
    let got = read_until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
}

/// A DERP upgrade as the second request of a kept-alive connection (the
/// hyper path) works: 101 with the DERP headers, then a normal handshake and
/// packets both ways.
#[tokio::test]
async fn upgrade_after_probe_on_kept_alive_connection() {
    let server = common::start().await;
    let server_key = server.relay.public_key();
    let (mut bob, bob_key) = our_client(&server).await;
    let mut s = connect(&server).await;
    let mut buf = BytesMut::new();

    s.write_all(format!("GET /derp/probe HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        !r.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "probe response closes the connection: {r:?}"
    );

    let host = server.addr.to_string();
    s.write_all(upgrade_request("GET", &host, "").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s, &mut buf).await;
    let r = Resp {
        status: status_of(&head),
        head,
        body: Vec::new(),
    };
    assert_eq!(r.status, 101, "{r:?}");
    assert!(r.head.starts_with("HTTP/1.1 101 "), "{r:?}");
    assert_eq!(
        r.header("upgrade").map(str::to_ascii_lowercase).as_deref(),
        Some("derp")
    );
    assert_eq!(r.header("derp-version"), Some("2"));
    assert_eq!(
        r.header("derp-public-key"),
        Some(lower_hex(&server_key).as_str())
    );

    let key = NodePrivate::generate();
    let mut alice = timeout(
        ARRIVES,
        Client::handshake(s, buf, &key, ClientInfo::default()),
    )
    .await
    .expect("handshake in time")
    .expect("handshake on the hyper-upgraded connection");
    assert_eq!(alice.server_key(), server_key);

    alice
        .send_packet(bob_key.public(), b"via hyper")
        .await
        .unwrap();
    let (src, payload) = timeout(ARRIVES, bob.recv_packet())
        .await
        .expect("packet arrives")
        .unwrap();
    assert_eq!(src, key.public());
    assert_eq!(&payload[..], b"via hyper");

    bob.send_packet(key.public(), b"back").await.unwrap();
    let (src, payload) = timeout(ARRIVES, alice.recv_packet())
        .await
        .expect("reply arrives")
        .unwrap();
    assert_eq!(src, bob_key.public());
    assert_eq!(&payload[..], b"back");
}
