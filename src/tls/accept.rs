//! The server side of the TLS handshake, driven through rustls' unbuffered
//! API so that, once it is done, the connection's keys can be taken over by
//! our own record layer ([`super::stream::TlsStream`]). The handshake's
//! buffers live only as long as this function runs.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::record::Version;
use super::stream::{Handover, TlsStream};

/// First read buffer of a handshake (a ClientHello fits, usually).
const FIRST_READ: usize = 4 << 10;
/// Most buffered handshake bytes (rustls allows 64 KiB handshake messages).
const MAX_BUFFERED: usize = (64 << 10) + 5;

/// Accepts TLS connections with a fixed rustls configuration.
#[derive(Clone)]
pub struct Acceptor {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor").finish_non_exhaustive()
    }
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Acceptor {
    /// An acceptor for `config`; secret extraction is switched on (the
    /// record layer needs the traffic keys).
    pub fn new(mut config: ServerConfig) -> Acceptor {
        config.enable_secret_extraction = true;
        config.max_early_data_size = 0;
        Acceptor {
            config: Arc::new(config),
        }
    }

    /// Runs the server handshake on `tcp`.
    pub async fn accept(&self, mut tcp: TcpStream) -> io::Result<TlsStream> {
        let mut conn = UnbufferedServerConnection::new(self.config.clone()).map_err(invalid)?;
        let mut incoming = vec![0u8; FIRST_READ];
        let mut used = 0usize;
        let mut outgoing: Vec<u8> = Vec::new();
        let mut early = BytesMut::new();
        loop {
            let UnbufferedStatus { discard, state } =
                conn.process_tls_records(&mut incoming[..used]);
            let mut need_read = false;
            let mut done = false;
            match state {
                Err(e) => {
                    send_alert(&mut conn, &mut tcp).await;
                    return Err(invalid(e));
                }
                Ok(ConnectionState::EncodeTlsData(mut s)) => {
                    let at = outgoing.len();
                    if let Err(EncodeError::InsufficientSize(sz)) = s.encode(&mut []) {
                        outgoing.resize(at + sz.required_size, 0);
                        s.encode(&mut outgoing[at..]).map_err(invalid)?;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    tcp.write_all(&outgoing).await?;
                    outgoing.clear();
                    t.done();
                }
                Ok(ConnectionState::BlockedHandshake) => need_read = true,
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    while let Some(rec) = r.next_record() {
                        early.extend_from_slice(rec.map_err(invalid)?.payload);
                    }
                }
                // TLS 1.3 lets the server write before the client's
                // Finished; the keys are final only once it arrived.
                Ok(ConnectionState::WriteTraffic(_)) => {
                    if conn.is_handshaking() {
                        need_read = true;
                    } else {
                        done = true;
                    }
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    return Err(io::ErrorKind::UnexpectedEof.into())
                }
                Ok(_) => return Err(invalid("unexpected TLS state (early data?)")),
            }
            if discard > 0 {
                incoming.copy_within(discard..used, 0);
                used -= discard;
            }
            if done {
                break;
            }
            if need_read {
                if used == incoming.len() {
                    if incoming.len() >= MAX_BUFFERED {
                        return Err(invalid("TLS handshake message too large"));
                    }
                    incoming.resize((incoming.len() * 2).min(MAX_BUFFERED), 0);
                }
                let n = tcp.read(&mut incoming[used..]).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                used += n;
            }
        }
        if !outgoing.is_empty() {
            tcp.write_all(&outgoing).await?;
        }
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(invalid)?;
        let version = Version::from_rustls(kernel.protocol_version()).map_err(invalid)?;
        TlsStream::new(Handover {
            tcp,
            secrets,
            kernel,
            version,
            early_plaintext: early,
            leftover: BytesMut::from(&incoming[..used]),
        })
        .map_err(invalid)
    }
}

/// Best effort: writes the alert rustls queued for a failed handshake.
async fn send_alert(conn: &mut UnbufferedServerConnection, tcp: &mut TcpStream) {
    let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
    if let Ok(ConnectionState::EncodeTlsData(mut s)) = state {
        let mut out = [0u8; 64];
        if let Ok(n) = s.encode(&mut out) {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(1), tcp.write_all(&out[..n]))
                    .await;
        }
    }
}
