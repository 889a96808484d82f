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
use super::stream::{from_handover, Handover, TlsStream};

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
        from_handover(Handover {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::crypto::aws_lc_rs::{cipher_suite as cs, default_provider};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{SupportedCipherSuite, SupportedProtocolVersion};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::time::timeout;

    use std::io::IoSlice;
    use std::sync::Arc;

    use tokio::io::AsyncRead;
    use tokio::net::TcpStream;

    use super::super::stream::TlsStream;
    use super::*;

    const HOST: &str = "derp.test";
    const T: Duration = Duration::from_secs(10);

    fn configs(
        version: &'static SupportedProtocolVersion,
        suite: SupportedCipherSuite,
    ) -> (Acceptor, tokio_rustls::TlsConnector) {
        let (cert_pem, key_pem) = crate::tls::self_signed_pem(HOST).unwrap();
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..default_provider()
        };
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (
            Acceptor::new(server),
            tokio_rustls::TlsConnector::from(Arc::new(client)),
        )
    }

    fn pattern(seed: u8, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    async fn read_exact_timed<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        timeout(T, r.read_exact(&mut got))
            .await
            .expect("data in time")
            .expect("read");
        got
    }

    async fn connected(
        version: &'static SupportedProtocolVersion,
        suite: SupportedCipherSuite,
        first: &[u8],
    ) -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let (acceptor, connector) = configs(version, suite);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let first = first.to_vec();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut c = connector
                .connect(ServerName::try_from(HOST).unwrap(), tcp)
                .await
                .expect("client handshake");
            // Sent right behind the handshake, as an HTTP request is.
            c.write_all(&first).await.unwrap();
            c
        });
        let (tcp, _) = l.accept().await.unwrap();
        let server = timeout(T, acceptor.accept(tcp))
            .await
            .unwrap()
            .expect("server handshake");
        (server, client.await.unwrap())
    }

    #[tokio::test]
    async fn every_suite_and_version_carries_bytes_exactly_both_ways() {
        let cases: [(&SupportedProtocolVersion, SupportedCipherSuite); 6] = [
            (&rustls::version::TLS13, cs::TLS13_AES_128_GCM_SHA256),
            (&rustls::version::TLS13, cs::TLS13_AES_256_GCM_SHA384),
            (&rustls::version::TLS13, cs::TLS13_CHACHA20_POLY1305_SHA256),
            (
                &rustls::version::TLS12,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ),
            (
                &rustls::version::TLS12,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            ),
            (
                &rustls::version::TLS12,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ),
        ];
        for (version, suite) in cases {
            let label = format!("{:?}", suite.suite());
            let first = b"GET /derp HTTP/1.1\r\n\r\n";
            let (server, mut client) = connected(version, suite, first).await;
            let (mut r, mut w) = server.into_inner();
            assert_eq!(
                read_exact_timed(&mut r, first.len()).await,
                first,
                "{label}"
            );
            // More than one record each way, in odd-sized writes.
            let up = pattern(1, 100_003);
            let down = pattern(2, 70_001);
            let writer = tokio::spawn(async move {
                for chunk in up.chunks(7_777) {
                    client.write_all(chunk).await.unwrap();
                }
                client.flush().await.unwrap();
                client
            });
            assert_eq!(read_exact_timed(&mut r, 100_003).await, pattern(1, 100_003));
            let mut client = writer.await.unwrap();
            // Vectored, as the relay's writer writes.
            let mut slices: Vec<IoSlice<'_>> = down.chunks(1_000).map(IoSlice::new).collect();
            let mut left = &mut slices[..];
            while !left.is_empty() {
                let n = w.write_vectored(left).await.unwrap();
                IoSlice::advance_slices(&mut left, n);
            }
            w.flush().await.unwrap();
            assert_eq!(read_exact_timed(&mut client, 70_001).await, down, "{label}");
            // A clean close reaches the client as close_notify, then EOF.
            w.shutdown().await.unwrap();
            let mut rest = Vec::new();
            timeout(T, client.read_to_end(&mut rest))
                .await
                .unwrap()
                .expect("close_notify, not an error");
            assert!(rest.is_empty());
        }
    }

    #[tokio::test]
    async fn client_key_updates_are_followed_and_answered() {
        let (server, mut client) =
            connected(&rustls::version::TLS13, cs::TLS13_AES_128_GCM_SHA256, b"x").await;
        let (mut r, mut w) = server.into_inner();
        assert_eq!(read_exact_timed(&mut r, 1).await, b"x");
        w.write_all(&pattern(3, 50_000)).await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(
            read_exact_timed(&mut client, 50_000).await,
            pattern(3, 50_000)
        );
        let before = w.seq();
        assert!(before >= 4, "several records under the first key");
        for round in 0..3u8 {
            // rustls asks the peer to update too (update_requested).
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&pattern(round, 20_000)).await.unwrap();
            client.flush().await.unwrap();
            assert_eq!(
                read_exact_timed(&mut r, 20_000).await,
                pattern(round, 20_000)
            );
            w.write_all(&pattern(round + 9, 20_000)).await.unwrap();
            w.flush().await.unwrap();
            assert_eq!(
                read_exact_timed(&mut client, 20_000).await,
                pattern(round + 9, 20_000)
            );
            // Our sending key was replaced: its sequence started again.
            assert!(w.seq() < before, "round {round}: seq {}", w.seq());
        }
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_buffers_and_wakes_up_intact() {
        let (server, mut client) =
            connected(&rustls::version::TLS13, cs::TLS13_AES_256_GCM_SHA384, b"hi").await;
        let (mut r, mut w) = server.into_inner();
        for round in 0..3u8 {
            let n = 30_000 + round as usize;
            client.write_all(&pattern(round, n)).await.unwrap();
            client.flush().await.unwrap();
            let mut got = read_exact_timed(&mut r, 2).await;
            if round == 0 {
                assert_eq!(got, b"hi");
                got = read_exact_timed(&mut r, n).await;
            } else {
                got.extend(read_exact_timed(&mut r, n - 2).await);
            }
            assert_eq!(got, pattern(round, n), "round {round}");
            w.write_all(&pattern(round + 5, n)).await.unwrap();
            w.flush().await.unwrap();
            assert_eq!(
                read_exact_timed(&mut client, n).await,
                pattern(round + 5, n)
            );
            // Quiet now: waiting for the client drops both buffers.
            assert!(
                timeout(Duration::from_millis(100), r.readable())
                    .await
                    .is_err(),
                "nothing to read"
            );
            assert_eq!(r.buffer_capacity(), 0, "read buffer released");
            assert_eq!(w.buffer_capacity(), 0, "write buffer released");
            assert!(!r.has_partial());
        }
    }

    #[tokio::test]
    async fn half_a_record_is_reported_as_partial_and_garbage_is_an_error() {
        let (server, client) =
            connected(&rustls::version::TLS13, cs::TLS13_AES_128_GCM_SHA256, b"").await;
        let (mut r, _w) = server.into_inner();
        let (mut tcp, _conn) = client.into_inner();
        // The start of a record whose rest never comes.
        tcp.write_all(&[23, 3, 3, 0x10, 0]).await.unwrap();
        timeout(T, r.readable()).await.unwrap().unwrap();
        let mut buf = [0u8; 64];
        assert!(timeout(Duration::from_millis(200), r.read(&mut buf))
            .await
            .is_err());
        assert!(r.has_partial());
        // The rest, forged: authentication fails.
        tcp.write_all(&[0u8; 0x1000]).await.unwrap();
        let e = timeout(T, r.read(&mut buf)).await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
