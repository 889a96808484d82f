//! A server TLS connection after its handshake: the TCP socket and the
//! [`Session`] (rustls' unbuffered connection with buffers we own), shared
//! by a read half and a write half. Buffers exist only while bytes are in
//! flight, so a quiet TLS connection holds rustls' state and nothing else.
//!
//! [`TlsStream`] (the halves joined) serves the HTTP phase; its
//! `into_inner` gives the relay the halves. Either half may send what the
//! session queued: the reader sends a fatal alert at once when rustls
//! rejects input, the writer sends records in order, and a shutdown sends
//! close_notify — unless the session failed, when only its alert goes out.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::session::Session;

/// Ciphertext read from the socket per read while busy.
const READ_CHUNK: usize = 32 << 10;
/// Ciphertext read by the first read after a quiet spell.
const WAKE_CHUNK: usize = 4 << 10;

/// The session, shared by the two halves (which normally run in one task,
/// so the lock is uncontended).
type SharedSession = Arc<Mutex<Session>>;

/// Sends queued ciphertext without waiting; what the socket does not take
/// now is sent by the writer's next write, flush or shutdown.
fn send_now(tcp: &TcpStream, s: &mut Session) {
    while !s.pending_out().is_empty() {
        match tcp.try_write(s.pending_out()) {
            Ok(n) if n > 0 => s.advance_out(n),
            _ => break,
        }
    }
}

/// Lets rustls consume what was received; on failure sends its alert.
fn process(tcp: &TcpStream, s: &mut Session) -> io::Result<()> {
    let result = s.process();
    send_now(tcp, s);
    result.map_err(io::Error::from)
}

/// A server-side TLS connection past its handshake: its two halves joined
/// (the HTTP phase reads and writes it as one stream; `into_inner` gives the
/// relay the halves).
pub type TlsStream = tokio::io::Join<TlsReader, TlsWriter>;

/// The stream for a session whose handshake is done; plaintext and
/// ciphertext that came with the handshake are served first.
pub(super) fn from_session(tcp: TcpStream, session: Session) -> TlsStream {
    let session = Arc::new(Mutex::new(session));
    let (r, w) = tcp.into_split();
    tokio::io::join(
        TlsReader {
            tcp: r,
            session: session.clone(),
        },
        TlsWriter { tcp: w, session },
    )
}

/// The read half of a [`TlsStream`].
pub struct TlsReader {
    tcp: OwnedReadHalf,
    session: SharedSession,
}

impl TlsReader {
    /// Resolves when a read would make progress, or when part of a record
    /// has arrived (so the caller can start its frame deadline). Ciphertext
    /// is read into the session here; before waiting on the socket the
    /// session's empty buffers are dropped, so a quiet connection holds
    /// none.
    pub async fn readable(&mut self) -> io::Result<()> {
        loop {
            {
                let mut s = self.session.lock();
                if !s.plaintext().is_empty() || s.peer_closed() || s.failure().is_some() {
                    return Ok(());
                }
                // An error is for the read to report.
                if process(self.tcp.as_ref(), &mut s).is_err()
                    || !s.plaintext().is_empty()
                    || s.peer_closed()
                    || s.has_partial_input()
                {
                    return Ok(());
                }
                s.release_idle_buffers();
            }
            let tcp: &TcpStream = self.tcp.as_ref();
            std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await?;
            let (tcp, session) = (&mut self.tcp, &self.session);
            let n = std::future::poll_fn(|cx| {
                let mut s = session.lock();
                let incoming = s.incoming_mut();
                if incoming.capacity() - incoming.len() < 1024 {
                    incoming.reserve(WAKE_CHUNK);
                }
                tokio_util::io::poll_read_buf(Pin::new(&mut *tcp), cx, incoming)
            })
            .await?;
            if n == 0 {
                // EOF: the read reports it.
                return Ok(());
            }
        }
    }

    /// The TCP socket.
    pub fn tcp(&self) -> &TcpStream {
        self.tcp.as_ref()
    }

    /// Part of a record has arrived and the rest has not.
    pub fn has_partial(&self) -> bool {
        self.session.lock().has_partial_input()
    }

    /// Capacity of the session's buffers (0 while quiet).
    pub fn buffer_capacity(&self) -> usize {
        self.session.lock().buffer_capacity()
    }
}

impl AsyncRead for TlsReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut s = this.session.lock();
        loop {
            if !s.plaintext().is_empty() {
                let n = s.plaintext().len().min(buf.remaining());
                buf.put_slice(&s.plaintext()[..n]);
                s.consume_plaintext(n);
                return Poll::Ready(Ok(()));
            }
            // close_notify: EOF.
            if s.peer_closed() {
                return Poll::Ready(Ok(()));
            }
            // Plaintext goes straight into `buf` where it fits.
            let mut delivered = 0;
            let result = s.process_into(&mut |p| {
                let n = p.len().min(buf.remaining());
                buf.put_slice(&p[..n]);
                delivered += n;
                n
            });
            send_now(this.tcp.as_ref(), &mut s);
            if delivered > 0 {
                // A failure after this data is reported by the next read.
                return Poll::Ready(Ok(()));
            }
            result?;
            if !s.plaintext().is_empty() || s.peer_closed() {
                continue;
            }
            let incoming = s.incoming_mut();
            if incoming.capacity() - incoming.len() < 1024 {
                // Waking from idle, start small: most wake-ups carry a
                // record or two.
                incoming.reserve(if incoming.capacity() == 0 {
                    WAKE_CHUNK
                } else {
                    READ_CHUNK
                });
            }
            // A short read tells tokio the socket is drained (a quiet
            // connection's next wait is a real one).
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.tcp),
                cx,
                incoming
            ))?;
            if n == 0 {
                // EOF without close_notify. Truncation cannot hurt DERP
                // (frames carry their own lengths), so between records it
                // is an EOF.
                if s.has_partial_input() || s.is_handshaking() {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Sends queued ciphertext; Ready once all of it is on the socket.
fn poll_send(
    tcp: &mut OwnedWriteHalf,
    s: &mut Session,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !s.pending_out().is_empty() {
        let n = ready!(Pin::new(&mut *tcp).poll_write(cx, s.pending_out()))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        s.advance_out(n);
    }
    Poll::Ready(Ok(()))
}

/// The write half of a [`TlsStream`].
pub struct TlsWriter {
    tcp: OwnedWriteHalf,
    session: SharedSession,
}

impl TlsWriter {
    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.session.lock();
        ready!(poll_send(&mut self.tcp, &mut s, cx))?;
        let n = match s.encrypt(bufs) {
            Ok(n) => n,
            Err(f) => {
                send_now(self.tcp.as_ref(), &mut s);
                return Poll::Ready(Err(f.into()));
            }
        };
        // Start sending at once; what the socket does not take now is
        // sent by the next write or flush.
        match poll_send(&mut self.tcp, &mut s, cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(n)),
        }
    }
}

impl AsyncWrite for TlsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut s = this.session.lock();
        poll_send(&mut this.tcp, &mut s, cx)
    }

    /// Sends what is queued, then close_notify (or, after a failure, only
    /// the fatal alert already queued), then shuts the socket's write side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut s = this.session.lock();
        ready!(poll_send(&mut this.tcp, &mut s, cx))?;
        s.close_notify();
        ready!(poll_send(&mut this.tcp, &mut s, cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
