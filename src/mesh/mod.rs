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
//!
//! The relay knows nothing of all this: [`Mesh`] implements the relay's
//! [`RemoteKeys`] seam and is attached to it with [`Mesh::attach`]; links
//! reach the relay through its public API only. [`MeshExt::mesh`] gives the
//! control handle of a relay's mesh.

pub mod dial;
pub mod forwarders;
pub mod link;
pub mod metrics;
pub mod queue;
pub mod table;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

pub use dial::PeerSpec;
pub use link::LinkState;
use link::{Link, LinkCtx, LinkStatus};
use queue::ForwardQueue;
pub use table::RemoteTable;

use crate::proto::{MeshKey, NodePrivate, NodePublic};
use crate::relay::conn::ConnId;
use crate::relay::registry::SentTo;
use crate::relay::{Relay, RemoteKeys};

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

/// The mesh of one relay: its links to peers and the table of keys they
/// have. Implements the relay's [`RemoteKeys`] seam.
pub struct Mesh {
    key: NodePrivate,
    mesh_key: Option<MeshKey>,
    links: Mutex<Vec<Arc<Link>>>,
    /// Keys connected to mesh peers, and the link to each.
    pub table: RemoteTable,
}

impl Mesh {
    /// Makes `relay`'s mesh (no links yet) and attaches it to the relay;
    /// `key` is the relay's own key (links identify as the relay). Registers
    /// the mesh metrics. Fails if the relay already has remote keys attached.
    pub fn attach(
        relay: &Relay,
        key: NodePrivate,
        mesh_key: Option<MeshKey>,
    ) -> Result<Arc<Mesh>, String> {
        let mesh = Arc::new(Mesh {
            key,
            mesh_key,
            links: Mutex::new(Vec::new()),
            table: RemoteTable::new(relay.metrics()),
        });
        relay
            .attach_remote(mesh.clone())
            .map_err(|_| "the relay already has a mesh".to_string())?;
        Ok(mesh)
    }
}

/// The mesh answers for the keys in its table.
impl RemoteKeys for Mesh {
    #[inline]
    fn forward(&self, src: NodePublic, dst: NodePublic, payload: Bytes) -> Result<(), Bytes> {
        RemoteKeys::forward(&self.table, src, dst, payload)
    }

    fn note_receiver(&self, src: NodePublic, dst: NodePublic, conn: ConnId) {
        RemoteKeys::note_receiver(&self.table, src, dst, conn)
    }

    fn local_key_left(&self, key: NodePublic, receivers: SentTo) -> SentTo {
        RemoteKeys::local_key_left(&self.table, key, receivers)
    }

    fn contains(&self, key: &NodePublic) -> bool {
        RemoteKeys::contains(&self.table, key)
    }

    fn len(&self) -> usize {
        RemoteKeys::len(&self.table)
    }
}

/// The mesh of a [`Relay`], from the relay.
pub trait MeshExt {
    /// Control of the relay's mesh links: set peers, read status.
    fn mesh(&self) -> MeshHandle;
}

impl MeshExt for Relay {
    fn mesh(&self) -> MeshHandle {
        MeshHandle {
            mesh: self.shared().registry.remote.get::<Mesh>(),
            relay: self.clone(),
        }
    }
}

/// Control of a relay's mesh (from [`MeshExt::mesh`]). A relay without an
/// attached [`Mesh`] has no links and cannot get any.
pub struct MeshHandle {
    relay: Relay,
    mesh: Option<Arc<Mesh>>,
}

impl MeshHandle {
    /// Replaces the peer list: stops current links and dials every listed
    /// peer except this relay. Returns how many links were started.
    pub fn set_peers(&self, peers: &[PeerSpec], opts: &MeshOptions) -> Result<usize, String> {
        let no_key = || "meshing requires a mesh key (--mesh-psk-file)".to_string();
        let mesh = self.mesh.as_ref().ok_or_else(no_key)?;
        let mesh_key = mesh.mesh_key.clone().ok_or_else(no_key)?;
        let tls = dial::tls_config(opts.ca_file.as_deref())?;
        let ctx = Arc::new(LinkCtx {
            key: mesh.key.clone(),
            mesh_key,
            tls,
            tcp: opts.tcp,
        });
        self.stop();
        let metrics = &mesh.table.metrics;
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
                cancel: self.relay.shared().shutdown.child_token(),
            });
            metrics.link_up.with_label_values(&label).set(0);
            metrics.link_reconnects.with_label_values(&label);
            tokio::spawn(link::run(
                self.relay.clone(),
                mesh.clone(),
                link.clone(),
                ctx.clone(),
            ));
            links.push(link);
        }
        tracing::info!(links = links.len(), "mesh peers set");
        Ok(links.len())
    }

    /// The links, if there is a mesh.
    fn links(&self) -> Vec<Arc<Link>> {
        self.mesh
            .as_ref()
            .map(|m| m.links.lock().clone())
            .unwrap_or_default()
    }

    /// Stops every link (their keys are forgotten as they stop).
    pub fn stop(&self) {
        if let Some(mesh) = &self.mesh {
            for l in mesh.links.lock().drain(..) {
                l.cancel.cancel();
            }
        }
    }

    /// How many links are connected.
    pub fn links_up(&self) -> usize {
        self.links()
            .iter()
            .filter(|l| l.status.lock().state == LinkState::Up)
            .count()
    }

    /// Each link's peer, state and most recent failure, for `/readyz`.
    pub fn link_summaries(&self) -> Vec<(String, LinkState, Option<String>)> {
        self.links()
            .iter()
            .map(|l| {
                let s = l.status.lock();
                (l.spec.name.clone(), s.state, s.last_error.clone())
            })
            .collect()
    }

    /// Keys known through mesh peers.
    pub fn remote_keys(&self) -> usize {
        self.relay.shared().registry.remote.len()
    }

    /// JSON status for `/debug/mesh`.
    pub fn status(&self) -> serde_json::Value {
        let table = self.mesh.as_ref().map(|m| &m.table);
        let peers: Vec<_> = self
            .links()
            .iter()
            .map(|l| {
                let s = l.status.lock().clone();
                serde_json::json!({
                    "peer": l.spec.name,
                    "url": l.spec.url(),
                    "dial": l.spec.dial,
                    "state": s.state.as_str(),
                    "peer_key": s.peer_key.map(|k| k.to_string()),
                    "remote_keys": table.map_or(0, |t| t.keys_on(l.id)),
                    "queued": l.queue.len(),
                    "connects": s.connects,
                    "up_seconds": s.up_since.map(|t| t.elapsed().as_secs()),
                    "last_error": s.last_error,
                })
            })
            .collect();
        let shared = self.relay.shared();
        serde_json::json!({
            "enabled": self.mesh.as_ref().is_some_and(|m| m.mesh_key.is_some()),
            "self_key": shared.public_key.to_string(),
            "local_keys": shared.registry.len(),
            "remote_keys": shared.registry.remote.len(),
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
}
