//! Admission control: the hook the relay calls once a client's ClientInfo
//! has opened (mesh-key clients never reach it), and its implementations:
//! the headscale cache, Tailscale's `--verify-client-url`, and both chained.
//!
//! The decisions themselves ([`decide`], [`interpret_url_answer`]) are pure.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};

use super::metrics::CompanionMetrics;
use super::model::{now_ms, Cache, CacheView};
pub use super::reason::Reason;
use super::refresh::MissRefresh;
use super::HttpClient;
use crate::proto::NodePublic;

/// The future an admission check returns: `true` admits the client.
pub type AdmitFuture<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// Decides whether a (non-mesh) client may connect. A refused client is
/// closed without a word.
pub trait Admission: Send + Sync {
    /// Whether `key`, connecting from `remote`, is admitted.
    fn admit<'a>(&'a self, key: NodePublic, remote: SocketAddr) -> AdmitFuture<'a>;
}

/// A decision and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Admit?
    pub allow: bool,
    /// Why.
    pub reason: Reason,
}

impl Decision {
    fn new(allow: bool, reason: Reason) -> Decision {
        Decision { allow, reason }
    }
}

/// What to do while the cache has never been loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WhenEmpty {
    /// Refuse everyone (the default).
    #[default]
    Deny,
    /// Admit everyone.
    Allow,
}

/// The headscale admission policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Admit only nodes of these headscale users (empty = any user) …
    pub allow_users: Vec<String>,
    /// … or carrying one of these tags (empty = any). When either list is
    /// set, a node must match at least one entry of the lists given.
    pub allow_tags: Vec<String>,
    /// Before the first snapshot.
    pub when_empty: WhenEmpty,
}

/// The headscale-cache decision for `key` at `now_ms`.
pub fn decide(
    view: Option<&CacheView>,
    key: &NodePublic,
    now_ms: i64,
    policy: &Policy,
) -> Decision {
    let Some(view) = view else {
        return Decision::new(policy.when_empty == WhenEmpty::Allow, Reason::CacheEmpty);
    };
    let Some(node) = view.get(key) else {
        return Decision::new(false, Reason::Unknown);
    };
    if node.is_expired(now_ms) {
        return Decision::new(false, Reason::Expired);
    }
    if policy.allow_users.is_empty() && policy.allow_tags.is_empty() {
        return Decision::new(true, Reason::Known);
    }
    let user_ok = node
        .user
        .as_ref()
        .is_some_and(|u| policy.allow_users.iter().any(|a| a == u));
    let tag_ok = node
        .tags
        .iter()
        .any(|t| policy.allow_tags.iter().any(|a| a == t));
    if user_ok || tag_ok {
        Decision::new(true, Reason::Known)
    } else {
        Decision::new(false, Reason::NotAllowed)
    }
}

/// `--verify-clients headscale`: decisions from the cache. A key the cache
/// does not know (or a cache never filled) asks for a refresh first, when
/// headscale is configured, and is decided again once it has been fetched.
pub struct HeadscaleAdmission {
    cache: Arc<Cache>,
    policy: Policy,
    metrics: Arc<CompanionMetrics>,
    refresh: Option<Arc<MissRefresh>>,
}

impl HeadscaleAdmission {
    /// Admission over `cache`; misses go through `refresh` when given.
    pub fn new(
        cache: Arc<Cache>,
        policy: Policy,
        metrics: Arc<CompanionMetrics>,
        refresh: Option<Arc<MissRefresh>>,
    ) -> Self {
        HeadscaleAdmission {
            cache,
            policy,
            metrics,
            refresh,
        }
    }

    fn decide_now(&self, key: &NodePublic) -> Decision {
        let now = now_ms();
        self.cache.with_view(|v| decide(v, key, now, &self.policy))
    }

    /// The decision, counted.
    pub async fn check(&self, key: &NodePublic) -> Decision {
        let mut d = self.decide_now(key);
        let miss = !d.allow && matches!(d.reason, Reason::Unknown | Reason::CacheEmpty);
        if let (true, Some(refresh)) = (miss, &self.refresh) {
            if refresh.refresh().await {
                d = self.decide_now(key);
            }
            self.metrics.miss(d.allow);
        }
        self.metrics.decision(d.allow, d.reason);
        d
    }
}

impl Admission for HeadscaleAdmission {
    fn admit<'a>(&'a self, key: NodePublic, _remote: SocketAddr) -> AdmitFuture<'a> {
        Box::pin(async move { self.check(&key).await.allow })
    }
}

/// The body Tailscale's relay POSTs to a verify URL.
pub fn url_request_body(key: &NodePublic, remote: SocketAddr) -> String {
    serde_json::json!({
        "NodePublic": key.to_string(),
        "Source": remote.ip().to_canonical().to_string(),
    })
    .to_string()
}

