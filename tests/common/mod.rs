//! Shared test helpers: start a relay in-process on loopback, and connect
//! Tailscale's own `ts_derp` client to it.
#![allow(dead_code)]

pub mod ca;
pub mod proc_net;
pub mod tls_raw;

use std::time::Duration;

use derpd::proto::{MeshKey, NodePrivate, NodePublic};
use derpd::relay::RelayConfig;
use derpd::server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous bound for "this should arrive"; never a performance assertion.
pub const ARRIVES: Duration = Duration::from_secs(5);
/// How long to watch for something that must NOT arrive.
pub const QUIET: Duration = Duration::from_millis(300);

/// Starts a relay on 127.0.0.1:0 with default settings.
pub async fn start() -> Server {
    start_with(RelayConfig::default(), None).await
}

/// Starts a relay with custom core settings and mesh key.
pub async fn start_with(relay: RelayConfig, mesh_key: Option<MeshKey>) -> Server {
    let mut config = ServerConfig::loopback_ephemeral();
    config.relay = relay;
    Server::start(config, NodePrivate::generate(), mesh_key)
        .await
        .expect("server starts")
}

/// Our key type from a ts_keys public key.
pub fn from_ts(k: &ts_keys::NodePublicKey) -> NodePublic {
    k.to_string().parse().expect("ts_keys prints nodekey:<hex>")
}

/// A ts_keys public key from ours.
pub fn to_ts(k: &NodePublic) -> ts_keys::NodePublicKey {
    ts_keys::NodePublicKey::from_bytes(k.0)
}

/// Opens a TCP connection, sends an HTTP upgrade the way `method` says and
/// reads the response head exactly up to the blank line.
pub async fn upgraded_stream(server: &Server, method: &str) -> TcpStream {
    upgraded_stream_to(server.addr, method).await
}

/// [`upgraded_stream`] to any relay's address.
pub async fn upgraded_stream_to(addr: std::net::SocketAddr, method: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    let req = format!(
        "{method} /derp HTTP/1.1\r\nHost: {addr}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await.expect("response head");
        head.push(b);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    s
}

/// A `ts_derp` client (Tailscale's Rust DERP client) connected to `server`.
pub async fn ts_client(server: &Server) -> (ts_derp::Client<TcpStream>, ts_keys::NodeKeyPair) {
    ts_client_with(server, &ts_keys::NodeKeyPair::random(), "GET").await
}

/// A `ts_derp` client with a given key pair and upgrade method.
pub async fn ts_client_with(
    server: &Server,
    keys: &ts_keys::NodeKeyPair,
    method: &str,
) -> (ts_derp::Client<TcpStream>, ts_keys::NodeKeyPair) {
    let stream = upgraded_stream(server, method).await;
    let client = tokio::time::timeout(ARRIVES, ts_derp::Client::handshake(stream, keys))
        .await
        .expect("handshake in time")
        .expect("ts_derp handshake succeeds");
    (client, keys.clone())
}

/// Our own client connected to `server`.
pub async fn our_client(server: &Server) -> (derpd::client::Client<TcpStream>, NodePrivate) {
    let key = NodePrivate::generate();
    let c = derpd::client::Client::connect(&server.url(), &key)
        .await
        .expect("our client connects");
    (c, key)
}

/// Reads `/metrics`-style text for one sample value (exact series text).
pub fn metric(server: &Server, series: &str) -> f64 {
    let text = server.relay.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in metrics"))
        .parse()
        .unwrap()
}

/// Polls `cond` until it holds or `ARRIVES` passes.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + ARRIVES;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// `GET path` on `addr` with `Connection: close`; asserts a 200 and
/// returns the body.
pub async fn http_get_ok(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// A loopback TCP port that is free now, for a process the test starts
/// later. Picked below the kernel's ephemeral range (32768–60999), from
/// which bind(0) and every outgoing connection draw, so nothing else in the
/// test run takes it in the meantime.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..32_000);
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port");
}

/// A frame header: type byte + big-endian body length.
pub fn header(frame_type: u8, len: u32) -> Vec<u8> {
    let mut v = vec![frame_type];
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// A raw frame with the given body.
pub fn raw_frame(frame_type: u8, body: &[u8]) -> Vec<u8> {
    let mut v = header(frame_type, body.len() as u32);
    v.extend_from_slice(body);
    v
}
