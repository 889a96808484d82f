//! Starting a complete relay from a [`ServerConfig`]: the main listener
//! (plain or TLS), the plain-HTTP listener next to TLS, STUN, metrics; and
//! stopping it gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use crate::config::ServerConfig;
use crate::config::ShutdownSettings;
use crate::http::listener::{accept_loop, ConnLimiter};
use crate::http::{Front, FrontConfig};
use crate::mesh::{Mesh, MeshExt};
use crate::metrics::{Metrics, StunCollector};
use crate::proto::{MeshKey, NodePrivate};
use crate::relay::{ClientRateLimit, Relay};
use crate::stun::{self, StunStats};
use crate::tls::{TlsError, TlsManager};

/// A running relay.
pub struct Server {
    /// Where DERP/HTTP(S) is served.
    pub addr: SocketAddr,
    /// The plain-HTTP listener next to TLS, if any.
    pub http_addr: Option<SocketAddr>,
    /// Where STUN is served, if enabled.
    pub stun_addr: Option<SocketAddr>,
    /// Where metrics are served, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The relay.
    pub relay: Relay,
    /// STUN counters.
    pub stun_stats: Arc<StunStats>,
    /// TLS state, when the main listener is TLS.
    pub tls: Option<Arc<TlsManager>>,
    /// The headscale companion, when configured.
    pub companion: Option<Arc<crate::companion::Companion>>,
    shutdown_settings: ShutdownSettings,
    /// Stops the listeners (new connections).
    stop_accepting: CancellationToken,
    /// Stops everything else (STUN, metrics, background TLS work).
    stop_all: CancellationToken,
    tasks: JoinSet<()>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Error.
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The headscale companion could not start.
    #[error("{0}")]
    Companion(#[from] crate::companion::CompanionError),
    /// The mesh could not be set up.
    #[error("mesh: {0}")]
    Mesh(String),
}

impl Server {
    /// Binds every listener and starts serving.
    pub async fn start(
        config: ServerConfig,
        key: NodePrivate,
        mesh_key: Option<MeshKey>,
    ) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let companion = match &config.companion {
            // Loads the newest snapshot before any client is accepted.
            Some(c) => Some(crate::companion::Companion::start(
                c.clone(),
                mesh_key.clone(),
                &metrics.registry,
            )?),
            None => None,
        };
        let relay = Relay::new(
            key.clone(),
            mesh_key.clone(),
            config.relay.clone(),
            metrics.clone(),
        );
        // Every relay has a mesh (with no links unless peers are set), so the
        // mesh metrics and `/debug/mesh` are always there.
        Mesh::attach(&relay, key, mesh_key).map_err(StartError::Mesh)?;
        if let Some(c) = &companion {
            relay.set_admission(c.admission());
            relay.set_companion(c.clone());
        }
        let stop_accepting = CancellationToken::new();
        let stop_all = CancellationToken::new();
        let mut tasks = JoinSet::new();
        if let Some(c) = &companion {
            tasks.spawn(c.clone().run(stop_all.clone()));
        }
        let bind = |what, addr| move |source| StartError::Bind { what, addr, source };

        let tls = match &config.tls {
            Some(t) => Some(Arc::new(
                TlsManager::start(
                    t,
                    &config.hostname,
                    Some(&relay.public_key()),
                    stop_all.clone(),
                )
                .await?,
            )),
            None => None,
        };

        let listener = crate::http::listener::bind(
            config.addr,
            config.limits.listen_backlog,
            &config.limits.tcp,
        )
        .map_err(bind("derp", config.addr))?;
        let addr = listener.local_addr().map_err(bind("derp", config.addr))?;
        let front = Front::new(
            relay.clone(),
            FrontConfig {
                fast_start: config.fast_start,
                head_timeout: config.relay.handshake_timeout,
            },
        )
        .with_websocket(config.websocket);
        let limiter = Arc::new(ConnLimiter::new(&config.limits));
        register_limit_metrics(&metrics, &limiter);
        tasks.spawn(accept_loop(
            listener,
            tls.as_ref().map(|t| t.acceptor()),
            front,
            limiter,
            config.relay.handshake_timeout,
            stop_accepting.clone(),
        ));

