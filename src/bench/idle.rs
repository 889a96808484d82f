//! Idle clients: many connections that handshake and then only sit there,
//! as most of a relay's clients do. After its handshake an idle client is
//! nothing but its TCP socket ([`crate::client::dial_held`]): no buffers,
//! no TLS state, no task, not even a registration with the runtime, so the
//! bench can hold 100,000 of them in a few megabytes (keys included) and
//! what is measured is the relay's cost, not the bench's.
//!
//! Dials that fail — turned away by the relay's accept-rate limiter, reset,
//! or timed out — are retried after a jittered backoff that grows with the
//! failures, as tailscaled does between failed DERP reconnects
//! ([`backoff_delay`]), until a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::limits::source_addr;
use crate::client::{dial_held, ClientError};
use crate::proto::NodePrivate;

/// Bound on one dial: TCP connect, TLS, upgrade and DERP handshake.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Step of the backoff: the n-th consecutive failure waits about n² × this.
const BACKOFF_STEP: Duration = Duration::from_millis(10);
/// Longest wait between two tries.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long to wait after the `failures`-th consecutive failed dial:
/// `failures² × 10 ms`, at most 5 s, times a factor `0.5 + jitter` (with
/// `jitter` uniform in [0, 1)) so that clients that failed together do not
/// all come back together. No wait before the first try.
pub fn backoff_delay(failures: u32, jitter: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    // Capped long before n² could overflow.
    let n = failures.min(1000);
    let base = BACKOFF_STEP.saturating_mul(n * n).min(BACKOFF_MAX);
    base.mul_f64(0.5 + jitter.clamp(0.0, 1.0))
}

/// Counters of dials (shared by the dialing tasks).
#[derive(Debug, Default)]
pub struct DialCounters {
    attempts: AtomicU64,
    failures: AtomicU64,
    timed_out: AtomicU64,
    refused: AtomicU64,
    other: AtomicU64,
    most_attempts: AtomicU64,
    last_error: parking_lot::Mutex<Option<String>>,
}

/// What the dials of a phase did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DialStats {
    /// Dials started (first tries and retries).
    pub attempts: u64,
    /// Dials that failed (each was retried unless the deadline passed).
    pub failures: u64,
    /// Of those, dials that did not finish within the dial timeout (10 s).
    pub timed_out: u64,
    /// Of those, connections the relay refused, reset or closed before
    /// the handshake completed (what an accept-rate limit looks like).
    pub refused: u64,
    /// Of those, other errors (e.g. no local port left).
    pub other: u64,
    /// The most tries one client needed.
    pub most_attempts: u64,
    /// The last error seen, if any.
    pub last_error: Option<String>,
}

impl DialCounters {
    /// A snapshot.
    pub fn stats(&self) -> DialStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DialStats {
            attempts: g(&self.attempts),
            failures: g(&self.failures),
            timed_out: g(&self.timed_out),
            refused: g(&self.refused),
            other: g(&self.other),
            most_attempts: g(&self.most_attempts),
            last_error: self.last_error.lock().clone(),
        }
    }

    fn failed(&self, e: Option<&ClientError>) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let kind = match e {
            None => &self.timed_out,
            Some(e) if is_refusal(e) => &self.refused,
            Some(_) => &self.other,
        };
        kind.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(match e {
            None => format!("timed out after {DIAL_TIMEOUT:?}"),
            Some(e) => e.to_string(),
        });
    }
}

/// Whether a dial error is the relay turning the connection away.
fn is_refusal(e: &ClientError) -> bool {
    use std::io::ErrorKind::*;
    match e {
        ClientError::Closed | ClientError::UpgradeRefused(_) => true,
        ClientError::Io(io) => matches!(
            io.kind(),
            ConnectionRefused | ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
        ),
        _ => false,
    }
}

