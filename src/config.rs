//! Configuration: command-line flags and a TOML file (`--config`) with the
//! same keys, flags winning. Everything is validated here, into the typed
//! [`ServerConfig`] the server starts from; a bad value is an error that
//! names its key and says what is expected.
//!
//! File keys are the long flag names: `tcp-write-timeout = "2s"`,
//! `accept-connection-limit = 100.0`, … Unknown keys are errors.
//!
//! Settings flow one way: each part owns its settings type (`RelayConfig`,
//! `Limits`, `TlsSettings`, `MeshSettings`, `CompanionConfig`, …) and this
//! module, at the top, fills them in; no part imports `config`. The
//! companion's and the mesh's keys are resolved in `config/companion.rs` and
//! `config/mesh.rs`, derper's single-dash flags are handled in
//! `config/args.rs`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod args;
mod companion;
mod mesh;

pub use args::go_style_args;
// Each part's own settings types, named here for callers that build a
// `ServerConfig` by hand.
pub use crate::http::listener::Limits;
use crate::relay::{ClientRateLimit, RelayConfig};
pub use crate::tls::{CertMode, TlsSettings};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Every `serve` setting, as flags and as TOML keys. All optional here;
/// defaults are applied in [`Settings::resolve`].
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// TOML config file; flags override its values.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Listen address: `ip:port`, `[ipv6]:port`, or `:port` for every
    /// address. Default 127.0.0.1:3340.
    #[arg(short = 'a', long = "addr")]
    pub addr: Option<String>,
    /// Development mode: 127.0.0.1:3340, plain HTTP, a fresh key each start.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub dev: Option<bool>,
    /// Hostname this relay serves (TLS certificate name). Default localhost.
    #[arg(long)]
    pub hostname: Option<String>,
    /// Private key file (derper format); created with mode 0600 if missing.
    /// Default <state-dir>/derpd.key.
    #[arg(short = 'c', long = "key-file")]
    pub key_file: Option<PathBuf>,
    /// Directory for durable state.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// TLS certificate mode. Default: letsencrypt when the port is 443,
    /// otherwise none (plain HTTP), as Tailscale's derper does.
    #[arg(long, value_enum)]
    pub certmode: Option<CertMode>,
    /// Directory of `<hostname>.crt`/`.key` (manual) or the ACME cache.
    #[arg(long)]
    pub certdir: Option<PathBuf>,
    /// ACME directory URL (letsencrypt mode).
    #[arg(long)]
    pub acme_directory: Option<String>,
    /// ACME account contact e-mail.
    #[arg(long)]
    pub acme_email: Option<String>,
    /// PEM file of extra CA roots trusted for the ACME directory (tests).
    #[arg(long)]
    pub acme_ca_file: Option<PathBuf>,
    /// Plain-HTTP port served next to a TLS listener (probes, ACME
    /// challenges, redirects); -1 disables. Default 80.
    #[arg(long, allow_negative_numbers = true)]
    pub http_port: Option<i32>,
    /// Run the STUN server. Default true.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub stun: Option<bool>,
    /// STUN UDP port on the listen address's IP. Default 3478.
    #[arg(long)]
    pub stun_port: Option<u16>,
    /// Prometheus `/metrics` listen address; "off" disables.
    /// Default 127.0.0.1:9344.
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Serve DERP over WebSocket on /derp. Default true.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub websocket: Option<bool>,
    /// File holding the region's mesh pre-shared key (64 hex digits).
    #[arg(long)]
    pub mesh_psk_file: Option<PathBuf>,
    /// Mesh peers, comma-separated: `host` (dials https://host/derp),
    /// `host/dialhost`, or `http://ip:port` for plain-HTTP labs. The same
    /// list works on every member: a relay skips itself. Needs
    /// --mesh-psk-file.
    #[arg(long)]
    pub mesh_with: Option<String>,
    /// PEM file of CA certificates trusted for mesh peers (in addition to
    /// the system store and the webpki roots).
    #[arg(long)]
    pub mesh_ca_file: Option<PathBuf>,
    /// TCP keepalive idle time of client connections and mesh links (as
    /// derper); 0 disables. Default 10m.
    #[arg(long)]
    pub tcp_keepalive_time: Option<String>,
    /// TCP_USER_TIMEOUT of client connections and mesh links: how long
    /// sent data may go unacknowledged before the kernel drops the
    /// connection (as derper); 0 disables. Default 15s.
    #[arg(long)]
    pub tcp_user_timeout: Option<String>,
    /// Write deadline for regular clients; 0 disables. Default 2s.
    #[arg(long)]
    pub tcp_write_timeout: Option<String>,
    /// Deadline for a client to finish the HTTP request and DERP handshake.
    /// Default 10s.
    #[arg(long)]
    pub handshake_timeout: Option<String>,
    /// Close clients that send nothing for this long; 0 disables (the
    /// default: idle Tailscale clients legitimately send nothing).
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// Close clients that start a frame and do not finish it within this; 0
    /// disables. Default 30s.
    #[arg(long)]
    pub frame_timeout: Option<String>,
    /// Packets queued per destination (regular and disco each). Default 32.
    #[arg(long)]
    pub queue_depth: Option<usize>,
    /// Listen backlog of the DERP and plain-HTTP listeners (capped by the
    /// kernel's net.core.somaxconn). Default 4096.
    #[arg(long)]
    pub listen_backlog: Option<u32>,
    /// Most concurrent connections; 0 = unlimited (the default).
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Handshake steps (TLS, the DERP box, admission) run at once; a step
    /// waits for a free slot, a handshake waiting on its client holds
    /// none. 0 = no bound. Default: half the cores, at least 1.
    #[arg(long)]
    pub handshake_parallelism: Option<usize>,
    /// New connections accepted per second (token bucket); 0 = unlimited.
    #[arg(long)]
    pub accept_connection_limit: Option<f64>,
    /// Burst of the accept-rate bucket. Default: the per-second limit.
    #[arg(long)]
    pub accept_connection_burst: Option<u32>,
    /// Per-client receive limit in bytes/s (0 = off); announced to clients in
    /// ServerInfo. Reloaded on SIGHUP.
    #[arg(long)]
    pub per_client_rate_limit: Option<u64>,
    /// Per-client receive burst in bytes (raised to at least 65568).
    #[arg(long)]
    pub per_client_rate_burst: Option<u64>,
    /// derper-style rate config JSON file
    /// (`{"PerClientRateLimitBytesPerSec":N,"PerClientRateBurstBytes":M}`),
    /// reloaded on SIGHUP; overrides the two settings above.
    #[arg(long)]
    pub rate_config: Option<PathBuf>,
    /// On SIGTERM, how long to wait for clients to leave before exiting.
    /// Default 10s.
    #[arg(long)]
    pub shutdown_timeout: Option<String>,
    /// Reconnect hint sent in the Restarting frame. Default 1s.
    #[arg(long)]
    pub restart_reconnect_in: Option<String>,
    /// How long clients should keep trying, in the Restarting frame.
    /// Default 30s.
    #[arg(long)]
    pub restart_try_for: Option<String>,
    /// Window over which the clients' reconnect delays are spread on
    /// SIGTERM: each client is told `restart-reconnect-in` plus its own
    /// offset in the window, and its connection is closed when that delay
    /// has passed. `0` tells everyone the same and closes at once.
    /// Default 10s.
    #[arg(long)]
    pub restart_reconnect_spread: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// headscale companion: base URL of headscale to sync nodes from
    /// (`GET /api/v1/node`).
    #[arg(long)]
    pub headscale_url: Option<String>,
    /// File holding a headscale API key (`headscale apikeys create > FILE`;
    /// surrounding whitespace is ignored). Re-read on every sync.
    #[arg(long)]
    pub headscale_api_key_file: Option<PathBuf>,
    /// Largest fraction of the cached nodes one headscale answer may remove
    /// at once; a sharper shrink (or one to zero) is applied only after it
    /// was seen on several syncs over `headscale-shrink-confirm`. 1 turns
    /// the guard off. Default 0.5.
    #[arg(long)]
    pub headscale_max_shrink: Option<f64>,
    /// How long a sharp shrink must persist before it is applied. Default
    /// 1m.
    #[arg(long)]
    pub headscale_shrink_confirm: Option<String>,
    /// PEM file of CA certificates the companion's HTTPS client trusts
    /// (headscale, peer relays, the verify URL) besides the system store.
    #[arg(long)]
    pub headscale_ca_file: Option<PathBuf>,
    /// How often to poll headscale; failures back off (with jitter) up to
    /// 60s. Default 10s.
    #[arg(long)]
    pub headscale_poll_interval: Option<String>,
    /// Timeout of one request to headscale or a peer relay. Default 5s.
    #[arg(long)]
    pub headscale_timeout: Option<String>,
    /// Base URLs of peer relays (comma-separated) whose node snapshot is
    /// fetched, with the mesh key, when headscale is unreachable.
    #[arg(long, value_delimiter = ',')]
    pub companion_peers: Option<Vec<String>>,
    /// `headscale`: admit only clients whose key is in the headscale cache
    /// (derper's boolean form, asking a local tailscaled, is not supported;
    /// `false` disables).
    #[arg(long)]
    pub verify_clients: Option<String>,
    /// With `verify-clients headscale`: admit only nodes of these headscale
    /// users (comma-separated) or carrying one of `allow-tags`.
    #[arg(long, value_delimiter = ',')]
    pub allow_users: Option<Vec<String>>,
    /// With `verify-clients headscale`: admit only nodes with one of these
    /// tags (comma-separated) or owned by one of `allow-users`.
    #[arg(long, value_delimiter = ',')]
    pub allow_tags: Option<Vec<String>>,
    /// Admission before any snapshot was ever loaded. Default deny.
    #[arg(long, value_enum)]
    pub admission_when_empty: Option<crate::companion::admission::WhenEmpty>,
    /// Tailscale's admission URL: POST `{"NodePublic":…,"Source":…}`, admit
    /// on 200 `{"Allow":true}`.
    #[arg(long)]
    pub verify_client_url: Option<String>,
    /// Admit when the verify URL is unreachable. Default true (as derper).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub verify_client_url_fail_open: Option<bool>,
    /// Cache verify-URL answers this long; 0 (the default) disables.
    #[arg(long)]
    pub verify_client_url_cache: Option<String>,
    /// DERP map regions file (JSON, or TOML if it ends in .toml) served at
    /// `/derpmap.json`.
    #[arg(long)]
    pub derp_map_file: Option<PathBuf>,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What the TOML parser said (includes the key and position).
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("{key}: {message}")]
    Invalid {
        /// The setting's name.
        key: &'static str,
        /// What is expected.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Default `--restart-reconnect-spread`. A relay's clients come back to
/// the region's other relays over this window: 10,000 clients into two
/// peers is ~500 handshakes/s each, well inside what one relay does while
/// it keeps relaying; and 1 s + 10 s (plus the shutdown timeout for
/// stragglers) fits the 30 s that systemd's unit and Kubernetes give a
/// stopping relay.
pub const DEFAULT_RESTART_SPREAD: Duration = Duration::from_secs(10);

/// What SIGTERM does.
#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    /// How long to wait for clients to leave.
    pub timeout: Duration,
    /// Reconnect hint in the Restarting frame.
    pub reconnect_in: Duration,
    /// Try-for hint in the Restarting frame.
    pub try_for: Duration,
    /// Window over which clients' reconnect delays (and the closing of
    /// their connections) are spread.
    pub spread: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            timeout: Duration::from_secs(10),
            reconnect_in: Duration::from_secs(1),
            try_for: Duration::from_secs(30),
            spread: DEFAULT_RESTART_SPREAD,
        }
    }
}

