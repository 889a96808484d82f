//! Giving memory back to the system after clients leave.
//!
//! derpd uses the C library's allocator (glibc's malloc on the usual Linux
//! builds). Freed memory goes back into glibc's arenas, where it is reused
//! by the next connections but, apart from the top of each heap, never
//! returned to the kernel: a relay that once held a reconnect storm would
//! keep that resident memory for its whole life. So when the number of
//! connections has fallen well below its recent peak, the relay calls
//! `malloc_trim(0)` once, which hands every wholly free page of every arena
//! back to the kernel (`MADV_DONTNEED`), including those between live
//! chunks. It runs on a blocking thread (it walks the arenas, a few
//! milliseconds for hundreds of megabytes) and only after such a drop, so
//! relaying under steady load never pays for it. docs/PERFORMANCE.md
//! ("Reconnect storms (issue 19)") has the measurements behind this choice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the connection count is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);
/// A drop of fewer connections than this never trims (a few hundred idle
/// clients are a couple of megabytes).
pub const MIN_DROP: i64 = 256;

/// Whether to trim now: the connection count fell from the peak seen since
/// the last trim by at least [`MIN_DROP`] and by at least a tenth of the
/// peak. Pure, for tests.
pub fn should_trim(peak_since_trim: i64, now: i64) -> bool {
    let fell = peak_since_trim - now;
    fell >= MIN_DROP && fell * 10 >= peak_since_trim
}

/// Whether this build can give arena memory back (`malloc_trim` is
/// glibc's).
pub const CAN_TRIM: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Hands free arena memory back to the kernel. Returns whether any was.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers and may be called from any
        // thread at any time; it locks each arena while it works on it.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Watches the connection count and trims after each large drop, until
/// `stop`.
/// `shrink` first gives back what the caller's own tables hold for
/// connections that are gone.
pub async fn trim_after_drops(
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    shrink: impl Fn() + Send + 'static,
) {
    if !CAN_TRIM {
        return;
    }
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = metrics.current_connections.get();
        // The registry raises the high-water mark on every connection, so
        // a peak between two looks is not missed.
        let peak = metrics.connections_high_water.load(Ordering::Relaxed);
        if should_trim(peak, now) {
            let started = std::time::Instant::now();
            shrink();
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            metrics.memory_trims.inc();
            tracing::debug!(
                from = peak,
                to = now,
                released,
                took = ?started.elapsed(),
                "connections fell; gave free memory back"
            );
            metrics.connections_high_water.store(now, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_large_drop_only() {
        // A storm's clients leave.
        assert!(should_trim(19_000, 10));
        assert!(should_trim(19_000, 17_000));
        // Small drops and ordinary churn do not.
        assert!(!should_trim(19_000, 18_000));
        assert!(!should_trim(1_000, 800));
        assert!(!should_trim(200, 0));
        assert!(!should_trim(5_000, 5_000));
        assert!(!should_trim(0, 0));
    }

    #[test]
    fn trim_runs() {
        // Whatever it finds to give back, it returns without harm.
        let v: Vec<Vec<u8>> = (0..1000).map(|_| vec![1u8; 4096]).collect();
        drop(v);
        let _ = trim();
    }
}
