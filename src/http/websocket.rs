//! DERP over WebSocket (subprotocol `derp`).
//!
//! The DERP byte stream is the concatenation of binary message payloads: a
//! frame may span messages and a message may hold many frames. Text messages
//! end the connection with close code 1003; a client that did not offer the
//! `derp` subprotocol gets the WebSocket and then close code 1008, as the
//! reference server does. No compression is offered (tungstenite has none),
//! and any `Origin` is accepted.
//!
//! [`WsByteStream`] turns a [`WebSocketStream`] of either role into an
//! [`AsyncRead`] + [`AsyncWrite`] byte stream; the relay and our own client
//! run on it unchanged. The handshake is answered here both for a
//! connection's first request ([`serve_first_request`], straight on the
//! socket) and for a later request on a kept-alive connection ([`upgrade`],
//! through hyper).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::head::MAX_HEADERS;
use super::prefixed::Prefixed;
use super::{Body, Front, HEAD_TIMEOUT};
use crate::relay::{AcceptOptions, Relay};

/// The WebSocket subprotocol DERP clients ask for.
pub const SUBPROTOCOL: &str = "derp";

/// Largest WebSocket message (and frame) accepted, and largest message sent.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// How long the server waits for the client's answer to a Close it sent.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The tungstenite settings for DERP connections: bounded messages and
/// frames, bounded write buffering, a small eagerly allocated read buffer
/// (the default is 128 KiB per connection), and each message written to the
/// socket as soon as it is sent (this adapter already batches per flush).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 << 10)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE))
        .max_write_buffer_size(2 * MAX_MESSAGE_SIZE + (64 << 10))
}

/// What the read side is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    /// Delivering binary payloads.
    Open,
    /// The peer sent Close; flushing tungstenite's reply before EOF.
    PeerClosed,
    /// A text message arrived; sending Close 1003 (`queued` once handed to
    /// tungstenite), then failing.
    Rejecting { queued: bool },
    /// EOF reported.
    Eof,
    /// The text-message error reported.
    Failed,
}

/// A WebSocket seen as a byte stream: reads concatenate binary message
/// payloads (ping/pong handled by tungstenite, Close = EOF, text = error and
/// Close 1003); writes are buffered and each flush sends the buffered bytes
/// as one binary message (a message is also sent whenever the buffer reaches
/// [`MAX_MESSAGE_SIZE`]). Works for either role.
///
/// Reads never buffer more than the one message being delivered. Use
/// [`tokio::io::split`] to get independent halves.
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    /// Unread rest of the current inbound message.
    rd: Bytes,
    state: ReadState,
    /// Outbound bytes not yet handed to tungstenite.
    wr: BytesMut,
}

impl<S> WsByteStream<S> {
    /// Wraps an established WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsByteStream {
            ws,
            rd: Bytes::new(),
            state: ReadState::Open,
            wr: BytesMut::new(),
        }
    }

    /// The WebSocket, e.g. to send a message that is not DERP data in tests.
    pub fn get_mut(&mut self) -> &mut WebSocketStream<S> {
        &mut self.ws
    }

    /// Unwraps the WebSocket; bytes buffered on either side are dropped.
    pub fn into_inner(self) -> WebSocketStream<S> {
        self.ws
    }
}

