//! The tunnel's settings: command-line flags ([`TunnelArgs`]), the same
//! settings as a TOML file ([`TunnelFile`]), and the checked result both
//! resolve into ([`TunnelConfig`]). Flags win over the file; peers from
//! both are used together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::proto::{NodePrivate, NodePublic};

/// Default interval between our Pings to the relay.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
/// Default interval between status lines in the log.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(60);
/// Default interval between attempts to move back to a preferred relay.
pub const DEFAULT_FAILBACK: Duration = Duration::from_secs(30);
/// Most peers one tunnel carries.
pub const MAX_PEERS: usize = 1024;

/// `derpd tunnel`: carry plain WireGuard UDP over DERP.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TunnelArgs {
    /// TOML file with the same settings (kebab-case keys, `[[peer]]`
    /// tables). Flags win; peers from both are used.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Relay URL, `http://host:port` or `https://host[:port]`. Repeat for
    /// failover: the first reachable one in order is used.
    #[arg(long = "server", value_name = "URL")]
    pub servers: Vec<String>,
    /// A DERP map (JSON file path or http(s) URL); its DERP nodes, in map
    /// order, are the relays (after any `--server`).
    #[arg(long, value_name = "FILE|URL")]
    pub derp_map: Option<String>,
    /// Only use these region IDs from the DERP map (repeatable).
    #[arg(long = "region", value_name = "ID")]
    pub regions: Vec<i64>,
    /// This tunnel's node key, in derper's key-file format (`derpd keygen
    /// --out FILE` makes one).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// A peer: `nodekey:HEX=LOCAL_ADDR`. WireGuard's `Endpoint` for that
    /// peer is LOCAL_ADDR, a UDP socket this tunnel binds. Repeatable.
    #[arg(long = "peer", value_name = "nodekey:HEX=ADDR")]
    pub peers: Vec<PeerSpec>,
    /// Where the local WireGuard listens: packets from a peer go there
    /// until WireGuard has sent to that peer's socket (from then on, to the
    /// address it last sent from).
    #[arg(long, value_name = "ADDR")]
    pub wg_addr: Option<SocketAddr>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// How often to log a status line (0 = never). Default 60s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub status_interval: Option<Duration>,
    /// How often to ping the relay; a relay silent for twice this long is
    /// dropped and redialed. Default 15s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub keepalive: Option<Duration>,
    /// While on a fallback relay, how often to try the preferred ones
    /// again (0 = stay). Default 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub failback: Option<Duration>,
    /// Do not verify relay TLS certificates (labs only).
    #[arg(long)]
    pub insecure: bool,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
}

/// The TOML form of [`TunnelArgs`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TunnelFile {
    /// Relay URLs in failover order.
    #[serde(default)]
    pub server: Vec<String>,
    /// DERP map file or URL.
    pub derp_map: Option<String>,
    /// Region IDs to use from the DERP map.
    #[serde(default)]
    pub region: Vec<i64>,
    /// Key file.
    pub key_file: Option<PathBuf>,
    /// Local WireGuard address.
    pub wg_addr: Option<SocketAddr>,
    /// Metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Status line interval (`"60s"`, `"0s"`).
    #[serde(default, with = "opt_duration")]
    pub status_interval: Option<Duration>,
    /// Ping interval.
    #[serde(default, with = "opt_duration")]
    pub keepalive: Option<Duration>,
    /// Fail-back interval.
    #[serde(default, with = "opt_duration")]
    pub failback: Option<Duration>,
    /// Skip TLS verification.
    #[serde(default)]
    pub insecure: bool,
    /// Log format.
    pub log_format: Option<String>,
    /// Peers.
    #[serde(default)]
    pub peer: Vec<PeerFile>,
}

/// One `[[peer]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PeerFile {
    /// `nodekey:HEX`.
    pub key: String,
    /// Local UDP address for this peer.
    pub listen: SocketAddr,
    /// Label in metrics and logs (default: the key).
    pub name: Option<String>,
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(s.trim()).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A `--peer nodekey:HEX=ADDR` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer tunnel's node key.
    pub key: NodePublic,
    /// Local UDP address for it.
    pub listen: SocketAddr,
}

impl FromStr for PeerSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (key, addr) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: want nodekey:HEX=IP:PORT"))?;
        let key = key
            .trim()
            .parse()
            .map_err(|e| format!("{key:?}: {e} (want nodekey:<64 hex>)"))?;
        let listen = addr
            .trim()
            .parse()
            .map_err(|e| format!("{addr:?}: {e} (want IP:PORT)"))?;
        Ok(PeerSpec { key, listen })
    }
}

