//! Connection churn: short-lived clients that connect, relay a couple of
//! packets and leave, at a steady rate, while the active pairs run.
//!
//! Each round is two fresh keys A and B: A sends [`PACKETS`] packets to B,
//! B checks that each names B as its receiver, B leaves, then A sends one
//! more packet to the departed B (the relay must drop it: anyone receiving
//! it counts a wrong-key delivery) and leaves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::{stamp_payload, tag_matches, WrongKeys};
use crate::client::dial;
use crate::proto::{Frame, NodePrivate};

/// Packets A sends to B while both are connected.
const PACKETS: u64 = 2;
/// Bound on one whole round (two handshakes, relay, leave).
const ROUND_LIMIT: Duration = Duration::from_secs(10);
/// How long B waits for its packets.
const RECV_LIMIT: Duration = Duration::from_secs(5);

/// Counters of a churn run.
#[derive(Debug, Default)]
pub struct ChurnCounters {
    connections: AtomicU64,
    dial_errors: AtomicU64,
    rounds: AtomicU64,
    skipped: AtomicU64,
    sent: AtomicU64,
    delivered: AtomicU64,
    timed_out: AtomicU64,
}

/// What the churn clients did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ChurnReport {
    /// Requested new connections per second.
    pub rate: u64,
    /// Connections that completed the DERP handshake.
    pub connections: u64,
    /// Dials or handshakes that failed.
    pub dial_errors: u64,
    /// Rounds (pairs of connections) completed.
    pub rounds: u64,
    /// Rounds not started because too many were still in flight.
    pub skipped: u64,
    /// Packets sent between live churn clients.
    pub sent: u64,
    /// Of those, delivered to the right receiver.
    pub delivered: u64,
    /// Rounds that hit the time bound.
    pub timed_out: u64,
}

impl ChurnCounters {
    /// A snapshot for the report.
    pub fn report(&self, rate: u64) -> ChurnReport {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ChurnReport {
            rate,
            connections: g(&self.connections),
            dial_errors: g(&self.dial_errors),
            rounds: g(&self.rounds),
            skipped: g(&self.skipped),
            sent: g(&self.sent),
            delivered: g(&self.delivered),
            timed_out: g(&self.timed_out),
        }
    }
}

/// Starts rounds so that about `rate` connections per second are made,
/// until `end`; at most `max_in_flight` rounds run at once. Returns when
/// every started round has finished or hit its bound.
pub async fn churn_loop(
    url: String,
    rate: u64,
    end: Instant,
    insecure: bool,
    max_in_flight: usize,
    counters: Arc<ChurnCounters>,
    wrong: Arc<WrongKeys>,
) {
    // Two connections per round.
    let per_round = Duration::from_nanos(2_000_000_000 / rate.max(1));
    let mut tick = tokio::time::interval(per_round);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut rounds = tokio::task::JoinSet::new();
    while Instant::now() < end {
        tick.tick().await;
        while rounds.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            counters.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (url, counters, wrong) = (url.clone(), counters.clone(), wrong.clone());
        rounds.spawn(async move {
            let _slot = slot;
            if tokio::time::timeout(ROUND_LIMIT, round(&url, insecure, &counters, &wrong))
                .await
                .is_err()
            {
                counters.timed_out.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while rounds.join_next().await.is_some() {}
}

async fn round(url: &str, insecure: bool, counters: &ChurnCounters, wrong: &WrongKeys) {
    let (ak, bk) = (NodePrivate::generate(), NodePrivate::generate());
    let dialed = |r: &Result<_, _>| {
        let c = if r.is_ok() {
            &counters.connections
        } else {
            &counters.dial_errors
        };
        c.fetch_add(1, Ordering::Relaxed);
    };
    let b = dial(url, &bk, insecure).await;
    dialed(&b);
    let a = dial(url, &ak, insecure).await;
    dialed(&a);
    let (Ok(mut a), Ok(mut b)) = (a, b) else {
        return;
    };
    let (a_pub, b_pub) = (ak.public(), bk.public());
    for seq in 0..PACKETS {
        a.queue_packet_with(b_pub, 64, |buf| {
            stamp_payload(buf, seq, &b_pub);
        });
    }
    if a.flush().await.is_err() {
        return;
    }
    counters.sent.fetch_add(PACKETS, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + RECV_LIMIT;
    let mut got = 0;
    while got < PACKETS {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some(frame)) = b.recv_timeout(left).await else {
            break;
        };
        match frame {
            Frame::RecvPacket { src, payload } => {
                if !tag_matches(&payload, &b_pub) {
                    wrong.wrong_key.fetch_add(1, Ordering::Relaxed);
                } else if src != a_pub {
                    wrong.wrong_src.fetch_add(1, Ordering::Relaxed);
                } else {
                    got += 1;
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Frame::Ping(d) => {
                let _ = b.send(&Frame::Pong(d)).await;
            }
            _ => {}
        }
    }
    drop(b);
    // To a peer that just left: must go nowhere.
    a.queue_packet_with(b_pub, 64, |buf| {
        stamp_payload(buf, PACKETS, &b_pub);
    });
    let _ = a.flush().await;
    counters.rounds.fetch_add(1, Ordering::Relaxed);
}
