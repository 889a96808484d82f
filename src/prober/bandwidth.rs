//! The bandwidth probe of an ordered node pair (A, B): once the mesh path
//! from a client on A to a client on B is up (the mesh probe's exchange),
//! a burst of `size` bytes goes A→B in 16 KiB packets, at most a window of
//! them in flight so the relays' per-client queues never overflow; the
//! throughput is the bytes over the time until the last one arrived.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::time::Instant;

use super::dial::TlsConfigs;
use super::map::Node;
use super::mesh::{self, PacketEnd};
use super::probe::Outcome;

/// Payload bytes per packet.
const CHUNK: usize = 16 << 10;
/// Packets in flight (relays queue 32 per client by default).
const WINDOW: u64 = 16;

/// Runs the probe for at most `timeout`.
pub async fn probe(
    from: &Node,
    to: &Node,
    tls: &TlsConfigs,
    size: usize,
    timeout: Duration,
) -> Outcome {
    let start = Instant::now();
    let deadline = start + timeout;
    let (mut a, mut b) = match mesh::connect_pair(from, to, tls, deadline).await {
        Ok(ends) => ends,
        Err(e) => return Outcome::fail(start.elapsed(), e),
    };
    let warm = mesh::exchange(&mut a, &mut b, &from.name, &to.name, deadline).await;
    if !warm.is_ok() {
        return warm;
    }
    match tokio::time::timeout_at(deadline, burst(&mut a, &mut b, size)).await {
        Ok(Ok(took)) => {
            let bps = size as f64 / took.as_secs_f64().max(1e-9);
            let mut o = Outcome::ok(took)
                .with_note(format!("{size} bytes at {:.1} Mbit/s", bps * 8.0 / 1e6));
            o.throughput = Some(bps);
            o
        }
        Ok(Err(e)) => Outcome::fail(start.elapsed(), e),
        Err(_) => Outcome::fail(
            start.elapsed(),
            format!("the {size}-byte burst did not arrive within {timeout:?}"),
        ),
    }
}

/// Sends `size` bytes from `a` to `b`; returns how long until all arrived.
pub async fn burst(
    a: &mut impl PacketEnd,
    b: &mut impl PacketEnd,
    size: usize,
) -> Result<Duration, String> {
    let (ka, kb) = (a.key(), b.key());
    let tag = fastrand::u64(..);
    let packets = size.div_ceil(CHUNK).max(1) as u64;
    let t0 = Instant::now();
    let (mut sent, mut received, mut bytes) = (0u64, 0u64, 0usize);
    while received < packets {
        while sent < packets && sent - received < WINDOW {
            let len = if sent + 1 == packets {
                size - (packets as usize - 1) * CHUNK
            } else {
                CHUNK
            }
            .max(16);
            let mut p = BytesMut::with_capacity(len);
            p.put_u64(tag);
            p.put_u64(sent);
            p.resize(len, 0);
            a.send(kb, p.freeze())
                .await
                .map_err(|e| format!("burst: send: {e}"))?;
            sent += 1;
        }
        let (src, payload): (_, Bytes) = b.recv().await.map_err(|e| format!("burst: {e}"))?;
        if src == ka && payload.len() >= 16 && payload[..8] == tag.to_be_bytes() {
            received += 1;
            bytes += payload.len();
        }
    }
    tracing::debug!(bytes, packets, "bandwidth burst arrived");
    Ok(t0.elapsed())
}
