//! End-to-end ACME against a real ACME test server: Debian's `pebble`
//! (Let's Encrypt's test CA) with `pebble-challtestsrv` as its DNS, so the
//! HTTP-01 challenge is really validated by pebble fetching it from our
//! plain-HTTP listener. Needs the `pebble` package (scripts/test.sh installs
//! it); without it these tests fail unless `DERPD_SKIP_ACME=1`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use derpd::config::{CertMode, TlsSettings};
use derpd::proto::NodePrivate;
use derpd::server::{Server, ServerConfig};
use derpd::tls::LeafInfo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const HOST: &str = "derp.test";
/// Bound for a whole issuance against local pebble (never a performance assertion).
const ISSUED: Duration = Duration::from_secs(90);

/// Whether to run; panics with instructions when pebble is missing.
fn pebble_available() -> bool {
    let found = |bin: &str| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
            .unwrap_or(false)
    };
    if found("pebble") && found("pebble-challtestsrv") {
        return true;
    }
    if std::env::var("DERPD_SKIP_ACME").as_deref() == Ok("1") {
        eprintln!("pebble not installed and DERPD_SKIP_ACME=1: skipping the ACME test");
        return false;
    }
    panic!(
        "the ACME tests need Debian's `pebble` package (pebble and pebble-challtestsrv on PATH): \
         run scripts/test.sh or `apt-get install -y pebble`; set DERPD_SKIP_ACME=1 to skip them"
    );
}

fn free_tcp_port() -> u16 {
    common::free_port()
}

