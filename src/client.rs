//! A small DERP client: dials a relay over plain TCP, upgrades, handshakes
//! and exchanges frames. Used by `derpd probe`, `derpd bench` and the tests.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::proto::handshake::HandshakeSecret;
use crate::proto::{
    ClientInfo, Frame, FrameDecoder, FrameError, HandshakeError, NodePrivate, NodePublic, Role,
    ServerInfo,
};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server's HTTP answer was not a `101`.
    #[error("upgrade refused: {0}")]
    UpgradeRefused(String),
    /// A malformed frame from the server.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// Handshake failure.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The server closed the connection.
    #[error("connection closed by server")]
    Closed,
    /// The URL is not `http://host:port[/derp]`.
    #[error("unsupported URL {0:?} (want http://host:port)")]
    BadUrl(String),
}

/// A connected, handshaken DERP client over any byte stream.
pub struct Client<S> {
    stream: S,
    buf: BytesMut,
    decoder: FrameDecoder,
    out: BytesMut,
    server_key: NodePublic,
    server_info: ServerInfo,
    key: NodePublic,
}

/// `host:port` from `http://host:port[/…]` (or a bare `host:port`).
pub fn host_port(url: &str) -> Result<String, ClientError> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let hp = rest.split('/').next().unwrap_or("");
    if hp.is_empty() || url.starts_with("https://") {
        return Err(ClientError::BadUrl(url.to_owned()));
    }
    Ok(if hp.contains(':') {
        hp.to_owned()
    } else {
        format!("{hp}:80")
    })
}

impl Client<TcpStream> {
    /// Dials `url` (`http://host:port`), upgrades and handshakes.
    pub async fn connect(url: &str, key: &NodePrivate) -> Result<Self, ClientError> {
        Self::connect_with(url, key, ClientInfo::default()).await
    }

    /// Like [`Client::connect`] with a custom ClientInfo (mesh key, prober…).
    pub async fn connect_with(
        url: &str,
        key: &NodePrivate,
        info: ClientInfo,
    ) -> Result<Self, ClientError> {
        let addr = host_port(url)?;
        let stream = TcpStream::connect(&addr).await?;
        stream.set_nodelay(true)?;
        Self::upgrade_and_handshake(stream, &addr, key, info).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Sends the upgrade request on `stream`, then runs the handshake.
    pub async fn upgrade_and_handshake(
        mut stream: S,
        host: &str,
        key: &NodePrivate,
        info: ClientInfo,
    ) -> Result<Self, ClientError> {
        let req = format!(
            "GET /derp HTTP/1.1\r\nHost: {host}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nUser-Agent: derpd/{}\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = BytesMut::with_capacity(64 << 10);
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 16 << 10 {
                return Err(ClientError::UpgradeRefused(
                    "response head too large".into(),
                ));
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        };
        let status = String::from_utf8_lossy(&buf[..head_end]).to_string();
        if !status.starts_with("HTTP/1.1 101") {
            let line = status.lines().next().unwrap_or("").to_owned();
            return Err(ClientError::UpgradeRefused(line));
        }
        let _ = buf.split_to(head_end);
        Self::handshake(stream, buf, key, info).await
    }

    /// Runs the DERP handshake on an upgraded stream; `buf` holds any bytes
    /// already read past the HTTP response.
    pub async fn handshake(
        stream: S,
        buf: BytesMut,
        key: &NodePrivate,
        info: ClientInfo,
    ) -> Result<Self, ClientError> {
        // aws-lc's X25519: one base-point multiplication for our public
        // key, one agreement for both boxes.
        let secret = HandshakeSecret::new(key);
        let mut c = Client {
            stream,
            buf,
            decoder: FrameDecoder::new(Role::Client),
            out: BytesMut::with_capacity(64 << 10),
            server_key: NodePublic::ZERO,
            server_info: ServerInfo::default(),
            key: secret.public(),
        };
        let server_key = match c.recv().await? {
            Frame::ServerKey { key } => key,
            f => return Err(HandshakeError::FirstFrameNotServerKey(f.type_byte()).into()),
        };
        let peer_box = secret.peer_box(&server_key)?;
        c.send(&peer_box.seal_client_info(c.key, &info)).await?;
        let info = match c.recv().await? {
            Frame::ServerInfo { nonce, sealed } => peer_box.open_server_info(&nonce, &sealed)?,
            f => return Err(HandshakeError::SecondFrameNotServerInfo(f.type_byte()).into()),
        };
        c.server_key = server_key;
        c.server_info = info;
        Ok(c)
    }

    /// The relay's public key.
    pub fn server_key(&self) -> NodePublic {
        self.server_key
    }

    /// What the relay said in ServerInfo.
    pub fn server_info(&self) -> &ServerInfo {
        &self.server_info
    }

    /// Our public key.
    pub fn public_key(&self) -> NodePublic {
        self.key
    }

    /// Queues a frame without flushing; see [`Client::flush`].
    pub fn queue(&mut self, frame: &Frame) {
        frame.encode(&mut self.out);
    }

    /// Queues a SendPacket of `len` payload bytes to `dst` without
    /// flushing; `fill` writes the payload in place (no intermediate copy).
    pub fn queue_packet_with(&mut self, dst: NodePublic, len: usize, fill: impl FnOnce(&mut [u8])) {
        crate::proto::frame::put_header(
            &mut self.out,
            crate::proto::FrameType::SendPacket as u8,
            32 + len,
        );
        self.out.extend_from_slice(&dst.0);
        let start = self.out.len();
        self.out.resize(start + len, 0);
        fill(&mut self.out[start..]);
    }

    /// Bytes queued and not yet flushed.
    pub fn queued_len(&self) -> usize {
        self.out.len()
    }

    /// Writes every queued frame.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        flush_out(&mut self.stream, &mut self.out).await
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        self.queue(frame);
        self.flush().await
    }

    /// Writes raw bytes (for tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Sends a packet to `dst`.
    pub async fn send_packet(
        &mut self,
        dst: NodePublic,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.send(&Frame::SendPacket {
            dst,
            payload: Bytes::copy_from_slice(payload),
        })
        .await
    }

    /// Receives the next frame (any type, KeepAlive included).
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        read_frame(&mut self.stream, &mut self.decoder, &mut self.buf).await
    }

