//! The DERP map the prober watches, read from files or http(s) URLs in
//! either of headscale's formats: Tailscale's DERPMap JSON (what
//! `derp.urls` point at and `/derpmap.json` serves) or headscale's YAML
//! `derp.paths` files (the same fields with lower-case keys, integer region
//! keys). Several sources merge in order, a later region replacing an
//! earlier one with the same ID and a `null` region removing it, as
//! headscale documents. Only what a client needs to reach a node is kept.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

/// The STUN port of a node whose map entry says 0.
pub const DEFAULT_STUN_PORT: u16 = 3478;

/// The regions to probe, by ascending region ID.
#[derive(Debug, Clone, PartialEq)]
pub struct DerpMap {
    /// Regions with at least one node.
    pub regions: Vec<Region>,
}

/// One region.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// `RegionID`.
    pub id: i64,
    /// `RegionCode` (may be empty).
    pub code: String,
    /// `RegionName` (may be empty).
    pub name: String,
    /// Nodes in map order.
    pub nodes: Vec<Node>,
}

impl Region {
    /// The `region` label: the region code, or the ID when it has none.
    pub fn label(&self) -> String {
        if self.code.is_empty() {
            self.id.to_string()
        } else {
            self.code.clone()
        }
    }
}

/// How a node is reached in one address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Resolve `HostName` (the field is empty).
    Dns,
    /// Dial this address, no DNS.
    Fixed(IpAddr),
    /// Never use this family (any other string, conventionally `none`).
    Off,
}

/// One node.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// `Name` (unique in the map; `HostName` when empty).
    pub name: String,
    /// TLS server name and, unless `IPv4`/`IPv6` fix an address, what is
    /// resolved.
    pub host_name: String,
    /// Name to verify instead of `HostName`, or `sha256-raw:<hex>` to pin a
    /// self-signed certificate; empty for the usual check.
    pub cert_name: String,
    /// `IPv4`.
    pub ipv4: Family,
    /// `IPv6`.
    pub ipv6: Family,
    /// STUN port; `None` when `STUNPort` is negative (no STUN).
    pub stun_port: Option<u16>,
    /// Runs STUN only: no DERP, no TLS, no mesh.
    pub stun_only: bool,
    /// DERP (TLS) port.
    pub derp_port: u16,
    /// Tests only: DERP over plain HTTP (or TLS without verification).
    pub insecure_for_tests: bool,
}

#[derive(Deserialize)]
struct RawMap {
    #[serde(rename = "Regions", alias = "regions", default)]
    regions: Option<BTreeMap<RegionKey, Option<RawRegion>>>,
}

/// A region key: a decimal string in JSON, an integer in YAML.
#[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(untagged)]
enum RegionKey {
    Int(i64),
    Text(String),
}

#[derive(Deserialize)]
struct RawRegion {
    #[serde(rename = "RegionID", alias = "regionid", default)]
    region_id: i64,
    #[serde(rename = "RegionCode", alias = "regioncode", default)]
    region_code: Option<String>,
    #[serde(rename = "RegionName", alias = "regionname", default)]
    region_name: Option<String>,
    #[serde(rename = "Nodes", alias = "nodes", default)]
    nodes: Option<Vec<RawNode>>,
}

#[derive(Deserialize)]
struct RawNode {
    #[serde(rename = "Name", alias = "name", default)]
    name: Option<String>,
    #[serde(rename = "HostName", alias = "hostname", default)]
    host_name: Option<String>,
    #[serde(rename = "CertName", alias = "certname", default)]
    cert_name: Option<String>,
    #[serde(rename = "IPv4", alias = "ipv4", default)]
    ipv4: Option<String>,
    #[serde(rename = "IPv6", alias = "ipv6", default)]
    ipv6: Option<String>,
    #[serde(rename = "STUNPort", alias = "stunport", default)]
    stun_port: Option<i64>,
    #[serde(rename = "STUNOnly", alias = "stunonly", default)]
    stun_only: Option<bool>,
    #[serde(rename = "DERPPort", alias = "derpport", default)]
    derp_port: Option<i64>,
    #[serde(rename = "InsecureForTests", alias = "insecurefortests", default)]
    insecure_for_tests: Option<bool>,
}

/// Regions of one source by ID; `None` removes a region.
type Partial = BTreeMap<i64, Option<Region>>;

