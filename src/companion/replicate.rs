//! Snapshot replication between relays of a mesh: `GET /derpd/v1/snapshot`
//! on the main listener serves the newest snapshot to callers presenting the
//! mesh key; [`fetch`] pulls a peer's. Newest wins on install.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::HeaderValue;
use hyper::StatusCode;

use super::model::Snapshot;
use super::HttpClient;
use crate::proto::MeshKey;

/// The endpoint path.
pub const PATH: &str = "/derpd/v1/snapshot";

/// The header carrying the mesh key (64 hex digits).
pub const MESH_KEY_HEADER: &str = "derpd-mesh-key";

/// Largest snapshot accepted from a peer.
pub const MAX_SNAPSHOT: usize = 256 << 20;

/// Whether a request's mesh-key header matches ours (constant time; a
/// missing or malformed header never matches).
pub fn authorized(ours: Option<&MeshKey>, header: Option<&HeaderValue>) -> bool {
    let (Some(ours), Some(h)) = (ours, header) else {
        return false;
    };
    let Ok(text) = h.to_str() else {
        return false;
    };
    match MeshKey::from_hex(text) {
        Ok(theirs) => ours.matches(&theirs),
        Err(_) => false,
    }
}

/// The snapshot URL of a peer relay's base URL (`https://derp2.example.com`).
pub fn snapshot_url(peer: &str) -> String {
    format!("{}{PATH}", peer.trim_end_matches('/'))
}

/// Fetches and validates a peer's newest snapshot. `Ok(None)`: the peer has
/// none yet.
pub async fn fetch(
    client: &HttpClient,
    peer: &str,
    mesh_key: &MeshKey,
    timeout: Duration,
) -> Result<Option<Snapshot>, String> {
    let mut key = HeaderValue::from_str(&mesh_key.to_hex()).expect("hex is a header value");
    key.set_sensitive(true);
    let req = hyper::Request::get(snapshot_url(peer))
        .header(MESH_KEY_HEADER, key)
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("bad peer URL: {e}"))?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_SNAPSHOT)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        match status {
            StatusCode::OK => Snapshot::from_json(&body).map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(format!("peer answered HTTP {s}")),
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_mesh_key_is_authorized() {
        let k = MeshKey::generate();
        let hv = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(authorized(Some(&k), Some(&hv(&k.to_hex()))));
        assert!(!authorized(
            Some(&k),
            Some(&hv(&MeshKey::generate().to_hex()))
        ));
        assert!(!authorized(Some(&k), Some(&hv("zz"))));
        assert!(!authorized(Some(&k), None));
        assert!(!authorized(None, Some(&hv(&k.to_hex()))));
        let zero = MeshKey::from_bytes([0; 32]);
        assert!(!authorized(Some(&zero), Some(&hv(&zero.to_hex()))));
        assert_eq!(snapshot_url("http://a:1/"), "http://a:1/derpd/v1/snapshot");
    }
}