/// Dials one idle client until it is up or `deadline` passes (then the
/// last error).
pub async fn dial_retrying(
    url: &str,
    key: &NodePrivate,
    insecure: bool,
    source: Option<std::net::IpAddr>,
    deadline: Instant,
    counters: &DialCounters,
) -> Result<std::net::TcpStream, String> {
    let mut failures = 0u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(counters
                .last_error
                .lock()
                .clone()
                .unwrap_or_else(|| "deadline passed".into()));
        }
        counters.attempts.fetch_add(1, Ordering::Relaxed);
        let r = tokio::time::timeout(
            DIAL_TIMEOUT.min(left),
            dial_held(url, key, insecure, source),
        )
        .await;
        match r {
            Ok(Ok(s)) => {
                counters
                    .most_attempts
                    .fetch_max(u64::from(failures) + 1, Ordering::Relaxed);
                return Ok(s);
            }
            Ok(Err(e)) => counters.failed(Some(&e)),
            Err(_) => counters.failed(None),
        }
        failures += 1;
        let wait = backoff_delay(failures, fastrand::f64());
        if Instant::now() + wait >= deadline {
            return Err(counters.last_error.lock().clone().unwrap_or_default());
        }
        tokio::time::sleep(wait).await;
    }
}

/// The idle clients of a run: each one's key (kept for redialing, as a
/// node reconnects with its own key) and, while connected, its socket.
pub struct IdleClients {
    url: Arc<str>,
    insecure: bool,
    sources: usize,
    keys: Vec<NodePrivate>,
    conns: Vec<Option<std::net::TcpStream>>,
    /// The idle clients' dials run on a runtime of their own (as many
    /// workers as the relay lets handshake steps run at once): in a storm
    /// their TLS and DERP handshakes would otherwise sit in the run queues
    /// of the measured pairs' senders and receivers, and the load
    /// generator's own delay would be counted as relay latency (the clients
    /// that stay and those that redial are different machines in life).
    dialer: Option<tokio::runtime::Runtime>,
}

impl Drop for IdleClients {
    fn drop(&mut self) {
        // Dropped inside the bench's runtime: a runtime may not block there.
        if let Some(rt) = self.dialer.take() {
            rt.shutdown_background();
        }
    }
}

/// The outcome of [`IdleClients::connect_all`].
#[derive(Debug, Clone, Copy)]
pub struct Connected {
    /// Clients that were down and are now up.
    pub connected: usize,
    /// Clients still down (deadline passed).
    pub missing: usize,
    /// When the last client came up (the call's start if none did).
    pub last_up: Instant,
}

