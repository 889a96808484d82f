//! Server resource samples from /proc: resident memory and open file
//! descriptors, tracked at start, maximum and end of a run.

use super::rss_kib;
use std::time::Duration;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcSample {
    /// Resident set size, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Open file descriptors (entries in `/proc/PID/fd`).
    pub fds: u64,
}

/// Reads `pid`'s RSS and FD count; `None` if the process is gone or
/// /proc is unreadable.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let rss_kib = rss_kib(pid)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(ProcSample { rss_kib, fds })
}

/// A quantity at the start of a run, its maximum during it, its value at
/// the end of the load and once the bench's clients have left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Span {
    /// Before any bench client connected.
    pub start: u64,
    /// Largest sampled value.
    pub max: u64,
    /// When the measured interval ended (clients still connected).
    pub end: u64,
    /// About a second after every bench client disconnected.
    pub after: u64,
}

/// Periodic sampling of one process.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    start: Option<ProcSample>,
    max: ProcSample,
    end: Option<ProcSample>,
    after: Option<ProcSample>,
}

impl Tracker {
    /// Folds one sample into the maximum (and the start, if first).
    pub fn observe(&mut self, s: ProcSample) {
        self.start.get_or_insert(s);
        self.max.rss_kib = self.max.rss_kib.max(s.rss_kib);
        self.max.fds = self.max.fds.max(s.fds);
    }

    /// Records the end-of-load sample.
    pub fn end(&mut self, s: ProcSample) {
        self.observe(s);
        self.end = Some(s);
    }

    /// Records the sample after the clients left.
    pub fn after(&mut self, s: ProcSample) {
        self.observe(s);
        self.after = Some(s);
    }

    /// (RSS KiB, FD count) spans, if start and end were sampled.
    pub fn spans(&self) -> Option<(Span, Span)> {
        let (start, end) = (self.start?, self.end?);
        let after = self.after.unwrap_or(end);
        Some((
            Span {
                start: start.rss_kib,
                max: self.max.rss_kib,
                end: end.rss_kib,
                after: after.rss_kib,
            },
            Span {
                start: start.fds,
                max: self.max.fds,
                end: end.fds,
                after: after.fds,
            },
        ))
    }
}

/// Samples `pid` every `every` into `tracker` until the task is aborted.
pub async fn sample_loop(
    pid: u32,
    every: Duration,
    tracker: std::sync::Arc<parking_lot::Mutex<Tracker>>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        if let Some(s) = sample(pid) {
            tracker.lock().observe(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.rss_kib > 0);
        // stdin/stdout/stderr at least, plus the fd dir handle itself.
        assert!(s.fds >= 3, "{s:?}");
    }

    #[test]
    fn tracker_keeps_start_max_end() {
        let mut t = Tracker::default();
        assert!(t.spans().is_none());
        t.observe(ProcSample {
            rss_kib: 10,
            fds: 5,
        });
        t.observe(ProcSample {
            rss_kib: 30,
            fds: 9,
        });
        t.end(ProcSample {
            rss_kib: 20,
            fds: 7,
        });
        t.after(ProcSample {
            rss_kib: 15,
            fds: 5,
        });
        let (rss, fds) = t.spans().unwrap();
        assert_eq!(
            rss,
            Span {
                start: 10,
                max: 30,
                end: 20,
                after: 15
            }
        );
        assert_eq!(
            fds,
            Span {
                start: 5,
                max: 9,
                end: 7,
                after: 5
            }
        );
    }
}
