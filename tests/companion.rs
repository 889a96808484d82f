//! The headscale companion end to end: a test double of headscale's REST API
//! (built here with hyper, serving the recorded JSON from
//! `../shared/headscale-api/` with Bearer auth) feeds relays whose admission
//! is checked with Tailscale's `ts_derp` client; outage and replication,
//! crash safety of the snapshot store, `/verify`, `/derpmap.json`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use derpd::companion::admission::{Policy, UrlConfig};
use derpd::companion::derpmap::DerpMap;
use derpd::companion::{CompanionConfig, HeadscaleSource};
use derpd::proto::{MeshKey, NodePrivate};
use derpd::server::{Server, ServerConfig};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use ts_keys::NodeKeyPair;

const RECORDED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/headscale-api");
const API_KEY: &str = "hskey01.0123456789abcdef0123456789abcdef";
const EXPIRED_API_KEY: &str = "hskey02.fedcba9876543210fedcba9876543210";

// ---------------------------------------------------------------------------
// The headscale test double.

/// A node the double serves.
#[derive(Clone)]
struct HsNode {
    keys: NodeKeyPair,
    id: u64,
    user: Option<&'static str>,
    tags: Vec<&'static str>,
    expiry: Option<OffsetDateTime>,
}

impl HsNode {
    fn new(id: u64, user: &'static str) -> HsNode {
        HsNode {
            keys: NodeKeyPair::random(),
            id,
            user: Some(user),
            tags: vec![],
            expiry: None,
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| format!("{:x}", fastrand::u8(0..16)))
        .collect()
}

/// Replaces the recorded placeholders with real-looking values.
fn fill_placeholders(v: &mut Value, field: &str) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                fill_placeholders(child, k);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| fill_placeholders(c, field)),
        Value::String(s) if s == "<timestamp>" => *s = rfc3339(OffsetDateTime::now_utc()),
        Value::String(s) if s == "<secret>" => {
            *s = match field {
                "machineKey" => format!("mkey:{}", random_hex(64)),
                "discoKey" => format!("discokey:{}", random_hex(64)),
                "nodeKey" => format!("nodekey:{}", random_hex(64)),
                _ => random_hex(48),
            }
        }
        _ => {}
    }
}

fn recorded(name: &str) -> Value {
    let text = std::fs::read_to_string(format!("{RECORDED}/{name}")).expect("recorded file");
    serde_json::from_str(&text).unwrap()
}

/// One node in headscale v0.29 JSON, from the recorded node-list answer
/// (the tagged-node recording when the node has tags: `"user": null`).
fn v029_node(n: &HsNode) -> Value {
    let mut node = if n.tags.is_empty() {
        recorded("TestAPIV1NodeList_all_parity.json")["body"]["nodes"][0].clone()
    } else {
        recorded("TestAPIV1NodeGet_tagged_node_parity.json")["body"]["node"].clone()
    };
    fill_placeholders(&mut node, "");
    node["id"] = json!(n.id.to_string());
    node["name"] = json!(format!("node-{}", n.id));
    node["givenName"] = json!(format!("node-{}", n.id));
    node["nodeKey"] = json!(n.keys.public.to_string());
    match n.user {
        Some(u) => {
            if node["user"].is_null() {
                node["user"] = node["preAuthKey"]["user"].clone();
            }
            node["user"]["name"] = json!(u);
        }
        None => node["user"] = Value::Null,
    }
    node["tags"] = json!(n.tags);
    node["expiry"] = match n.expiry {
        Some(t) => json!(rfc3339(t)),
        None => Value::Null,
    };
    node
}

/// One node in headscale v0.26.1 JSON, from the recorded v0.26.1 answer.
fn v026_node(n: &HsNode) -> Value {
    let mut node = recorded("v0.26.1-node-list.json")["nodes"][0].clone();
    node["id"] = json!(n.id.to_string());
    node["nodeKey"] = json!(n.keys.public.to_string());
    node["user"]["name"] = json!(n.user.unwrap_or(""));
    node["validTags"] = json!(n.tags);
    node["expiry"] = match n.expiry {
        Some(t) => json!(rfc3339(t)),
        None => json!("0001-01-01T00:00:00Z"),
    };
    node
}

struct HsState {
    nodes: parking_lot::Mutex<Vec<HsNode>>,
    v026: std::sync::atomic::AtomicBool,
    list_requests: std::sync::atomic::AtomicUsize,
    /// When set, the node list is answered with exactly this body.
    raw_body: parking_lot::Mutex<Option<&'static str>>,
}