/// How a verify-URL call ended, before interpretation.
#[derive(Debug)]
pub enum UrlOutcome {
    /// An HTTP answer (status and the first 4 KiB of the body, or `None`
    /// if reading the body failed).
    Answer(u16, Option<Bytes>),
    /// Transport error or timeout.
    Unreachable,
}

/// Tailscale's rules: transport error → fail-open decides; status ≠ 200 →
/// deny; body must decode as `{"Allow":bool}`.
pub fn interpret_url_answer(outcome: &UrlOutcome, fail_open: bool) -> Decision {
    #[derive(serde::Deserialize)]
    struct Resp {
        #[serde(rename = "Allow")]
        allow: bool,
    }
    match outcome {
        UrlOutcome::Unreachable => Decision::new(fail_open, Reason::UrlUnreachable),
        UrlOutcome::Answer(200, Some(body)) => match serde_json::from_slice::<Resp>(body) {
            Ok(r) if r.allow => Decision::new(true, Reason::UrlAllow),
            Ok(_) => Decision::new(false, Reason::UrlDeny),
            Err(_) => Decision::new(false, Reason::UrlDecode),
        },
        UrlOutcome::Answer(200, None) => Decision::new(false, Reason::UrlDecode),
        UrlOutcome::Answer(_, _) => Decision::new(false, Reason::UrlStatus),
    }
}

/// `--verify-client-url` settings.
#[derive(Debug, Clone)]
pub struct UrlConfig {
    /// The URL POSTed to.
    pub url: String,
    /// Admit when the URL cannot be reached (Tailscale's default: true).
    pub fail_open: bool,
    /// Request timeout (Tailscale: 5 s).
    pub timeout: Duration,
    /// Cache definitive answers this long (0 = no cache).
    pub cache_ttl: Duration,
}

/// Admission through a verify URL, with an optional short-lived cache of
/// definitive answers (fail-open admissions are never cached).
pub struct UrlAdmission {
    config: UrlConfig,
    client: HttpClient,
    cache: dashmap::DashMap<NodePublic, (bool, Instant)>,
    metrics: Arc<CompanionMetrics>,
}

/// Most entries in the verify-URL decision cache before it is cleared.
const URL_CACHE_MAX: usize = 100_000;

impl UrlAdmission {
    /// A verify-URL admission.
    pub fn new(config: UrlConfig, client: HttpClient, metrics: Arc<CompanionMetrics>) -> Self {
        UrlAdmission {
            config,
            client,
            cache: dashmap::DashMap::new(),
            metrics,
        }
    }

    async fn call(&self, key: &NodePublic, remote: SocketAddr) -> UrlOutcome {
        let req = hyper::Request::post(&self.config.url)
            .body(Full::new(Bytes::from(url_request_body(key, remote))));
        let Ok(req) = req else {
            return UrlOutcome::Unreachable;
        };
        let fut = async {
            let resp = self.client.request(req).await.ok()?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .ok()
                .map(|b| b.to_bytes());
            Some(UrlOutcome::Answer(status, body))
        };
        match tokio::time::timeout(self.config.timeout, fut).await {
            Ok(Some(o)) => o,
            _ => UrlOutcome::Unreachable,
        }
    }

    /// The decision, counted.
    pub async fn check(&self, key: NodePublic, remote: SocketAddr) -> Decision {
        let ttl = self.config.cache_ttl;
        if !ttl.is_zero() {
            if let Some(e) = self.cache.get(&key) {
                if e.1.elapsed() < ttl {
                    let d = Decision::new(e.0, Reason::UrlCached);
                    self.metrics.decision(d.allow, d.reason);
                    return d;
                }
            }
        }
        let outcome = self.call(&key, remote).await;
        let d = interpret_url_answer(&outcome, self.config.fail_open);
        if !ttl.is_zero() && matches!(outcome, UrlOutcome::Answer(..)) {
            if self.cache.len() >= URL_CACHE_MAX {
                self.cache.clear();
            }
            self.cache.insert(key, (d.allow, Instant::now()));
        }
        if d.reason == Reason::UrlUnreachable {
            tracing::warn!(
                fail_open = self.config.fail_open,
                "verify-client-url unreachable"
            );
        }
        self.metrics.decision(d.allow, d.reason);
        d
    }
}

impl Admission for UrlAdmission {
    fn admit<'a>(&'a self, key: NodePublic, remote: SocketAddr) -> AdmitFuture<'a> {
        Box::pin(async move { self.check(key, remote).await.allow })
    }
}

/// Every check must admit; the headscale cache is asked first (as
/// Tailscale asks its local tailscaled before the URL).
pub struct Chain(pub Vec<Arc<dyn Admission>>);

