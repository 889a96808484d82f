//! A connection's reader: decodes frames out of large read buffers and acts
//! on them. Packets are routed straight into the destination's outbox; the
//! payload is a slice of this reader's buffer, never copied.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::AsyncRead;

use super::conn::ClientConn;
use super::outbox::{Enqueued, QueuedPacket};
use super::ratelimit::TokenBucket;
use super::registry::SentTo;
use super::Shared;
use crate::metrics::DropReason;
use crate::proto::limits::looks_like_disco;
use crate::proto::{Frame, FrameDecoder, FrameError, NodePublic, PeerGoneReason, Role};

/// Bytes requested from the socket per read when the buffer runs low.
pub const READ_CHUNK: usize = 64 << 10;
/// Buffer allocated when an idle connection becomes readable.
pub const WAKE_CHUNK: usize = 16 << 10;
/// Read buffer of transports that cannot wait for readability.
pub const SMALL_CHUNK: usize = 4 << 10;
/// A read shorter than this marks a quiet connection…
const QUIET_READ: usize = 512;
/// …which waits with a buffer of this size.
const QUIET_CHUNK: usize = 512;

/// The read half of a client connection.
pub trait ReadHalf: AsyncRead + Unpin + Send + 'static {
    /// Resolves when a read would make progress, without needing a buffer.
    /// Transports that cannot tell resolve at once.
    fn wait_readable(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;

    /// Whether [`ReadHalf::wait_readable`] really waits (so the reader can
    /// drop its buffer while idle).
    fn can_wait_readable(&self) -> bool {
        true
    }

    /// Read buffer size while busy. Transports that cannot wait for
    /// readability keep their buffer while idle, so they use a smaller one.
    fn read_chunk(&self) -> usize {
        READ_CHUNK
    }

    /// Whether the transport holds the start of a unit (a TLS record) whose
    /// rest has not arrived: counts as a frame in progress for the frame
    /// timeout.
    fn has_partial(&self) -> bool {
        false
    }
}

impl ReadHalf for tokio::net::tcp::OwnedReadHalf {
    fn wait_readable(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        // Poll-based readiness uses the socket's own waker slot: a few bytes
        // in the waiting future instead of a `readable()` waiter (168).
        let tcp: &tokio::net::TcpStream = (*self).as_ref();
        std::future::poll_fn(move |cx| tcp.poll_read_ready(cx))
    }
}

impl<T: AsyncRead + Send + 'static> ReadHalf for tokio::io::ReadHalf<T> {
    fn wait_readable(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }

    fn can_wait_readable(&self) -> bool {
        false
    }

    fn read_chunk(&self) -> usize {
        // TLS decrypts from 4 KiB socket reads, WebSocket hands over a
        // message at a time; a small buffer loses nothing and, since these
        // transports keep it while idle, keeps idle clients cheap.
        SMALL_CHUNK
    }
}

/// Why a reader stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReaderEnd {
    /// The client closed the connection.
    #[error("client closed the connection")]
    Eof,
    /// The connection was closed from our side.
    #[error("connection closed by the relay")]
    Closed,
    /// The client sent a malformed frame.
    #[error("malformed frame: {0}")]
    BadFrame(#[from] FrameError),
    /// A mesh-only frame from a client without the mesh key.
    #[error("mesh-only frame {0:#04x} from a client without the mesh key")]
    MeshOnlyFrame(u8),
    /// The socket failed.
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
    /// Nothing arrived within the idle timeout.
    #[error("idle timeout")]
    Idle,
    /// A frame started but did not finish within the frame timeout.
    #[error("frame not completed within the frame timeout")]
    FrameTimeout,
}

