//! TLS on the main listener with real sockets and real handshakes:
//! manual certificates (made here with our own CA), their reload without a
//! restart, Tailscale's `ts_derp` client over TLS, the plain-HTTP listener
//! next to TLS, the IP self-signed fallback, and handshake-error counting.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::ca::{Leaf, TestCa};
use common::*;
use derpd::config::{CertMode, TlsSettings};
use derpd::proto::NodePrivate;
use derpd::server::{Server, ServerConfig};
use derpd::tls::LeafInfo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const HOST: &str = "derp.test";

fn write_pair(dir: &Path, leaf: &Leaf) {
    std::fs::write(dir.join(format!("{HOST}.crt")), &leaf.crt_pem).unwrap();
    std::fs::write(dir.join(format!("{HOST}.key")), &leaf.key_pem).unwrap();
}

fn settings(mode: CertMode, certdir: &Path) -> TlsSettings {
    TlsSettings {
        mode,
        certdir: certdir.to_owned(),
        acme_directory: String::new(),
        acme_email: None,
        acme_ca_file: None,
    }
}

async fn start_tls(hostname: &str, tls: TlsSettings) -> Server {
    let mut config = ServerConfig::loopback_ephemeral();
    config.hostname = hostname.into();
    config.tls = Some(tls);
    config.http_addr = Some("127.0.0.1:0".parse().unwrap());
    Server::start(config, NodePrivate::generate(), None)
        .await
        .expect("server starts")
}

fn client_config(roots: RootCertStore) -> rustls::ClientConfig {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut c = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c
}

/// Accepts any certificate (signatures still checked); for looking at
/// what the server presents.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn accept_any_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth()
}

async fn tls_connect(
    server: &Server,
    config: rustls::ClientConfig,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(server.addr).await?;
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    timeout(
        ARRIVES,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
}

fn peer_leaf(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().expect("peer chain")[0].clone()
}

/// The leaf a new, CA-verified connection sees.
async fn served_leaf(server: &Server, ca: &TestCa) -> CertificateDer<'static> {
    let s = tls_connect(server, client_config(ca.roots()), HOST)
        .await
        .expect("verified TLS handshake");
    peer_leaf(&s)
}

/// Sends one request with `Connection: close` and returns (status, head, body).
async fn http_request<S>(mut s: S, request: &str) -> (u16, String, Vec<u8>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = timeout(ARRIVES, s.read_to_end(&mut buf))
        .await
        .expect("response in time");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, _) = text.split_once("\r\n\r\n").expect("response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body_at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    (status, head.to_owned(), buf[body_at..].to_vec())
}

/// A manual-mode relay for `HOST` serving a fresh leaf of `ca`.
async fn manual_server(ca: &TestCa) -> (Server, tempfile::TempDir, Leaf) {
    let dir = tempfile::tempdir().unwrap();
    let leaf = ca.leaf(&[HOST]);
    write_pair(dir.path(), &leaf);
    let server = start_tls(HOST, settings(CertMode::Manual, dir.path())).await;
    (server, dir, leaf)
}

/// A `ts_derp` client upgraded over TLS (checking the served leaf when
/// given). With `key_update`, the client's TLS layer asks for a KeyUpdate
/// right before the DERP handshake, so the relay must follow the client's
/// new key and answer with its own.
async fn ts_derp_over_tls(
    server: &Server,
    ca: &TestCa,
    leaf: Option<&Leaf>,
    key_update: bool,
) -> (ts_derp::Client<TlsStream<TcpStream>>, ts_keys::NodeKeyPair) {
    let mut s = tls_connect(server, client_config(ca.roots()), HOST)
        .await
        .expect("TLS handshake verified against the test CA");
    if let Some(leaf) = leaf {
        assert_eq!(peer_leaf(&s), leaf.der);
    }
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let req = format!(
        "GET /derp HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.expect("response head"));
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    if key_update {
        s.get_mut().1.refresh_traffic_keys().unwrap();
    }
    let keys = ts_keys::NodeKeyPair::random();
    let client = timeout(ARRIVES, ts_derp::Client::handshake(s, &keys))
        .await
        .expect("handshake in time")
        .expect("ts_derp handshake over TLS");
    (client, keys)
}

#[tokio::test]
async fn ts_derp_clients_relay_both_ways_over_tls_with_a_manual_certificate() {
    let ca = TestCa::new();
    let (server, _dir, leaf) = manual_server(&ca).await;

    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(ts_derp_over_tls(&server, &ca, Some(&leaf), false).await);
    }
    let (a, ka) = &clients[0];
    let (b, kb) = &clients[1];
    for i in 0..5u8 {
        let msg = vec![i; 1000];
        a.send_one(kb.public, &msg).await.unwrap();
        let (src, got) = timeout(ARRIVES, b.recv_one()).await.unwrap().unwrap();
        assert_eq!((src, got.as_ref()), (ka.public, &msg[..]));
        b.send_one(ka.public, b"back").await.unwrap();
        let (src, got) = timeout(ARRIVES, a.recv_one()).await.unwrap().unwrap();
        assert_eq!((src, got.as_ref()), (kb.public, &b"back"[..]));
    }
    drop(clients);
    server.shutdown().await;
}

