//! A TLS 1.3 client for tests that must send what a well-behaved client
//! never would. rustls runs the handshake; then the traffic secrets are
//! taken out through rustls' kernel-TLS API (as a kTLS offload would) and
//! records are sealed and opened here, so a test can pack, pad, forge or
//! flood records. Client side only: the relay under test never uses this.
//!
//! Also used by the `tls_session` fuzz target and the `tls_session` bench
//! (through `#[path]`), which drive the server [`Session`] in memory.
//!
//! [`Session`]: derpd::tls::session::Session
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::client::ClientConnectionData;
use rustls::client::UnbufferedClientConnection;
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ClientConnection, ConnectionTrafficSecrets};

/// Outer (and inner) content types.
pub const ALERT: u8 = 21;
/// Handshake content type.
pub const HANDSHAKE: u8 = 22;
/// Application data content type.
pub const APPLICATION_DATA: u8 = 23;
/// A KeyUpdate handshake message, update_not_requested.
pub const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];
/// A KeyUpdate handshake message, update_requested.
pub const KEY_UPDATE_REQUESTED: [u8; 5] = [24, 0, 0, 1, 1];
/// Alert descriptions the tests look for.
pub const CLOSE_NOTIFY: u8 = 0;
/// unexpected_message.
pub const UNEXPECTED_MESSAGE: u8 = 10;
/// bad_record_mac.
pub const BAD_RECORD_MAC: u8 = 20;
/// record_overflow.
pub const RECORD_OVERFLOW: u8 = 22;

/// A TLS 1.3 client configuration offering only `suite`, with secret
/// extraction on, trusting `roots`.
pub fn client_config(
    roots: rustls::RootCertStore,
    suite: rustls::SupportedCipherSuite,
) -> Arc<ClientConfig> {
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.enable_secret_extraction = true;
    Arc::new(config)
}

/// One direction's TLS 1.3 record protection.
pub struct RecordKey {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl RecordKey {
    /// The key for `secrets`, next record number `seq`.
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> RecordKey {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => panic!("not a TLS 1.3 AEAD"),
        };
        RecordKey {
            key: LessSafeKey::new(UnboundKey::new(alg, key.as_ref()).unwrap()),
            iv: iv.as_ref().try_into().unwrap(),
            seq,
        }
    }

    fn nonce(&self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }

    /// A record carrying `payload` as `inner_type`, with `padding` zero
    /// bytes after the content type.
    pub fn seal(&mut self, inner_type: u8, payload: &[u8], padding: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(payload.len() + 1 + padding + 16);
        body.extend_from_slice(payload);
        body.push(inner_type);
        body.resize(body.len() + padding, 0);
        let len = body.len() + 16;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        self.key
            .seal_in_place_append_tag(self.nonce(), Aad::from(header), &mut body)
            .unwrap();
        self.seq += 1;
        let mut record = header.to_vec();
        record.extend_from_slice(&body);
        record
    }

    /// Opens one whole record: its inner content type and content, or
    /// `None` if it does not authenticate.
    pub fn open(&mut self, record: &[u8]) -> Option<(u8, Vec<u8>)> {
        let header: [u8; 5] = record[..5].try_into().unwrap();
        let mut body = record[5..].to_vec();
        let plain = self
            .key
            .open_in_place(self.nonce(), Aad::from(header), &mut body)
            .ok()?;
        let end = plain.iter().rposition(|&b| b != 0)?;
        let inner_type = plain[end];
        let content = plain[..end].to_vec();
        self.seq += 1;
        Some((inner_type, content))
    }
}

/// Runs `conn`'s handshake over `io` until the client's Finished is
/// queued; the Finished itself is left unsent, so a caller may put more
/// behind it in the same write.
pub fn handshake_to_finished<T: Read + Write>(
    io: &mut T,
    conn: &mut ClientConnection,
) -> io::Result<()> {
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(io)?;
        }
        io.flush()?;
        if conn.read_tls(io)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
    Ok(())
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// What a finished client handshake leaves: the traffic secrets, rustls'
/// kernel connection for key updates, and bytes read past the handshake.
pub struct Handshaken {
    /// Both directions' secrets and sequence numbers.
    pub secrets: rustls::ExtractedSecrets,
    /// Derives the next keys after a KeyUpdate.
    pub kernel: KernelConnection<ClientConnectionData>,
    /// Server bytes read past the handshake.
    pub leftover: Vec<u8>,
}