/// Parses one source: DERPMap JSON, or headscale's YAML.
pub fn parse(text: &[u8]) -> Result<Partial, String> {
    let raw: RawMap = match serde_json::from_slice(text) {
        Ok(m) => m,
        Err(json) => serde_yaml_ng::from_slice(text).map_err(|yaml| {
            let looks_json = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
            if looks_json {
                format!("not a DERP map (JSON: {json})")
            } else {
                format!("not a DERP map (YAML: {yaml})")
            }
        })?,
    };
    let mut out = BTreeMap::new();
    for (key, region) in raw.regions.unwrap_or_default() {
        let key_id = match &key {
            RegionKey::Int(i) => Some(*i),
            RegionKey::Text(s) => s.trim().parse().ok(),
        };
        let Some(region) = region else {
            if let Some(id) = key_id {
                out.insert(id, None);
            }
            continue;
        };
        let id = if region.region_id != 0 {
            region.region_id
        } else {
            key_id.ok_or("a region has neither a numeric key nor a RegionID")?
        };
        let mut nodes = Vec::new();
        for n in region.nodes.unwrap_or_default() {
            nodes.push(node(n).map_err(|e| format!("region {id}: {e}"))?);
        }
        out.insert(
            id,
            Some(Region {
                id,
                code: region.region_code.unwrap_or_default(),
                name: region.region_name.unwrap_or_default(),
                nodes,
            }),
        );
    }
    if out.is_empty() {
        return Err("not a DERP map: no regions".into());
    }
    Ok(out)
}

fn node(n: RawNode) -> Result<Node, String> {
    let host_name = n.host_name.unwrap_or_default().trim().to_owned();
    if host_name.is_empty() || host_name.contains(['/', '@', ' ']) {
        return Err(format!(
            "node {:?}: HostName {host_name:?} is not a host name",
            n.name.unwrap_or_default()
        ));
    }
    let name = n
        .name
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| host_name.clone());
    let family = |s: Option<String>, v4: bool| -> Family {
        match s.as_deref().map(str::trim) {
            None | Some("") => Family::Dns,
            Some(t) => match t.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == v4 => Family::Fixed(ip),
                _ => Family::Off,
            },
        }
    };
    let stun_port = match n.stun_port.unwrap_or(0) {
        0 => Some(DEFAULT_STUN_PORT),
        p @ 1..=65535 => Some(p as u16),
        p if p < 0 => None,
        p => return Err(format!("node {name}: STUNPort {p} is not a port")),
    };
    let derp_port = match n.derp_port.unwrap_or(0) {
        0 => 443,
        p @ 1..=65535 => p as u16,
        p => return Err(format!("node {name}: DERPPort {p} is not a port")),
    };
    Ok(Node {
        ipv4: family(n.ipv4, true),
        ipv6: family(n.ipv6, false),
        cert_name: n.cert_name.unwrap_or_default(),
        stun_port,
        stun_only: n.stun_only.unwrap_or(false),
        derp_port,
        insecure_for_tests: n.insecure_for_tests.unwrap_or(false),
        name,
        host_name,
    })
}

/// Merges parsed sources in order and keeps the regions `select` names
/// (IDs or codes; all when empty).
pub fn merge(sources: Vec<Partial>, select: &[String]) -> Result<DerpMap, String> {
    let mut all: BTreeMap<i64, Region> = BTreeMap::new();
    for s in sources {
        for (id, r) in s {
            match r {
                Some(r) => all.insert(id, r),
                None => all.remove(&id),
            };
        }
    }
    let matches = |s: &str, r: &Region| {
        let s = s.trim();
        s == r.id.to_string() || (!r.code.is_empty() && s.eq_ignore_ascii_case(&r.code))
    };
    for s in select {
        if !all.values().any(|r| matches(s, r)) {
            return Err(format!("--regions: no region {s:?} in the DERP map"));
        }
    }
    let wanted = |r: &Region| select.is_empty() || select.iter().any(|s| matches(s, r));
    let regions: Vec<Region> = all
        .into_values()
        .filter(|r| wanted(r) && !r.nodes.is_empty())
        .collect();
    if regions.is_empty() {
        return Err("the DERP map has no node to probe".into());
    }
    let mut names = HashSet::new();
    for r in &regions {
        for n in &r.nodes {
            if !names.insert(n.name.as_str()) {
                return Err(format!(
                    "node name {:?} appears twice (names label metrics; they must be unique)",
                    n.name
                ));
            }
        }
    }
    Ok(DerpMap { regions })
}

