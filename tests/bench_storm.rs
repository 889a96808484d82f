//! `derpd bench --idle 20 --source-addrs 2 --storm` against an in-process
//! relay on loopback: every idle client comes back after the storm, every
//! packet reaches the receiver it names, and the relay really accepted
//! idle clients from 127.0.0.2 and 127.0.0.3. Runs too large for the
//! machine are refused before anything connects.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use derpd::bench::{run, BenchOptions};

fn options(url: String) -> BenchOptions {
    BenchOptions {
        url,
        pairs: 2,
        size: 200,
        duration: Duration::from_secs(2),
        window: None,
        rate: Some(100),
        idle: 20,
        idle_parallel: 8,
        source_addrs: 2,
        storm: true,
        stuck_watchers: 0,
        mesh_psk_file: None,
        tls: false,
        insecure: false,
        churn_rate: 0,
        churn_parallel: 64,
        // The relay runs in this process.
        server_pid: Some(std::process::id()),
        settle: Duration::from_secs(1),
        restart_pid: None,
        restart_to: None,
        json: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_storm_every_idle_client_is_back_from_both_source_addresses() {
    let server = common::start().await;
    let relay = server.addr;

    // The peers of the relay's accepted sockets (local end = the relay's
    // listening address), sampled from /proc/net/tcp during the run.
    let peers = Arc::new(parking_lot::Mutex::new(BTreeSet::<IpAddr>::new()));
    let watch = {
        let peers = peers.clone();
        tokio::spawn(async move {
            loop {
                for row in common::proc_net::tcp_rows() {
                    // 01: established.
                    if row.local == relay && row.state == 0x01 {
                        peers.lock().insert(row.remote.ip());
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let report = run(&options(server.url())).await.expect("bench runs");
    watch.abort();
    println!("{}", report.table());

    assert_eq!(report.wrong_key, 0, "packets delivered to the wrong key");
    assert_eq!(report.wrong_src, 0, "packets from an unexpected sender");
    assert!(
        report.received > 0,
        "the pairs relayed nothing before the storm"
    );
    assert_eq!(report.idle_clients, 20);

    let storm = report.storm.as_ref().expect("the storm ran");
    assert_eq!(storm.clients, 20, "{storm:?}");
    assert_eq!(storm.back, 20, "{storm:?}");
    assert!(report.storm_all_back_secs.is_some(), "{storm:?}");
    assert!(storm.dials.attempts >= 20, "{storm:?}");
    assert!(
        storm.sent > 0,
        "the pairs kept sending in the storm window: {storm:?}"
    );

    let peers = peers.lock().clone();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(
            peers.contains(&ip),
            "relay saw no connection from {ip}: {peers:?}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn runs_that_cannot_fit_are_refused_before_connecting() {
    // Nothing listens here: a run that got as far as dialing would fail
    // with a connection error instead of these.
    let url = "http://127.0.0.1:9".to_owned();

    let too_many = BenchOptions {
        idle: 5_000_000,
        storm: false,
        server_pid: None,
        ..options(url.clone())
    };
    let e = run(&too_many).await.unwrap_err();
    assert!(
        e.contains("file descriptors") && e.contains("--idle"),
        "{e}"
    );

    let remote = BenchOptions {
        server_pid: None,
        ..options("http://derp.invalid:3340".into())
    };
    let e = run(&remote).await.unwrap_err();
    assert!(
        e.contains("--source-addrs") && e.contains("loopback"),
        "{e}"
    );

    let storm_without_idle = BenchOptions {
        idle: 0,
        server_pid: None,
        ..options(url)
    };
    let e = run(&storm_without_idle).await.unwrap_err();
    assert!(e.contains("--storm") && e.contains("--idle"), "{e}");
}

#[tokio::test]
async fn dial_from_binds_the_source_address_and_relays() {
    let server = common::start().await;
    let src: IpAddr = "127.0.0.4".parse().unwrap();
    let (ka, kb) = (
        derpd::proto::NodePrivate::generate(),
        derpd::proto::NodePrivate::generate(),
    );
    let mut a = derpd::client::dial_from(&server.url(), &ka, false, Some(src))
        .await
        .expect("dial from 127.0.0.4");
    let mut b = derpd::client::dial_from(&server.url(), &kb, false, None)
        .await
        .expect("dial");
    assert!(
        common::proc_net::tcp_rows()
            .iter()
            .any(|r| r.local == server.addr && r.remote.ip() == src && r.state == 0x01),
        "the relay has no connection from {src}"
    );
    a.send_packet(kb.public(), b"from .4").await.unwrap();
    let (from, payload) = tokio::time::timeout(common::ARRIVES, b.recv_packet())
        .await
        .expect("arrives")
        .unwrap();
    assert_eq!((from, &payload[..]), (ka.public(), &b"from .4"[..]));

    // Held: only the socket is left, still bound to its source address.
    let held = derpd::client::dial_held(&server.url(), &ka, false, Some(src))
        .await
        .expect("dial_held");
    assert_eq!(held.local_addr().unwrap().ip(), src);
    server.shutdown().await;
}
