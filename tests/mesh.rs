//! The mesh, end to end: relays in one process on loopback, meshed over
//! plain-HTTP links, with our client and Tailscale's `ts_derp` client.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use derpd::client::{Client, ClientError};
use derpd::mesh::{MeshExt, MeshOptions, PeerSpec};
use derpd::proto::handshake::{seal_server_info, server_key_frame};
use derpd::proto::{
    ClientInfo, Frame, FrameDecoder, MeshKey, NodePrivate, NodePublic, PeerGoneReason, Role,
    ServerInfo,
};
use derpd::server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// Bound for a restarted relay to rejoin (link backoff is capped at 5 s).
const HEAL: Duration = Duration::from_secs(20);

type Our = Client<TcpStream>;

async fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

async fn start_relay(mk: &MeshKey, addr: Option<SocketAddr>) -> Server {
    let mut config = ServerConfig::loopback_ephemeral();
    if let Some(a) = addr {
        config.addr = a;
    }
    config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    Server::start(config, NodePrivate::generate(), Some(mk.clone()))
        .await
        .expect("relay starts")
}

fn peers(addrs: &[SocketAddr]) -> Vec<PeerSpec> {
    addrs
        .iter()
        .map(|a| PeerSpec::parse(&format!("http://{a}")).unwrap())
        .collect()
}

/// Gives every relay the same full list (itself included) and waits until
/// each has a live link to every other one.
async fn mesh_all(servers: &[&Server]) {
    let list = peers(&servers.iter().map(|s| s.addr).collect::<Vec<_>>());
    for s in servers {
        s.relay
            .mesh()
            .set_peers(&list, &MeshOptions::default())
            .unwrap();
    }
    let want = servers.len() - 1;
    assert!(
        until(ARRIVES, || servers.iter().all(|s| s
            .relay
            .mesh()
            .links_up()
            == want))
        .await,
        "every relay links to every other one (and stops its self link)"
    );
}

async fn three_relays() -> (Vec<Server>, MeshKey) {
    let mk = MeshKey::generate();
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(start_relay(&mk, None).await);
    }
    mesh_all(&v.iter().collect::<Vec<_>>()).await;
    (v, mk)
}

/// Whether every relay either has `key` locally or knows a forwarder.
fn known_everywhere(servers: &[&Server], key: &NodePublic) -> bool {
    servers.iter().all(|s| {
        let reg = &s.relay.shared().registry;
        reg.is_local(key) || reg.remote.contains(key)
    })
}

async fn connect(server: &Server, key: &NodePrivate) -> Our {
    Client::connect(&server.url(), key).await.expect("connects")
}

/// Next RecvPacket, answering nothing and skipping every other frame.
async fn packet(c: &mut Our) -> (NodePublic, Bytes) {
    timeout(ARRIVES, c.recv_packet())
        .await
        .expect("packet arrives in time")
        .expect("connection stays up")
}

