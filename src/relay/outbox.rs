//! A connection's bounded outgoing queues.
//!
//! Senders never block: a full packet queue evicts its oldest packet (counted
//! as `queue_head`). Disco packets have a queue of their own so NAT-traversal
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

/// What happened to an offered packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued with room to spare.
    Ok,
    /// Queued, but the oldest packet (of this many payload bytes) was evicted.
    EvictedHead(usize),
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
                closed: false,
                finishing: false,
            }),
            wake: AtomicWaker::new(),
            depth: depth.max(1),
            control_cap,
        }
    }

    /// Offers a packet. Never blocks; a full queue drops its oldest packet.
    pub fn push_packet(&self, pkt: QueuedPacket, disco: bool) -> Enqueued {
        let mut st = self.state.lock();
        if st.closed {
            return Enqueued::Closed;
        }
        let was_empty = st.queued.is_empty();
        let mut result = Enqueued::Ok;
        if was_empty {
            st.queued.oldest = Some(std::time::Instant::now());
        }
        let q = if disco {
            &mut st.queued.disco
        } else {
            &mut st.queued.packets
        };
        if q.len() >= self.depth {
            let old = q.pop_front().expect("a full queue is not empty");
            result = Enqueued::EvictedHead(old.payload.len());
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

    #[test]
    fn full_queue_evicts_oldest() {
        let o = Outbox::new(2, 4);
        assert_eq!(o.push_packet(pkt(1), false), Enqueued::Ok);
        assert_eq!(o.push_packet(pkt(2), false), Enqueued::Ok);
        assert_eq!(o.push_packet(pkt(3), false), Enqueued::EvictedHead(1));
        // The disco queue is separate.
        assert_eq!(o.push_packet(pkt(4), true), Enqueued::Ok);
        let mut b = Batch::default();
        assert!(o.take(&mut b));
        let srcs: Vec<u8> = b.packets.iter().map(|p| p.src.0[0]).collect();
        assert_eq!(srcs, vec![2, 3]);
        assert_eq!(b.disco.len(), 1);
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
        o.push_packet(pkt(1), false);
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
        o.push_packet(pkt(1), false);
        let left = o.close();
        assert_eq!(left.packets.len(), 1);
        assert_eq!(o.push_packet(pkt(2), false), Enqueued::Closed);
        assert!(!o.push_control(Frame::KeepAlive));
        let mut b = Batch::default();
        assert!(!o.take(&mut b));
    }
}
