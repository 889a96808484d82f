//! Moving datagrams both ways. Local → relay: each peer's socket is read
//! in batches and every datagram becomes a SendPacket frame to that peer's
//! key, encoded straight into one buffer per batch. Relay → local: packets
//! from configured keys are gathered per peer and written with batched
//! sends once the frames already read are used up; packets from any other
//! key are dropped and counted.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::metrics::{DropReason, TunnelMetrics};
use super::peers::{Peer, PeerTable};
use super::udp::{RecvBatch, SendBatch};
use crate::proto::frame::put_header;
use crate::proto::limits::{FRAME_HEADER_LEN, MAX_PACKET_SIZE};
use crate::proto::{FrameType, NodePublic};

/// Encoded SendPacket frames from one local receive.
pub struct Batch {
    /// The frames, back to back.
    pub frames: Bytes,
    /// How many packets they carry.
    pub packets: u64,
}

/// Reads `peer`'s local socket until `stop`, sending each batch of
/// datagrams, as frames, to `tx` (waiting when it is full).
pub async fn pump_local(
    peer: Arc<Peer>,
    tx: mpsc::Sender<Batch>,
    metrics: Arc<TunnelMetrics>,
    stop: CancellationToken,
) {
    let mut rb = RecvBatch::new();
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = peer.socket.recv(&mut rb) => r,
        };
        if let Err(e) = r {
            // ICMP errors surface here (e.g. nothing listened where we last
            // sent); they are not fatal for a UDP socket.
            tracing::debug!(peer = %peer.name, error = %e, "local receive error");
            // Never spin on an error that repeats.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        metrics.udp_recvs.inc();
        if let Some(batch) = encode(&peer, &rb, &metrics) {
            if tx.send(batch).await.is_err() {
                return;
            }
        }
    }
}

/// Frames for every datagram in `rb`; notes WireGuard's source address.
fn encode(peer: &Peer, rb: &RecvBatch, metrics: &TunnelMetrics) -> Option<Batch> {
    let mut total = 0;
    let mut last_src: Option<SocketAddr> = None;
    for (src, d) in rb.datagrams() {
        total += FRAME_HEADER_LEN + 32 + d.len();
        last_src = Some(src);
    }
    if let Some(src) = last_src {
        peer.note_source(src);
    }
    let mut out = BytesMut::with_capacity(total);
    let (mut packets, mut bytes) = (0u64, 0u64);
    for (_, d) in rb.datagrams() {
        if d.len() > MAX_PACKET_SIZE {
            metrics.count_drop(DropReason::Oversize, 1);
            continue;
        }
        put_header(&mut out, FrameType::SendPacket as u8, 32 + d.len());
        out.extend_from_slice(&peer.key.0);
        out.extend_from_slice(d);
        packets += 1;
        bytes += d.len() as u64;
    }
    if packets == 0 {
        return None;
    }
    peer.counters.to_relay_packets.inc_by(packets);
    peer.counters.to_relay_bytes.inc_by(bytes);
    Some(Batch {
        frames: out.freeze(),
        packets,
    })
}

/// Relay → local delivery, batched per peer.
pub struct Inbound {
    peers: Arc<PeerTable>,
    metrics: Arc<TunnelMetrics>,
    wg_addr: Option<SocketAddr>,
    batches: Vec<SendBatch>,
    waiting: Vec<usize>,
}

impl Inbound {
    /// Delivery to `peers`; `wg_addr` is where packets go for a peer whose
    /// WireGuard has not sent yet.
    pub fn new(
        peers: Arc<PeerTable>,
        metrics: Arc<TunnelMetrics>,
        wg_addr: Option<SocketAddr>,
    ) -> Inbound {
        let batches = (0..peers.len()).map(|_| SendBatch::default()).collect();
        Inbound {
            peers,
            metrics,
            wg_addr,
            batches,
            waiting: Vec::new(),
        }
    }

    /// Takes one packet from the relay. Strict: a source key that is not
    /// configured is dropped and counted.
    pub fn packet(&mut self, src: &NodePublic, payload: &[u8]) {
        let Some(i) = self.peers.lookup(src) else {
            self.metrics.count_drop(DropReason::UnknownKey, 1);
            tracing::trace!(%src, "packet from a key that is not a peer; dropped");
            return;
        };
        let b = &mut self.batches[i];
        if b.is_empty() {
            self.waiting.push(i);
        }
        if !b.push(payload) {
            self.metrics.count_drop(DropReason::Oversize, 1);
        }
    }

