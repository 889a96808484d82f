//! The accept loop of a listener: connection limits (concurrency cap and
//! accept-rate bucket), the TLS handshake when TLS is on, then
//! [`super::serve_stream`]. Over-limit connections are closed at once and
//! counted; the loop itself never stops on a rejection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::tls::accept::Acceptor;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::Front;
use crate::relay::ratelimit::TokenBucket;

/// Connection limits and socket options of the listeners.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most concurrent connections (0 = unlimited).
    pub max_connections: usize,
    /// Accepted connections per second (0 = unlimited).
    pub accept_per_sec: f64,
    /// Accept burst.
    pub accept_burst: u32,
    /// Keepalive and user timeout of accepted connections and mesh links.
    pub tcp: crate::sockopt::TcpTimeouts,
    /// Listen backlog of the main and plain-HTTP listeners.
    pub listen_backlog: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 0,
            accept_per_sec: 0.0,
            accept_burst: 0,
            tcp: crate::sockopt::TcpTimeouts::default(),
            listen_backlog: DEFAULT_BACKLOG,
        }
    }
}

/// Shared limit state of one or more listeners.
pub struct ConnLimiter {
    slots: Option<Arc<Semaphore>>,
    accept_rate: Option<Mutex<TokenBucket>>,
    /// Keepalive and user timeout set on every accepted connection.
    pub tcp: crate::sockopt::TcpTimeouts,
    max: usize,
    open: Arc<AtomicUsize>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `max-connections` are open.
    MaxConnections,
    /// The accept-rate bucket is empty.
    AcceptRate,
}

impl Rejection {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::MaxConnections => "max_connections",
            Rejection::AcceptRate => "accept_rate",
        }
    }
}

/// Held for as long as an admitted connection lives.
pub struct Slot {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    open: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnLimiter {
    /// Limits as configured (zeros mean unlimited).
    pub fn new(limits: &Limits) -> ConnLimiter {
        ConnLimiter {
            slots: (limits.max_connections > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_connections))),
            accept_rate: (limits.accept_per_sec > 0.0).then(|| {
                Mutex::new(TokenBucket::new(
                    limits.accept_per_sec,
                    f64::from(limits.accept_burst.max(1)),
                ))
            }),
            tcp: limits.tcp,
            max: limits.max_connections,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The configured `max-connections` (0 = unlimited).
    pub fn max_connections(&self) -> usize {
        self.max
    }

    /// Admitted connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Admits a new connection or says why not.
    pub fn admit(&self) -> Result<Slot, Rejection> {
        if let Some(b) = &self.accept_rate {
            if !b.lock().try_take(1.0) {
                return Err(Rejection::AcceptRate);
            }
        }
        let permit = match &self.slots {
            Some(s) => Some(
                s.clone()
                    .try_acquire_owned()
                    .map_err(|_| Rejection::MaxConnections)?,
            ),
            None => None,
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            _permit: permit,
            open: self.open.clone(),
        })
    }
}

/// Default listen backlog (as Tailscale's relay; the kernel caps it at
/// `net.core.somaxconn`).
pub const DEFAULT_BACKLOG: u32 = 4096;

/// Binds a TCP listener with `SO_REUSEADDR` and the given backlog.
///
/// Accepted sockets inherit TCP_NODELAY and `tcp`'s keepalive and user
/// timeout from the listener (Linux clones the listening socket), so they
/// are set here, before `listen`, and not with five system calls per
/// connection.
pub fn bind(
    addr: std::net::SocketAddr,
    backlog: u32,
    tcp: &crate::sockopt::TcpTimeouts,
) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    tcp.apply(&socket)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Accept errors (out of file descriptors and the like) back off from
/// 5 ms, doubling, to 1 s, and are logged once per episode.
struct AcceptBackoff {
    errors: u64,
    delay: Duration,
}

impl AcceptBackoff {
    const MIN: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn new() -> AcceptBackoff {
        AcceptBackoff {
            errors: 0,
            delay: Self::MIN,
        }
    }

