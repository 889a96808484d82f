//! `derpd prober`: a DERP region watched from outside, as its clients see
//! it. For every node of the map: a TLS handshake and the certificate's
//! expiry ([`tls`]), a STUN binding ([`stun`]), a DERP connection and a
//! packet to itself ([`derp`]); for every ordered pair of nodes of a
//! region: a packet from a client on one to a client on the other, which
//! only arrives if the two relays are meshed ([`mesh`]), and optionally a
//! burst for throughput ([`bandwidth`]). Results go to Prometheus metrics
//! ([`metrics`]) and a status page ([`status`], served by [`http`]), or
//! with `--once` to a table and the exit code.
//!
//! The prober is a client of the protocol, like [`crate::tunnel`]: it
//! builds on [`crate::proto`], [`crate::client`] and the pure STUN codec,
//! never on the relay, and nothing it does is specific to derpd, so
//! Tailscale's derper is probed the same way. [`map`] reads the DERP map,
//! [`dial`] reaches a node, [`schedule`] decides what runs when, and
//! [`settings`] holds the flags.

pub mod bandwidth;
pub mod derp;
pub mod dial;
pub mod http;
pub mod map;
pub mod mesh;
pub mod metrics;
pub mod probe;
pub mod schedule;
pub mod settings;
pub mod status;
pub mod stun;
pub mod tls;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use settings::{ProberArgs, ProberConfig};

/// What a finished `--once` run found.
pub struct Report {
    /// The table to print.
    pub table: String,
    /// Probes that failed.
    pub failed: usize,
}

/// A running prober (not `--once`).
pub struct Prober {
    /// Where the status page and `/metrics` are served.
    pub addr: Option<std::net::SocketAddr>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Prober {
    /// Stops probing and serving.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Loads the map and plans the probes, with the shared TLS settings.
async fn prepare(
    config: &ProberConfig,
) -> Result<(Vec<schedule::Planned>, dial::TlsConfigs), String> {
    let tls = dial::TlsConfigs::new(config.ca_file.as_deref())?;
    let map = map::load(
        &config.derp_maps,
        &config.regions,
        config.ca_file.as_deref(),
    )
    .await?;
    let plan = schedule::plan(&map, config);
    tracing::info!(
        regions = map.regions.len(),
        nodes = map.regions.iter().map(|r| r.nodes.len()).sum::<usize>(),
        probes = plan.len(),
        "DERP map loaded"
    );
    Ok((plan, tls))
}

fn sink(status: Arc<status::Status>, metrics: Arc<metrics::ProberMetrics>) -> schedule::Sink {
    Arc::new(move |id, o| {
        status.record(id, o);
        metrics.record(id, o);
    })
}

async fn listen(
    config: &ProberConfig,
    status: &Arc<status::Status>,
    metrics: &Arc<metrics::ProberMetrics>,
    stop: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<Option<std::net::SocketAddr>, String> {
    let Some(addr) = config.listen else {
        return Ok(None);
    };
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--listen {addr}: {e}"))?;
    let bound = l.local_addr().map_err(|e| e.to_string())?;
    tasks.spawn(http::serve(
        l,
        status.clone(),
        metrics.clone(),
        stop.clone(),
    ));
    Ok(Some(bound))
}

/// `--once`: runs every probe once and reports.
pub async fn run_once(config: &ProberConfig) -> Result<Report, String> {
    let (plan, tls) = prepare(config).await?;
    let status = Arc::new(status::Status::new(plan.iter().map(|p| p.id.clone())));
    let metrics = Arc::new(metrics::ProberMetrics::new());
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    listen(config, &status, &metrics, &stop, &mut tasks).await?;
    schedule::run_once(plan, tls, sink(status.clone(), metrics.clone())).await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(Report {
        table: status.table(),
        failed: status.failing(),
    })
}

/// Starts probing at the configured intervals and serving the status page.
pub async fn start(config: &ProberConfig) -> Result<Prober, String> {
    let (plan, tls) = prepare(config).await?;
    let status = Arc::new(status::Status::new(plan.iter().map(|p| p.id.clone())));
    let metrics = Arc::new(metrics::ProberMetrics::new());
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let addr = listen(config, &status, &metrics, &stop, &mut tasks).await?;
    if let Some(a) = addr {
        tracing::info!(addr = %a, "status page at http://{a}/, metrics at /metrics");
    }
    tasks.spawn(schedule::run_forever(
        plan,
        tls,
        sink(status, metrics),
        stop.clone(),
    ));
    Ok(Prober { addr, stop, tasks })
}