/// headscale's `GET /api/v1/node` with headscale's auth behaviour: no or
/// non-Bearer Authorization or an expired key → 401; a malformed or wrong
/// key → 500 `Unauthorized`.
struct Headscale {
    addr: SocketAddr,
    state: Arc<HsState>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn secret_matches(given: &str, want: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == want.len() && bool::from(given.as_bytes().ct_eq(want.as_bytes()))
}

async fn headscale_answer(
    state: Arc<HsState>,
    req: Request<hyper::body::Incoming>,
) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    let plain = |status: u16, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r.headers_mut()
            .insert("content-type", "text/plain; charset=utf-8".parse().unwrap());
        r
    };
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let Some(token) = auth.and_then(|a| a.strip_prefix("Bearer ")) else {
        return plain(401, "Unauthorized\n");
    };
    if secret_matches(token, EXPIRED_API_KEY) {
        return plain(401, "Unauthorized\n");
    }
    // Prefix "<7 chars>." then a 32-character secret.
    let well_formed = token.len() == 40 && token.as_bytes()[7] == b'.';
    if !well_formed || !secret_matches(token, API_KEY) {
        return plain(500, "Unauthorized");
    }
    if req.uri().path() != "/api/v1/node" || req.method() != hyper::Method::GET {
        return plain(404, "Not Found\n");
    }
    state
        .list_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(raw) = *state.raw_body.lock() {
        let mut r = Response::new(Full::new(Bytes::from_static(raw.as_bytes())).boxed());
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        return r;
    }
    let nodes = state.nodes.lock().clone();
    let body = if state.v026.load(std::sync::atomic::Ordering::Relaxed) {
        json!({ "nodes": nodes.iter().map(v026_node).collect::<Vec<_>>() })
    } else {
        json!({ "nodes": nodes.iter().map(v029_node).collect::<Vec<_>>() })
    };
    // Chunked, like the real gateway, with its extra header.
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
    let mid = bytes.len() / 2;
    let chunks = vec![
        Ok::<_, Infallible>(Frame::data(bytes.slice(..mid))),
        Ok(Frame::data(bytes.slice(mid..))),
    ];
    let mut r = Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed());
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut().insert(
        "grpc-metadata-content-type",
        "application/grpc".parse().unwrap(),
    );
    r
}

impl Headscale {
    async fn start(nodes: Vec<HsNode>) -> Headscale {
        let state = Arc::new(HsState {
            nodes: parking_lot::Mutex::new(nodes),
            v026: Default::default(),
            list_requests: Default::default(),
            raw_body: Default::default(),
        });
        let mut hs = Headscale {
            addr: "127.0.0.1:0".parse().unwrap(),
            state,
            task: None,
        };
        hs.up().await;
        hs
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (Re)starts listening on the same address.
    async fn up(&mut self) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_reuseaddr(true).unwrap();
        sock.bind(self.addr).unwrap();
        let listener = sock.listen(128).unwrap();
        self.addr = listener.local_addr().unwrap();
        let state = self.state.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(headscale_answer(state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }

    /// Goes away: stops listening and drops every open connection.
    async fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    fn set_nodes(&self, nodes: Vec<HsNode>) {
        *self.state.nodes.lock() = nodes;
    }
}

// ---------------------------------------------------------------------------
// Relays and clients.

fn write_key_file(dir: &Path, key: &str) -> PathBuf {
    let p = dir.join("api.key");
    // As `headscale apikeys create > FILE` leaves it: with a newline.
    std::fs::write(&p, format!("{key}\n")).unwrap();
    p
}

fn companion_config(hs: &Headscale, dir: &Path, key: &str) -> CompanionConfig {
    CompanionConfig {
        headscale: Some(HeadscaleSource {
            url: hs.url(),
            api_key_file: write_key_file(dir, key),
        }),
        poll_interval: Duration::from_millis(150),
        request_timeout: Duration::from_secs(2),
        state_dir: Some(dir.join("state")),
        verify_clients: true,
        ..CompanionConfig::default()
    }
}

async fn relay(companion: CompanionConfig, mesh_key: Option<MeshKey>) -> Server {
    let mut config = ServerConfig::loopback_ephemeral();
    config.companion = Some(companion);
    Server::start(config, NodePrivate::generate(), mesh_key)
        .await
        .expect("relay starts")
}

/// Whether a `ts_derp` client with `keys` gets through the handshake (a
/// refused client's connection is closed before ServerInfo).
async fn admitted(server: &Server, keys: &NodeKeyPair) -> bool {
    let stream = upgraded_stream(server, "GET").await;
    match tokio::time::timeout(ARRIVES, ts_derp::Client::handshake(stream, keys)).await {
        Ok(Ok(_client)) => true,
        Ok(Err(_)) => false,
        Err(_) => panic!("the relay neither admitted nor closed the client"),
    }
}

/// Polls an async condition until it holds or `limit` passes.
async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cached_nodes(server: &Server) -> Option<usize> {
    server.companion.as_ref()?.snapshot().map(|s| s.nodes.len())
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, String, Bytes) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(body.into())).unwrap())
        .await
        .expect("HTTP request");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (
        status,
        ct,
        resp.into_body().collect().await.unwrap().to_bytes(),
    )
}

// ---------------------------------------------------------------------------
// Tests.

