//! DERP over WebSocket against a real relay on loopback, driven by
//! `tokio-tungstenite`'s client (a WebSocket implementation we did not
//! write): subprotocol negotiation, relaying to plain-TCP DERP clients (ours
//! and `ts_derp`), message framing independence, text-message rejection,
//! upgrades on kept-alive connections, and the off switch.

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use derpd::client::Client;
use derpd::http::websocket::{ws_config, WsByteStream};
use derpd::http::{serve_stream, Front, FrontConfig};
use derpd::proto::handshake::{open_server_info, seal_client_info};
use derpd::proto::{ClientInfo, Frame, FrameDecoder, NodePrivate, NodePublic, Role as FrameRole};
use derpd::server::Server;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{client_async_with_config, WebSocketStream};

type Ws = WebSocketStream<TcpStream>;

fn ws_request(addr: SocketAddr, protocol: Option<&str>) -> Request {
    let mut req = format!("ws://{addr}/derp").into_client_request().unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_str(p).unwrap());
    }
    req
}

/// Runs tungstenite's client handshake on `tcp`.
async fn ws_handshake_on(
    tcp: TcpStream,
    addr: SocketAddr,
    protocol: Option<&str>,
) -> Result<(Ws, Response), WsError> {
    timeout(
        ARRIVES,
        client_async_with_config(ws_request(addr, protocol), tcp, Some(ws_config())),
    )
    .await
    .expect("websocket handshake finishes in time")
}

/// Which request of its connection the WebSocket upgrade is: the first
/// (answered straight on the socket) or one after a keep-alive probe
/// (answered through hyper).
#[derive(Debug, Clone, Copy)]
enum Via {
    FirstRequest,
    AfterProbe,
}

const BOTH: [Via; 2] = [Via::FirstRequest, Via::AfterProbe];

async fn tcp_via(addr: SocketAddr, via: Via) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    if let Via::AfterProbe = via {
        probe_keep_alive(&mut tcp, addr).await;
    }
    tcp
}

async fn ws_connect_via(
    addr: SocketAddr,
    protocol: Option<&str>,
    via: Via,
) -> Result<(Ws, Response), WsError> {
    ws_handshake_on(tcp_via(addr, via).await, addr, protocol).await
}

async fn ws_connect_to(
    addr: SocketAddr,
    protocol: Option<&str>,
) -> Result<(Ws, Response), WsError> {
    ws_connect_via(addr, protocol, Via::FirstRequest).await
}

fn assert_derp_protocol(resp: &Response) {
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .expect("subprotocol in the response"),
        "derp"
    );
}

/// Our DERP client running over the byte-stream adapter on `ws`.
async fn derp_over(ws: Ws) -> (Client<WsByteStream<TcpStream>>, NodePrivate) {
    let key = NodePrivate::generate();
    let c = timeout(
        ARRIVES,
        Client::handshake(
            WsByteStream::new(ws),
            BytesMut::new(),
            &key,
            ClientInfo::default(),
        ),
    )
    .await
    .expect("DERP handshake in time")
    .expect("DERP handshake over WebSocket succeeds");
    (c, key)
}

/// A DERP client connected to `server` over WebSocket.
async fn ws_client(server: &Server) -> (Client<WsByteStream<TcpStream>>, NodePrivate) {
    let (ws, resp) = ws_connect_to(server.addr, Some("derp"))
        .await
        .expect("websocket upgrade accepted");
    assert_derp_protocol(&resp);
    derp_over(ws).await
}

