//! TLS for the main listener: certificate modes (manual files reloaded when
//! they change, ACME, self-signed), served through a hot-swappable resolver
//! so a new certificate takes effect without a restart.
//!
//! * `manual`: `<certdir>/<name>.crt` + `.key` ([`cert_file_name`]); a
//!   background task polls the files (~1 s) and swaps the certificate when a
//!   new, valid pair appears; a bad pair is logged and the old one kept.
//!   [`TlsManager::reload`] (SIGHUP) re-reads at once. An IP hostname with no
//!   files gets a generated self-signed certificate (see [`manual`]).
//! * `letsencrypt`: ACME (any directory) with HTTP-01 challenges answered by
//!   [`TlsManager::http01_response`] on the plain-HTTP listener; account key
//!   and certificate cached in certdir; renewal when a third of the lifetime
//!   is left (see [`acme`]).
//! * `self-signed`: made at start, for labs and tests.

pub mod accept;
pub mod acme;
pub mod manual;
pub mod session;
mod settings;
pub mod stream;

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::proto::NodePublic;
pub use settings::{CertMode, TlsSettings};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// File.
        path: std::path::PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// A certificate or key is invalid.
    #[error("{0}")]
    Invalid(String),
    /// ACME failed.
    #[error("ACME: {0}")]
    Acme(String),
}

/// Serves whatever certificate is current; swapping it affects new handshakes
/// only. Empty (every handshake fails) until the first certificate is set,
/// which only happens in ACME mode before the first issuance.
#[derive(Debug)]
pub struct SwappableCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    generation: watch::Sender<u64>,
}

impl SwappableCert {
    /// Starts with `cert`.
    pub fn new(cert: Arc<CertifiedKey>) -> SwappableCert {
        SwappableCert {
            current: RwLock::new(Some(cert)),
            generation: watch::Sender::new(1),
        }
    }

    /// Starts without a certificate.
    pub fn empty() -> SwappableCert {
        SwappableCert {
            current: RwLock::new(None),
            generation: watch::Sender::new(0),
        }
    }

    /// Replaces the certificate.
    pub fn set(&self, cert: Arc<CertifiedKey>) {
        *self.current.write() = Some(cert);
        self.generation.send_modify(|g| *g += 1);
    }

    /// The current certificate, if there is one yet.
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().clone()
    }

    /// Waits until a certificate is set.
    pub async fn wait_until_set(&self) {
        let mut rx = self.generation.subscribe();
        let _ = rx.wait_for(|_| self.current.read().is_some()).await;
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// The DERP "meta certificate": a throwaway self-signed certificate whose
/// subject names the relay's DERP key (CN `derpkey<64 hex>`, serial = the
/// protocol version, BasicConstraints its only extension). Appended to the
/// served chain, it lets Go clients learn the key inside a TLS 1.3
/// handshake and skip a round trip ("fast start"). Clients ignore it when
/// validating the chain or a `sha256-raw:` pin.
pub fn meta_certificate(server_key: &NodePublic) -> Result<CertificateDer<'static>, TlsError> {
    let invalid = |e: rcgen::Error| TlsError::Invalid(format!("meta certificate: {e}"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(invalid)?;
    let mut params = rcgen::CertificateParams::default();
    params.serial_number = Some(rcgen::SerialNumber::from(vec![
        crate::proto::limits::PROTOCOL_VERSION as u8,
    ]));
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        format!("derpkey{}", server_key.to_hex()),
    );
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now + time::Duration::days(30);
    // BasicConstraints (critical, not a CA) as the only extension; rcgen's
    // own would add a SubjectKeyIdentifier too.
    params.is_ca = rcgen::IsCa::NoCa;
    let mut basic_constraints =
        rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x00]);
    basic_constraints.set_criticality(true);
    params.custom_extensions.push(basic_constraints);
    let cert = params.self_signed(&key).map_err(invalid)?;
    Ok(cert.der().clone())
}