/// Idle TLS connections keep no buffers on the relay (its reader drops
/// them while it waits, see `tls::stream`'s tests); this checks the other
/// half of that promise end to end: after going quiet, a connection wakes
/// and relays byte-exact both ways, including after TLS key updates.
#[tokio::test]
async fn idle_tls_clients_wake_and_relay_byte_exact_both_ways() {
    let ca = TestCa::new();
    let (server, _dir, _leaf) = manual_server(&ca).await;
    let (a, ka) = ts_derp_over_tls(&server, &ca, None, true).await;
    let (b, kb) = ts_derp_over_tls(&server, &ca, None, false).await;
    let payload = |seed: u8, n: usize| -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect()
    };
    for round in 0..3u8 {
        // Quiet long enough for both directions to go idle on the relay.
        tokio::time::sleep(Duration::from_millis(700)).await;
        for (i, n) in [1usize, 1200, 16_000, 60_000].into_iter().enumerate() {
            let seed = round * 16 + i as u8;
            let up = payload(seed, n);
            a.send_one(kb.public, &up).await.unwrap();
            let (src, got) = timeout(ARRIVES, b.recv_one()).await.unwrap().unwrap();
            assert_eq!(src, ka.public);
            assert!(
                got.as_ref() == &up[..],
                "round {round}: {n} bytes a→b differ"
            );
            let down = payload(!seed, n);
            b.send_one(ka.public, &down).await.unwrap();
            let (src, got) = timeout(ARRIVES, a.recv_one()).await.unwrap().unwrap();
            assert_eq!(src, kb.public);
            assert!(
                got.as_ref() == &down[..],
                "round {round}: {n} bytes b→a differ"
            );
        }
    }
    drop((a, b));
    server.shutdown().await;
}

