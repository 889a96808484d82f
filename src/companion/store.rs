//! The durable snapshot store: a redb database under `--state-dir`. Every
//! snapshot is written in one ACID transaction (redb commits with a
//! checksummed, double-buffered root, so a kill at any moment leaves the
//! previous commit intact); the loader also re-checks each snapshot's hash
//! and falls back to an older one if the newest does not validate.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::model::Snapshot;

/// Key: (fetched_at_ms, hash) — the snapshot version, so iteration order is
/// version order. Value: the snapshot's JSON.
const SNAPSHOTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("snapshots_v1");

/// Snapshots kept; older ones are pruned in the same transaction.
pub const KEEP: usize = 4;

/// The database file name under the state directory.
pub const FILE_NAME: &str = "companion.redb";

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct StoreError {
    path: PathBuf,
    message: String,
}

/// The snapshot store.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) `<dir>/companion.redb`, repairing it if the
    /// last writer died mid-commit.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(FILE_NAME);
        let err = |m: String| StoreError {
            path: path.clone(),
            message: m,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(format!("create directory: {e}")))?;
        let db = Database::create(&path).map_err(|e| err(e.to_string()))?;
        Ok(Store { db, path })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Writes `snap` atomically and prunes all but the newest [`KEEP`].
    pub fn save(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let bytes = snap.to_json();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
            t.insert((snap.fetched_at_ms, snap.hash.as_str()), bytes.as_slice())
                .map_err(|e| self.err(e))?;
            let len = t.len().map_err(|e| self.err(e))? as usize;
            for _ in KEEP..len {
                t.pop_first().map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The newest snapshot that decodes and validates, if any.
    pub fn load_newest(&self) -> Result<Option<Snapshot>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = match txn.open_table(SNAPSHOTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        for entry in t.iter().map_err(|e| self.err(e))?.rev() {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            match Snapshot::from_json(v.value()) {
                Ok(s) if s.version() == k.value() => return Ok(Some(s)),
                Ok(_) => {
                    tracing::warn!(path = %self.path.display(), "snapshot key does not match its content; skipping")
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "invalid snapshot; trying an older one")
                }
            }
        }
        Ok(None)
    }

    /// Number of snapshots stored.
    pub fn count(&self) -> Result<usize, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        match txn.open_table(SNAPSHOTS) {
            Ok(t) => Ok(t.len().map_err(|e| self.err(e))? as usize),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// Test support (the hidden `derpd companion-store-torture` command): writes
/// snapshots of `nodes` nodes forever, printing `saved <fetched_at_ms>` to
/// stdout after each commit, so a test can SIGKILL it mid-write.
#[doc(hidden)]
pub fn torture(dir: &Path, nodes: usize) -> Result<(), String> {
    use std::io::Write;
    let store = Store::open(dir).map_err(|e| e.to_string())?;
    let start = store
        .load_newest()
        .map_err(|e| e.to_string())?
        .map_or(1, |s| s.fetched_at_ms + 1);
    let keys: Vec<_> = (0..nodes)
        .map(|_| crate::proto::NodePrivate::generate().public())
        .collect();
    let mut out = std::io::stdout().lock();
    for v in start.. {
        let list = keys
            .iter()
            .enumerate()
            .map(|(i, k)| super::model::Node {
                id: i as u64 + 1,
                name: format!("node-{i}-{v}"),
                node_key: *k,
                user: Some(format!("user-{}", i % 7)),
                tags: vec![],
                expiry_ms: None,
                last_seen_ms: Some(v as i64),
            })
            .collect();
        store
            .save(&Snapshot::new(list, v))
            .map_err(|e| e.to_string())?;
        writeln!(out, "saved {v}").map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::companion::model::test_node;

    #[test]
    fn saves_loads_newest_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.load_newest().unwrap().is_none());
        for i in 0..10u64 {
            let s = Snapshot::new(vec![test_node(i, Some("u"), &[], None)], 1000 + i);
            store.save(&s).unwrap();
        }
        assert_eq!(store.count().unwrap(), KEEP);
        let newest = store.load_newest().unwrap().unwrap();
        assert_eq!(newest.fetched_at_ms, 1009);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_newest().unwrap().unwrap().fetched_at_ms, 1009);
    }

    #[test]
    fn a_corrupt_newest_entry_falls_back_to_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = Snapshot::new(vec![test_node(1, None, &[], None)], 10);
        store.save(&good).unwrap();
        let txn = store.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(SNAPSHOTS).unwrap();
            t.insert((20u64, "bogus"), &b"{not json"[..]).unwrap();
        }
        txn.commit().unwrap();
        assert_eq!(store.load_newest().unwrap().unwrap(), good);
    }
}
