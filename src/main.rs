//! The `derpd` command: `serve` (the default), `keygen`, `probe`, `bench`,
//! `tunnel`, `prober`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use derpd::config::{LogFormat, Settings};
use derpd::proto::{MeshKey, NodePrivate};
use derpd::server::Server;

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
    Serve(Box<Settings>),
    /// Print a new node private key and its public key, or a mesh key.
    Keygen {
        /// Print a 64-hex mesh pre-shared key instead.
        #[arg(long)]
        mesh: bool,
        /// Write a new key file (derper's format, mode 0600) and print its
        /// public `nodekey:…`.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["mesh", "public"])]
        out: Option<std::path::PathBuf>,
        /// Print the public `nodekey:…` of an existing key file.
        #[arg(long, value_name = "FILE", conflicts_with = "mesh")]
        public: Option<std::path::PathBuf>,
    },
    /// Carry plain WireGuard UDP to peers over DERP.
    Tunnel(Box<derpd::tunnel::TunnelArgs>),
    /// Load-test any DERP relay: packets/s, Gbit/s, loss, latency, server CPU.
    Bench(Box<derpd::bench::BenchOptions>),
    /// Watch DERP regions from outside: every node (TLS, STUN, DERP) and
    /// every mesh pair, as Prometheus metrics and a status page.
    Prober(Box<derpd::prober::ProberArgs>),
    /// Check a relay end to end: two clients exchange a packet through it.
    Probe {
        /// Relay URL, e.g. http://127.0.0.1:3340
        url: String,
    },
    /// (tests) Write companion snapshots in a loop until killed.
    #[command(hide = true)]
    CompanionStoreTorture {
        /// Where the snapshot database lives.
        #[arg(long)]
        state_dir: std::path::PathBuf,
        /// Nodes per snapshot.
        #[arg(long, default_value_t = 500)]
        nodes: usize,
    },
}

/// Colour (ANSI escape sequences) in the log only when standard error is a
/// terminal and `NO_COLOR` is unset or empty (<https://no-color.org>):
/// journald, `kubectl logs`, `docker logs` and log files get plain text.
fn log_colour() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(log_colour())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match derpd::rlimit::last_raise() {
        Some(Ok(r)) => tracing::debug!(
            before = r.before,
            soft = r.soft,
            hard = r.hard,
            "open-file limit (RLIMIT_NOFILE): soft limit set to the hard limit"
        ),
        Some(Err(e)) => tracing::debug!(error = %e, "raising the open-file limit failed"),
        None => {}
    }
}

async fn serve(flags: Settings, malloc_note: Option<String>) -> Result<(), String> {
    let settings = flags.clone().with_file().map_err(|e| e.to_string())?;
    init_logging(settings.log_format.unwrap_or_default());
    if let Some(note) = malloc_note {
        tracing::warn!("{note}");
    }
    let config = settings.resolve().map_err(|e| e.to_string())?;
    let key = match settings.key_file_path() {
        None => NodePrivate::generate(),
        Some(path) => derpd::keyfile::load_or_create(&path).map_err(|e| e.to_string())?,
    };
    let mesh_key = match &settings.mesh_psk_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("mesh-psk-file {}: {e}", p.display()))?;
            Some(MeshKey::from_hex(&text).map_err(|_| {
                format!(
                    "mesh-psk-file {}: must hold exactly 64 hex digits",
                    p.display()
                )
            })?)
        }
        None => None,
    };
    tracing::info!(hostname = %config.hostname, "starting");
    let server = Server::start(config, key, mesh_key)
        .await
        .map_err(|e| e.to_string())?;

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading rate limits and certificates");
                match flags.clone().with_file().and_then(|s| s.client_rate()) {
                    Ok(rate) => server.reload(Some(rate)),
                    Err(e) => {
                        tracing::error!(error = %e, "reload failed; keeping the old settings");
                        server.reload(None);
                    }
                }
            }
        }
    }
    tracing::info!("shutting down gracefully");
    server.shutdown_gracefully().await;
    tracing::info!("stopped");
    Ok(())
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

/// `derpd prober`: with `--once`, the table and exit code 1 if any probe
/// failed; otherwise probe until SIGINT/SIGTERM.
async fn prober(args: &derpd::prober::ProberArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("derpd: {e}");
            return ExitCode::from(2);
        }
    };
    if config.once {
        return match derpd::prober::run_once(&config).await {
            Ok(report) => {
                print!("{}", report.table);
                if report.failed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("derpd: {e}");
                ExitCode::from(2)
            }
        };
    }
    let running = match derpd::prober::start(&config).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("derpd: {e}");
            return ExitCode::from(2);
        }
    };
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    running.shutdown().await;
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(derpd::config::go_style_args(std::env::args_os()));
    // The relay runs with glibc's per-thread malloc caches off, so memory
    // comes back after a crowd leaves (derpd::memory): set for the process
    // by executing it again, first thing, before any thread exists.
    let malloc_note = match cli.command {
        None | Some(Command::Serve(_)) => derpd::memory::reexec_with_tunables(),
        _ => None,
    };
    // As Go's runtime does: every subcommand may use as many file
    // descriptors as the hard limit allows (logged once logging is set up).
    let _ = derpd::rlimit::raise_nofile();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Serve(Box::default()));
    // The tunnel runs on one thread: its tasks hand batches to each other,
    // and cross-thread wake-ups would cost more than they gain.
    let rt = match command {
        Command::Tunnel(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .expect("tokio runtime");
    let result = match command {
        Command::Serve(settings) => rt.block_on(serve(*settings, malloc_note)),
        Command::Keygen {
            out: Some(path), ..
        } => derpd::keyfile::create_new(&path)
            .map(|k| println!("{}", k.public()))
            .map_err(|e| e.to_string()),
        Command::Keygen {
            public: Some(path), ..
        } => derpd::keyfile::load(&path)
            .map(|k| println!("{}", k.public()))
            .map_err(|e| e.to_string()),
        Command::Tunnel(args) => {
            match args.log_format().as_deref() {
                None | Some("text") => init_logging(LogFormat::Text),
                Some("json") => init_logging(LogFormat::Json),
                Some(other) => {
                    eprintln!("derpd: log-format {other:?}: want text or json");
                    return ExitCode::FAILURE;
                }
            }
            rt.block_on(derpd::tunnel::run(*args))
        }
        Command::Keygen { mesh, .. } => {
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
        Command::Prober(args) => {
            match args.log_format.as_deref() {
                None | Some("text") => init_logging(LogFormat::Text),
                Some("json") => init_logging(LogFormat::Json),
                Some(other) => {
                    eprintln!("derpd: log-format {other:?}: want text or json");
                    return ExitCode::FAILURE;
                }
            }
            return rt.block_on(prober(&args));
        }
        Command::CompanionStoreTorture { state_dir, nodes } => {
            derpd::companion::store::torture(&state_dir, nodes)
        }
        Command::Bench(opts) => rt.block_on(async {
            let report = derpd::bench::run(&opts).await?;
            if opts.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializes")
                );
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("derpd: {e}");
            ExitCode::FAILURE
        }
    }
}