        let mut http_addr = None;
        if let (Some(a), Some(tls)) = (config.http_addr, &tls) {
            let l =
                crate::http::listener::bind(a, config.limits.listen_backlog, &config.limits.tcp)
                    .map_err(bind("http", a))?;
            http_addr = Some(l.local_addr().map_err(bind("http", a))?);
            tasks.spawn(serve_port80(l, tls.clone(), stop_accepting.clone()));
        }

        if let Some(tls) = &tls {
            register_tls_metrics(&metrics, tls);
            // An ACME certificate is validated through the plain-HTTP
            // listener, which is up now: wait for the first one.
            if tls.mode() == crate::tls::CertMode::Letsencrypt && http_addr.is_some() {
                tls.wait_for_certificate(Duration::from_secs(120)).await?;
            }
        }

        // Free memory goes back to the system after many clients leave.
        let r = relay.clone();
        tasks.spawn(crate::memory::trim_after_drops(
            metrics.clone(),
            stop_all.clone(),
            move || r.shared().registry.shrink(),
        ));

        let stun_stats = Arc::new(StunStats::new());
        metrics
            .registry
            .register(Box::new(StunCollector::new(stun_stats.clone())))
            .expect("unique metric");
        let mut stun_addr = None;
        if let Some(a) = config.stun_addr {
            let sock = UdpSocket::bind(a).await.map_err(bind("stun", a))?;
            stun_addr = Some(sock.local_addr().map_err(bind("stun", a))?);
            let stop = stop_all.clone();
            tasks.spawn(stun::serve(
                Arc::new(sock),
                stun_stats.clone(),
                async move { stop.cancelled().await },
            ));
        }

        let mut metrics_addr = None;
        if let Some(a) = config.metrics_addr {
            let l = TcpListener::bind(a).await.map_err(bind("metrics", a))?;
            metrics_addr = Some(l.local_addr().map_err(bind("metrics", a))?);
            tasks.spawn(serve_metrics(l, metrics, relay.clone(), stop_all.clone()));
        }

        if !config.mesh.peers.is_empty() {
            let opts = crate::mesh::MeshOptions {
                hostname: config.hostname.clone(),
                port: addr.port(),
                ca_file: config.mesh.ca_file.clone(),
                tcp: config.limits.tcp,
                ..Default::default()
            };
            relay
                .mesh()
                .set_peers(&config.mesh.peers, &opts)
                .map_err(StartError::Mesh)?;
        }

        tracing::info!(
            %addr,
            tls = tls.is_some(),
            ?http_addr,
            ?stun_addr,
            ?metrics_addr,
            key = %relay.public_key(),
            "derpd serving"
        );
        Ok(Server {
            addr,
            http_addr,
            stun_addr,
            metrics_addr,
            relay,
            stun_stats,
            tls,
            companion,
            shutdown_settings: config.shutdown,
            stop_accepting,
            stop_all,
            tasks,
        })
    }

