//! One mesh link: this relay's connection to a peer relay, as a DERP client
//! with the relay's own key and the mesh key.
//!
//! On every (re)connect the link sends WatchConns and turns the peer's
//! PeerPresent/PeerGone frames into forwarding-table changes; a writer task
//! drains the link's [`ForwardQueue`] as ForwardPacket frames. When the
//! connection breaks, every key learned on it is forgotten and the link
//! redials with exponential backoff and jitter. A link that reaches this
//! relay itself (same server key) stops for good.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::dial::{dial, Dialed, PeerSpec};
use super::queue::{ForwardQueue, Forwarded, LinkId};
use super::Mesh;
use crate::proto::{Frame, FrameDecoder, MeshKey, NodePrivate, NodePublic, Role};
use crate::relay::Relay;

/// Deadline for dialing plus the handshake.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for each write to the peer (a stuck peer breaks the link).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The peer sends a KeepAlive at least every 65 s.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// Backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bytes of ForwardPacket frames written per write call.
const WRITE_CHUNK: usize = 256 << 10;

/// What a link is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Dialing or handshaking.
    Connecting,
    /// Connected and watching.
    Up,
    /// Waiting to redial after a failure.
    Down,
    /// The peer is this relay: stopped for good.
    SelfLink,
    /// Stopped (relay shutting down or peers replaced).
    Stopped,
}

impl LinkState {
    /// Name used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
            LinkState::SelfLink => "self",
            LinkState::Stopped => "stopped",
        }
    }
}

/// Status of a link, for `/debug/mesh`.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    /// Current state.
    pub state: LinkState,
    /// The peer relay's key, once seen.
    pub peer_key: Option<NodePublic>,
    /// The most recent failure.
    pub last_error: Option<String>,
    /// Successful connections so far.
    pub connects: u64,
    /// When the current connection came up.
    pub up_since: Option<Instant>,
}

/// A link's shared state: its queue, status, and stop signal.
pub struct Link {
    /// The peer.
    pub spec: PeerSpec,
    /// Process-unique id (key of the forwarding table).
    pub id: LinkId,
    /// Outbound ForwardPacket queue.
    pub queue: Arc<ForwardQueue>,
    /// Status.
    pub status: Mutex<LinkStatus>,
    /// Stops the link.
    pub cancel: CancellationToken,
}

/// What every link of a relay dials with.
pub struct LinkCtx {
    /// The relay's own key (links identify as the relay).
    pub key: NodePrivate,
    /// The region's mesh key.
    pub mesh_key: MeshKey,
    /// TLS settings.
    pub tls: Arc<rustls::ClientConfig>,
    /// Keepalive and user timeout of the link's TCP connection.
    pub tcp: crate::sockopt::TcpTimeouts,
}

impl Link {
    fn set(&self, f: impl FnOnce(&mut LinkStatus)) {
        f(&mut self.status.lock());
    }
}

/// The delay before redial attempt `failures` (0 = first after a break):
/// exponential from 100 ms, capped at 5 s, times a random 0.5–1.5.
pub fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_MIN.saturating_mul(1 << failures.min(6));
    let jittered = base.mul_f64(0.5 + fastrand::f64());
    jittered.min(BACKOFF_MAX)
}

/// Runs the link until it is cancelled or finds itself.
pub async fn run(relay: Relay, mesh: Arc<Mesh>, link: Arc<Link>, ctx: Arc<LinkCtx>) {
    let final_state = run_inner(&relay, &mesh, &link, &ctx).await;
    let m = &mesh.table.metrics;
    let label = [link.spec.name.as_str()];
    if final_state == LinkState::SelfLink {
        // This relay's own entry is not a link: export no series for it, so
        // "mesh link down" alerts do not fire for it.
        let _ = m.link_up.remove_label_values(&label);
        let _ = m.link_reconnects.remove_label_values(&label);
        let _ = m.link_dropped.remove_label_values(&label);
        let _ = m.link_queued.remove_label_values(&label);
    } else {
        m.link_up.with_label_values(&label).set(0);
    }
    mesh.table.link_down(&relay.shared().registry, link.id);
    link.queue.clear();
    link.set(|s| {
        s.state = final_state;
        s.up_since = None;
    });
}

