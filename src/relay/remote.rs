//! The seam for keys that live elsewhere: what the relay core needs from
//! whoever knows about keys connected to other relays (the mesh).
//!
//! The relay defines [`RemoteKeys`] and holds at most one implementation in
//! its registry's [`Remote`] slot; the mesh implements it and attaches
//! itself. A relay with nothing attached answers "not here" to every remote
//! question, and a packet pays for the slot only when its destination is not
//! connected locally (one atomic load).

use std::any::Any;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::conn::{ConnId, SentTo};
use crate::proto::NodePublic;

/// Keys connected elsewhere, and how to reach them.
pub trait RemoteKeys: Send + Sync + 'static {
    /// Packet path: queues `payload` from `src` for `dst` towards the peer
    /// that has `dst`, or hands the payload back when no peer has it. Must
    /// never block.
    fn forward(&self, src: NodePublic, dst: NodePublic, payload: Bytes) -> Result<(), Bytes>;

    /// Packet path: local connection `conn` of `dst` received a packet that
    /// a peer forwarded from `src` (so it hears when `src` leaves).
    fn note_receiver(&self, src: NodePublic, dst: NodePublic, conn: ConnId);

    /// The last local connection of `key` closed; `receivers` got packets
    /// from it here. Called under the registry's membership lock. Returns
    /// who must get PeerGone(`key`) now (the rest are told once `key` is
    /// gone from every peer too).
    fn local_key_left(&self, key: NodePublic, receivers: SentTo) -> SentTo;

    /// Whether some peer has `key`.
    fn contains(&self, key: &NodePublic) -> bool;

    /// How many keys peers have.
    fn len(&self) -> usize;

    /// Whether peers have no keys at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What is attached: the seam, and the same object for [`Remote::get`].
struct Attached {
    keys: Arc<dyn RemoteKeys>,
    any: Arc<dyn Any + Send + Sync>,
}

/// The registry's slot for a [`RemoteKeys`] implementation (set once).
#[derive(Default)]
pub struct Remote {
    slot: OnceLock<Attached>,
}

impl Remote {
    /// An empty slot: no key is reachable elsewhere.
    pub fn new() -> Remote {
        Remote::default()
    }

    /// Attaches `keys`; a slot takes one implementation for its life.
    /// Returns `keys` back if one is already attached.
    pub fn attach<T: RemoteKeys>(&self, keys: Arc<T>) -> Result<(), Arc<T>> {
        let mut keys = Some(keys);
        self.slot.get_or_init(|| {
            let k = keys.take().expect("taken once");
            Attached {
                keys: k.clone(),
                any: k,
            }
        });
        match keys {
            None => Ok(()),
            Some(k) => Err(k),
        }
    }

    /// The attached implementation, if it is a `T`.
    pub fn get<T: RemoteKeys>(&self) -> Option<Arc<T>> {
        self.slot.get()?.any.clone().downcast::<T>().ok()
    }

    /// See [`RemoteKeys::forward`]; with nothing attached, hands `payload`
    /// back.
    #[inline]
    pub fn forward(&self, src: NodePublic, dst: NodePublic, payload: Bytes) -> Result<(), Bytes> {
        match self.slot.get() {
            Some(a) => a.keys.forward(src, dst, payload),
            None => Err(payload),
        }
    }

    /// See [`RemoteKeys::note_receiver`].
    #[inline]
    pub fn note_receiver(&self, src: NodePublic, dst: NodePublic, conn: ConnId) {
        if let Some(a) = self.slot.get() {
            a.keys.note_receiver(src, dst, conn);
        }
    }

    /// See [`RemoteKeys::local_key_left`]; with nothing attached, every
    /// receiver is told now.
    pub fn local_key_left(&self, key: NodePublic, receivers: SentTo) -> SentTo {
        match self.slot.get() {
            Some(a) => a.keys.local_key_left(key, receivers),
            None => receivers,
        }
    }

    /// Whether some peer has `key`.
    pub fn contains(&self, key: &NodePublic) -> bool {
        self.slot.get().is_some_and(|a| a.keys.contains(key))
    }

    /// How many keys peers have.
    pub fn len(&self) -> usize {
        self.slot.get().map_or(0, |a| a.keys.len())
    }

    /// Whether peers have no keys at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Has every key; records forwarded payloads.
    #[derive(Default)]
    struct Everyone {
        forwarded: parking_lot::Mutex<Vec<Bytes>>,
    }

    impl RemoteKeys for Everyone {
        fn forward(&self, _: NodePublic, _: NodePublic, payload: Bytes) -> Result<(), Bytes> {
            self.forwarded.lock().push(payload);
            Ok(())
        }
        fn note_receiver(&self, _: NodePublic, _: NodePublic, _: ConnId) {}
        fn local_key_left(&self, _: NodePublic, _: SentTo) -> SentTo {
            SentTo::new()
        }
        fn contains(&self, _: &NodePublic) -> bool {
            true
        }
        fn len(&self) -> usize {
            1
        }
    }

    #[test]
    fn an_empty_slot_knows_no_remote_key() {
        let r = Remote::new();
        let k = NodePublic([7; 32]);
        assert_eq!(
            r.forward(k, k, Bytes::from_static(b"p")),
            Err(Bytes::from_static(b"p"))
        );
        assert!(!r.contains(&k));
        assert!(r.is_empty());
        let mut to = SentTo::new();
        to.insert(k, 3);
        assert_eq!(r.local_key_left(k, to.clone()), to);
        assert!(r.get::<Everyone>().is_none());
    }

    #[test]
    fn an_attached_implementation_answers_and_can_be_found_again() {
        let r = Remote::new();
        let e = Arc::new(Everyone::default());
        assert!(r.attach(e.clone()).is_ok());
        assert!(r.attach(Arc::new(Everyone::default())).is_err(), "set once");
        let k = NodePublic([7; 32]);
        assert!(r.forward(k, k, Bytes::from_static(b"p")).is_ok());
        assert_eq!(e.forwarded.lock().len(), 1);
        assert!(r.contains(&k));
        assert_eq!(r.len(), 1);
        assert!(Arc::ptr_eq(&r.get::<Everyone>().unwrap(), &e));
    }
}
