//! Mesh peer addresses (`--mesh-with` entries) and dialing a peer: TCP,
//! optional TLS, the HTTP upgrade to DERP, and the client handshake with
//! the relay's own key and the mesh key.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::client::{Client, Stream};
use crate::proto::{ClientInfo, MeshKey, NodePrivate, NodePublic};

/// One `--mesh-with` entry.
///
/// Forms: `host` (dial `https://host/derp`), `host/dialhost` (TLS name and
/// Host header `host`, TCP to `dialhost`), either with `:port`, and
/// explicit `https://host[:port]` or `http://host[:port]` (plain HTTP, for
/// development and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// The entry as written (used as the metrics label and in status).
    pub name: String,
    /// TLS (`https`) or plain HTTP.
    pub tls: bool,
    /// Name for the certificate check and the Host header.
    pub host: String,
    /// Port of the peer's DERP listener.
    pub port: u16,
    /// `host:port` to open the TCP connection to.
    pub dial: String,
}

/// Splits `host[:port]`, `[v6][:port]` or a bare IPv6 address.
fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let bad = || format!("{s:?} is not host[:port]");
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().map_err(|_| bad())?),
            None if after.is_empty() => None,
            None => return Err(bad()),
        };
        return Ok((h.to_owned(), port));
    }
    match s.matches(':').count() {
        0 => Ok((s.to_owned(), None)),
        1 => {
            let (h, p) = s.split_once(':').expect("one colon");
            Ok((h.to_owned(), Some(p.parse().map_err(|_| bad())?)))
        }
        _ => Ok((s.to_owned(), None)),
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl PeerSpec {
    /// Parses one entry.
    pub fn parse(entry: &str) -> Result<PeerSpec, String> {
        let name = entry.trim();
        let (tls, rest) = if let Some(r) = name.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = name.strip_prefix("http://") {
            (false, r)
        } else {
            (true, name)
        };
        let rest = rest.trim_end_matches('/');
        let rest = rest.strip_suffix("/derp").unwrap_or(rest);
        let (hostpart, dialpart) = match rest.split_once('/') {
            Some((h, d)) => (h, Some(d)),
            None => (rest, None),
        };
        let (host, port) = split_host_port(hostpart)?;
        if host.is_empty() {
            return Err(format!("mesh peer {name:?} has no host"));
        }
        let port = port.unwrap_or(if tls { 443 } else { 80 });
        let dial = match dialpart {
            Some(d) if !d.is_empty() => {
                let (dh, dp) = split_host_port(d)?;
                join_host_port(&dh, dp.unwrap_or(port))
            }
            _ => join_host_port(&host, port),
        };
        Ok(PeerSpec {
            name: name.to_owned(),
            tls,
            host,
            port,
            dial,
        })
    }

    /// Parses a comma-separated list (empty entries ignored).
    pub fn parse_list(list: &str) -> Result<Vec<PeerSpec>, String> {
        list.split(',')
            .filter(|e| !e.trim().is_empty())
            .map(PeerSpec::parse)
            .collect()
    }

    /// The URL this entry dials.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/derp", join_host_port(&self.host, self.port))
    }
}

/// TLS settings for mesh links: the system store, the web PKI roots, plus
/// an optional CA file.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    crate::trust::client_config(ca_file)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// A handshaken DERP connection to a mesh peer.
pub struct Dialed {
    /// The byte stream.
    pub stream: Box<dyn Stream>,
    /// Bytes already read past the ServerInfo frame.
    pub buf: BytesMut,
    /// The peer relay's public key.
    pub server_key: NodePublic,
}

/// Connects to `peer` and runs the client handshake as `key`, presenting
/// `mesh_key`.
pub async fn dial(
    peer: &PeerSpec,
    tls: &Arc<rustls::ClientConfig>,
    tcp_opts: &crate::sockopt::TcpTimeouts,
    key: &NodePrivate,
    mesh_key: &MeshKey,
) -> Result<Dialed, String> {
    let tcp = TcpStream::connect(&peer.dial)
        .await
        .map_err(|e| format!("connect {}: {e}", peer.dial))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    tcp_opts.apply(&tcp).map_err(|e| e.to_string())?;
    let stream: Box<dyn Stream> = if peer.tls {
        let name = rustls::pki_types::ServerName::try_from(peer.host.clone())
            .map_err(|_| format!("{:?} is not a TLS server name", peer.host))?;
        let tls = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", peer.host))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let host = join_host_port(&peer.host, peer.port);
    handshake(stream, &host, key, mesh_key).await
}

async fn handshake(
    stream: Box<dyn Stream>,
    host: &str,
    key: &NodePrivate,
    mesh_key: &MeshKey,
) -> Result<Dialed, String> {
    let info = ClientInfo {
        mesh_key: Some(mesh_key.clone()),
        version: 2,
        can_ack_pings: false,
        is_prober: false,
        app_name: Some("derpd-mesh".into()),
    };
    let client = Client::upgrade_and_handshake(stream, host, key, info)
        .await
        .map_err(|e| e.to_string())?;
    let (stream, buf, server_key) = client.into_parts();
    Ok(Dialed {
        stream,
        buf,
        server_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_in_every_form() {
        let p = PeerSpec::parse("derp2.example.com").unwrap();
        assert!(p.tls);
        assert_eq!(p.host, "derp2.example.com");
        assert_eq!(p.dial, "derp2.example.com:443");
        assert_eq!(p.url(), "https://derp2.example.com:443/derp");
        let p = PeerSpec::parse("derp2.example.com/10.0.0.2").unwrap();
        assert_eq!(
            (p.host.as_str(), p.dial.as_str()),
            ("derp2.example.com", "10.0.0.2:443")
        );
        let p = PeerSpec::parse("derp2.example.com:8443/10.0.0.2").unwrap();
        assert_eq!(p.dial, "10.0.0.2:8443");
        let p = PeerSpec::parse("http://127.0.0.1:3340").unwrap();
        assert!(!p.tls);
        assert_eq!(p.dial, "127.0.0.1:3340");
        let p = PeerSpec::parse("http://127.0.0.1:3340/derp").unwrap();
        assert_eq!(p.dial, "127.0.0.1:3340");
        let p = PeerSpec::parse("https://[::1]:8443").unwrap();
        assert_eq!((p.host.as_str(), p.dial.as_str()), ("::1", "[::1]:8443"));
        assert_eq!(PeerSpec::parse_list(" a, ,b ").unwrap().len(), 2);
        assert!(PeerSpec::parse("host:notaport").is_err());
        assert!(PeerSpec::parse("http://").is_err());
    }
}
