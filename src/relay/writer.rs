//! A connection's writer task: drains the outbox and writes everything that
//! is queued as one vectored write. Packet payloads are never copied: each
//! RecvPacket goes out as a 37-byte header+source-key slice and the payload
//! slice shared with the sender's read buffer.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, Instant, Sleep};

use super::conn::ClientConn;
use super::outbox::Batch;
use super::Shared;
use crate::metrics::DropReason;
use crate::proto::frame::recv_packet_prefix;
use crate::proto::limits::looks_like_disco;
use crate::proto::{Frame, FrameType, PeerGoneReason};

/// Most slices handed to one `writev` (Linux allows 1024).
const MAX_IOVECS: usize = 512;

/// Why a writer stopped.
#[derive(Debug)]
pub enum WriterEnd {
    /// The connection was closed from our side.
    Closed,
    /// A write did not complete within the write timeout.
    Timeout,
    /// The socket failed.
    Error(std::io::Error),
}

/// Runs the writer until the connection closes or a write fails.
/// `first` (the ServerInfo frame) is written before anything queued.
pub async fn run<W: AsyncWrite + Unpin>(
    mut w: W,
    conn: Arc<ClientConn>,
    shared: Arc<Shared>,
    first: Bytes,
    tcp_fd: Option<std::os::fd::RawFd>,
) -> WriterEnd {
    let write_timeout = if conn.can_mesh {
        shared.config.mesh_write_timeout
    } else {
        shared.config.write_timeout
    };
    let end = writer_loop(&mut w, &conn, &shared, first, write_timeout).await;
    conn.cancel.cancel();
    if let WriterEnd::Timeout = end {
        shared.metrics.write_timeouts.inc();
        // The client stopped reading: a graceful close would leave its
        // unsent data (up to the socket buffer) queued in the kernel for as
        // long as it keeps acknowledging zero-window probes. Linger 0 makes
        // the close a reset that frees it at once.
        if let Some(fd) = tcp_fd {
            // SAFETY: `AcceptOptions::tcp_fd` is open while the connection's
            // halves live, and `w` is one of them.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
        }
        return end;
    }
    let _ = timeout(Duration::from_secs(1), w.shutdown()).await;
    end
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    w: &mut W,
    conn: &ClientConn,
    shared: &Shared,
    first: Bytes,
    write_timeout: Option<Duration>,
) -> WriterEnd {
    // This future lives as long as the connection: one timer serves both
    // the keepalive and the write deadline. No cancellation branch: a
    // closing connection closes its outbox, which wakes this loop.
    let keepalive = shared.config.keepalive_interval
        + Duration::from_millis(fastrand::u64(
            0..shared.config.keepalive_jitter.as_millis() as u64 + 1,
        ));
    let timer = tokio::time::sleep(keepalive);
    tokio::pin!(timer);
    let written = write_all_timed(
        w,
        &mut [IoSlice::new(&first)],
        write_timeout,
        timer.as_mut(),
    )
    .await;
    drop(first);
    if let Err(e) = written {
        return e;
    }
    let mut next_keepalive = Instant::now() + keepalive;
    let mut batch = Batch::default();
    let mut scratch = BatchScratch::default();
    loop {
        if !conn.outbox.take(&mut batch) {
            return WriterEnd::Closed;
        }
        if batch.is_empty() {
            // Going quiet: drop the queues' capacity (a quiet connection
            // keeps no buffers); a busy one never gets here.
            batch = Batch::default();
            timer.as_mut().reset(next_keepalive);
            tokio::select! {
                _ = conn.outbox.wait() => continue,
                _ = &mut timer => {}
            }
            next_keepalive = Instant::now() + keepalive;
            // Written as is: five bytes, no queue to grow.
            let ka = [FrameType::KeepAlive as u8, 0, 0, 0, 0];
            if let Err(e) =
                write_all_timed(w, &mut [IoSlice::new(&ka)], write_timeout, timer.as_mut()).await
            {
                return e;
            }
            continue;
        }
        // Boxed: a batch's transient state (slices, iterators, the write)
        // does not size this long-lived future.
        let result = Box::pin(write_batch(
            w,
            &batch,
            &mut scratch,
            shared,
            write_timeout,
            timer.as_mut(),
        ))
        .await;
        if let Err(end) = result {
            count_batch_drops(shared, &batch, DropReason::WriteError);
            return end;
        }
        batch.clear();
        scratch.release_if_large();
    }
}