    /// The URL of the DERP endpoint (`http://` or `https://`).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}/derp", self.addr)
    }

    /// SIGHUP: applies a new per-client rate limit (if given) and re-reads
    /// certificates.
    pub fn reload(&self, rate: Option<ClientRateLimit>) {
        if let Some(rate) = rate {
            self.relay.set_client_rate(rate);
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("certificates reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "certificate reload failed; keeping the old one")
                }
            }
        }
    }

    /// Graceful stop (SIGTERM): stop accepting, send every client a
    /// `Restarting` frame with its own reconnect delay (spread over the
    /// configured window) and close each connection once its delay has
    /// passed, wait for clients to be gone (at most the shutdown timeout
    /// after the last one's turn), then stop everything.
    pub async fn shutdown_gracefully(self) {
        self.stop_accepting.cancel();
        let s = &self.shutdown_settings;
        let started = tokio::time::Instant::now();
        let (told, last) = self.relay.restart(crate::relay::RestartHints {
            reconnect_in: s.reconnect_in,
            spread: s.spread,
            try_for: s.try_for,
        });
        tracing::info!(
            clients = told,
            spread = ?s.spread,
            last_closed_in = ?last,
            "told clients the relay is restarting"
        );
        let deadline = started + last + s.timeout;
        while !self.relay.shared().registry.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.relay.shared().registry.len();
        if left > 0 {
            tracing::warn!(
                clients = left,
                "shutdown timeout reached; closing remaining clients"
            );
        }
        self.shutdown().await;
    }

    /// Immediate stop: closes listeners and every client.
    pub async fn shutdown(mut self) {
        self.stop_accepting.cancel();
        self.stop_all.cancel();
        self.relay.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

fn register_limit_metrics(metrics: &Metrics, limiter: &Arc<ConnLimiter>) {
    use crate::metrics::CallbackMetric;
    let (a, b) = (limiter.clone(), limiter.clone());
    for m in [
        CallbackMetric::new(
            "derpd_connections_open",
            "TCP connections admitted by the main listener and still open.",
            false,
            move || Some(a.open() as f64),
        ),
        CallbackMetric::new(
            "derpd_max_connections",
            "The configured --max-connections (0 = unlimited).",
            false,
            move || Some(b.max_connections() as f64),
        ),
    ] {
        metrics
            .registry
            .register(Box::new(m))
            .expect("unique metric");
    }
}

fn register_tls_metrics(metrics: &Metrics, tls: &Arc<TlsManager>) {
    use crate::metrics::CallbackMetric;
    let (a, b, c) = (tls.clone(), tls.clone(), tls.clone());
    for m in [
        CallbackMetric::new(
            "derpd_tls_certificates_installed_total",
            "Certificates put into service (initial load, reloads, ACME issuance and renewal).",
            true,
            move || Some(a.stats().installed as f64),
        ),
        CallbackMetric::new(
            "derpd_tls_certificate_failures_total",
            "Failed certificate loads, reloads or ACME orders (the old certificate stayed in service).",
            true,
            move || Some(b.stats().failed as f64),
        ),
        CallbackMetric::new(
            "derpd_tls_certificate_expiry_timestamp_seconds",
            "Unix time at which the served certificate expires.",
            false,
            move || {
                let der = c.current_certificate()?;
                let info = crate::tls::LeafInfo::parse(&der).ok()?;
                let t = info.not_after.duration_since(std::time::UNIX_EPOCH).ok()?;
                Some(t.as_secs_f64())
            },
        ),
    ] {
        metrics.registry.register(Box::new(m)).expect("unique metric");
    }
}

async fn serve_port80(listener: TcpListener, tls: Arc<TlsManager>, shutdown: CancellationToken) {
    serve_simple(listener, shutdown, move |req| {
        let tls = tls.clone();
        async move { crate::http::port80::handle(tls, req).await }
    })
    .await
}

async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    relay: Relay,
    shutdown: CancellationToken,
) {
    serve_simple(listener, shutdown, move |req| {
        let metrics = metrics.clone();
        let relay = relay.clone();
        async move {
            let resp = if req.uri().path() == "/debug/mesh" {
                let body = serde_json::to_vec_pretty(&relay.mesh().status()).expect("JSON");
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                r
            } else if req.uri().path() == "/metrics" {
                let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "text/plain; version=0.0.4; charset=utf-8",
                    ),
                );
                r
            } else {
                let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
                *r.status_mut() = StatusCode::NOT_FOUND;
                r
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    })
    .await
}

/// A small HTTP/1.1 server for auxiliary listeners.
async fn serve_simple<F, Fut>(listener: TcpListener, shutdown: CancellationToken, handler: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, std::convert::Infallible>>
        + Send
        + 'static,
{
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(handler);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