/// Sets `timer` to the earlier of the frame deadline and the idle deadline
/// (from now); with neither, drops it so a quiet connection holds no timer.
fn arm(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    frame_deadline: Option<tokio::time::Instant>,
    idle: Option<Duration>,
) {
    let idle_deadline = idle.map(|d| tokio::time::Instant::now() + d);
    let deadline = match (frame_deadline, idle_deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match (deadline, timer.as_mut()) {
        (None, _) => *timer = None,
        (Some(d), Some(t)) => t.as_mut().reset(d),
        (Some(d), None) => *timer = Some(Box::pin(tokio::time::sleep_until(d))),
    }
}

/// Resolves when the armed timer fires; never without one.
async fn expiry(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer.as_mut() {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Per-reader state.
pub struct Reader {
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    decoder: FrameDecoder,
    /// Where this connection's packets went (for PeerGone when it leaves).
    pub sent_to: SentTo,
    last_dst: Option<(NodePublic, u64)>,
    /// Last (src, dst, dst connection) of a ForwardPacket from a mesh peer.
    last_fwd: Option<(NodePublic, NodePublic, u64)>,
    /// PeerGone(NotHere) replies: burst 3, one per second.
    not_here: TokenBucket,
    connected_at: Instant,
    /// Names what this reader brought in since it last had to wait for
    /// its socket: packets read in one go, while no writer of this thread
    /// could run, share the destination queues' burst allowance (see
    /// [`super::outbox`]). Readers start far apart, so two readers' tokens
    /// practically never coincide (which would only let a packet more be
    /// queued).
    arrival: u32,
}

/// Received-packet counts accumulated over one read, flushed once.
#[derive(Default)]
struct Tally {
    disco: (u64, u64),
    other: (u64, u64),
}

impl Reader {
    /// A reader for a registered connection.
    pub fn new(conn: Arc<ClientConn>, shared: Arc<Shared>) -> Reader {
        let mut decoder = FrameDecoder::new(Role::Server);
        decoder.allow_mesh_frames(conn.can_mesh);
        decoder.handshake_done();
        let conn_id = conn.id;
        Reader {
            conn,
            shared,
            decoder,
            sent_to: SentTo::new(),
            last_dst: None,
            last_fwd: None,
            not_here: TokenBucket::new(1.0, 3.0),
            connected_at: Instant::now(),
            arrival: (conn_id as u32).wrapping_mul(0x9E37_79B9),
        }
    }

    /// Reads and handles frames until the connection ends. `buf` holds any
    /// bytes already read past the handshake.
    pub async fn run<R: ReadHalf>(&mut self, r: &mut R, mut buf: BytesMut) -> ReaderEnd {
        // This future lives as long as the connection, so its size is a
        // large part of an idle client's memory: one cancellation future
        // for the whole loop, and one timer, boxed and made only while a
        // deadline exists (a frame in progress, or an idle timeout).
        let cancel = self.conn.cancel.clone();
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let idle = self.shared.config.idle_timeout;
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut limiter: Option<TokenBucket> = None;
        let mut rate_generation = u64::MAX;
        let mut last_read = 0usize;
        // When the frame now in progress must be complete.
        let mut frame_deadline: Option<tokio::time::Instant> = None;
        loop {
            if let Err(e) = self.drain(&mut buf) {
                return e;
            }
            frame_deadline = match (
                self.decoder.mid_frame(&buf) || r.has_partial(),
                self.shared.config.frame_timeout,
            ) {
                (true, Some(t)) => {
                    Some(frame_deadline.unwrap_or_else(|| tokio::time::Instant::now() + t))
                }
                _ => None,
            };
            if !self.conn.can_mesh {
                if self.shared.client_rate_generation() != rate_generation {
                    let (rate, g) = self.shared.client_rate();
                    rate_generation = g;
                    limiter = rate
                        .is_enabled()
                        .then(|| TokenBucket::new(rate.bytes_per_sec as f64, rate.burst as f64));
                }
                if let Some(wait) = limiter
                    .as_mut()
                    .map(|l| l.debt_wait())
                    .filter(|w| !w.is_zero())
                {
                    self.shared.metrics.rate_limit_waits.inc();
                    let sleep = Box::pin(tokio::time::sleep(wait));
                    tokio::select! {
                        _ = sleep => {}
                        _ = &mut cancelled => return ReaderEnd::Closed,
                    }
                }
            }
            let mut quiet = false;
            if buf.is_empty() && !r.can_wait_readable() {
                // This transport must hold a buffer while it waits: after a
                // small read (a quiet connection) make it a small one.
                quiet = last_read < QUIET_READ;
                if quiet && buf.capacity() > QUIET_CHUNK {
                    buf = BytesMut::with_capacity(QUIET_CHUNK);
                }
            } else if buf.is_empty() {
                // Between bursts: an idle connection holds no read buffer.
                if r.wait_readable().now_or_never().is_none() {
                    buf = BytesMut::new();
                    arm(&mut timer, frame_deadline, idle);
                    // It waits: what comes next is a new arrival.
                    self.arrival = self.arrival.wrapping_add(1);
                    let ready = tokio::select! {
                        r = r.wait_readable() => r,
                        _ = expiry(&mut timer) => return self.timed_out(frame_deadline),
                        _ = &mut cancelled => return ReaderEnd::Closed,
                    };
                    if let Err(e) = ready {
                        return ReaderEnd::Io(e);
                    }
                }
            }
            if buf.capacity() - buf.len() < if quiet { 1 } else { 2048 } {
                // Waking from idle, start smaller: most wake-ups carry little.
                buf.reserve(if buf.capacity() == 0 {
                    WAKE_CHUNK.min(r.read_chunk())
                } else {
                    r.read_chunk()
                });
            }
            // What woke the reader may be the start of a transport unit (a
            // TLS record) whose rest is late: that is a frame in progress.
            if frame_deadline.is_none() && r.has_partial() {
                frame_deadline = self
                    .shared
                    .config
                    .frame_timeout
                    .map(|t| tokio::time::Instant::now() + t);
            }
            arm(&mut timer, frame_deadline, idle);
            // Whether the read had to wait for the socket (then what it
            // brings is a new arrival). A closure over the three borrows:
            // smaller than a read future wrapped in another (this future's
            // size is every connection's memory).
            let mut waited = false;
            let read = std::future::poll_fn(|cx| {
                let p = tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *r), cx, &mut buf);
                waited |= p.is_pending();
                p
            });
            let n = tokio::select! {
                r = read => r,
                _ = expiry(&mut timer) => return self.timed_out(frame_deadline),
                _ = &mut cancelled => return ReaderEnd::Closed,
            };
            if waited {
                self.arrival = self.arrival.wrapping_add(1);
            }
            match n {
                Ok(0) => return ReaderEnd::Eof,
                Ok(n) => {
                    last_read = n;
                    if let Some(l) = limiter.as_mut() {
                        l.take(n as f64);
                    }
                }
                Err(e) => return ReaderEnd::Io(e),
            }
        }
    }

    /// The timer fired: the frame in progress is late, or (no frame in
    /// progress) the connection was idle too long.
    fn timed_out(&self, frame_deadline: Option<tokio::time::Instant>) -> ReaderEnd {
        match frame_deadline {
            Some(d) if d <= tokio::time::Instant::now() => self.frame_timed_out(),
            _ => ReaderEnd::Idle,
        }
    }

    fn frame_timed_out(&self) -> ReaderEnd {
        self.shared.metrics.frame_timeouts.inc();
        ReaderEnd::FrameTimeout
    }

    /// Handles every complete frame in `buf`.
    fn drain(&mut self, buf: &mut BytesMut) -> Result<(), ReaderEnd> {
        let mut tally = Tally::default();
        let arrival = self.arrival;
        let result = loop {
            match self.decoder.decode(buf) {
                Ok(Some(frame)) => {
                    if let Err(e) = self.handle(frame, &mut tally, arrival) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(FrameError::MeshOnly(t)) => {
                    self.shared.metrics.mesh_frame_refusals.inc();
                    break Err(ReaderEnd::MeshOnlyFrame(t as u8));
                }
                Err(e) => break Err(e.into()),
            }
        };
        let m = &self.shared.metrics;
        if tally.disco.0 > 0 {
            m.received_disco.add(tally.disco.0, tally.disco.1);
        }
        if tally.other.0 > 0 {
            m.received_other.add(tally.other.0, tally.other.1);
        }
        result
    }

    fn handle(&mut self, frame: Frame, tally: &mut Tally, arrival: u32) -> Result<(), ReaderEnd> {
        if !matches!(frame, Frame::Ignored { .. }) {
            self.shared.registry.note_activity(&self.conn);
        }
        match frame {
            Frame::SendPacket { dst, payload } => {
                let disco = looks_like_disco(&payload);
                let t = if disco {
                    &mut tally.disco
                } else {
                    &mut tally.other
                };
                t.0 += 1;
                t.1 += payload.len() as u64;
                self.route(dst, payload, disco, arrival);
            }
            Frame::ForwardPacket { src, dst, payload } => {
                self.shared.metrics.packets_forwarded_in.inc();
                let disco = looks_like_disco(&payload);
                match self.shared.registry.lookup(&dst) {
                    Some(d) => {
                        // For PeerGone(src) to `d` when src leaves the region.
                        if self.last_fwd != Some((src, dst, d.id)) {
                            self.last_fwd = Some((src, dst, d.id));
                            self.shared.registry.remote.note_receiver(src, dst, d.id);
                        }
                        self.shared.enqueue(&d, src, payload, disco, arrival)
                    }
                    None => self
                        .shared
                        .metrics
                        .dropped(DropReason::UnknownDestOnFwd, disco)
                        .add(1, payload.len() as u64),
                }
            }
            Frame::NotePreferred(p) => self.note_preferred(p),
            Frame::WatchConns => {
                if self.conn.key != self.shared.public_key {
                    self.shared.registry.add_watcher(&self.conn);
                }
            }
            Frame::ClosePeer { key } => {
                let n = self.shared.registry.close_key(&key);
                tracing::debug!(peer = %key, closed = n, "ClosePeer from mesh peer");
            }
            Frame::Ping(data) => {
                self.shared.metrics.pings_received.inc();
                self.conn.outbox.set_pong(data);
            }
            Frame::Ignored { .. } | Frame::ClientInfo { .. } => {
                self.shared.metrics.unknown_frames.inc();
            }
            // The server-role decoder yields no other frame types.
            _ => self.shared.metrics.unknown_frames.inc(),
        }
        Ok(())
    }

    /// Routes a SendPacket from this connection to `dst`.
    fn route(&mut self, dst: NodePublic, payload: bytes::Bytes, disco: bool, arrival: u32) {
        let shared = &self.shared;
        match shared.registry.lookup(&dst) {
            Some(d) => {
                if self.last_dst != Some((dst, d.id)) {
                    self.last_dst = Some((dst, d.id));
                    self.sent_to.insert(dst, d.id);
                }
                shared.enqueue(&d, self.conn.key, payload, disco, arrival);
            }
            None => {
                // Not local: a mesh peer may have it (queued, never blocks).
                let Err(payload) = shared.registry.remote.forward(self.conn.key, dst, payload)
                else {
                    return;
                };
                shared
                    .metrics
                    .dropped(DropReason::UnknownDest, disco)
                    .add(1, payload.len() as u64);
                if disco && self.not_here.try_take(1.0) {
                    self.conn.outbox.push_control(Frame::PeerGone {
                        key: dst,
                        reason: PeerGoneReason::NotHere,
                    });
                }
            }
        }
    }

    fn note_preferred(&self, preferred: bool) {
        let was = self.conn.preferred.swap(preferred, Ordering::Relaxed);
        if was == preferred {
            return;
        }
        let m = &self.shared.metrics;
        if preferred {
            m.current_home_connections.inc();
        } else {
            m.current_home_connections.dec();
        }
        if self.connected_at.elapsed() > Duration::from_secs(5) {
            tracing::debug!(key = %self.conn.key, preferred, "home relay changed");
        }
    }

    /// Undo this connection's gauge contributions when it closes.
    pub fn finish(&self) {
        if self.conn.preferred.swap(false, Ordering::Relaxed) {
            self.shared.metrics.current_home_connections.dec();
        }
    }
}

impl Shared {
    /// Offers a packet to a destination connection, counting any drop.
    /// `arrival` names what the sender's reader brought in at once (see
    /// [`super::outbox`]).
    #[inline]
    pub fn enqueue(
        &self,
        dst: &ClientConn,
        src: NodePublic,
        payload: bytes::Bytes,
        disco: bool,
        arrival: u32,
    ) {
        let len = payload.len() as u64;
        match dst
            .outbox
            .push_packet(QueuedPacket { src, payload }, disco, arrival)
        {
            Enqueued::Ok => {}
            Enqueued::EvictedHead { packets, bytes } => self
                .metrics
                .dropped(DropReason::QueueHead, disco)
                .add(packets, bytes),
            Enqueued::Closed => self
                .metrics
                .dropped(DropReason::GoneDisconnected, disco)
                .add(1, len),
        }
    }
}
