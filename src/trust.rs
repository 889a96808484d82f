//! The certificate authorities that outgoing TLS trusts: mesh dials, the
//! headscale API client, `--verify-client-url`, ACME and the DERP client.
//!
//! Like Go's and OpenSSL's clients, derpd trusts the operating system's
//! store (`SSL_CERT_FILE` and `SSL_CERT_DIR` override where it is read
//! from), plus the bundled web PKI roots, plus an optional CA file given by
//! a flag. The system store is read once per process.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::{pem::PemObject, CertificateDer};
use rustls::RootCertStore;

/// Why a CA file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no usable certificate.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The operating system's trusted certificates, read once.
fn system_certs() -> &'static [CertificateDer<'static>] {
    static CERTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    CERTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "reading the system certificate store");
        }
        tracing::debug!(
            certificates = found.certs.len(),
            "loaded the system certificate store"
        );
        found.certs
    })
}

/// Reads every certificate of a PEM file.
pub fn certs_from_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let shown = || path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TrustError::Read {
        path: shown(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TrustError::Invalid {
            path: shown(),
            reason: format!("certificate PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TrustError::Invalid {
            path: shown(),
            reason: "no certificate in PEM".into(),
        });
    }
    Ok(certs)
}

/// The system store, the web PKI roots, and the certificates of
/// `extra_ca_file` when given (an unusable extra file is an error; an
/// unparsable system certificate is skipped).
pub fn roots(extra_ca_file: Option<&Path>) -> Result<RootCertStore, TrustError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let (_added, _skipped) = roots.add_parsable_certificates(system_certs().iter().cloned());
    if let Some(path) = extra_ca_file {
        for c in certs_from_file(path)? {
            roots.add(c).map_err(|e| TrustError::Invalid {
                path: path.display().to_string(),
                reason: format!("unusable CA certificate: {e}"),
            })?;
        }
    }
    Ok(roots)
}

/// The crypto provider every TLS config uses (aws-lc-rs unless the process
/// installed another).
/// The crypto provider of our outgoing connections. Cipher suites are
/// offered as Go's clients (tailscaled) offer them on AES-capable machines:
/// AES-128-GCM first. Its SHA-256 key schedule is several times cheaper
/// than AES-256's SHA-384 on x86 (SHA extensions), for both ends.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::CryptoProvider::get_default()
        .map(|p| (**p).clone())
        .unwrap_or_else(rustls::crypto::aws_lc_rs::default_provider);
    p.cipher_suites.sort_by_key(|s| {
        use rustls::CipherSuite::*;
        match s.suite() {
            TLS13_AES_128_GCM_SHA256 | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 0,
            TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
            TLS13_AES_256_GCM_SHA384 | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => 1,
            TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
            _ => 2,
        }
    });
    Arc::new(p)
}

/// A client config trusting [`roots`]`(extra_ca_file)`.
pub fn client_config(extra_ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TrustError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .with_root_certificates(roots(extra_ca_file)?)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn extra_ca_files_are_added_and_bad_ones_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let base = roots(None).unwrap().len();
        assert!(base >= webpki_roots::TLS_SERVER_ROOTS.len());

        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca_pem()).unwrap();
        assert_eq!(roots(Some(&good)).unwrap().len(), base + 1);

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = roots(Some(&empty)).unwrap_err().to_string();
        assert!(e.contains("no certificate in PEM"), "{e}");
        let e = roots(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