    /// Receives the next frame, or `None` after `limit`.
    pub async fn recv_timeout(&mut self, limit: Duration) -> Result<Option<Frame>, ClientError> {
        match tokio::time::timeout(limit, self.recv()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Receives the next RecvPacket, skipping KeepAlives.
    pub async fn recv_packet(&mut self) -> Result<(NodePublic, Bytes), ClientError> {
        loop {
            match self.recv().await? {
                Frame::RecvPacket { src, payload } => return Ok((src, payload)),
                Frame::KeepAlive => continue,
                Frame::Ping(d) => self.send(&Frame::Pong(d)).await?,
                _ => continue,
            }
        }
    }

    /// The underlying stream.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// The stream, the bytes already read past the last decoded frame, and
    /// the relay's key: for callers that run their own frame loop.
    pub fn into_parts(self) -> (S, BytesMut, NodePublic) {
        (self.stream, self.buf, self.server_key)
    }

    /// Splits the connection into a reading half and a writing half that
    /// can run in separate tasks (frames already queued stay queued).
    pub fn into_split(self) -> (ClientReader<ReadHalf<S>>, ClientWriter<WriteHalf<S>>) {
        let (r, w) = tokio::io::split(self.stream);
        (
            ClientReader {
                stream: r,
                buf: self.buf,
                decoder: self.decoder,
            },
            ClientWriter {
                stream: w,
                out: self.out,
            },
        )
    }
}

/// The reading half of a split [`Client`].
pub struct ClientReader<R> {
    stream: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

/// Writes `out` (the queued frames) to `stream`, empties it and flushes.
async fn flush_out<W: AsyncWrite + Unpin>(
    stream: &mut W,
    out: &mut BytesMut,
) -> Result<(), ClientError> {
    if !out.is_empty() {
        stream.write_all(out).await?;
        out.clear();
    }
    stream.flush().await?;
    Ok(())
}

/// Reads from `stream` into `buf` until `decoder` yields a frame.
async fn read_frame<R: AsyncRead + Unpin>(
    stream: &mut R,
    decoder: &mut FrameDecoder,
    buf: &mut BytesMut,
) -> Result<Frame, ClientError> {
    loop {
        if let Some(f) = decoder.decode(buf)? {
            return Ok(f);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 << 10);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ClientError::Closed);
        }
    }
}

impl<R: AsyncRead + Unpin> ClientReader<R> {
    /// Decodes the next frame already buffered, without reading the socket.
    pub fn try_recv_buffered(&mut self) -> Result<Option<Frame>, ClientError> {
        Ok(self.decoder.decode(&mut self.buf)?)
    }

    /// Receives the next frame (any type).
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        read_frame(&mut self.stream, &mut self.decoder, &mut self.buf).await
    }
}

/// The writing half of a split [`Client`].
pub struct ClientWriter<W> {
    stream: W,
    out: BytesMut,
}

impl<W: AsyncWrite + Unpin> ClientWriter<W> {
    /// Queues a frame without flushing; see [`ClientWriter::flush`].
    pub fn queue(&mut self, frame: &Frame) {
        frame.encode(&mut self.out);
    }

