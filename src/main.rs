//! The `derpd` command: `serve`, `keygen`, `probe`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use derpd::proto::{MeshKey, NodePrivate};
use derpd::relay::RelayConfig;
use derpd::server::{Server, ServerConfig};

/// derpd: a high-performance DERP relay and headscale companion.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (the default). With no flags: plain HTTP on 127.0.0.1:3340.
    Serve(ServeArgs),
    /// Print a new node private key and its public key, or a mesh key.
    Keygen {
        /// Print a 64-hex mesh pre-shared key instead.
        #[arg(long)]
        mesh: bool,
    },
    /// Check a relay end to end: two clients exchange a packet through it.
    Probe {
        /// Relay URL, e.g. http://127.0.0.1:3340
        url: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Listen address: `ip:port`, `[ipv6]:port`, or `:port` for every address.
    /// Default 127.0.0.1:3340.
    #[arg(short = 'a', long = "addr")]
    addr: Option<String>,
    /// Development mode: 127.0.0.1:3340, plain HTTP, a fresh key each start.
    #[arg(long)]
    dev: bool,
    /// Hostname this relay serves (for TLS and the DERP map).
    #[arg(long, default_value = "localhost")]
    hostname: String,
    /// Private key file (derper format); created with mode 0600 if missing.
    /// Default: <state-dir>/derpd.key
    #[arg(short = 'c', long = "key-file")]
    key_file: Option<PathBuf>,
    /// Directory for durable state (the key file by default).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// File holding the region's mesh pre-shared key (64 hex digits).
    #[arg(long)]
    mesh_psk_file: Option<PathBuf>,
    /// STUN UDP port on the listen address's IP; 0 picks any free port.
    #[arg(long, default_value_t = 3478)]
    stun_port: u16,
    /// Run the STUN server.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    stun: bool,
    /// Prometheus metrics listen address (serves /metrics); "off" disables.
    #[arg(long, default_value = "127.0.0.1:9344")]
    metrics_addr: String,
    /// Per-frame write deadline for regular clients; 0 disables.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    tcp_write_timeout: Duration,
    /// Packets queued per destination client (regular and disco each).
    #[arg(long, default_value_t = 32)]
    queue_depth: usize,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 2s, 500ms or 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `ip:port`, `[v6]:port` or `:port` (all addresses, dual-stack).
fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("listen address {s:?}: bad port"))?;
        return Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
    }
    s.parse()
        .map_err(|_| format!("listen address {s:?}: want ip:port, [ipv6]:port or :port"))
}

fn default_state_dir() -> PathBuf {
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    init_logging(args.log_format);
    let addr = match (&args.addr, args.dev) {
        (Some(a), _) => parse_listen_addr(a)?,
        (None, _) => "127.0.0.1:3340".parse().expect("valid"),
    };
    let key = if args.dev {
        NodePrivate::generate()
    } else {
        let path = args.key_file.clone().unwrap_or_else(|| {
            args.state_dir
                .clone()
                .unwrap_or_else(default_state_dir)
                .join("derpd.key")
        });
        derpd::keyfile::load_or_create(&path).map_err(|e| e.to_string())?
    };
    let mesh_key = match &args.mesh_psk_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("--mesh-psk-file {}: {e}", p.display()))?;
            Some(MeshKey::from_hex(&text).map_err(|_| {
                format!(
                    "--mesh-psk-file {}: must hold exactly 64 hex digits",
                    p.display()
                )
            })?)
        }
        None => None,
    };
    let metrics_addr = match args.metrics_addr.as_str() {
        "off" | "" => None,
        a => Some(parse_listen_addr(a).map_err(|e| format!("--metrics-addr: {e}"))?),
    };
    let config = ServerConfig {
        addr,
        stun_addr: args
            .stun
            .then(|| SocketAddr::new(addr.ip(), args.stun_port)),
        metrics_addr,
        relay: RelayConfig {
            queue_depth: args.queue_depth.max(1),
            write_timeout: (!args.tcp_write_timeout.is_zero()).then_some(args.tcp_write_timeout),
            ..RelayConfig::default()
        },
        fast_start: true,
    };
    tracing::info!(hostname = %args.hostname, "starting");
    let server = Server::start(config, key, mesh_key)
        .await
        .map_err(|e| e.to_string())?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn probe(url: &str) -> Result<(), String> {
    use derpd::client::Client;
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let start = std::time::Instant::now();
    let mut a = Client::connect(url, &ka).await.map_err(|e| e.to_string())?;
    let mut b = Client::connect(url, &kb).await.map_err(|e| e.to_string())?;
    let payload = b"derpd probe";
    a.send_packet(kb.public(), payload)
        .await
        .map_err(|e| e.to_string())?;
    let got = tokio::time::timeout(Duration::from_secs(5), b.recv_packet())
        .await
        .map_err(|_| "no packet within 5s".to_string())?
        .map_err(|e| e.to_string())?;
    if got.0 != ka.public() || &got.1[..] != payload {
        return Err("packet arrived altered".into());
    }
    println!(
        "ok: relay {} delivered a packet in {:?}",
        a.server_key(),
        start.elapsed()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let command = match cli.command {
        Some(c) => c,
        None => Cli::parse_from(["derpd", "serve"])
            .command
            .expect("serve parses"),
    };
    let result = match command {
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Keygen { mesh } => {
            if mesh {
                println!("{}", MeshKey::generate().to_hex());
            } else {
                let k = NodePrivate::generate();
                println!("{}", k.to_text());
                eprintln!("public: {}", k.public());
            }
            Ok(())
        }
        Command::Probe { url } => rt.block_on(probe(&url)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("derpd: {e}");
            ExitCode::FAILURE
        }
    }
}
