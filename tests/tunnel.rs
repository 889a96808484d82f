//! `derpd tunnel` end to end on loopback: two in-process boringtun
//! WireGuard peers talk through two tunnels and a real relay; a third
//! tunnel whose key is not configured is dropped; relay failover and
//! fail-back; and the `keygen`/`tunnel` command lines.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use common::{eventually, ARRIVES, QUIET};
use derpd::config::ShutdownSettings;
use derpd::proto::{NodePrivate, NodePublic};
use derpd::server::{Server, ServerConfig};
use derpd::tunnel::{DropReason, PeerConfig, Tunnel, TunnelConfig};
use parking_lot::Mutex;
use tokio::net::UdpSocket;

/// Bytes each WireGuard peer sends the other.
const TRANSFER: usize = 512 << 10;
/// Application bytes per inner packet.
const CHUNK: usize = 1000;

fn peer(key: NodePublic) -> PeerConfig {
    PeerConfig {
        key,
        listen: "127.0.0.1:0".parse().unwrap(),
        name: key.short(),
    }
}

fn config(key: &NodePrivate, servers: Vec<String>, peers: &[NodePublic]) -> TunnelConfig {
    let mut c = TunnelConfig::new(
        key.clone(),
        servers,
        peers.iter().map(|k| peer(*k)).collect(),
    );
    c.status_interval = None;
    c.keepalive = Duration::from_secs(2);
    c
}

/// One in-process WireGuard peer: a boringtun `Tunn` on a loopback UDP
/// socket whose only endpoint is its local tunnel socket.
struct Wg {
    tunn: Mutex<Tunn>,
    sock: UdpSocket,
    endpoint: SocketAddr,
    /// Received inner packets: sequence number → payload.
    got: Mutex<BTreeMap<u32, Vec<u8>>>,
    /// Datagrams that arrived on the socket at all.
    datagrams: std::sync::atomic::AtomicU64,
}

impl Wg {
    fn new(
        sock: UdpSocket,
        me: &StaticSecret,
        them: &StaticSecret,
        index: u32,
        endpoint: SocketAddr,
    ) -> Arc<Wg> {
        let tunn = Tunn::new(me.clone(), PublicKey::from(them), None, None, index, None);
        Arc::new(Wg {
            tunn: Mutex::new(tunn),
            sock,
            endpoint,
            got: Mutex::new(BTreeMap::new()),
            datagrams: Default::default(),
        })
    }

    /// Encrypts one inner IPv4 packet (sequence number + data) and sends it.
    fn send(&self, seq: u32, data: &[u8]) {
        let mut ip = vec![0u8; 20 + 4 + data.len()];
        ip[0] = 0x45;
        let len = ip.len() as u16;
        ip[2..4].copy_from_slice(&len.to_be_bytes());
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        ip[20..24].copy_from_slice(&seq.to_be_bytes());
        ip[24..].copy_from_slice(data);
        let mut out = vec![0u8; ip.len() + 200];
        if let TunnResult::WriteToNetwork(p) = self.tunn.lock().encapsulate(&ip, &mut out) {
            let _ = self.sock.try_send_to(p, self.endpoint);
        }
    }

    /// Receives, decrypts and answers until the task is aborted.
    async fn drive(self: Arc<Self>) {
        let mut buf = vec![0u8; 65536];
        let mut out = vec![0u8; 65536];
        let mut timers = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                r = self.sock.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    self.datagrams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut tunn = self.tunn.lock();
                    let mut datagram: &[u8] = &buf[..n];
                    loop {
                        match tunn.decapsulate(Some(from.ip()), datagram, &mut out) {
                            TunnResult::WriteToNetwork(p) => {
                                let _ = self.sock.try_send_to(p, self.endpoint);
                                datagram = &[];
                            }
                            TunnResult::WriteToTunnelV4(p, _) => {
                                let seq = u32::from_be_bytes(p[20..24].try_into().unwrap());
                                self.got.lock().insert(seq, p[24..].to_vec());
                                break;
                            }
                            _ => break,
                        }
                    }
                }
                _ = timers.tick() => {
                    let mut tunn = self.tunn.lock();
                    if let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut out) {
                        let _ = self.sock.try_send_to(p, self.endpoint);
                    }
                }
            }
        }
    }
}

