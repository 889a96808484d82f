//! The forwarding table (protocol spec §9.3), free of I/O.
//!
//! For every key a mesh peer reported present, the links it was reported
//! on, in registration order. The first registered link is the preferred
//! one and carries every packet for the key (deterministic, never random);
//! removing it promotes the oldest remaining link. Local clients always win
//! over forwarders, but that decision belongs to the caller, which knows who
//! is local: see [`leaves_region`].

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use crate::proto::NodePublic;

/// What [`Forwarders::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The key had no forwarder; this link is now its preferred one.
    First,
    /// The key already had a preferred forwarder; this link is kept as a
    /// fallback.
    Fallback,
    /// The link was already registered for the key (a duplicate
    /// connection's PeerPresent): nothing changed.
    AlreadyKnown,
}

/// What [`Forwarders::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed<L> {
    /// The link was not registered for the key: nothing changed.
    NotRegistered,
    /// A fallback link was removed; the preferred one is unchanged.
    Fallback,
    /// The preferred link was removed and this one (the oldest remaining)
    /// took over.
    Promoted(L),
    /// The key's last forwarder was removed.
    Last,
}

/// Per remote key, the links it is present on (preferred first).
#[derive(Debug)]
pub struct Forwarders<L> {
    by_key: HashMap<NodePublic, Vec<L>>,
    by_link: HashMap<L, HashSet<NodePublic>>,
}

impl<L> Default for Forwarders<L> {
    fn default() -> Self {
        Forwarders {
            by_key: HashMap::new(),
            by_link: HashMap::new(),
        }
    }
}

impl<L: Copy + Eq + Hash> Forwarders<L> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `key` is present behind `link` (a PeerPresent).
    pub fn add(&mut self, key: NodePublic, link: L) -> Added {
        let links = self.by_key.entry(key).or_default();
        if links.contains(&link) {
            return Added::AlreadyKnown;
        }
        links.push(link);
        self.by_link.entry(link).or_default().insert(key);
        if links.len() == 1 {
            Added::First
        } else {
            Added::Fallback
        }
    }

    /// Records that `key` is gone from behind `link` (a PeerGone).
    pub fn remove(&mut self, key: &NodePublic, link: L) -> Removed<L> {
        let Some(links) = self.by_key.get_mut(key) else {
            return Removed::NotRegistered;
        };
        let Some(pos) = links.iter().position(|l| *l == link) else {
            return Removed::NotRegistered;
        };
        links.remove(pos);
        if let Some(set) = self.by_link.get_mut(&link) {
            set.remove(key);
            if set.is_empty() {
                self.by_link.remove(&link);
            }
        }
        match (pos, links.first().copied()) {
            (_, None) => {
                self.by_key.remove(key);
                Removed::Last
            }
            (0, Some(next)) => Removed::Promoted(next),
            _ => Removed::Fallback,
        }
    }

    /// Forgets every key learned on `link` (the link broke), as if a
    /// PeerGone had arrived for each. Returns what happened to each key.
    pub fn remove_link(&mut self, link: L) -> Vec<(NodePublic, Removed<L>)> {
        let keys = self.by_link.remove(&link).unwrap_or_default();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            // Re-insert so `remove` can do the bookkeeping in one place.
            self.by_link.entry(link).or_default().insert(key);
            let r = self.remove(&key, link);
            out.push((key, r));
        }
        out
    }

    /// The link that carries packets for `key`, if any.
    pub fn preferred(&self, key: &NodePublic) -> Option<L> {
        self.by_key.get(key).and_then(|l| l.first().copied())
    }

    /// Every link `key` is present on, preferred first.
    pub fn links(&self, key: &NodePublic) -> &[L] {
        self.by_key.get(key).map_or(&[], |l| l.as_slice())
    }

    /// Whether `key` has at least one forwarder.
    pub fn contains(&self, key: &NodePublic) -> bool {
        self.by_key.contains_key(key)
    }

    /// Number of keys with at least one forwarder.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether no key has a forwarder.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Number of keys registered on `link`.
    pub fn keys_on(&self, link: L) -> usize {
        self.by_link.get(&link).map_or(0, |s| s.len())
    }
}

