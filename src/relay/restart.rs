//! A graceful restart that spreads its clients' reconnects over a window.
//!
//! On SIGTERM every client is sent a `Restarting` frame at once, each with
//! its own reconnect delay: the base hint (`--restart-reconnect-in`) plus
//! an offset drawn over the spread window (`--restart-reconnect-spread`).
//! The relay keeps relaying for each client until that delay has passed
//! and only then closes its connection. So a client that obeys the hint
//! (Tailscale's protocol made the field for exactly this, "for the server
//! to smear out the reconnects") and one that ignores it and redials when
//! its connection closes (tailscaled does) both arrive at the region's
//! other relays spread over the window instead of at once, and neither
//! loses its relay before its turn. Mesh peers are closed last, so packets
//! keep flowing between this relay's remaining clients and the region.
//!
//! The offsets are stratified: with `n` clients the window is cut into `n`
//! equal slots and each client gets a uniform point in a slot of its own,
//! in random order. Every client's delay is uniform over the window, and
//! the arrivals are as even as the count allows (no clumps that independent
//! draws would make at the peers).

use std::sync::Arc;
use std::time::Duration;

use super::conn::ClientConn;
use crate::proto::Frame;

/// The hints of a graceful restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartHints {
    /// Shortest reconnect delay told to a client.
    pub reconnect_in: Duration,
    /// Window over which the clients' delays are spread (zero: everyone
    /// gets `reconnect_in` and is closed at once).
    pub spread: Duration,
    /// How long clients should keep trying (the frame's TryFor).
    pub try_for: Duration,
}

/// `n` offsets in `[0, spread)`: slot `i` of `n` equal slots gets a point
/// drawn uniformly within it (`unit()` returns values in `[0, 1)`), and
/// the slots are dealt out in random order (`shuffle`). Pure: no clock.
pub fn spread_offsets(
    n: usize,
    spread: Duration,
    mut unit: impl FnMut() -> f64,
    shuffle: impl FnOnce(&mut [Duration]),
) -> Vec<Duration> {
    if n == 0 {
        return Vec::new();
    }
    let slot = spread.as_secs_f64() / n as f64;
    let mut out: Vec<Duration> = (0..n)
        .map(|i| {
            let u = unit().clamp(0.0, 1.0);
            let at = Duration::from_secs_f64(slot * (i as f64 + u));
            // Rounding must not push the last slot onto the window's end.
            if at >= spread {
                spread.saturating_sub(Duration::from_nanos(1))
            } else {
                at
            }
        })
        .collect();
    shuffle(&mut out);
    out
}

/// One client's part of a restart: the frame it is sent now and when its
/// connection is closed (from the start of the restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    /// The `Restarting` frame for this client.
    pub frame: Frame,
    /// When to close the connection: the delay the frame announces.
    pub close_after: Duration,
}

/// Each connection's departure: regular clients spread over the window
/// (in `offsets`' order, which must have one offset per regular client),
/// mesh peers at its end.
pub fn departures(
    hints: &RestartHints,
    is_mesh: &[bool],
    mut offsets: impl Iterator<Item = Duration>,
) -> Vec<Departure> {
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    is_mesh
        .iter()
        .map(|&mesh| {
            let offset = if mesh {
                hints.spread
            } else {
                offsets.next().unwrap_or(Duration::ZERO)
            };
            let delay = hints.reconnect_in + offset;
            Departure {
                frame: Frame::Restarting {
                    reconnect_in_ms: ms(delay),
                    try_for_ms: ms(hints.try_for),
                },
                close_after: if hints.spread.is_zero() {
                    Duration::ZERO
                } else {
                    delay
                },
            }
        })
        .collect()
}