/// Sends `data` from `from` to `to` in numbered chunks, resending what has
/// not arrived (UDP may drop), until `to` holds every chunk.
async fn transfer(from: &Wg, to: &Wg, data: &[u8]) {
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let missing: Vec<u32> = {
            let got = to.got.lock();
            (0..chunks.len() as u32)
                .filter(|s| !got.contains_key(s))
                .take(128)
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "transfer stalled with {} chunks missing",
            missing.len()
        );
        for s in missing {
            from.send(s, chunks[s as usize]);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

fn reassemble(wg: &Wg) -> Vec<u8> {
    wg.got.lock().values().flatten().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boringtun_peers_exchange_data_byte_exact_and_strangers_are_dropped() {
    let server = common::start().await;
    let (ka, kb, kc) = (
        NodePrivate::generate(),
        NodePrivate::generate(),
        NodePrivate::generate(),
    );
    let url = vec![server.url()];
    let mut ca = config(&ka, url.clone(), &[kb.public()]);
    let mut cb = config(&kb, url.clone(), &[ka.public()]);
    let cc = config(&kc, url.clone(), &[ka.public()]);

    let (wa_key, wb_key) = (secret(), secret());
    // Each WireGuard's socket is bound first, so its tunnel knows where it
    // listens before it has sent anything (--wg-addr).
    let wa_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let wb_sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    ca.wg_addr = Some(wa_sock.local_addr().unwrap());
    cb.wg_addr = Some(wb_sock.local_addr().unwrap());
    let ta = Tunnel::start(ca).await.unwrap();
    let tb = Tunnel::start(cb).await.unwrap();
    let tc = Tunnel::start(cc).await.unwrap();
    for t in [&ta, &tb, &tc] {
        assert!(
            eventually(|| t.metrics().relay().is_some()).await,
            "tunnel connects"
        );
        assert_eq!(t.metrics().relay().as_deref(), Some(url[0].as_str()));
    }

    let wa = Wg::new(
        wa_sock,
        &wa_key,
        &wb_key,
        1,
        ta.local_addr(&kb.public()).unwrap(),
    );
    let wb = Wg::new(
        wb_sock,
        &wb_key,
        &wa_key,
        2,
        tb.local_addr(&ka.public()).unwrap(),
    );
    let da = tokio::spawn(wa.clone().drive());
    let db = tokio::spawn(wb.clone().drive());

    let a_data: Vec<u8> = (0..TRANSFER).map(|i| (i * 7 + i / 251) as u8).collect();
    let b_data: Vec<u8> = (0..TRANSFER).map(|_| fastrand::u8(..)).collect();
    tokio::join!(transfer(&wa, &wb, &a_data), transfer(&wb, &wa, &b_data));
    assert!(reassemble(&wb) == a_data, "A → B arrived altered");
    assert!(reassemble(&wa) == b_data, "B → A arrived altered");

    let a_peer = ta.metrics().render();
    assert!(a_peer.contains("derpd_tunnel_packets_total"), "{a_peer}");
    assert_eq!(ta.metrics().dropped(DropReason::UnknownKey), 0);

    // Tunnel C's key is not one of A's peers: whatever it sends is dropped
    // and counted by A, and A's WireGuard never sees it.
    let seen_before = wa.datagrams.load(std::sync::atomic::Ordering::Relaxed);
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let c_endpoint = tc.local_addr(&ka.public()).unwrap();
    for i in 0..5u8 {
        stranger.send_to(&[i; 148], c_endpoint).unwrap();
    }
    assert!(
        eventually(|| ta.metrics().dropped(DropReason::UnknownKey) == 5).await,
        "A counts 5 packets from an unconfigured key, got {}",
        ta.metrics().dropped(DropReason::UnknownKey)
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(ta.metrics().dropped(DropReason::UnknownKey), 5);
    // Only A's own WireGuard traffic (keepalives/handshakes) may have
    // arrived meanwhile, and none from C came through B's socket either.
    assert!(tc
        .metrics()
        .render()
        .contains("derpd_tunnel_relay_connected 1"));
    let line = ta.status_line();
    assert!(line.contains("drop_unknown_key=5"), "{line}");
    let seen_after = wa.datagrams.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        seen_after - seen_before < 5,
        "A's WireGuard saw {} datagrams while C sent 5",
        seen_after - seen_before
    );

    da.abort();
    db.abort();
    for t in [ta, tb, tc] {
        t.shutdown().await;
    }
    server.shutdown().await;
}

fn secret() -> StaticSecret {
    let mut b = [0u8; 32];
    b.iter_mut().for_each(|x| *x = fastrand::u8(..));
    StaticSecret::from(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_when_the_relay_restarts_and_fails_back() {
    let mut c1 = ServerConfig::loopback_ephemeral();
    c1.shutdown = ShutdownSettings {
        timeout: Duration::from_secs(2),
        reconnect_in: Duration::from_millis(100),
        try_for: Duration::from_millis(500),
        spread: Duration::from_millis(200),
    };
    let r1 = Server::start(c1, NodePrivate::generate(), None)
        .await
        .unwrap();
    let (r1_addr, r1_url) = (r1.addr, r1.url());
    let r2 = common::start().await;
    let r2_url = r2.url();
    let key = NodePrivate::generate();
    let mut c = config(
        &key,
        vec![r1_url.clone(), r2_url.clone()],
        &[NodePrivate::generate().public()],
    );
    c.failback = Some(Duration::from_millis(300));
    let t = Tunnel::start(c).await.unwrap();
    let m = t.metrics().clone();
    let on = |url: &str| m.relay().as_deref() == Some(url);
    assert!(
        eventually(|| on(&r1_url)).await,
        "starts on the first relay"
    );

    // Relay 1 says it is restarting and goes away: after trying it for the
    // hinted time, the tunnel moves to relay 2.
    r1.shutdown_gracefully().await;
    assert!(
        eventually(|| on(&r2_url)).await,
        "fails over to relay 2; on {:?}",
        m.relay()
    );
    assert!(m.reconnects.get() >= 1);
    assert!(m.connect_errors.get() >= 1);

    // Relay 1 is back at its old address: the tunnel returns to it.
    let mut again = ServerConfig::loopback_ephemeral();
    again.addr = r1_addr;
    let r1 = Server::start(again, NodePrivate::generate(), None)
        .await
        .expect("relay 1 restarts on its old port");
    assert!(
        eventually(|| on(&r1_url)).await,
        "fails back to relay 1; on {:?}",
        m.relay()
    );
    t.shutdown().await;
    r1.shutdown().await;
    r2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_keygen_and_tunnel() {
    use std::process::Command;
    let bin = env!("CARGO_BIN_EXE_derpd");
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("tunnel.key");

    let out = Command::new(bin)
        .args(["keygen", "--out"])
        .arg(&key_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let public: NodePublic = printed.trim().parse().expect("prints nodekey:HEX");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = Command::new(bin)
        .args(["keygen", "--public"])
        .arg(&key_path)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout).unwrap(), printed);
    let clobber = Command::new(bin)
        .args(["keygen", "--out"])
        .arg(&key_path)
        .output()
        .unwrap();
    assert!(!clobber.status.success(), "never replaces a key file");

    let server = common::start().await;
    let (mut remote, remote_key) = common::our_client(&server).await;
    let udp_port = common::free_port();
    let metrics_port = common::free_port();
    let mut child = tokio::process::Command::new(bin)
        .args(["tunnel", "--server", &server.url(), "--key-file"])
        .arg(&key_path)
        .args([
            "--peer",
            &format!("{}=127.0.0.1:{udp_port}", remote_key.public()),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + ARRIVES;
    loop {
        if tokio::net::TcpStream::connect(metrics_addr).await.is_ok() {
            let body = common::http_get_ok(metrics_addr, "/metrics").await;
            if body.contains("derpd_tunnel_relay_connected 1") {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tunnel never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // "WireGuard" sends to the peer's local socket; the peer's key receives
    // it from the tunnel's key, unaltered, and its answer comes back out of
    // the same socket to where the datagram came from.
    let wg = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let endpoint: SocketAddr = format!("127.0.0.1:{udp_port}").parse().unwrap();
    wg.send_to(b"handshake initiation", endpoint).await.unwrap();
    let (src, payload) = tokio::time::timeout(ARRIVES, remote.recv_packet())
        .await
        .expect("packet arrives over DERP")
        .unwrap();
    assert_eq!(src, public);
    assert_eq!(&payload[..], b"handshake initiation");
    remote
        .send_packet(public, b"handshake response")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(ARRIVES, wg.recv_from(&mut buf))
        .await
        .expect("answer arrives on the local socket")
        .unwrap();
    assert_eq!(&buf[..n], b"handshake response");
    assert_eq!(from, endpoint);
    let body = common::http_get_ok(metrics_addr, "/metrics").await;
    assert!(
        body.contains(&format!(
            "derpd_tunnel_packets_total{{direction=\"from_relay\",peer=\"{}\"}} 1",
            remote_key.public()
        )),
        "{body}"
    );

    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(ARRIVES, child.wait())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    server.shutdown().await;
}