    /// Writes every queued frame.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        flush_out(&mut self.stream, &mut self.out).await
    }

    /// Writes already-encoded frames (queued frames first) with vectored
    /// writes: the buffers go to the socket as they are, without copying.
    /// `bufs` is emptied.
    pub async fn write_encoded(&mut self, bufs: &mut Vec<Bytes>) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            bufs.insert(0, self.out.split().freeze());
        }
        bufs.retain(|b| !b.is_empty());
        let mut first = 0;
        let mut offset = 0;
        while first < bufs.len() {
            let slices: Vec<std::io::IoSlice<'_>> = bufs[first..]
                .iter()
                .take(64)
                .enumerate()
                .map(|(i, b)| std::io::IoSlice::new(if i == 0 { &b[offset..] } else { &b[..] }))
                .collect();
            let mut n = self.stream.write_vectored(&slices).await?;
            drop(slices);
            if n == 0 {
                return Err(ClientError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            while n > 0 && first < bufs.len() {
                let left = bufs[first].len() - offset;
                if n >= left {
                    n -= left;
                    first += 1;
                    offset = 0;
                } else {
                    offset += n;
                    n = 0;
                }
            }
        }
        bufs.clear();
        self.stream.flush().await?;
        Ok(())
    }
}

/// Any byte stream a client can run over (plain TCP or TLS).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A client over a boxed stream, as returned by [`dial`].
pub type DynClient = Client<Box<dyn Stream>>;

/// Dials `http://host:port` or `https://host:port` (TLS). With `insecure`,
/// the server certificate is not verified (labs and benchmarks only);
/// otherwise it must chain to the webpki roots.
pub async fn dial(url: &str, key: &NodePrivate, insecure: bool) -> Result<DynClient, ClientError> {
    dial_with(url, key, insecure, ClientInfo::default()).await
}

/// [`dial`] with a custom ClientInfo.
pub async fn dial_with(
    url: &str,
    key: &NodePrivate,
    insecure: bool,
    info: ClientInfo,
) -> Result<DynClient, ClientError> {
    dial_via(url, None, key, insecure, info).await
}

/// [`dial_with`], but connecting to `connect_to` instead of resolving the
/// URL's host (which still names the server for TLS and `Host:`), as for a
/// DERP map node with a fixed `IPv4`/`IPv6`.
pub async fn dial_via(
    url: &str,
    connect_to: Option<std::net::SocketAddr>,
    key: &NodePrivate,
    insecure: bool,
    info: ClientInfo,
) -> Result<DynClient, ClientError> {
    let tls = url
        .starts_with("https://")
        .then(|| std::sync::Arc::new(tls_client_config(insecure)));
    dial_tls_via(url, connect_to, tls, key, info).await
}

/// [`dial_via`] with the caller's TLS client configuration for an
/// `https://` URL (its own trusted roots, or [`insecure_tls_config`]);
/// `None` uses the default one (system store and web PKI roots).
pub async fn dial_tls_via(
    url: &str,
    connect_to: Option<std::net::SocketAddr>,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    key: &NodePrivate,
    info: ClientInfo,
) -> Result<DynClient, ClientError> {
    let target = Target::parse(url)?;
    let tcp = match connect_to {
        Some(a) => TcpStream::connect(a).await?,
        None => TcpStream::connect(&target.addr).await?,
    };
    tcp.set_nodelay(true)?;
    let boxed: Box<dyn Stream> = match target.tls_name {
        None => Box::new(tcp),
        Some(name) => {
            let config = tls.unwrap_or_else(|| std::sync::Arc::new(tls_client_config(false)));
            let connector = tokio_rustls::TlsConnector::from(config);
            Box::new(connector.connect(name, tcp).await?)
        }
    };
    Client::upgrade_and_handshake(boxed, &target.addr, key, info).await
}

/// A TLS client configuration that accepts any server certificate (labs,
/// `--insecure`, and DERP map nodes marked `InsecureForTests`).
pub fn insecure_tls_config() -> rustls::ClientConfig {
    tls_client_config(true)
}

/// [`dial`], with the local end of the TCP connection bound to `source`
/// (any port) before connecting, when given: e.g. `127.0.0.2` to spread
/// many connections to a loopback relay over several source addresses,
/// each with its own ephemeral ports. The relay's address is the first
/// the URL's host resolves to in `source`'s family.
pub async fn dial_from(
    url: &str,
    key: &NodePrivate,
    insecure: bool,
    source: Option<std::net::IpAddr>,
) -> Result<DynClient, ClientError> {
    let target = Target::parse(url)?;
    let tcp = connect_from(&target.addr, source).await?;
    match target.tls_name {
        None => {
            let boxed: Box<dyn Stream> = Box::new(tcp);
            Client::upgrade_and_handshake(boxed, &target.addr, key, ClientInfo::default()).await
        }
        Some(name) => {
            let tls = tls_connect(name, tcp, insecure).await?;
            let boxed: Box<dyn Stream> = Box::new(tls);
            Client::upgrade_and_handshake(boxed, &target.addr, key, ClientInfo::default()).await
        }
    }
}