fn ws_to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        e => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsByteStream<S> {
    /// Hands the buffered outbound bytes to tungstenite as one binary message
    /// (no-op when nothing is buffered). Does not flush the socket.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.wr.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_to_io)?;
        let msg = self.wr.split().freeze();
        Poll::Ready(
            Pin::new(&mut self.ws)
                .start_send(Message::Binary(msg))
                .map_err(ws_to_io),
        )
    }

    /// Sends Close 1003 after a text message, then reports the error.
    fn poll_reject(&mut self, cx: &mut Context<'_>, queued: bool) -> Poll<()> {
        if !queued {
            if ready!(Pin::new(&mut self.ws).poll_ready(cx)).is_ok() {
                let frame = CloseFrame {
                    code: CloseCode::Unsupported,
                    reason: Utf8Bytes::from_static("DERP over WebSocket needs binary messages"),
                };
                let _ = Pin::new(&mut self.ws).start_send(Message::Close(Some(frame)));
            }
            self.state = ReadState::Rejecting { queued: true };
        }
        let _ = ready!(Pin::new(&mut self.ws).poll_flush(cx));
        self.state = ReadState::Failed;
        Poll::Ready(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.state {
                ReadState::Open => {}
                ReadState::PeerClosed => {
                    // Best effort: deliver tungstenite's Close reply.
                    let _ = ready!(Pin::new(&mut this.ws).poll_flush(cx));
                    this.state = ReadState::Eof;
                    continue;
                }
                ReadState::Rejecting { queued } => {
                    ready!(this.poll_reject(cx, queued));
                    continue;
                }
                ReadState::Eof => return Poll::Ready(Ok(())),
                ReadState::Failed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a DERP WebSocket",
                    )))
                }
            }
            if !this.rd.is_empty() {
                let n = this.rd.len().min(buf.remaining());
                buf.put_slice(&this.rd[..n]);
                this.rd.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None => this.state = ReadState::Eof,
                Some(Err(e)) => return Poll::Ready(Err(ws_to_io(e))),
                Some(Ok(Message::Binary(b))) => this.rd = b,
                Some(Ok(Message::Text(_))) => this.state = ReadState::Rejecting { queued: false },
                Some(Ok(Message::Close(_))) => this.state = ReadState::PeerClosed,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.wr.len() >= MAX_MESSAGE_SIZE {
            ready!(this.poll_send(cx))?;
        }
        let n = data.len().min(MAX_MESSAGE_SIZE - this.wr.len());
        this.wr.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.wr.len() >= MAX_MESSAGE_SIZE {
            ready!(this.poll_send(cx))?;
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(MAX_MESSAGE_SIZE - this.wr.len());
            this.wr.extend_from_slice(&b[..take]);
            n += take;
            if take < b.len() {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.ws).poll_flush(cx).map_err(ws_to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        match ready!(Pin::new(&mut this.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_to_io(e))),
        }
    }
}

/// The outcome of checking a WebSocket upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// `Sec-WebSocket-Accept` value.
    pub accept_key: String,
    /// The client offered the `derp` subprotocol (else: close 1008).
    pub derp: bool,
}

/// Why a WebSocket upgrade request was refused at the HTTP level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Status code.
    pub status: StatusCode,
    /// Plain-text body (with trailing newline).
    pub body: &'static str,
    /// Extra headers.
    pub headers: Vec<(&'static str, &'static str)>,
}

fn reject(status: StatusCode, body: &'static str) -> Rejected {
    Rejected {
        status,
        body,
        headers: Vec::new(),
    }
}

/// Whether any comma-separated token of any value of `name` satisfies `f`.
fn any_token(headers: &HeaderMap, name: HeaderName, f: impl Fn(&str) -> bool) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| f(t.trim()))
}

/// A `Sec-WebSocket-Key` must be the base64 of 16 bytes.
fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// Checks an RFC 6455 upgrade request (already known to carry
/// `Upgrade: websocket`) the way the reference server's WebSocket library
/// does, and decides the subprotocol.
pub fn negotiate(method: &Method, headers: &HeaderMap) -> Result<Accepted, Rejected> {
    if method != Method::GET {
        return Err(reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "WebSocket protocol violation: handshake request method is not GET\n",
        ));
    }
    if !any_token(headers, header::CONNECTION, |t| {
        t.eq_ignore_ascii_case("upgrade")
    }) {
        let mut r = reject(
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket protocol violation: Connection header does not contain Upgrade\n",
        );
        r.headers = vec![("connection", "Upgrade"), ("upgrade", "websocket")];
        return Err(r);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes().trim_ascii() != b"13")
    {
        let mut r = reject(
            StatusCode::BAD_REQUEST,
            "unsupported WebSocket protocol version (only 13 is supported)\n",
        );
        r.headers = vec![("sec-websocket-version", "13")];
        return Err(r);
    }
    let key = match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if valid_key(k.as_bytes().trim_ascii()) => k.as_bytes().trim_ascii(),
        _ => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "WebSocket protocol violation: invalid Sec-WebSocket-Key\n",
            ))
        }
    };
    Ok(Accepted {
        accept_key: derive_accept_key(key),
        derp: any_token(headers, header::SEC_WEBSOCKET_PROTOCOL, |t| {
            t == SUBPROTOCOL
        }),
    })
}

