//! Relays from a DERP map: a small, tolerant reader of Tailscale's DERPMap
//! JSON (only the fields a DERP client dials with; everything else is
//! ignored), from a file or an http(s) URL.
//!
//! Failover order is the map's order: regions by ascending ID, then each
//! region's `Nodes` in order. `STUNOnly` nodes are skipped.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

/// One relay to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// What logs and metrics call it (the URL, or the map's node name).
    pub name: String,
    /// `http(s)://host:port`.
    pub url: String,
    /// Connect here instead of resolving the URL's host.
    pub connect_to: Option<SocketAddr>,
    /// Skip certificate verification for this relay.
    pub insecure: bool,
}

impl RelayTarget {
    /// A relay given as a URL.
    pub fn from_url(url: &str) -> RelayTarget {
        RelayTarget {
            name: url.to_owned(),
            url: url.to_owned(),
            connect_to: None,
            insecure: false,
        }
    }
}

#[derive(Deserialize)]
struct Map {
    #[serde(rename = "Regions", default)]
    regions: Option<BTreeMap<String, Option<Region>>>,
}

#[derive(Deserialize)]
struct Region {
    #[serde(rename = "RegionID", default)]
    region_id: i64,
    #[serde(rename = "Nodes", default)]
    nodes: Option<Vec<Node>>,
}

#[derive(Deserialize)]
struct Node {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "HostName", default)]
    host_name: String,
    #[serde(rename = "IPv4", default)]
    ipv4: String,
    #[serde(rename = "IPv6", default)]
    ipv6: String,
    #[serde(rename = "DERPPort", default)]
    derp_port: i64,
    #[serde(rename = "STUNOnly", default)]
    stun_only: bool,
    #[serde(rename = "InsecureForTests", default)]
    insecure_for_tests: bool,
}

/// The relays in `json`, in failover order, keeping only `regions` (all
/// when empty).
pub fn parse(json: &[u8], regions: &[i64]) -> Result<Vec<RelayTarget>, String> {
    let map: Map = serde_json::from_slice(json).map_err(|e| format!("DERP map: {e}"))?;
    let mut by_id: Vec<(i64, Region)> = map
        .regions
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, r)| {
            let r = r?;
            let id = if r.region_id != 0 {
                r.region_id
            } else {
                k.parse().ok()?
            };
            Some((id, r))
        })
        .filter(|(id, _)| regions.is_empty() || regions.contains(id))
        .collect();
    by_id.sort_by_key(|(id, _)| *id);
    let mut out = Vec::new();
    for (_, region) in by_id {
        for node in region.nodes.unwrap_or_default() {
            if let Some(t) = target(&node) {
                out.push(t);
            }
        }
    }
    if out.is_empty() {
        return Err("DERP map has no DERP node to dial".into());
    }
    Ok(out)
}

fn target(node: &Node) -> Option<RelayTarget> {
    if node.stun_only || node.host_name.is_empty() || node.host_name.contains(['/', '@', ' ']) {
        return None;
    }
    let port = match node.derp_port {
        0 => 443,
        p @ 1..=65535 => p as u16,
        _ => return None,
    };
    let host = if node.host_name.contains(':') {
        format!("[{}]", node.host_name)
    } else {
        node.host_name.clone()
    };
    let fixed = |s: &str| s.parse::<IpAddr>().ok();
    // "IPv4": a literal address is dialed without DNS; any other non-empty
    // string turns that family off.
    let connect_to = fixed(&node.ipv4)
        .filter(IpAddr::is_ipv4)
        .or_else(|| fixed(&node.ipv6).filter(IpAddr::is_ipv6))
        .map(|ip| SocketAddr::new(ip, port));
    Some(RelayTarget {
        name: if node.name.is_empty() {
            node.host_name.clone()
        } else {
            node.name.clone()
        },
        url: format!("https://{host}:{port}"),
        connect_to,
        insecure: node.insecure_for_tests,
    })
}

/// Reads the map at `source` (a path, or an `http(s)://` URL) and returns
/// its relays.
pub async fn load(source: &str, regions: &[i64]) -> Result<Vec<RelayTarget>, String> {
    let bytes = crate::map_source::read(source, || {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Ok(rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth())
    })
    .await?;
    parse(&bytes, regions).map_err(|e| format!("{source}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"{
      "Regions": {
        "901": {"RegionID": 901, "RegionCode": "b", "RegionName": "B", "Nodes": [
          {"Name": "901a", "RegionID": 901, "HostName": "b.example.com", "DERPPort": 8443,
           "IPv4": "198.51.100.7", "IPv6": "none", "InsecureForTests": true}
        ]},
        "900": {"RegionID": 900, "RegionCode": "a", "RegionName": "A", "Nodes": [
          {"Name": "900s", "RegionID": 900, "HostName": "stun.example.com", "STUNOnly": true},
          {"Name": "900a", "RegionID": 900, "HostName": "a.example.com", "Unknown": [1, 2]},
          {"Name": "900b", "RegionID": 900, "HostName": "2001:db8::5", "DERPPort": 99999}
        ]},
        "1": null
      },
      "HomeParams": {"RegionScore": {"900": 0.5}}
    }"#;

    #[test]
    fn nodes_in_map_order_stun_only_and_bad_ports_skipped() {
        let t = parse(MAP.as_bytes(), &[]).unwrap();
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["900a", "901a"]);
        assert_eq!(t[0].url, "https://a.example.com:443");
        assert_eq!(t[0].connect_to, None);
        assert!(!t[0].insecure);
        assert_eq!(t[1].url, "https://b.example.com:8443");
        assert_eq!(t[1].connect_to, Some("198.51.100.7:8443".parse().unwrap()));
        assert!(t[1].insecure);
    }

    #[test]
    fn region_filter_and_empty_maps() {
        let t = parse(MAP.as_bytes(), &[901]).unwrap();
        assert_eq!(t.len(), 1);
        assert!(parse(MAP.as_bytes(), &[5]).is_err());
        assert!(parse(b"{}", &[]).is_err());
        assert!(parse(b"{\"Regions\": null}", &[]).is_err());
        assert!(parse(b"[1,2]", &[]).is_err());
        assert!(parse(b"\xff", &[]).is_err());
    }

    #[tokio::test]
    async fn loads_over_http_and_refuses_error_statuses() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "404 Not Found"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut b).await.unwrap();
                    head.extend_from_slice(&b[..n]);
                }
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{MAP}",
                    MAP.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let url = format!("http://{addr}/derpmap.json");
        assert_eq!(load(&url, &[]).await.unwrap().len(), 2);
        let e = load(&url, &[]).await.unwrap_err();
        assert!(e.contains("404"), "{e}");
    }

    #[tokio::test]
    async fn loads_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.json");
        std::fs::write(&path, MAP).unwrap();
        let t = load(path.to_str().unwrap(), &[]).await.unwrap();
        assert_eq!(t.len(), 2);
        assert!(load("/nonexistent/map.json", &[]).await.is_err());
    }
}
