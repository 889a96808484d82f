//! One server TLS connection, sans I/O: rustls' unbuffered connection owns
//! every record (handshake, application data, KeyUpdate, alerts, limits),
//! and this type owns the buffers around it, so they can be dropped while the
//! connection is quiet. Bytes come in through [`Session::incoming_mut`],
//! plaintext comes out of [`Session::plaintext`], and ciphertext to
//! send accumulates in [`Session::pending_out`].
//!
//! Failure handling follows RFC 8446 §6: when rustls rejects input it
//! queues the fatal alert it chose (bad_record_mac, record_overflow,
//! unexpected_message, decode_error…), the session puts that alert in the
//! outgoing bytes, and nothing else is ever encrypted or sent after it — in
//! particular no close_notify.

use std::io::{self, IoSlice};

use bytes::{Buf, BytesMut};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};

/// Most plaintext sealed per [`Session::encrypt`] call.
pub const WRITE_CHUNK: usize = 128 << 10;
/// Most ciphertext buffered while waiting for a record or handshake message
/// to complete: a 64 KiB handshake message in records, plus one more read.
pub const MAX_INCOMING: usize = (64 << 10) + (32 << 10);
/// Bytes a record adds to its plaintext, at most (TLS 1.2 AES-GCM: header,
/// explicit nonce, tag; TLS 1.3: header, content type, tag).
const RECORD_OVERHEAD: usize = 5 + 8 + 16;
/// Largest plaintext of one record.
const MAX_FRAGMENT: usize = 1 << 14;
/// Room for records rustls may put ahead of the data (a KeyUpdate).
const EXTRA_RECORDS: usize = 64;
/// Bound on rustls state changes handled in one [`Session::process`] call
/// (each consumes input or produces output, so this is never reached by a
/// well-behaved connection; it guards against looping on a stuck state).
const MAX_STEPS: usize = 1 << 16;