/// Next PeerGone within `limit`, skipping other frames.
async fn peer_gone(c: &mut Our, limit: Duration) -> Option<(NodePublic, PeerGoneReason)> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_timeout(left).await.ok()?? {
            Frame::PeerGone { key, reason } => return Some((key, reason)),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn clients_on_different_relays_exchange_packets_in_every_direction() {
    let (servers, _mk) = three_relays().await;
    let refs: Vec<&Server> = servers.iter().collect();
    let mut ours = Vec::new();
    let mut ts = Vec::new();
    for s in &servers {
        let k = NodePrivate::generate();
        ours.push((connect(s, &k).await, k.public()));
        ts.push(ts_client(s).await);
    }
    for (_, k) in &ours {
        assert!(until(ARRIVES, || known_everywhere(&refs, k)).await);
    }
    for (_, k) in &ts {
        assert!(until(ARRIVES, || known_everywhere(&refs, &from_ts(&k.public))).await);
    }
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let msg = format!("{i}->{j}");
            let (oj, tj) = (ours[j].1, ts[j].1.public);
            // ours i -> ours j, ours i -> ts j
            ours[i].0.send_packet(oj, msg.as_bytes()).await.unwrap();
            ours[i]
                .0
                .send_packet(from_ts(&tj), msg.as_bytes())
                .await
                .unwrap();
            let (src, got) = packet(&mut ours[j].0).await;
            assert_eq!((src, &got[..]), (ours[i].1, msg.as_bytes()));
            let (src, got) = timeout(ARRIVES, ts[j].0.recv_one()).await.unwrap().unwrap();
            assert_eq!((from_ts(&src), got.as_ref()), (ours[i].1, msg.as_bytes()));
            // ts i -> ts j, ts i -> ours j
            ts[i].0.send_one(tj, msg.as_bytes()).await.unwrap();
            ts[i].0.send_one(to_ts(&oj), msg.as_bytes()).await.unwrap();
            let (src, got) = timeout(ARRIVES, ts[j].0.recv_one()).await.unwrap().unwrap();
            assert_eq!((src, got.as_ref()), (ts[i].1.public, msg.as_bytes()));
            let (src, got) = packet(&mut ours[j].0).await;
            assert_eq!((src, &got[..]), (from_ts(&ts[i].1.public), msg.as_bytes()));
        }
    }
    let mut forwarded = 0.0;
    for s in &servers {
        forwarded += metric(s, "derp_packets_forwarded_out_total");
        // Two clients on each of the two other relays, plus those relays' links.
        assert!(metric(s, "derp_clients_remote") >= 4.0);
        for other in &servers {
            let series = format!("derpd_mesh_link_up{{peer=\"http://{}\"}}", other.addr);
            if other.addr == s.addr {
                // Its own entry is no link: no series, so no "link down" alert.
                let gone = until(ARRIVES, || !s.relay.metrics().render().contains(&series));
                assert!(gone.await, "{series} exported for itself");
            } else {
                assert_eq!(metric(s, &series), 1.0, "{series}");
            }
        }
    }
    assert_eq!(forwarded, 24.0, "each of the 24 packets crossed one hop");
    // The operator view on the metrics listener.
    let status = common::http_get_ok(servers[0].metrics_addr.unwrap(), "/debug/mesh").await;
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let states: Vec<&str> = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.iter().filter(|s| **s == "up").count(), 2, "{v}");
    assert_eq!(states.iter().filter(|s| **s == "self").count(), 1, "{v}");
    assert!(v["remote_keys"].as_u64().unwrap() >= 4, "{v}");
    for s in servers {
        s.shutdown().await;
    }
}

#[tokio::test]
async fn a_client_that_moves_relays_is_reachable_at_the_new_one_within_a_second() {
    let (servers, _mk) = three_relays().await;
    let refs: Vec<&Server> = servers.iter().collect();
    let (kx, ky) = (NodePrivate::generate(), NodePrivate::generate());
    let mut y = connect(&servers[2], &ky).await;
    let mut x = connect(&servers[0], &kx).await;
    assert!(until(ARRIVES, || known_everywhere(&refs, &kx.public())).await);
    y.send_packet(kx.public(), b"to A").await.unwrap();
    assert_eq!(
        packet(&mut x).await,
        (ky.public(), Bytes::from_static(b"to A"))
    );

    // Roam: leave A, show up at B.
    drop(x);
    let mut x = connect(&servers[1], &kx).await;
    let moved = Instant::now();
    let mut delivered = false;
    while moved.elapsed() < Duration::from_secs(1) {
        y.send_packet(kx.public(), b"to B").await.unwrap();
        if let Ok(Some(Frame::RecvPacket { src, payload })) =
            x.recv_timeout(Duration::from_millis(50)).await
        {
            assert_eq!((src, &payload[..]), (ky.public(), &b"to B"[..]));
            delivered = true;
            break;
        }
    }
    assert!(
        delivered,
        "not reachable at relay B within a second of moving"
    );
    for s in servers {
        s.shutdown().await;
    }
}

