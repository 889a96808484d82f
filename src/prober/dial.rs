//! How the prober reaches a node, as a Tailscale client would: the address
//! of each family (the map's fixed `IPv4`/`IPv6`, or `HostName` resolved),
//! TLS trusting the system store, the web PKI roots and `--ca-file`, with
//! SNI `HostName`, and a DERP connection over `https://HostName:DERPPort`
//! (plain `http://` first for nodes marked `InsecureForTests`). Nothing
//! here knows what is on the other end: derpd or Tailscale's derper.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::map::{Family, Node};
use crate::client::{ClientError, DynClient};
use crate::proto::{ClientInfo, NodePrivate};

/// The TLS client settings of every probe.
#[derive(Clone)]
pub struct TlsConfigs {
    /// Verifies certificates against the trusted roots.
    pub verified: Arc<rustls::ClientConfig>,
    /// Accepts any certificate (`InsecureForTests`, pinned `CertName`s,
    /// and reading the expiry of a certificate that failed verification).
    pub unverified: Arc<rustls::ClientConfig>,
}

impl TlsConfigs {
    /// Trusts the system store, the web PKI roots and `ca_file`.
    pub fn new(ca_file: Option<&Path>) -> Result<TlsConfigs, String> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut verified = crate::trust::client_config(ca_file).map_err(|e| e.to_string())?;
        verified.resumption = rustls::client::Resumption::disabled();
        let mut unverified = crate::client::insecure_tls_config();
        unverified.resumption = rustls::client::Resumption::disabled();
        Ok(TlsConfigs {
            verified: Arc::new(verified),
            unverified: Arc::new(unverified),
        })
    }
}

/// Which address family to dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// IPv4 if the node has it, else IPv6.
    Any,
    /// IPv4 only.
    V4,
    /// IPv6 only.
    V6,
}

/// The address to reach `node` on `port` in the family `want` says.
pub async fn address(node: &Node, want: Want, port: u16) -> Result<SocketAddr, String> {
    match want {
        Want::V4 => one_family(node, node.ipv4, true, port).await,
        Want::V6 => one_family(node, node.ipv6, false, port).await,
        Want::Any => match one_family(node, node.ipv4, true, port).await {
            Ok(a) => Ok(a),
            Err(e4) => one_family(node, node.ipv6, false, port)
                .await
                .map_err(|e6| format!("{e4}; {e6}")),
        },
    }
}

async fn one_family(node: &Node, f: Family, v4: bool, port: u16) -> Result<SocketAddr, String> {
    let fam = if v4 { "IPv4" } else { "IPv6" };
    match f {
        Family::Fixed(ip) => Ok(SocketAddr::new(ip, port)),
        Family::Off => Err(format!("{fam} is off for {}", node.name)),
        Family::Dns => {
            if let Ok(ip) = node.host_name.parse::<IpAddr>() {
                return if ip.is_ipv4() == v4 {
                    Ok(SocketAddr::new(ip, port))
                } else {
                    Err(format!("{} has no {fam} address", node.host_name))
                };
            }
            tokio::net::lookup_host((node.host_name.as_str(), port))
                .await
                .map_err(|e| format!("resolving {}: {e}", node.host_name))?
                .find(|a| a.is_ipv4() == v4)
                .ok_or_else(|| format!("{} has no {fam} address", node.host_name))
        }
    }
}

/// A pinned certificate: the SHA-256 of its DER, from `CertName`
/// `sha256-raw:<hex>`.
pub fn pinned_sha256(node: &Node) -> Option<&str> {
    node.cert_name.strip_prefix("sha256-raw:")
}

/// The name the certificate is verified for: `CertName` when set (and not
/// a pin), else `HostName`. It is also the SNI sent.
pub fn server_name(node: &Node) -> Result<ServerName<'static>, String> {
    let name = if node.cert_name.is_empty() || pinned_sha256(node).is_some() {
        &node.host_name
    } else {
        &node.cert_name
    };
    ServerName::try_from(name.clone()).map_err(|_| format!("{name:?} is not a TLS server name"))
}

/// `host:port` for URLs and `Host:` headers (IPv6 literals bracketed).
pub fn host_port(node: &Node) -> String {
    if node.host_name.contains(':') {
        format!("[{}]:{}", node.host_name, node.derp_port)
    } else {
        format!("{}:{}", node.host_name, node.derp_port)
    }
}

/// What the prober says about itself in the handshake.
pub fn client_info() -> ClientInfo {
    ClientInfo {
        version: crate::proto::limits::PROTOCOL_VERSION.into(),
        is_prober: true,
        app_name: Some(format!("derpd-prober/{}", env!("CARGO_PKG_VERSION"))),
        ..ClientInfo::default()
    }
}

/// A handshaken DERP connection to `node` as `key`.
pub async fn derp(node: &Node, tls: &TlsConfigs, key: &NodePrivate) -> Result<DynClient, String> {
    let addr = address(node, Want::Any, node.derp_port).await?;
    let hp = host_port(node);
    let https = format!("https://{hp}/derp");
    let dial = |url: String, config: Option<Arc<rustls::ClientConfig>>| async move {
        crate::client::dial_tls_via(&url, Some(addr), config, key, client_info()).await
    };
    if node.insecure_for_tests {
        // Plain HTTP, as a lab relay (derper -dev, derpd serve --dev)
        // serves; a TLS one (unverified, as Tailscale's clients treat the
        // flag) when the answer shows the other end wants TLS.
        let plain = match dial(format!("http://{hp}/derp"), None).await {
            Ok(c) => return Ok(c),
            Err(e) if unreachable(&e) => return Err(describe(addr, e)),
            Err(e) => e,
        };
        return dial(https, Some(tls.unverified.clone()))
            .await
            .map_err(|e| format!("{}; over TLS: {}", describe(addr, plain), describe(addr, e)));
    }
    let config = if pinned_sha256(node).is_some() {
        tls.unverified.clone()
    } else {
        tls.verified.clone()
    };
    let url = if node.cert_name.is_empty() || pinned_sha256(node).is_some() {
        https
    } else {
        // Verify for CertName: it is the name the URL gives rustls.
        format!("https://{}:{}/derp", node.cert_name, node.derp_port)
    };
    dial(url, Some(config)).await.map_err(|e| describe(addr, e))
}

/// The node did not answer at all: no point trying another scheme.
fn unreachable(e: &ClientError) -> bool {
    matches!(e, ClientError::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::HostUnreachable
            | std::io::ErrorKind::NetworkUnreachable
    ))
}

fn describe(addr: SocketAddr, e: ClientError) -> String {
    if unreachable(&e) {
        format!("connect {addr}: {e}")
    } else {
        format!("DERP via {addr}: {e}")
    }
}
