//! The accept loop of a listener: connection limits (concurrency cap and
//! accept-rate bucket), the TLS handshake when TLS is on, then
//! [`super::serve_stream`]. Over-limit connections are closed at once and
//! counted; the loop itself never stops on a rejection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::Front;
use crate::config::Limits;
use crate::relay::ratelimit::TokenBucket;

/// Shared limit state of one or more listeners.
pub struct ConnLimiter {
    slots: Option<Arc<Semaphore>>,
    accept_rate: Option<Mutex<TokenBucket>>,
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

/// Accepts on `listener` until `shutdown` is cancelled.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    front: Front,
    limiter: Arc<ConnLimiter>,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) {
    let metrics = front.relay.metrics().clone();
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
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
        let _ = stream.set_nodelay(true);
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
                tokio::spawn(async move {
                    let _slot = slot;
                    // The handshake state is transient: boxed, it is freed
                    // after the handshake instead of sizing the task.
                    let accept = Box::pin(acceptor.accept(stream));
                    match timeout(handshake_timeout, accept).await {
                        Ok(Ok(tls_stream)) => log_end(
                            remote,
                            super::serve_stream(Box::new(tls_stream), remote, front).await,
                        ),
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