/// Serves the current certificate with the meta certificate appended,
/// without changing the certificate itself.
#[derive(Debug)]
struct WithMetaCert {
    inner: Arc<SwappableCert>,
    meta: CertificateDer<'static>,
    /// The last certificate seen and its chain with the meta cert.
    cached: RwLock<Option<(Arc<CertifiedKey>, Arc<CertifiedKey>)>>,
}

impl ResolvesServerCert for WithMetaCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.inner.get()?;
        if let Some((src, out)) = &*self.cached.read() {
            if Arc::ptr_eq(src, &current) {
                return Some(out.clone());
            }
        }
        let mut chain = current.cert.clone();
        chain.push(self.meta.clone());
        let out = Arc::new(CertifiedKey {
            cert: chain,
            key: current.key.clone(),
            ocsp: current.ocsp.clone(),
        });
        *self.cached.write() = Some((current, out.clone()));
        Some(out)
    }
}

/// Counts of certificate installs, shared by the background tasks.
#[derive(Debug, Default)]
pub(crate) struct CertCounters {
    installed: AtomicU64,
    failed: AtomicU64,
}

impl CertCounters {
    pub(crate) fn installed(&self) {
        self.installed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// How often a certificate was (re)loaded or issued, and how often that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CertStats {
    /// Certificates put into service (initial load, reloads, issuances, renewals).
    pub installed: u64,
    /// Failed loads / reloads / issuances (the old certificate stayed in service).
    pub failed: u64,
}

/// The TLS side of the main listener.
pub struct TlsManager {
    mode: CertMode,
    cert: Arc<SwappableCert>,
    acceptor: accept::Acceptor,
    manual: Option<Arc<manual::ManualCerts>>,
    acme: Option<Arc<acme::Acme>>,
    counters: Arc<CertCounters>,
}

/// The file name derper uses for `hostname` in certdir: every character
/// outside `[A-Za-z0-9.-]` removed.
pub fn cert_file_name(hostname: &str) -> String {
    hostname
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .collect()
}

/// A self-signed certificate (and key) for `hostname`, as PEM. An IP address
/// becomes an IP SAN, anything else a DNS SAN.
pub fn self_signed_pem(hostname: &str) -> Result<(String, String), TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec![hostname.to_owned()])
        .map_err(|e| TlsError::Invalid(format!("self-signed certificate: {e}")))?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Parses a PEM certificate chain (leaf first).
pub fn certs_from_pem(cert_pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// Builds a [`CertifiedKey`] from PEM certificate chain and private key.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let certs = certs_from_pem(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Invalid(format!("private key PEM: {e}")))?;
    CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| TlsError::Invalid(format!("certificate and key do not match: {e}")))
}

/// What the server needs to know about a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number (hex).
    pub serial: String,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
}

impl LeafInfo {
    /// Parses the validity, serial and names of a DER certificate.
    pub fn parse(der: &[u8]) -> Result<LeafInfo, TlsError> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| TlsError::Invalid(format!("certificate is not valid X.509: {e}")))?;
        let time = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        let validity = cert.validity();
        let mut info = LeafInfo {
            not_before: time(validity.not_before.timestamp()),
            not_after: time(validity.not_after.timestamp()),
            serial: cert.raw_serial_as_string(),
            dns_names: Vec::new(),
            ips: Vec::new(),
        };
        match cert.subject_alternative_name() {
            Ok(Some(san)) => {
                for name in &san.value.general_names {
                    match name {
                        GeneralName::DNSName(n) => info.dns_names.push(n.to_ascii_lowercase()),
                        GeneralName::IPAddress(b) => {
                            if let Ok(a) = <[u8; 4]>::try_from(*b) {
                                info.ips.push(IpAddr::from(a));
                            } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                                info.ips.push(IpAddr::from(a));
                            }
                        }
                        _ => {}
                    }
                }
            }
            Ok(None) => {
                // No SAN extension: fall back to the subject CN (old style).
                for cn in cert.subject().iter_common_name() {
                    if let Ok(s) = cn.as_str() {
                        info.dns_names.push(s.to_ascii_lowercase());
                    }
                }
            }
            Err(e) => {
                return Err(TlsError::Invalid(format!(
                    "certificate has a bad subjectAltName: {e}"
                )))
            }
        }
        Ok(info)
    }

    /// Whether the certificate is valid for `host` (DNS name, `*.` wildcard
    /// of one label, or IP address).
    pub fn names(&self, host: &str) -> bool {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.ips.contains(&ip);
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.dns_names.iter().any(|n| {
            let n = n.trim_end_matches('.');
            if let Some(suffix) = n.strip_prefix("*.") {
                host.split_once('.')
                    .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix)
            } else {
                n == host
            }
        })
    }

    /// When to renew: once less than a third of the lifetime is left.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime * 2 / 3
    }
}