/// Where the relay list comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySources {
    /// `--server` URLs, first.
    pub servers: Vec<String>,
    /// A DERP map file or URL, read again whenever every relay has failed.
    pub derp_map: Option<String>,
    /// Region filter for the DERP map (empty = all).
    pub regions: Vec<i64>,
}

/// One configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its node key.
    pub key: NodePublic,
    /// Local UDP address.
    pub listen: SocketAddr,
    /// Metrics/log label.
    pub name: String,
}

/// Checked tunnel settings.
#[derive(Clone)]
pub struct TunnelConfig {
    /// Our key.
    pub key: NodePrivate,
    /// Relays.
    pub relays: RelaySources,
    /// Peers (at least one, distinct keys and addresses).
    pub peers: Vec<PeerConfig>,
    /// Local WireGuard address, for peers WireGuard has not sent to yet.
    pub wg_addr: Option<SocketAddr>,
    /// Metrics listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Status line interval (None = off).
    pub status_interval: Option<Duration>,
    /// Ping interval.
    pub keepalive: Duration,
    /// Fail-back interval (None = stay on a fallback relay).
    pub failback: Option<Duration>,
    /// Skip TLS verification.
    pub insecure: bool,
}

impl std::fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("key", &self.key.public())
            .field("relays", &self.relays)
            .field("peers", &self.peers)
            .field("wg_addr", &self.wg_addr)
            .field("metrics_listen", &self.metrics_listen)
            .finish_non_exhaustive()
    }
}

impl TunnelConfig {
    /// Settings for `key` and `peers`, everything else default.
    pub fn new(key: NodePrivate, servers: Vec<String>, peers: Vec<PeerConfig>) -> TunnelConfig {
        TunnelConfig {
            key,
            relays: RelaySources {
                servers,
                derp_map: None,
                regions: Vec::new(),
            },
            peers,
            wg_addr: None,
            metrics_listen: None,
            status_interval: Some(DEFAULT_STATUS_INTERVAL),
            keepalive: DEFAULT_KEEPALIVE,
            failback: Some(DEFAULT_FAILBACK),
            insecure: false,
        }
    }
}

impl TunnelArgs {
    /// Reads `--config` (if any) and checks everything; loads the key file.
    pub fn resolve(&self) -> Result<TunnelConfig, String> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => TunnelFile::default(),
        };
        self.merge(file)
    }

    /// The log format asked for (flag, else file).
    pub fn log_format(&self) -> Option<String> {
        self.log_format.clone().or_else(|| {
            self.config
                .as_deref()
                .and_then(|p| read_file(p).ok())
                .and_then(|f| f.log_format)
        })
    }

    fn merge(&self, file: TunnelFile) -> Result<TunnelConfig, String> {
        let servers = if self.servers.is_empty() {
            file.server
        } else {
            self.servers.clone()
        };
        let relays = RelaySources {
            servers,
            derp_map: self.derp_map.clone().or(file.derp_map),
            regions: if self.regions.is_empty() {
                file.region
            } else {
                self.regions.clone()
            },
        };
        for s in &relays.servers {
            check_url(s)?;
        }
        if relays.servers.is_empty() && relays.derp_map.is_none() {
            return Err("no relay: give --server URL or --derp-map FILE|URL".into());
        }
        let key_file = self
            .key_file
            .clone()
            .or(file.key_file)
            .ok_or("--key-file is required (make one with `derpd keygen --out FILE`)")?;
        let key = crate::keyfile::load(&key_file).map_err(|e| e.to_string())?;

        let mut peers: Vec<PeerConfig> = self
            .peers
            .iter()
            .map(|p| PeerConfig {
                key: p.key,
                listen: p.listen,
                name: p.key.to_string(),
            })
            .collect();
        for p in file.peer {
            let key: NodePublic = p
                .key
                .parse()
                .map_err(|e| format!("peer key {:?}: {e}", p.key))?;
            peers.push(PeerConfig {
                key,
                listen: p.listen,
                name: p.name.unwrap_or_else(|| key.to_string()),
            });
        }
        check_peers(&peers, &key.public())?;
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Ok(TunnelConfig {
            key,
            relays,
            peers,
            wg_addr: self.wg_addr.or(file.wg_addr),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            status_interval: nonzero(
                self.status_interval
                    .or(file.status_interval)
                    .unwrap_or(DEFAULT_STATUS_INTERVAL),
            ),
            keepalive: self
                .keepalive
                .or(file.keepalive)
                .unwrap_or(DEFAULT_KEEPALIVE)
                .max(Duration::from_secs(1)),
            failback: nonzero(self.failback.or(file.failback).unwrap_or(DEFAULT_FAILBACK)),
            insecure: self.insecure || file.insecure,
        })
    }
}