    /// Records a failure; returns how long to wait before accepting again.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        if self.errors == 0 {
            tracing::warn!(error = %e, "accept failing (out of file descriptors?); backing off up to 1s, logging once until it recovers");
        }
        self.errors += 1;
        let d = self.delay;
        self.delay = (self.delay * 2).min(Self::MAX);
        d
    }

    /// Records a success, ending an episode of failures.
    fn succeeded(&mut self) {
        if self.errors > 0 {
            tracing::warn!(errors = self.errors, "accept recovered");
            *self = AcceptBackoff::new();
        }
    }
}

/// Accepts on `listener` until `shutdown` is cancelled.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<Acceptor>,
    front: Front,
    limiter: Arc<ConnLimiter>,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) {
    let metrics = front.relay.metrics().clone();
    let mut backoff = AcceptBackoff::new();
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    metrics.accept_errors.inc();
                    let wait = backoff.failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        backoff.succeeded();
        let slot = match limiter.admit() {
            Ok(s) => s,
            Err(why) => {
                metrics.connections_rejected(why.label());
                tracing::debug!(%remote, reason = why.label(), "connection rejected");
                drop(stream);
                continue;
            }
        };
        metrics.connections_accepted.inc();
        let front = front.clone();
        let tls = tls.clone();
        // One task per connection, of the exact future its transport needs
        // (an idle client's memory is mostly this task).
        match tls {
            None => {
                tokio::spawn(async move {
                    let _slot = slot;
                    log_end(remote, super::serve_stream(stream, remote, front).await);
                });
            }
            Some(acceptor) => {
                let metrics = metrics.clone();
                let gate = front.relay.shared().handshake_gate.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    // The handshake state is transient: boxed, it is freed
                    // after the handshake instead of sizing the task.
                    // Its CPU steps go through the relay's handshake gate,
                    // so a storm of them does not starve relaying.
                    let accept = gate.gated(Box::pin(acceptor.accept(stream)));
                    // Bound first: a temporary in the `match` head would
                    // live (and size this task) for the whole connection.
                    let accepted = timeout(handshake_timeout, accept).await;
                    match accepted {
                        Ok(Ok(tls_stream)) => {
                            log_end(remote, super::serve_stream(tls_stream, remote, front).await)
                        }
                        Ok(Err(e)) => {
                            metrics.tls_handshake_errors.inc();
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                        }
                        Err(_) => metrics.tls_handshake_errors.inc(),
                    }
                });
            }
        }
    }
}

fn log_end(remote: std::net::SocketAddr, result: std::io::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "connection ended with error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut b = AcceptBackoff::new();
        let e = std::io::Error::from_raw_os_error(24);
        let waits: Vec<u64> = (0..10).map(|_| b.failed(&e).as_millis() as u64).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(b.errors, 10);
        b.succeeded();
        assert_eq!((b.errors, b.failed(&e)), (0, Duration::from_millis(5)));
    }

    #[tokio::test]
    async fn listeners_get_the_backlog_asked_for() {
        let l = bind(
            "127.0.0.1:0".parse().unwrap(),
            77,
            &crate::sockopt::TcpTimeouts::default(),
        )
        .unwrap();
        // `ss` shows a listening socket's backlog as its Send-Q.
        let port = l.local_addr().unwrap().port();
        let out = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let backlog: u32 = text
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("ss output: {text}"));
        assert_eq!(backlog, 77);
    }

    #[test]
    fn max_connections_frees_slots_on_drop() {
        let l = ConnLimiter::new(&Limits {
            max_connections: 2,
            ..Default::default()
        });
        let a = l.admit().unwrap();
        let _b = l.admit().unwrap();
        assert_eq!(l.admit().err(), Some(Rejection::MaxConnections));
        assert_eq!((l.open(), l.max_connections()), (2, 2));
        drop(a);
        assert_eq!(l.open(), 1);
        assert!(l.admit().is_ok());
    }

    #[test]
    fn accept_rate_burst() {
        let l = ConnLimiter::new(&Limits {
            accept_per_sec: 0.001,
            accept_burst: 2,
            ..Default::default()
        });
        assert!(l.admit().is_ok());
        assert!(l.admit().is_ok());
        assert_eq!(l.admit().err(), Some(Rejection::AcceptRate));
    }
}
