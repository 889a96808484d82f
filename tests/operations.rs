//! Operating the relay: metrics, connection limits, rate limits, timeouts,
//! STUN through the server, and graceful restart / reload of the real binary
//! driven by signals.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use derpd::client::{Client, ClientError};
use derpd::config::{Limits, ServerConfig};
use derpd::proto::{ClientInfo, Frame, MeshKey, NodePrivate};
use derpd::relay::{ClientRateLimit, RelayConfig};
use derpd::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

async fn start_config(f: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut config = ServerConfig::loopback_ephemeral();
    f(&mut config);
    Server::start(config, NodePrivate::generate(), None)
        .await
        .expect("server starts")
}

/// Waits for the peer to close the connection (EOF or reset).
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1024];
    matches!(
        timeout(ARRIVES, async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
        })
        .await,
        Ok(true)
    )
}

/// Reads frames until the server closes the connection; returns them.
async fn frames_until_closed<S>(c: &mut Client<S>) -> Vec<Frame>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut got = Vec::new();
    let end = timeout(ARRIVES, async {
        loop {
            match c.recv().await {
                Ok(f) => got.push(f),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("connection closes in time");
    assert!(
        matches!(end, ClientError::Closed | ClientError::Io(_)),
        "{end:?}"
    );
    got
}

#[tokio::test]
async fn metrics_endpoint_parses_and_counters_move() {
    let server = start_config(|c| c.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    let (mut a, _) = our_client(&server).await;
    let (mut b, kb) = our_client(&server).await;
    a.send_packet(kb.public(), b"one").await.unwrap();
    timeout(ARRIVES, b.recv_packet()).await.unwrap().unwrap();
    a.send_packet(NodePrivate::generate().public(), b"nowhere")
        .await
        .unwrap();
    // A handshake whose box does not open.
    let mut s = upgraded_stream(&server, "GET").await;
    let mut sk = [0u8; 45];
    s.read_exact(&mut sk).await.unwrap();
    let wrong = derpd::proto::handshake::seal_client_info(
        &NodePrivate::generate(),
        &NodePrivate::generate().public(),
        &ClientInfo::default(),
    );
    s.write_all(&wrong.to_bytes()).await.unwrap();
    assert!(closed_by_peer(&mut s).await);

    let text = http_get_ok(server.metrics_addr.unwrap(), "/metrics").await;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => panic!("unexpected type for {name}"),
            })
            .unwrap_or_else(|| panic!("{name} {labels:?} missing"))
    };
    assert_eq!(value("derp_packets_sent_total", &[]), 1.0);
    assert_eq!(
        value("derp_packets_received_total", &[("kind", "other")]),
        2.0
    );
    assert_eq!(
        value(
            "derp_packets_dropped_total",
            &[("reason", "unknown_dest"), ("kind", "other")]
        ),
        1.0
    );
    assert_eq!(
        value("derp_handshake_failures_total", &[("reason", "box_open")]),
        1.0
    );
    assert_eq!(value("derp_current_connections", &[]), 2.0);
    assert_eq!(value("derpd_connections_accepted_total", &[]), 3.0);
    assert!(value("derpd_build_info", &[]) == 1.0);
    // Every help text is present and every metric is typed.
    for name in [
        "derp_packets_dropped_total",
        "derp_queue_delay_seconds",
        "derpd_stun_requests_total",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn max_connections_is_enforced_and_counted() {
    let server = start_config(|c| {
        c.limits = Limits {
            max_connections: 2,
            ..Default::default()
        }
    })
    .await;
    let (a, _) = our_client(&server).await;
    let (_b, _) = our_client(&server).await;
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_by_peer(&mut third).await);
    assert_eq!(
        metric(
            &server,
            "derpd_connections_rejected_total{reason=\"max_connections\"}"
        ),
        1.0
    );
    // The limit and the open connections are exported for alerting.
    assert_eq!(metric(&server, "derpd_max_connections"), 2.0);
    assert_eq!(metric(&server, "derpd_connections_open"), 2.0);
    // A slot frees when a client leaves.
    drop(a);
    assert!(eventually(|| metric(&server, "derp_current_connections") == 1.0).await);
    assert!(eventually(|| metric(&server, "derpd_connections_open") == 1.0).await);
    let mut ok = false;
    for _ in 0..50 {
        if Client::connect(&server.url(), &NodePrivate::generate())
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a new client fits once a slot is free");
    server.shutdown().await;
}

#[tokio::test]
async fn accept_rate_limit_rejects_over_the_burst() {
    let server = start_config(|c| {
        c.limits = Limits {
            accept_per_sec: 0.001,
            accept_burst: 2,
            ..Default::default()
        }
    })
    .await;
    let (_a, _) = our_client(&server).await;
    let (_b, _) = our_client(&server).await;
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_by_peer(&mut third).await);
    assert_eq!(
        metric(
            &server,
            "derpd_connections_rejected_total{reason=\"accept_rate\"}"
        ),
        1.0
    );
    // Existing clients are unaffected.
    assert_eq!(metric(&server, "derp_current_connections"), 2.0);
    server.shutdown().await;
}

#[tokio::test]
async fn per_client_rate_limit_is_announced_waits_not_drops_and_reloads() {
    let rate = ClientRateLimit::new(200_000, 0);
    let mesh_key = MeshKey::generate();
    let server = start_with(
        RelayConfig {
            client_rate: rate,
            ..Default::default()
        },
        Some(mesh_key.clone()),
    )
    .await;
    let (mut a, _) = our_client(&server).await;
    assert_eq!(a.server_info().token_bucket_bytes_per_second, 200_000);
    assert_eq!(a.server_info().token_bucket_bytes_burst, 65_568);
    let (mut b, kb) = our_client(&server).await;
    let receiver = tokio::spawn(async move {
        let mut n = 0;
        while n < 12 {
            timeout(ARRIVES, b.recv_packet()).await.unwrap().unwrap();
            n += 1;
        }
        n
    });
    // 12 × 20 KB = 240 KB against a 64 KiB burst: the reader must wait.
    // Spaced so the receiver's queue never overflows: nothing is dropped.
    for _ in 0..12 {
        a.send_packet(kb.public(), &[7u8; 20_000]).await.unwrap();
    }
    assert_eq!(receiver.await.unwrap(), 12);
    assert!(metric(&server, "derp_rate_limit_waits_total") >= 1.0);
    assert_eq!(
        metric(
            &server,
            "derp_packets_dropped_total{kind=\"other\",reason=\"queue_head\"}"
        ),
        0.0
    );

    // Mesh peers are exempt and are told no rate.
    let mesh = Client::connect_with(
        &server.url(),
        &NodePrivate::generate(),
        ClientInfo {
            mesh_key: Some(mesh_key),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(mesh.server_info().token_bucket_bytes_per_second, 0);

    // A reload turns it off: new clients are told no rate.
    server.relay.set_client_rate(ClientRateLimit::new(0, 0));
    let (c, _) = our_client(&server).await;
    assert_eq!(c.server_info().token_bucket_bytes_per_second, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_and_idle_timeouts_close_connections() {
    let server = start_with(
        RelayConfig {
            handshake_timeout: Duration::from_millis(300),
            idle_timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        },
        None,
    )
    .await;
    // Upgrade, read ServerKey, never send ClientInfo.
    let mut s = upgraded_stream(&server, "GET").await;
    assert!(closed_by_peer(&mut s).await);
    assert_eq!(
        metric(&server, "derp_handshake_failures_total{reason=\"timeout\"}"),
        1.0
    );
    // A handshaken client that sends nothing is closed by the idle timeout.
    let (mut idle, _) = our_client(&server).await;
    let frames = frames_until_closed(&mut idle).await;
    assert!(frames.iter().all(|f| matches!(f, Frame::KeepAlive)));
    assert!(eventually(|| metric(&server, "derp_current_connections") == 0.0).await);
    server.shutdown().await;
}

#[tokio::test]
async fn stun_through_the_server_answers_with_the_mapped_address() {
    use bytecodec::{DecodeExt, EncodeExt};
    use stun_codec::rfc5389::{
        attributes::Software, attributes::XorMappedAddress, methods::BINDING, Attribute,
    };
    use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};

    let server = start_config(|c| c.stun_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut req =
        Message::<Attribute>::new(MessageClass::Request, BINDING, TransactionId::new([9; 12]));
    req.add_attribute(Attribute::Software(
        Software::new("tailnode".to_owned()).unwrap(),
    ));
    req.add_attribute(Attribute::Fingerprint(
        stun_codec::rfc5389::attributes::Fingerprint::new(&req).unwrap(),
    ));
    let bytes = MessageEncoder::new().encode_into_bytes(req).unwrap();
    sock.send_to(&bytes, server.stun_addr.unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = timeout(ARRIVES, sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let resp = MessageDecoder::<Attribute>::new()
        .decode_from_bytes(&buf[..n])
        .unwrap()
        .unwrap();
    let mapped = resp.get_attribute::<XorMappedAddress>().unwrap().address();
    assert_eq!(mapped, sock.local_addr().unwrap());
    // A non-Tailscale datagram gets nothing and is counted.
    sock.send_to(b"hello", server.stun_addr.unwrap())
        .await
        .unwrap();
    assert!(timeout(QUIET, sock.recv_from(&mut buf)).await.is_err());
    assert_eq!(
        metric(&server, "derpd_stun_requests_total{result=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric(&server, "derpd_stun_requests_total{result=\"not_stun\"}"),
        1.0
    );
    server.shutdown().await;
}

/// A running `derpd` binary with a few flags, on a free loopback port.
struct Process {
    child: std::process::Child,
    url: String,
}

impl Process {
    fn start(extra: &[&str]) -> Process {
        let port = common::free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_derpd"))
            .args([
                "serve",
                "--dev",
                "-a",
                &addr,
                "--stun=false",
                "--metrics-addr",
                "off",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("derpd runs");
        Process {
            child,
            url: format!("http://{addr}"),
        }
    }

    async fn client(&self) -> Client<TcpStream> {
        for _ in 0..200 {
            if let Ok(c) = Client::connect(&self.url, &NodePrivate::generate()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("derpd did not start");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..400 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        panic!("derpd did not exit after SIGTERM");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_sends_restarting_before_closing_and_exits_cleanly() {
    let mut p = Process::start(&[
        "--restart-reconnect-in",
        "750ms",
        "--restart-try-for",
        "20s",
        "--restart-reconnect-spread",
        "0",
    ]);
    let mut ours = p.client().await;
    // Tailscale's ts_derp client too.
    let host = p.url.trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(&host).await.unwrap();
    s.write_all(
        format!(
            "GET /derp HTTP/1.1\r\nHost: {host}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    let ts = ts_derp::Client::handshake(s, &ts_keys::NodeKeyPair::random())
        .await
        .unwrap();

    p.signal("-TERM");
    let frames = frames_until_closed(&mut ours).await;
    assert_eq!(
        frames.last(),
        Some(&Frame::Restarting {
            reconnect_in_ms: 750,
            try_for_ms: 20_000
        }),
        "{frames:?}"
    );
    // ts_derp reports the Restarting frame as an error (and would reconnect).
    let err = timeout(ARRIVES, ts.recv_one()).await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ts_derp::Error::UnexpectedRecvFrameType(ts_derp::frame::FrameType::Restarting)
        ),
        "{err}"
    );
    assert!(p.wait_exit().success());
}

#[tokio::test]
async fn sigterm_spreads_reconnect_hints_and_serves_each_client_until_its_turn() {
    // 1 s + a spread of 1 s: eight clients get eight different delays,
    // one in each eighth of the window.
    const N: usize = 8;
    let mut p = Process::start(&[
        "--restart-reconnect-in",
        "1s",
        "--restart-reconnect-spread",
        "1s",
        "--restart-try-for",
        "5s",
    ]);
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(p.client().await);
    }
    p.signal("-TERM");
    let mut delays = Vec::new();
    for c in &mut clients {
        let f = timeout(ARRIVES, async {
            loop {
                match c.recv().await.expect("served until told") {
                    f @ Frame::Restarting { .. } => return f,
                    _ => continue,
                }
            }
        })
        .await
        .expect("Restarting arrives");
        let Frame::Restarting {
            reconnect_in_ms,
            try_for_ms,
        } = f
        else {
            unreachable!()
        };
        assert_eq!(try_for_ms, 5_000);
        assert!(
            (1_000..2_000).contains(&reconnect_in_ms),
            "{reconnect_in_ms}"
        );
        delays.push(reconnect_in_ms);
    }
    let mut slots: Vec<u32> = delays.iter().map(|d| (d - 1_000) / 125).collect();
    slots.sort_unstable();
    assert_eq!(slots, (0..N as u32).collect::<Vec<_>>(), "{delays:?}");

    // Told but not yet at its turn (at least 1 s away): still relayed.
    let to = clients[1].public_key();
    clients[0].send_packet(to, b"still here").await.unwrap();
    let (_, got) = timeout(ARRIVES, clients[1].recv_packet())
        .await
        .expect("relayed after the Restarting frame")
        .unwrap();
    assert_eq!(&got[..], b"still here");

    // Then every connection is closed by the relay, which exits.
    for c in &mut clients {
        frames_until_closed(c).await;
    }
    assert!(p.wait_exit().success());
}

#[tokio::test]
async fn sighup_reloads_the_rate_config() {
    let dir = tempfile::tempdir().unwrap();
    let rate = dir.path().join("rate.json");
    std::fs::write(
        &rate,
        r#"{"PerClientRateLimitBytesPerSec":1000000,"PerClientRateBurstBytes":100000}"#,
    )
    .unwrap();
    let p = Process::start(&["--rate-config", rate.to_str().unwrap()]);
    let c = p.client().await;
    assert_eq!(c.server_info().token_bucket_bytes_per_second, 1_000_000);
    assert_eq!(c.server_info().token_bucket_bytes_burst, 100_000);
    std::fs::write(&rate, r#"{"PerClientRateLimitBytesPerSec":2000000}"#).unwrap();
    p.signal("-HUP");
    let mut seen = 0;
    for _ in 0..100 {
        seen = p.client().await.server_info().token_bucket_bytes_per_second;
        if seen == 2_000_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen, 2_000_000);
}

/// Many clients (Tailscale's own client) leave at once: once the count has
/// settled the relay hands free memory back, and not while they were there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_memory_back_once_many_clients_have_left() {
    use derpd::memory::{CAN_TRIM, CHECK_EVERY, MIN_DROP};
    if !CAN_TRIM {
        return;
    }
    let server = start().await;
    let mut clients = Vec::new();
    for _ in 0..MIN_DROP + 44 {
        clients.push(ts_client(&server).await);
    }
    assert_eq!(
        metric(&server, "derp_current_connections"),
        (MIN_DROP + 44) as f64
    );
    // Held through a look: nothing to give back.
    tokio::time::sleep(CHECK_EVERY + Duration::from_secs(1)).await;
    assert_eq!(metric(&server, "derpd_memory_trims_total"), 0.0);

    drop(clients);
    // The count falls to 0 and settles; the look after that trims.
    let deadline = tokio::time::Instant::now() + CHECK_EVERY * 3;
    while metric(&server, "derpd_memory_trims_total") < 1.0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&server, "derp_current_connections"), 0.0);
    assert!(metric(&server, "derpd_memory_trims_total") >= 1.0);
    server.shutdown().await;
}
