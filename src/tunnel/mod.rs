//! `derpd tunnel`: plain WireGuard over DERP, for hosts that run the
//! kernel module, wireguard-go or boringtun instead of tailscaled.
//!
//! Each configured peer (a remote tunnel's node key) gets a local UDP
//! socket; the local WireGuard's `Endpoint` for that peer points at it.
//! Datagrams WireGuard sends there travel to the peer's key as DERP packets
//! ([`forward::pump_local`]); DERP packets from that key come out of the
//! same socket to wherever WireGuard last sent from ([`forward::Inbound`]).
//! Packets from keys that are not configured are dropped and counted. One
//! relay connection ([`relay::RelayLoop`]) carries everything, failing over
//! between relays and redialing with backoff.
//!
//! This is a client of the DERP protocol: it builds on [`crate::proto`] and
//! [`crate::client`], never on the relay itself.

pub mod derpmap;
pub mod forward;
pub mod metrics;
pub mod peers;
pub mod relay;
pub mod settings;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use metrics::{DropReason, TunnelMetrics};
pub use settings::{PeerConfig, TunnelArgs, TunnelConfig};

use crate::proto::NodePublic;

/// Frame batches queued from the local side to the relay connection.
const OUTBOUND_QUEUE: usize = 256;

/// A running tunnel.
pub struct Tunnel {
    public: NodePublic,
    metrics: Arc<TunnelMetrics>,
    peers: Arc<peers::PeerTable>,
    metrics_addr: Option<SocketAddr>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Tunnel {
    /// Binds every local socket (and the metrics listener), then starts
    /// carrying packets. Errors are about binding; relays that cannot be
    /// reached are retried in the background.
    pub async fn start(config: TunnelConfig) -> Result<Tunnel, String> {
        let metrics = Arc::new(TunnelMetrics::new());
        let peers = Arc::new(peers::PeerTable::bind(&config.peers, &metrics)?);
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let metrics_addr = match config.metrics_listen {
            Some(addr) => {
                let l = metrics::bind(addr).await?;
                let bound = l.local_addr().map_err(|e| e.to_string())?;
                tasks.spawn(metrics::serve(l, metrics.clone(), stop.clone()));
                Some(bound)
            }
            None => None,
        };

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        for p in peers.iter() {
            tasks.spawn(forward::pump_local(
                p.clone(),
                tx.clone(),
                metrics.clone(),
                stop.clone(),
            ));
        }
        drop(tx);

        let inbound = forward::Inbound::new(peers.clone(), metrics.clone(), config.wg_addr);
        let relay = relay::RelayLoop::new(
            relay::RelaySettings {
                key: config.key.clone(),
                sources: config.relays.clone(),
                insecure: config.insecure,
                keepalive: config.keepalive,
                failback: config.failback,
            },
            metrics.clone(),
            inbound,
            rx,
            stop.clone(),
        );
        tasks.spawn(relay.run());

        if let Some(every) = config.status_interval {
            let list = peers
                .iter()
                .map(|p| (p.name.clone(), p.counters.clone()))
                .collect();
            tasks.spawn(metrics::log_status(
                metrics.clone(),
                list,
                every,
                stop.clone(),
            ));
        }

        Ok(Tunnel {
            public: config.key.public(),
            metrics,
            peers,
            metrics_addr,
            stop,
            tasks,
        })
    }

    /// This tunnel's node key (what its peers configure).
    pub fn public_key(&self) -> NodePublic {
        self.public
    }

    /// The local UDP address for `peer` (WireGuard's `Endpoint`).
    pub fn local_addr(&self, peer: &NodePublic) -> Option<SocketAddr> {
        let i = self.peers.lookup(peer)?;
        self.peers.get(i).socket.local_addr().ok()
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<TunnelMetrics> {
        &self.metrics
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The status line (as logged periodically).
    pub fn status_line(&self) -> String {
        let list: Vec<_> = self
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.counters.clone()))
            .collect();
        metrics::status_line(&self.metrics, &list)
    }

    /// Stops every task and closes every socket.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// `derpd tunnel`: resolves the settings, runs until SIGTERM or Ctrl-C.
pub async fn run(args: TunnelArgs) -> Result<(), String> {
    let config = args.resolve()?;
    let tunnel = Tunnel::start(config.clone()).await?;
    tracing::info!(key = %tunnel.public_key(), "tunnel started");
    for p in &config.peers {
        tracing::info!(
            peer = %p.name,
            key = %p.key,
            endpoint = %tunnel.local_addr(&p.key).map(|a| a.to_string()).unwrap_or_default(),
            "peer: point WireGuard's Endpoint here"
        );
    }
    if let Some(a) = tunnel.metrics_addr() {
        tracing::info!(addr = %a, "metrics at /metrics");
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!(status = %tunnel.status_line(), "tunnel stopping");
    tunnel.shutdown().await;
    Ok(())
}
