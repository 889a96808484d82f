//! The front door: accepts TCP connections, reads the first request head,
//! and either upgrades to DERP directly on the socket (byte-exact `101`, or
//! no response at all for fast start) or hands the connection to hyper for
//! every other endpoint.

pub mod head;
pub mod listener;
pub mod port80;
pub mod prefixed;
pub mod readiness;
pub mod routes;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::proto::NodePublic;
use crate::relay::{AcceptOptions, Relay};
use head::{parse_head, HeadError, RequestHead};
use prefixed::Prefixed;

/// Response body type of every endpoint served through hyper.
pub type Body = http_body_util::Full<Bytes>;

/// How long a client may take to send its first request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the HTTP layer needs. Cheap to clone.
#[derive(Clone)]
pub struct Front {
    /// The relay that upgraded connections are handed to.
    pub relay: Relay,
    inner: Arc<FrontConfig>,
    /// DERP over WebSocket is served (see [`Front::with_websocket`]).
    websocket: bool,
}

/// Settings of the front door.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// Whether to honour `Derp-Fast-Start: 1` (write no HTTP response).
    pub fast_start: bool,
    /// Deadline for the first request head (slow clients are closed and
    /// counted as `head_timeout`).
    pub head_timeout: Duration,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            fast_start: false,
            head_timeout: HEAD_TIMEOUT,
        }
    }
}

impl Front {
    /// A front door for `relay`.
    pub fn new(relay: Relay, config: FrontConfig) -> Front {
        Front {
            relay,
            inner: Arc::new(config),
            websocket: true,
        }
    }

    /// Enables (the default) or disables DERP over WebSocket; when disabled,
    /// `/derp` WebSocket requests get `426` like any non-upgrade.
    pub fn with_websocket(mut self, enabled: bool) -> Front {
        self.websocket = enabled;
        self
    }
}

/// The headers of the `101 Switching Protocols` answer to a DERP upgrade.
pub fn upgrade_headers(key: &NodePublic) -> [(&'static str, String); 4] {
    [
        ("upgrade", "DERP".to_owned()),
        ("connection", "Upgrade".to_owned()),
        (
            "derp-version",
            crate::proto::limits::PROTOCOL_VERSION.to_string(),
        ),
        ("derp-public-key", key.to_hex()),
    ]
}

/// The exact `101` head Tailscale's relay writes before the ServerKey frame.
pub fn upgrade_response_head(key: &NodePublic) -> Bytes {
    Bytes::from(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: {}\r\nDerp-Public-Key: {}\r\n\r\n",
        crate::proto::limits::PROTOCOL_VERSION,
        key.to_hex()
    ))
}

/// A byte stream the front door can serve, and split into independently
/// owned read and write halves for the relay.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Read half.
    type Reader: crate::relay::reader::ReadHalf;
    /// Write half.
    type Writer: AsyncWrite + Unpin + Send + 'static;
    /// Splits the stream.
    fn split_rw(self) -> (Self::Reader, Self::Writer);
    /// The underlying TCP socket, if there is one.
    fn tcp_fd(&self) -> Option<std::os::fd::RawFd>;
}

impl Transport for TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;
    fn split_rw(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
    fn tcp_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(self))
    }
}

impl Transport for crate::tls::stream::TlsStream {
    type Reader = crate::tls::stream::TlsReader;
    type Writer = crate::tls::stream::TlsWriter;
    fn split_rw(self) -> (Self::Reader, Self::Writer) {
        self.into_inner()
    }
    fn tcp_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(self.reader().tcp()))
    }
}

impl crate::relay::reader::ReadHalf for crate::tls::stream::TlsReader {
    fn wait_readable(&mut self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        self.readable()
    }

    fn has_partial(&self) -> bool {
        crate::tls::stream::TlsReader::has_partial(self)
    }
}