/// The leaf certificate of `ck`, parsed.
pub(crate) fn leaf_info(ck: &CertifiedKey) -> Result<LeafInfo, TlsError> {
    let leaf = ck
        .cert
        .first()
        .ok_or_else(|| TlsError::Invalid("empty certificate chain".into()))?;
    LeafInfo::parse(leaf)
}

/// Writes `data` to `path` atomically (temporary file + rename) with the
/// given Unix permission bits.
pub(crate) fn write_file_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    let err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Creates `dir` (mode 0700) if it does not exist.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), TlsError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|source| TlsError::Read {
        path: dir.to_owned(),
        source,
    })
}

/// Error text with every source appended (`a: b: c`).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl TlsManager {
    /// Sets up TLS as configured and starts any background work (file
    /// watching, ACME issuance and renewal) until `shutdown`.
    ///
    /// In `letsencrypt` mode without a usable cached certificate this
    /// returns once the ACME account is set up (a bad directory or CA file
    /// is an error here), but before the first certificate is issued: the
    /// HTTP-01 challenge is answered by the plain-HTTP listener, which the
    /// server binds after this returns. Until then handshakes fail; use
    /// [`TlsManager::wait_for_certificate`] to wait.
    ///
    /// With `meta_key` (the relay's DERP key), the meta certificate is
    /// appended to every served chain (see [`meta_certificate`]).
    pub async fn start(
        settings: &TlsSettings,
        hostname: &str,
        meta_key: Option<&NodePublic>,
        shutdown: CancellationToken,
    ) -> Result<TlsManager, TlsError> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let counters = Arc::new(CertCounters::default());
        let mut manual = None;
        let mut acme = None;
        let cert = match settings.mode {
            CertMode::SelfSigned => {
                let (c, k) = self_signed_pem(hostname)?;
                let ck = certified_key_from_pem(c.as_bytes(), k.as_bytes())?;
                tracing::info!(%hostname, "serving a self-signed certificate");
                Arc::new(SwappableCert::new(Arc::new(ck)))
            }
            CertMode::Manual => {
                let (m, cert) =
                    manual::ManualCerts::start(&settings.certdir, hostname, counters.clone())?;
                tokio::spawn(m.clone().watch(shutdown.clone()));
                manual = Some(m);
                cert
            }
            CertMode::Letsencrypt => {
                let (a, cert) = acme::Acme::start(settings, hostname, counters.clone()).await?;
                tokio::spawn(a.clone().run(shutdown.clone()));
                acme = Some(a);
                cert
            }
            CertMode::None => {
                return Err(TlsError::Invalid(
                    "certmode none has no TLS to set up".into(),
                ))
            }
        };
        if cert.get().is_some() {
            counters.installed();
        }
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(format!("TLS configuration: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(match meta_key {
                Some(k) => Arc::new(WithMetaCert {
                    inner: cert.clone(),
                    meta: meta_certificate(k)?,
                    cached: RwLock::new(None),
                }),
                None => cert.clone() as Arc<dyn ResolvesServerCert>,
            });
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // DERP connections live for hours and reconnect rarely: no TLS 1.3
        // session tickets (each costs a ticket encryption and cache entry).
        config.send_tls13_tickets = 0;
        Ok(TlsManager {
            mode: settings.mode,
            cert,
            acceptor: accept::Acceptor::new(config),
            manual,
            acme,
            counters,
        })
    }

    /// The acceptor for the main listener.
    pub fn acceptor(&self) -> accept::Acceptor {
        self.acceptor.clone()
    }

    /// The certificate mode.
    pub fn mode(&self) -> CertMode {
        self.mode
    }

    /// Re-reads certificates now (SIGHUP). Manual mode: reads the files and
    /// swaps the certificate, or returns the error and keeps the old one.
    /// ACME mode: re-checks whether renewal is due (in the background).
    pub fn reload(&self) -> Result<(), TlsError> {
        if let Some(m) = &self.manual {
            return m.reload();
        }
        if let Some(a) = &self.acme {
            a.wake();
        }
        Ok(())
    }

    /// The key authorization for an ACME HTTP-01 challenge token, if one is
    /// pending (served on the plain-HTTP listener).
    pub fn http01_response(&self, token: &str) -> Option<String> {
        self.acme.as_ref().and_then(|a| a.http01_response(token))
    }

    /// The DER of the leaf certificate currently served, if any.
    pub fn current_certificate(&self) -> Option<CertificateDer<'static>> {
        self.cert.get().and_then(|ck| ck.cert.first().cloned())
    }

    /// Waits (at most `limit`) until a certificate is being served.
    pub async fn wait_for_certificate(&self, limit: Duration) -> Result<(), TlsError> {
        tokio::time::timeout(limit, self.cert.wait_until_set())
            .await
            .map_err(|_| {
                TlsError::Acme(format!(
                    "no certificate obtained within {}",
                    humantime::format_duration(limit)
                ))
            })
    }

    /// Certificate (re)load / issuance counts.
    pub fn stats(&self) -> CertStats {
        CertStats {
            installed: self.counters.installed.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn meta_certificate_names_the_derp_key_like_derper() {
        use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
        let key = crate::proto::NodePrivate::generate().public();
        let der = meta_certificate(&key).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(cert.tbs_certificate.raw_serial(), &[2]);
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), format!("derpkey{}", key.to_hex()));
        let exts = cert.extensions();
        assert_eq!(exts.len(), 1, "{exts:?}");
        assert!(matches!(
            exts[0].parsed_extension(),
            ParsedExtension::BasicConstraints(_)
        ));
        let validity = cert.validity();
        let span = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(span, 60 * 86400);
    }

    use super::*;

    #[test]
    fn file_name_drops_everything_outside_the_allowed_set() {
        assert_eq!(cert_file_name("derp.example.com"), "derp.example.com");
        assert_eq!(cert_file_name("../etc/x_y:443"), "..etcxy443");
        assert_eq!(cert_file_name("fe80::1"), "fe801");
    }

    #[test]
    fn self_signed_for_an_ip_has_an_ip_san() {
        let (c, k) = self_signed_pem("192.0.2.7").unwrap();
        let ck = certified_key_from_pem(c.as_bytes(), k.as_bytes()).unwrap();
        let info = leaf_info(&ck).unwrap();
        assert!(info.names("192.0.2.7"));
        assert!(!info.names("192.0.2.8"));
        let (c, _) = self_signed_pem("derp.example.com").unwrap();
        let info = LeafInfo::parse(&certs_from_pem(c.as_bytes()).unwrap()[0]).unwrap();
        assert!(info.names("DERP.example.com."));
        assert!(!info.names("192.0.2.7"));
    }

    #[test]
    fn wildcards_match_one_label() {
        let ck = rcgen::generate_simple_self_signed(vec!["*.example.com".into()]).unwrap();
        let info = LeafInfo::parse(ck.cert.der()).unwrap();
        assert!(info.names("derp.example.com"));
        assert!(!info.names("a.b.example.com"));
        assert!(!info.names("example.com"));
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let (c, _) = self_signed_pem("a.example").unwrap();
        let (_, k) = self_signed_pem("a.example").unwrap();
        let e = certified_key_from_pem(c.as_bytes(), k.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("do not match"), "{e}");
    }
}
