//! `certmode letsencrypt`: certificates from an ACME CA (Let's Encrypt or any
//! `acme-directory`, e.g. a test CA) through `instant-acme`.
//!
//! * Challenge: HTTP-01, answered by [`Acme::http01_response`] on the
//!   plain-HTTP listener (`/.well-known/acme-challenge/<token>`).
//! * Trust for the directory's HTTPS: the webpki roots plus every
//!   certificate in `acme-ca-file`.
//! * Cache in certdir, following autocert's names so a restart (or a move
//!   from Tailscale's relay) does not re-issue: `acme_account+key` (account
//!   key, PEM, 0600) and a file named after the hostname holding the
//!   certificate's private key and chain (PEM, 0600).
//! * Renewal in the background once less than a third of the lifetime is
//!   left; failures are retried with backoff while the old certificate stays
//!   in service.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AuthorizationStatus, BodyWrapper, ChallengeType, Identifier, Key, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    cert_file_name, certified_key_from_pem, ensure_dir, error_chain, leaf_info, write_file_atomic,
    CertCounters, SwappableCert, TlsError, TlsSettings,
};

/// Account key file in certdir (autocert's name).
pub const ACCOUNT_KEY_FILE: &str = "acme_account+key";
/// Longest wait for the directory and account at start.
const ACCOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one issuance may take.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(300);
/// Re-check the renewal time at least this often (clock jumps, suspend).
const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// First retry delay after a failed issuance; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

type HttpClient = HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

/// ACME state of one TLS manager.
pub struct Acme {
    hostname: String,
    directory: String,
    email: Option<String>,
    cache_file: PathBuf,
    account_file: PathBuf,
    http: HttpClient,
    account: tokio::sync::Mutex<Option<Account>>,
    /// Pending HTTP-01 challenges: token → key authorization.
    challenges: RwLock<HashMap<String, String>>,
    cert: Arc<SwappableCert>,
    counters: Arc<CertCounters>,
    wake: Notify,
}

fn acme_err(what: &str, e: &dyn std::error::Error) -> TlsError {
    TlsError::Acme(format!("{what}: {}", error_chain(e)))
}

/// The HTTPS client for the ACME directory: the system store, the web PKI
/// roots, plus `ca_file`.
fn http_client(ca_file: Option<&Path>) -> Result<HttpClient, TlsError> {
    let tls = crate::trust::client_config(ca_file).map_err(|e| match e {
        crate::trust::TrustError::Read { path, source } => TlsError::Read {
            path: path.into(),
            source,
        },
        e => TlsError::Invalid(e.to_string()),
    })?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(HyperClient::builder(TokioExecutor::new()).build(https))
}

/// Removes the challenges it holds from the map when dropped.
struct PendingChallenges<'a> {
    acme: &'a Acme,
    tokens: Vec<String>,
}

impl PendingChallenges<'_> {
    fn add(&mut self, token: String, key_authorization: String) {
        self.acme
            .challenges
            .write()
            .insert(token.clone(), key_authorization);
        self.tokens.push(token);
    }
}

impl Drop for PendingChallenges<'_> {
    fn drop(&mut self) {
        let mut map = self.acme.challenges.write();
        for t in &self.tokens {
            map.remove(t);
        }
    }
}

impl Acme {
    /// Sets up: checks the hostname, builds the HTTPS client, loads the
    /// cached certificate, and (only when there is none) the account.
    pub(crate) async fn start(
        settings: &TlsSettings,
        hostname: &str,
        counters: Arc<CertCounters>,
    ) -> Result<(Arc<Acme>, Arc<SwappableCert>), TlsError> {
        if hostname.parse::<IpAddr>().is_ok() {
            return Err(TlsError::Invalid(format!(
                "certmode letsencrypt needs a DNS hostname, not the IP address {hostname}; \
                 use certmode manual (it generates a self-signed certificate for an IP)"
            )));
        }
        let name = cert_file_name(hostname);
        if name != hostname || !hostname.contains('.') {
            return Err(TlsError::Invalid(format!(
                "certmode letsencrypt needs a fully qualified DNS hostname, not {hostname:?}"
            )));
        }
        ensure_dir(&settings.certdir)?;
        let http = http_client(settings.acme_ca_file.as_deref())?;
        let acme = Arc::new(Acme {
            hostname: hostname.to_owned(),
            directory: settings.acme_directory.clone(),
            email: settings.acme_email.clone().filter(|e| !e.is_empty()),
            cache_file: settings.certdir.join(&name),
            account_file: settings.certdir.join(ACCOUNT_KEY_FILE),
            http,
            account: tokio::sync::Mutex::new(None),
            challenges: RwLock::new(HashMap::new()),
            cert: Arc::new(SwappableCert::empty()),
            counters,
            wake: Notify::new(),
        });
        match acme.load_cache() {
            Ok(Some(ck)) => {
                let info = leaf_info(&ck)?;
                tracing::info!(
                    file = %acme.cache_file.display(),
                    serial = %info.serial,
                    not_after = %humantime::format_rfc3339_seconds(info.not_after),
                    "using the cached ACME certificate"
                );
                acme.cert.set(Arc::new(ck));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "ignoring the cached ACME certificate"),
        }
        if acme.cert.get().is_none() {
            // Nothing to serve yet: fail now on a wrong directory, CA file or account.
            tokio::time::timeout(ACCOUNT_TIMEOUT, acme.account())
                .await
                .map_err(|_| {
                    TlsError::Acme(format!(
                        "no answer from the ACME directory {} within {}s",
                        acme.directory,
                        ACCOUNT_TIMEOUT.as_secs()
                    ))
                })??;
        }
        let cert = acme.cert.clone();
        Ok((acme, cert))
    }

