//! A mesh link's bounded outbound queue of ForwardPacket frames.
//!
//! Readers of local clients push here and never wait: when the queue is
//! full its oldest packet is dropped (and counted), so a slow or stuck peer
//! costs packets to that peer only, never the sender's other traffic. The
//! link's writer task drains the queue in batches.

use std::collections::VecDeque;

use bytes::Bytes;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::Notify;

use crate::proto::NodePublic;

/// Identifies one mesh link for the life of the process.
pub type LinkId = u64;

/// One packet waiting to go out as `ForwardPacket(src, dst, payload)`.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// Original sender.
    pub src: NodePublic,
    /// Destination (connected to the peer).
    pub dst: NodePublic,
    /// Payload.
    pub payload: Bytes,
}

/// Bounded, drop-oldest queue feeding one link's writer.
pub struct ForwardQueue {
    /// The link this queue belongs to.
    pub id: LinkId,
    items: Mutex<VecDeque<Forwarded>>,
    cap: usize,
    wake: Notify,
    dropped: IntCounter,
    queued: IntGauge,
}

impl ForwardQueue {
    /// A queue of at most `cap` packets, counting drops and depth.
    pub fn new(id: LinkId, cap: usize, dropped: IntCounter, queued: IntGauge) -> ForwardQueue {
        ForwardQueue {
            id,
            items: Mutex::new(VecDeque::new()),
            cap: cap.max(1),
            wake: Notify::new(),
            dropped,
            queued,
        }
    }

    /// Queues a packet; never blocks. Returns `false` if the oldest packet
    /// had to be dropped to make room.
    pub fn push(&self, pkt: Forwarded) -> bool {
        let mut q = self.items.lock();
        let was_empty = q.is_empty();
        let mut kept_all = true;
        if q.len() >= self.cap {
            q.pop_front();
            self.dropped.inc();
            kept_all = false;
        } else {
            self.queued.inc();
        }
        q.push_back(pkt);
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
        kept_all
    }

    /// Moves everything queued into `into` (which should be empty).
    pub fn take(&self, into: &mut VecDeque<Forwarded>) {
        let mut q = self.items.lock();
        std::mem::swap(&mut *q, into);
        self.queued.sub(into.len() as i64);
    }

    /// Drops everything queued (the link went down); returns how many.
    pub fn clear(&self) -> usize {
        let mut q = self.items.lock();
        let n = q.len();
        q.clear();
        drop(q);
        self.queued.sub(n as i64);
        self.dropped.inc_by(n as u64);
        n
    }

    /// Packets waiting.
    pub fn len(&self) -> usize {
        self.items.lock().len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until something was queued since the last [`ForwardQueue::take`].
    pub async fn wait(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(n: u8) -> Forwarded {
        Forwarded {
            src: NodePublic([n; 32]),
            dst: NodePublic([0; 32]),
            payload: Bytes::from(vec![n]),
        }
    }

    #[test]
    fn full_queue_drops_oldest_and_counts() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let queued = IntGauge::new("q", "q").unwrap();
        let q = ForwardQueue::new(1, 2, dropped.clone(), queued.clone());
        assert!(q.push(pkt(1)));
        assert!(q.push(pkt(2)));
        assert!(!q.push(pkt(3)));
        assert_eq!(dropped.get(), 1);
        assert_eq!(queued.get(), 2);
        let mut out = VecDeque::new();
        q.take(&mut out);
        let srcs: Vec<u8> = out.iter().map(|p| p.src.0[0]).collect();
        assert_eq!(srcs, vec![2, 3]);
        assert_eq!(queued.get(), 0);
        q.push(pkt(4));
        assert_eq!(q.clear(), 1);
        assert_eq!(dropped.get(), 2);
        assert_eq!(queued.get(), 0);
    }
}
