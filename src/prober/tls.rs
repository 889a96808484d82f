//! The TLS probe: a handshake with one node on its DERP port, as a client
//! makes it (SNI `HostName`, the chain verified for that name against the
//! trusted roots, or the pinned SHA-256 of `CertName: sha256-raw:…`), and
//! the leaf certificate's end of validity. When verification fails, a
//! second, unverified handshake still reads the expiry, so an expired or
//! wrongly issued certificate shows when it ends.

use std::time::{Duration, SystemTime};

use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::dial::{self, TlsConfigs, Want};
use super::map::Node;
use super::probe::Outcome;

/// Runs the probe.
pub async fn probe(node: &Node, tls: &TlsConfigs) -> Outcome {
    let start = tokio::time::Instant::now();
    let pin = dial::pinned_sha256(node);
    let config = if pin.is_some() {
        tls.unverified.clone()
    } else {
        tls.verified.clone()
    };
    match handshake(node, config).await {
        Ok(certs) => {
            let latency = start.elapsed();
            let not_after = certs.first().and_then(|c| not_after(c));
            if let Some(hex_want) = pin {
                if let Err(e) = check_pin(&certs, hex_want) {
                    return Outcome {
                        cert_not_after: not_after,
                        ..Outcome::fail(latency, e)
                    };
                }
            }
            let mut o = Outcome::ok(latency);
            o.cert_not_after = not_after;
            o.note = not_after.map(expiry_note).unwrap_or_default();
            o
        }
        Err((e, verify_failed)) => {
            let latency = start.elapsed();
            let mut o = Outcome::fail(latency, e);
            if verify_failed {
                if let Ok(certs) = handshake(node, tls.unverified.clone()).await {
                    o.cert_not_after = certs.first().and_then(|c| not_after(c));
                    o.note = o.cert_not_after.map(expiry_note).unwrap_or_default();
                }
            }
            o
        }
    }
}

type Chain = Vec<rustls::pki_types::CertificateDer<'static>>;

/// One handshake; the error says whether the certificate was refused (as
/// opposed to the node not answering).
async fn handshake(
    node: &Node,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<Chain, (String, bool)> {
    let addr = dial::address(node, Want::Any, node.derp_port)
        .await
        .map_err(|e| (e, false))?;
    let name = dial::server_name(node).map_err(|e| (e, false))?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| (format!("connect {addr}: {e}"), false))?;
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| {
            let refused = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
            (format!("TLS handshake with {addr}: {e}"), refused)
        })?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    Ok(chain)
}

/// The leaf's `notAfter`.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// "expires in 4.9 days" (or "expired 2.0 days ago").
pub fn expiry_note(t: SystemTime) -> String {
    // Rounded down to a tenth: a certificate with 4.99 days left does
    // not read as "5.0".
    let days = |d: Duration| (d.as_secs_f64() / 8_640.0).floor() / 10.0;
    match t.duration_since(SystemTime::now()) {
        Ok(left) => format!("cert expires in {:.1} days", days(left)),
        Err(e) => format!("cert expired {:.1} days ago", days(e.duration())),
    }
}

/// A pinned node presents exactly one certificate besides derper's
/// `derpkey` meta certificate, and its SHA-256 is the pin.
fn check_pin(chain: &Chain, want_hex: &str) -> Result<(), String> {
    let real: Vec<_> = chain.iter().filter(|c| !is_meta_cert(c)).collect();
    let [only] = real.as_slice() else {
        return Err(format!(
            "pinned certificate: {} certificates presented, want exactly one",
            real.len()
        ));
    };
    let got = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, only);
    if hex::encode(got.as_ref()).eq_ignore_ascii_case(want_hex.trim()) {
        Ok(())
    } else {
        Err(format!(
            "pinned certificate: SHA-256 {} is not the map's {want_hex}",
            hex::encode(got.as_ref())
        ))
    }
}

/// derper's meta certificate: subject CN `derpkey<hex>`.
fn is_meta_cert(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| {
        c.subject()
            .iter_common_name()
            .any(|cn| cn.as_str().is_ok_and(|s| s.starts_with("derpkey")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_read_from_the_leaf() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        let end = time::OffsetDateTime::now_utc() + time::Duration::days(5);
        params.not_after = end;
        let cert = params.self_signed(&key).unwrap();
        let t = not_after(cert.der()).unwrap();
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(secs, end.unix_timestamp());
        assert!(
            expiry_note(t).starts_with("cert expires in 4.9"),
            "{}",
            expiry_note(t)
        );
        let chain = vec![cert.der().clone()];
        let sha = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            cert.der(),
        ));
        assert!(check_pin(&chain, &sha).is_ok());
        assert!(check_pin(&chain, &"00".repeat(32)).is_err());
        assert!(check_pin(&vec![], &sha).is_err());
    }
}
