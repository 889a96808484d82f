//! Checks against a relay that `scripts/deploy-test.sh` starts from the
//! container image (deploy/container). Ignored in a plain `cargo test`: they
//! need that running relay, whose address the script passes in
//! `DERPD_TEST_RELAY`.

mod common;

use common::ARRIVES;
use tokio::time::timeout;

fn relay_addr() -> std::net::SocketAddr {
    std::env::var("DERPD_TEST_RELAY")
        .expect("DERPD_TEST_RELAY=ip:port of a running relay (set by scripts/deploy-test.sh)")
        .parse()
        .expect("DERPD_TEST_RELAY is ip:port")
}

async fn ts_client(keys: &ts_keys::NodeKeyPair) -> ts_derp::Client<tokio::net::TcpStream> {
    let stream = common::upgraded_stream_to(relay_addr(), "GET").await;
    timeout(ARRIVES, ts_derp::Client::handshake(stream, keys))
        .await
        .expect("handshake in time")
        .expect("ts_derp handshake with the relay")
}

/// Two of Tailscale's own DERP clients exchange packets through the relay.
#[tokio::test]
#[ignore = "needs the relay scripts/deploy-test.sh starts (DERPD_TEST_RELAY)"]
async fn ts_derp_clients_relay_through_the_running_relay() {
    let (ka, kb) = (
        ts_keys::NodeKeyPair::random(),
        ts_keys::NodeKeyPair::random(),
    );
    let a = ts_client(&ka).await;
    let b = ts_client(&kb).await;
    a.send_one(kb.public, b"through the container")
        .await
        .unwrap();
    let (src, got) = timeout(ARRIVES, b.recv_one())
        .await
        .expect("packet arrives")
        .unwrap();
    assert_eq!(src, ka.public);
    assert_eq!(&got[..], b"through the container");
    b.send_one(ka.public, b"and back").await.unwrap();
    let (src, got) = timeout(ARRIVES, a.recv_one())
        .await
        .expect("reply arrives")
        .unwrap();
    assert_eq!(src, kb.public);
    assert_eq!(&got[..], b"and back");
}
