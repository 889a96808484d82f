//! WebSocket framing into DERP: arbitrary bytes arrive from a client on a
//! server-role WebSocket; the byte stream it yields feeds the server's DERP
//! frame decoder. Nothing panics and nothing hangs once the peer is gone.
#![no_main]

use bytes::BytesMut;
use derpd::http::websocket::{ws_config, WsByteStream};
use derpd::proto::{FrameDecoder, Role};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
use tokio_tungstenite::WebSocketStream;

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
}

fuzz_target!(|data: &[u8]| {
    RT.with(|rt| {
        rt.block_on(async {
            let (mut peer, ours) = tokio::io::duplex(data.len() + 1);
            peer.write_all(data).await.unwrap();
            drop(peer);
            let ws =
                WebSocketStream::from_raw_socket(ours, WsRole::Server, Some(ws_config())).await;
            let mut stream = WsByteStream::new(ws);
            let mut dec = FrameDecoder::new(Role::Server);
            let mut buf = BytesMut::new();
            let mut chunk = [0u8; 4096];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        assert!(n <= data.len(), "more payload than wire bytes");
                        buf.extend_from_slice(&chunk[..n]);
                    }
                }
                loop {
                    match dec.decode(&mut buf) {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
            }
        })
    })
});