/// Everything needed to start a relay, validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Main DERP/HTTP(S) listen address.
    pub addr: SocketAddr,
    /// The relay's hostname.
    pub hostname: String,
    /// TLS on the main listener (`None` = plain HTTP).
    pub tls: Option<TlsSettings>,
    /// Plain-HTTP listener next to TLS (`None` = off).
    pub http_addr: Option<SocketAddr>,
    /// STUN listen address (`None` = no STUN).
    pub stun_addr: Option<SocketAddr>,
    /// Metrics listen address (`None` = off).
    pub metrics_addr: Option<SocketAddr>,
    /// Serve DERP over WebSocket.
    pub websocket: bool,
    /// Relay core tunables.
    pub relay: RelayConfig,
    /// Honour `Derp-Fast-Start`.
    pub fast_start: bool,
    /// Listener limits.
    pub limits: Limits,
    /// SIGTERM behaviour.
    pub shutdown: ShutdownSettings,
    /// derper-style rate config file, re-read on SIGHUP.
    pub rate_config: Option<PathBuf>,
    /// Mesh peers to dial.
    pub mesh: crate::mesh::MeshSettings,
    /// The headscale companion (`None`: no companion flag set).
    pub companion: Option<crate::companion::CompanionConfig>,
}

impl ServerConfig {
    /// Loopback, any free port, plain HTTP, no STUN or metrics: for tests.
    pub fn loopback_ephemeral() -> ServerConfig {
        ServerConfig {
            addr: "127.0.0.1:0".parse().expect("valid address"),
            hostname: "localhost".into(),
            tls: None,
            http_addr: None,
            stun_addr: None,
            metrics_addr: None,
            websocket: true,
            relay: RelayConfig::default(),
            fast_start: true,
            limits: Limits::default(),
            shutdown: ShutdownSettings::default(),
            rate_config: None,
            mesh: crate::mesh::MeshSettings::default(),
            companion: None,
        }
    }
}

