//! A TLS connection after its handshake, with the record layer in our
//! hands ([`super::record`]): the stream owns the TCP socket and two record
//! keys, and holds buffers only while bytes are in flight. A quiet
//! connection keeps no read or write buffer at all, so an idle TLS client
//! costs about what an idle plain one does.
//!
//! [`TlsStream`] (the halves joined) serves the HTTP phase; its
//! `into_inner` gives the relay independently owned halves. The read half handles the client's
//! post-handshake messages: close_notify, and TLS 1.3 KeyUpdate (new keys
//! come from rustls' [`KernelConnection`]); a KeyUpdate that asks for ours
//! is answered by the write half before its next record. The write half
//! also updates its own key long before AES-GCM's confidentiality limit.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::record::{self, content, PostHandshake, RecordError, RecordKey, Version};

/// Ciphertext read from the socket per read while busy.
const READ_CHUNK: usize = 32 << 10;
/// Ciphertext read by the first read after a quiet spell.
const WAKE_CHUNK: usize = 4 << 10;
/// Plaintext sealed per write call, at most (the rest waits for the next).
const WRITE_CHUNK: usize = 128 << 10;

/// Key state shared by the two halves: rustls' post-handshake secrets, and
/// whether the peer asked us to update our sending key.
struct KeyShare {
    kernel: Mutex<KernelConnection<ServerConnectionData>>,
    update_tx: AtomicBool,
}

