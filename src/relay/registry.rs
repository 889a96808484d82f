//! Who is connected: node keys → connections, duplicate-connection policy,
//! mesh watchers, and (through the [`Remote`] seam) keys connected to mesh
//! peers.
//!
//! Packet routing only reads the sharded map (no global lock). Membership
//! changes (connect, disconnect, a watcher subscribing) additionally take one
//! mutex so that watchers see connect/disconnect events in a consistent order.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

pub use super::conn::SentTo;
use super::conn::{ClientConn, ConnId};
use super::remote::Remote;
use crate::metrics::Metrics;
use crate::proto::{Frame, NodePublic, PeerGoneReason};

/// Most activity-history entries kept per duplicated key.
const MAX_HISTORY: usize = 32;

/// The connections of one key.
struct ClientSet {
    conns: Vec<Arc<ClientConn>>,
    /// The connection that receives packets for the key.
    active: Arc<ClientConn>,
    /// Every registration and every change of sender, newest last: who
    /// takes over when the active connection leaves.
    history: Vec<ConnId>,
    /// Destinations of closed duplicates, kept until the key leaves.
    sent_to: HashMap<NodePublic, ConnId>,
}

/// The registry of connected clients.
pub struct Registry {
    clients: DashMap<NodePublic, ClientSet>,
    watchers: Mutex<HashMap<ConnId, Arc<ClientConn>>>,
    metrics: Arc<Metrics>,
    /// Keys connected to mesh peers, and how to forward to them (empty
    /// until the mesh attaches itself).
    pub remote: Remote,
}

impl Registry {
    /// An empty registry.
    pub fn new(metrics: Arc<Metrics>) -> Registry {
        Registry {
            clients: DashMap::new(),
            watchers: Mutex::new(HashMap::new()),
            remote: Remote::new(),
            metrics,
        }
    }

