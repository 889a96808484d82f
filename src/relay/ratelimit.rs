//! Token buckets: the per-client receive limit (bytes) and the listener's
//! accept limit (connections).

use std::time::{Duration, Instant};

/// Smallest burst a per-client limit may have: one maximum-size packet
/// frame body, so any legal frame can pass.
pub const MIN_CLIENT_BURST: u64 = (64 << 10) + 32;

/// Per-client receive rate limit. Zero rate = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientRateLimit {
    /// Bytes per second (0 = off).
    pub bytes_per_sec: u64,
    /// Burst in bytes (at least [`MIN_CLIENT_BURST`] when enabled).
    pub burst: u64,
}

impl ClientRateLimit {
    /// A limit of `bytes_per_sec` with `burst` raised to the minimum.
    pub fn new(bytes_per_sec: u64, burst: u64) -> ClientRateLimit {
        if bytes_per_sec == 0 {
            return ClientRateLimit::default();
        }
        ClientRateLimit {
            bytes_per_sec,
            burst: burst.max(MIN_CLIENT_BURST),
        }
    }

    /// Whether limiting is on.
    pub fn is_enabled(&self) -> bool {
        self.bytes_per_sec > 0
    }
}

/// A token bucket whose balance may go negative (debt): callers take what
/// they used and wait out the debt before taking more.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` per second up to `burst`.
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Takes `n` tokens if available now.
    pub fn try_take(&mut self, n: f64) -> bool {
        self.refill(Instant::now());
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens unconditionally (the balance may go negative).
    pub fn take(&mut self, n: f64) {
        self.refill(Instant::now());
        self.tokens -= n;
    }

    /// How long until the balance is back to zero (no wait if not in debt).
    pub fn debt_wait(&mut self) -> Duration {
        self.refill(Instant::now());
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_raised_to_one_max_frame() {
        assert_eq!(ClientRateLimit::new(1_250_000, 10).burst, 65_568);
        assert_eq!(ClientRateLimit::new(1, 1 << 20).burst, 1 << 20);
        assert!(!ClientRateLimit::new(0, 100).is_enabled());
    }

    #[test]
    fn bucket_allows_burst_then_refuses_then_owes() {
        let mut b = TokenBucket::new(1.0, 3.0);
        assert!(b.try_take(1.0) && b.try_take(1.0) && b.try_take(1.0));
        assert!(!b.try_take(1.0));
        let mut d = TokenBucket::new(1000.0, 100.0);
        d.take(1100.0);
        let w = d.debt_wait();
        assert!(
            w > Duration::from_millis(900) && w <= Duration::from_secs(1),
            "{w:?}"
        );
    }
}