async fn run_inner(relay: &Relay, mesh: &Mesh, link: &Arc<Link>, ctx: &LinkCtx) -> LinkState {
    let m = &mesh.table.metrics;
    let up = m.link_up.with_label_values(&[&link.spec.name]);
    let reconnects = m.link_reconnects.with_label_values(&[&link.spec.name]);
    let cancel = &link.cancel;
    let mut failures = 0u32;
    // The failure last logged at WARN while the link is down ("recovered"
    // is then owed): an operator sees a line when the link goes down or
    // its reason changes, not one per retry.
    let mut outage: Option<String> = None;
    loop {
        link.set(|s| s.state = LinkState::Connecting);
        let attempt = tokio::time::timeout(
            DIAL_TIMEOUT,
            dial(&link.spec, &ctx.tls, &ctx.tcp, &ctx.key, &ctx.mesh_key),
        );
        let dialed = tokio::select! {
            r = attempt => r.unwrap_or_else(|_| Err("dial timed out".into())),
            _ = cancel.cancelled() => return LinkState::Stopped,
        };
        let error = match dialed {
            Ok(d) if d.server_key == relay.public_key() => {
                tracing::info!(peer = %link.spec.name, "mesh peer is this relay; link stopped");
                link.set(|s| s.peer_key = Some(d.server_key));
                return LinkState::SelfLink;
            }
            Ok(d) => {
                let peer_key = d.server_key;
                let connects = {
                    let mut s = link.status.lock();
                    s.state = LinkState::Up;
                    s.peer_key = Some(peer_key);
                    s.connects += 1;
                    s.up_since = Some(Instant::now());
                    s.connects
                };
                if connects > 1 {
                    reconnects.inc();
                }
                up.set(1);
                if outage.take().is_some() {
                    tracing::warn!(peer = %link.spec.name, key = %peer_key, "mesh link recovered");
                } else {
                    tracing::info!(peer = %link.spec.name, key = %peer_key, "mesh link up");
                }
                let started = Instant::now();
                let e = connected(relay, mesh, link, d).await;
                up.set(0);
                mesh.table.link_down(&relay.shared().registry, link.id);
                let dropped = link.queue.clear();
                link.set(|s| s.up_since = None);
                if cancel.is_cancelled() {
                    return LinkState::Stopped;
                }
                tracing::warn!(peer = %link.spec.name, error = %e, dropped, "mesh link down; redialing");
                outage = Some(e.clone());
                if started.elapsed() >= STABLE {
                    failures = 0;
                }
                e
            }
            Err(e) => {
                if outage.as_ref() == Some(&e) {
                    tracing::debug!(peer = %link.spec.name, error = %e, "mesh dial failed again");
                } else {
                    tracing::warn!(peer = %link.spec.name, error = %e, "mesh link down: cannot connect; retrying, quietly while the reason stays the same");
                    outage = Some(e.clone());
                }
                e
            }
        };
        link.set(|s| {
            s.state = LinkState::Down;
            s.last_error = Some(error);
        });
        let delay = backoff(failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return LinkState::Stopped,
        }
    }
}

/// Runs one connection: WatchConns out, then table updates in and
/// forwarded packets out, until either side fails. Returns why it ended.
async fn connected(relay: &Relay, mesh: &Mesh, link: &Arc<Link>, d: Dialed) -> String {
    let Dialed {
        stream, mut buf, ..
    } = d;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        let mut out = BytesMut::with_capacity(WRITE_CHUNK + (70 << 10));
        Frame::WatchConns.encode(&mut out);
        let mut batch: VecDeque<Forwarded> = VecDeque::new();
        loop {
            link.queue.take(&mut batch);
            while let Some(p) = batch.pop_front() {
                Frame::ForwardPacket {
                    src: p.src,
                    dst: p.dst,
                    payload: p.payload,
                }
                .encode(&mut out);
                if out.len() >= WRITE_CHUNK {
                    write(&mut wr, &mut out).await?;
                }
            }
            if !out.is_empty() {
                write(&mut wr, &mut out).await?;
            }
            link.queue.wait().await;
        }
    };
    let reader = async {
        let mut dec = FrameDecoder::new(Role::Client);
        loop {
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(f)) => on_frame(relay, mesh, link, f),
                    Ok(None) => break,
                    Err(e) => return Err(format!("bad frame from peer: {e}")),
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(64 << 10);
            }
            match tokio::time::timeout(READ_TIMEOUT, rd.read_buf(&mut buf)).await {
                Ok(Ok(0)) => return Err("peer closed the connection".to_string()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("read: {e}")),
                Err(_) => return Err("read timed out".to_string()),
            }
        }
    };
    let result: Result<(), String> = tokio::select! {
        r = writer => r,
        r = reader => r,
        _ = link.cancel.cancelled() => Err("stopped".into()),
    };
    result.err().unwrap_or_default()
}

async fn write<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    out: &mut BytesMut,
) -> Result<(), String> {
    let res = tokio::time::timeout(WRITE_TIMEOUT, async {
        w.write_all(out).await?;
        w.flush().await
    })
    .await;
    out.clear();
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err("write timed out (peer not reading)".into()),
    }
}

fn on_frame(relay: &Relay, mesh: &Mesh, link: &Arc<Link>, f: Frame) {
    let registry = &relay.shared().registry;
    match f {
        // Our own link to the peer shows up in its flood: skip ourselves.
        Frame::PeerPresent { key, .. } if key != relay.public_key() => {
            mesh.table.peer_present(registry, key, &link.queue);
        }
        Frame::PeerGone { key, .. } => mesh.table.peer_gone(registry, key, link.id),
        // KeepAlive, packets addressed to the relay's own key, etc.
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let d = backoff(0);
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(150));
            assert!(backoff(3) >= Duration::from_millis(400));
            assert!(backoff(30) <= BACKOFF_MAX);
        }
    }
}