/// Reads every source (paths or `http(s)://` URLs, fetched trusting the
/// system store, the web PKI roots and `ca_file`) and merges them.
pub async fn load(
    sources: &[String],
    select: &[String],
    ca_file: Option<&Path>,
) -> Result<DerpMap, String> {
    let mut parsed = Vec::new();
    for source in sources {
        let bytes = crate::map_source::read(source, || {
            crate::trust::client_config(ca_file).map_err(|e| e.to_string())
        })
        .await?;
        parsed.push(parse(&bytes).map_err(|e| format!("DERP map {source}: {e}"))?);
    }
    merge(parsed, select)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{
      "Regions": {
        "901": {"RegionID": 901, "RegionCode": "b", "RegionName": "B", "Nodes": [
          {"Name": "901a", "RegionID": 901, "HostName": "b.example.com", "DERPPort": 8443,
           "IPv4": "198.51.100.7", "IPv6": "none", "STUNPort": -1, "InsecureForTests": true}
        ]},
        "900": {"RegionID": 900, "RegionCode": "a", "RegionName": "A", "Nodes": [
          {"Name": "900s", "RegionID": 900, "HostName": "stun.example.com", "STUNOnly": true},
          {"Name": "900a", "RegionID": 900, "HostName": "a.example.com", "Unknown": [1, 2],
           "IPv6": "2001:db8::1", "STUNPort": 3479}
        ]},
        "1": null
      },
      "HomeParams": {"RegionScore": {"900": 0.5}}
    }"#;

    const YAML: &str = "regions:\n  900:\n    regionid: 900\n    regioncode: a\n    \
        regionname: A\n    nodes:\n      - name: 900a\n        regionid: 900\n        \
        hostname: a.example.com\n        ipv4: 198.51.100.1\n        ipv6: \"2001:db8::1\"\n        \
        stunport: 0\n        derpport: 0\n        canport80: true\n  1: null\n";

    #[test]
    fn json_maps_keep_what_a_client_dials_with() {
        let m = merge(vec![parse(JSON.as_bytes()).unwrap()], &[]).unwrap();
        let ids: Vec<i64> = m.regions.iter().map(|r| r.id).collect();
        assert_eq!(ids, [900, 901]);
        let a = &m.regions[0].nodes;
        assert_eq!(a[0].name, "900s");
        assert!(a[0].stun_only);
        assert_eq!(a[0].stun_port, Some(3478));
        assert_eq!(a[1].ipv4, Family::Dns);
        assert_eq!(a[1].ipv6, Family::Fixed("2001:db8::1".parse().unwrap()));
        assert_eq!(a[1].stun_port, Some(3479));
        assert_eq!(a[1].derp_port, 443);
        let b = &m.regions[1].nodes[0];
        assert_eq!(b.ipv4, Family::Fixed("198.51.100.7".parse().unwrap()));
        assert_eq!(b.ipv6, Family::Off);
        assert_eq!(b.stun_port, None);
        assert_eq!(b.derp_port, 8443);
        assert!(b.insecure_for_tests);
        assert_eq!(m.regions[1].label(), "b");
    }

    #[test]
    fn headscale_yaml_paths_files_are_read() {
        let m = merge(vec![parse(YAML.as_bytes()).unwrap()], &[]).unwrap();
        assert_eq!(m.regions.len(), 1);
        let n = &m.regions[0].nodes[0];
        assert_eq!(n.name, "900a");
        assert_eq!(n.host_name, "a.example.com");
        assert_eq!(n.ipv4, Family::Fixed("198.51.100.1".parse().unwrap()));
        assert_eq!(n.stun_port, Some(3478));
        assert_eq!(n.derp_port, 443);
    }

    #[test]
    fn later_sources_win_null_removes_and_regions_select() {
        let both = || {
            vec![
                parse(JSON.as_bytes()).unwrap(),
                parse(YAML.as_bytes()).unwrap(),
            ]
        };
        let m = merge(both(), &[]).unwrap();
        assert_eq!(
            m.regions[0].nodes.len(),
            1,
            "the YAML region 900 replaced the JSON one"
        );
        let drop = parse(br#"{"Regions": {"901": null}}"#).unwrap();
        let m = merge(vec![parse(JSON.as_bytes()).unwrap(), drop], &[]).unwrap();
        assert_eq!(m.regions.len(), 1);
        let m = merge(both(), &["b".into()]).unwrap();
        assert_eq!(m.regions[0].id, 901);
        let m = merge(both(), &["900".into()]).unwrap();
        assert_eq!(m.regions[0].id, 900);
        assert!(merge(both(), &["nowhere".into()]).is_err());
    }

    #[test]
    fn bad_maps_are_errors() {
        for bad in [
            &b"{}"[..],
            b"{\"Regions\": null}",
            b"[1, 2]",
            b"\xff\xfe",
            b"regions: 3",
            br#"{"Regions": {"9": {"Nodes": [{"Name": "x", "HostName": ""}]}}}"#,
            br#"{"Regions": {"9": {"Nodes": [{"Name": "x", "HostName": "h", "DERPPort": 70000}]}}}"#,
        ] {
            let r = parse(bad).and_then(|p| merge(vec![p], &[]));
            assert!(r.is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let dup = br#"{"Regions": {"9": {"Nodes": [{"Name": "x", "HostName": "h"},
            {"Name": "x", "HostName": "i"}]}}}"#;
        let e = merge(vec![parse(dup).unwrap()], &[]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    #[tokio::test]
    async fn loads_files_and_urls() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("derp.yaml");
        std::fs::write(&path, YAML).unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).await.unwrap();
                head.extend_from_slice(&b[..n]);
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{JSON}",
                JSON.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
        });
        let sources = [
            format!("http://{addr}/derpmap.json"),
            path.to_str().unwrap().to_owned(),
        ];
        let m = load(&sources, &[], None).await.unwrap();
        assert_eq!(m.regions.len(), 2);
        assert!(load(&["/nonexistent/map.json".into()], &[], None)
            .await
            .is_err());
    }
}
