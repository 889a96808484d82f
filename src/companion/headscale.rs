//! headscale's REST API as the companion reads it: the `GET /api/v1/node`
//! answer (v0.26 and v0.29+ shapes, unknown fields ignored) and how an HTTP
//! answer is classified. No I/O here.

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::model::Node;

/// Why a sync from headscale failed. The label names the metric reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// headscale rejected the API key (401, or 500 `Unauthorized`): a
    /// configuration error, not an outage.
    #[error("headscale rejected the API key (HTTP {0}); check --headscale-api-key-file")]
    Auth(u16),
    /// The API key file could not be read or is empty.
    #[error("API key file: {0}")]
    KeyFile(String),
    /// headscale could not be reached (connect/TLS/transport error).
    #[error("headscale unreachable: {0}")]
    Unreachable(String),
    /// No complete answer within the request timeout.
    #[error("headscale did not answer within the request timeout")]
    Timeout,
    /// Any other HTTP status.
    #[error("headscale answered HTTP {0}")]
    Status(u16),
    /// The body is longer than the companion accepts.
    #[error("headscale's answer is longer than {0} bytes")]
    TooLarge(usize),
    /// The body is not a node list.
    #[error("headscale's node list could not be decoded: {0}")]
    Decode(String),
    /// The snapshot could not be stored.
    #[error("snapshot store: {0}")]
    Store(String),
}

impl FetchError {
    /// The `reason` label.
    pub fn label(&self) -> &'static str {
        match self {
            FetchError::Auth(_) => "auth",
            FetchError::KeyFile(_) => "api_key_file",
            FetchError::Unreachable(_) => "unreachable",
            FetchError::Timeout => "timeout",
            FetchError::Status(_) => "http_status",
            FetchError::TooLarge(_) => "body_too_large",
            FetchError::Decode(_) => "decode",
            FetchError::Store(_) => "store",
        }
    }

    /// Every label, for pre-registering the metric.
    pub const LABELS: [&'static str; 8] = [
        "auth",
        "api_key_file",
        "unreachable",
        "timeout",
        "http_status",
        "body_too_large",
        "decode",
        "store",
    ];
}

/// Turns headscale's answer into nodes, or says why not.
pub fn classify(status: u16, body: &[u8]) -> Result<ParsedList, FetchError> {
    match status {
        200 => parse_node_list(body),
        401 => Err(FetchError::Auth(401)),
        // headscale answers a malformed or wrong key with 500 "Unauthorized".
        500 if body.trim_ascii() == b"Unauthorized" => Err(FetchError::Auth(500)),
        s => Err(FetchError::Status(s)),
    }
}

/// A decoded node list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedList {
    /// Nodes that could be cached.
    pub nodes: Vec<Node>,
}

#[derive(Deserialize)]
struct ListNodes {
    /// headscale always writes the list, `[]` when empty.
    nodes: Vec<ApiNode>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiNode {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    given_name: Option<String>,
    #[serde(default)]
    node_key: Option<String>,
    #[serde(default)]
    user: Option<ApiUser>,
    /// v0.29+.
    #[serde(default)]
    tags: Option<Vec<String>>,
    /// v0.26: operator-forced tags.
    #[serde(default)]
    forced_tags: Option<Vec<String>>,
    /// v0.26: tags the node requested and the policy allows.
    #[serde(default)]
    valid_tags: Option<Vec<String>>,
    #[serde(default)]
    expiry: Option<String>,
    #[serde(default)]
    last_seen: Option<String>,
}

#[derive(Deserialize)]
struct ApiUser {
    #[serde(default)]
    name: Option<String>,
}

/// Parses the body of `GET /api/v1/node`: a JSON object whose `nodes` is
/// a list of nodes, every one with a valid `nodeKey`. Anything else (an
/// array, an object without `nodes`, a node without a usable key) is a
/// decode failure as a whole, so a broken answer never replaces a good
/// cache.
pub fn parse_node_list(body: &[u8]) -> Result<ParsedList, FetchError> {
    if !body.trim_ascii_start().starts_with(b"{") {
        return Err(FetchError::Decode("the answer is not a JSON object".into()));
    }
    let list: ListNodes =
        serde_json::from_slice(body).map_err(|e| FetchError::Decode(e.to_string()))?;
    let mut out = ParsedList {
        nodes: Vec::with_capacity(list.nodes.len()),
    };
    for (i, n) in list.nodes.into_iter().enumerate() {
        match convert(n) {
            Some(node) => out.nodes.push(node),
            None => return Err(FetchError::Decode(format!("node {i} has no valid nodeKey"))),
        }
    }
    Ok(out)
}

fn convert(n: ApiNode) -> Option<Node> {
    let node_key = n.node_key.as_deref()?.trim().parse().ok()?;
    let id = match &n.id {
        Some(serde_json::Value::String(s)) => s.parse().unwrap_or(0),
        Some(serde_json::Value::Number(x)) => x.as_u64().unwrap_or(0),
        _ => 0,
    };
    let mut tags: Vec<String> = n.tags.unwrap_or_default();
    tags.extend(n.forced_tags.unwrap_or_default());
    tags.extend(n.valid_tags.unwrap_or_default());
    tags.sort();
    tags.dedup();
    let name = n
        .given_name
        .filter(|s| !s.is_empty())
        .or(n.name)
        .unwrap_or_default();
    Some(Node {
        id,
        name,
        node_key,
        user: n.user.and_then(|u| u.name).filter(|s| !s.is_empty()),
        tags,
        // An expiry we cannot read is treated as already expired (fail closed).
        expiry_ms: n
            .expiry
            .as_deref()
            .and_then(|s| parse_time(s).unwrap_or(Some(0))),
        last_seen_ms: n
            .last_seen
            .as_deref()
            .and_then(|s| parse_time(s).ok().flatten()),
    })
}

/// Parses an RFC 3339 time to Unix milliseconds. `Ok(None)` for "no time":
/// the empty string and Go's zero time `0001-01-01T00:00:00Z`.
pub fn parse_time(s: &str) -> Result<Option<i64>, time::error::Parse> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let t = OffsetDateTime::parse(s, &Rfc3339)?;
    if t.year() <= 1 {
        return Ok(None);
    }
    Ok(Some((t.unix_timestamp_nanos() / 1_000_000) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V026: &str = r#"{"nodes":[{"id":"1", "machineKey":"mkey:fe92", "nodeKey":"nodekey:0f815a239609179f6571d60fe2aea779897d8e52dbc1f39321f89f0a189dff65", "name":"a", "user":{"id":"1", "name":"e2e"}, "lastSeen":"2026-11-22T05:18:29.982408545Z", "expiry":null, "forcedTags":["tag:f"], "invalidTags":["tag:bad"], "validTags":["tag:v"], "givenName":"a", "online":true},
        {"id":"2","nodeKey":"nodekey:eaa7baa9aaae9a6df7ea8074a3cc7ce0499c5ef50cbb43ed276786364c7f0c61","name":"b","user":{"name":"e2e"},"expiry":"0001-01-01T00:00:00Z","forcedTags":[],"validTags":[],"invalidTags":[]}]}"#;