/// Whether a removal makes the key leave the region (spec §6.6): its last
/// forwarder went and it has no local connection. Only then do local
/// clients that received from it get PeerGone(Disconnected).
pub fn leaves_region<L>(removed: &Removed<L>, is_local: bool) -> bool {
    matches!(removed, Removed::Last) && !is_local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> NodePublic {
        NodePublic([n; 32])
    }

    /// Checklist 51: a second forwarder keeps the first preferred; removing
    /// the preferred promotes the next; removing unknown links or keys is a
    /// no-op; the last removal of a local key keeps it local-only.
    #[test]
    fn first_registered_stays_preferred_and_removal_promotes_oldest() {
        let mut t = Forwarders::new();
        assert_eq!(t.add(k(1), 10u32), Added::First);
        assert_eq!(t.add(k(1), 20), Added::Fallback);
        assert_eq!(t.add(k(1), 30), Added::Fallback);
        assert_eq!(t.add(k(1), 20), Added::AlreadyKnown);
        assert_eq!(t.preferred(&k(1)), Some(10));
        assert_eq!(t.remove(&k(1), 10), Removed::Promoted(20));
        assert_eq!(t.preferred(&k(1)), Some(20));
        assert_eq!(t.remove(&k(1), 30), Removed::Fallback);
        assert_eq!(t.preferred(&k(1)), Some(20));
        assert_eq!(t.links(&k(1)), &[20]);
        assert_eq!(t.remove(&k(1), 20), Removed::Last);
        assert_eq!(t.preferred(&k(1)), None);
        assert!(t.is_empty());
    }

    #[test]
    fn removing_unregistered_link_or_key_is_a_no_op() {
        let mut t = Forwarders::new();
        assert_eq!(t.remove(&k(1), 1u32), Removed::NotRegistered);
        t.add(k(1), 1);
        assert_eq!(t.remove(&k(1), 2), Removed::NotRegistered);
        assert_eq!(t.remove(&k(2), 1), Removed::NotRegistered);
        assert_eq!(t.preferred(&k(1)), Some(1));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn last_removal_leaves_region_only_when_not_local() {
        let mut t = Forwarders::new();
        t.add(k(1), 1u32);
        t.add(k(2), 1);
        let r = t.remove(&k(1), 1);
        assert!(leaves_region(&r, false));
        let r = t.remove(&k(2), 1);
        // Still connected locally: stays as a local-only key.
        assert!(!leaves_region(&r, true));
        assert!(!leaves_region(&Removed::Promoted(3u32), false));
        assert!(!leaves_region(&Removed::<u32>::NotRegistered, false));
    }

    /// Checklist 54: a broken link forgets every key learned on it, and a
    /// reconnect re-learns them from the new flood.
    #[test]
    fn broken_link_forgets_its_keys_and_relearns_from_the_flood() {
        let mut t = Forwarders::new();
        t.add(k(1), 1u32);
        t.add(k(2), 1);
        t.add(k(2), 2);
        t.add(k(3), 2);
        t.add(k(3), 1);
        let mut gone = t.remove_link(1);
        gone.sort_by_key(|(key, _)| key.0[0]);
        assert_eq!(
            gone,
            vec![
                (k(1), Removed::Last),
                (k(2), Removed::Promoted(2)),
                (k(3), Removed::Fallback),
            ]
        );
        assert_eq!(t.keys_on(1), 0);
        assert_eq!(t.len(), 2);
        assert_eq!(t.preferred(&k(2)), Some(2));
        assert!(t.remove_link(1).is_empty());
        // Reconnect: the flood re-registers the link, behind link 2 for
        // keys that link 2 already carries.
        t.add(k(1), 1);
        t.add(k(2), 1);
        assert_eq!(t.keys_on(1), 2);
        assert_eq!(t.preferred(&k(1)), Some(1));
        assert_eq!(t.preferred(&k(2)), Some(2));
    }
}