impl IdleClients {
    /// `n` clients with fresh keys, none connected yet; client `i` binds
    /// to [`source_addr`]`(i, sources)`.
    pub fn new(url: &str, insecure: bool, sources: usize, n: usize) -> IdleClients {
        IdleClients {
            url: url.into(),
            insecure,
            sources,
            keys: (0..n).map(|_| NodePrivate::generate()).collect(),
            conns: (0..n).map(|_| None).collect(),
            dialer: Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(crate::relay::gate::default_parallelism())
                    .thread_name("bench-dial")
                    .enable_all()
                    .build()
                    .expect("tokio runtime"),
            ),
        }
    }

    /// Clients connected now.
    pub fn held(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    /// Dials client `i` once, without retrying (to fail fast on a wrong
    /// URL or a relay that is not there).
    pub async fn connect_one(&mut self, i: usize) -> Result<(), String> {
        let s = tokio::time::timeout(
            DIAL_TIMEOUT,
            dial_held(
                &self.url,
                &self.keys[i],
                self.insecure,
                source_addr(i, self.sources),
            ),
        )
        .await
        .map_err(|_| format!("idle client: no handshake within {DIAL_TIMEOUT:?}"))?
        .map_err(|e| format!("idle client: {e}"))?;
        self.conns[i] = Some(s);
        Ok(())
    }

    /// Connects every client that is down, `parallel` at a time, retrying
    /// failed dials until `deadline`.
    pub async fn connect_all(
        &mut self,
        parallel: usize,
        deadline: Instant,
        counters: &Arc<DialCounters>,
    ) -> Connected {
        let t0 = Instant::now();
        let down: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].is_none())
            .collect();
        let mut down = down.into_iter();
        let mut set = tokio::task::JoinSet::new();
        let (mut connected, mut missing) = (0, 0);
        let mut last_up = t0;
        loop {
            while set.len() < parallel.max(1) {
                let Some(i) = down.next() else { break };
                let (url, key, counters) =
                    (self.url.clone(), self.keys[i].clone(), counters.clone());
                let (insecure, source) = (self.insecure, source_addr(i, self.sources));
                let task = async move {
                    let r = dial_retrying(&url, &key, insecure, source, deadline, &counters).await;
                    (i, r)
                };
                let dialer = self.dialer.as_ref().expect("taken only on drop");
                set.spawn_on(task, dialer.handle());
            }
            match set.join_next().await {
                Some(Ok((i, Ok(s)))) => {
                    self.conns[i] = Some(s);
                    connected += 1;
                    last_up = Instant::now();
                }
                Some(Ok((_, Err(_)))) => missing += 1,
                Some(Err(e)) => {
                    // A dialing task panicked: count the client as missing.
                    *counters.last_error.lock() = Some(format!("dial task: {e}"));
                    missing += 1;
                }
                None => break,
            }
        }
        Connected {
            connected,
            missing,
            last_up,
        }
    }

    /// Closes every connection at once (keys are kept); returns how many
    /// were open.
    pub fn drop_all(&mut self) -> usize {
        let held: Vec<std::net::TcpStream> =
            self.conns.iter_mut().filter_map(Option::take).collect();
        let n = held.len();
        // Closing thousands of sockets keeps a thread busy for a good part
        // of a second: not one of the runtime's workers, where the measured
        // pairs' senders and receivers would wait behind it and the load
        // generator's own stall would be counted as relay latency.
        std::thread::spawn(move || drop(held));
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_quadratically_with_jitter_and_a_cap() {
        // No wait before the first try.
        assert_eq!(backoff_delay(0, 0.7), Duration::ZERO);
        // Middle of the jitter range: n² × 10 ms.
        let mid: Vec<u128> = (1..=6).map(|n| backoff_delay(n, 0.5).as_millis()).collect();
        assert_eq!(mid, [10, 40, 90, 160, 250, 360]);
        // Jitter spans 0.5× to 1.5×.
        assert_eq!(backoff_delay(4, 0.0), Duration::from_millis(80));
        assert!(backoff_delay(4, 0.999) < Duration::from_millis(240));
        assert!(backoff_delay(4, 0.999) > Duration::from_millis(239));
        // Capped at 5 s before jitter (23² × 10 ms = 5.29 s).
        assert_eq!(backoff_delay(23, 0.5), Duration::from_secs(5));
        assert_eq!(backoff_delay(u32::MAX, 0.5), Duration::from_secs(5));
        assert_eq!(backoff_delay(1000, 1.0), Duration::from_millis(7500));
        // Out-of-range jitter is clamped.
        assert_eq!(backoff_delay(1, -3.0), Duration::from_millis(5));
    }

    #[test]
    fn refusals_are_told_from_other_errors() {
        use std::io::{Error, ErrorKind};
        assert!(is_refusal(&ClientError::Closed));
        assert!(is_refusal(&ClientError::Io(Error::from(
            ErrorKind::ConnectionReset
        ))));
        assert!(is_refusal(&ClientError::UpgradeRefused(
            "HTTP/1.1 503".into()
        )));
        assert!(!is_refusal(&ClientError::Io(Error::from(
            ErrorKind::AddrNotAvailable
        ))));
        let c = DialCounters::default();
        c.failed(None);
        c.failed(Some(&ClientError::Closed));
        c.failed(Some(&ClientError::BadUrl("x".into())));
        let s = c.stats();
        assert_eq!((s.failures, s.timed_out, s.refused, s.other), (3, 1, 1, 1));
        assert!(s.last_error.unwrap().contains("x"));
    }

    #[tokio::test]
    async fn a_dial_to_nowhere_retries_with_backoff_until_the_deadline() {
        // A port nothing listens on: every try is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let c = DialCounters::default();
        let deadline = Instant::now() + Duration::from_secs(1);
        let r = dial_retrying(&url, &NodePrivate::generate(), false, None, deadline, &c).await;
        assert!(r.is_err());
        let s = c.stats();
        // Waits of n² × 10 ms (× 0.5–1.5) fit at most 9 tries in 1 s: a
        // few tries, not a busy loop, and more than one.
        assert!(s.attempts >= 2 && s.attempts <= 15, "{s:?}");
        assert_eq!(s.failures, s.attempts);
        assert_eq!(s.refused, s.attempts);
        assert_eq!(s.most_attempts, 0);
    }
}
