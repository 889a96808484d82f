//! `certmode manual`: a certificate and key from `<certdir>/<name>.crt` and
//! `<certdir>/<name>.key`, where `<name>` is [`super::cert_file_name`] of
//! the hostname.
//!
//! The files are polled about once a second (modification time, length and
//! inode of both); when they change and the new pair parses, matches and
//! names the hostname, it is swapped in for new handshakes. A bad pair is
//! logged and the old certificate kept. [`ManualCerts::reload`] (SIGHUP)
//! re-reads at once.
//!
//! If the hostname is an IP address and neither file exists, a self-signed
//! ECDSA P-256 certificate (one year, IP SAN) is generated and written (key
//! mode 0600), and a ready-made DERPNode JSON with a
//! `CertName: "sha256-raw:<hex>"` pin is logged, as Tailscale's relay does.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::{cert_file_name, certs_from_pem, CertCounters, LeafInfo, SwappableCert, TlsError};

/// How often the files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Identity of one file's current contents, as far as `stat` tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    mtime: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let md = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&md);
    #[cfg(not(unix))]
    let inode = 0;
    Some(FileStamp {
        mtime: md.modified().ok(),
        len: md.len(),
        inode,
    })
}

type PairStamp = (Option<FileStamp>, Option<FileStamp>);

/// The manual-mode certificate files and the certificate they hold.
pub struct ManualCerts {
    hostname: String,
    crt: PathBuf,
    key: PathBuf,
    cert: Arc<SwappableCert>,
    counters: Arc<CertCounters>,
    /// Stamp of the files as last read (whether or not they were good).
    last: Mutex<Option<PairStamp>>,
}

impl ManualCerts {
    /// Loads (or, for an IP hostname without files, generates) the pair.
    pub(crate) fn start(
        certdir: &Path,
        hostname: &str,
        counters: Arc<CertCounters>,
    ) -> Result<(Arc<ManualCerts>, Arc<SwappableCert>), TlsError> {
        let name = cert_file_name(hostname);
        if name.is_empty() {
            return Err(TlsError::Invalid(format!(
                "hostname {hostname:?} gives an empty certificate file name"
            )));
        }
        let crt = certdir.join(format!("{name}.crt"));
        let key = certdir.join(format!("{name}.key"));
        if let Ok(ip) = hostname.parse::<IpAddr>() {
            if !crt.exists() && !key.exists() {
                generate_ip_cert(certdir, ip, &crt, &key)?;
            }
        }
        let stamp_before = (stamp(&crt), stamp(&key));
        let first = load_pair(&crt, &key, hostname)?;
        log_loaded("loaded certificate", &crt, hostname, &first);
        let cert = Arc::new(SwappableCert::new(Arc::new(first)));
        let m = Arc::new(ManualCerts {
            hostname: hostname.to_owned(),
            crt,
            key,
            cert: cert.clone(),
            counters,
            last: Mutex::new(Some(stamp_before)),
        });
        Ok((m, cert))
    }

    /// The certificate file.
    pub fn crt_path(&self) -> &Path {
        &self.crt
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// Re-reads the files now; on error the old certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let mut last = self.last.lock();
        let now = (stamp(&self.crt), stamp(&self.key));
        *last = Some(now);
        self.load_and_swap("reloaded certificate")
    }

    fn load_and_swap(&self, what: &str) -> Result<(), TlsError> {
        match load_pair(&self.crt, &self.key, &self.hostname) {
            Ok(ck) => {
                log_loaded(what, &self.crt, &self.hostname, &ck);
                self.cert.set(Arc::new(ck));
                self.counters.installed();
                Ok(())
            }
            Err(e) => {
                self.counters.failed();
                Err(e)
            }
        }
    }

    /// Checks the files once; swaps the certificate if they changed and are good.
    fn poll(&self) {
        let mut last = self.last.lock();
        let now = (stamp(&self.crt), stamp(&self.key));
        if last.as_ref() == Some(&now) {
            return;
        }
        *last = Some(now);
        if now.0.is_none() || now.1.is_none() {
            // Mid-replacement (or deleted): keep serving, try again when they reappear.
            tracing::warn!(
                crt = %self.crt.display(),
                key = %self.key.display(),
                "certificate or key file missing; keeping the current certificate"
            );
            return;
        }
        if let Err(e) = self.load_and_swap("certificate files changed; reloaded") {
            tracing::error!(error = %e, "new certificate files are not usable; keeping the current certificate");
        }
    }

    /// Polls the files until `shutdown`.
    pub(crate) async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let me = self.clone();
            // Small blocking file reads; keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || me.poll()).await;
        }
    }
}

/// Reads and checks a certificate/key pair; errors name the file at fault.
fn load_pair(crt: &Path, key: &Path, hostname: &str) -> Result<CertifiedKey, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_owned(),
            source,
        })
    };
    let crt_pem = read(crt)?;
    let key_pem = read(key)?;
    let certs = certs_from_pem(&crt_pem)
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", crt.display())))?;
    let leaf = LeafInfo::parse(&certs[0])
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", crt.display())))?;
    if !leaf.names(hostname) {
        return Err(TlsError::Invalid(format!(
            "{}: certificate is not valid for hostname {hostname:?}",
            crt.display()
        )));
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::Invalid(format!("{}: private key PEM: {e}", key.display())))?;
    CertifiedKey::from_der(certs, private, &super::provider()).map_err(|e| {
        TlsError::Invalid(format!(
            "{} and {} do not match: {e}",
            crt.display(),
            key.display()
        ))
    })
}

fn log_loaded(what: &str, crt: &Path, hostname: &str, ck: &CertifiedKey) {
    let info = super::leaf_info(ck).ok();
    tracing::info!(
        file = %crt.display(),
        serial = info.as_ref().map_or("", |i| i.serial.as_str()),
        not_after = %info.as_ref().map_or(String::new(), |i| {
            humantime::format_rfc3339_seconds(i.not_after).to_string()
        }),
        "{what}"
    );
    if hostname.parse::<IpAddr>().is_ok() && ck.cert.len() == 1 {
        tracing::info!(
            "IP address {hostname}: pin this certificate in the DERPMap with: {}",
            derp_node_json(hostname, &ck.cert[0])
        );
    }
}

/// The DERPNode JSON that pins a single self-signed certificate.
pub fn derp_node_json(hostname: &str, cert_der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_der);
    let q = |v: &str| serde_json::Value::from(v).to_string();
    // Field order as Tailscale's tailcfg.DERPNode prints it.
    format!(
        r#"{{"Name":"custom","RegionID":900,"HostName":{},"CertName":{}}}"#,
        q(hostname),
        q(&format!("sha256-raw:{}", hex::encode(digest.as_ref())))
    )
}

fn generate_ip_cert(certdir: &Path, ip: IpAddr, crt: &Path, key: &Path) -> Result<(), TlsError> {
    let invalid = |e: rcgen::Error| TlsError::Invalid(format!("self-signed certificate: {e}"));
    let mut params = rcgen::CertificateParams::new(vec![ip.to_string()]).map_err(invalid)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(365);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ip.to_string());
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(invalid)?;
    let cert = params.self_signed(&key_pair).map_err(invalid)?;
    super::ensure_dir(certdir)?;
    let key_pem = zeroize::Zeroizing::new(key_pair.serialize_pem());
    super::write_file_atomic(key, key_pem.as_bytes(), 0o600)?;
    super::write_file_atomic(crt, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(
        crt = %crt.display(),
        key = %key.display(),
        %ip,
        "generated a self-signed certificate for the IP hostname"
    );
    Ok(())
}
