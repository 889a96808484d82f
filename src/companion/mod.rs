//! The headscale companion: a durable, replicated cache of headscale's node
//! list that answers admission while headscale is away.
//!
//! - [`sync`] polls headscale's `GET /api/v1/node` ([`headscale`] parses it);
//! - [`store`] keeps every good sync as a versioned snapshot in redb;
//! - [`replicate`] shares the newest snapshot with mesh peers;
//! - [`admission`] decides on new DERP clients (the relay's hook);
//! - [`verify`] answers headscale's `POST /verify` from the cache;
//! - [`derpmap`] serves `/derpmap.json`; [`http`] routes the endpoints.

pub mod admission;
pub mod derpmap;
pub mod headscale;
pub mod http;
pub mod metrics;
pub mod model;
pub mod reason;
pub mod refresh;
pub mod replicate;
pub mod shrink;
pub mod store;
pub mod sync;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use admission::{Admission, Chain, HeadscaleAdmission, Policy, UrlAdmission, UrlConfig};
use headscale::FetchError;
use metrics::CompanionMetrics;
use model::{Cache, Snapshot};
use refresh::MissRefresh;
use store::Store;

use crate::proto::MeshKey;

/// The HTTP(S) client the companion uses (headscale, peers, verify URL).
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Where headscale is and how to ask it.
#[derive(Debug, Clone)]
pub struct HeadscaleSource {
    /// Base URL, e.g. `https://headscale.example.com`.
    pub url: String,
    /// File holding the API key (read on every sync; trimmed).
    pub api_key_file: PathBuf,
}

/// The companion's settings (resolved from flags/TOML in `config.rs`).
#[derive(Debug, Clone)]
pub struct CompanionConfig {
    /// headscale to sync from (`None`: only peers feed the cache).
    pub headscale: Option<HeadscaleSource>,
    /// Poll interval (default 10 s).
    pub poll_interval: Duration,
    /// Timeout of one headscale or peer request (default 5 s).
    pub request_timeout: Duration,
    /// Directory of the snapshot database (`None`: memory only).
    pub state_dir: Option<PathBuf>,
    /// Base URLs of peer relays to fetch snapshots from.
    pub peers: Vec<String>,
    /// `--verify-clients headscale`: admit only cached nodes.
    pub verify_clients: bool,
    /// Allow-lists and the empty-cache rule.
    pub policy: Policy,
    /// Tailscale's `--verify-client-url`.
    pub verify_url: Option<UrlConfig>,
    /// The DERP map to serve at `/derpmap.json`.
    pub derp_map: Option<derpmap::DerpMap>,
    /// An extra CA the companion's HTTPS client trusts (headscale, peers,
    /// the verify URL), besides the system store and the web PKI roots.
    pub headscale_ca_file: Option<PathBuf>,
    /// When a node list that would shrink the cache sharply is applied.
    pub shrink: shrink::ShrinkPolicy,
}

impl Default for CompanionConfig {
    fn default() -> Self {
        CompanionConfig {
            headscale: None,
            poll_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            state_dir: None,
            peers: Vec::new(),
            verify_clients: false,
            policy: Policy::default(),
            verify_url: None,
            derp_map: None,
            headscale_ca_file: None,
            shrink: shrink::ShrinkPolicy::default(),
        }
    }
}

impl CompanionConfig {
    /// Whether a node cache is kept (something feeds it or reads it).
    pub fn keeps_cache(&self) -> bool {
        self.headscale.is_some() || !self.peers.is_empty() || self.verify_clients
    }
}

/// Why the companion could not start.
#[derive(Debug, thiserror::Error)]
pub enum CompanionError {
    /// The snapshot store could not be opened or read.
    #[error("companion state: {0}")]
    Store(#[from] store::StoreError),
    /// `--headscale-ca-file` is unusable.
    #[error("headscale-ca-file: {0}")]
    CaFile(#[from] crate::trust::TrustError),
}

/// A running companion.
pub struct Companion {
    config: CompanionConfig,
    cache: Arc<Cache>,
    store: Option<Arc<Store>>,
    metrics: Arc<CompanionMetrics>,
    mesh_key: Option<MeshKey>,
    client: HttpClient,
    derp_map_json: Option<Bytes>,
    admission: Option<Arc<dyn Admission>>,
    /// Refresh-on-miss (present when headscale is configured).
    refresh: Option<Arc<MissRefresh>>,
    /// Holds back answers that would empty the cache.
    shrink: parking_lot::Mutex<shrink::ShrinkGuard>,
}

/// Builds the companion's HTTP client: HTTP, and HTTPS trusting the system
/// store, the web PKI roots and `ca_file` (`--headscale-ca-file`).
pub fn http_client(ca_file: Option<&std::path::Path>) -> Result<HttpClient, CompanionError> {
    let tls = crate::trust::client_config(ca_file)?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https))
}