/// Parses `ip:port`, `[v6]:port` or `:port` (every address, dual-stack).
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("{s:?} has a bad port"))?;
        return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not ip:port, [ipv6]:port or :port"))
}

/// Parses a duration like `2s`, `500ms`, `10m`; a bare `0` is zero.
pub fn parse_duration(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| {
        invalid(
            key,
            format!("{s:?} is not a duration like 2s, 500ms or 10m ({e})"),
        )
    })
}

impl Settings {
    /// `--tcp-keepalive-time` and `--tcp-user-timeout`, derper's defaults
    /// when absent; `0` turns one off.
    fn tcp_timeouts(&self) -> Result<crate::sockopt::TcpTimeouts, ConfigError> {
        let defaults = crate::sockopt::TcpTimeouts::default();
        let opt = |key, v: &Option<String>, default: Option<Duration>| match v {
            None => Ok(default),
            Some(s) => parse_duration(key, s).map(|d| Some(d).filter(|d| !d.is_zero())),
        };
        let t = crate::sockopt::TcpTimeouts {
            keepalive_time: opt(
                "tcp-keepalive-time",
                &self.tcp_keepalive_time,
                defaults.keepalive_time,
            )?,
            user_timeout: opt(
                "tcp-user-timeout",
                &self.tcp_user_timeout,
                defaults.user_timeout,
            )?,
        };
        if t.user_timeout.is_some_and(|d| d < Duration::from_millis(1)) {
            return Err(invalid("tcp-user-timeout", "must be at least 1ms"));
        }
        if t.keepalive_time.is_some_and(|d| d < Duration::from_secs(1)) {
            return Err(invalid(
                "tcp-keepalive-time",
                "must be at least 1s (the kernel counts whole seconds)",
            ));
        }
        Ok(t)
    }
}

