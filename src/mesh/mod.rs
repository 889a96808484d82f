//! The mesh: relays of one region that act as one relay.
//!
//! Every relay dials every other one ([`link`]) as a DERP client with its
//! own key and the region's mesh key, subscribes to their connect and
//! disconnect events (WatchConns), and keeps a forwarding table of which
//! key is behind which link ([`forwarders`], [`table`]). A SendPacket to a
//! key that is not local but known through a link goes out on that link as
//! ForwardPacket, through a bounded queue ([`queue`]) so a slow peer never
//! stalls a sender. The server side of the mesh (WatchConns, ClosePeer,
//! ForwardPacket from peers) lives in [`crate::relay`].

pub mod dial;
pub mod forwarders;
pub mod link;
pub mod metrics;
pub mod queue;
pub mod table;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub use dial::PeerSpec;
pub use link::LinkState;
use link::{Link, LinkCtx, LinkStatus};
use queue::ForwardQueue;
pub use table::RemoteTable;

use crate::proto::{MeshKey, NodePrivate};
use crate::relay::Shared;

/// Default bound of each link's outbound queue, in packets.
pub const DEFAULT_LINK_QUEUE: usize = 2048;

static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

/// How this relay recognises itself in the peer list, and how links dial.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// This relay's `--hostname`: an entry naming it (on our port) is skipped.
    pub hostname: String,
    /// Port of this relay's DERP listener.
    pub port: u16,
    /// Extra CA certificates (PEM) trusted for peers' certificates.
    pub ca_file: Option<PathBuf>,
    /// Packets queued per link before the oldest is dropped.
    pub queue_cap: usize,
    /// Keepalive and user timeout of link connections.
    pub tcp: crate::sockopt::TcpTimeouts,
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            hostname: String::new(),
            port: 0,
            ca_file: None,
            queue_cap: DEFAULT_LINK_QUEUE,
            tcp: crate::sockopt::TcpTimeouts::default(),
        }
    }
}

/// Validated mesh settings (`--mesh-with`, `--mesh-ca-file`).
#[derive(Debug, Clone, Default)]
pub struct MeshSettings {
    /// Peers to dial (this relay may be among them).
    pub peers: Vec<PeerSpec>,
    /// Extra CA certificates for peers.
    pub ca_file: Option<PathBuf>,
}

impl MeshSettings {
    /// Reads and checks the mesh flags.
    pub fn resolve(
        s: &crate::config::Settings,
    ) -> Result<MeshSettings, crate::config::ConfigError> {
        let invalid = |key, message| crate::config::ConfigError::Invalid { key, message };
        let peers = PeerSpec::parse_list(s.mesh_with.as_deref().unwrap_or(""))
            .map_err(|m| invalid("mesh-with", m))?;
        if !peers.is_empty() && s.mesh_psk_file.is_none() {
            return Err(invalid(
                "mesh-with",
                "meshing requires a mesh key: set --mesh-psk-file".into(),
            ));
        }
        if let Some(p) = &s.mesh_ca_file {
            dial::tls_config(Some(p)).map_err(|m| invalid("mesh-ca-file", m))?;
        }
        Ok(MeshSettings {
            peers,
            ca_file: s.mesh_ca_file.clone(),
        })
    }
}

/// The mesh links of one relay.
pub struct Mesh {
    key: NodePrivate,
    mesh_key: Option<MeshKey>,
    links: Mutex<Vec<Arc<Link>>>,
}

impl Mesh {
    /// No links yet; `key` is the relay's own key.
    pub fn new(key: NodePrivate, mesh_key: Option<MeshKey>) -> Mesh {
        Mesh {
            key,
            mesh_key,
            links: Mutex::new(Vec::new()),
        }
    }
}

/// Control of a relay's mesh (from [`crate::relay::Relay::mesh`]).
pub struct MeshHandle {
    shared: Arc<Shared>,
}

impl MeshHandle {
    /// A handle on `shared`'s mesh.
    pub fn new(shared: Arc<Shared>) -> MeshHandle {
        MeshHandle { shared }
    }

