//! Starting a complete relay: listeners, STUN, metrics, and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::http::{Front, FrontConfig};
use crate::metrics::Metrics;
use crate::proto::{MeshKey, NodePrivate};
use crate::relay::{Relay, RelayConfig};
use crate::stun::{self, StunStats};

/// Everything needed to start a relay.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Main DERP/HTTP listen address.
    pub addr: SocketAddr,
    /// STUN listen address (`None` = no STUN).
    pub stun_addr: Option<SocketAddr>,
    /// Metrics listen address (`None` = no metrics listener).
    pub metrics_addr: Option<SocketAddr>,
    /// Relay core tunables.
    pub relay: RelayConfig,
    /// Honour `Derp-Fast-Start`.
    pub fast_start: bool,
}

impl ServerConfig {
    /// Loopback, any free port, no STUN or metrics listener: for tests.
    pub fn loopback_ephemeral() -> ServerConfig {
        ServerConfig {
            addr: "127.0.0.1:0".parse().expect("valid address"),
            stun_addr: None,
            metrics_addr: None,
            relay: RelayConfig::default(),
            fast_start: true,
        }
    }
}

/// A running relay.
pub struct Server {
    /// Where DERP/HTTP is served.
    pub addr: SocketAddr,
    /// Where STUN is served, if enabled.
    pub stun_addr: Option<SocketAddr>,
    /// Where metrics are served, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The relay.
    pub relay: Relay,
    /// STUN counters.
    pub stun_stats: Arc<StunStats>,
    shutdown: CancellationToken,
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
}

impl Server {
    /// Binds every listener and starts serving.
    pub async fn start(
        config: ServerConfig,
        key: NodePrivate,
        mesh_key: Option<MeshKey>,
    ) -> Result<Server, StartError> {
        let metrics = Arc::new(Metrics::new());
        let relay = Relay::new(key, mesh_key, config.relay.clone(), metrics.clone());
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();

        let bind = |what, addr| move |source| StartError::Bind { what, addr, source };
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(bind("derp", config.addr))?;
        let addr = listener.local_addr().map_err(bind("derp", config.addr))?;
        let front = Front::new(
            relay.clone(),
            FrontConfig {
                fast_start: config.fast_start,
            },
        );
        tasks.spawn(crate::http::serve(listener, front, shutdown.clone()));

        let stun_stats = Arc::new(StunStats::new());
        let mut stun_addr = None;
        if let Some(a) = config.stun_addr {
            let sock = UdpSocket::bind(a).await.map_err(bind("stun", a))?;
            stun_addr = Some(sock.local_addr().map_err(bind("stun", a))?);
            let stop = shutdown.clone();
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
            tasks.spawn(serve_metrics(l, metrics, shutdown.clone()));
        }

        tracing::info!(%addr, ?stun_addr, ?metrics_addr, key = %relay.public_key(), "derpd serving");
        Ok(Server {
            addr,
            stun_addr,
            metrics_addr,
            relay,
            stun_stats,
            shutdown,
            tasks,
        })
    }

    /// The `http://` URL of the DERP endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/derp", self.addr)
    }

    /// Stops accepting, closes every client and waits for the listeners.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.relay.shutdown();
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(_) => continue,
            },
            _ = shutdown.cancelled() => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let metrics = metrics.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
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
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
