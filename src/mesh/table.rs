//! The relay's view of keys connected to mesh peers: the forwarding table
//! (authoritative, under a mutex), a lock-free snapshot of each key's
//! preferred link for the packet path, and who received packets from remote
//! keys (for PeerGone(Disconnected) when such a key leaves the region).
//!
//! Membership changes run under the registry's membership lock
//! ([`Registry::with_membership`]) so that "is the key local?" and "does it
//! still have a forwarder?" are answered consistently with connects and
//! disconnects; PeerGone frames are queued after the lock is released. The
//! relay reaches the table through the [`super::Mesh`]'s
//! [`crate::relay::RemoteKeys`] implementation.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use prometheus::IntCounter;

use super::forwarders::{leaves_region, Added, Forwarders, Removed};
use super::metrics::MeshMetrics;
use super::queue::{ForwardQueue, Forwarded, LinkId};
use crate::metrics::Metrics;
use crate::proto::NodePublic;
use crate::relay::conn::ConnId;
use crate::relay::registry::{Registry, SentTo};
use crate::relay::RemoteKeys;

#[derive(Default)]
struct Inner {
    fwd: Forwarders<LinkId>,
    queues: HashMap<LinkId, Arc<ForwardQueue>>,
}

/// Remote keys and how to reach them.
pub struct RemoteTable {
    inner: Mutex<Inner>,
    routes: DashMap<NodePublic, Arc<ForwardQueue>>,
    receivers: DashMap<NodePublic, SentTo>,
    /// Mesh metrics.
    pub metrics: MeshMetrics,
    packets_forwarded_out: IntCounter,
}

impl RemoteTable {
    /// An empty table whose metrics live in `metrics`' registry.
    pub fn new(metrics: &Metrics) -> RemoteTable {
        RemoteTable {
            inner: Mutex::new(Inner::default()),
            routes: DashMap::new(),
            receivers: DashMap::new(),
            metrics: MeshMetrics::new(&metrics.registry),
            packets_forwarded_out: metrics.packets_forwarded_out.clone(),
        }
    }

    /// Packet path: queues `payload` for `dst` on its preferred link, or
    /// hands the payload back when no mesh peer has `dst`.
    #[inline]
    pub fn forward(&self, src: NodePublic, dst: NodePublic, payload: Bytes) -> Result<(), Bytes> {
        let Some(q) = self.routes.get(&dst).map(|q| q.clone()) else {
            return Err(payload);
        };
        self.packets_forwarded_out.inc();
        self.metrics
            .forwarded_out_bytes
            .inc_by(payload.len() as u64);
        q.push(Forwarded { src, dst, payload });
        Ok(())
    }

    /// Packet path: local connection `id` of `dst` received a packet that a
    /// mesh peer forwarded from `src`.
    pub fn note_receiver(&self, src: NodePublic, dst: NodePublic, id: ConnId) {
        self.receivers.entry(src).or_default().insert(dst, id);
    }

    /// Whether `key` has a forwarder.
    pub fn contains(&self, key: &NodePublic) -> bool {
        self.routes.contains_key(key)
    }

    /// Keys known through the mesh.
    pub fn len(&self) -> usize {
        self.inner.lock().fwd.len()
    }

    /// Whether no key is known through the mesh.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys learned on `link`.
    pub fn keys_on(&self, link: LinkId) -> usize {
        self.inner.lock().fwd.keys_on(link)
    }

    /// The link carrying packets for `key`, if any.
    pub fn preferred(&self, key: &NodePublic) -> Option<LinkId> {
        self.inner.lock().fwd.preferred(key)
    }

    /// The key's last local connection closed (called by the registry under
    /// its membership lock with the key's local receivers). Returns who must
    /// get PeerGone now: nobody if a mesh peer still has the key (they are
    /// kept until its last forwarder goes), else the local receivers plus
    /// those that received from it through the mesh.
    pub fn local_key_left(&self, key: NodePublic, mut receivers: SentTo) -> SentTo {
        let inner = self.inner.lock();
        if inner.fwd.contains(&key) {
            self.receivers.entry(key).or_default().extend(receivers);
            return SentTo::new();
        }
        drop(inner);
        if let Some((_, remote)) = self.receivers.remove(&key) {
            receivers.extend(remote);
        }
        receivers
    }