#[tokio::test]
async fn probe_over_tls_answers_200() {
    let ca = TestCa::new();
    let (server, _dir, _leaf) = manual_server(&ca).await;
    let s = tls_connect(&server, client_config(ca.roots()), HOST)
        .await
        .unwrap();
    let (status, _, _) = http_request(
        s,
        &format!("GET /derp/probe HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn replaced_certificate_files_are_served_without_a_restart() {
    let ca = TestCa::new();
    let (server, dir, first) = manual_server(&ca).await;
    assert_eq!(served_leaf(&server, &ca).await, first.der);

    let second = ca.leaf(&[HOST]);
    assert_ne!(second.der, first.der);
    write_pair(dir.path(), &second);
    let deadline = tokio::time::Instant::now() + ARRIVES;
    loop {
        if served_leaf(&server, &ca).await == second.der {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new certificate not served after the files changed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tls = server.tls.as_ref().unwrap();
    assert_eq!(tls.current_certificate().unwrap(), second.der);
    assert!(tls.stats().installed >= 2, "{:?}", tls.stats());
    server.shutdown().await;
}

#[tokio::test]
async fn sighup_reload_picks_up_new_files_at_once() {
    let ca = TestCa::new();
    let (server, dir, first) = manual_server(&ca).await;
    assert_eq!(served_leaf(&server, &ca).await, first.der);
    let second = ca.leaf(&[HOST]);
    write_pair(dir.path(), &second);
    server.reload(None);
    // No waiting: the reload has read the files before returning.
    assert_eq!(served_leaf(&server, &ca).await, second.der);
    server.shutdown().await;
}

#[tokio::test]
async fn broken_replacement_keeps_the_old_certificate() {
    let ca = TestCa::new();
    let (server, dir, first) = manual_server(&ca).await;
    let tls = server.tls.clone().unwrap();
    let failed_before = tls.stats().failed;

    // A certificate whose key does not match.
    let other = ca.leaf(&[HOST]);
    std::fs::write(dir.path().join(format!("{HOST}.crt")), &other.crt_pem).unwrap();
    assert!(
        eventually(|| tls.stats().failed > failed_before).await,
        "the watcher did not try the changed files"
    );
    assert_eq!(served_leaf(&server, &ca).await, first.der);
    let e = tls.reload().unwrap_err().to_string();
    assert!(
        e.contains(&format!("{HOST}.crt")) && e.contains("do not match"),
        "{e}"
    );

    // Garbage: the error names the file, and the old certificate stays.
    std::fs::write(dir.path().join(format!("{HOST}.crt")), "not a certificate").unwrap();
    let e = tls.reload().unwrap_err().to_string();
    assert!(e.contains(&format!("{HOST}.crt")), "{e}");
    server.reload(None);
    assert_eq!(served_leaf(&server, &ca).await, first.der);

    // A certificate for another name is refused too.
    let wrong = ca.leaf(&["other.test"]);
    write_pair(dir.path(), &wrong);
    let e = tls.reload().unwrap_err().to_string();
    assert!(e.contains("not valid for hostname"), "{e}");
    assert_eq!(served_leaf(&server, &ca).await, first.der);

    // And a good pair afterwards is taken.
    let good = ca.leaf(&[HOST]);
    write_pair(dir.path(), &good);
    tls.reload().unwrap();
    assert_eq!(served_leaf(&server, &ca).await, good.der);
    server.shutdown().await;
}

#[tokio::test]
async fn missing_manual_files_fail_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::loopback_ephemeral();
    config.hostname = HOST.into();
    config.tls = Some(settings(CertMode::Manual, dir.path()));
    let err = Server::start(config, NodePrivate::generate(), None)
        .await
        .err()
        .expect("start fails without certificate files")
        .to_string();
    let crt: PathBuf = dir.path().join(format!("{HOST}.crt"));
    assert!(err.contains(&crt.display().to_string()), "{err}");
}

#[tokio::test]
async fn ip_hostname_without_files_gets_a_pinned_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certdir = dir.path().join("certs");
    let server = start_tls("127.0.0.1", settings(CertMode::Manual, &certdir)).await;

    let crt = certdir.join("127.0.0.1.crt");
    let key = certdir.join("127.0.0.1.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "key file mode {mode:o}");
    }
    let written = derpd::tls::certs_from_pem(&std::fs::read(&crt).unwrap()).unwrap();
    assert_eq!(written.len(), 1);

    let s = tls_connect(&server, accept_any_config(), "127.0.0.1")
        .await
        .unwrap();
    let chain = s.get_ref().1.peer_certificates().unwrap().to_vec();
    // Exactly one certificate besides the DERP meta certificate (which
    // clients skip), so a `sha256-raw:` pin validates.
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0], written[0]);
    assert!(is_meta_cert(&chain[1], &server.relay.public_key()));
    let info = LeafInfo::parse(&chain[0]).unwrap();
    assert!(info.names("127.0.0.1"));
    let lifetime = info.not_after.duration_since(info.not_before).unwrap();
    assert!(lifetime >= Duration::from_secs(364 * 86400), "{lifetime:?}");

    let node: serde_json::Value =
        serde_json::from_str(&derpd::tls::manual::derp_node_json("127.0.0.1", &chain[0])).unwrap();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &chain[0]);
    assert_eq!(
        node["CertName"],
        format!("sha256-raw:{}", hex::encode(digest.as_ref()))
    );
    assert_eq!(node["HostName"], "127.0.0.1");
    server.shutdown().await;

    // A restart loads the written files instead of generating new ones.
    let again = start_tls("127.0.0.1", settings(CertMode::Manual, &certdir)).await;
    assert_eq!(
        again.tls.as_ref().unwrap().current_certificate().unwrap(),
        written[0]
    );
    again.shutdown().await;
}

#[tokio::test]
async fn self_signed_mode_with_an_ip_hostname_has_an_ip_san() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_tls("127.0.0.1", settings(CertMode::SelfSigned, dir.path())).await;
    let s = tls_connect(&server, accept_any_config(), "127.0.0.1")
        .await
        .unwrap();
    let info = LeafInfo::parse(&peer_leaf(&s)).unwrap();
    assert!(info.names("127.0.0.1"));
    server.shutdown().await;
}

