//! The mesh probe of an ordered node pair (A, B) of one region: a client
//! K1 on A sends to a client K2 on B, which only works when A and B are
//! meshed (A learns from B that K2 is there and forwards to it). K1 sends
//! again and again until K2 has been registered on B and announced to A (as
//! Tailscale's derpprobe does), and the packet must arrive with source K1.
//! Then K2 answers K1 through B, and that round trip (A→B→A) is the
//! latency.
//!
//! The two ends are anything that sends and receives DERP packets
//! ([`PacketEnd`]): our own client in the prober, Tailscale's `ts_derp`
//! client in the tests.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::dial::{self, TlsConfigs};
use super::map::Node;
use super::probe::Outcome;
use crate::client::{Client, DynClient};
use crate::proto::{Frame, NodePrivate, NodePublic};

/// How often K1 sends while waiting for the path to K2 to exist.
const RESEND: Duration = Duration::from_millis(100);

/// One end of a probe: a connected DERP client.
pub trait PacketEnd: Send {
    /// Its public key.
    fn key(&self) -> NodePublic;
    /// Sends `payload` to `dst`.
    fn send(
        &mut self,
        dst: NodePublic,
        payload: Bytes,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// The next packet received: (source, payload).
    fn recv(&mut self) -> impl Future<Output = Result<(NodePublic, Bytes), String>> + Send;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> PacketEnd for Client<S> {
    fn key(&self) -> NodePublic {
        self.public_key()
    }

    async fn send(&mut self, dst: NodePublic, payload: Bytes) -> Result<(), String> {
        Client::send(self, &Frame::SendPacket { dst, payload })
            .await
            .map_err(|e| e.to_string())
    }

    async fn recv(&mut self) -> Result<(NodePublic, Bytes), String> {
        self.recv_packet().await.map_err(|e| e.to_string())
    }
}

/// A fresh client on `from` and one on `to`, both connected by `deadline`.
pub(super) async fn connect_pair(
    from: &Node,
    to: &Node,
    tls: &TlsConfigs,
    deadline: Instant,
) -> Result<(DynClient, DynClient), String> {
    let ends = async {
        let (k1, k2) = (NodePrivate::generate(), NodePrivate::generate());
        let a = dial::derp(from, tls, &k1)
            .await
            .map_err(|e| format!("client on {}: {e}", from.name))?;
        let b = dial::derp(to, tls, &k2)
            .await
            .map_err(|e| format!("client on {}: {e}", to.name))?;
        Ok((a, b))
    };
    match tokio::time::timeout_at(deadline, ends).await {
        Ok(ends) => ends,
        Err(_) => Err("connecting the two clients timed out".into()),
    }
}

/// Runs the probe from `from` to `to` for at most `timeout`.
pub async fn probe(from: &Node, to: &Node, tls: &TlsConfigs, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let deadline = start + timeout;
    let (mut a, mut b) = match connect_pair(from, to, tls, deadline).await {
        Ok(ends) => ends,
        Err(e) => return Outcome::fail(start.elapsed(), e),
    };
    exchange(&mut a, &mut b, &from.name, &to.name, deadline).await
}

/// The exchange between two connected ends, `a` on node `from` and `b` on
/// node `to`, until `deadline`.
pub async fn exchange(
    a: &mut impl PacketEnd,
    b: &mut impl PacketEnd,
    from: &str,
    to: &str,
    deadline: Instant,
) -> Outcome {
    let start = Instant::now();
    let (ka, kb) = (a.key(), b.key());
    let tag = fastrand::u64(..);
    let forward = |seq: u64| Bytes::from(format!("derpd mesh probe {tag} {seq}"));

    // A → B, resent until it arrives. Sender and receiver run side by
    // side and the sender stops between two sends, never inside one (a
    // half-written frame would break the connection for the round trip).
    let done = AtomicBool::new(false);
    let arrived = async {
        let send = async {
            let mut seq = 0u64;
            while !done.load(Ordering::Relaxed) {
                seq += 1;
                if let Err(e) = a.send(kb, forward(seq)).await {
                    return Err(format!("{from}: send: {e}"));
                }
                tokio::time::sleep(RESEND).await;
            }
            Ok(())
        };
        let receive = async {
            let r = loop {
                let (src, payload) = match b.recv().await {
                    Ok(p) => p,
                    Err(e) => break Err(format!("{to}: receive: {e}")),
                };
                if !payload.starts_with(format!("derpd mesh probe {tag} ").as_bytes()) {
                    continue;
                }
                if src != ka {
                    break Err(format!(
                        "the packet reached {to} with source {src}, not the sender {ka}"
                    ));
                }
                break Ok(());
            };
            done.store(true, Ordering::Relaxed);
            r
        };
        let (sent, received) = tokio::join!(send, receive);
        received.and(sent)
    };
    match tokio::time::timeout_at(deadline, arrived).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Outcome::fail(start.elapsed(), e),
        Err(_) => {
            return Outcome::fail(
                start.elapsed(),
                format!("no packet from a client on {from} reached a client on {to}"),
            )
        }
    }

    // The round trip: A → B, B → A.
    let rtt = async {
        let ping = Bytes::from(format!("derpd mesh ping {tag}"));
        let t0 = Instant::now();
        a.send(kb, ping.clone())
            .await
            .map_err(|e| format!("{from}: send: {e}"))?;
        loop {
            let (src, payload) = b.recv().await.map_err(|e| format!("{to}: receive: {e}"))?;
            if src == ka && payload == ping {
                break;
            }
        }
        let pong = Bytes::from(format!("derpd mesh pong {tag}"));
        b.send(ka, pong.clone())
            .await
            .map_err(|e| format!("{to}: send: {e}"))?;
        loop {
            let (src, payload) = a
                .recv()
                .await
                .map_err(|e| format!("{from}: receive: {e}"))?;
            if src == kb && payload == pong {
                return Ok::<_, String>(t0.elapsed());
            }
        }
    };
    match tokio::time::timeout_at(deadline, rtt).await {
        Ok(Ok(rtt)) => Outcome::ok(rtt).with_note(format!(
            "path up after {:.0?}",
            start.elapsed().saturating_sub(rtt)
        )),
        Ok(Err(e)) => Outcome::fail(start.elapsed(), e),
        Err(_) => Outcome::fail(
            start.elapsed(),
            format!("delivered {from}->{to}, but the answer {to}->{from} never arrived"),
        ),
    }
}