/// The `101` headers for an accepted upgrade.
fn accept_headers(acc: &Accepted) -> Vec<(&'static str, &str)> {
    let mut h = vec![
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-accept", acc.accept_key.as_str()),
    ];
    if acc.derp {
        h.push(("sec-websocket-protocol", SUBPROTOCOL));
    }
    h
}

/// Runs DERP on an established server-side WebSocket, or closes it with
/// 1008 when the client did not speak the `derp` subprotocol.
pub async fn run<S>(mut ws: WebSocketStream<S>, derp: bool, remote: SocketAddr, relay: Relay)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !derp {
        tracing::debug!(%remote, "websocket without the derp subprotocol; closing 1008");
        let frame = CloseFrame {
            code: CloseCode::Policy,
            reason: Utf8Bytes::from_static("client must speak the derp subprotocol"),
        };
        if ws.close(Some(frame)).await.is_ok() {
            // Wait briefly for the client's Close so the socket ends cleanly.
            let _ = timeout(CLOSE_LINGER, async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
        return;
    }
    relay.metrics().websocket_accepts.inc();
    tracing::debug!(%remote, "websocket DERP connection accepted");
    let (r, w) = tokio::io::split(WsByteStream::new(ws));
    relay
        .serve_conn(r, w, BytesMut::new(), remote, AcceptOptions::default())
        .await;
}

/// Serves a connection whose first request is a `/derp` WebSocket upgrade.
/// `buf` holds every byte read so far, starting with the request head.
pub async fn serve_first_request<S>(
    mut stream: S,
    mut buf: BytesMut,
    remote: SocketAddr,
    front: Front,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (head_len, decision) = {
        let mut hdrs = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut hdrs);
        let n = match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            // The caller parsed this head already.
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "bad head")),
        };
        let mut map = HeaderMap::with_capacity(req.headers.len());
        for h in req.headers.iter() {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) {
                map.append(k, v);
            }
        }
        let method =
            Method::from_bytes(req.method.unwrap_or("").as_bytes()).unwrap_or(Method::OPTIONS);
        (n, negotiate(&method, &map))
    };
    let leftover = buf.split_off(head_len);
    let mut out = String::new();
    let acc = match decision {
        Ok(acc) => acc,
        Err(rej) => {
            out.push_str(&format!(
                "HTTP/1.1 {} {}\r\n",
                rej.status.as_str(),
                rej.status.canonical_reason().unwrap_or("")
            ));
            for (k, v) in &rej.headers {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str(&format!(
                "content-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{}",
                rej.body.len(),
                rej.body
            ));
            let _ = timeout(HEAD_TIMEOUT, async {
                stream.write_all(out.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
            return Ok(());
        }
    };
    out.push_str("HTTP/1.1 101 Switching Protocols\r\n");
    for (k, v) in accept_headers(&acc) {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    match timeout(HEAD_TIMEOUT, stream.write_all(out.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()),
    }
    // Frames the client sent right behind its request are replayed first.
    let ws = WebSocketStream::from_raw_socket(
        Prefixed::new(leftover, stream),
        Role::Server,
        Some(ws_config()),
    )
    .await;
    run(ws, acc.derp, remote, front.relay).await;
    Ok(())
}

/// Answers a `/derp` WebSocket upgrade that arrived through hyper (a later
/// request on a kept-alive connection) and relays on the upgraded socket.
pub fn upgrade(front: &Front, remote: SocketAddr, req: &mut Request<Incoming>) -> Response<Body> {
    let acc = match negotiate(req.method(), req.headers()) {
        Ok(acc) => acc,
        Err(rej) => {
            let mut r = Response::new(Full::new(Bytes::from_static(rej.body.as_bytes())));
            *r.status_mut() = rej.status;
            let h = r.headers_mut();
            for (k, v) in rej.headers {
                h.insert(k, HeaderValue::from_static(v));
            }
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return r;
        }
    };
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (k, v) in accept_headers(&acc) {
        r.headers_mut()
            .insert(k, HeaderValue::from_str(v).expect("accept key is base64"));
    }
    let on_upgrade = hyper::upgrade::on(req);
    let relay = front.relay.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(ws_config()),
                )
                .await;
                run(ws, acc.derp, remote, relay).await;
            }
            Err(e) => tracing::debug!(%remote, error = %e, "websocket upgrade failed"),
        }
    });
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    const GOOD: &[(&str, &str)] = &[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn rfc6455_accept_key_and_subprotocol() {
        let mut h = headers(GOOD);
        h.append("sec-websocket-protocol", HeaderValue::from_static("chat"));
        h.append(
            "sec-websocket-protocol",
            HeaderValue::from_static("x, derp"),
        );
        let acc = negotiate(&Method::GET, &h).unwrap();
        assert_eq!(acc.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(acc.derp);
        let mut h = headers(GOOD);
        h.append(
            "sec-websocket-protocol",
            HeaderValue::from_static("derpish"),
        );
        assert!(!negotiate(&Method::GET, &h).unwrap().derp);
    }

    /// A server-role adapter and a raw client-role WebSocket over a pipe.
    async fn pair() -> (
        WsByteStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(4 << 20);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, Some(ws_config())).await;
        let client = WebSocketStream::from_raw_socket(b, Role::Client, Some(ws_config())).await;
        (WsByteStream::new(server), client)
    }

    #[tokio::test]
    async fn one_message_per_flush_bounded_in_size() {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let (mut s, mut c) = pair().await;
        s.write_all(b"abc").await.unwrap();
        let n = s
            .write_vectored(&[io::IoSlice::new(b"de"), io::IoSlice::new(b"f")])
            .await
            .unwrap();
        assert_eq!(n, 3);
        s.flush().await.unwrap();
        s.flush().await.unwrap(); // nothing buffered: no empty message
        s.write_all(b"g").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            c.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"abcdef"))
        );
        assert_eq!(
            c.next().await.unwrap().unwrap(),
            Message::Binary(Bytes::from_static(b"g"))
        );
        // A write larger than a message is cut at MAX_MESSAGE_SIZE.
        let big = vec![7u8; MAX_MESSAGE_SIZE + 10];
        s.write_all(&big).await.unwrap();
        s.flush().await.unwrap();
        let Message::Binary(m1) = c.next().await.unwrap().unwrap() else {
            panic!("binary")
        };
        let Message::Binary(m2) = c.next().await.unwrap().unwrap() else {
            panic!("binary")
        };
        assert_eq!((m1.len(), m2.len()), (MAX_MESSAGE_SIZE, 10));
    }

    #[tokio::test]
    async fn reads_concatenate_messages_and_close_is_eof() {
        use futures_util::SinkExt;
        use tokio::io::AsyncReadExt;
        let (mut s, mut c) = pair().await;
        for m in [&b"DE"[..], b"", b"RP"] {
            c.send(Message::Binary(Bytes::copy_from_slice(m)))
                .await
                .unwrap();
        }
        c.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .unwrap();
        c.send(Message::Binary(Bytes::from_static(b"!")))
            .await
            .unwrap();
        c.close(None).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"DERP!");
    }

    #[tokio::test]
    async fn text_is_an_error_and_close_1003() {
        use futures_util::{SinkExt, StreamExt};
        use tokio::io::AsyncReadExt;
        let (mut s, mut c) = pair().await;
        c.send(Message::text("nope")).await.unwrap();
        let mut b = [0u8; 8];
        let e = s.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        match c.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Unsupported),
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn refusals() {
        let h = headers(GOOD);
        assert_eq!(
            negotiate(&Method::POST, &h).unwrap_err().status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        let no_conn: Vec<_> = GOOD.iter().copied().skip(1).collect();
        assert_eq!(
            negotiate(&Method::GET, &headers(&no_conn))
                .unwrap_err()
                .status,
            StatusCode::UPGRADE_REQUIRED
        );
        let mut v8 = GOOD.to_vec();
        v8[2] = ("sec-websocket-version", "8");
        assert_eq!(
            negotiate(&Method::GET, &headers(&v8)).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let mut bad_key = GOOD.to_vec();
        bad_key[3] = ("sec-websocket-key", "short");
        assert_eq!(
            negotiate(&Method::GET, &headers(&bad_key))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
    }
}