#[tokio::test]
async fn receivers_on_other_relays_get_peer_gone_when_a_sender_leaves() {
    let (servers, _mk) = three_relays().await;
    let refs: Vec<&Server> = servers.iter().collect();
    let (kx, ky, kz) = (
        NodePrivate::generate(),
        NodePrivate::generate(),
        NodePrivate::generate(),
    );
    let mut x = connect(&servers[0], &kx).await;
    let mut y = connect(&servers[1], &ky).await;
    let mut z = connect(&servers[2], &kz).await;
    for k in [&kx, &ky, &kz] {
        assert!(until(ARRIVES, || known_everywhere(&refs, &k.public())).await);
    }
    x.send_packet(ky.public(), b"hello y").await.unwrap();
    assert_eq!(packet(&mut y).await.0, kx.public());
    // z only sent to x; it never received from x.
    z.send_packet(kx.public(), b"hello x").await.unwrap();
    assert_eq!(packet(&mut x).await.0, kz.public());

    drop(x);
    assert_eq!(
        peer_gone(&mut y, ARRIVES).await,
        Some((kx.public(), PeerGoneReason::Disconnected))
    );
    assert_eq!(peer_gone(&mut y, QUIET).await, None, "exactly one PeerGone");
    assert_eq!(
        peer_gone(&mut z, QUIET).await,
        None,
        "z never received from x"
    );
    assert!(
        until(ARRIVES, || !servers[2]
            .relay
            .shared()
            .registry
            .remote
            .contains(&kx.public()))
        .await
    );
    for s in servers {
        s.shutdown().await;
    }
}

/// Sends one packet each way between two clients and checks both arrive.
async fn exchange(a: &mut Our, ka: NodePublic, b: &mut Our, kb: NodePublic, tag: &str) {
    a.send_packet(kb, tag.as_bytes()).await.unwrap();
    assert_eq!(
        packet(b).await,
        (ka, Bytes::copy_from_slice(tag.as_bytes()))
    );
    b.send_packet(ka, tag.as_bytes()).await.unwrap();
    assert_eq!(
        packet(a).await,
        (kb, Bytes::copy_from_slice(tag.as_bytes()))
    );
}