    /// Replaces the peer list: stops current links and dials every listed
    /// peer except this relay. Returns how many links were started.
    pub fn set_peers(&self, peers: &[PeerSpec], opts: &MeshOptions) -> Result<usize, String> {
        let mesh = &self.shared.mesh;
        let Some(mesh_key) = mesh.mesh_key.clone() else {
            return Err("meshing requires a mesh key (--mesh-psk-file)".into());
        };
        let tls = dial::tls_config(opts.ca_file.as_deref())?;
        let ctx = Arc::new(LinkCtx {
            key: mesh.key.clone(),
            mesh_key,
            tls,
            tcp: opts.tcp,
        });
        self.stop();
        let metrics = &self.shared.registry.remote.metrics;
        let mut links = mesh.links.lock();
        for spec in peers {
            if is_self(spec, opts) {
                tracing::debug!(peer = %spec.name, "skipping this relay in the mesh list");
                continue;
            }
            let id = NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed);
            let label = [spec.name.as_str()];
            let link = Arc::new(Link {
                spec: spec.clone(),
                id,
                queue: Arc::new(ForwardQueue::new(
                    id,
                    opts.queue_cap,
                    metrics.link_dropped.with_label_values(&label),
                    metrics.link_queued.with_label_values(&label),
                )),
                status: Mutex::new(LinkStatus {
                    state: LinkState::Connecting,
                    peer_key: None,
                    last_error: None,
                    connects: 0,
                    up_since: None,
                }),
                cancel: self.shared.shutdown.child_token(),
            });
            metrics.link_up.with_label_values(&label).set(0);
            metrics.link_reconnects.with_label_values(&label);
            tokio::spawn(link::run(self.shared.clone(), link.clone(), ctx.clone()));
            links.push(link);
        }
        tracing::info!(links = links.len(), "mesh peers set");
        Ok(links.len())
    }

    /// Stops every link (their keys are forgotten as they stop).
    pub fn stop(&self) {
        for l in self.shared.mesh.links.lock().drain(..) {
            l.cancel.cancel();
        }
    }

    /// How many links are connected.
    pub fn links_up(&self) -> usize {
        self.shared
            .mesh
            .links
            .lock()
            .iter()
            .filter(|l| l.status.lock().state == LinkState::Up)
            .count()
    }

    /// Each link's peer, state and most recent failure, for `/readyz`.
    pub fn link_summaries(&self) -> Vec<(String, LinkState, Option<String>)> {
        self.shared
            .mesh
            .links
            .lock()
            .iter()
            .map(|l| {
                let s = l.status.lock();
                (l.spec.name.clone(), s.state, s.last_error.clone())
            })
            .collect()
    }

    /// Keys known through mesh peers.
    pub fn remote_keys(&self) -> usize {
        self.shared.registry.remote.len()
    }

    /// JSON status for `/debug/mesh`.
    pub fn status(&self) -> serde_json::Value {
        let remote = &self.shared.registry.remote;
        let peers: Vec<_> = self
            .shared
            .mesh
            .links
            .lock()
            .iter()
            .map(|l| {
                let s = l.status.lock().clone();
                serde_json::json!({
                    "peer": l.spec.name,
                    "url": l.spec.url(),
                    "dial": l.spec.dial,
                    "state": s.state.as_str(),
                    "peer_key": s.peer_key.map(|k| k.to_string()),
                    "remote_keys": remote.keys_on(l.id),
                    "queued": l.queue.len(),
                    "connects": s.connects,
                    "up_seconds": s.up_since.map(|t| t.elapsed().as_secs()),
                    "last_error": s.last_error,
                })
            })
            .collect();
        serde_json::json!({
            "enabled": self.shared.mesh.mesh_key.is_some(),
            "self_key": self.shared.public_key.to_string(),
            "local_keys": self.shared.registry.len(),
            "remote_keys": remote.len(),
            "peers": peers,
        })
    }
}

/// Whether `spec` names this relay: same hostname and the same port.
fn is_self(spec: &PeerSpec, opts: &MeshOptions) -> bool {
    !opts.hostname.is_empty()
        && spec.host.eq_ignore_ascii_case(&opts.hostname)
        && (opts.port == 0 || spec.port == opts.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_itself_by_hostname_and_port() {
        let opts = MeshOptions {
            hostname: "derp1.example.com".into(),
            port: 443,
            ..Default::default()
        };
        let p = |s| PeerSpec::parse(s).unwrap();
        assert!(is_self(&p("derp1.example.com"), &opts));
        assert!(is_self(&p("DERP1.example.com/10.0.0.1"), &opts));
        assert!(!is_self(&p("derp2.example.com"), &opts));
        assert!(!is_self(&p("derp1.example.com:8443"), &opts));
        assert!(!is_self(&p("derp1.example.com"), &MeshOptions::default()));
    }

    #[test]
    fn mesh_with_needs_a_mesh_key() {
        let mut s = crate::config::Settings {
            mesh_with: Some("derp1.example.com,derp2.example.com/10.0.0.2".into()),
            ..Default::default()
        };
        let e = MeshSettings::resolve(&s).unwrap_err().to_string();
        assert!(e.starts_with("mesh-with:"), "{e}");
        s.mesh_psk_file = Some("/nonexistent".into());
        assert_eq!(MeshSettings::resolve(&s).unwrap().peers.len(), 2);
        s.mesh_with = Some("host:xx".into());
        assert!(MeshSettings::resolve(&s).is_err());
    }
}
