//! A short `derpd bench` soak with connection churn against an in-process
//! relay: every packet reaches the receiver it names, churn connections
//! really come and go, and the server's RSS and FD count are sampled.

mod common;

use std::time::Duration;

use derpd::bench::{run, BenchOptions};

fn options(url: String) -> BenchOptions {
    BenchOptions {
        url,
        pairs: 3,
        size: 200,
        duration: Duration::from_secs(3),
        window: None,
        rate: Some(200),
        idle: 50,
        idle_parallel: 16,
        source_addrs: 1,
        storm: false,
        stuck_watchers: 0,
        mesh_psk_file: None,
        tls: false,
        insecure: false,
        churn_rate: 60,
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
async fn churn_soak_delivers_only_to_the_named_receiver() {
    let server = common::start().await;
    let report = run(&options(server.url())).await.expect("bench runs");
    println!("{}", report.table());

    assert_eq!(report.wrong_key, 0, "packets delivered to the wrong key");
    assert_eq!(report.wrong_src, 0, "packets from an unexpected sender");
    assert!(report.received > 0, "the active pairs relayed nothing");

    let churn = report.churn.expect("churn ran");
    // Roughly 60/s for 3.3 s; behaviour, not rate: clearly more than the
    // handful a broken loop would make.
    assert!(churn.connections >= 20, "{churn:?}");
    assert!(churn.rounds >= 10, "{churn:?}");
    assert!(churn.delivered > 0, "{churn:?}");
    assert_eq!(churn.dial_errors, 0, "{churn:?}");

    let fds = report.server_fds.expect("FDs sampled");
    let rss = report.server_rss_kib_span.expect("RSS sampled");
    // At least the 50 idle clients and their server sides were open at the
    // end of the load, in this one process (pair and churn connections may
    // be closing as the sample is taken).
    assert!(fds.end >= fds.start + 2 * 50, "{fds:?}");
    assert!(fds.max >= fds.end, "{fds:?}");
    assert!(rss.start > 0 && rss.max >= rss.start, "{rss:?}");
    server.shutdown().await;
}