/// A full client handshake over `io` with rustls' unbuffered client (whose
/// secrets can be handed over), Finished sent.
pub fn client_handshake<T: Read + Write>(
    io: &mut T,
    config: Arc<ClientConfig>,
    name: &str,
) -> io::Result<Handshaken> {
    let name = ServerName::try_from(name.to_owned()).map_err(invalid)?;
    let mut conn = UnbufferedClientConnection::new(config, name).map_err(invalid)?;
    let mut incoming = vec![0u8; 64 << 10];
    let mut used = 0;
    let mut out = Vec::new();
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut incoming[..used]);
        let mut read = false;
        let mut done = false;
        match state.map_err(invalid)? {
            ConnectionState::EncodeTlsData(mut e) => {
                let at = out.len();
                if let Err(EncodeError::InsufficientSize(s)) = e.encode(&mut []) {
                    out.resize(at + s.required_size, 0);
                    e.encode(&mut out[at..]).map_err(invalid)?;
                }
            }
            ConnectionState::TransmitTlsData(t) => {
                io.write_all(&out)?;
                io.flush()?;
                out.clear();
                t.done();
            }
            ConnectionState::BlockedHandshake => read = true,
            ConnectionState::WriteTraffic(_) => done = true,
            ConnectionState::ReadTraffic(mut r) => while r.next_record().is_some() {},
            other => return Err(invalid(format!("unexpected state {other:?}"))),
        }
        incoming.copy_within(discard..used, 0);
        used -= discard;
        if done {
            break;
        }
        if read {
            let n = io.read(&mut incoming[used..])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            used += n;
        }
    }
    if !out.is_empty() {
        io.write_all(&out)?;
        io.flush()?;
    }
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(invalid)?;
    Ok(Handshaken {
        secrets,
        kernel,
        leftover: incoming[..used].to_vec(),
    })
}

/// What [`RawTls::recv`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A record that opened: inner content type and content.
    Record(u8, Vec<u8>),
    /// A record that did not authenticate under the expected key.
    Undecryptable,
    /// The server closed the connection (FIN or reset).
    Closed,
    /// Nothing arrived in time.
    Timeout,
}

/// A connected TLS 1.3 client whose records the test writes by hand.
pub struct RawTls {
    /// The socket.
    pub tcp: TcpStream,
    tx: RecordKey,
    rx: RecordKey,
    kernel: KernelConnection<ClientConnectionData>,
    inbuf: Vec<u8>,
}