    /// Packets waiting to be written.
    pub fn pending(&self) -> usize {
        self.waiting.iter().map(|&i| self.batches[i].len()).sum()
    }

    /// Writes every waiting packet to its peer's local socket.
    pub async fn flush(&mut self) {
        for i in std::mem::take(&mut self.waiting) {
            let peer = self.peers.get(i);
            let batch = &mut self.batches[i];
            let Some(dst) = peer.destination(self.wg_addr) else {
                let n = batch.discard();
                self.metrics
                    .count_drop(DropReason::NoLocalEndpoint, n as u64);
                continue;
            };
            let f = batch.flush(&peer.socket, dst).await;
            peer.counters.from_relay_packets.inc_by(f.sent);
            peer.counters.from_relay_bytes.inc_by(f.bytes);
            self.metrics.udp_sends.inc_by(f.calls);
            if f.failed > 0 {
                self.metrics.count_drop(DropReason::UdpSendError, f.failed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::NodePrivate;
    use crate::tunnel::settings::PeerConfig;
    use crate::tunnel::udp::LocalSocket;
    use std::time::Duration;

    fn table(keys: &[NodePublic], m: &TunnelMetrics) -> Arc<PeerTable> {
        let cfgs: Vec<PeerConfig> = keys
            .iter()
            .map(|k| PeerConfig {
                key: *k,
                listen: "127.0.0.1:0".parse().unwrap(),
                name: k.short(),
            })
            .collect();
        Arc::new(PeerTable::bind(&cfgs, m).unwrap())
    }

    #[tokio::test]
    async fn strict_keys_and_delivery_to_wireguards_source() {
        let m = Arc::new(TunnelMetrics::new());
        let a = NodePrivate::generate().public();
        let peers = table(&[a], &m);
        let wg = LocalSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut inb = Inbound::new(peers.clone(), m.clone(), None);

        // No WireGuard source yet and no --wg-addr: dropped and counted.
        inb.packet(&a, b"early");
        inb.flush().await;
        assert_eq!(m.dropped(DropReason::NoLocalEndpoint), 1);

        // A stranger's packet never reaches the batch.
        inb.packet(&NodePrivate::generate().public(), b"stranger");
        assert_eq!(inb.pending(), 0);
        assert_eq!(m.dropped(DropReason::UnknownKey), 1);

        peers.get(0).note_source(wg.local_addr().unwrap());
        inb.packet(&a, b"one");
        inb.packet(&a, b"two");
        inb.flush().await;
        let mut rb = RecvBatch::new();
        let mut got = Vec::new();
        while got.len() < 2 {
            tokio::time::timeout(Duration::from_secs(5), wg.recv(&mut rb))
                .await
                .unwrap()
                .unwrap();
            got.extend(rb.datagrams().map(|(_, d)| d.to_vec()));
        }
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(peers.get(0).counters.from_relay_packets.get(), 2);
    }

    #[tokio::test]
    async fn local_datagrams_become_send_packet_frames() {
        let m = Arc::new(TunnelMetrics::new());
        let a = NodePrivate::generate().public();
        let peers = table(&[a], &m);
        let peer = peers.get(0).clone();
        let to = peer.socket.local_addr().unwrap();
        let wg = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        wg.send_to(b"hello", to).unwrap();
        wg.send_to(&[7u8; 1400], to).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let task = tokio::spawn(pump_local(peer.clone(), tx, m.clone(), stop.clone()));
        let mut frames = BytesMut::new();
        let mut packets = 0;
        while packets < 2 {
            let b = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            packets += b.packets;
            frames.extend_from_slice(&b.frames);
        }
        stop.cancel();
        task.await.unwrap();
        let mut dec = crate::proto::FrameDecoder::new(crate::proto::Role::Server);
        let f1 = dec.decode(&mut frames).unwrap().unwrap();
        let f2 = dec.decode(&mut frames).unwrap().unwrap();
        assert_eq!(
            f1,
            crate::proto::Frame::SendPacket {
                dst: a,
                payload: Bytes::from_static(b"hello")
            }
        );
        assert!(
            matches!(f2, crate::proto::Frame::SendPacket { dst, payload } if dst == a && payload.len() == 1400)
        );
        assert_eq!(peer.destination(None), Some(wg.local_addr().unwrap()));
        assert_eq!(peer.counters.to_relay_bytes.get(), 1405);
    }
}