fn record_err(e: RecordError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The receiving side: ciphertext from a record boundary, and the opened
/// record whose plaintext is being handed out.
struct Rx {
    key: RecordKey,
    /// Ciphertext (the front record possibly opened in place).
    buf: BytesMut,
    /// Undelivered plaintext of the opened front record, as a range of `buf`.
    plain: std::ops::Range<usize>,
    /// Length of the opened front record (0 when none is open).
    opened: usize,
    /// close_notify received.
    closed: bool,
    empty_run: u8,
}

impl Rx {
    /// Drops the front record once its plaintext is all handed out.
    fn settle(&mut self) {
        if self.plain.is_empty() && self.opened > 0 {
            self.buf.advance(self.opened);
            self.opened = 0;
        }
    }

    /// Whether a read can make progress without the socket.
    fn has_ready(&self) -> bool {
        !self.plain.is_empty()
            || self.closed
            || matches!(self.key.record_len(&self.buf), Ok(Some(n)) if n <= self.buf.len())
            || self.key.record_len(&self.buf).is_err()
    }

    /// Ciphertext of an unfinished record is waiting for the rest.
    fn has_partial(&self) -> bool {
        self.opened == 0 && !self.buf.is_empty()
    }

    /// Drops the buffer when it holds nothing (before waiting idle).
    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.opened == 0 && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// Opens records until there is plaintext, EOF, or more bytes are needed
    /// (`Ok(false)`).
    fn open_next(&mut self, keys: &KeyShare) -> io::Result<bool> {
        loop {
            if !self.plain.is_empty() || self.closed {
                return Ok(true);
            }
            self.settle();
            let Some(o) = self.key.open(&mut self.buf).map_err(record_err)? else {
                return Ok(false);
            };
            let text = o.plaintext.clone();
            match o.content_type {
                content::APPLICATION_DATA if text.is_empty() => {
                    self.empty_run += 1;
                    if self.empty_run > record::MAX_EMPTY_RECORDS {
                        return Err(record_err(RecordError::BadHeader));
                    }
                    self.buf.advance(o.record_len);
                }
                content::APPLICATION_DATA => {
                    self.empty_run = 0;
                    self.plain = text;
                    self.opened = o.record_len;
                }
                content::ALERT => {
                    let alert = &self.buf[text];
                    match alert {
                        // close_notify: the peer is done sending.
                        [_, 0] => self.closed = true,
                        // user_canceled: a close_notify follows.
                        [1, 90] => {}
                        [_, desc] => {
                            return Err(io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                format!("TLS alert {desc} from the client"),
                            ))
                        }
                        _ => return Err(record_err(RecordError::BadHeader)),
                    }
                    self.buf.advance(o.record_len);
                }
                content::HANDSHAKE if self.key.version() == Version::Tls13 => {
                    let msgs = record::parse_post_handshake(&self.buf[text]).map_err(record_err)?;
                    self.buf.advance(o.record_len);
                    for PostHandshake::KeyUpdate { requested } in msgs {
                        let (seq, secrets) =
                            keys.kernel.lock().update_rx_secret().map_err(tls_err)?;
                        self.key =
                            RecordKey::new(Version::Tls13, seq, secrets).map_err(record_err)?;
                        if requested {
                            keys.update_tx.store(true, Ordering::Release);
                        }
                    }
                }
                // TLS 1.2 renegotiation and anything else.
                _ => return Err(record_err(RecordError::BadHeader)),
            }
        }
    }

    fn poll_read<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        keys: &KeyShare,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.open_next(keys)? {
                if !self.plain.is_empty() {
                    let n = self.plain.len().min(out.remaining());
                    out.put_slice(&self.buf[self.plain.start..self.plain.start + n]);
                    self.plain.start += n;
                }
                // Else EOF (close_notify): nothing put.
                return Poll::Ready(Ok(()));
            }
            // Need more ciphertext: at least the rest of the record.
            let want = match self.key.record_len(&self.buf) {
                Ok(Some(n)) => n.saturating_sub(self.buf.len()),
                _ => 0,
            };
            if self.buf.capacity() - self.buf.len() < want.max(1024) {
                // Waking from idle, start small: most wake-ups carry a
                // record or two.
                let chunk = if self.buf.capacity() == 0 {
                    WAKE_CHUNK
                } else {
                    READ_CHUNK
                };
                self.buf.reserve(want.max(chunk));
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *io),
                cx,
                &mut self.buf
            ))?;
            if n == 0 {
                // EOF without close_notify; truncation cannot hurt DERP
                // (frames carry their own lengths), so it is an EOF.
                if self.buf.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// The sending side: records sealed but not yet written.
struct Tx {
    key: RecordKey,
    out: Vec<u8>,
    written: usize,
    sent_close: bool,
}

impl Tx {
    /// Writes out what is sealed; Ready once all of it is on the socket.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        // Drained: a quiet connection keeps no write buffer.
        self.out = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Replaces the sending key if the peer asked or the key has carried
    /// enough records: KeyUpdate under the old key, then the new one.
    fn maybe_update_key(&mut self, keys: &KeyShare) -> io::Result<()> {
        if self.key.version() != Version::Tls13 {
            return Ok(());
        }
        let asked = keys.update_tx.swap(false, Ordering::AcqRel);
        if !asked && self.key.seq() < record::KEY_UPDATE_AFTER {
            return Ok(());
        }
        self.key
            .seal_record(
                &mut self.out,
                content::HANDSHAKE,
                &record::KEY_UPDATE_NOT_REQUESTED,
            )
            .map_err(record_err)?;
        let (seq, secrets) = keys.kernel.lock().update_tx_secret().map_err(tls_err)?;
        self.key = RecordKey::new(Version::Tls13, seq, secrets).map_err(record_err)?;
        Ok(())
    }

    /// Seals up to [`WRITE_CHUNK`] bytes of `bufs`; returns how many.
    fn seal(&mut self, bufs: &[IoSlice<'_>], keys: &KeyShare) -> io::Result<usize> {
        if self.sent_close {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.maybe_update_key(keys)?;
        let total: usize = bufs.iter().map(|b| b.len()).sum::<usize>().min(WRITE_CHUNK);
        let records = total.div_ceil(record::MAX_PLAINTEXT);
        self.out
            .reserve(total + records * (record::MAX_OVERHEAD + 1) + record::MAX_OVERHEAD);
        let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
        let mut cur: &[u8] = &[];
        let mut left = total;
        while left > 0 {
            let start = self.key.begin(&mut self.out);
            let mut room = left.min(record::MAX_PLAINTEXT);
            left -= room;
            while room > 0 {
                if cur.is_empty() {
                    cur = slices.next().expect("total counts these bytes");
                }
                let n = cur.len().min(room);
                self.out.extend_from_slice(&cur[..n]);
                cur = &cur[n..];
                room -= n;
            }
            self.key
                .seal(&mut self.out, start, content::APPLICATION_DATA)
                .map_err(record_err)?;
        }
        Ok(total)
    }

    fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        keys: &KeyShare,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_drain(io, cx))?;
        let n = self.seal(bufs, keys)?;
        // Start writing at once; what the socket does not take now is
        // written by the next write or flush.
        match self.poll_drain(io, cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(n)),
        }
    }

    fn poll_shutdown<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(io, cx))?;
        if !self.sent_close {
            self.sent_close = true;
            self.key
                .seal_record(&mut self.out, content::ALERT, &record::CLOSE_NOTIFY)
                .map_err(record_err)?;
            ready!(self.poll_drain(io, cx))?;
        }
        Pin::new(io).poll_shutdown(cx)
    }
}