/// A port free for both UDP and TCP (for the mock DNS server).
fn free_udp_tcp_port() -> u16 {
    common::free_port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running pebble + mock DNS, both on loopback.
struct Pebble {
    _dns: Killed,
    pebble: Option<Killed>,
    dir: tempfile::TempDir,
    /// ACME directory URL.
    directory: String,
    /// Management interface (roots).
    mgmt: SocketAddr,
    /// The CA of pebble's own HTTPS certificate (PEM file).
    https_ca_file: PathBuf,
    https_roots: RootCertStore,
}

impl Pebble {
    /// Starts pebble; it validates HTTP-01 on `http_port` of whatever the
    /// mock DNS says every name is (127.0.0.1).
    async fn start(http_port: u16, validity_secs: Option<u64>) -> Pebble {
        // A port can still be taken between choosing and binding it: pebble
        // then exits at once, and a fresh set of ports is tried.
        for _ in 0..5 {
            if let Some(p) = Self::try_start(http_port, validity_secs).await {
                return p;
            }
        }
        panic!("pebble did not start in 5 attempts");
    }

    async fn try_start(http_port: u16, validity_secs: Option<u64>) -> Option<Pebble> {
        let dir = tempfile::tempdir().unwrap();
        // pebble's HTTPS certificate, from a CA made here.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let https_ca_file = dir.path().join("pebble-https-ca.pem");
        std::fs::write(&https_ca_file, ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let mut https_roots = RootCertStore::empty();
        https_roots.add(ca_cert.der().clone()).unwrap();

        let dns_port = free_udp_tcp_port();
        let dns = Command::new("pebble-challtestsrv")
            .args([
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{}", free_tcp_port()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pebble-challtestsrv");
        let dns = Killed(dns);

        let listen = free_tcp_port();
        let mgmt_port = free_tcp_port();
        let mut cfg = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{listen}"),
                "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
                "certificate": dir.path().join("cert.pem"),
                "privateKey": dir.path().join("key.pem"),
                "httpPort": http_port,
                "tlsPort": free_tcp_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        if let Some(v) = validity_secs {
            cfg["pebble"]["certificateValidityPeriod"] = v.into();
        }
        let cfg_path = dir.path().join("pebble-config.json");
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("pebble.log")).unwrap();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&cfg_path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pebble");
        let mut p = Pebble {
            _dns: dns,
            pebble: Some(Killed(pebble)),
            directory: format!("https://127.0.0.1:{listen}/dir"),
            mgmt: SocketAddr::from(([127, 0, 0, 1], mgmt_port)),
            https_ca_file,
            https_roots,
            dir,
        };
        // Ready when the management interface answers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = p.https_get(p.mgmt, "/roots/0").await {
                break;
            }
            let exited = p
                .pebble
                .as_mut()
                .is_some_and(|c| matches!(c.0.try_wait(), Ok(Some(_))));
            if exited {
                eprintln!("pebble exited, retrying; log:\n{}", p.log());
                return None;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("pebble did not come up; log:\n{}", p.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(p)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        self.pebble = None;
    }

    async fn https_get(&self, addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let tcp = TcpStream::connect(addr).await?;
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(self.https_roots.clone())
            .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut s = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let at = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let head = String::from_utf8_lossy(&buf[..at]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let mut body = buf[at + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Ok((status, body))
    }

    /// The root that signs pebble's issued certificates.
    async fn issuing_roots(&self) -> RootCertStore {
        let (status, pem) = self.https_get(self.mgmt, "/roots/0").await.unwrap();
        assert_eq!(status, 200);
        let mut roots = RootCertStore::empty();
        for c in derpd::tls::certs_from_pem(&pem).expect("root PEM") {
            roots.add(c).unwrap();
        }
        roots
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < nl + 2 + size {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[(nl + 4 + size).min(b.len())..];
    }
}

fn acme_settings(pebble: &Pebble, certdir: &Path) -> TlsSettings {
    TlsSettings {
        mode: CertMode::Letsencrypt,
        certdir: certdir.to_owned(),
        acme_directory: pebble.directory.clone(),
        acme_email: Some("ops@derp.test".into()),
        acme_ca_file: Some(pebble.https_ca_file.clone()),
    }
}

async fn start_derpd(tls: TlsSettings, http_port: u16) -> Server {
    let mut config = ServerConfig::loopback_ephemeral();
    config.hostname = HOST.into();
    config.tls = Some(tls);
    config.http_addr = Some(SocketAddr::from(([127, 0, 0, 1], http_port)));
    Server::start(config, NodePrivate::generate(), None)
        .await
        .expect("derpd starts")
}

/// A TLS connection to `server` that verifies against `roots` for HOST.
async fn verified_connect(
    server: &Server,
    roots: RootCertStore,
) -> std::io::Result<TlsStream<TcpStream>> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(server.addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await
}

fn leaf_of(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

async fn wait_issued(server: &Server, pebble: &Pebble) {
    if let Err(e) = server
        .tls
        .as_ref()
        .unwrap()
        .wait_for_certificate(ISSUED)
        .await
    {
        panic!("{e}; pebble log:\n{}", pebble.log());
    }
}

#[tokio::test]
async fn acme_issues_via_real_http01_and_a_restart_reuses_the_cache() {
    if !pebble_available() {
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let http_port = free_tcp_port();
    let mut pebble = Pebble::start(http_port, None).await;
    let certdir = tempfile::tempdir().unwrap();

    let server = start_derpd(acme_settings(&pebble, certdir.path()), http_port).await;
    wait_issued(&server, &pebble).await;

    let roots = pebble.issuing_roots().await;
    let mut s = verified_connect(&server, roots.clone())
        .await
        .expect("handshake verified against pebble's root");
    let issued = leaf_of(&s);
    let info = LeafInfo::parse(&issued).unwrap();
    assert!(info.names(HOST), "issued certificate does not name {HOST}");
    s.write_all(
        format!("GET /derp/probe HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut resp = Vec::new();
    let _ = timeout(ARRIVES, s.read_to_end(&mut resp)).await;
    assert!(
        resp.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&resp)
    );

    // Account key and certificate are cached, private.
    for f in ["acme_account+key", HOST] {
        let md = std::fs::metadata(certdir.path().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(md.permissions().mode() & 0o777, 0o600, "{f}");
        }
        let _ = md;
    }
    server.shutdown().await;

    // With the CA gone, a restart still serves the cached certificate at once.
    pebble.stop();
    let again = start_derpd(acme_settings(&pebble, certdir.path()), http_port).await;
    assert_eq!(
        again.tls.as_ref().unwrap().current_certificate().as_ref(),
        Some(&issued)
    );
    let s = verified_connect(&again, roots)
        .await
        .expect("cached certificate served");
    assert_eq!(leaf_of(&s), issued);
    again.shutdown().await;
}

#[tokio::test]
async fn acme_renews_in_the_background_without_a_restart() {
    if !pebble_available() {
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let http_port = free_tcp_port();
    // Short-lived certificates: renewal is due after two thirds of 15 s.
    let pebble = Pebble::start(http_port, Some(15)).await;
    let certdir = tempfile::tempdir().unwrap();
    let server = start_derpd(acme_settings(&pebble, certdir.path()), http_port).await;
    wait_issued(&server, &pebble).await;
    let tls = server.tls.clone().unwrap();
    let first = tls.current_certificate().unwrap();
    let first_info = LeafInfo::parse(&first).unwrap();
    assert!(first_info.names(HOST));

    let deadline = tokio::time::Instant::now() + ISSUED;
    let renewed = loop {
        match tls.current_certificate() {
            Some(c) if c != first => break c,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate not renewed; stats {:?}; pebble log:\n{}",
            tls.stats(),
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let info = LeafInfo::parse(&renewed).unwrap();
    assert!(info.names(HOST));
    assert_ne!(info.serial, first_info.serial);
    // New connections get the renewed certificate, verified against pebble's root.
    let roots = pebble.issuing_roots().await;
    let deadline = tokio::time::Instant::now() + ARRIVES;
    loop {
        let s = verified_connect(&server, roots.clone()).await;
        if let Ok(s) = &s {
            if leaf_of(s) != first {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

#[tokio::test]
async fn acme_failed_validation_is_counted_and_serves_nothing() {
    if !pebble_available() {
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // pebble validates on a port where nothing listens: no plain-HTTP listener.
    let pebble = Pebble::start(free_tcp_port(), None).await;
    let certdir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::loopback_ephemeral();
    config.hostname = HOST.into();
    config.tls = Some(acme_settings(&pebble, certdir.path()));
    config.http_addr = None;
    let server = Server::start(config, NodePrivate::generate(), None)
        .await
        .expect("start does not wait for issuance");
    let tls = server.tls.clone().unwrap();
    let deadline = tokio::time::Instant::now() + ISSUED;
    while tls.stats().failed == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "failed issuance not counted; pebble log:\n{}",
            pebble.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tls.current_certificate(), None);
    assert!(!certdir.path().join(HOST).exists());
    let roots = pebble.issuing_roots().await;
    assert!(verified_connect(&server, roots).await.is_err());
    assert!(
        eventually(|| metric(&server, "derpd_tls_handshake_errors_total") >= 1.0).await,
        "handshake without a certificate not counted"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn acme_with_an_unreachable_directory_fails_start_clearly() {
    let certdir = tempfile::tempdir().unwrap();
    let dead = free_tcp_port();
    let directory = format!("https://127.0.0.1:{dead}/dir");
    let mut config = ServerConfig::loopback_ephemeral();
    config.hostname = HOST.into();
    config.tls = Some(TlsSettings {
        mode: CertMode::Letsencrypt,
        certdir: certdir.path().to_owned(),
        acme_directory: directory.clone(),
        acme_email: None,
        acme_ca_file: None,
    });
    let err = Server::start(config, NodePrivate::generate(), None)
        .await
        .err()
        .expect("start fails")
        .to_string();
    assert!(err.contains("ACME") && err.contains(&directory), "{err}");
}

#[tokio::test]
async fn acme_refuses_an_ip_hostname_and_a_missing_ca_file() {
    let certdir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::loopback_ephemeral();
    config.hostname = "127.0.0.1".into();
    config.tls = Some(TlsSettings {
        mode: CertMode::Letsencrypt,
        certdir: certdir.path().to_owned(),
        acme_directory: "https://127.0.0.1:1/dir".into(),
        acme_email: None,
        acme_ca_file: None,
    });
    let err = Server::start(config.clone(), NodePrivate::generate(), None)
        .await
        .err()
        .expect("IP hostname refused")
        .to_string();
    assert!(err.contains("IP address"), "{err}");

    config.hostname = HOST.into();
    let missing = certdir.path().join("no-such-ca.pem");
    config.tls.as_mut().unwrap().acme_ca_file = Some(missing.clone());
    let err = Server::start(config, NodePrivate::generate(), None)
        .await
        .err()
        .expect("missing CA file refused")
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
}