/// Dials like [`dial_from`], handshakes, then keeps nothing but the TCP
/// socket: no buffers, no TLS state, not registered with the runtime. For
/// a benchmark's idle clients, which never read or write again (a relay
/// sends an idle client a few bytes of KeepAlive a minute; they wait in
/// the kernel's receive buffer). Dropping the socket closes the
/// connection.
pub async fn dial_held(
    url: &str,
    key: &NodePrivate,
    insecure: bool,
    source: Option<std::net::IpAddr>,
) -> Result<std::net::TcpStream, ClientError> {
    let target = Target::parse(url)?;
    let tcp = connect_from(&target.addr, source).await?;
    let tcp = match target.tls_name {
        None => {
            let c = Client::upgrade_and_handshake(tcp, &target.addr, key, ClientInfo::default())
                .await?;
            c.into_inner()
        }
        Some(name) => {
            let tls = tls_connect(name, tcp, insecure).await?;
            let c = Client::upgrade_and_handshake(tls, &target.addr, key, ClientInfo::default())
                .await?;
            c.into_inner().into_inner().0
        }
    };
    Ok(tcp.into_std()?)
}

/// Where a relay URL points: `host:port` and, for `https://`, the TLS
/// server name.
struct Target {
    addr: String,
    tls_name: Option<rustls::pki_types::ServerName<'static>>,
}

impl Target {
    fn parse(url: &str) -> Result<Target, ClientError> {
        let Some(rest) = url.strip_prefix("https://") else {
            return Ok(Target {
                addr: host_port(url)?,
                tls_name: None,
            });
        };
        let hp = rest.split('/').next().unwrap_or("");
        let addr = if hp.contains(':') {
            hp.to_owned()
        } else {
            format!("{hp}:443")
        };
        let host = addr.rsplit_once(':').map_or(&addr[..], |(h, _)| h);
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let name = rustls::pki_types::ServerName::try_from(host)
            .map_err(|_| ClientError::BadUrl(url.to_owned()))?;
        Ok(Target {
            addr,
            tls_name: Some(name),
        })
    }
}

/// Connects to `addr` (`host:port`), from `source` when given.
async fn connect_from(
    addr: &str,
    source: Option<std::net::IpAddr>,
) -> Result<TcpStream, ClientError> {
    let stream = match source {
        None => TcpStream::connect(addr).await?,
        Some(src) => {
            let dst = tokio::net::lookup_host(addr)
                .await?
                .find(|a| a.is_ipv4() == src.is_ipv4())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::AddrNotAvailable,
                        format!("{addr} has no address of the family of {src}"),
                    )
                })?;
            let socket = if src.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            bind_address_no_port(&socket);
            socket.bind(std::net::SocketAddr::new(src, 0))?;
            socket.connect(dst).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (best effort): `bind` then fixes only
/// the source address and `connect` picks the port, unique per
/// destination, as for an unbound socket. Without it `bind` must find a
/// port free for every destination, which grows slow as ports fill up
/// (thousands of connections, or a previous run's TIME-WAIT sockets).
fn bind_address_no_port(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a c_int option of its size.
    let _ = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of_val(&one) as libc::socklen_t,
        )
    };
}

async fn tls_connect(
    name: rustls::pki_types::ServerName<'static>,
    tcp: TcpStream,
    insecure: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    // One configuration per process (building one reads the trust store),
    // without session resumption: every dial is a separate client's full
    // handshake, as a relay sees when many nodes connect.
    static CONFIGS: [std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    let config = CONFIGS[usize::from(insecure)].get_or_init(|| {
        let mut c = tls_client_config(insecure);
        c.resumption = rustls::client::Resumption::disabled();
        std::sync::Arc::new(c)
    });
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    Ok(connector.connect(name, tcp).await?)
}

fn tls_client_config(insecure: bool) -> rustls::ClientConfig {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if insecure {
        return rustls::ClientConfig::builder_with_provider(crate::trust::provider())
            .with_safe_default_protocol_versions()
            .expect("the default provider supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(NoVerify))
            .with_no_client_auth();
    }
    crate::trust::client_config(None).expect("no CA file to read")
}

/// Accepts any server certificate (`--insecure`).
#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