/// Why a session failed: the error rustls reported, kept so every later
/// call reports it too.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsFailure {
    /// rustls rejected the peer's input (a fatal alert is queued when
    /// rustls chose one).
    #[error("TLS: {0}")]
    Protocol(#[from] rustls::Error),
    /// The peer sent more than [`MAX_INCOMING`] bytes without completing a
    /// record or handshake message.
    #[error("TLS: {0} bytes buffered without a complete record")]
    InputTooLarge(usize),
    /// Encrypting failed (sequence numbers exhausted).
    #[error("TLS: {0}")]
    Encrypt(String),
    /// The connection is closed (close_notify sent and received, or
    /// writing after close_notify).
    #[error("TLS connection closed")]
    Closed,
    /// rustls reached a state this server never enables (early data).
    #[error("TLS: unexpected state {0}")]
    Unexpected(&'static str),
}

impl From<TlsFailure> for io::Error {
    fn from(f: TlsFailure) -> io::Error {
        let kind = match f {
            TlsFailure::Closed => io::ErrorKind::BrokenPipe,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, f)
    }
}

/// A server TLS connection and the buffers it needs while busy.
pub struct Session {
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet consumed by rustls.
    incoming: BytesMut,
    /// Plaintext decrypted and not yet taken.
    plain: BytesMut,
    /// Ciphertext to send, in order.
    out: OutBuf,
    /// Vectored plaintext gathered into one slice before sealing, so small
    /// slices share records.
    stage: Vec<u8>,
    peer_closed: bool,
    close_sent: bool,
    failed: Option<TlsFailure>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("handshaking", &self.conn.is_handshaking())
            .field("incoming", &self.incoming.len())
            .field("plain", &self.plain.len())
            .field("out", &self.out.pending().len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Takes received plaintext; returns how many bytes it took.
pub type PlaintextSink<'a> = &'a mut dyn FnMut(&[u8]) -> usize;

/// What stopped a [`Session::process`] run.
enum Stop {
    /// rustls needs more ciphertext (or, with nothing to encrypt, could
    /// encrypt: either way the input is used up).
    Idle,
    /// Application data was encrypted: this many plaintext bytes.
    Encrypted(usize),
}

impl Session {
    /// A new server connection for `config` (early data must be off).
    pub fn new(config: std::sync::Arc<rustls::ServerConfig>) -> Result<Session, TlsFailure> {
        Ok(Session {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: BytesMut::new(),
            plain: BytesMut::new(),
            out: OutBuf::default(),
            stage: Vec::new(),
            peer_closed: false,
            close_sent: false,
            failed: None,
        })
    }

    /// Whether the handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The buffer received ciphertext is appended to. Call
    /// [`Session::process`] after appending.
    pub fn incoming_mut(&mut self) -> &mut BytesMut {
        &mut self.incoming
    }

    /// Ciphertext received but not yet a whole record (or handshake
    /// message): the rest is still to come.
    pub fn has_partial_input(&self) -> bool {
        !self.incoming.is_empty()
    }

    /// Received plaintext not yet consumed.
    pub fn plaintext(&self) -> &[u8] {
        &self.plain
    }

    /// Marks `n` bytes of [`Session::plaintext`] as taken.
    pub fn consume_plaintext(&mut self, n: usize) {
        self.plain.advance(n.min(self.plain.len()));
    }

    /// The peer sent close_notify (after all its data).
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// The failure that ended this session, if any.
    pub fn failure(&self) -> Option<&TlsFailure> {
        self.failed.as_ref()
    }

    /// Ciphertext waiting to be sent.
    pub fn pending_out(&self) -> &[u8] {
        self.out.pending()
    }

    /// Marks `n` bytes of [`Session::pending_out`] as sent. The buffer is
    /// kept for the next write while the connection is busy (a large one
    /// is released at once); [`Session::release_idle_buffers`] drops it.
    pub fn advance_out(&mut self, n: usize) {
        self.out.advance(n);
    }

    /// Releases every buffer that holds nothing (before waiting quietly).
    pub fn release_idle_buffers(&mut self) {
        if self.incoming.is_empty() && self.incoming.capacity() > 0 {
            self.incoming = BytesMut::new();
        }
        if self.plain.is_empty() && self.plain.capacity() > 0 {
            self.plain = BytesMut::new();
        }
        if self.stage.capacity() > 0 {
            self.stage = Vec::new();
        }
        self.out.release_if_drained();
    }

    /// Capacity held by the session's own buffers (0 while quiet).
    pub fn buffer_capacity(&self) -> usize {
        self.incoming.capacity()
            + self.plain.capacity()
            + self.out.capacity()
            + self.stage.capacity()
    }

    /// Lets rustls consume the ciphertext received so far: handshake
    /// messages are answered (into [`Session::pending_out`]), application
    /// data becomes plaintext. On failure the fatal alert rustls chose, if
    /// any, is queued to send and the session stays failed.
    pub fn process(&mut self) -> Result<(), TlsFailure> {
        self.run(None, None).map(|_| ())
    }

    /// [`Session::process`], handing plaintext to `sink` first (it returns
    /// how much it took; the rest waits in [`Session::plaintext`]), which
    /// saves a copy when the reader's buffer has room.
    pub fn process_into(&mut self, sink: PlaintextSink<'_>) -> Result<(), TlsFailure> {
        self.run(None, Some(sink)).map(|_| ())
    }

    /// Encrypts up to [`WRITE_CHUNK`] bytes of `bufs` (after anything
    /// rustls must send first, such as a KeyUpdate the peer asked for) and
    /// returns how many plaintext bytes were taken.
    pub fn encrypt(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TlsFailure> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        if self.close_sent {
            return Err(TlsFailure::Closed);
        }
        if self.conn.is_handshaking() {
            return Err(TlsFailure::Unexpected("handshake not complete"));
        }
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(WRITE_CHUNK);
        if total == 0 {
            return Ok(0);
        }
        let mut stage = std::mem::take(&mut self.stage);
        let data: &[u8] = match bufs.iter().find(|b| !b.is_empty()) {
            Some(first) if first.len() >= total => &first[..total],
            _ => {
                stage.clear();
                let mut left = total;
                for b in bufs {
                    let n = b.len().min(left);
                    stage.extend_from_slice(&b[..n]);
                    left -= n;
                }
                &stage
            }
        };
        let result = self.run(Some(data), None);
        stage.clear();
        self.stage = stage;
        match result? {
            Stop::Encrypted(n) => Ok(n),
            Stop::Idle => Err(TlsFailure::Unexpected("handshake not complete")),
        }
    }

    /// Queues close_notify, unless the session failed (a fatal alert was,
    /// or should have been, sent instead) or it was queued before.
    pub fn close_notify(&mut self) {
        if self.failed.is_some() || self.close_sent {
            return;
        }
        self.close_sent = true;
        let _ = self.run(Some(&[]), None);
    }

    /// Drives rustls until it needs more input; with `write`, until that
    /// data is encrypted (an empty `write` queues close_notify).
    fn run(
        &mut self,
        write: Option<&[u8]>,
        mut sink: Option<PlaintextSink<'_>>,
    ) -> Result<Stop, TlsFailure> {
        if let Some(f) = &self.failed {
            return Err(f.clone());
        }
        for _ in 0..MAX_STEPS {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming[..]);
            let step = match state {
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    let mut bad = None;
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => {
                                let taken = match sink.as_mut() {
                                    Some(sink) if self.plain.is_empty() => sink(rec.payload),
                                    _ => 0,
                                };
                                self.plain.extend_from_slice(&rec.payload[taken..]);
                            }
                            Err(e) => {
                                bad = Some(e);
                                break;
                            }
                        }
                    }
                    match bad {
                        Some(e) => Err(TlsFailure::Protocol(e)),
                        None => Ok(None),
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => self
                    .out
                    .encode(&mut e)
                    .map(|_| None)
                    .map_err(|e| TlsFailure::Encrypt(e.to_string())),
                // The bytes encoded so far are in `out`, in order; whoever
                // drains `out` transmits them.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Stop::Idle)),
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    match write {
                        Some(_) => Err(TlsFailure::Closed),
                        None => Ok(Some(Stop::Idle)),
                    }
                }
                Ok(ConnectionState::WriteTraffic(mut w)) => match write {
                    // Mid-handshake (TLS 1.3 lets a server write before
                    // the client's Finished) nothing is written here.
                    None => Ok(Some(Stop::Idle)),
                    Some([]) => self
                        .out
                        .encrypt(EXTRA_RECORDS, |buf| w.queue_close_notify(buf))
                        .map(|_| Some(Stop::Encrypted(0))),
                    Some(data) => self
                        .out
                        .encrypt(sealed_len(data.len()), |buf| w.encrypt(data, buf))
                        .map(|_| Some(Stop::Encrypted(data.len()))),
                },
                Ok(ConnectionState::ReadEarlyData(_)) => Err(TlsFailure::Unexpected("early data")),
                Ok(_) => Err(TlsFailure::Unexpected("unknown rustls state")),
                Err(e) => Err(TlsFailure::Protocol(e)),
            };
            self.incoming.advance(discard);
            match step {
                Ok(None) => continue,
                Ok(Some(stop)) => {
                    if self.incoming.len() >= MAX_INCOMING {
                        return Err(self.fail(TlsFailure::InputTooLarge(self.incoming.len())));
                    }
                    return Ok(stop);
                }
                Err(f) => return Err(self.fail(f)),
            }
        }
        Err(self.fail(TlsFailure::Unexpected("no progress")))
    }

    /// Records the failure and queues whatever rustls has to send for it
    /// (its fatal alert). Nothing is encrypted after this.
    fn fail(&mut self, f: TlsFailure) -> TlsFailure {
        self.failed = Some(f.clone());
        self.plain = BytesMut::new();
        // rustls queued its alert (if it chose one) as a record to encode,
        // possibly behind a KeyUpdate it owed. While records are queued,
        // `process_tls_records` hands them out before looking at input;
        // past that it would parse input again, which after a failure it
        // must not (it could report the same error twice), so the loop
        // stops there and input is never fed again.
        for _ in 0..8 {
            if !self.conn.wants_write() {
                break;
            }
            let UnbufferedStatus { state, .. } =
                self.conn.process_tls_records(&mut self.incoming[..]);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    let _ = self.out.encode(&mut e);
                }
                Ok(ConnectionState::ReadTraffic(mut r)) => while r.next_record().is_some() {},
                _ => break,
            }
        }
        self.incoming = BytesMut::new();
        f
    }
}

