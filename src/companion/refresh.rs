//! Refresh on a miss: when admission meets a key the cache does not know,
//! the node list is fetched again before the relay decides, so a node that
//! headscale registered a moment ago is admitted on its first try.
//!
//! - **Single flight.** Every miss takes a ticket; one background task
//!   ([`MissRefresh::run`]) fetches, and a fetch covers every ticket taken
//!   before it started. Misses that arrive while a fetch is running share
//!   the next one.
//! - **Rate limit.** The task waits [`MissRefresh::min_gap`] after each
//!   fetch before it starts another, so a flood of strangers costs at most
//!   one node-list read per gap.
//! - **Bounded wait.** A miss waits at most [`MissRefresh::max_wait`] for
//!   its fetch, then the caller decides from whatever the cache holds.
//! - **Fail closed.** While the last sync failed, a miss does not wait at
//!   all: headscale is away, so the answer would not change.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// Default pause between two miss-triggered fetches.
pub const DEFAULT_MIN_GAP: Duration = Duration::from_millis(250);
/// Default longest wait of one miss for its fetch.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);

/// Coalesces cache misses into rate-limited node-list fetches.
pub struct MissRefresh {
    /// Tickets handed out so far (the newest ticket's number).
    tickets: AtomicU64,
    /// Wakes the fetch task (holds one permit, so wake-ups coalesce).
    wake: Notify,
    /// The newest ticket covered by a finished fetch.
    covered: watch::Sender<u64>,
    /// Whether the last sync with headscale succeeded.
    healthy: AtomicBool,
    min_gap: Duration,
    max_wait: Duration,
}

impl MissRefresh {
    /// A refresher that fetches at most once per `min_gap` and lets each
    /// miss wait at most `max_wait`.
    pub fn new(min_gap: Duration, max_wait: Duration) -> MissRefresh {
        MissRefresh {
            tickets: AtomicU64::new(0),
            wake: Notify::new(),
            covered: watch::Sender::new(0),
            healthy: AtomicBool::new(true),
            min_gap,
            max_wait,
        }
    }

    /// The pause between two fetches.
    pub fn min_gap(&self) -> Duration {
        self.min_gap
    }

    /// The longest a miss waits.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Records how the latest sync (poll or miss) ended.
    pub fn set_healthy(&self, ok: bool) {
        self.healthy.store(ok, Ordering::Relaxed);
    }

    /// Whether the latest sync succeeded (misses wait only then).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Called on a miss: asks for a fetch that starts after this call and
    /// waits for it, at most `max_wait`. Returns whether such a fetch
    /// finished in time (the cache is then as fresh as headscale was). Returns
    /// `false` at once while the last sync failed.
    pub async fn refresh(&self) -> bool {
        if !self.is_healthy() {
            return false;
        }
        let ticket = self.tickets.fetch_add(1, Ordering::AcqRel) + 1;
        let mut covered = self.covered.subscribe();
        self.wake.notify_one();
        tokio::time::timeout(self.max_wait, covered.wait_for(|&c| c >= ticket))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The fetch task: runs `fetch` once per batch of misses, at most once
    /// per `min_gap`, until `shutdown`.
    pub async fn run<F, Fut>(&self, mut fetch: F, shutdown: CancellationToken)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            // Every ticket taken before the fetch starts is covered by it.
            let covering = self.tickets.load(Ordering::Acquire);
            tokio::select! {
                _ = fetch() => {}
                _ = shutdown.cancelled() => return,
            }
            self.covered.send_replace(covering);
            tokio::select! {
                _ = tokio::time::sleep(self.min_gap) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A refresher whose fetch takes `fetch_time` and counts itself.
    fn start(fetch_time: Duration) -> (Arc<MissRefresh>, Arc<AtomicUsize>, CancellationToken) {
        let r = Arc::new(MissRefresh::new(DEFAULT_MIN_GAP, DEFAULT_MAX_WAIT));
        let fetches = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (r2, f2, s2) = (r.clone(), fetches.clone(), stop.clone());
        tokio::spawn(async move {
            r2.run(
                || {
                    let f = f2.clone();
                    async move {
                        tokio::time::sleep(fetch_time).await;
                        f.fetch_add(1, Ordering::SeqCst);
                    }
                },
                s2,
            )
            .await
        });
        (r, fetches, stop)
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_miss_waits_for_one_fetch() {
        let (r, fetches, stop) = start(Duration::from_millis(20));
        assert!(r.refresh().await);
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_misses_is_coalesced_and_rate_limited() {
        let (r, fetches, stop) = start(Duration::from_millis(5));
        let mut waits = tokio::task::JoinSet::new();
        // 200 misses spread evenly over 2 s.
        for _ in 0..200 {
            let r = r.clone();
            waits.spawn(async move { r.refresh().await });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut answered = 0;
        while let Some(ok) = waits.join_next().await {
            answered += usize::from(ok.unwrap());
        }
        let n = fetches.load(Ordering::SeqCst);
        assert!(n <= 10, "{n} fetches for 200 misses in 2 s");
        assert!(
            n >= 2,
            "misses after the first fetch need fetches of their own"
        );
        assert_eq!(answered, 200, "every miss is covered within the wait bound");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_during_a_fetch_waits_for_the_next_one() {
        let (r, fetches, stop) = start(Duration::from_millis(100));
        let first = tokio::spawn({
            let r = r.clone();
            async move { r.refresh().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // This miss arrived after the running fetch began, so that fetch may
        // have missed its node: it needs a second fetch.
        assert!(r.refresh().await);
        assert!(first.await.unwrap());
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded_and_unhealthy_means_no_wait() {
        let (r, fetches, stop) = start(Duration::from_secs(30));
        let t = tokio::time::Instant::now();
        assert!(
            !r.refresh().await,
            "a slow headscale does not hold the miss"
        );
        assert_eq!(t.elapsed(), DEFAULT_MAX_WAIT);

        r.set_healthy(false);
        let t = tokio::time::Instant::now();
        assert!(!r.refresh().await);
        assert_eq!(t.elapsed(), Duration::ZERO, "fail closed at once");
        assert_eq!(fetches.load(Ordering::SeqCst), 0);
        stop.cancel();
    }
}