    /// The key authorization for a pending HTTP-01 token.
    pub fn http01_response(&self, token: &str) -> Option<String> {
        self.challenges.read().get(token).cloned()
    }

    /// Re-check the certificate now.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// The cached certificate, if present, usable and not expired.
    fn load_cache(&self) -> Result<Option<CertifiedKey>, TlsError> {
        let data = match std::fs::read(&self.cache_file) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(TlsError::Read {
                    path: self.cache_file.clone(),
                    source,
                })
            }
        };
        let data = zeroize::Zeroizing::new(data);
        let ck = certified_key_from_pem(&data, &data)
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", self.cache_file.display())))?;
        let info = leaf_info(&ck)?;
        if !info.names(&self.hostname) {
            return Err(TlsError::Invalid(format!(
                "{}: certificate is not for {}",
                self.cache_file.display(),
                self.hostname
            )));
        }
        if info.not_after <= SystemTime::now() {
            tracing::info!(file = %self.cache_file.display(), "cached ACME certificate has expired");
            return Ok(None);
        }
        Ok(Some(ck))
    }

    /// The ACME account: loaded with the cached key, or created (and the key cached).
    async fn account(&self) -> Result<Account, TlsError> {
        let mut guard = self.account.lock().await;
        if let Some(a) = guard.as_ref() {
            return Ok(a.clone());
        }
        let builder = Account::builder_with_http(Box::new(self.http.clone()));
        let account = if self.account_file.exists() {
            let pkcs8 = self.read_account_key()?;
            let key = Key::from_pkcs8_der(pkcs8.clone_key()).map_err(|e| {
                TlsError::Invalid(format!(
                    "{}: unusable account key: {e}",
                    self.account_file.display()
                ))
            })?;
            let (account, _) = builder
                .create_from_key((key, PrivateKeyDer::Pkcs8(pkcs8)), self.directory.clone())
                .await
                .map_err(|e| acme_err(&format!("account at {}", self.directory), &e))?;
            tracing::info!(directory = %self.directory, account = %account.id(), "ACME account ready");
            account
        } else {
            let contact = self.email.as_ref().map(|e| format!("mailto:{e}"));
            let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
            let (account, credentials) = builder
                .create(
                    &NewAccount {
                        contact: &contacts,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    self.directory.clone(),
                    None,
                )
                .await
                .map_err(|e| acme_err(&format!("new account at {}", self.directory), &e))?;
            let key = rcgen::KeyPair::try_from(credentials.private_key())
                .map_err(|e| TlsError::Invalid(format!("account key: {e}")))?;
            let pem = zeroize::Zeroizing::new(key.serialize_pem());
            write_file_atomic(&self.account_file, pem.as_bytes(), 0o600)?;
            tracing::info!(directory = %self.directory, account = %account.id(), "created ACME account");
            account
        };
        *guard = Some(account.clone());
        Ok(account)
    }

    /// The cached account key as PKCS#8 (SEC1 keys, as autocert writes
    /// them, are converted).
    fn read_account_key(&self) -> Result<PrivatePkcs8KeyDer<'static>, TlsError> {
        let path = &self.account_file;
        let pem =
            zeroize::Zeroizing::new(std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.clone(),
                source,
            })?);
        let der = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| TlsError::Invalid(format!("{}: private key PEM: {e}", path.display())))?;
        match der {
            PrivateKeyDer::Pkcs8(k) => Ok(k),
            other => {
                let kp = rcgen::KeyPair::try_from(&other).map_err(|e| {
                    TlsError::Invalid(format!("{}: unusable account key: {e}", path.display()))
                })?;
                Ok(PrivatePkcs8KeyDer::from(kp.serialize_der()))
            }
        }
    }

    /// Obtains a new certificate, caches it and puts it into service.
    async fn issue(&self) -> Result<(), TlsError> {
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(self.hostname.clone())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| acme_err("new order", &e))?;
        let mut pending = PendingChallenges {
            acme: self,
            tokens: Vec::new(),
        };
        {
            let mut authzs = order.authorizations();
            while let Some(authz) = authzs.next().await {
                let mut authz = authz.map_err(|e| acme_err("authorization", &e))?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(TlsError::Acme(format!(
                            "authorization for {} is {other:?}",
                            self.hostname
                        )))
                    }
                }
                let mut challenge = authz
                    .challenge(ChallengeType::Http01)
                    .ok_or_else(|| TlsError::Acme("the CA offers no http-01 challenge".into()))?;
                pending.add(
                    challenge.token.clone(),
                    challenge.key_authorization().as_str().to_owned(),
                );
                challenge
                    .set_ready()
                    .await
                    .map_err(|e| acme_err("challenge", &e))?;
            }
        }
        let retry = RetryPolicy::new().timeout(Duration::from_secs(120));
        let status = order
            .poll_ready(&retry)
            .await
            .map_err(|e| acme_err("waiting for validation", &e))?;
        if status != OrderStatus::Ready {
            let mut why = Vec::new();
            let mut authzs = order.authorizations();
            while let Some(Ok(mut authz)) = authzs.next().await {
                if let Ok(state) = authz.refresh().await {
                    for c in &state.challenges {
                        if let Some(p) = &c.error {
                            why.push(p.to_string());
                        }
                    }
                }
            }
            return Err(TlsError::Acme(format!(
                "order for {} is {status:?}: {}",
                self.hostname,
                if why.is_empty() {
                    "no details".to_owned()
                } else {
                    why.join("; ")
                }
            )));
        }
        drop(pending);

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TlsError::Acme(format!("certificate key: {e}")))?;
        let mut params = rcgen::CertificateParams::new(vec![self.hostname.clone()])
            .map_err(|e| TlsError::Acme(format!("CSR: {e}")))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| TlsError::Acme(format!("CSR: {e}")))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| acme_err("finalize", &e))?;
        let chain = order
            .poll_certificate(&retry)
            .await
            .map_err(|e| acme_err("certificate download", &e))?;

        let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
        let ck = certified_key_from_pem(chain.as_bytes(), key_pem.as_bytes())
            .map_err(|e| TlsError::Acme(format!("issued certificate: {e}")))?;
        let info = leaf_info(&ck)?;
        if !info.names(&self.hostname) {
            return Err(TlsError::Acme(format!(
                "issued certificate does not name {}",
                self.hostname
            )));
        }
        let mut file = zeroize::Zeroizing::new(key_pem.as_bytes().to_vec());
        file.extend_from_slice(chain.as_bytes());
        if let Err(e) = write_file_atomic(&self.cache_file, &file, 0o600) {
            // Serving matters more than caching; a restart would re-issue.
            tracing::error!(error = %e, "cannot cache the ACME certificate");
        }
        self.cert.set(Arc::new(ck));
        self.counters.installed();
        tracing::info!(
            hostname = %self.hostname,
            serial = %info.serial,
            not_after = %humantime::format_rfc3339_seconds(info.not_after),
            renew_after = %humantime::format_rfc3339_seconds(info.renew_at()),
            "ACME certificate issued"
        );
        Ok(())
    }

    /// How long until the current certificate should be renewed (zero: now).
    fn renewal_due_in(&self) -> Duration {
        let Some(ck) = self.cert.get() else {
            return Duration::ZERO;
        };
        match leaf_info(&ck) {
            Ok(info) => info
                .renew_at()
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
            Err(_) => Duration::ZERO,
        }
    }

    /// Issues when there is no certificate, renews when due, until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let due_in = self.renewal_due_in();
            if !due_in.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(due_in.min(MAX_SLEEP)) => {}
                    _ = self.wake.notified() => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            let renewing = self.cert.get().is_some();
            tracing::info!(
                hostname = %self.hostname,
                directory = %self.directory,
                "{}",
                if renewing { "renewing the ACME certificate" } else { "obtaining an ACME certificate" }
            );
            let result = tokio::select! {
                r = tokio::time::timeout(ISSUE_TIMEOUT, self.issue()) => r.unwrap_or_else(|_| {
                    Err(TlsError::Acme(format!("issuance took longer than {}s", ISSUE_TIMEOUT.as_secs())))
                }),
                _ = shutdown.cancelled() => return,
            };
            match result {
                Ok(()) => failures = 0,
                Err(e) => {
                    self.counters.failed();
                    failures = failures.saturating_add(1);
                    let backoff = FIRST_BACKOFF
                        .saturating_mul(1u32 << (failures - 1).min(12))
                        .min(MAX_BACKOFF);
                    tracing::error!(
                        error = %e,
                        retry_in = %humantime::format_duration(backoff),
                        "ACME certificate {} failed",
                        if renewing { "renewal" } else { "issuance" }
                    );
                    // A new account is fetched next time (it may have been the problem).
                    *self.account.lock().await = None;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.wake.notified() => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}