/// Reusable buffers for building one batch.
#[derive(Default)]
struct BatchScratch {
    control: BytesMut,
    prefixes: Vec<[u8; 37]>,
}

impl BatchScratch {
    /// Keeps the buffers of a busy connection, frees those a burst grew.
    fn release_if_large(&mut self) {
        if self.control.capacity() > 4096 {
            self.control = BytesMut::new();
        }
        if self.prefixes.capacity() > 64 {
            self.prefixes = Vec::new();
        }
    }
}

async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &Batch,
    scratch: &mut BatchScratch,
    shared: &Shared,
    write_timeout: Option<Duration>,
    mut timer: Pin<&mut Sleep>,
) -> Result<(), WriterEnd> {
    let m = &shared.metrics;
    scratch.control.clear();
    let mut frames = 0u64;
    for f in &batch.control {
        f.encode(&mut scratch.control);
        frames += 1;
        if let Frame::PeerGone { reason, .. } = f {
            match reason {
                PeerGoneReason::NotHere => m.peer_gone_not_here_frames.inc(),
                _ => m.peer_gone_disconnected_frames.inc(),
            }
        }
    }
    if let Some(data) = batch.pong {
        Frame::Pong(data).encode(&mut scratch.control);
        m.pongs_sent.inc();
        frames += 1;
    }
    scratch.prefixes.clear();
    let packets = batch.disco.iter().chain(batch.packets.iter());
    let mut bytes = 0u64;
    for p in packets.clone() {
        scratch
            .prefixes
            .push(recv_packet_prefix(&p.src, p.payload.len()));
        bytes += p.payload.len() as u64;
    }
    let npackets = scratch.prefixes.len();
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + 2 * npackets.min(MAX_IOVECS));
    if !scratch.control.is_empty() {
        slices.push(IoSlice::new(&scratch.control));
    }
    for (prefix, p) in scratch.prefixes.iter().zip(packets) {
        slices.push(IoSlice::new(prefix));
        if !p.payload.is_empty() {
            slices.push(IoSlice::new(&p.payload));
        }
        if slices.len() >= MAX_IOVECS {
            write_all_timed(w, &mut slices, write_timeout, timer.as_mut()).await?;
            slices.clear();
        }
    }
    if !slices.is_empty() {
        write_all_timed(w, &mut slices, write_timeout, timer).await?;
    }
    frames += npackets as u64;
    m.sent.add(npackets as u64, bytes);
    if let Some(t) = batch.oldest {
        m.queue_delay.observe(t.elapsed().as_secs_f64());
    }
    m.write_batches.inc();
    m.write_batch_frames.inc_by(frames);
    Ok(())
}

/// Writes every byte of `slices`, each write (and the flush) bounded by
/// `limit`, timed with `timer`.
async fn write_all_timed<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
    limit: Option<Duration>,
    mut timer: Pin<&mut Sleep>,
) -> Result<(), WriterEnd> {
    while !slices.is_empty() {
        let n = match limit {
            Some(d) => {
                timer.as_mut().reset(Instant::now() + d);
                tokio::select! {
                    r = w.write_vectored(slices) => r,
                    _ = timer.as_mut() => return Err(WriterEnd::Timeout),
                }
            }
            None => w.write_vectored(slices).await,
        }
        .map_err(WriterEnd::Error)?;
        if n == 0 {
            return Err(WriterEnd::Error(std::io::ErrorKind::WriteZero.into()));
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    match limit {
        Some(d) => {
            timer.as_mut().reset(Instant::now() + d);
            tokio::select! {
                r = w.flush() => r.map_err(WriterEnd::Error),
                _ = timer.as_mut() => Err(WriterEnd::Timeout),
            }
        }
        None => w.flush().await.map_err(WriterEnd::Error),
    }
}

/// Counts every packet in `batch` as dropped for `reason`.
pub fn count_batch_drops(shared: &Shared, batch: &Batch, reason: DropReason) {
    for p in batch.packets.iter().chain(batch.disco.iter()) {
        let disco = looks_like_disco(&p.payload);
        shared
            .metrics
            .dropped(reason, disco)
            .add(1, p.payload.len() as u64);
    }
}