/// Next DERP frame read from raw binary messages; fails on anything else.
async fn next_frame(ws: &mut Ws, buf: &mut BytesMut, dec: &mut FrameDecoder) -> Frame {
    loop {
        if let Some(f) = dec.decode(buf).expect("well-formed frames") {
            return f;
        }
        match timeout(ARRIVES, ws.next()).await.expect("message in time") {
            Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
}

/// Runs the DERP handshake by hand on raw messages, sending the ClientInfo
/// frame split over three binary messages (the first cuts its header).
async fn raw_handshake(ws: &mut Ws, key: &NodePrivate) -> (BytesMut, FrameDecoder) {
    let mut buf = BytesMut::new();
    let mut dec = FrameDecoder::new(FrameRole::Client);
    let server_key = match next_frame(ws, &mut buf, &mut dec).await {
        Frame::ServerKey { key } => key,
        f => panic!("first frame {f:?}"),
    };
    let mut info = BytesMut::new();
    seal_client_info(key, &server_key, &ClientInfo::default()).encode(&mut info);
    let info = info.freeze();
    for part in [info.slice(..1), info.slice(1..4), info.slice(4..)] {
        ws.send(Message::Binary(part)).await.unwrap();
    }
    match next_frame(ws, &mut buf, &mut dec).await {
        Frame::ServerInfo { nonce, sealed } => {
            open_server_info(key, &server_key, &nonce, &sealed).expect("ServerInfo opens");
        }
        f => panic!("second frame {f:?}"),
    }
    (buf, dec)
}

fn send_packet_bytes(dst: NodePublic, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    Frame::SendPacket {
        dst,
        payload: Bytes::copy_from_slice(payload),
    }
    .encode(&mut b);
    b.freeze()
}

/// Reads a response head byte by byte (nothing past the blank line).
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(
            timeout(ARRIVES, s.read_u8())
                .await
                .expect("response in time")
                .expect("response head"),
        );
    }
    String::from_utf8(head).unwrap()
}

/// `GET /derp/probe` with keep-alive; the 200 must leave the connection open.
async fn probe_keep_alive(s: &mut TcpStream, addr: SocketAddr) {
    s.write_all(format!("GET /derp/probe HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 0\r\n"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
}

#[tokio::test]
async fn websocket_client_and_tcp_client_exchange_packets() {
    let server = start().await;
    let (mut w, wk) = ws_client(&server).await;
    assert_eq!(w.server_key(), server.relay.public_key());
    let (mut t, tk) = our_client(&server).await;

    for i in 0..10u8 {
        let msg = vec![i; 1 + 700 * i as usize];
        w.send_packet(tk.public(), &msg).await.unwrap();
        let (src, got) = timeout(ARRIVES, t.recv_packet()).await.unwrap().unwrap();
        assert_eq!((src, &got[..]), (wk.public(), &msg[..]));

        t.send_packet(wk.public(), &msg).await.unwrap();
        let (src, got) = timeout(ARRIVES, w.recv_packet()).await.unwrap().unwrap();
        assert_eq!((src, &got[..]), (tk.public(), &msg[..]));
    }
    // Largest DERP packet, both ways.
    let big = vec![0x5a; 64 << 10];
    t.send_packet(wk.public(), &big).await.unwrap();
    let (_, got) = timeout(ARRIVES, w.recv_packet()).await.unwrap().unwrap();
    assert_eq!(&got[..], &big[..]);
    w.send_packet(tk.public(), &big).await.unwrap();
    let (_, got) = timeout(ARRIVES, t.recv_packet()).await.unwrap().unwrap();
    assert_eq!(&got[..], &big[..]);
    server.shutdown().await;
}

#[tokio::test]
async fn ts_derp_client_and_websocket_client_exchange_packets() {
    let server = start().await;
    let (a, ka) = ts_client(&server).await;
    let (mut w, wk) = ws_client(&server).await;

    a.send_one(to_ts(&wk.public()), b"from ts_derp over TCP")
        .await
        .unwrap();
    let (src, got) = timeout(ARRIVES, w.recv_packet()).await.unwrap().unwrap();
    assert_eq!(src, from_ts(&ka.public));
    assert_eq!(&got[..], b"from ts_derp over TCP");

    w.send_packet(from_ts(&ka.public), b"from derpd over WebSocket")
        .await
        .unwrap();
    let (src, got) = timeout(ARRIVES, a.recv_one()).await.unwrap().unwrap();
    assert_eq!(src, to_ts(&wk.public()));
    assert_eq!(got.as_ref(), b"from derpd over WebSocket");
    server.shutdown().await;
}

#[tokio::test]
async fn two_websocket_clients_exchange_packets() {
    let server = start().await;
    let (mut a, ka) = ws_client(&server).await;
    let (mut b, kb) = ws_client(&server).await;
    a.send_packet(kb.public(), b"ping over ws").await.unwrap();
    let (src, got) = timeout(ARRIVES, b.recv_packet()).await.unwrap().unwrap();
    assert_eq!((src, &got[..]), (ka.public(), &b"ping over ws"[..]));
    b.send_packet(ka.public(), b"pong over ws").await.unwrap();
    let (src, got) = timeout(ARRIVES, a.recv_packet()).await.unwrap().unwrap();
    assert_eq!((src, &got[..]), (kb.public(), &b"pong over ws"[..]));
    server.shutdown().await;
}

#[tokio::test]
async fn frames_split_across_messages_and_packed_into_one() {
    for via in BOTH {
        let server = start().await;
        let (ws, resp) = ws_connect_via(server.addr, Some("derp"), via)
            .await
            .unwrap();
        assert_derp_protocol(&resp);
        let mut ws = ws;
        let key = NodePrivate::generate();
        let (mut buf, mut dec) = raw_handshake(&mut ws, &key).await;
        let (mut t, tk) = our_client(&server).await;

        // Two frames in one message.
        let mut two = BytesMut::new();
        two.extend_from_slice(&send_packet_bytes(tk.public(), b"first of two"));
        two.extend_from_slice(&send_packet_bytes(tk.public(), b"second of two"));
        ws.send(Message::Binary(two.freeze())).await.unwrap();
        for want in [&b"first of two"[..], b"second of two"] {
            let (src, got) = timeout(ARRIVES, t.recv_packet()).await.unwrap().unwrap();
            assert_eq!((src, &got[..]), (key.public(), want));
        }

        // One frame across two messages, cut inside the destination key; then
        // the tail of a frame and the start of the next share a message.
        let f = send_packet_bytes(tk.public(), b"split in two");
        let g = send_packet_bytes(tk.public(), b"straddling");
        ws.send(Message::Binary(f.slice(..20))).await.unwrap();
        let mut mid = BytesMut::from(&f[20..]);
        mid.extend_from_slice(&g[..3]);
        ws.send(Message::Binary(mid.freeze())).await.unwrap();
        ws.send(Message::Binary(g.slice(3..))).await.unwrap();
        for want in [&b"split in two"[..], b"straddling"] {
            let (src, got) = timeout(ARRIVES, t.recv_packet()).await.unwrap().unwrap();
            assert_eq!((src, &got[..]), (key.public(), want));
        }

        // An empty binary message carries no bytes and breaks nothing.
        ws.send(Message::Binary(Bytes::new())).await.unwrap();
        // tungstenite answers pings at the WebSocket level.
        ws.send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        match timeout(ARRIVES, ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(p))) => assert_eq!(&p[..], b"hi"),
            other => panic!("expected pong, got {other:?}"),
        }

        // The other direction arrives in binary messages that decode as DERP.
        t.send_packet(key.public(), b"back to the browser")
            .await
            .unwrap();
        match next_frame(&mut ws, &mut buf, &mut dec).await {
            Frame::RecvPacket { src, payload } => {
                assert_eq!(
                    (src, &payload[..]),
                    (tk.public(), &b"back to the browser"[..])
                )
            }
            f => panic!("unexpected frame {f:?}"),
        }
        server.shutdown().await;
    }
}