    /// Runs `f` under the membership lock (the one connects, disconnects and
    /// watcher subscriptions take), so mesh table changes see a consistent
    /// set of local keys.
    pub fn with_membership<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = self.watchers.lock();
        f()
    }

    /// Queues PeerGone(`key`, Disconnected) to each listed connection that
    /// is still connected.
    pub fn send_peer_gone(&self, key: NodePublic, to: SentTo) {
        let gone = Frame::PeerGone {
            key,
            reason: PeerGoneReason::Disconnected,
        };
        for (dst, id) in to {
            if let Some(c) = self.conn(&dst, id) {
                c.outbox.push_control(gone.clone());
            }
        }
    }

    /// The connection that receives packets for `key`, if it is connected here.
    #[inline]
    pub fn lookup(&self, key: &NodePublic) -> Option<Arc<ClientConn>> {
        self.clients.get(key).map(|set| set.active.clone())
    }

    /// The connection `id` of `key`, if it is still connected.
    pub fn conn(&self, key: &NodePublic, id: ConnId) -> Option<Arc<ClientConn>> {
        let set = self.clients.get(key)?;
        set.conns.iter().find(|c| c.id == id).cloned()
    }

    /// Whether `key` has a local connection.
    pub fn is_local(&self, key: &NodePublic) -> bool {
        self.clients.contains_key(key)
    }

    /// Number of distinct keys connected.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether nobody is connected.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Gives back the map capacity left over from a crowd that is gone
    /// (called after many connections left).
    pub fn shrink(&self) {
        self.clients.shrink_to_fit();
    }

    /// Every connection (for shutdown and status).
    pub fn all_conns(&self) -> Vec<Arc<ClientConn>> {
        self.clients.iter().flat_map(|s| s.conns.clone()).collect()
    }

    /// Adds a handshaken connection. A key that is already connected keeps
    /// its old connections; the new one becomes active.
    pub fn register(&self, conn: Arc<ClientConn>) {
        let watchers = self.watchers.lock();
        let m = &self.metrics;
        match self.clients.entry(conn.key) {
            dashmap::Entry::Vacant(v) => {
                v.insert(ClientSet {
                    conns: vec![conn.clone()],
                    active: conn.clone(),
                    history: Vec::new(),
                    sent_to: HashMap::new(),
                });
            }
            dashmap::Entry::Occupied(mut o) => {
                let set = o.get_mut();
                m.dup_client_conns_total.inc();
                if set.conns.len() == 1 {
                    let old = &set.conns[0];
                    old.is_dup.store(true, Ordering::Relaxed);
                    set.history.push(old.id);
                    set.history.push(conn.id);
                    m.current_dup_client_keys.inc();
                    m.current_dup_client_conns.add(2);
                } else {
                    set.history.push(conn.id);
                    m.current_dup_client_conns.inc();
                }
                trim_history(&mut set.history);
                conn.is_dup.store(true, Ordering::Relaxed);
                set.conns.push(conn.clone());
                set.active = conn.clone();
            }
        }
        m.current_connections.inc();
        m.connections_high_water.fetch_max(
            m.current_connections.get(),
            std::sync::atomic::Ordering::Relaxed,
        );
        m.clients_local.set(self.clients.len() as i64);
        let present = Frame::PeerPresent {
            key: conn.key,
            addr: Some(conn.remote),
            flags: conn.present_flags(),
        };
        for w in watchers.values() {
            w.outbox.push_control(present.clone());
        }
    }

    /// Removes a connection. When it was the key's last, everyone that
    /// received packets from the key (per `sent_to`) and every watcher gets
    /// PeerGone(Disconnected).
    pub fn unregister(&self, conn: &Arc<ClientConn>, sent_to: SentTo) {
        let mut watchers = self.watchers.lock();
        if watchers.remove(&conn.id).is_some() {
            self.metrics.watchers.set(watchers.len() as i64);
        }
        let m = &self.metrics;
        let mut gone_to: Option<SentTo> = None;
        if let dashmap::Entry::Occupied(mut o) = self.clients.entry(conn.key) {
            let set = o.get_mut();
            let Some(pos) = set.conns.iter().position(|c| c.id == conn.id) else {
                return;
            };
            set.conns.swap_remove(pos);
            m.current_connections.dec();
            set.sent_to.extend(sent_to);
            set.history.retain(|id| *id != conn.id);
            match set.conns.len() {
                0 => {
                    let set = o.remove();
                    gone_to = Some(set.sent_to);
                }
                n => {
                    if n == 1 {
                        set.conns[0].is_dup.store(false, Ordering::Relaxed);
                        m.current_dup_client_keys.dec();
                        m.current_dup_client_conns.sub(2);
                        set.history.clear();
                    } else {
                        m.current_dup_client_conns.dec();
                    }
                    if set.active.id == conn.id {
                        let next = set
                            .history
                            .iter()
                            .rev()
                            .find_map(|id| set.conns.iter().find(|c| c.id == *id))
                            .unwrap_or_else(|| set.conns.last().expect("set is not empty"));
                        set.active = next.clone();
                    }
                }
            }
        }
        m.clients_local.set(self.clients.len() as i64);
        let Some(gone_to) = gone_to else { return };
        // Still reachable through a mesh peer: receivers hear when it goes.
        let gone_to = self.remote.local_key_left(conn.key, gone_to);
        let gone = Frame::PeerGone {
            key: conn.key,
            reason: PeerGoneReason::Disconnected,
        };
        for w in watchers.values() {
            w.outbox.push_control(gone.clone());
        }
        drop(watchers);
        self.send_peer_gone(conn.key, gone_to);
    }

    /// Under the "last writer is active" policy, a duplicate that sends
    /// anything becomes the one that receives the key's packets.
    #[inline]
    pub fn note_activity(&self, conn: &Arc<ClientConn>) {
        if !conn.is_dup.load(Ordering::Relaxed) {
            return;
        }
        if let Some(mut set) = self.clients.get_mut(&conn.key) {
            if set.active.id != conn.id && set.conns.iter().any(|c| c.id == conn.id) {
                set.active = conn.clone();
                set.history.push(conn.id);
                trim_history(&mut set.history);
            }
        }
    }

    /// Subscribes a mesh connection to connect/disconnect events, first
    /// sending it PeerPresent for every connected key (itself included).
    pub fn add_watcher(&self, watcher: &Arc<ClientConn>) {
        let mut watchers = self.watchers.lock();
        for set in self.clients.iter() {
            let c = &set.active;
            watcher.outbox.push_control(Frame::PeerPresent {
                key: c.key,
                addr: Some(c.remote),
                flags: c.present_flags(),
            });
        }
        watchers.insert(watcher.id, watcher.clone());
        self.metrics.watchers.set(watchers.len() as i64);
    }

    /// Closes every connection of `key` (a mesh peer's ClosePeer).
    pub fn close_key(&self, key: &NodePublic) -> usize {
        let conns: Vec<_> = self
            .clients
            .get(key)
            .map(|s| s.conns.clone())
            .unwrap_or_default();
        for c in &conns {
            c.cancel.cancel();
        }
        conns.len()
    }
}

fn trim_history(h: &mut Vec<ConnId>) {
    if h.len() > MAX_HISTORY {
        h.drain(..h.len() - MAX_HISTORY);
    }
}
