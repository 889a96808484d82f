//! Outgoing TLS trusts the operating system's store, the way Go's and
//! OpenSSL's clients do: relays whose certificates come from a private CA
//! that only `SSL_CERT_FILE` names (no CA flag) mesh with each other and sync
//! from a headscale behind the same CA. A relay started without that
//! variable reaches nobody, and says so at WARN at the default log level,
//! in `/readyz` and in its metrics.
//!
//! The relays are the real binary (the store is read once per process);
//! the clients are Tailscale's `ts_derp` over TLS.

mod common;

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::ca::TestCa;
use common::{free_port, ARRIVES};
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ts_keys::NodeKeyPair;

const API_KEY: &str = "hskey01.0123456789abcdef0123456789abcdef";
/// Time for links to come up and syncs to land (link backoff caps at 5 s).
const SETTLE: Duration = Duration::from_secs(20);

/// A headscale stand-in over TLS: `GET /api/v1/node` with the API key
/// answers the given node keys in headscale's JSON.
async fn tls_headscale(ca: &TestCa, nodes: Vec<String>) -> SocketAddr {
    let leaf = ca.leaf(&["127.0.0.1"]);
    let (crt, key) = (leaf.crt_pem, leaf.key_pem);
    let certs: Vec<CertificateDer<'static>> =
        rustls::pki_types::pem::PemObject::pem_slice_iter(crt.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key: PrivateKeyDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body: Bytes = serde_json::to_vec(&serde_json::json!({
        "nodes": nodes.iter().enumerate().map(|(i, k)| serde_json::json!({
            "id": (i + 1).to_string(),
            "name": format!("node-{i}"),
            "givenName": format!("node-{i}"),
            "nodeKey": k,
            "user": {"id": "1", "name": "ops"},
            "online": true,
        })).collect::<Vec<_>>()
    }))
    .unwrap()
    .into();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<_>| {
                    let body = body.clone();
                    async move {
                        let authorized = req.headers().get("authorization").is_some_and(|v| {
                            v.as_bytes() == format!("Bearer {API_KEY}").as_bytes()
                        });
                        let mut r = Response::new(Full::new(if authorized {
                            body
                        } else {
                            Bytes::from_static(b"Unauthorized")
                        }));
                        if !authorized {
                            *r.status_mut() = hyper::StatusCode::UNAUTHORIZED;
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// A `derpd serve` child; killed when dropped. Its log goes to a file.
struct Relay {
    child: std::process::Child,
    name: String,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    fn log_text(&self) -> String {
        let mut s = String::new();
        std::fs::File::open(&self.log)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }
}

struct Setup<'a> {
    dir: &'a Path,
    ca: &'a TestCa,
    mesh_with: &'a str,
    headscale: SocketAddr,
    /// `SSL_CERT_FILE` for the child, or none.
    trust_file: Option<&'a Path>,
}

fn start_relay(s: &Setup, name: &str, port: u16) -> Relay {
    let dir = s.dir.join(name);
    let certdir = dir.join("certs");
    std::fs::create_dir_all(&certdir).unwrap();
    let leaf = s.ca.leaf(&[name]);
    let (crt, key) = (leaf.crt_pem, leaf.key_pem);
    std::fs::write(certdir.join(format!("{name}.crt")), crt).unwrap();
    std::fs::write(certdir.join(format!("{name}.key")), key).unwrap();
    std::fs::write(dir.join("api.key"), format!("{API_KEY}\n")).unwrap();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let log = dir.join("derpd.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_derpd"));
    cmd.args(["serve", "-a", &addr.to_string(), "--hostname", name])
        .arg("--certmode=manual")
        .arg(format!("--certdir={}", certdir.display()))
        .arg(format!("--state-dir={}", dir.join("state").display()))
        .arg(format!(
            "--mesh-psk-file={}",
            s.dir.join("mesh.key").display()
        ))
        .arg(format!("--mesh-with={}", s.mesh_with))
        .arg(format!("--headscale-url=https://{}", s.headscale))
        .arg(format!(
            "--headscale-api-key-file={}",
            dir.join("api.key").display()
        ))
        .args(["--headscale-poll-interval", "500ms"])
        .args(["--verify-clients", "headscale"])
        .args(["--http-port=-1", "--stun=false"])
        .arg(format!("--metrics-addr={metrics}"))
        .env_remove("RUST_LOG")
        .env_remove("SSL_CERT_DIR")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    match s.trust_file {
        Some(f) => cmd.env("SSL_CERT_FILE", f),
        // An empty file: nothing but the bundled web PKI roots.
        None => cmd.env("SSL_CERT_FILE", s.dir.join("empty.pem")),
    };
    Relay {
        child: cmd.spawn().unwrap(),
        name: name.to_owned(),
        addr,
        metrics,
        log,
    }
}

/// GET over plain HTTP with `Connection: close`: (status, body).
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
}

async fn metric(r: &Relay, series: &str) -> Option<f64> {
    let (_, text) = get(r.metrics, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A TLS connection to `relay` that trusts only `ca`.
async fn tls_connect(relay: &Relay, ca: &TestCa) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let name = ServerName::try_from(relay.name.clone()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the relay's certificate verifies against the private CA")
}

/// `GET /readyz` over TLS: (status, body).
async fn readyz(relay: &Relay, ca: &TestCa) -> (u16, String) {
    let mut s = tls_connect(relay, ca).await;
    s.write_all(
        format!(
            "GET /readyz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            relay.name
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").expect("a response");
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

/// A `ts_derp` client over TLS to `relay`, trusting `ca`.
async fn client(
    relay: &Relay,
    ca: &TestCa,
    keys: &NodeKeyPair,
) -> ts_derp::Client<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut s = tls_connect(relay, ca).await;
    s.write_all(
        format!(
            "GET /derp HTTP/1.1\r\nHost: {}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
            relay.name
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tokio::time::timeout(ARRIVES, ts_derp::Client::handshake(s, keys))
        .await
        .expect("handshake in time")
        .expect("admitted: the relay synced from headscale over TLS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_in_the_system_store_is_trusted_for_mesh_and_headscale() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let trust = tmp.path().join("system-ca.pem");
    std::fs::write(&trust, &ca.pem).unwrap();
    std::fs::write(tmp.path().join("empty.pem"), "").unwrap();
    std::fs::write(
        tmp.path().join("mesh.key"),
        derpd::proto::MeshKey::generate().to_hex(),
    )
    .unwrap();
    let (ka, kb) = (NodeKeyPair::random(), NodeKeyPair::random());
    let headscale = tls_headscale(&ca, vec![ka.public.to_string(), kb.public.to_string()]).await;

    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let mesh_with = format!(
        "derp-a.test:{pa}/127.0.0.1:{pa},derp-b.test:{pb}/127.0.0.1:{pb},derp-c.test:{pc}/127.0.0.1:{pc}"
    );
    let with_store = Setup {
        dir: tmp.path(),
        ca: &ca,
        mesh_with: &mesh_with,
        headscale,
        trust_file: Some(&trust),
    };
    let a = start_relay(&with_store, "derp-a.test", pa);
    let b = start_relay(&with_store, "derp-b.test", pb);
    let c = start_relay(
        &Setup {
            trust_file: None,
            ..with_store
        },
        "derp-c.test",
        pc,
    );

    // A and B: links to each other up, node lists synced over TLS.
    let peer_a = format!("derpd_mesh_link_up{{peer=\"derp-a.test:{pa}/127.0.0.1:{pa}\"}}");
    let peer_b = format!("derpd_mesh_link_up{{peer=\"derp-b.test:{pb}/127.0.0.1:{pb}\"}}");
    for (r, other) in [(&a, &peer_b), (&b, &peer_a)] {
        assert!(
            until(SETTLE, || async {
                metric(r, other).await == Some(1.0)
                    && metric(r, "derpd_companion_nodes_cached").await == Some(2.0)
            })
            .await,
            "{} linked and synced; log:\n{}",
            r.name,
            r.log_text()
        );
    }

    // Clients on different relays reach each other through the mesh.
    let ca_client = client(&a, &ca, &ka).await;
    let cb_client = client(&b, &ca, &kb).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ca_client.send_one(kb.public, b"a to b").await.unwrap();
    let (src, got) = tokio::time::timeout(ARRIVES, cb_client.recv_one())
        .await
        .expect("a packet through the mesh")
        .unwrap();
    assert_eq!((src, got.as_ref()), (ka.public, &b"a to b"[..]));
    cb_client.send_one(ka.public, b"b to a").await.unwrap();
    let (src, got) = tokio::time::timeout(ARRIVES, ca_client.recv_one())
        .await
        .expect("a packet back through the mesh")
        .unwrap();
    assert_eq!((src, got.as_ref()), (kb.public, &b"b to a"[..]));

    // C trusts only the web PKI: it reaches nobody, and tells the operator.
    assert!(
        until(SETTLE, || async {
            let log = c.log_text();
            log.contains("WARN") && log.contains("mesh link down") && log.contains("derp-a.test")
        })
        .await,
        "a WARN line names the unreachable peer; log:\n{}",
        c.log_text()
    );
    // Links retry several times in 3 s (backoff from 100 ms).
    assert!(
        until(SETTLE, || async { c.log_text().contains("UnknownIssuer") }).await,
        "{}",
        c.log_text()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = c.log_text();
    let warn_lines: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warn_lines
            .iter()
            .any(|l| l.contains("mesh link down") && l.contains("UnknownIssuer")),
        "the reason is named: {warn_lines:#?}"
    );
    assert!(
        warn_lines
            .iter()
            .any(|l| l.contains("headscale sync failing") && l.contains("kind=\"unreachable\"")),
        "the headscale failure is named: {warn_lines:#?}"
    );
    // One line per outage and reason, not one per retry.
    let down_a = warn_lines
        .iter()
        .filter(|l| {
            l.contains("mesh link down")
                && l.contains(&format!("derp-a.test:{pa}/"))
                && l.contains("UnknownIssuer")
        })
        .count();
    assert_eq!(down_a, 1, "{warn_lines:#?}");
    assert_eq!(metric(&c, &peer_a).await, Some(0.0));
    // /readyz: C has no snapshot under --verify-clients, so it is not
    // ready, and it says what is down and why.
    let (status, body) = readyz(&c, &ca).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("last sync failing"), "{body}");
    assert!(
        body.lines()
            .any(|l| l.starts_with(&format!("mesh derp-a.test:{pa}/"))
                && l.contains(": down (last error: ")
                && l.contains("UnknownIssuer")),
        "{body}"
    );
    let (status, body) = readyz(&a, &ca).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!("mesh derp-b.test:{pb}/127.0.0.1:{pb}: up\n")),
        "{body}"
    );
    assert!(body.contains("headscale https://127.0.0.1:"), "{body}");
    assert!(body.contains(": last sync ok\n"), "{body}");
    assert!(body.contains("cache: 2 nodes, fetched "), "{body}");
}