impl RawTls {
    /// Connects to `addr` and completes a TLS 1.3 handshake for `name`.
    pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>, name: &str) -> io::Result<RawTls> {
        let mut tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let h = client_handshake(&mut tcp, config, name)?;
        Ok(RawTls {
            tcp,
            tx: RecordKey::new(h.secrets.tx.0, h.secrets.tx.1),
            rx: RecordKey::new(h.secrets.rx.0, h.secrets.rx.1),
            kernel: h.kernel,
            inbuf: h.leftover,
        })
    }

    /// A record under the current sending key.
    pub fn seal(&mut self, inner_type: u8, payload: &[u8], padding: usize) -> Vec<u8> {
        self.tx.seal(inner_type, payload, padding)
    }

    /// A KeyUpdate record; the sending key moves on, as RFC 8446 §4.6.3 has it.
    pub fn seal_key_update(&mut self, requested: bool) -> Vec<u8> {
        let msg = if requested {
            KEY_UPDATE_REQUESTED
        } else {
            KEY_UPDATE_NOT_REQUESTED
        };
        let record = self.tx.seal(HANDSHAKE, &msg, 0);
        let (seq, secrets) = self.kernel.update_tx_secret().unwrap();
        self.tx = RecordKey::new(seq, secrets);
        record
    }

    /// Writes `bytes` as they are.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tcp.write_all(bytes)
    }

    /// Sends `data` as application data records.
    pub fn send_data(&mut self, data: &[u8]) -> io::Result<()> {
        let mut out = Vec::new();
        for chunk in data.chunks(16 << 10) {
            out.extend(self.seal(APPLICATION_DATA, chunk, 0));
        }
        self.send(&out)
    }

    /// The next record from the server. A KeyUpdate from the server moves
    /// the receiving key on (and is returned like any record).
    pub fn recv(&mut self) -> Received {
        loop {
            if self.inbuf.len() >= 5 {
                let len = 5 + u16::from_be_bytes([self.inbuf[3], self.inbuf[4]]) as usize;
                if self.inbuf.len() >= len {
                    let record: Vec<u8> = self.inbuf.drain(..len).collect();
                    return match self.rx.open(&record) {
                        Some((HANDSHAKE, msg)) if msg.first() == Some(&24) => {
                            let (seq, secrets) = self.kernel.update_rx_secret().unwrap();
                            self.rx = RecordKey::new(seq, secrets);
                            Received::Record(HANDSHAKE, msg)
                        }
                        Some((t, msg)) => Received::Record(t, msg),
                        None => Received::Undecryptable,
                    };
                }
            }
            let mut buf = [0u8; 16 << 10];
            match self.tcp.read(&mut buf) {
                Ok(0) => return Received::Closed,
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Received::Timeout
                }
                Err(_) => return Received::Closed,
            }
        }
    }

    /// Every record until the server closes (or `Timeout`, which ends the
    /// list too); the last entry says which.
    pub fn recv_until_closed(&mut self) -> Vec<Received> {
        let mut seen = Vec::new();
        loop {
            let r = self.recv();
            let end = matches!(
                r,
                Received::Closed | Received::Timeout | Received::Undecryptable
            );
            seen.push(r);
            if end {
                return seen;
            }
        }
    }

    /// Application data until `want` bytes or more have arrived (other
    /// records, like session tickets, are skipped).
    pub fn recv_data(&mut self, want: usize) -> Vec<u8> {
        let mut data = Vec::new();
        while data.len() < want {
            match self.recv() {
                Received::Record(APPLICATION_DATA, d) => data.extend(d),
                Received::Record(_, _) => {}
                other => panic!("expected data, got {other:?} after {data:?}"),
            }
        }
        data
    }
}

/// Alerts (level, description) in what was received.
pub fn alerts(seen: &[Received]) -> Vec<(u8, u8)> {
    seen.iter()
        .filter_map(|r| match r {
            Received::Record(ALERT, a) if a.len() == 2 => Some((a[0], a[1])),
            _ => None,
        })
        .collect()
}

/// A server [`Session`](derpd::tls::session::Session) as a client's
/// transport, in memory: what the client writes is fed to the session,
/// what the session queues is what the client reads.
pub struct InMemory<'a>(pub &'a mut derpd::tls::session::Session);

impl Write for InMemory<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.incoming_mut().extend_from_slice(buf);
        self.0.process().map_err(invalid)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for InMemory<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let queued = self.0.pending_out();
        let n = queued.len().min(out.len());
        out[..n].copy_from_slice(&queued[..n]);
        self.0.advance_out(n);
        Ok(n)
    }
}

/// A server configuration with a self-signed certificate for `host`
/// (early data off, as the relay's), and the roots that trust it.
pub fn self_signed_server(host: &str) -> (Arc<rustls::ServerConfig>, rustls::RootCertStore) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert_pem, key_pem) = derpd::tls::self_signed_pem(host).unwrap();
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.max_early_data_size = 0;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    (Arc::new(server), roots)
}

/// A fresh server session with a finished handshake against a client of
/// `config`: the session (its tickets already taken out) and the client's
/// secrets.
pub fn in_memory_pair(
    server: &Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
    host: &str,
) -> (derpd::tls::session::Session, Handshaken) {
    let mut session = derpd::tls::session::Session::new(server.clone()).unwrap();
    let h =
        client_handshake(&mut InMemory(&mut session), client, host).expect("in-memory handshake");
    let n = session.pending_out().len();
    session.advance_out(n);
    (session, h)
}