#[tokio::test]
async fn text_message_closes_the_connection_with_1003() {
    for via in BOTH {
        let server = start().await;
        let (mut ws, _) = ws_connect_via(server.addr, Some("derp"), via)
            .await
            .unwrap();
        let key = NodePrivate::generate();
        raw_handshake(&mut ws, &key).await;
        let (mut t, _) = our_client(&server).await;

        ws.send(Message::text("hello")).await.unwrap();
        match timeout(ARRIVES, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Unsupported),
            other => panic!("expected Close 1003, got {other:?}"),
        }
        // Nothing but the end of the connection follows.
        loop {
            match timeout(ARRIVES, ws.next()).await.unwrap() {
                None | Some(Err(_)) => break,
                Some(Ok(Message::Close(_))) => continue,
                Some(Ok(m)) => panic!("message after close: {m:?}"),
            }
        }
        // The relay dropped the client: a packet to it is answered by nothing,
        // and the sender itself stays connected.
        assert!(
            eventually(|| metric(&server, "derp_current_connections") == 1.0).await,
            "the WebSocket client is unregistered"
        );
        t.send_packet(key.public(), b"to nobody").await.unwrap();
        t.send(&Frame::Ping(*b"still-up")).await.unwrap();
        loop {
            match timeout(ARRIVES, t.recv()).await.unwrap().unwrap() {
                Frame::Pong(d) => {
                    assert_eq!(&d, b"still-up");
                    break;
                }
                Frame::KeepAlive => continue,
                f => panic!("unexpected frame {f:?}"),
            }
        }
        server.shutdown().await;
    }
}