/// Reads the derper rate-config JSON file.
pub fn load_rate_config(path: &Path) -> Result<ClientRateLimit, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_rate_config(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

/// Parses the contents of a derper rate-config JSON file.
pub fn parse_rate_config(json: &[u8]) -> Result<ClientRateLimit, String> {
    #[derive(Deserialize)]
    struct RateFile {
        #[serde(rename = "PerClientRateLimitBytesPerSec", default)]
        rate: u64,
        #[serde(rename = "PerClientRateBurstBytes", default)]
        burst: u64,
    }
    let f: RateFile = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    Ok(ClientRateLimit::new(f.rate, f.burst))
}

pub(crate) fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        return PathBuf::from(d);
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(d) => PathBuf::from(d).join("derpd"),
        None => match std::env::var_os("HOME") {
            Some(h) => PathBuf::from(h).join(".local/state/derpd"),
            None => PathBuf::from("/var/lib/derpd"),
        },
    }
}

/// Let's Encrypt's production ACME directory.
pub const LETSENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

macro_rules! overlay {
    ($dst:ident, $src:ident, $($f:ident),* $(,)?) => {
        $( if $dst.$f.is_none() { $dst.$f = $src.$f; } )*
    };
}

impl Settings {
    /// Flags first, then the file named by `--config` (if any).
    pub fn with_file(mut self) -> Result<Settings, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let file: Settings = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        overlay!(
            self,
            file,
            addr,
            dev,
            hostname,
            key_file,
            state_dir,
            certmode,
            certdir,
            acme_directory,
            acme_email,
            acme_ca_file,
            http_port,
            stun,
            stun_port,
            metrics_addr,
            websocket,
            mesh_psk_file,
            mesh_with,
            mesh_ca_file,
            tcp_write_timeout,
            handshake_timeout,
            idle_timeout,
            queue_depth,
            max_connections,
            handshake_parallelism,
            accept_connection_limit,
            accept_connection_burst,
            per_client_rate_limit,
            per_client_rate_burst,
            rate_config,
            shutdown_timeout,
            restart_reconnect_in,
            restart_try_for,
            restart_reconnect_spread,
            log_format,
            headscale_url,
            headscale_api_key_file,
            headscale_poll_interval,
            headscale_timeout,
            companion_peers,
            verify_clients,
            allow_users,
            allow_tags,
            admission_when_empty,
            verify_client_url,
            verify_client_url_fail_open,
            verify_client_url_cache,
            derp_map_file,
        );
        Ok(self)
    }

    /// Whether dev mode is on.
    pub fn is_dev(&self) -> bool {
        self.dev.unwrap_or(false)
    }

    /// The key file path (None in dev mode: the key is ephemeral).
    pub fn key_file_path(&self) -> Option<PathBuf> {
        if self.is_dev() {
            return None;
        }
        Some(self.key_file.clone().unwrap_or_else(|| {
            self.state_dir
                .clone()
                .unwrap_or_else(default_state_dir)
                .join("derpd.key")
        }))
    }

    /// The per-client rate limit from the settings (not the rate file).
    pub fn client_rate(&self) -> Result<ClientRateLimit, ConfigError> {
        if let Some(path) = &self.rate_config {
            return load_rate_config(path);
        }
        Ok(ClientRateLimit::new(
            self.per_client_rate_limit.unwrap_or(0),
            self.per_client_rate_burst.unwrap_or(0),
        ))
    }

    /// Validates everything and applies defaults.
    pub fn resolve(&self) -> Result<ServerConfig, ConfigError> {
        let dev = self.is_dev();
        let addr = match (&self.addr, dev) {
            (Some(a), _) => parse_listen_addr(a).map_err(|m| invalid("addr", m))?,
            (None, _) => "127.0.0.1:3340".parse().expect("valid"),
        };
        let hostname = self.hostname.clone().unwrap_or_else(|| "localhost".into());
        if hostname.is_empty() {
            return Err(invalid("hostname", "must not be empty"));
        }
        let mode = match self.certmode {
            Some(m) => m,
            None if addr.port() == 443 && !dev => CertMode::Letsencrypt,
            None => CertMode::None,
        };
        if dev && mode != CertMode::None {
            return Err(invalid("certmode", "dev mode serves plain HTTP only"));
        }
        let tls = (mode != CertMode::None).then(|| TlsSettings {
            mode,
            certdir: self.certdir.clone().unwrap_or_else(|| {
                self.state_dir
                    .clone()
                    .unwrap_or_else(default_state_dir)
                    .join("certs")
            }),
            acme_directory: self
                .acme_directory
                .clone()
                .unwrap_or_else(|| LETSENCRYPT_DIRECTORY.into()),
            acme_email: self.acme_email.clone(),
            acme_ca_file: self.acme_ca_file.clone(),
        });
        let http_port = self.http_port.unwrap_or(80);
        let http_addr = match http_port {
            -1 => None,
            p if (0..=65535).contains(&p) => {
                tls.as_ref().map(|_| SocketAddr::new(addr.ip(), p as u16))
            }
            p => {
                return Err(invalid(
                    "http-port",
                    format!("{p} is not a port (0-65535) or -1 to disable"),
                ))
            }
        };
        let stun_addr = self
            .stun
            .unwrap_or(true)
            .then(|| SocketAddr::new(addr.ip(), self.stun_port.unwrap_or(3478)));
        let metrics_addr = match self.metrics_addr.as_deref().unwrap_or("127.0.0.1:9344") {
            "off" | "" => None,
            a => Some(parse_listen_addr(a).map_err(|m| invalid("metrics-addr", m))?),
        };
        let dur = |key, v: &Option<String>, default: &str| {
            parse_duration(key, v.as_deref().unwrap_or(default))
        };
        let write_timeout = dur("tcp-write-timeout", &self.tcp_write_timeout, "2s")?;
        let handshake_timeout = dur("handshake-timeout", &self.handshake_timeout, "10s")?;
        if handshake_timeout.is_zero() {
            return Err(invalid("handshake-timeout", "must be greater than 0"));
        }
        let idle_timeout = dur("idle-timeout", &self.idle_timeout, "0")?;
        let frame_timeout = dur("frame-timeout", &self.frame_timeout, "30s")?;
        let queue_depth = self.queue_depth.unwrap_or(32);
        if !(1..=65_536).contains(&queue_depth) {
            return Err(invalid("queue-depth", "must be between 1 and 65536"));
        }
        let accept_per_sec = self.accept_connection_limit.unwrap_or(0.0);
        if !accept_per_sec.is_finite() || accept_per_sec < 0.0 {
            return Err(invalid(
                "accept-connection-limit",
                "must be a non-negative number of connections per second (0 = unlimited)",
            ));
        }
        let accept_burst = self
            .accept_connection_burst
            .unwrap_or(accept_per_sec.ceil().max(1.0) as u32);
        if accept_per_sec > 0.0 && accept_burst == 0 {
            return Err(invalid("accept-connection-burst", "must be at least 1"));
        }
        let client_rate = self.client_rate()?;
        let shutdown = ShutdownSettings {
            timeout: dur("shutdown-timeout", &self.shutdown_timeout, "10s")?,
            reconnect_in: dur("restart-reconnect-in", &self.restart_reconnect_in, "1s")?,
            try_for: dur("restart-try-for", &self.restart_try_for, "30s")?,
            spread: dur(
                "restart-reconnect-spread",
                &self.restart_reconnect_spread,
                "10s",
            )?,
        };
        Ok(ServerConfig {
            addr,
            hostname,
            tls,
            http_addr,
            stun_addr,
            metrics_addr,
            websocket: self.websocket.unwrap_or(true),
            relay: RelayConfig {
                queue_depth,
                write_timeout: (!write_timeout.is_zero()).then_some(write_timeout),
                handshake_timeout,
                idle_timeout: (!idle_timeout.is_zero()).then_some(idle_timeout),
                frame_timeout: (!frame_timeout.is_zero()).then_some(frame_timeout),
                client_rate,
                handshake_parallelism: match self.handshake_parallelism {
                    None => Some(crate::relay::gate::default_parallelism()),
                    Some(0) => None,
                    Some(n) => Some(n),
                },
                ..RelayConfig::default()
            },
            fast_start: true,
            limits: Limits {
                max_connections: self.max_connections.unwrap_or(0),
                accept_per_sec,
                accept_burst,
                tcp: self.tcp_timeouts()?,
                listen_backlog: match self.listen_backlog {
                    None => crate::http::listener::DEFAULT_BACKLOG,
                    Some(0) => return Err(invalid("listen-backlog", "must be at least 1")),
                    Some(n) => n,
                },
            },
            shutdown,
            rate_config: self.rate_config.clone(),
            mesh: crate::mesh::MeshSettings::resolve(self)?,
            companion: companion::resolve(self)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(s: &str) -> Result<Settings, String> {
        toml::from_str::<Settings>(s).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_a_loopback_plain_relay() {
        let c = Settings::default().resolve().unwrap();
        assert_eq!(c.addr, "127.0.0.1:3340".parse().unwrap());
        assert!(c.tls.is_none());
        assert_eq!(c.stun_addr, Some("127.0.0.1:3478".parse().unwrap()));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9344".parse().unwrap()));
        assert_eq!(c.relay.write_timeout, Some(Duration::from_secs(2)));
        assert!(c.http_addr.is_none());
    }

    #[test]
    fn port_443_defaults_to_letsencrypt_like_derper() {
        let s = Settings {
            addr: Some(":443".into()),
            ..Default::default()
        };
        let c = s.resolve().unwrap();
        assert_eq!(c.tls.unwrap().mode, CertMode::Letsencrypt);
        assert_eq!(c.http_addr.unwrap().port(), 80);
    }

    #[test]
    fn file_keys_are_flag_names_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("derpd.toml");
        std::fs::write(
            &path,
            "addr = \"127.0.0.1:8443\"\nqueue-depth = 64\ntcp-write-timeout = \"5s\"\naccept-connection-limit = 50.0\n",
        )
        .unwrap();
        let flags = Settings {
            config: Some(path),
            queue_depth: Some(8),
            ..Default::default()
        };
        let c = flags.with_file().unwrap().resolve().unwrap();
        assert_eq!(c.addr.port(), 8443);
        assert_eq!(c.relay.queue_depth, 8);
        assert_eq!(c.relay.write_timeout, Some(Duration::from_secs(5)));
        assert_eq!(c.limits.accept_per_sec, 50.0);
        assert_eq!(c.limits.accept_burst, 50);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = from_toml("qeue-depth = 3").unwrap_err();
        assert!(e.contains("qeue-depth"), "{e}");
        let e = from_toml("stun-port = \"x\"").unwrap_err();
        assert!(e.contains("stun-port"), "{e}");
        let s = from_toml("tcp-write-timeout = \"soon\"").unwrap();
        let e = s.resolve().unwrap_err().to_string();
        assert!(e.starts_with("tcp-write-timeout:"), "{e}");
        let s = from_toml("queue-depth = 0").unwrap();
        assert!(s
            .resolve()
            .unwrap_err()
            .to_string()
            .starts_with("queue-depth:"));
        let s = from_toml("http-port = 70000").unwrap();
        assert!(s
            .resolve()
            .unwrap_err()
            .to_string()
            .starts_with("http-port:"));
        let s = from_toml("addr = \"nowhere\"").unwrap();
        assert!(s.resolve().unwrap_err().to_string().starts_with("addr:"));
        let s = from_toml("accept-connection-limit = -1.0").unwrap();
        assert!(s
            .resolve()
            .unwrap_err()
            .to_string()
            .starts_with("accept-connection-limit:"));
        let e = from_toml("certmode = \"sometimes\"").unwrap_err();
        assert!(e.contains("certmode"), "{e}");
    }

    #[test]
    fn rate_config_file_in_derper_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rate.json");
        std::fs::write(
            &p,
            r#"{"PerClientRateLimitBytesPerSec":1250000,"PerClientRateBurstBytes":10}"#,
        )
        .unwrap();
        let r = load_rate_config(&p).unwrap();
        assert_eq!(r.bytes_per_sec, 1_250_000);
        assert_eq!(r.burst, 65_568);
        std::fs::write(&p, "{}").unwrap();
        assert!(!load_rate_config(&p).unwrap().is_enabled());
        std::fs::write(&p, "not json").unwrap();
        assert!(load_rate_config(&p).is_err());
        assert!(load_rate_config(&dir.path().join("missing")).is_err());
    }
}