/// Serves one accepted connection (plain TCP or TLS): reads the first
/// request head, upgrades raw DERP directly, and hands anything else to hyper.
pub async fn serve_stream<S: Transport>(
    stream: S,
    remote: SocketAddr,
    front: Front,
) -> std::io::Result<()> {
    // The first request is transient: boxed, its head and buffers are freed
    // before the (long-lived) DERP connection is served, instead of sizing
    // every connection's task.
    match Box::pin(first_request(stream, remote, &front)).await? {
        Some((stream, buf, opts)) => {
            let (r, w) = stream.split_rw();
            front.relay.serve_conn(r, w, buf, remote, opts).await;
            Ok(())
        }
        None => Ok(()),
    }
}

/// Reads and answers the first request. A raw DERP upgrade comes back as
/// the stream, the bytes read past the head and how it was upgraded;
/// everything else (WebSocket, hyper, refusals) is served here.
async fn first_request<S: Transport>(
    mut stream: S,
    remote: SocketAddr,
    front: &Front,
) -> std::io::Result<Option<(S, BytesMut, AcceptOptions)>> {
    let mut buf = BytesMut::with_capacity(2048);
    let errors = &front.relay.metrics().http_request_errors;
    let head = match timeout(front.inner.head_timeout, read_head(&mut stream, &mut buf)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(HeadFailure::Io(e))) => return Err(e),
        Ok(Err(HeadFailure::Head(e))) => {
            let (status, reason, label) = match e {
                HeadError::TooLarge => (431, "Request Header Fields Too Large", "too_large"),
                HeadError::Malformed(_) => (400, "Bad Request", "malformed"),
            };
            errors.with_label_values(&[label]).inc();
            refuse(&mut stream, status, reason, &e.to_string()).await;
            return Ok(None);
        }
        Err(_) => {
            errors.with_label_values(&["head_timeout"]).inc();
            return Ok(None);
        }
    };
    let (head, head_len) = head;
    if let Err(f) = head.check_framing() {
        errors.with_label_values(&[f.label()]).inc();
        let reason = if f.status() == 501 {
            "Not Implemented"
        } else {
            "Bad Request"
        };
        refuse(&mut stream, f.status(), reason, &f.to_string()).await;
        return Ok(None);
    }
    if head.is_raw_derp_upgrade() {
        let _ = buf.split_to(head_len);
        let preamble = if head.fast_start && front.inner.fast_start {
            Bytes::new()
        } else {
            upgrade_response_head(&front.relay.public_key())
        };
        let opts = AcceptOptions {
            preamble,
            not_ideal: head.ideal_node,
            tcp_fd: stream.tcp_fd(),
        };
        // Whatever was read past the head, in a buffer of its own size.
        let buf = if buf.is_empty() {
            BytesMut::new()
        } else {
            BytesMut::from(&buf[..])
        };
        return Ok(Some((stream, buf, opts)));
    }
    // DERP over WebSocket (issue 3): handshake answered on the socket.
    if head.path == "/derp" && head.is_websocket_derp() && front.websocket {
        websocket::serve_first_request(stream, buf, remote, front.clone()).await?;
        return Ok(None);
    }
    serve_hyper(Prefixed::new(buf, stream), remote, front.clone()).await?;
    Ok(None)
}

/// Serves a connection with hyper (HTTP/1.1, keep-alive, upgrades).
pub async fn serve_hyper<T>(io: T, remote: SocketAddr, front: Front) -> std::io::Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| routes::handle(front.clone(), remote, req));
    http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(64 << 10)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await
        .map_err(std::io::Error::other)
}

/// Answers `status` with a short text body and `Connection: close`.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, status: u16, reason: &str, text: &str) {
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{text}\n",
        text.len() + 1
    );
    let _ = timeout(Duration::from_secs(2), stream.write_all(resp.as_bytes())).await;
}

enum HeadFailure {
    Io(std::io::Error),
    Head(HeadError),
}

async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<(RequestHead, usize)>, HeadFailure> {
    loop {
        if !buf.is_empty() {
            if let Some(h) = parse_head(buf).map_err(HeadFailure::Head)? {
                return Ok(Some(h));
            }
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(2048);
        }
        if stream.read_buf(buf).await.map_err(HeadFailure::Io)? == 0 {
            return Ok(None);
        }
    }
}