impl Companion {
    /// Opens the store and loads its newest snapshot (so admission works
    /// before the first sync), and registers the metrics in `registry`. The
    /// background sync is [`Companion::run`].
    pub fn start(
        config: CompanionConfig,
        mesh_key: Option<MeshKey>,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Companion>, CompanionError> {
        let cache = Arc::new(Cache::default());
        let metrics = Arc::new(CompanionMetrics::register(registry, cache.clone()));
        let store = match (&config.state_dir, config.keeps_cache()) {
            (Some(dir), true) => {
                let s = Store::open(dir)?;
                if let Some(snap) = s.load_newest()? {
                    tracing::info!(
                        nodes = snap.nodes.len(),
                        fetched_at_ms = snap.fetched_at_ms,
                        "loaded the cached headscale snapshot"
                    );
                    cache.install_if_newer(Arc::new(snap));
                }
                Some(Arc::new(s))
            }
            _ => None,
        };
        let client = http_client(config.headscale_ca_file.as_deref())?;
        let refresh = config.headscale.as_ref().map(|_| {
            Arc::new(MissRefresh::new(
                refresh::DEFAULT_MIN_GAP,
                refresh::DEFAULT_MAX_WAIT,
            ))
        });
        let mut checks: Vec<Arc<dyn Admission>> = Vec::new();
        if config.verify_clients {
            checks.push(Arc::new(HeadscaleAdmission::new(
                cache.clone(),
                config.policy.clone(),
                metrics.clone(),
                refresh.clone(),
            )));
        }
        if let Some(u) = &config.verify_url {
            checks.push(Arc::new(UrlAdmission::new(
                u.clone(),
                client.clone(),
                metrics.clone(),
            )));
        }
        let admission: Option<Arc<dyn Admission>> = match checks.len() {
            0 => None,
            1 => checks.pop(),
            _ => Some(Arc::new(Chain(checks))),
        };
        let shrink = parking_lot::Mutex::new(shrink::ShrinkGuard::new(config.shrink));
        Ok(Arc::new(Companion {
            derp_map_json: config.derp_map.as_ref().map(|m| Bytes::from(m.to_json())),
            config,
            cache,
            store,
            metrics,
            mesh_key,
            client,
            admission,
            refresh,
            shrink,
        }))
    }

    /// Runs the sync loop until `shutdown` (nothing to do without a cache
    /// source).
    pub async fn run(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        if self.config.headscale.is_none() && self.config.peers.is_empty() {
            return;
        }
        match self.refresh.clone() {
            Some(refresh) => {
                let me = self.clone();
                let fetch = move || {
                    let me = me.clone();
                    async move {
                        let _ = me.sync_once(sync::SyncCause::Miss).await;
                    }
                };
                tokio::join!(
                    refresh.run(fetch, shutdown.clone()),
                    sync::run(self, shutdown)
                );
            }
            None => sync::run(self, shutdown).await,
        }
    }

    /// For a key the cache does not know: fetches the node list again (or
    /// joins a fetch about to start) and waits for it, boundedly. Returns
    /// whether a fresh list arrived; `false` at once while headscale is
    /// failing or not configured.
    pub async fn refresh_on_miss(&self) -> bool {
        match &self.refresh {
            Some(r) => r.refresh().await,
            None => false,
        }
    }

    /// The admission hook for the relay, if any check is configured.
    pub fn admission(&self) -> Option<Arc<dyn Admission>> {
        self.admission.clone()
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The newest snapshot.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.cache.view().map(|v| v.snapshot.clone())
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<CompanionMetrics> {
        &self.metrics
    }

    /// `/readyz`: a snapshot is loaded, or admission does not depend on one.
    pub fn is_ready(&self) -> bool {
        !self.config.verify_clients || self.cache.view().is_some()
    }

    /// What `/readyz` says about the companion: whether it is ready, and
    /// one line each on headscale and the cache.
    pub fn readiness(&self) -> (bool, Vec<String>) {
        let mut lines = Vec::new();
        if let Some(hs) = &self.config.headscale {
            let state = match &self.refresh {
                Some(r) if !r.is_healthy() => "failing (serving the cached snapshot)",
                _ => "ok",
            };
            lines.push(format!("headscale {}: last sync {state}", hs.url));
        }
        if self.config.keeps_cache() {
            lines.push(match self.cache.view() {
                Some(v) => format!(
                    "cache: {} nodes, fetched {:.1}s ago",
                    v.len(),
                    (model::now_ms() - v.snapshot.fetched_at_ms as i64).max(0) as f64 / 1000.0
                ),
                None => "cache: no headscale snapshot loaded yet".to_owned(),
            });
        }
        (self.is_ready(), lines)
    }

    /// Persists `snap` and installs it if it is newer than the cached one.
    /// Returns whether it was installed.
    pub async fn install(&self, snap: Snapshot) -> Result<bool, FetchError> {
        if let Some(cur) = self.snapshot() {
            if !snap.is_newer_than(&cur) {
                return Ok(false);
            }
        }
        let snap = Arc::new(snap);
        if let Some(store) = &self.store {
            let (store, s) = (store.clone(), snap.clone());
            tokio::task::spawn_blocking(move || store.save(&s))
                .await
                .map_err(|e| FetchError::Store(e.to_string()))?
                .map_err(|e| FetchError::Store(e.to_string()))?;
        }
        Ok(self.cache.install_if_newer(snap))
    }

    /// One sync from headscale; returns the number of nodes cached.
    pub async fn sync_once(&self, cause: sync::SyncCause) -> Result<usize, FetchError> {
        let Some(hs) = &self.config.headscale else {
            return Ok(0);
        };
        self.metrics.sync_attempts.inc();
        self.metrics.refresh(cause);
        let result = async {
            let key = sync::read_api_key(&hs.api_key_file)?;
            let list =
                sync::fetch_nodes(&self.client, &hs.url, &key, self.config.request_timeout).await?;
            let n = list.nodes.len();
            let cached = self.cache.view().map_or(0, |v| v.len());
            let verdict = self.shrink.lock().judge(cached, n, std::time::Instant::now());
            self.metrics.shrink_holding(self.shrink.lock().holding());
            match verdict {
                shrink::Verdict::Hold { seen, since } => {
                    self.metrics.shrink_held();
                    if seen == 1 {
                        tracing::warn!(
                            cached,
                            answered = n,
                            "headscale's node list would shrink the cache sharply; keeping the cached nodes until the shrink is confirmed over several syncs"
                        );
                    } else {
                        tracing::debug!(cached, answered = n, seen, ?since, "shrink still held");
                    }
                    return Ok(cached);
                }
                // Applied although sharp: the shrink was confirmed.
                shrink::Verdict::Apply if self.shrink.lock().is_sharp(cached, n) => {
                    tracing::warn!(cached, answered = n, "headscale's shrunk node list was confirmed; applying it");
                }
                shrink::Verdict::Apply => {}
            }
            let snap = Snapshot::new(list.nodes, model::now_ms().max(0) as u64);
            self.install(snap).await?;
            Ok(n)
        }
        .await;
        if let Err(e) = &result {
            self.metrics.sync_failed(e);
        }
        if let Some(r) = &self.refresh {
            r.set_healthy(result.is_ok());
        }
        result
    }

    /// Asks every peer for its newest snapshot and installs the newest one
    /// that is newer than ours.
    pub async fn fetch_from_peers(&self) {
        let Some(mesh_key) = &self.mesh_key else {
            return;
        };
        let mut best: Option<Snapshot> = None;
        for peer in &self.config.peers {
            match replicate::fetch(&self.client, peer, mesh_key, self.config.request_timeout).await
            {
                Ok(Some(s)) => {
                    if best.as_ref().is_none_or(|b| s.is_newer_than(b)) {
                        best = Some(s);
                    }
                }
                Ok(None) => self.metrics.replication("fetched", "empty"),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "snapshot fetch from peer failed");
                    self.metrics.replication("fetched", "error");
                }
            }
        }
        let Some(s) = best else { return };
        let (nodes, at) = (s.nodes.len(), s.fetched_at_ms);
        match self.install(s).await {
            Ok(true) => {
                tracing::info!(
                    nodes,
                    fetched_at_ms = at,
                    "installed a newer snapshot from a peer relay"
                );
                self.metrics.replication("fetched", "installed");
            }
            Ok(false) => self.metrics.replication("fetched", "not_newer"),
            Err(e) => {
                tracing::warn!(error = %e, "could not store a peer's snapshot");
                self.metrics.replication("fetched", "error");
            }
        }
    }
}