#[tokio::test]
async fn listed_keys_connect_unlisted_and_expired_are_refused() {
    let alice = HsNode::new(1, "alice");
    let mut expired = HsNode::new(2, "alice");
    expired.expiry = Some(OffsetDateTime::now_utc() - time::Duration::hours(1));
    let mut later = HsNode::new(3, "bob");
    later.expiry = Some(OffsetDateTime::now_utc() + time::Duration::days(1));
    let mut tagged = HsNode::new(4, "bob");
    tagged.user = None;
    tagged.tags = vec!["tag:ci"];
    let hs = Headscale::start(vec![
        alice.clone(),
        expired.clone(),
        later.clone(),
        tagged.clone(),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let server = relay(companion_config(&hs, dir.path(), API_KEY), None).await;

    assert!(wait_until(ARRIVES, || async { cached_nodes(&server) == Some(4) }).await);
    let (status, _, _) = http(server.addr, "GET", "/readyz", &[], "").await;
    assert_eq!(status, 200);

    assert!(admitted(&server, &alice.keys).await, "listed key connects");
    assert!(
        admitted(&server, &later.keys).await,
        "not yet expired connects"
    );
    assert!(
        admitted(&server, &tagged.keys).await,
        "tagged node (user null) connects"
    );
    assert!(
        !admitted(&server, &NodeKeyPair::random()).await,
        "unlisted key is refused"
    );
    assert!(
        !admitted(&server, &expired.keys).await,
        "expired node is refused"
    );

    // A refused client never becomes a client; admitted ones stay usable.
    let stream = upgraded_stream(&server, "GET").await;
    let a = ts_derp::Client::handshake(stream, &alice.keys)
        .await
        .unwrap();
    let stream = upgraded_stream(&server, "GET").await;
    let b = ts_derp::Client::handshake(stream, &later.keys)
        .await
        .unwrap();
    a.send_one(later.keys.public, b"hello").await.unwrap();
    let (src, got) = tokio::time::timeout(ARRIVES, b.recv_one())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((src, got.as_ref()), (alice.keys.public, &b"hello"[..]));

    let m = |s: &str| metric(&server, s);
    assert_eq!(
        m("derpd_admission_decisions_total{reason=\"unknown\",result=\"deny\"}"),
        1.0
    );
    assert_eq!(
        m("derpd_admission_decisions_total{reason=\"expired\",result=\"deny\"}"),
        1.0
    );
    assert_eq!(
        m("derpd_admission_decisions_total{reason=\"known\",result=\"allow\"}"),
        5.0
    );
    assert_eq!(m("derpd_companion_nodes_cached"), 4.0);
    assert!(m("derpd_companion_sync_attempts_total") >= 1.0);
    assert!(m("derpd_companion_cache_age_seconds") < 60.0);
    assert_eq!(
        m("derpd_companion_sync_failures_total{reason=\"auth\"}"),
        0.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn allow_lists_by_user_and_tag() {
    let a = HsNode::new(1, "proj-a");
    let b = HsNode::new(2, "proj-b");
    let mut ci = HsNode::new(3, "proj-b");
    ci.user = None;
    ci.tags = vec!["tag:ci"];
    let hs = Headscale::start(vec![a.clone(), b.clone(), ci.clone()]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = companion_config(&hs, dir.path(), API_KEY);
    cfg.policy = Policy {
        allow_users: vec!["proj-a".into()],
        allow_tags: vec!["tag:ci".into()],
        ..Policy::default()
    };
    let server = relay(cfg, None).await;
    assert!(wait_until(ARRIVES, || async { cached_nodes(&server) == Some(3) }).await);
    assert!(admitted(&server, &a.keys).await);
    assert!(admitted(&server, &ci.keys).await);
    assert!(!admitted(&server, &b.keys).await, "user not on the list");
    assert_eq!(
        metric(
            &server,
            "derpd_admission_decisions_total{reason=\"not_allowed\",result=\"deny\"}"
        ),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn headscale_v026_json_is_understood() {
    let a = HsNode::new(1, "e2e");
    let hs = Headscale::start(vec![a.clone()]).await;
    hs.state
        .v026
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let server = relay(companion_config(&hs, dir.path(), API_KEY), None).await;
    assert!(wait_until(ARRIVES, || async { cached_nodes(&server) == Some(1) }).await);
    assert!(admitted(&server, &a.keys).await);
    assert!(!admitted(&server, &NodeKeyPair::random()).await);
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_api_keys_are_auth_failures_not_outages() {
    let a = HsNode::new(1, "alice");
    let hs = Headscale::start(vec![a.clone()]).await;
    for (key, status) in [
        (
            "hskey01.00000000000000000000000000000000",
            "500 Unauthorized",
        ),
        ("garbage", "500 Unauthorized"),
        (EXPIRED_API_KEY, "401"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = relay(companion_config(&hs, dir.path(), key), None).await;
        let ok = wait_until(ARRIVES, || async {
            metric(
                &server,
                "derpd_companion_sync_failures_total{reason=\"auth\"}",
            ) >= 1.0
        })
        .await;
        assert!(ok, "{status}: counted as an auth failure");
        assert_eq!(
            metric(
                &server,
                "derpd_companion_sync_failures_total{reason=\"unreachable\"}"
            ),
            0.0
        );
        assert_eq!(cached_nodes(&server), None);
        // Never synced: denied by default, and not ready.
        assert!(!admitted(&server, &a.keys).await);
        assert_eq!(
            metric(
                &server,
                "derpd_admission_decisions_total{reason=\"cache_empty\",result=\"deny\"}"
            ),
            1.0
        );
        let (st, _, _) = http(server.addr, "GET", "/readyz", &[], "").await;
        assert_eq!(st, 503);
        let (st, _, _) = http(server.addr, "GET", "/healthz", &[], "").await;
        assert_eq!(st, 200);
        server.shutdown().await;
    }
    assert_eq!(
        hs.state
            .list_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn outage_relays_keep_admitting_replicate_and_resync() {
    let known = HsNode::new(1, "alice");
    let removed = HsNode::new(2, "bob");
    let mut hs = Headscale::start(vec![known.clone(), removed.clone()]).await;
    let mesh = MeshKey::generate();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = relay(
        companion_config(&hs, dir_a.path(), API_KEY),
        Some(mesh.clone()),
    )
    .await;
    let a_url = format!("http://{}", a.addr);
    let mut cfg_b = companion_config(&hs, dir_b.path(), API_KEY);
    cfg_b.peers = vec![a_url.clone()];
    let b = relay(cfg_b.clone(), Some(mesh.clone())).await;
    for r in [&a, &b] {
        assert!(wait_until(ARRIVES, || async { cached_nodes(r) == Some(2) }).await);
        assert!(admitted(r, &known.keys).await);
    }

    // The snapshot endpoint is for mesh peers only.
    let (st, _, _) = http(a.addr, "GET", "/derpd/v1/snapshot", &[], "").await;
    assert_eq!(st, 403);
    let wrong = MeshKey::generate().to_hex();
    let (st, _, _) = http(
        a.addr,
        "GET",
        "/derpd/v1/snapshot",
        &[("derpd-mesh-key", &wrong)],
        "",
    )
    .await;
    assert_eq!(st, 403);
    let (st, _, body) = http(
        a.addr,
        "GET",
        "/derpd/v1/snapshot",
        &[("derpd-mesh-key", &mesh.to_hex())],
        "",
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        derpd::companion::model::Snapshot::from_json(&body)
            .unwrap()
            .nodes
            .len(),
        2
    );

    // headscale goes away.
    hs.down().await;
    assert!(
        wait_until(ARRIVES, || async {
            metric(
                &a,
                "derpd_companion_sync_failures_total{reason=\"unreachable\"}",
            ) >= 2.0
        })
        .await
    );
    assert!(
        admitted(&a, &known.keys).await,
        "A keeps admitting known nodes"
    );
    assert!(admitted(&a, &removed.keys).await);
    assert!(
        !admitted(&a, &NodeKeyPair::random()).await,
        "A keeps refusing unknown ones"
    );

    // B restarts with an empty state directory while headscale is away.
    b.shutdown().await;
    let dir_b2 = tempfile::tempdir().unwrap();
    let mut cfg_b2 = companion_config(&hs, dir_b2.path(), API_KEY);
    cfg_b2.peers = vec![a_url.clone()];
    let started = Instant::now();
    let b2 = relay(cfg_b2, Some(mesh.clone())).await;
    assert!(
        wait_until(ARRIVES, || async { cached_nodes(&b2) == Some(2) }).await,
        "B fetched A's snapshot"
    );
    println!("B ready from A's snapshot after {:?}", started.elapsed());
    assert_eq!(
        b2.companion.as_ref().unwrap().snapshot().unwrap().hash,
        a.companion.as_ref().unwrap().snapshot().unwrap().hash
    );
    assert!(
        admitted(&b2, &known.keys).await,
        "B admits known nodes from the replica"
    );
    assert!(!admitted(&b2, &NodeKeyPair::random()).await);
    assert!(metric(&b2, "derpd_companion_snapshot_replications_total{direction=\"fetched\",result=\"installed\"}") >= 1.0);
    assert!(
        metric(
            &a,
            "derpd_companion_snapshot_replications_total{direction=\"served\",result=\"ok\"}"
        ) >= 2.0
    );
    // The replica was stored durably too.
    assert!(dir_b2
        .path()
        .join("state")
        .join(derpd::companion::store::FILE_NAME)
        .exists());

    // headscale comes back with one node removed.
    hs.set_nodes(vec![known.clone()]);
    hs.up().await;
    for r in [&a, &b2] {
        assert!(
            wait_until(Duration::from_secs(15), || async {
                cached_nodes(r) == Some(1)
            })
            .await,
            "resynced after headscale returned"
        );
        assert!(
            !admitted(r, &removed.keys).await,
            "the removed node is refused"
        );
        assert!(admitted(r, &known.keys).await);
    }
    // Older snapshots never overwrite newer: B asking A again changes nothing.
    let before = b2.companion.as_ref().unwrap().snapshot().unwrap();
    b2.companion.as_ref().unwrap().fetch_from_peers().await;
    let after = b2.companion.as_ref().unwrap().snapshot().unwrap();
    assert!(after.fetched_at_ms >= before.fetched_at_ms);
    a.shutdown().await;
    b2.shutdown().await;
}

#[tokio::test]
async fn a_restarted_relay_loads_its_snapshot_before_accepting_clients() {
    let known = HsNode::new(1, "alice");
    let mut hs = Headscale::start(vec![known.clone()]).await;
    let dir = tempfile::tempdir().unwrap();
    let a = relay(companion_config(&hs, dir.path(), API_KEY), None).await;
    assert!(wait_until(ARRIVES, || async { cached_nodes(&a) == Some(1) }).await);
    a.shutdown().await;
    hs.down().await;
    // Same state dir, headscale away: the first client is already judged
    // from the stored snapshot.
    let a = relay(companion_config(&hs, dir.path(), API_KEY), None).await;
    assert_eq!(cached_nodes(&a), Some(1));
    assert!(admitted(&a, &known.keys).await);
    assert!(!admitted(&a, &NodeKeyPair::random()).await);
    a.shutdown().await;
}

#[test]
fn snapshots_survive_sigkill_mid_write() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut last_acked = 0u64;
    for round in 0..8 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_derpd"))
            .args(["companion-store-torture", "--state-dir"])
            .arg(dir.path())
            .args(["--nodes", "300"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("derpd runs");
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut last = 0u64;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(v) = line.strip_prefix("saved ") {
                    last = v.parse().unwrap();
                    let _ = first_tx.send(());
                }
            }
            last
        });
        // Once the writer is in its loop, kill it at a random moment.
        first_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the writer commits");
        std::thread::sleep(Duration::from_millis(fastrand::u64(1..250)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        let store =
            derpd::companion::store::Store::open(dir.path()).expect("database opens after SIGKILL");
        let snap = store
            .load_newest()
            .expect("loads")
            .expect("a valid snapshot is there");
        snap.validate().unwrap();
        assert_eq!(snap.nodes.len(), 300);
        assert!(
            snap.fetched_at_ms >= acked.max(last_acked),
            "round {round}: newest {} but {acked} was committed",
            snap.fetched_at_ms
        );
        assert!(store.count().unwrap() <= derpd::companion::store::KEEP);
        last_acked = snap.fetched_at_ms;
        println!(
            "round {round}: killed after commit {acked}, loaded {}",
            snap.fetched_at_ms
        );
    }
    assert!(last_acked > 8, "the writer made progress");
}

/// The request bodies Tailscale's relay sends (derp-http.md §6).
fn tailscale_verify_body(key: &str, source: &str) -> Vec<u8> {
    format!("{{\"NodePublic\":\"{key}\",\"Source\":\"{source}\"}}").into_bytes()
}

#[tokio::test]
async fn verify_endpoint_answers_like_headscale_and_serves_stock_relays() {
    let known = HsNode::new(1, "alice");
    let mut expired = HsNode::new(2, "alice");
    expired.expiry = Some(OffsetDateTime::now_utc() - time::Duration::minutes(5));
    let hs = Headscale::start(vec![known.clone(), expired.clone()]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = companion_config(&hs, dir.path(), API_KEY);
    cfg.verify_clients = false; // only the /verify service
    let companion = relay(cfg, None).await;
    assert!(wait_until(ARRIVES, || async { cached_nodes(&companion) == Some(2) }).await);

    let ask = |body: Vec<u8>| http(companion.addr, "POST", "/verify", &[], body);
    let (st, ct, body) = ask(tailscale_verify_body(
        &known.keys.public.to_string(),
        "203.0.113.7",
    ))
    .await;
    assert_eq!(
        (st, ct.as_str(), &body[..]),
        (200, "application/json", &b"{\"Allow\":true}\n"[..])
    );
    let (st, _, body) = ask(tailscale_verify_body(
        &known.keys.public.to_string(),
        "2001:db8::1",
    ))
    .await;
    assert_eq!((st, &body[..]), (200, &b"{\"Allow\":true}\n"[..]));
    let (st, _, body) = ask(tailscale_verify_body(
        &NodeKeyPair::random().public.to_string(),
        "203.0.113.7",
    ))
    .await;
    assert_eq!((st, &body[..]), (200, &b"{\"Allow\":false}\n"[..]));
    // Like headscale, /verify allows any known node key, expired or not.
    let (st, _, body) = ask(tailscale_verify_body(&expired.keys.public.to_string(), "")).await;
    assert_eq!((st, &body[..]), (200, &b"{\"Allow\":true}\n"[..]));
    let (st, _, _) = ask(b"not json".to_vec()).await;
    assert_eq!(st, 400);
    let (st, _, _) = ask(vec![b' '; 5000]).await;
    assert_eq!(st, 413);
    for m in ["GET", "PUT"] {
        let (st, _, _) = http(companion.addr, m, "/verify", &[], "").await;
        assert_eq!(st, 405, "{m}");
    }

    // A relay using --verify-client-url pointed at the companion.
    let stock = relay(
        CompanionConfig {
            verify_url: Some(UrlConfig {
                url: format!("http://{}/verify", companion.addr),
                fail_open: true,
                timeout: Duration::from_secs(5),
                cache_ttl: Duration::ZERO,
            }),
            ..CompanionConfig::default()
        },
        None,
    )
    .await;
    assert!(admitted(&stock, &known.keys).await);
    // As with headscale's /verify, expiry is for the relay's own admission.
    assert!(admitted(&stock, &expired.keys).await);
    assert!(!admitted(&stock, &NodeKeyPair::random()).await);
    assert_eq!(
        metric(
            &stock,
            "derpd_admission_decisions_total{reason=\"url_allow\",result=\"allow\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &stock,
            "derpd_admission_decisions_total{reason=\"url_deny\",result=\"deny\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &companion,
            "derpd_companion_verify_requests_total{result=\"allow\"}"
        ),
        5.0
    );
    // Readiness does not depend on a cache for URL-based admission.
    let (st, _, _) = http(stock.addr, "GET", "/readyz", &[], "").await;
    assert_eq!(st, 200);
    stock.shutdown().await;

    // With a decision cache, a repeated key is answered without a request.
    let cached = relay(
        CompanionConfig {
            verify_url: Some(UrlConfig {
                url: format!("http://{}/verify", companion.addr),
                fail_open: false,
                timeout: Duration::from_secs(5),
                cache_ttl: Duration::from_secs(60),
            }),
            ..CompanionConfig::default()
        },
        None,
    )
    .await;
    let stranger = NodeKeyPair::random();
    for _ in 0..2 {
        assert!(admitted(&cached, &known.keys).await);
        assert!(!admitted(&cached, &stranger).await);
    }
    assert_eq!(
        metric(
            &cached,
            "derpd_admission_decisions_total{reason=\"url_cached\",result=\"allow\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &cached,
            "derpd_admission_decisions_total{reason=\"url_cached\",result=\"deny\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &companion,
            "derpd_companion_verify_requests_total{result=\"allow\"}"
        ),
        6.0
    );
    cached.shutdown().await;
    companion.shutdown().await;
}

#[tokio::test]
async fn verify_client_url_fail_open_decides_when_unreachable() {
    // Nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    for fail_open in [true, false] {
        let server = relay(
            CompanionConfig {
                verify_url: Some(UrlConfig {
                    url: format!("http://{dead_addr}/verify"),
                    fail_open,
                    timeout: Duration::from_secs(5),
                    cache_ttl: Duration::from_secs(60),
                }),
                ..CompanionConfig::default()
            },
            None,
        )
        .await;
        assert_eq!(admitted(&server, &NodeKeyPair::random()).await, fail_open);
        let series = format!(
            "derpd_admission_decisions_total{{reason=\"url_unreachable\",result=\"{}\"}}",
            if fail_open { "allow" } else { "deny" }
        );
        assert_eq!(metric(&server, &series), 1.0);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn mesh_key_clients_skip_admission() {
    let hs = Headscale::start(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = MeshKey::generate();
    let server = relay(
        companion_config(&hs, dir.path(), API_KEY),
        Some(mesh.clone()),
    )
    .await;
    assert!(wait_until(ARRIVES, || async { cached_nodes(&server) == Some(0) }).await);
    let info = derpd::proto::ClientInfo {
        mesh_key: Some(mesh),
        ..Default::default()
    };
    let c =
        derpd::client::Client::connect_with(&server.url(), &NodePrivate::generate(), info).await;
    assert!(c.is_ok(), "a mesh peer is never sent to admission");
    assert!(!admitted(&server, &NodeKeyPair::random()).await);
    server.shutdown().await;
}

#[tokio::test]
async fn derpmap_json_round_trips_as_the_documented_derpmap() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regions.toml");
    std::fs::write(
        &file,
        r#"
[Regions.900]
RegionID = 900
RegionCode = "fra"
RegionName = "Frankfurt"
Latitude = 50.1
Longitude = 8.7

[[Regions.900.Nodes]]
Name = "900a"
RegionID = 900
HostName = "derp-fra-1.example.com"
IPv4 = "198.51.100.1"
IPv6 = "2001:db8::1"
CanPort80 = true

[[Regions.900.Nodes]]
Name = "900b"
RegionID = 900
HostName = "derp-fra-2.example.com"
DERPPort = 8443
STUNPort = -1

[Regions.901]
RegionID = 901
RegionCode = "ams"
RegionName = "Amsterdam"
NoMeasureNoHome = true

[[Regions.901.Nodes]]
Name = "901a"
RegionID = 901
HostName = "203.0.113.9"
CertName = "sha256-raw:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
"#,
    )
    .unwrap();
    let map = DerpMap::load(&file).unwrap();
    let server = relay(
        CompanionConfig {
            derp_map: Some(map.clone()),
            ..CompanionConfig::default()
        },
        None,
    )
    .await;
    let (st, ct, body) = http(server.addr, "GET", "/derpmap.json", &[], "").await;
    assert_eq!((st, ct.as_str()), (200, "application/json"));
    let back: DerpMap = serde_json::from_slice(&body).unwrap();
    assert_eq!(back, map);
    // Exactly the documented keys; zero/false values omitted.
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["Regions"]
    );
    let r900 = &v["Regions"]["900"];
    let mut keys: Vec<_> = r900.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "Latitude",
            "Longitude",
            "Nodes",
            "RegionCode",
            "RegionID",
            "RegionName"
        ]
    );
    assert_eq!(r900["Nodes"][0]["Name"], "900a", "node order is kept");
    let mut nkeys: Vec<_> = r900["Nodes"][1]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    nkeys.sort();
    assert_eq!(
        nkeys,
        ["DERPPort", "HostName", "Name", "RegionID", "STUNPort"]
    );
    assert_eq!(v["Regions"]["901"]["NoMeasureNoHome"], true);
    let (st, _, _) = http(server.addr, "POST", "/derpmap.json", &[], "").await;
    assert_eq!(st, 405);
    // No cache here: ready, and /verify is not served.
    let (st, _, _) = http(server.addr, "GET", "/readyz", &[], "").await;
    assert_eq!(st, 200);
    let (st, _, _) = http(server.addr, "POST", "/verify", &[], "{}").await;
    assert_eq!(st, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn health_endpoints_without_a_companion() {
    let server = start().await;
    for p in ["/healthz", "/readyz"] {
        let (st, _, _) = http(server.addr, "GET", p, &[], "").await;
        assert_eq!(st, 200, "{p}");
    }
    let (st, _, _) = http(server.addr, "POST", "/verify", &[], "{}").await;
    assert_eq!(st, 404);
    server.shutdown().await;
}

/// Admission decisions per second from the cache vs one linear scan of a
/// headscale node list of the same size (what headscale's `/verify` does per
/// request). `cargo test --release --test companion -- --ignored --nocapture bench`
#[test]
#[ignore]
fn bench_admission_cache_vs_linear_scan() {
    use derpd::companion::admission::{decide, Policy};
    use derpd::companion::model::{CacheView, Node, Snapshot};
    const N: usize = 10_000;
    let nodes: Vec<Node> = (0..N)
        .map(|i| Node {
            id: i as u64 + 1,
            name: format!("node-{i}"),
            node_key: NodePrivate::generate().public(),
            user: Some(format!("user-{}", i % 50)),
            tags: vec![],
            expiry_ms: None,
            last_seen_ms: None,
        })
        .collect();
    let probes: Vec<_> = (0..1024)
        .map(|i| {
            if i % 4 == 0 {
                NodePrivate::generate().public()
            } else {
                nodes[fastrand::usize(..N)].node_key
            }
        })
        .collect();
    let view = CacheView::new(Arc::new(Snapshot::new(nodes.clone(), 1)));
    let policy = Policy::default();
    let now = derpd::companion::model::now_ms();

    let iters = 2_000_000usize;
    let t = Instant::now();
    let mut allowed = 0usize;
    for i in 0..iters {
        allowed += decide(Some(&view), &probes[i % probes.len()], now, &policy).allow as usize;
    }
    let cache_rate = iters as f64 / t.elapsed().as_secs_f64();

    // headscale-style: scan the whole node list comparing keys.
    let scans = 5_000usize;
    let t = Instant::now();
    let mut found = 0usize;
    for i in 0..scans {
        let k = &probes[i % probes.len()];
        found += nodes.iter().any(|n| &n.node_key == k && !n.is_expired(now)) as usize;
    }
    let scan_rate = scans as f64 / t.elapsed().as_secs_f64();

    // And the text form headscale compares (`nodekey:<hex>` strings).
    let texts: Vec<String> = nodes.iter().map(|n| n.node_key.to_string()).collect();
    let t = Instant::now();
    for i in 0..scans {
        let k = probes[i % probes.len()].to_string();
        found += texts.contains(&k) as usize;
    }
    let text_rate = scans as f64 / t.elapsed().as_secs_f64();
    println!(
        "admission, {N} nodes: cache {cache_rate:.0} decisions/s ({:.0} ns each); \
         linear scan {scan_rate:.0}/s ({:.1} µs each); text scan {text_rate:.0}/s ({:.1} µs each); \
         speed-up {:.0}x  [allowed {allowed}, found {found}]",
        1e9 / cache_rate,
        1e6 / scan_rate,
        1e6 / text_rate,
        cache_rate / scan_rate,
    );
}

// ---------------------------------------------------------------------------
// Refresh on a miss (a node registered between two polls).

fn list_reads(hs: &Headscale) -> usize {
    hs.state
        .list_requests
        .load(std::sync::atomic::Ordering::Relaxed)
}

/// The companion with headscale's default poll interval (10 s), so that only
/// a miss-triggered refresh can explain a fresh node list.
fn default_poll_config(hs: &Headscale, dir: &Path) -> CompanionConfig {
    CompanionConfig {
        poll_interval: CompanionConfig::default().poll_interval,
        ..companion_config(hs, dir, API_KEY)
    }
}

#[tokio::test]
async fn a_node_registered_after_the_last_poll_is_admitted_on_its_first_try() {
    let alice = HsNode::new(1, "alice");
    let hs = Headscale::start(vec![alice.clone()]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = relay(default_poll_config(&hs, dir.path()), None).await;
    assert!(wait_until(ARRIVES, || async { cached_nodes(&server) == Some(1) }).await);
    let reads_before = list_reads(&hs);

    // headscale registers bob; the next poll is ~10 s away.
    let bob = HsNode::new(2, "bob");
    hs.set_nodes(vec![alice.clone(), bob.clone()]);
    let started = Instant::now();
    assert!(admitted(&server, &bob.keys).await, "first try admitted");
    println!("registration to admission: {:?}", started.elapsed());
    assert_eq!(cached_nodes(&server), Some(2));
    assert!(list_reads(&hs) > reads_before, "the miss asked headscale");

    // A stranger still is refused, after its own refresh.
    assert!(!admitted(&server, &NodeKeyPair::random()).await);
    let m = |s: &str| metric(&server, s);
    assert_eq!(m("derpd_companion_misses_total{result=\"admitted\"}"), 1.0);
    assert_eq!(m("derpd_companion_misses_total{result=\"refused\"}"), 1.0);
    assert!(m("derpd_companion_refreshes_total{cause=\"miss\"}") >= 2.0);
    assert_eq!(m("derpd_companion_refreshes_total{cause=\"poll\"}"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_unknown_keys_costs_headscale_few_reads() {
    let alice = HsNode::new(1, "alice");
    let hs = Headscale::start(vec![alice.clone()]).await;
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(relay(default_poll_config(&hs, dir.path()), None).await);
    assert!(wait_until(ARRIVES, || async { cached_nodes(&server) == Some(1) }).await);
    let reads_before = list_reads(&hs);

    // 200 strangers within 2 s.
    let mut tries = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let server = server.clone();
        tries.spawn(async move { admitted(&server, &NodeKeyPair::random()).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut refused = 0;
    while let Some(r) = tries.join_next().await {
        refused += usize::from(!r.unwrap());
    }
    assert_eq!(refused, 200);
    let reads = list_reads(&hs) - reads_before;
    println!("200 unknown keys caused {reads} node-list reads");
    assert!(reads <= 20, "{reads} node-list reads");
    assert!(reads >= 1);
    assert!(admitted(&server, &alice.keys).await);
    if let Ok(server) = Arc::try_unwrap(server) {
        server.shutdown().await;
    }
}

#[tokio::test]
async fn while_headscale_is_down_unknown_keys_are_refused_at_once() {
    let alice = HsNode::new(1, "alice");
    let mut hs = Headscale::start(vec![alice.clone()]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = companion_config(&hs, dir.path(), API_KEY);
    cfg.poll_interval = Duration::from_millis(300);
    let server = relay(cfg, None).await;
    assert!(wait_until(ARRIVES, || async { cached_nodes(&server) == Some(1) }).await);
    hs.down().await;
    assert!(
        wait_until(ARRIVES, || async {
            metric(
                &server,
                "derpd_companion_sync_failures_total{reason=\"unreachable\"}",
            ) >= 1.0
        })
        .await
    );
    let miss_refreshes = metric(&server, "derpd_companion_refreshes_total{cause=\"miss\"}");
    assert!(!admitted(&server, &NodeKeyPair::random()).await);
    assert!(
        admitted(&server, &alice.keys).await,
        "known keys still admitted"
    );
    assert_eq!(
        metric(&server, "derpd_companion_refreshes_total{cause=\"miss\"}"),
        miss_refreshes,
        "no refresh is tried while headscale is failing"
    );
    assert_eq!(
        metric(&server, "derpd_companion_misses_total{result=\"refused\"}"),
        1.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn verify_admits_a_node_registered_after_the_last_poll() {
    let alice = HsNode::new(1, "alice");
    let hs = Headscale::start(vec![alice.clone()]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = default_poll_config(&hs, dir.path());
    cfg.verify_clients = false;
    let server = relay(cfg, None).await;
    assert!(wait_until(ARRIVES, || async { cached_nodes(&server) == Some(1) }).await);
    let bob = HsNode::new(2, "bob");
    hs.set_nodes(vec![alice.clone(), bob.clone()]);
    let (st, _, body) = http(
        server.addr,
        "POST",
        "/verify",
        &[],
        tailscale_verify_body(&bob.keys.public.to_string(), "203.0.113.9"),
    )
    .await;
    assert_eq!((st, &body[..]), (200, &b"{\"Allow\":true}\n"[..]));
    let (st, _, body) = http(
        server.addr,
        "POST",
        "/verify",
        &[],
        tailscale_verify_body(&NodeKeyPair::random().public.to_string(), "203.0.113.9"),
    )
    .await;
    assert_eq!((st, &body[..]), (200, &b"{\"Allow\":false}\n"[..]));
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Garbage from headscale never wipes the cache.

#[tokio::test]
async fn garbage_answers_keep_the_cache_and_a_sharp_shrink_waits_for_confirmation() {
    let nodes: Vec<HsNode> = (1..=4).map(|i| HsNode::new(i, "alice")).collect();
    let hs = Headscale::start(nodes.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = companion_config(&hs, dir.path(), API_KEY);
    cfg.poll_interval = Duration::from_millis(100);
    cfg.shrink.confirm_after = Duration::from_secs(2);
    let server = relay(cfg, None).await;
    assert!(wait_until(ARRIVES, || async { cached_nodes(&server) == Some(4) }).await);
    let m = |s: &str| metric(&server, s);

    // Answers that parse as JSON but hold no usable node list.
    for garbage in [
        "[]",
        "{}",
        r#"{"nodes":[{}]}"#,
        r#"{"nodes":[{"nodeKey":"nodekey:zz"}]}"#,
    ] {
        let before = m("derpd_companion_sync_failures_total{reason=\"decode\"}");
        *hs.state.raw_body.lock() = Some(garbage);
        // Failures back off (100 ms doubling), so allow for it.
        assert!(
            wait_until(Duration::from_secs(15), || async {
                m("derpd_companion_sync_failures_total{reason=\"decode\"}") > before
            })
            .await,
            "{garbage} is counted as a decode failure"
        );
        assert_eq!(
            cached_nodes(&server),
            Some(4),
            "{garbage} changed the cache"
        );
        assert!(admitted(&server, &nodes[0].keys).await);
    }

    // An empty list is well-formed, but would lock everyone out: held.
    *hs.state.raw_body.lock() = None;
    hs.set_nodes(vec![]);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            m("derpd_companion_shrink_held_total") >= 2.0
        })
        .await
    );
    assert_eq!(m("derpd_companion_shrink_holding"), 1.0);
    assert_eq!(cached_nodes(&server), Some(4));
    assert!(
        admitted(&server, &nodes[1].keys).await,
        "known nodes still admitted"
    );
    // Seen consistently past the confirmation window: applied.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            cached_nodes(&server) == Some(0)
        })
        .await,
        "a confirmed shrink is applied"
    );
    assert_eq!(m("derpd_companion_shrink_holding"), 0.0);
    assert!(!admitted(&server, &nodes[1].keys).await);
    server.shutdown().await;
}