#[tokio::test]
async fn killing_a_relay_leaves_the_others_talking_and_the_mesh_heals_after_restart() {
    let (mut servers, mk) = three_relays().await;
    let (ka, kb, kc) = (
        NodePrivate::generate(),
        NodePrivate::generate(),
        NodePrivate::generate(),
    );
    let mut a = connect(&servers[0], &ka).await;
    let b = connect(&servers[1], &kb).await;
    let mut c = connect(&servers[2], &kc).await;
    {
        let refs: Vec<&Server> = servers.iter().collect();
        for k in [&ka, &kb, &kc] {
            assert!(until(ARRIVES, || known_everywhere(&refs, &k.public())).await);
        }
    }
    exchange(&mut a, ka.public(), &mut c, kc.public(), "before").await;

    let b_addr = servers[1].addr;
    servers.remove(1).shutdown().await;
    drop(b);
    // A and C forget B's clients, and keep talking.
    assert!(
        until(ARRIVES, || {
            !servers[0]
                .relay
                .shared()
                .registry
                .remote
                .contains(&kb.public())
                && !servers[1]
                    .relay
                    .shared()
                    .registry
                    .remote
                    .contains(&kb.public())
        })
        .await
    );
    for i in 0..5 {
        exchange(
            &mut a,
            ka.public(),
            &mut c,
            kc.public(),
            &format!("during {i}"),
        )
        .await;
    }

    // B comes back on the same address (or, if that port is taken, on a
    // new one that the others are told about).
    let restarted = match tokio::time::timeout(ARRIVES, async {
        loop {
            let mut config = ServerConfig::loopback_ephemeral();
            config.addr = b_addr;
            match Server::start(config, NodePrivate::generate(), Some(mk.clone())).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    {
        Ok(s) => s,
        Err(_) => {
            let s = start_relay(&mk, None).await;
            let list = peers(&[servers[0].addr, s.addr, servers[1].addr]);
            for o in &servers {
                o.relay
                    .mesh()
                    .set_peers(&list, &MeshOptions::default())
                    .unwrap();
            }
            s
        }
    };
    let list = peers(&[servers[0].addr, restarted.addr, servers[1].addr]);
    restarted
        .relay
        .mesh()
        .set_peers(&list, &MeshOptions::default())
        .unwrap();
    eprintln!("relay B back on {} (was {b_addr})", restarted.addr);
    servers.insert(1, restarted);
    let refs: Vec<&Server> = servers.iter().collect();
    assert!(
        until(HEAL, || refs.iter().all(|s| s.relay.mesh().links_up() == 2)).await,
        "mesh heals"
    );
    if servers[1].addr == b_addr {
        let series = format!("derpd_mesh_link_reconnects_total{{peer=\"http://{b_addr}\"}}");
        assert!(metric(&servers[0], &series) >= 1.0, "{series}");
    }
    let mut b = connect(&servers[1], &kb).await;
    for k in [&ka, &kb, &kc] {
        assert!(until(HEAL, || known_everywhere(&refs, &k.public())).await);
    }
    exchange(&mut a, ka.public(), &mut b, kb.public(), "a-b after").await;
    exchange(&mut b, kb.public(), &mut c, kc.public(), "b-c after").await;
    exchange(&mut a, ka.public(), &mut c, kc.public(), "a-c after").await;

    for s in servers {
        s.shutdown().await;
    }
}

/// Connects with `mesh_key` in ClientInfo (or none) and sends `frame`;
/// returns whether the relay closed the connection.
async fn closed_after(server: &Server, mesh_key: Option<MeshKey>, frame: Frame) -> bool {
    let info = ClientInfo {
        mesh_key,
        ..Default::default()
    };
    let mut c = Client::connect_with(&server.url(), &NodePrivate::generate(), info)
        .await
        .expect("handshake succeeds");
    c.send(&frame).await.unwrap();
    let end = timeout(ARRIVES, async {
        loop {
            match c.recv().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("connection closes in time");
    matches!(end, ClientError::Closed | ClientError::Io(_))
}

#[tokio::test]
async fn mesh_frames_without_the_right_key_close_the_connection_and_forward_nothing() {
    let mk = MeshKey::generate();
    let r1 = start_relay(&mk, None).await;
    let r2 = start_relay(&mk, None).await;
    mesh_all(&[&r1, &r2]).await;
    let (kl, kr) = (NodePrivate::generate(), NodePrivate::generate());
    let mut local = connect(&r1, &kl).await;
    let mut remote = connect(&r2, &kr).await;
    assert!(until(ARRIVES, || known_everywhere(&[&r1, &r2], &kr.public())).await);
    let forged = |dst: NodePublic| Frame::ForwardPacket {
        src: NodePrivate::generate().public(),
        dst,
        payload: Bytes::from_static(b"forged"),
    };
    let wrong = Some(MeshKey::generate());
    assert!(closed_after(&r1, wrong.clone(), Frame::WatchConns).await);
    assert!(closed_after(&r1, None, Frame::WatchConns).await);
    assert!(closed_after(&r1, wrong, forged(kl.public())).await);
    assert!(closed_after(&r1, None, forged(kr.public())).await);
    assert_eq!(metric(&r1, "derp_mesh_frame_refusals_total"), 4.0);
    assert_eq!(metric(&r1, "derp_packets_forwarded_in_total"), 0.0);
    assert!(local.recv_timeout(QUIET).await.unwrap().is_none());
    assert!(remote.recv_timeout(QUIET).await.unwrap().is_none());
    assert_eq!(metric(&r2, "derp_packets_forwarded_in_total"), 0.0);
    // The right key is accepted: the relay's own mesh still works.
    local.send_packet(kr.public(), b"legit").await.unwrap();
    assert_eq!(packet(&mut remote).await.0, kl.public());
    r1.shutdown().await;
    r2.shutdown().await;
}

/// A fake mesh peer relay: handshakes every link that dials it, reports
/// `ghost` present, then never reads again.
async fn stuck_peer(ghost: NodePublic) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let key = NodePrivate::generate();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = BytesMut::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
            }
            let mut out = BytesMut::new();
            out.extend_from_slice(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
            );
            server_key_frame(&key.public()).encode(&mut out);
            let _ = s.write_all(&out).await;
            let mut dec = FrameDecoder::new(Role::Server);
            let pos = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
            let _ = buf.split_to(pos + 4);
            let client = loop {
                match dec.decode(&mut buf) {
                    Ok(Some(Frame::ClientInfo { key, .. })) => break Some(key),
                    Ok(None) => {
                        if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            break None;
                        }
                    }
                    _ => break None,
                }
            };
            let Some(client) = client else { continue };
            let mut out = BytesMut::new();
            seal_server_info(&key, &client, &ServerInfo::current(0, 0)).encode(&mut out);
            Frame::PeerPresent {
                key: ghost,
                addr: None,
                flags: 1,
            }
            .encode(&mut out);
            let _ = s.write_all(&out).await;
            // Never read again; keep the socket open.
            held.push(s);
        }
    });
    addr
}

