//! The shrink guard: a node list from headscale that would shrink the cache
//! sharply (to nothing, or by more than a set fraction) is held back until
//! it has been seen on several syncs spanning a confirmation window. A
//! headscale restored from an old backup, or pointed at an empty database,
//! then cannot lock every partition out with one answer. I/O-free.

use std::time::{Duration, Instant};

/// Settings of the guard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShrinkPolicy {
    /// Largest fraction of the cached nodes one answer may remove before it
    /// is held (`0.5`: more than half; `1.0` turns the guard off).
    pub max_fraction: f64,
    /// How long shrunk answers must keep coming before one is applied.
    pub confirm_after: Duration,
    /// How many shrunk answers must be seen before one is applied.
    pub confirm_syncs: u32,
}

impl Default for ShrinkPolicy {
    fn default() -> Self {
        ShrinkPolicy {
            max_fraction: 0.5,
            confirm_after: Duration::from_secs(60),
            confirm_syncs: 3,
        }
    }
}

/// What to do with a new answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Install it.
    Apply,
    /// Keep the cache; the shrink is seen for the `seen`th time, since
    /// `since` ago.
    Hold {
        /// Shrunk answers seen in this episode, this one included.
        seen: u32,
        /// Time since the first of them.
        since: Duration,
    },
}

/// The guard's state: the current episode of shrunk answers, if any.
#[derive(Debug, Default)]
pub struct ShrinkGuard {
    policy: ShrinkPolicy,
    episode: Option<(Instant, u32)>,
}

impl ShrinkGuard {
    /// A guard with `policy`.
    pub fn new(policy: ShrinkPolicy) -> ShrinkGuard {
        ShrinkGuard {
            policy,
            episode: None,
        }
    }

    /// Whether going from `cached` to `new` nodes is a sharp shrink.
    pub fn is_sharp(&self, cached: usize, new: usize) -> bool {
        if cached == 0 || new >= cached || self.policy.max_fraction >= 1.0 {
            return false;
        }
        new == 0 || (cached - new) as f64 > cached as f64 * self.policy.max_fraction
    }

    /// Judges an answer of `new` nodes against a cache of `cached` at `now`.
    pub fn judge(&mut self, cached: usize, new: usize, now: Instant) -> Verdict {
        if !self.is_sharp(cached, new) {
            self.episode = None;
            return Verdict::Apply;
        }
        let (first, seen) = self.episode.get_or_insert((now, 0));
        *seen += 1;
        let (seen, since) = (*seen, now.saturating_duration_since(*first));
        if seen >= self.policy.confirm_syncs && since >= self.policy.confirm_after {
            self.episode = None;
            return Verdict::Apply;
        }
        Verdict::Hold { seen, since }
    }

    /// Whether a shrunk answer is being held.
    pub fn holding(&self) -> bool {
        self.episode.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharp_means_to_zero_or_more_than_the_fraction() {
        let g = ShrinkGuard::new(ShrinkPolicy::default());
        assert!(g.is_sharp(10, 0));
        assert!(g.is_sharp(10, 4));
        assert!(!g.is_sharp(10, 5), "exactly half is allowed");
        assert!(!g.is_sharp(10, 11));
        assert!(!g.is_sharp(0, 0), "the first sync is never held");
        assert!(g.is_sharp(1, 0));
        let off = ShrinkGuard::new(ShrinkPolicy {
            max_fraction: 1.0,
            ..ShrinkPolicy::default()
        });
        assert!(!off.is_sharp(10, 0));
    }

    #[test]
    fn a_shrink_is_applied_only_after_enough_syncs_and_time() {
        let mut g = ShrinkGuard::new(ShrinkPolicy::default());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(
            g.judge(100, 0, at(0)),
            Verdict::Hold {
                seen: 1,
                since: Duration::ZERO
            }
        );
        assert!(g.holding());
        // Many syncs within the minute: still held.
        for s in 1..30 {
            assert!(matches!(g.judge(100, 0, at(s)), Verdict::Hold { .. }));
        }
        // A minute on, and seen often enough: applied.
        assert_eq!(g.judge(100, 0, at(60)), Verdict::Apply);
        assert!(!g.holding());
    }

    #[test]
    fn time_alone_is_not_enough_and_a_normal_answer_ends_the_episode() {
        let mut g = ShrinkGuard::new(ShrinkPolicy::default());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(matches!(g.judge(100, 10, at(0)), Verdict::Hold { .. }));
        assert!(matches!(
            g.judge(100, 10, at(120)),
            Verdict::Hold { seen: 2, .. }
        ));
        // headscale recovers: the episode is over, the count restarts.
        assert_eq!(g.judge(100, 99, at(121)), Verdict::Apply);
        assert!(matches!(
            g.judge(100, 10, at(300)),
            Verdict::Hold { seen: 1, .. }
        ));
    }
}
