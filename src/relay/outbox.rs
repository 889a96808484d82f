//! A connection's bounded outgoing queues.
//!
//! Senders never block: a full packet queue evicts its oldest packet (counted
//! as `queue_head`). The depth bounds what is queued from *earlier* reads:
//! packets that arrived together (one read of a sender's socket, which a
//! sender whose reader was late delivers all at once) never evict each
//! other, up to [`ARRIVAL_EXTRA`] times the depth. Reading frame by frame
//! with the writer running in parallel, as Tailscale's relay does, gives
//! the writer the same chance to drain a burst; a batch must not lose what
//! a frame-by-frame reader would have delivered. Disco packets have a queue of their own so NAT-traversal
//! messages are not starved by bulk traffic. The writer takes everything
//! queued at once (swapping buffers, so the lock is held only for the swap)
//! and writes it as one batch.

use std::collections::VecDeque;
use std::mem;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use crate::proto::{Frame, NodePublic};

/// One packet waiting to be written as a RecvPacket.
#[derive(Debug, Clone)]
pub struct QueuedPacket {
    /// Who sent it.
    pub src: NodePublic,
    /// The payload, sharing the sender's read buffer.
    pub payload: Bytes,
}

/// How many depths' worth of packets of one arrival may be queued beyond
/// the depth (so a queue holds at most `depth * (1 + ARRIVAL_EXTRA)`, and
/// past `depth` only packets of one read, which share its buffer).
pub const ARRIVAL_EXTRA: usize = 7;

/// What happened to an offered packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued with room to spare.
    Ok,
    /// Queued, but older packets were evicted: how many, and their payload
    /// bytes.
    EvictedHead {
        /// Packets evicted.
        packets: u64,
        /// Their payload bytes.
        bytes: u64,
    },
    /// Not queued: the connection is closing.
    Closed,
}

/// Everything the writer has to write next.
#[derive(Debug, Default)]
pub struct Batch {
    /// Regular packets, oldest first.
    pub packets: VecDeque<QueuedPacket>,
    /// Disco packets, oldest first.
    pub disco: VecDeque<QueuedPacket>,
    /// Control frames (PeerGone, PeerPresent), in order.
    pub control: VecDeque<Frame>,
    /// A pending pong.
    pub pong: Option<[u8; 8]>,
    /// When the oldest packet in the batch was queued.
    pub oldest: Option<std::time::Instant>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
            && self.disco.is_empty()
            && self.control.is_empty()
            && self.pong.is_none()
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.packets.clear();
        self.disco.clear();
        self.control.clear();
        self.pong = None;
        self.oldest = None;
    }
}

struct State {
    queued: Batch,
    /// The arrival the last packet came with, and how many packets it has
    /// brought so far (saturating; small, so the state does not grow).
    arrival: u32,
    arrived: u16,
    closed: bool,
    /// Close once everything queued so far is written.
    finishing: bool,
}

/// A connection's outgoing queues plus the wake-up for its writer.
pub struct Outbox {
    state: Mutex<State>,
    /// The writer waiting for something to send (one consumer: an atomic
    /// waker is all it needs, 16 bytes instead of a `Notify` and its
    /// waiter).
    wake: AtomicWaker,
    depth: usize,
    control_cap: usize,
}