/// Largest output buffer kept between writes.
const KEEP_OUT: usize = 256 << 10;
/// Output buffers are kept only after batches at least this large (a busy
/// connection), so quiet connections hold none.
const QUIET_WRITE: usize = 4 << 10;

/// Ciphertext waiting to be sent. The bytes up to `buf.len()` are
/// initialized once and reused while the connection is busy, so sealing
/// into it costs no zero-filling after the first write.
#[derive(Default)]
struct OutBuf {
    buf: Vec<u8>,
    /// End of the queued ciphertext.
    end: usize,
    /// Start of the unsent ciphertext.
    sent: usize,
}

impl OutBuf {
    fn pending(&self) -> &[u8] {
        &self.buf[self.sent..self.end]
    }

    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn advance(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.end);
        if self.sent == self.end {
            // A small batch marks a quiet connection: it keeps nothing.
            let quiet = self.end < QUIET_WRITE;
            self.sent = 0;
            self.end = 0;
            if quiet || self.buf.capacity() > KEEP_OUT {
                self.buf = Vec::new();
            }
        }
    }

    fn release_if_drained(&mut self) {
        if self.sent == self.end && self.buf.capacity() > 0 {
            *self = OutBuf::default();
        }
    }

    /// At least `n` bytes of room after the queued ciphertext.
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() < self.end + n {
            self.buf.resize(self.end + n, 0);
        }
        &mut self.buf[self.end..]
    }

    /// A handshake record or alert rustls encoded.
    fn encode<D>(
        &mut self,
        e: &mut rustls::unbuffered::EncodeTlsData<'_, D>,
    ) -> Result<(), EncodeError> {
        let n = match e.encode(&mut []) {
            Err(EncodeError::InsufficientSize(s)) => e.encode(self.room(s.required_size))?,
            other => other?,
        };
        self.end += n;
        Ok(())
    }

    /// Appends what `seal` writes, starting with room for `guess` bytes and
    /// growing if rustls asks for more.
    fn encrypt(
        &mut self,
        guess: usize,
        mut seal: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
    ) -> Result<(), TlsFailure> {
        let mut attempt = seal(self.room(guess));
        if let Err(EncryptError::InsufficientSize(s)) = attempt {
            attempt = seal(self.room(s.required_size));
        }
        match attempt {
            Ok(n) => {
                self.end += n;
                Ok(())
            }
            Err(e) => Err(TlsFailure::Encrypt(e.to_string())),
        }
    }
}

/// Upper bound of the ciphertext `len` plaintext bytes become, with room
/// for a KeyUpdate ahead of them.
fn sealed_len(len: usize) -> usize {
    len + len.div_ceil(MAX_FRAGMENT).max(1) * RECORD_OVERHEAD + EXTRA_RECORDS
}
