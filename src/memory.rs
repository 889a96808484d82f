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
//!
//! Trimming cannot release a page that still holds a live chunk, and
//! glibc's per-thread caches (tcache: up to seven freed chunks of each small
//! size per thread, kept for reuse) are live as far as the arena knows.
//! After a crowd leaves, the last chunks each worker freed are scattered
//! over its arena and pin about 1.5 MiB per worker thread. So the relay runs
//! with glibc's thread caches off: [`reexec_with_tunables`] sets
//! `GLIBC_TUNABLES=glibc.malloc.tcache_count=0` for the process (glibc reads
//! tunables only at start, so it executes itself again once, keeping its
//! PID and arguments) unless the operator's `GLIBC_TUNABLES` already says
//! something about the tcache. Small allocations then go through the
//! thread's own arena (uncontended; fastbins still cache the smallest).

use std::ffi::{OsStr, OsString};
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
/// peak, and the relay is quiet: the count has settled (it moved by fewer
/// than [`MIN_DROP`] since the last look, `before`) and fewer than
/// [`MIN_DROP`] handshakes came since then. A storm's clients take a few
/// seconds to leave and are redialing before the last of them is gone:
/// trimming then would walk and lock the arenas on the cores the storm
/// needs, and make the returning clients fault the pages in again. Pure,
/// for tests.
pub fn should_trim(
    peak_since_trim: i64,
    now: i64,
    before: i64,
    handshakes_since_last_look: u64,
) -> bool {
    let fell = peak_since_trim - now;
    let settled = (now - before).abs() < MIN_DROP;
    fell >= MIN_DROP
        && fell * 10 >= peak_since_trim
        && settled
        && handshakes_since_last_look < MIN_DROP as u64
}

/// Whether the trim after a drop should be repeated at the next look: the
/// count is no higher than at that trim and the relay stayed quiet. Pure,
/// for tests.
pub fn is_follow_up_due(now: i64, at_trim: i64, handshakes_since_last_look: u64) -> bool {
    now <= at_trim && handshakes_since_last_look < MIN_DROP as u64
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

/// The glibc tunable the relay runs with (see the module doc).
pub const TCACHE_OFF: &str = "glibc.malloc.tcache_count=0";

/// Set in the environment of the second execution.
const REEXECUTED: &str = "DERPD_MALLOC_TUNED";

/// `GLIBC_TUNABLES` for the relay, given the current value: ours appended,
/// or `None` when it already sets the tcache (the operator's choice wins;
/// also what stops a second re-execution). Pure, for tests.
pub fn tunables_for_relay(current: Option<&OsStr>) -> Option<OsString> {
    let current = current.map(|c| c.to_string_lossy().into_owned());
    match current.as_deref() {
        Some(c) if c.contains("glibc.malloc.tcache") => None,
        Some(c) if !c.is_empty() => Some(format!("{c}:{TCACHE_OFF}").into()),
        _ => Some(TCACHE_OFF.into()),
    }
}

/// Executes this program again, with the same arguments and PID, with
/// glibc's thread caches off (see the module doc). Call it first thing in
/// `main`, before any thread exists. Returns only when it did not: the
/// tunable is already set, or the exec failed (then the relay runs as it
/// is; the reason is returned for the log).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn reexec_with_tunables() -> Option<String> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(REEXECUTED).is_some() {
        return None;
    }
    let value = tunables_for_relay(std::env::var_os("GLIBC_TUNABLES").as_deref())?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "derpd".into());
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", value)
        // glibc may rewrite GLIBC_TUNABLES while it parses it: this marks
        // the second execution for certain, so it never loops.
        .env(REEXECUTED, "1")
        .exec();
    Some(format!(
        "running with glibc's thread caches on (re-executing with GLIBC_TUNABLES failed: {err})"
    ))
}