impl Outbox {
    /// Queues of `depth` packets each (regular and disco) and room for
    /// `control_cap` control frames.
    pub fn new(depth: usize, control_cap: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                queued: Batch::default(),
                arrival: 0,
                arrived: 0,
                closed: false,
                finishing: false,
            }),
            wake: AtomicWaker::new(),
            depth: depth.max(1),
            control_cap,
        }
    }

    /// Offers a packet that came with `arrival` (a token the sender's
    /// reader changes with every read). Never blocks; a full queue drops
    /// its oldest packets, but packets of the same arrival do not count
    /// against the depth (see the module doc).
    pub fn push_packet(&self, pkt: QueuedPacket, disco: bool, arrival: u32) -> Enqueued {
        let mut st = self.state.lock();
        if st.closed {
            return Enqueued::Closed;
        }
        let was_empty = st.queued.is_empty();
        let mut result = Enqueued::Ok;
        if was_empty {
            st.queued.oldest = Some(std::time::Instant::now());
        }
        if st.arrival != arrival {
            st.arrival = arrival;
            st.arrived = 0;
        }
        let extra = usize::from(st.arrived).min(self.depth * ARRIVAL_EXTRA);
        st.arrived = st.arrived.saturating_add(1);
        let room = self.depth + extra;
        let q = if disco {
            &mut st.queued.disco
        } else {
            &mut st.queued.packets
        };
        let (mut packets, mut bytes) = (0u64, 0u64);
        while q.len() >= room {
            let old = q.pop_front().expect("a full queue is not empty");
            packets += 1;
            bytes += old.payload.len() as u64;
        }
        if packets > 0 {
            result = Enqueued::EvictedHead { packets, bytes };
        }
        q.push_back(pkt);
        drop(st);
        if was_empty {
            self.wake.wake();
        }
        result
    }

    /// Queues a control frame; `false` if closing or over the control cap.
    pub fn push_control(&self, frame: Frame) -> bool {
        let mut st = self.state.lock();
        if st.closed || st.queued.control.len() >= self.control_cap {
            return false;
        }
        let was_empty = st.queued.is_empty();
        st.queued.control.push_back(frame);
        drop(st);
        if was_empty {
            self.wake.wake();
        }
        true
    }

    /// Sets the pending pong; `false` (ping dropped) if one is already pending.
    pub fn set_pong(&self, data: [u8; 8]) -> bool {
        let mut st = self.state.lock();
        if st.closed || st.queued.pong.is_some() {
            return false;
        }
        let was_empty = st.queued.is_empty();
        st.queued.pong = Some(data);
        drop(st);
        if was_empty {
            self.wake.wake();
        }
        true
    }

    /// Swaps everything queued into `into` (which must be empty).
    /// Returns `false` once the outbox is closed (or finishing) and drained.
    pub fn take(&self, into: &mut Batch) -> bool {
        debug_assert!(into.is_empty());
        let mut st = self.state.lock();
        mem::swap(&mut st.queued, into);
        !((st.closed || st.finishing) && into.is_empty())
    }

    /// Queues a last control frame (e.g. Restarting): the writer writes
    /// what is queued, this frame last, and then ends the connection.
    pub fn finish_with(&self, frame: Frame) {
        self.finish_inner(Some(frame));
    }

    /// The writer writes what is queued and then ends the connection;
    /// later offers are still taken until then.
    pub fn finish(&self) {
        self.finish_inner(None);
    }

    fn finish_inner(&self, frame: Option<Frame>) {
        let mut st = self.state.lock();
        if st.closed || st.finishing {
            return;
        }
        if let Some(frame) = frame {
            st.queued.control.push_back(frame);
        }
        st.finishing = true;
        drop(st);
        self.wake.wake();
    }

    /// Waits until something is queued or the outbox closes.
    pub async fn wait(&self) {
        std::future::poll_fn(|cx| {
            self.wake.register(cx.waker());
            // Checked after registering, so no push is missed.
            let st = self.state.lock();
            if st.closed || st.finishing || !st.queued.is_empty() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// Closes the outbox: later offers are refused. Returns what was still
    /// queued (to be counted as dropped).
    pub fn close(&self) -> Batch {
        let mut st = self.state.lock();
        st.closed = true;
        let left = mem::take(&mut st.queued);
        drop(st);
        self.wake.wake();
        left
    }

    /// Whether [`Outbox::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.state.lock().closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(n: u8) -> QueuedPacket {
        QueuedPacket {
            src: NodePublic([n; 32]),
            payload: Bytes::from(vec![n; n as usize]),
        }
    }

    fn evicted(packets: u64, bytes: u64) -> Enqueued {
        Enqueued::EvictedHead { packets, bytes }
    }

    fn srcs(b: &Batch) -> Vec<u8> {
        b.packets.iter().map(|p| p.src.0[0]).collect()
    }

    #[test]
    fn full_queue_evicts_oldest() {
        let o = Outbox::new(2, 4);
        // Each packet from a read of its own.
        assert_eq!(o.push_packet(pkt(1), false, 1), Enqueued::Ok);
        assert_eq!(o.push_packet(pkt(2), false, 2), Enqueued::Ok);
        assert_eq!(o.push_packet(pkt(3), false, 3), evicted(1, 1));
        // The disco queue is separate.
        assert_eq!(o.push_packet(pkt(4), true, 4), Enqueued::Ok);
        let mut b = Batch::default();
        assert!(o.take(&mut b));
        assert_eq!(srcs(&b), vec![2, 3]);
        assert_eq!(b.disco.len(), 1);
    }

    #[test]
    fn packets_of_one_read_do_not_evict_each_other() {
        let o = Outbox::new(2, 4);
        for n in 1..=5 {
            assert_eq!(o.push_packet(pkt(n), false, 7), Enqueued::Ok);
        }
        let mut b = Batch::default();
        assert!(o.take(&mut b));
        assert_eq!(srcs(&b), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn the_next_read_brings_the_queue_back_to_its_depth() {
        let o = Outbox::new(2, 4);
        for n in 1..=5 {
            o.push_packet(pkt(n), false, 7);
        }
        // The writer has not run: a new read may keep depth - 1 older ones.
        assert_eq!(o.push_packet(pkt(6), false, 8), evicted(4, 1 + 2 + 3 + 4));
        let mut b = Batch::default();
        o.take(&mut b);
        assert_eq!(srcs(&b), vec![5, 6]);
    }

    #[test]
    fn one_read_is_capped_at_its_allowance() {
        let depth = 2;
        let o = Outbox::new(depth, 4);
        let cap = depth * (1 + ARRIVAL_EXTRA);
        for n in 1..=cap as u8 {
            assert_eq!(o.push_packet(pkt(n), false, 9), Enqueued::Ok, "packet {n}");
        }
        assert_eq!(o.push_packet(pkt(100), false, 9), evicted(1, 1));
        let mut b = Batch::default();
        o.take(&mut b);
        assert_eq!(b.packets.len(), cap);
    }

    #[test]
    fn one_pending_pong_and_bounded_control() {
        let o = Outbox::new(2, 1);
        assert!(o.set_pong([1; 8]));
        assert!(!o.set_pong([2; 8]));
        assert!(o.push_control(Frame::KeepAlive));
        assert!(!o.push_control(Frame::KeepAlive));
        let mut b = Batch::default();
        o.take(&mut b);
        assert_eq!(b.pong, Some([1; 8]));
        b.clear();
        assert!(o.set_pong([3; 8]));
    }

    #[test]
    fn finishing_outbox_drains_then_ends() {
        let o = Outbox::new(4, 4);
        o.push_packet(pkt(1), false, 1);
        o.finish_with(Frame::Restarting {
            reconnect_in_ms: 1,
            try_for_ms: 2,
        });
        let mut b = Batch::default();
        assert!(o.take(&mut b));
        assert_eq!(b.packets.len(), 1);
        assert!(matches!(b.control.back(), Some(Frame::Restarting { .. })));
        b.clear();
        assert!(!o.take(&mut b));
    }

    #[test]
    fn closed_outbox_refuses_and_returns_leftovers() {
        let o = Outbox::new(4, 4);
        o.push_packet(pkt(1), false, 1);
        let left = o.close();
        assert_eq!(left.packets.len(), 1);
        assert_eq!(o.push_packet(pkt(2), false, 2), Enqueued::Closed);
        assert!(!o.push_control(Frame::KeepAlive));
        let mut b = Batch::default();
        assert!(!o.take(&mut b));
    }
}