    fn route_change(&self, inner: &Inner, key: NodePublic, r: Removed<LinkId>) {
        match r {
            Removed::Promoted(next) => {
                if let Some(q) = inner.queues.get(&next) {
                    self.routes.insert(key, q.clone());
                }
            }
            Removed::Last => {
                self.routes.remove(&key);
            }
            Removed::Fallback | Removed::NotRegistered => {}
        }
    }

    fn left_region(&self, reg: &Registry, key: NodePublic, r: &Removed<LinkId>) -> Option<SentTo> {
        if leaves_region(r, reg.is_local(&key)) {
            Some(
                self.receivers
                    .remove(&key)
                    .map(|(_, v)| v)
                    .unwrap_or_default(),
            )
        } else {
            None
        }
    }
}

impl RemoteTable {
    /// A PeerPresent for `key` arrived on the link owning `queue`; `reg` is
    /// the relay's registry.
    pub fn peer_present(&self, reg: &Registry, key: NodePublic, queue: &Arc<ForwardQueue>) {
        reg.with_membership(|| {
            let mut inner = self.inner.lock();
            inner
                .queues
                .entry(queue.id)
                .or_insert_with(|| queue.clone());
            if inner.fwd.add(key, queue.id) == Added::First {
                self.routes.insert(key, queue.clone());
            }
            self.metrics.clients_remote.set(inner.fwd.len() as i64);
        });
    }

    /// A PeerGone for `key` arrived on `link`.
    pub fn peer_gone(&self, reg: &Registry, key: NodePublic, link: LinkId) {
        let notify = reg.with_membership(|| {
            let mut inner = self.inner.lock();
            let r = inner.fwd.remove(&key, link);
            self.route_change(&inner, key, r);
            self.metrics.clients_remote.set(inner.fwd.len() as i64);
            self.left_region(reg, key, &r)
        });
        if let Some(to) = notify {
            reg.send_peer_gone(key, to);
        }
    }

    /// `link` broke: forget every key learned on it (as if PeerGone for each).
    pub fn link_down(&self, reg: &Registry, link: LinkId) {
        let gone = reg.with_membership(|| {
            let mut inner = self.inner.lock();
            let removed = inner.fwd.remove_link(link);
            let mut gone = Vec::new();
            for (key, r) in removed {
                self.route_change(&inner, key, r);
                if let Some(to) = self.left_region(reg, key, &r) {
                    gone.push((key, to));
                }
            }
            inner.queues.remove(&link);
            self.metrics.clients_remote.set(inner.fwd.len() as i64);
            gone
        });
        for (key, to) in gone {
            reg.send_peer_gone(key, to);
        }
    }
}

impl RemoteKeys for RemoteTable {
    #[inline]
    fn forward(&self, src: NodePublic, dst: NodePublic, payload: Bytes) -> Result<(), Bytes> {
        RemoteTable::forward(self, src, dst, payload)
    }

    fn note_receiver(&self, src: NodePublic, dst: NodePublic, conn: ConnId) {
        RemoteTable::note_receiver(self, src, dst, conn)
    }

    fn local_key_left(&self, key: NodePublic, receivers: SentTo) -> SentTo {
        RemoteTable::local_key_left(self, key, receivers)
    }

    fn contains(&self, key: &NodePublic) -> bool {
        RemoteTable::contains(self, key)
    }

    fn len(&self) -> usize {
        RemoteTable::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Frame, PeerGoneReason};
    use crate::relay::conn::ClientConn;
    use crate::relay::outbox::{Batch, Outbox};
    use tokio_util::sync::CancellationToken;

    fn k(n: u8) -> NodePublic {
        NodePublic([n; 32])
    }

    /// A registry with a table attached, as a meshed relay's.
    struct Reg {
        registry: Registry,
        remote: Arc<RemoteTable>,
    }