impl Admission for Chain {
    fn admit<'a>(&'a self, key: NodePublic, remote: SocketAddr) -> AdmitFuture<'a> {
        Box::pin(async move {
            for a in &self.0 {
                if !a.admit(key, remote).await {
                    return false;
                }
            }
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::companion::model::{test_node, Snapshot};

    fn view(nodes: Vec<crate::companion::model::Node>) -> CacheView {
        CacheView::new(Arc::new(Snapshot::new(nodes, 1)))
    }

    #[test]
    fn cache_decisions() {
        let known = test_node(1, Some("alice"), &[], None);
        let expired = test_node(2, Some("alice"), &[], Some(1_000));
        let future = test_node(3, Some("bob"), &["tag:ci"], Some(10_000));
        let stranger = crate::proto::NodePrivate::generate().public();
        let v = view(vec![known.clone(), expired.clone(), future.clone()]);
        let p = Policy::default();
        let d = |k: &NodePublic, p: &Policy| decide(Some(&v), k, 5_000, p);
        assert_eq!(d(&known.node_key, &p), Decision::new(true, Reason::Known));
        assert_eq!(
            d(&expired.node_key, &p),
            Decision::new(false, Reason::Expired)
        );
        assert_eq!(d(&future.node_key, &p), Decision::new(true, Reason::Known));
        assert_eq!(d(&stranger, &p), Decision::new(false, Reason::Unknown));

        let users = Policy {
            allow_users: vec!["bob".into()],
            ..Default::default()
        };
        assert_eq!(d(&known.node_key, &users).reason, Reason::NotAllowed);
        assert!(d(&future.node_key, &users).allow);
        let tags = Policy {
            allow_tags: vec!["tag:ci".into()],
            ..Default::default()
        };
        assert!(!d(&known.node_key, &tags).allow);
        assert!(d(&future.node_key, &tags).allow);
        let both = Policy {
            allow_users: vec!["alice".into()],
            allow_tags: vec!["tag:ci".into()],
            ..Default::default()
        };
        assert!(d(&known.node_key, &both).allow);
        assert!(d(&future.node_key, &both).allow);
        // Expiry wins over the allow-lists.
        assert_eq!(d(&expired.node_key, &both).reason, Reason::Expired);
    }

    #[test]
    fn empty_cache_policy() {
        let k = crate::proto::NodePrivate::generate().public();
        assert_eq!(
            decide(None, &k, 0, &Policy::default()),
            Decision::new(false, Reason::CacheEmpty)
        );
        let allow = Policy {
            when_empty: WhenEmpty::Allow,
            ..Default::default()
        };
        assert_eq!(
            decide(None, &k, 0, &allow),
            Decision::new(true, Reason::CacheEmpty)
        );
        // A synced but empty node list is not "never synced".
        assert_eq!(
            decide(Some(&view(vec![])), &k, 0, &allow).reason,
            Reason::Unknown
        );
    }

    #[test]
    fn url_answers_follow_tailscale() {
        let ok = |b: &'static [u8]| UrlOutcome::Answer(200, Some(Bytes::from_static(b)));
        assert!(interpret_url_answer(&ok(b"{\"Allow\":true}\n"), false).allow);
        assert_eq!(
            interpret_url_answer(&ok(b"{\"Allow\":false}"), true).reason,
            Reason::UrlDeny
        );
        assert_eq!(
            interpret_url_answer(&ok(b"yes"), true).reason,
            Reason::UrlDecode
        );
        let st = UrlOutcome::Answer(500, Some(Bytes::from_static(b"{\"Allow\":true}")));
        assert_eq!(
            interpret_url_answer(&st, true),
            Decision::new(false, Reason::UrlStatus)
        );
        assert!(interpret_url_answer(&UrlOutcome::Unreachable, true).allow);
        assert!(!interpret_url_answer(&UrlOutcome::Unreachable, false).allow);
    }

    #[test]
    fn url_request_body_is_tailscales() {
        let k = crate::proto::NodePrivate::generate().public();
        let b = url_request_body(&k, "203.0.113.7:41641".parse().unwrap());
        assert_eq!(
            b,
            format!("{{\"NodePublic\":\"{k}\",\"Source\":\"203.0.113.7\"}}")
        );
        let b = url_request_body(&k, "[::ffff:203.0.113.7]:1".parse().unwrap());
        assert!(b.ends_with("\"Source\":\"203.0.113.7\"}"), "{b}");
        let b = url_request_body(&k, "[2001:db8::1]:1".parse().unwrap());
        assert!(b.ends_with("\"Source\":\"2001:db8::1\"}"), "{b}");
    }
}
