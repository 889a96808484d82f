//! `POST /verify`: the admission endpoint headscale serves for Tailscale's
//! `--verify-client-url`, answered from the cache. Same contract: POST only,
//! body at most 4 KiB of `{"NodePublic":"nodekey:<hex>","Source":"<ip>"}`,
//! `200` + `{"Allow":bool}\n`; bad JSON → 400, oversize → 413.

use std::net::IpAddr;

use serde::Deserialize;

use super::model::CacheView;
use crate::proto::NodePublic;

/// Largest request body.
pub const MAX_BODY: usize = 4096;

/// The allow answer, byte for byte as headscale writes it.
pub const ALLOW: &[u8] = b"{\"Allow\":true}\n";
/// The deny answer.
pub const DENY: &[u8] = b"{\"Allow\":false}\n";

#[derive(Deserialize)]
struct Request {
    #[serde(rename = "NodePublic", default)]
    node_public: Option<String>,
    #[serde(rename = "Source", default)]
    source: Option<String>,
}

/// What to answer to a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `200 {"Allow":…}`.
    Allow(bool),
    /// `400` with a reason.
    BadRequest(String),
}

/// Allow iff the key belongs to a cached node, exactly as headscale's
/// `/verify` answers (it does not look at expiry; derpd's own admission
/// does). The source address is checked for form only. An absent
/// `NodePublic` is the zero key: known to nobody.
pub fn answer(view: Option<&CacheView>, body: &[u8]) -> Answer {
    let req: Request = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Answer::BadRequest(e.to_string()),
    };
    let key = match req.node_public.as_deref() {
        None => NodePublic::ZERO,
        Some(s) => match s.parse::<NodePublic>() {
            Ok(k) => k,
            Err(e) => return Answer::BadRequest(format!("NodePublic: {e}")),
        },
    };
    if let Some(src) = req.source.as_deref().filter(|s| !s.is_empty()) {
        if src.parse::<IpAddr>().is_err() {
            return Answer::BadRequest("Source: not an IP address".into());
        }
    }
    Answer::Allow(view.and_then(|v| v.get(&key)).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::companion::model::{test_node, Snapshot};
    use std::sync::Arc;

    #[test]
    fn answers() {
        let known = test_node(1, Some("a"), &[], None);
        let expired = test_node(2, Some("a"), &[], Some(10));
        let v = CacheView::new(Arc::new(Snapshot::new(
            vec![known.clone(), expired.clone()],
            1,
        )));
        let body =
            |k: &NodePublic| format!("{{\"NodePublic\":\"{k}\",\"Source\":\"203.0.113.7\"}}");
        assert_eq!(
            answer(Some(&v), body(&known.node_key).as_bytes()),
            Answer::Allow(true)
        );
        assert_eq!(
            answer(Some(&v), body(&expired.node_key).as_bytes()),
            Answer::Allow(true)
        );
        assert_eq!(
            answer(None, body(&known.node_key).as_bytes()),
            Answer::Allow(false)
        );
        let stranger = crate::proto::NodePrivate::generate().public();
        assert_eq!(
            answer(Some(&v), body(&stranger).as_bytes()),
            Answer::Allow(false)
        );
        assert_eq!(answer(Some(&v), b"{}"), Answer::Allow(false));
        assert!(matches!(answer(Some(&v), b"nope"), Answer::BadRequest(_)));
        assert!(matches!(
            answer(Some(&v), br#"{"NodePublic":"nodekey:zz"}"#),
            Answer::BadRequest(_)
        ));
        let bad_src = format!("{{\"NodePublic\":\"{}\",\"Source\":\"x\"}}", known.node_key);
        assert!(matches!(
            answer(Some(&v), bad_src.as_bytes()),
            Answer::BadRequest(_)
        ));
        let v6 = format!(
            "{{\"NodePublic\":\"{}\",\"Source\":\"2001:db8::1\",\"Extra\":1}}",
            known.node_key
        );
        assert_eq!(answer(Some(&v), v6.as_bytes()), Answer::Allow(true));
    }
}
