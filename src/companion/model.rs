//! What the companion caches: headscale's nodes, taken together as a
//! versioned [`Snapshot`], and the in-memory index admission reads from.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::proto::NodePublic;

/// The snapshot encoding version written by this build.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// One headscale node, as far as admission needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// headscale's node ID.
    pub id: u64,
    /// The node's name (headscale's `givenName`, else `name`).
    pub name: String,
    /// The key the node presents to DERP (`nodekey:<hex>` in JSON).
    #[serde(with = "nodekey_text")]
    pub node_key: NodePublic,
    /// Owning headscale user; `None` for tagged nodes (v0.29 `"user": null`).
    pub user: Option<String>,
    /// ACL tags (`tag:…`).
    pub tags: Vec<String>,
    /// Expiry, Unix milliseconds; `None` = never expires.
    pub expiry_ms: Option<i64>,
    /// Last seen by headscale, Unix milliseconds.
    pub last_seen_ms: Option<i64>,
}

impl Node {
    /// Whether the node's key has expired at `now_ms`.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expiry_ms.is_some_and(|e| e <= now_ms)
    }
}

mod nodekey_text {
    use super::NodePublic;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &NodePublic, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(k)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<NodePublic, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A complete, versioned copy of headscale's node list.
///
/// The version is `(fetched_at_ms, hash)`: the later fetch wins; the hash
/// (SHA-256 of the canonical node list) breaks ties and lets a loader check
/// that what it read is what was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Encoding version ([`SNAPSHOT_FORMAT`]).
    pub format: u32,
    /// Hex SHA-256 of the canonical JSON of `nodes`.
    pub hash: String,
    /// When headscale answered, Unix milliseconds.
    pub fetched_at_ms: u64,
    /// The nodes, sorted by ID.
    pub nodes: Vec<Node>,
}

impl Snapshot {
    /// A snapshot of `nodes` fetched at `fetched_at_ms`.
    pub fn new(mut nodes: Vec<Node>, fetched_at_ms: u64) -> Snapshot {
        nodes.sort_by_key(|n| (n.id, n.node_key));
        let hash = content_hash(&nodes);
        Snapshot {
            format: SNAPSHOT_FORMAT,
            hash,
            fetched_at_ms,
            nodes,
        }
    }

    /// Checks the format and that the hash matches the nodes.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != SNAPSHOT_FORMAT {
            return Err(format!("unknown snapshot format {}", self.format));
        }
        if content_hash(&self.nodes) != self.hash {
            return Err("snapshot hash does not match its nodes".into());
        }
        Ok(())
    }

    /// The version, ordered: later fetch first, then hash.
    pub fn version(&self) -> (u64, &str) {
        (self.fetched_at_ms, &self.hash)
    }

    /// Whether this snapshot should replace `other`.
    pub fn is_newer_than(&self, other: &Snapshot) -> bool {
        self.version() > other.version()
    }

    /// Decodes and validates a snapshot (store or replication).
    pub fn from_json(bytes: &[u8]) -> Result<Snapshot, String> {
        let s: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    /// The JSON encoding.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("snapshot serializes")
    }
}

fn content_hash(nodes: &[Node]) -> String {
    let json = serde_json::to_vec(nodes).expect("nodes serialize");
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &json))
}

/// A snapshot with its key index: what admission reads.
#[derive(Debug)]
pub struct CacheView {
    /// The snapshot.
    pub snapshot: Arc<Snapshot>,
    index: HashMap<NodePublic, usize>,
}

impl CacheView {
    /// Indexes `snapshot` by node key.
    pub fn new(snapshot: Arc<Snapshot>) -> CacheView {
        let index = snapshot
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.node_key, i))
            .collect();
        CacheView { snapshot, index }
    }

    /// The node with this key.
    pub fn get(&self, key: &NodePublic) -> Option<&Node> {
        self.index.get(key).map(|&i| &self.snapshot.nodes[i])
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.snapshot.nodes.len()
    }

    /// Whether no node is cached.
    pub fn is_empty(&self) -> bool {
        self.snapshot.nodes.is_empty()
    }
}

/// The current snapshot, swapped atomically; `None` until the first load.
#[derive(Debug, Default)]
pub struct Cache {
    view: parking_lot::RwLock<Option<Arc<CacheView>>>,
}

impl Cache {
    /// The current view.
    pub fn view(&self) -> Option<Arc<CacheView>> {
        self.view.read().clone()
    }

    /// Installs `snap` if it is newer than the current one (newest wins).
    /// Returns whether it was installed.
    pub fn install_if_newer(&self, snap: Arc<Snapshot>) -> bool {
        let mut cur = self.view.write();
        if let Some(v) = cur.as_ref() {
            if !snap.is_newer_than(&v.snapshot) {
                return false;
            }
        }
        *cur = Some(Arc::new(CacheView::new(snap)));
        true
    }

    /// Runs `f` on the current view under the read lock (no refcount
    /// traffic: the admission hot path).
    pub fn with_view<T>(&self, f: impl FnOnce(Option<&CacheView>) -> T) -> T {
        let g = self.view.read();
        f(g.as_deref())
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) fn test_node(
    id: u64,
    user: Option<&str>,
    tags: &[&str],
    expiry_ms: Option<i64>,
) -> Node {
    let key = crate::proto::NodePrivate::generate().public();
    Node {
        id,
        name: format!("node-{id}"),
        node_key: key,
        user: user.map(str::to_owned),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        expiry_ms,
        last_seen_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_and_detects_tampering() {
        let s = Snapshot::new(
            vec![
                test_node(2, Some("a"), &[], None),
                test_node(1, None, &["tag:x"], Some(5)),
            ],
            100,
        );
        assert_eq!(s.nodes[0].id, 1);
        let back = Snapshot::from_json(&s.to_json()).unwrap();
        assert_eq!(back, s);
        let mut bad = s.clone();
        bad.nodes[0].tags.clear();
        assert!(Snapshot::from_json(&bad.to_json()).is_err());
        let text = String::from_utf8(s.to_json()).unwrap();
        assert!(text.contains("\"node_key\":\"nodekey:"), "{text}");
    }

    #[test]
    fn newest_wins_and_older_never_overwrites() {
        let cache = Cache::default();
        let n = vec![test_node(1, Some("a"), &[], None)];
        let new = Arc::new(Snapshot::new(n.clone(), 200));
        let old = Arc::new(Snapshot::new(vec![], 100));
        assert!(cache.install_if_newer(new.clone()));
        assert!(!cache.install_if_newer(old));
        assert!(
            !cache.install_if_newer(new.clone()),
            "same version is not newer"
        );
        assert_eq!(cache.view().unwrap().len(), 1);
        assert!(cache.view().unwrap().get(&n[0].node_key).is_some());
        assert!(cache.install_if_newer(Arc::new(Snapshot::new(vec![], 300))));
        assert!(cache.view().unwrap().is_empty());
    }

    #[test]
    fn expiry() {
        let n = test_node(1, None, &[], Some(1000));
        assert!(!n.is_expired(999));
        assert!(n.is_expired(1000));
        assert!(!test_node(2, None, &[], None).is_expired(i64::MAX));
    }
}