#[tokio::test]
async fn a_stuck_mesh_peer_does_not_hold_up_local_delivery() {
    let mk = MeshKey::generate();
    let relay = start_relay(&mk, None).await;
    // A stuck watcher: a mesh client that subscribes and never reads.
    let mut watcher = Client::connect_with(
        &relay.url(),
        &NodePrivate::generate(),
        ClientInfo {
            mesh_key: Some(mk.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    watcher.send(&Frame::WatchConns).await.unwrap();
    // A stuck peer relay that reports `ghost` and never reads our link.
    let ghost = NodePrivate::generate().public();
    let fake = stuck_peer(ghost).await;
    relay
        .relay
        .mesh()
        .set_peers(&peers(&[fake]), &MeshOptions::default())
        .unwrap();
    let remote = &relay.relay.shared().registry.remote;
    assert!(until(ARRIVES, || remote.contains(&ghost)).await);

    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let mut a = connect(&relay, &ka).await;
    let mut b = connect(&relay, &kb).await;
    const N: usize = 300;
    let bulk = vec![7u8; 16 << 10];
    for i in 0..N {
        // Ten 16 KiB packets at the stuck link for every local packet.
        for _ in 0..10 {
            a.queue(&Frame::SendPacket {
                dst: ghost,
                payload: Bytes::copy_from_slice(&bulk),
            });
        }
        a.flush().await.unwrap();
        let tag = format!("local {i}");
        exchange(&mut a, ka.public(), &mut b, kb.public(), &tag).await;
    }
    // Packets for the ghost were queued or dropped and counted, never waited on.
    let label = format!("http://{fake}");
    let queue_drops = metric(
        &relay,
        &format!("derpd_mesh_forward_dropped_total{{peer=\"{label}\"}}"),
    );
    let unknown = metric(
        &relay,
        "derp_packets_dropped_total{kind=\"other\",reason=\"unknown_dest\"}",
    );
    let forwarded = metric(&relay, "derp_packets_forwarded_out_total");
    eprintln!("ghost packets: forwarded {forwarded}, queue drops {queue_drops}, unknown {unknown}");
    assert_eq!(forwarded + unknown, (N * 10) as f64);
    assert!(
        queue_drops + unknown > 0.0,
        "the stuck link must shed packets (queue drops {queue_drops}, unknown {unknown})"
    );
    drop(watcher);
    relay.shutdown().await;
}