/// Not a glibc build: nothing to set.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn reexec_with_tunables() -> Option<String> {
    None
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
    let mut handshakes_seen = metrics.accepts.get();
    let mut count_seen = metrics.current_connections.get();
    // A trim while connections are still ending misses what their tasks
    // free after they left the count: one more trim at the next look.
    // (The count at that trim, when one is due.)
    let mut follow_up_due: Option<i64> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = metrics.current_connections.get();
        let handshakes = metrics.accepts.get();
        let recent = handshakes.saturating_sub(handshakes_seen);
        handshakes_seen = handshakes;
        let before = std::mem::replace(&mut count_seen, now);
        // The registry raises the high-water mark on every connection, so
        // a peak between two looks is not missed.
        let peak = metrics.connections_high_water.load(Ordering::Relaxed);
        let after_drop = should_trim(peak, now, before, recent);
        let follow_up = follow_up_due
            .take()
            .is_some_and(|at_trim| is_follow_up_due(now, at_trim, recent));
        if after_drop || follow_up {
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
            follow_up_due = after_drop.then_some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_large_drop_only() {
        // A storm's clients left.
        assert!(should_trim(19_000, 10, 10, 0));
        assert!(should_trim(19_000, 17_000, 17_000, 3));
        // Small drops and ordinary churn do not.
        assert!(!should_trim(19_000, 18_000, 18_000, 0));
        assert!(!should_trim(1_000, 800, 800, 0));
        assert!(!should_trim(200, 0, 0, 0));
        assert!(!should_trim(5_000, 5_000, 5_000, 0));
        assert!(!should_trim(0, 0, 0, 0));
    }

    #[test]
    fn waits_while_the_clients_leave_or_come_back() {
        // Still leaving (the count moved since the last look): not yet.
        assert!(!should_trim(19_000, 12_000, 19_000, 0));
        assert!(!should_trim(19_000, 10, 10 + MIN_DROP, 0));
        assert!(should_trim(19_000, 10, 10 + MIN_DROP - 1, 0));
        // They left and are redialing: not yet.
        assert!(!should_trim(19_000, 4_000, 4_000, 4_000));
        assert!(!should_trim(19_000, 4_000, 1_000, 0));
        assert!(!should_trim(19_000, 10, 10, MIN_DROP as u64));
        // Quiet again.
        assert!(should_trim(19_000, 10, 10, MIN_DROP as u64 - 1));
    }

    #[test]
    fn a_trim_is_repeated_once_if_nothing_came_back() {
        // Nothing came back and it stayed quiet: trim again.
        assert!(is_follow_up_due(0, 0, 0));
        assert!(is_follow_up_due(500, 500, 10));
        // More left since.
        assert!(is_follow_up_due(100, 500, 0));
        // Clients came back, or a storm of handshakes: no.
        assert!(!is_follow_up_due(600, 500, 0));
        assert!(!is_follow_up_due(0, 0, MIN_DROP as u64));
    }

    #[test]
    fn tunables_turn_the_tcache_off_unless_the_operator_set_it() {
        let v = |c: Option<&str>| {
            tunables_for_relay(c.map(OsStr::new)).map(|s| s.into_string().unwrap())
        };
        assert_eq!(v(None).as_deref(), Some(TCACHE_OFF));
        assert_eq!(v(Some("")).as_deref(), Some(TCACHE_OFF));
        assert_eq!(
            v(Some("glibc.malloc.arena_max=2")).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0")
        );
        // Already set (by the operator, or by our own first execution).
        assert_eq!(v(Some(TCACHE_OFF)), None);
        assert_eq!(v(Some("glibc.malloc.tcache_count=7")), None);
        assert_eq!(
            v(Some("glibc.malloc.arena_max=1:glibc.malloc.tcache_max=64")),
            None
        );
    }

    #[test]
    fn trim_runs() {
        // Whatever it finds to give back, it returns without harm.
        let v: Vec<Vec<u8>> = (0..1000).map(|_| vec![1u8; 4096]).collect();
        drop(v);
        let _ = trim();
    }
}