/// A server-side TLS connection past its handshake: its two halves joined
/// (the HTTP phase reads and writes it as one stream; `into_inner` gives the
/// relay the halves).
pub type TlsStream = tokio::io::Join<TlsReader, TlsWriter>;

/// What the handshake leaves behind for the stream.
pub(super) struct Handover {
    pub tcp: TcpStream,
    pub secrets: rustls::ExtractedSecrets,
    pub kernel: KernelConnection<ServerConnectionData>,
    pub version: Version,
    /// Application data that arrived with the handshake, decrypted.
    pub early_plaintext: BytesMut,
    /// Ciphertext past the last whole record.
    pub leftover: BytesMut,
}

/// The stream the handshake hands over: record keys from rustls' secrets,
/// the plaintext that came with the handshake served first.
pub(super) fn from_handover(h: Handover) -> Result<TlsStream, RecordError> {
    let (tx_seq, tx_secrets) = h.secrets.tx;
    let (rx_seq, rx_secrets) = h.secrets.rx;
    let tx_key = RecordKey::new(h.version, tx_seq, tx_secrets)?;
    let rx_key = RecordKey::new(h.version, rx_seq, rx_secrets)?;
    // Plaintext that came with the handshake is served first, as if it
    // were an opened record at the front of the buffer.
    let mut buf = h.early_plaintext;
    let plain = 0..buf.len();
    let opened = buf.len();
    buf.extend_from_slice(&h.leftover);
    let keys = Arc::new(KeyShare {
        kernel: Mutex::new(h.kernel),
        update_tx: AtomicBool::new(false),
    });
    let (r, w) = h.tcp.into_split();
    // The record state is boxed: the keys are large, and a connection's
    // task would otherwise carry them inline in more than one of its states.
    let reader = TlsReader {
        tcp: r,
        rx: Box::new(Rx {
            key: rx_key,
            buf,
            plain,
            opened,
            closed: false,
            empty_run: 0,
        }),
        keys: keys.clone(),
    };
    let writer = TlsWriter {
        tcp: w,
        tx: Box::new(Tx {
            key: tx_key,
            out: Vec::new(),
            written: 0,
            sent_close: false,
        }),
        keys,
    };
    Ok(tokio::io::join(reader, writer))
}

/// The read half of a [`TlsStream`].
pub struct TlsReader {
    tcp: OwnedReadHalf,
    rx: Box<Rx>,
    keys: Arc<KeyShare>,
}

impl TlsReader {
    /// Resolves when a read would make progress. Before waiting on the
    /// socket it drops its (empty) buffer, so a quiet connection holds none.
    pub async fn readable(&mut self) -> io::Result<()> {
        self.rx.settle();
        if self.rx.has_ready() {
            return Ok(());
        }
        self.rx.release_if_empty();
        let tcp: &TcpStream = self.tcp.as_ref();
        std::future::poll_fn(|cx| tcp.poll_read_ready(cx)).await
    }

    /// The TCP socket.
    pub fn tcp(&self) -> &TcpStream {
        self.tcp.as_ref()
    }

    /// Part of a record has arrived and the rest has not.
    pub fn has_partial(&self) -> bool {
        self.rx.has_partial()
    }

    /// Capacity of the ciphertext buffer (0 while quiet).
    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.rx.buf.capacity()
    }
}

impl AsyncRead for TlsReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.rx.poll_read(&mut this.tcp, &this.keys, cx, buf)
    }
}

/// The write half of a [`TlsStream`].
pub struct TlsWriter {
    tcp: OwnedWriteHalf,
    tx: Box<Tx>,
    keys: Arc<KeyShare>,
}

#[cfg(test)]
impl TlsWriter {
    /// Capacity of the sealed-records buffer (0 while quiet).
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.tx.out.capacity()
    }

    /// Sequence number of the next record under the current key.
    pub(crate) fn seq(&self) -> u64 {
        self.tx.key.seq()
    }
}

impl AsyncWrite for TlsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.tx
            .poll_write(&mut this.tcp, &this.keys, cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.tx.poll_write(&mut this.tcp, &this.keys, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tx.poll_drain(&mut this.tcp, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tx.poll_shutdown(&mut this.tcp, cx)
    }
}