fn read_file(path: &Path) -> Result<TunnelFile, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("server {url:?}: want http://host:port or https://host[:port]"))?;
    if rest.split('/').next().unwrap_or("").is_empty() {
        return Err(format!("server {url:?}: no host"));
    }
    Ok(())
}

fn check_peers(peers: &[PeerConfig], own: &NodePublic) -> Result<(), String> {
    if peers.is_empty() {
        return Err("no peers: give --peer nodekey:HEX=IP:PORT".into());
    }
    if peers.len() > MAX_PEERS {
        return Err(format!("at most {MAX_PEERS} peers"));
    }
    for (i, p) in peers.iter().enumerate() {
        if p.key == *own {
            return Err(format!("peer {} is this tunnel's own key", p.key));
        }
        if peers[..i].iter().any(|q| q.key == p.key) {
            return Err(format!("peer {} is listed twice", p.key));
        }
        if p.listen.port() != 0 && peers[..i].iter().any(|q| q.listen == p.listen) {
            return Err(format!("two peers share the local address {}", p.listen));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path) -> (PathBuf, NodePrivate) {
        let path = dir.join("k.json");
        let key = crate::keyfile::create_new(&path).unwrap();
        (path, key)
    }

    #[test]
    fn peer_flag_parses_and_rejects_garbage() {
        let k = NodePrivate::generate().public();
        let p: PeerSpec = format!("{k}=127.0.0.1:5000").parse().unwrap();
        assert_eq!(p.key, k);
        assert_eq!(p.listen, "127.0.0.1:5000".parse().unwrap());
        assert!("nodekey:00=127.0.0.1:1".parse::<PeerSpec>().is_err());
        assert!(format!("{k}").parse::<PeerSpec>().is_err());
        assert!(format!("{k}=localhost").parse::<PeerSpec>().is_err());
    }

    #[test]
    fn toml_and_flags_merge() {
        let dir = tempfile::tempdir().unwrap();
        let (kf, key) = key_file(dir.path());
        let (a, b) = (
            NodePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let toml = format!(
            "key-file = {kf:?}\nserver = [\"http://127.0.0.1:1\", \"https://derp.example.com\"]\n\
             status-interval = \"0s\"\nkeepalive = \"5s\"\n\
             [[peer]]\nkey = \"{a}\"\nlisten = \"127.0.0.1:7001\"\nname = \"fw\"\n"
        );
        let cfg_path = dir.path().join("t.toml");
        std::fs::write(&cfg_path, toml).unwrap();
        let args = TunnelArgs {
            config: Some(cfg_path),
            peers: vec![format!("{b}=127.0.0.1:7002").parse().unwrap()],
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.key.public(), key.public());
        assert_eq!(c.relays.servers.len(), 2);
        assert_eq!(c.peers.len(), 2);
        assert!(c.peers.iter().any(|p| p.key == a && p.name == "fw"));
        assert!(c.peers.iter().any(|p| p.key == b));
        assert_eq!(c.status_interval, None);
        assert_eq!(c.keepalive, Duration::from_secs(5));

        let flags_win = TunnelArgs {
            servers: vec!["http://127.0.0.1:9".into()],
            ..args.clone()
        };
        assert_eq!(
            flags_win.resolve().unwrap().relays.servers,
            vec!["http://127.0.0.1:9"]
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (kf, key) = key_file(dir.path());
        let peer = NodePrivate::generate().public();
        let base = TunnelArgs {
            servers: vec!["http://127.0.0.1:1".into()],
            key_file: Some(kf),
            peers: vec![format!("{peer}=127.0.0.1:7001").parse().unwrap()],
            ..Default::default()
        };
        assert!(base.resolve().is_ok());
        let no_server = TunnelArgs {
            servers: vec![],
            ..base.clone()
        };
        assert!(no_server.resolve().unwrap_err().contains("no relay"));
        let bad_url = TunnelArgs {
            servers: vec!["ftp://x".into()],
            ..base.clone()
        };
        assert!(bad_url.resolve().is_err());
        let no_peers = TunnelArgs {
            peers: vec![],
            ..base.clone()
        };
        assert!(no_peers.resolve().unwrap_err().contains("no peers"));
        let twice = TunnelArgs {
            peers: vec![base.peers[0].clone(), base.peers[0].clone()],
            ..base.clone()
        };
        assert!(twice.resolve().unwrap_err().contains("twice"));
        let own = TunnelArgs {
            peers: vec![format!("{}=127.0.0.1:7001", key.public()).parse().unwrap()],
            ..base.clone()
        };
        assert!(own.resolve().unwrap_err().contains("own key"));
        let no_key = TunnelArgs {
            key_file: Some(dir.path().join("missing")),
            ..base
        };
        assert!(no_key.resolve().is_err());
    }
}