    impl std::ops::Deref for Reg {
        type Target = Registry;
        fn deref(&self) -> &Registry {
            &self.registry
        }
    }

    fn meshed_registry() -> Reg {
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(metrics.clone());
        let remote = Arc::new(RemoteTable::new(&metrics));
        assert!(registry.remote.attach(remote.clone()).is_ok());
        Reg { registry, remote }
    }

    fn peer_present(reg: &Reg, key: NodePublic, queue: &Arc<ForwardQueue>) {
        reg.remote.peer_present(reg, key, queue)
    }

    fn peer_gone(reg: &Reg, key: NodePublic, link: LinkId) {
        reg.remote.peer_gone(reg, key, link)
    }

    fn link_down(reg: &Reg, link: LinkId) {
        reg.remote.link_down(reg, link)
    }

    fn conn(reg: &Registry, key: NodePublic) -> Arc<ClientConn> {
        let c = Arc::new(ClientConn::new(
            key,
            "127.0.0.1:1".parse().unwrap(),
            false,
            false,
            false,
            Outbox::new(8, 64),
            CancellationToken::new(),
        ));
        reg.register(c.clone());
        c
    }

    fn queue(id: LinkId) -> Arc<ForwardQueue> {
        let m = MeshMetrics::new(&prometheus::Registry::new());
        Arc::new(ForwardQueue::new(
            id,
            8,
            m.link_dropped.with_label_values(&["p"]),
            m.link_queued.with_label_values(&["p"]),
        ))
    }

    fn gones(c: &ClientConn) -> Vec<NodePublic> {
        let mut b = Batch::default();
        c.outbox.take(&mut b);
        b.control
            .iter()
            .filter_map(|f| match f {
                Frame::PeerGone {
                    key,
                    reason: PeerGoneReason::Disconnected,
                } => Some(*key),
                _ => None,
            })
            .collect()
    }

    /// Checklist 52: when the last forwarder of a non-local key goes, local
    /// clients that received from it get PeerGone(Disconnected).
    #[test]
    fn last_forwarder_gone_tells_receivers() {
        let reg = meshed_registry();
        let r = conn(&reg, k(1));
        let (q1, q2) = (queue(1), queue(2));
        peer_present(&reg, k(9), &q1);
        peer_present(&reg, k(9), &q2);
        assert_eq!(reg.remote.preferred(&k(9)), Some(1));
        assert!(reg
            .remote
            .forward(k(1), k(9), Bytes::from_static(b"x"))
            .is_ok());
        assert_eq!(q1.len(), 1);
        reg.remote.note_receiver(k(9), k(1), r.id);
        peer_gone(&reg, k(9), 1);
        assert_eq!(reg.remote.preferred(&k(9)), Some(2));
        assert!(gones(&r).is_empty(), "still reachable through link 2");
        link_down(&reg, 2);
        assert_eq!(gones(&r), vec![k(9)]);
        assert!(reg.remote.forward(k(1), k(9), Bytes::new()).is_err());
        assert!(reg.remote.is_empty());
    }

    /// A key that is also local stays local-only when its forwarders go;
    /// its local departure waits for the mesh before telling receivers.
    #[test]
    fn local_and_remote_key_leaves_only_when_both_are_gone() {
        let reg = meshed_registry();
        let r = conn(&reg, k(1));
        let x = conn(&reg, k(2));
        let q = queue(1);
        peer_present(&reg, k(2), &q);
        reg.remote.note_receiver(k(2), k(1), r.id);
        peer_gone(&reg, k(2), 1);
        assert!(gones(&r).is_empty(), "k2 is still local");
        peer_present(&reg, k(2), &q);
        let mut sent = SentTo::new();
        sent.insert(k(1), r.id);
        reg.unregister(&x, sent);
        assert!(gones(&r).is_empty(), "k2 is still behind link 1");
        peer_gone(&reg, k(2), 1);
        assert_eq!(gones(&r), vec![k(2)]);
    }
}