/// Plans the restart of `conns`: each connection with its departure.
pub fn plan(
    hints: &RestartHints,
    conns: Vec<Arc<ClientConn>>,
) -> Vec<(Arc<ClientConn>, Departure)> {
    let is_mesh: Vec<bool> = conns.iter().map(|c| c.can_mesh).collect();
    let regular = is_mesh.iter().filter(|m| !**m).count();
    let mut rng = fastrand::Rng::new();
    let offsets = spread_offsets(regular, hints.spread, || rng.f64(), fastrand::shuffle);
    let deps = departures(hints, &is_mesh, offsets.into_iter());
    conns.into_iter().zip(deps).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconnect_ms(f: &Frame) -> u32 {
        match f {
            Frame::Restarting {
                reconnect_in_ms, ..
            } => *reconnect_in_ms,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn offsets_fill_every_slot_of_the_window_once() {
        let spread = Duration::from_secs(10);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut v = spread_offsets(1000, spread, || rng.f64(), |v| v.reverse());
        assert_eq!(v.len(), 1000);
        assert!(v.iter().all(|d| *d < spread));
        v.sort();
        // Exactly one offset in each 10 ms slot.
        for (i, d) in v.iter().enumerate() {
            assert_eq!(d.as_millis() as usize / 10, i, "{d:?}");
        }
    }

    #[test]
    fn offsets_are_uniform_within_their_slots() {
        // With the unit draw pinned, offsets sit at the same point of each slot.
        let v = spread_offsets(4, Duration::from_secs(4), || 0.5, |_| {});
        assert_eq!(
            v,
            [500, 1500, 2500, 3500].map(Duration::from_millis).to_vec()
        );
        let v = spread_offsets(3, Duration::from_secs(3), || 0.0, |_| {});
        assert_eq!(v, [0, 1000, 2000].map(Duration::from_millis).to_vec());
        // A draw of (almost) 1 stays inside the window.
        let w = Duration::from_millis(999);
        let v = spread_offsets(1, w, || 1.0, |_| {});
        assert!(v[0] < w);
    }

    #[test]
    fn offsets_are_dealt_in_random_order() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut shuffler = fastrand::Rng::with_seed(2);
        let v = spread_offsets(
            100,
            Duration::from_secs(1),
            || rng.f64(),
            |v| shuffler.shuffle(v),
        );
        assert!(v.windows(2).any(|w| w[0] > w[1]), "shuffled");
        let mut sorted = v.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 100, "all distinct");
    }

    #[test]
    fn no_window_means_everyone_at_once() {
        let v = spread_offsets(5, Duration::ZERO, fastrand::f64, |_| {});
        assert_eq!(v, vec![Duration::ZERO; 5]);
        assert!(spread_offsets(0, Duration::from_secs(1), fastrand::f64, |_| {}).is_empty());
        let hints = RestartHints {
            reconnect_in: Duration::from_millis(750),
            spread: Duration::ZERO,
            try_for: Duration::from_secs(20),
        };
        let d = departures(&hints, &[false, true], v.into_iter());
        for dep in &d {
            assert_eq!(
                dep.frame,
                Frame::Restarting {
                    reconnect_in_ms: 750,
                    try_for_ms: 20_000
                }
            );
            assert_eq!(dep.close_after, Duration::ZERO);
        }
    }

    #[test]
    fn frames_announce_base_plus_offset_and_mesh_peers_leave_last() {
        let hints = RestartHints {
            reconnect_in: Duration::from_secs(1),
            spread: Duration::from_secs(10),
            try_for: Duration::from_secs(30),
        };
        let offsets = [0, 2500, 9999].map(Duration::from_millis);
        let d = departures(&hints, &[false, true, false, false], offsets.into_iter());
        let ms: Vec<u32> = d.iter().map(|d| reconnect_ms(&d.frame)).collect();
        assert_eq!(ms, [1000, 11_000, 3500, 10_999]);
        let close: Vec<u128> = d.iter().map(|d| d.close_after.as_millis()).collect();
        assert_eq!(close, [1000, 11_000, 3500, 10_999]);
        assert!(d.iter().all(|d| matches!(
            d.frame,
            Frame::Restarting {
                try_for_ms: 30_000,
                ..
            }
        )));
    }

    #[test]
    fn huge_hints_saturate_the_frame() {
        let hints = RestartHints {
            reconnect_in: Duration::from_secs(u64::from(u32::MAX)),
            spread: Duration::from_secs(1),
            try_for: Duration::from_secs(u64::from(u32::MAX)),
        };
        let d = departures(&hints, &[false], [Duration::ZERO].into_iter());
        assert_eq!(
            d[0].frame,
            Frame::Restarting {
                reconnect_in_ms: u32::MAX,
                try_for_ms: u32::MAX
            }
        );
    }
}