#[tokio::test]
async fn requests_without_the_derp_subprotocol_get_no_derp() {
    for via in BOTH {
        let server = start().await;
        // No subprotocol at all: not a WebSocket-DERP request (legacy raw DERP
        // answer), which a WebSocket client refuses.
        assert!(ws_connect_via(server.addr, None, via).await.is_err());
        // Offering only a protocol that merely contains "derp": the client sees
        // no negotiated subprotocol and gives up.
        assert!(ws_connect_via(server.addr, Some("derpish"), via)
            .await
            .is_err());

        // The same by hand: the WebSocket opens without a subprotocol and the
        // server closes it with 1008 before any DERP frame.
        let mut s = tcp_via(server.addr, via).await;
        s.write_all(
            b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Protocol: chat, derpish\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut s).await.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101 "), "{via:?}: {head}");
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
            "{head}"
        );
        assert!(!head.contains("sec-websocket-protocol"), "{head}");
        let mut ws = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
        match timeout(ARRIVES, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Policy),
            other => panic!("expected Close 1008, got {other:?}"),
        }
        assert_eq!(metric(&server, "derp_current_connections"), 0.0);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn malformed_websocket_upgrades_are_refused_with_http_errors() {
    for via in BOTH {
        let server = start().await;
        for (req, status) in [
            // No Sec-WebSocket-Key.
            (
                "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: derp\r\n\r\n",
                "400",
            ),
            // Old protocol version.
            (
                "GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Protocol: derp\r\n\r\n",
                "400",
            ),
            // Not GET.
            (
                "POST /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Protocol: derp\r\n\r\n",
                "405",
            ),
        ] {
            let mut s = tcp_via(server.addr, via).await;
            s.write_all(req.as_bytes()).await.unwrap();
            let head = read_head(&mut s).await;
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status} ")),
                "{via:?}: {head}"
            );
        }
        server.shutdown().await;
    }
}

#[tokio::test]
async fn websocket_upgrade_as_second_request_on_a_kept_alive_connection() {
    let server = start().await;
    let tcp = tcp_via(server.addr, Via::AfterProbe).await;
    let (ws, resp) = ws_handshake_on(tcp, server.addr, Some("derp"))
        .await
        .expect("upgrade on the kept-alive connection accepted");
    assert_derp_protocol(&resp);
    let (mut w, wk) = derp_over(ws).await;
    assert_eq!(w.server_key(), server.relay.public_key());

    let (a, ka) = ts_client(&server).await;
    w.send_packet(from_ts(&ka.public), b"after a probe")
        .await
        .unwrap();
    let (src, got) = timeout(ARRIVES, a.recv_one()).await.unwrap().unwrap();
    assert_eq!(
        (src, got.as_ref()),
        (to_ts(&wk.public()), &b"after a probe"[..])
    );
    a.send_one(to_ts(&wk.public()), b"and back").await.unwrap();
    let (src, got) = timeout(ARRIVES, w.recv_packet()).await.unwrap().unwrap();
    assert_eq!((src, &got[..]), (from_ts(&ka.public), &b"and back"[..]));
    server.shutdown().await;
}

#[tokio::test]
async fn disabled_websocket_answers_426() {
    let server = start().await;
    let front = Front::new(server.relay.clone(), FrontConfig::default()).with_websocket(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        loop {
            let (sock, remote) = listener.accept().await.unwrap();
            tokio::spawn(serve_stream(sock, remote, front.clone()));
        }
    });

    // First request on the connection.
    match ws_connect_to(addr, Some("derp")).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 426),
        other => panic!("expected 426, got {:?}", other.map(|(_, r)| r)),
    }
    // A later request on a kept-alive connection.
    let tcp = tcp_via(addr, Via::AfterProbe).await;
    match ws_handshake_on(tcp, addr, Some("derp")).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 426),
        other => panic!("expected 426, got {:?}", other.map(|(_, r)| r)),
    }
    // Raw DERP still works on the same front door.
    let mut c = Client::connect(&format!("http://{addr}"), &NodePrivate::generate())
        .await
        .expect("raw DERP still served");
    assert_eq!(c.server_key(), server.relay.public_key());
    c.send(&Frame::Ping(*b"12345678")).await.unwrap();
    accept.abort();
    server.shutdown().await;
}
