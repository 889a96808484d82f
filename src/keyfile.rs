//! The relay's private key file, in Tailscale derper's format:
//! `{"PrivateKey": "privkey:<64 hex>"}`. Created with mode 0600 if missing.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::proto::NodePrivate;

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or writing failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file's contents are not a derper key file.
    #[error("key file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never includes the key).
        reason: String,
    },
}

#[derive(serde::Deserialize, serde::Serialize)]
struct KeyFileJson {
    #[serde(rename = "PrivateKey")]
    private_key: String,
}

/// Loads the key at `path`, or generates one and writes it there (creating
/// parent directories; the file gets mode 0600, written atomically).
pub fn load_or_create(path: &Path) -> Result<NodePrivate, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => parse(&bytes).map_err(|reason| KeyFileError::Invalid {
            path: path.to_owned(),
            reason,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodePrivate::generate();
            write_new(path, &key).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Loads the key at `path`; a missing file is an error.
pub fn load(path: &Path) -> Result<NodePrivate, KeyFileError> {
    let bytes = std::fs::read(path).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse(&bytes).map_err(|reason| KeyFileError::Invalid {
        path: path.to_owned(),
        reason,
    })
}

/// Generates a key and writes it to `path` (mode 0600), refusing to
/// replace an existing file.
pub fn create_new(path: &Path) -> Result<NodePrivate, KeyFileError> {
    let key = NodePrivate::generate();
    write_no_clobber(path, &key).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(key)
}

fn write_no_clobber(path: &Path, key: &NodePrivate) -> std::io::Result<()> {
    if path.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "already exists; not replacing it",
        ));
    }
    let tmp = path.with_extension(format!("new{}", std::process::id()));
    write_new(&tmp, key)?;
    // A hard link fails if `path` appeared meanwhile: never clobbers.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked
}

fn parse(bytes: &[u8]) -> Result<NodePrivate, String> {
    let json: KeyFileJson = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JSON object with a \"PrivateKey\" string ({e})"))?;
    NodePrivate::from_text(&json.private_key).map_err(|e| format!("PrivateKey: {e}"))
}

fn write_new(path: &Path, key: &NodePrivate) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::to_string_pretty(&KeyFileJson {
        private_key: key.to_text(),
    })
    .expect("serializes");
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(json.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_0600_then_loads_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/derpd.key");
        let a = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"PrivateKey\": \"privkey:"));
    }

    #[test]
    fn invalid_file_is_an_error_that_does_not_leak_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, r#"{"PrivateKey":"nodekey:00"}"#).unwrap();
        let e = load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("PrivateKey"), "{e}");
        std::fs::write(&path, "garbage").unwrap();
        assert!(load_or_create(&path).is_err());
        assert!(load(&path).is_err());
    }

    #[test]
    fn create_new_writes_0600_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.key");
        assert!(load(&path).is_err(), "load does not create");
        let k = create_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(&path).unwrap().public(), k.public());
        assert!(create_new(&path).is_err());
        assert_eq!(load(&path).unwrap().public(), k.public());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
