//! `derpd prober`'s settings: the flags ([`ProberArgs`]) and the checked
//! result they resolve into ([`ProberConfig`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::probe::Kind;

/// Default address of the status page and `/metrics`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9345";

/// `derpd prober`: watch DERP regions from outside.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProberArgs {
    /// The DERP map: a file or an http(s) URL, in Tailscale's DERPMap JSON
    /// (headscale's `derp.urls`, a relay's `/derpmap.json`) or headscale's
    /// YAML `derp.paths` format. Repeat to merge several, later ones
    /// replacing regions of earlier ones.
    #[arg(long = "derp-map", value_name = "FILE|URL", required = true)]
    pub derp_maps: Vec<String>,
    /// Status page (`/`) and Prometheus metrics (`/metrics`) address.
    /// Default 127.0.0.1:9345.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Run every probe once, print a table and exit: 0 if all succeeded,
    /// 1 otherwise.
    #[arg(long)]
    pub once: bool,
    /// Interval of every probe kind without an interval of its own (the
    /// DERP probe's). Default 15s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub interval: Option<Duration>,
    /// Interval of the TLS probes (default: --interval).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub tls_interval: Option<Duration>,
    /// Interval of the STUN probes (default: --interval).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub stun_interval: Option<Duration>,
    /// Interval of the mesh probes (default: --interval).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub mesh_interval: Option<Duration>,
    /// Interval of the bandwidth probes; they run only when set (with
    /// --once: run once when set).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub bw_interval: Option<Duration>,
    /// Bytes per bandwidth burst. Default 1000000.
    #[arg(long, value_name = "BYTES")]
    pub bw_size: Option<usize>,
    /// Timeout of one TLS probe. Default 5s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub tls_timeout: Option<Duration>,
    /// Timeout of one STUN probe. Default 3s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub stun_timeout: Option<Duration>,
    /// Timeout of one DERP probe. Default 5s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub derp_timeout: Option<Duration>,
    /// Timeout of one mesh probe (connecting both clients, waiting for the
    /// path, the round trip). Default 5s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub mesh_timeout: Option<Duration>,
    /// Timeout of one bandwidth probe. Default 30s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub bw_timeout: Option<Duration>,
    /// Only these regions (IDs or region codes, comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "ID|CODE,…")]
    pub regions: Vec<String>,
    /// PEM file of CA certificates trusted besides the system store and the
    /// web PKI roots (private CAs).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
}

/// Durations as `15s`, `500ms`, `1m` (or bare seconds: `15`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        Ok(_) => return Err(format!("{s:?} is not a duration")),
        Err(_) => humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))?,
    };
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

/// What one kind of probe does: how often, and for how long at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    /// Time between two runs of one probe.
    pub interval: Duration,
    /// Longest a run may take.
    pub timeout: Duration,
}

/// The prober's checked settings.
#[derive(Debug, Clone)]
pub struct ProberConfig {
    /// Map sources, merged in order.
    pub derp_maps: Vec<String>,
    /// Regions to keep (all when empty).
    pub regions: Vec<String>,
    /// Extra trusted CAs.
    pub ca_file: Option<PathBuf>,
    /// Status page and metrics address (`None` with `--once`).
    pub listen: Option<SocketAddr>,
    /// Run once and exit.
    pub once: bool,
    /// Per kind; a kind absent here does not run (bandwidth unless asked).
    pub cadence: Vec<(Kind, Cadence)>,
    /// Bytes per bandwidth burst.
    pub bw_size: usize,
}

impl ProberConfig {
    /// When and how long `kind` runs, if it does.
    pub fn cadence(&self, kind: Kind) -> Option<Cadence> {
        self.cadence
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, c)| *c)
    }
}

impl ProberArgs {
    /// Checks the flags and applies the defaults.
    pub fn resolve(&self) -> Result<ProberConfig, String> {
        let s = Duration::from_secs;
        let interval = self.interval.unwrap_or(s(15));
        let every = |o: Option<Duration>| o.unwrap_or(interval);
        let mut cadence = vec![
            (
                Kind::Tls,
                Cadence {
                    interval: every(self.tls_interval),
                    timeout: self.tls_timeout.unwrap_or(s(5)),
                },
            ),
            (
                Kind::Stun4,
                Cadence {
                    interval: every(self.stun_interval),
                    timeout: self.stun_timeout.unwrap_or(s(3)),
                },
            ),
            (
                Kind::Stun6,
                Cadence {
                    interval: every(self.stun_interval),
                    timeout: self.stun_timeout.unwrap_or(s(3)),
                },
            ),
            (
                Kind::Derp,
                Cadence {
                    interval,
                    timeout: self.derp_timeout.unwrap_or(s(5)),
                },
            ),
            (
                Kind::Mesh,
                Cadence {
                    interval: every(self.mesh_interval),
                    timeout: self.mesh_timeout.unwrap_or(s(5)),
                },
            ),
        ];
        if let Some(bw) = self.bw_interval {
            cadence.push((
                Kind::Bandwidth,
                Cadence {
                    interval: bw,
                    timeout: self.bw_timeout.unwrap_or(s(30)),
                },
            ));
        }
        let bw_size = self.bw_size.unwrap_or(1_000_000);
        if bw_size == 0 || bw_size > 1 << 30 {
            return Err("--bw-size: between 1 byte and 1 GiB".into());
        }
        if let Some(p) = &self.ca_file {
            crate::trust::roots(Some(p)).map_err(|e| format!("--ca-file: {e}"))?;
        }
        let listen = if self.once {
            self.listen
        } else {
            Some(
                self.listen
                    .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            )
        };
        Ok(ProberConfig {
            derp_maps: self.derp_maps.clone(),
            regions: self
                .regions
                .iter()
                .filter(|r| !r.trim().is_empty())
                .cloned()
                .collect(),
            ca_file: self.ca_file.clone(),
            listen,
            once: self.once,
            cadence,
            bw_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_defaults() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
        let args = ProberArgs {
            derp_maps: vec!["m.json".into()],
            interval: Some(Duration::from_secs(10)),
            stun_interval: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(
            c.cadence(Kind::Tls).unwrap().interval,
            Duration::from_secs(10)
        );
        assert_eq!(
            c.cadence(Kind::Stun6).unwrap().interval,
            Duration::from_secs(2)
        );
        assert_eq!(c.cadence(Kind::Bandwidth), None);
        assert_eq!(c.listen, Some(DEFAULT_LISTEN.parse().unwrap()));
        let once = ProberArgs {
            once: true,
            bw_interval: Some(Duration::from_secs(60)),
            ..args
        };
        let c = once.resolve().unwrap();
        assert_eq!(c.listen, None);
        assert!(c.cadence(Kind::Bandwidth).is_some());
    }
}
