//! The peer table: each configured peer key with its local UDP socket and
//! the address the local WireGuard last sent from. Lookups are strict: a key
//! that is not configured has no entry, so its packets have nowhere to go.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use super::metrics::{PeerCounters, TunnelMetrics};
use super::settings::PeerConfig;
use super::udp::LocalSocket;
use crate::proto::NodePublic;

/// One peer tunnel.
pub struct Peer {
    /// Its node key.
    pub key: NodePublic,
    /// Label in metrics and logs.
    pub name: String,
    /// The local socket WireGuard's `Endpoint` for this peer points at.
    pub socket: LocalSocket,
    /// Its counters.
    pub counters: PeerCounters,
    last_src: Mutex<Option<SocketAddr>>,
}

impl Peer {
    /// Remembers where WireGuard sent from (the destination for packets
    /// coming back from this peer).
    pub fn note_source(&self, addr: SocketAddr) {
        let mut last = self.last_src.lock();
        if *last != Some(addr) {
            *last = Some(addr);
        }
    }

    /// Where packets from this peer go: the address WireGuard last sent
    /// from, else `fallback`.
    pub fn destination(&self, fallback: Option<SocketAddr>) -> Option<SocketAddr> {
        (*self.last_src.lock()).or(fallback)
    }
}

/// Every configured peer, by index and by key.
pub struct PeerTable {
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<NodePublic, usize>,
}

impl PeerTable {
    /// Binds each peer's local socket.
    pub fn bind(configs: &[PeerConfig], metrics: &TunnelMetrics) -> Result<PeerTable, String> {
        let mut peers = Vec::with_capacity(configs.len());
        let mut by_key = HashMap::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let socket = LocalSocket::bind(c.listen)
                .map_err(|e| format!("peer {}: bind {}: {e}", c.name, c.listen))?;
            by_key.insert(c.key, i);
            peers.push(Arc::new(Peer {
                key: c.key,
                name: c.name.clone(),
                socket,
                counters: metrics.peer(&c.name),
                last_src: Mutex::new(None),
            }));
        }
        Ok(PeerTable { peers, by_key })
    }

    /// The index of a configured key; `None` for any other key.
    pub fn lookup(&self, key: &NodePublic) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    /// The peer at `index`.
    pub fn get(&self, index: usize) -> &Arc<Peer> {
        &self.peers[index]
    }

    /// Every peer, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Peer>> {
        self.peers.iter()
    }

    /// How many peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::NodePrivate;

    #[tokio::test]
    async fn only_configured_keys_are_found() {
        let m = TunnelMetrics::new();
        let (a, b) = (
            NodePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let cfg = |key: NodePublic| PeerConfig {
            key,
            listen: "127.0.0.1:0".parse().unwrap(),
            name: key.to_string(),
        };
        let t = PeerTable::bind(&[cfg(a), cfg(b)], &m).unwrap();
        assert_eq!(t.lookup(&a), Some(0));
        assert_eq!(t.lookup(&b), Some(1));
        assert_eq!(t.lookup(&NodePrivate::generate().public()), None);
        assert_eq!(t.lookup(&NodePublic::ZERO), None);

        let p = t.get(0);
        let wg: SocketAddr = "127.0.0.1:51820".parse().unwrap();
        assert_eq!(p.destination(None), None);
        assert_eq!(p.destination(Some(wg)), Some(wg));
        let seen: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        p.note_source(seen);
        assert_eq!(p.destination(Some(wg)), Some(seen));
    }
}