#[tokio::test]
async fn plain_http_listener_serves_generate_204_and_redirects_to_https() {
    let ca = TestCa::new();
    let (server, _dir, _leaf) = manual_server(&ca).await;
    let http = server.http_addr.expect("plain-HTTP listener");

    let (status, _, _) = http_request(
        TcpStream::connect(http).await.unwrap(),
        &format!("GET /generate_204 HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 204);

    let (status, head, _) = http_request(
        TcpStream::connect(http).await.unwrap(),
        &format!("GET /x?y=1 HTTP/1.1\r\nHost: {HOST}:80\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 302);
    let location = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .expect("Location header");
    assert_eq!(location, format!("https://{HOST}/x?y=1"));

    // No ACME in manual mode: challenge paths are 404.
    let (status, _, _) = http_request(
        TcpStream::connect(http).await.unwrap(),
        &format!(
            "GET /.well-known/acme-challenge/abc HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(status, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn failed_tls_handshakes_are_counted() {
    let ca = TestCa::new();
    let (server, _dir, _leaf) = manual_server(&ca).await;
    let series = "derpd_tls_handshake_errors_total";
    let before = metric(&server, series);

    // Not TLS at all.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01garbage")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = timeout(ARRIVES, s.read_to_end(&mut sink)).await;
    assert!(
        eventually(|| metric(&server, series) >= before + 1.0).await,
        "handshake error not counted"
    );

    // A real TLS client that does not trust the certificate aborts the handshake.
    let untrusting = client_config(TestCa::new().roots());
    assert!(tls_connect(&server, untrusting, HOST).await.is_err());
    assert!(
        eventually(|| metric(&server, series) >= before + 2.0).await,
        "aborted handshake not counted"
    );

    // Good handshakes still work afterwards.
    let _ = served_leaf(&server, &ca).await;
    server.shutdown().await;
}

/// Whether `der` is the DERP meta certificate for `key`.
fn is_meta_cert(der: &[u8], key: &derpd::proto::NodePublic) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    let cn = cert.subject().iter_common_name().next();
    cn.and_then(|c| c.as_str().ok()) == Some(&format!("derpkey{}", key.to_hex()))
        && cert.tbs_certificate.raw_serial() == [2]
}

#[tokio::test]
async fn served_chain_ends_with_the_derp_meta_certificate_and_fast_start_works_over_tls() {
    use derpd::proto::handshake::{open_server_info, seal_client_info};
    use derpd::proto::{ClientInfo, Frame, FrameDecoder, NodePrivate, Role};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut config = derpd::config::ServerConfig::loopback_ephemeral();
    config.hostname = "derp.test".into();
    config.tls = Some(derpd::config::TlsSettings {
        mode: derpd::config::CertMode::SelfSigned,
        certdir: std::env::temp_dir(),
        acme_directory: String::new(),
        acme_email: None,
        acme_ca_file: None,
    });
    let server = derpd::server::Server::start(config, NodePrivate::generate(), None)
        .await
        .unwrap();
    let key = server.relay.public_key();
    let mut s = tls_connect(&server, accept_any_config(), "derp.test")
        .await
        .unwrap();
    let chain = s.get_ref().1.peer_certificates().unwrap().to_vec();
    assert_eq!(chain.len(), 2);
    assert!(!is_meta_cert(&chain[0], &key));
    assert!(is_meta_cert(&chain[1], &key));

    // What a Go client does after finding the meta certificate: the
    // request and ClientInfo in one write, sealed to the key it learned.
    let client = NodePrivate::generate();
    let mut burst = b"GET /derp HTTP/1.1\r\nHost: derp.test\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n".to_vec();
    burst.extend_from_slice(&seal_client_info(&client, &key, &ClientInfo::default()).to_bytes());
    s.write_all(&burst).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut dec = FrameDecoder::new(Role::Client);
    let mut frames = Vec::new();
    while frames.len() < 2 {
        if let Some(f) = dec.decode(&mut buf).unwrap() {
            frames.push(f);
            continue;
        }
        assert!(s.read_buf(&mut buf).await.unwrap() > 0, "closed early");
    }
    // No HTTP response: the first bytes are the ServerKey frame.
    assert_eq!(frames[0], Frame::ServerKey { key });
    let Frame::ServerInfo { nonce, sealed } = &frames[1] else {
        panic!("expected ServerInfo, got {:?}", frames[1]);
    };
    assert_eq!(
        open_server_info(&client, &key, nonce, sealed)
            .unwrap()
            .version,
        2
    );
    server.shutdown().await;
}
