//! The server side of the TLS handshake: rustls' unbuffered connection
//! ([`Session`]) driven over the accepted socket until the handshake is
//! done, then kept for the connection's life by [`TlsStream`]. The
//! handshake's buffers are released as soon as they are empty.

use std::io;
use std::sync::Arc;

use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::session::Session;
use super::stream::{from_session, TlsStream};

/// First read buffer of a handshake (a ClientHello fits, usually).
const FIRST_READ: usize = 4 << 10;
/// How long a failed handshake's alert may take to send.
const ALERT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

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

impl Acceptor {
    /// An acceptor for `config` (0-RTT data is switched off: DERP has no use
    /// for replayable requests).
    pub fn new(mut config: ServerConfig) -> Acceptor {
        config.max_early_data_size = 0;
        Acceptor {
            config: Arc::new(config),
        }
    }

    /// Runs the server handshake on `tcp`. Application data and
    /// post-handshake messages (a KeyUpdate right behind the client's
    /// Finished) that arrive with it stay in the session for the stream.
    pub async fn accept(&self, mut tcp: TcpStream) -> io::Result<TlsStream> {
        let mut session = Session::new(self.config.clone())?;
        loop {
            let result = session.process();
            if !session.pending_out().is_empty() {
                let send = tcp.write_all(session.pending_out());
                if result.is_err() {
                    // Best effort: the alert of a failed handshake.
                    let _ = tokio::time::timeout(ALERT_TIMEOUT, send).await;
                } else {
                    send.await?;
                }
                let n = session.pending_out().len();
                session.advance_out(n);
            }
            result?;
            if !session.is_handshaking() {
                break;
            }
            let buf = session.incoming_mut();
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(FIRST_READ.max(buf.len()));
            }
            if tcp.read_buf(buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        session.release_idle_buffers();
        Ok(from_session(tcp, session))
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
            assert_eq!(r.buffer_capacity(), 0, "buffers released");
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
