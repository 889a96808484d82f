//! The DERP probe of one node: connect as a fresh client (TLS, HTTP
//! upgrade, handshake, ServerInfo), then send a packet addressed to
//! ourselves and wait for the relay to hand it back. The latency is the
//! whole exchange, connection included, as a client coming online sees it.

use std::time::Duration;

use bytes::Bytes;

use super::dial::{self, TlsConfigs};
use super::map::Node;
use super::probe::Outcome;
use crate::proto::{Frame, NodePrivate};

/// Runs the probe for at most `timeout`.
pub async fn probe(node: &Node, tls: &TlsConfigs, timeout: Duration) -> Outcome {
    let start = tokio::time::Instant::now();
    let run = async {
        let key = NodePrivate::generate();
        let mut c = dial::derp(node, tls, &key).await?;
        let server = c.server_key();
        let payload = Bytes::from(format!("derpd prober {}", fastrand::u64(..)));
        c.send(&Frame::SendPacket {
            dst: key.public(),
            payload: payload.clone(),
        })
        .await
        .map_err(|e| format!("sending to ourselves: {e}"))?;
        loop {
            match c
                .recv()
                .await
                .map_err(|e| format!("waiting for our packet: {e}"))?
            {
                Frame::RecvPacket { src, payload: got } if got == payload => {
                    if src != key.public() {
                        return Err(format!("our packet came back from {src}, not from us"));
                    }
                    return Ok(server);
                }
                Frame::Ping(d) => c
                    .send(&Frame::Pong(d))
                    .await
                    .map_err(|e| format!("answering a ping: {e}"))?,
                _ => {}
            }
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(server)) => {
            Outcome::ok(start.elapsed()).with_note(format!("server key {}", server.short()))
        }
        Ok(Err(e)) => Outcome::fail(start.elapsed(), e),
        Err(_) => Outcome::fail(
            start.elapsed(),
            format!("no handshake and round trip within {timeout:?}"),
        ),
    }
}