    #[test]
    fn v026_shape() {
        let p = parse_node_list(V026.as_bytes()).unwrap();
        assert_eq!(p.nodes.len(), 2);
        let a = &p.nodes[0];
        assert_eq!(a.id, 1);
        assert_eq!(a.user.as_deref(), Some("e2e"));
        assert_eq!(a.tags, vec!["tag:f".to_string(), "tag:v".to_string()]);
        assert_eq!(a.expiry_ms, None);
        assert_eq!(a.last_seen_ms, Some(1_795_324_709_982));
        assert_eq!(p.nodes[1].expiry_ms, None, "Go zero time = never");
    }

    #[test]
    fn v029_shape_with_null_user_and_tags() {
        let body = r#"{"nodes":[{"id":"7","nodeKey":"nodekey:0f815a239609179f6571d60fe2aea779897d8e52dbc1f39321f89f0a189dff65","givenName":"node-b","name":"node-b","user":null,"tags":["tag:initial"],"expiry":"2020-01-01T00:00:00.123456789Z","somethingNew":{"x":1}}]}"#;
        let p = parse_node_list(body.as_bytes()).unwrap();
        assert_eq!(p.nodes.len(), 1);
        let n = &p.nodes[0];
        assert_eq!(
            (n.id, n.user.clone(), n.tags.clone()),
            (7, None, vec!["tag:initial".to_string()])
        );
        assert_eq!(n.expiry_ms, Some(1_577_836_800_123));
        assert!(parse_node_list(br#"{"nodes":[]}"#)
            .unwrap()
            .nodes
            .is_empty());
    }

    #[test]
    fn answers_without_usable_nodes_are_decode_failures() {
        let good = r#"{"id":"7","nodeKey":"nodekey:0f815a239609179f6571d60fe2aea779897d8e52dbc1f39321f89f0a189dff65"}"#;
        for body in [
            "[]".to_owned(),
            "{}".to_owned(),
            "null".to_owned(),
            r#"{"nodes":null}"#.to_owned(),
            r#"{"nodes":[{}]}"#.to_owned(),
            r#"{"nodes":[{"nodeKey":"nodekey:zz"}]}"#.to_owned(),
            r#"{"nodes":[{"nodeKey":"<secret>"}]}"#.to_owned(),
            format!(r#"{{"nodes":[{good},{{"id":"9"}}]}}"#),
        ] {
            assert!(
                matches!(parse_node_list(body.as_bytes()), Err(FetchError::Decode(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn unreadable_expiry_fails_closed() {
        let body = r#"{"nodes":[{"id":"1","nodeKey":"nodekey:0f815a239609179f6571d60fe2aea779897d8e52dbc1f39321f89f0a189dff65","expiry":"tomorrow"}]}"#;
        let p = parse_node_list(body.as_bytes()).unwrap();
        assert!(p.nodes[0].is_expired(1));
    }

    #[test]
    fn classification() {
        assert_eq!(classify(401, b""), Err(FetchError::Auth(401)));
        assert_eq!(classify(500, b"Unauthorized"), Err(FetchError::Auth(500)));
        assert_eq!(classify(500, b"Unauthorized\n"), Err(FetchError::Auth(500)));
        assert_eq!(
            classify(500, b"database is locked"),
            Err(FetchError::Status(500))
        );
        assert_eq!(classify(503, b""), Err(FetchError::Status(503)));
        assert!(matches!(
            classify(200, b"<html>"),
            Err(FetchError::Decode(_))
        ));
        assert!(classify(200, br#"{"nodes":[]}"#).is_ok());
    }
}
