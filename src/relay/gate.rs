//! Handshake work yields the cores to relaying.
//!
//! tokio has no task priorities: in a reconnect storm hundreds of handshake
//! tasks are runnable at once, each step of one (a TLS server flight, the
//! X25519 of the DERP box) a few hundred microseconds of CPU, and a client's
//! writer woken for a packet waits behind all of them in the run queues.
//!
//! The gate bounds how many handshake *steps* run at once: a handshake
//! future is polled only while it holds one of the gate's permits, and gives
//! it back as soon as that poll returns. A handshake waiting on its client
//! (the network, the next TLS flight) holds nothing, so a slow or silent
//! client (slowloris) never occupies the gate, and round-trip times do not
//! limit the handshake rate. With `permits` below the number of worker
//! threads, the others are always free for the per-packet path; handshakes
//! still use every cycle relaying leaves over (a waiting handshake is woken
//! the moment a permit comes back, in FIFO order).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Bounds the handshake steps running at once (see the module doc).
#[derive(Clone)]
pub struct HandshakeGate {
    sem: Option<Arc<Semaphore>>,
    metrics: Arc<Metrics>,
}

/// The default number of handshake steps at once: half the cores, at least
/// one (the other half always free for relaying).
pub fn default_parallelism() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).max(1)
}

impl HandshakeGate {
    /// A gate of `permits` steps at once; `None` lets every step run.
    pub fn new(permits: Option<usize>, metrics: Arc<Metrics>) -> HandshakeGate {
        HandshakeGate {
            sem: permits.map(|n| Arc::new(Semaphore::new(n.max(1)))),
            metrics,
        }
    }

    /// Waits for a permit, for one short burst of CPU work done while it
    /// is held (a connection's teardown: when a storm's clients drop at
    /// once, thousands of connections end in the same instant).
    pub async fn turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        match &self.sem {
            Some(s) => s.acquire().await.ok(),
            None => None,
        }
    }

    /// `fut` (a handshake), polled only while it holds a permit. Counted
    /// in `derpd_handshakes_in_flight` while it lives.
    pub fn gated<F: Future + Unpin>(&self, fut: F) -> Gated<F> {
        self.metrics.handshakes_in_flight.inc();
        Gated {
            inner: fut,
            sem: self.sem.clone(),
            waiting: None,
            metrics: self.metrics.clone(),
        }
    }
}

/// A future run through a [`HandshakeGate`].
pub struct Gated<F> {
    inner: F,
    sem: Option<Arc<Semaphore>>,
    /// Waiting for a permit: the acquisition and when it began.
    waiting: Option<(Acquire, Instant)>,
    metrics: Arc<Metrics>,
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let Some(sem) = &this.sem else {
            return Pin::new(&mut this.inner).poll(cx);
        };
        let permit = match this.waiting.as_mut() {
            None => match sem.clone().try_acquire_owned() {
                // Free at once: nothing to record (the common, quiet case).
                Ok(p) => p,
                Err(_) => {
                    let mut acquire: Acquire = Box::pin(sem.clone().acquire_owned());
                    match acquire.as_mut().poll(cx) {
                        Poll::Ready(Ok(p)) => p,
                        Poll::Ready(Err(_)) => return Pin::new(&mut this.inner).poll(cx),
                        Poll::Pending => {
                            this.waiting = Some((acquire, Instant::now()));
                            return Poll::Pending;
                        }
                    }
                }
            },
            Some((acquire, since)) => match acquire.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    this.metrics
                        .handshake_queue_wait
                        .observe(since.elapsed().as_secs_f64());
                    this.waiting = None;
                    match r {
                        Ok(p) => p,
                        // The semaphore is never closed; run ungated if it were.
                        Err(_) => return Pin::new(&mut this.inner).poll(cx),
                    }
                }
            },
        };
        let out = Pin::new(&mut this.inner).poll(cx);
        // Given back before this poll returns: a handshake waiting on its
        // client holds nothing.
        drop(permit);
        out
    }
}

impl<F> Drop for Gated<F> {
    fn drop(&mut self) {
        self.metrics.handshakes_in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A future that records how many of its kind are inside a poll at
    /// once, and yields `steps` times before finishing.
    struct Step {
        inside: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        steps: usize,
    }

    impl Future for Step {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let now = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            // Busy for a moment, so polls on other threads overlap.
            std::thread::sleep(std::time::Duration::from_micros(200));
            self.inside.fetch_sub(1, Ordering::SeqCst);
            if self.steps == 0 {
                return Poll::Ready(());
            }
            self.steps -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    async fn most_at_once(permits: Option<usize>) -> (usize, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let gate = HandshakeGate::new(permits, metrics.clone());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                tokio::spawn(gate.gated(Step {
                    inside: inside.clone(),
                    most: most.clone(),
                    steps: 5,
                }))
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        (most.load(Ordering::SeqCst), metrics)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn at_most_the_permits_run_a_step_at_once_and_all_finish() {
        let (most, metrics) = most_at_once(Some(1)).await;
        assert_eq!(most, 1);
        assert_eq!(metrics.handshakes_in_flight.get(), 0);
        assert!(metrics.handshake_queue_wait.get_sample_count() > 0);
        let (most, _) = most_at_once(Some(2)).await;
        assert!(most <= 2, "{most}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_gate_lets_every_step_run() {
        let (most, metrics) = most_at_once(None).await;
        assert!(most >= 1);
        assert_eq!(metrics.handshakes_in_flight.get(), 0);
        assert_eq!(metrics.handshake_queue_wait.get_sample_count(), 0);
    }

    #[tokio::test]
    async fn a_handshake_waiting_on_its_client_holds_no_permit() {
        let metrics = Arc::new(Metrics::new());
        let gate = HandshakeGate::new(Some(1), metrics.clone());
        // A "slowloris": waits forever for bytes that never come.
        let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stuck = tokio::spawn(gate.gated(Box::pin(async move {
            let _ = rx.await;
        })));
        tokio::task::yield_now().await;
        // Another handshake still runs to the end.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            gate.gated(Box::pin(async { tokio::task::yield_now().await })),
        )
        .await
        .expect("not blocked by the waiting handshake");
        assert_eq!(metrics.handshakes_in_flight.get(), 1);
        stuck.abort();
        let _ = stuck.await;
        assert_eq!(metrics.handshakes_in_flight.get(), 0);
    }
}
