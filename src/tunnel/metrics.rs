//! What the tunnel counts: packets and bytes each way per peer, the relay
//! in use, reconnects and drops by reason. Rendered as Prometheus text on an
//! optional `/metrics` listener, and summarised in a periodic status line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why a packet was dropped (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A DERP packet from a key that is not a configured peer.
    UnknownKey,
    /// A local datagram while no relay was connected.
    NoRelay,
    /// A DERP packet for a peer whose WireGuard has not sent yet (and no
    /// `--wg-addr` is set).
    NoLocalEndpoint,
    /// The local UDP send failed.
    UdpSendError,
    /// A local datagram larger than DERP carries.
    Oversize,
}

impl DropReason {
    /// Every reason, for pre-registering the label values.
    pub const ALL: [DropReason; 5] = [
        DropReason::UnknownKey,
        DropReason::NoRelay,
        DropReason::NoLocalEndpoint,
        DropReason::UdpSendError,
        DropReason::Oversize,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::UnknownKey => "unknown_key",
            DropReason::NoRelay => "no_relay",
            DropReason::NoLocalEndpoint => "no_local_endpoint",
            DropReason::UdpSendError => "udp_send_error",
            DropReason::Oversize => "oversize",
        }
    }
}

/// Per-peer counters, bound once so the hot path only adds.
#[derive(Clone)]
pub struct PeerCounters {
    /// Local datagrams sent to the relay.
    pub to_relay_packets: IntCounter,
    /// Their bytes (WireGuard payload).
    pub to_relay_bytes: IntCounter,
    /// Relay packets written to the local socket.
    pub from_relay_packets: IntCounter,
    /// Their bytes.
    pub from_relay_bytes: IntCounter,
}

/// The tunnel's metrics.
pub struct TunnelMetrics {
    registry: Registry,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    drops: IntCounterVec,
    /// Successful relay connections after the first.
    pub reconnects: IntCounter,
    /// Failed dial or handshake attempts.
    pub connect_errors: IntCounter,
    /// 1 while a relay connection is up.
    pub connected: IntGauge,
    relay: IntGaugeVec,
    current: Mutex<Option<String>>,
    /// Frames written to the relay per write call (sum, for an average).
    pub relay_writes: IntCounter,
    /// UDP send calls (one per GSO batch).
    pub udp_sends: IntCounter,
    /// UDP receive calls (one per recvmmsg batch).
    pub udp_recvs: IntCounter,
}

impl TunnelMetrics {
    /// Fresh, registered metrics.
    pub fn new() -> TunnelMetrics {
        let registry = Registry::new();
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(v.clone())).expect("unique");
            v
        };
        let one = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let packets = vec(
            "derpd_tunnel_packets_total",
            "WireGuard datagrams carried, by peer and direction (to_relay, from_relay).",
            &["peer", "direction"],
        );
        let bytes = vec(
            "derpd_tunnel_bytes_total",
            "WireGuard datagram bytes carried, by peer and direction.",
            &["peer", "direction"],
        );
        let drops = vec(
            "derpd_tunnel_dropped_packets_total",
            "Datagrams dropped, by reason.",
            &["reason"],
        );
        for d in DropReason::ALL {
            drops.with_label_values(&[d.label()]);
        }
        let connected = IntGauge::new(
            "derpd_tunnel_relay_connected",
            "1 while connected to a relay.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(connected.clone()))
            .expect("unique");
        let relay = IntGaugeVec::new(
            Opts::new(
                "derpd_tunnel_relay",
                "1 for the relay in use (label: its name or URL).",
            ),
            &["relay"],
        )
        .expect("valid metric");
        registry.register(Box::new(relay.clone())).expect("unique");
        TunnelMetrics {
            packets,
            bytes,
            drops,
            reconnects: one(
                "derpd_tunnel_reconnects_total",
                "Relay connections made after the first.",
            ),
            connect_errors: one(
                "derpd_tunnel_connect_errors_total",
                "Failed relay dials and handshakes.",
            ),
            connected,
            relay,
            current: Mutex::new(None),
            relay_writes: one(
                "derpd_tunnel_relay_writes_total",
                "Write calls to the relay connection (each carries a batch of frames).",
            ),
            udp_sends: one(
                "derpd_tunnel_udp_send_calls_total",
                "UDP send system calls on the local side (GSO batches count once).",
            ),
            udp_recvs: one(
                "derpd_tunnel_udp_recv_calls_total",
                "UDP receive system calls on the local side (recvmmsg batches count once).",
            ),
            registry,
        }
    }

    /// Counters for one peer (label `peer`).
    pub fn peer(&self, name: &str) -> PeerCounters {
        PeerCounters {
            to_relay_packets: self.packets.with_label_values(&[name, "to_relay"]),
            to_relay_bytes: self.bytes.with_label_values(&[name, "to_relay"]),
            from_relay_packets: self.packets.with_label_values(&[name, "from_relay"]),
            from_relay_bytes: self.bytes.with_label_values(&[name, "from_relay"]),
        }
    }

    /// Counts `n` dropped packets.
    pub fn count_drop(&self, reason: DropReason, n: u64) {
        self.drops.with_label_values(&[reason.label()]).inc_by(n);
    }

    /// Packets dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.with_label_values(&[reason.label()]).get()
    }

    /// Records the relay now in use (`None` = disconnected).
    pub fn set_relay(&self, name: Option<&str>) {
        let mut cur = self.current.lock();
        if let Some(old) = cur.take() {
            let _ = self.relay.remove_label_values(&[&old]);
        }
        if let Some(n) = name {
            self.relay.with_label_values(&[n]).set(1);
            *cur = Some(n.to_owned());
        }
        self.connected.set(i64::from(name.is_some()));
    }

    /// The relay in use.
    pub fn relay(&self) -> Option<String> {
        self.current.lock().clone()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("utf-8")
    }
}

impl Default for TunnelMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One line summing up the tunnel: relay, per-peer traffic, drops.
pub fn status_line(m: &TunnelMetrics, peers: &[(String, PeerCounters)]) -> String {
    use std::fmt::Write;
    let mut s = match m.relay() {
        Some(r) => format!("relay={r}"),
        None => "relay=none".to_owned(),
    };
    let _ = write!(s, " reconnects={}", m.reconnects.get());
    for (name, c) in peers {
        let _ = write!(
            s,
            " peer={name} tx={}p/{}B rx={}p/{}B",
            c.to_relay_packets.get(),
            c.to_relay_bytes.get(),
            c.from_relay_packets.get(),
            c.from_relay_bytes.get()
        );
    }
    for d in DropReason::ALL {
        let n = m.dropped(d);
        if n > 0 {
            let _ = write!(s, " drop_{}={n}", d.label());
        }
    }
    s
}

/// Logs [`status_line`] every `every` until `stop`.
pub async fn log_status(
    m: Arc<TunnelMetrics>,
    peers: Vec<(String, PeerCounters)>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => tracing::info!(status = %status_line(&m, &peers), "tunnel status"),
        }
    }
}

/// Largest request head the metrics listener reads.
const MAX_REQUEST: usize = 8 << 10;

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, m: Arc<TunnelMetrics>, stop: CancellationToken) {
    loop {
        let (mut s, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let m = m.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(&mut s, &m)).await;
        });
    }
}

async fn answer(s: &mut tokio::net::TcpStream, m: &TunnelMetrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let (status, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
        ("200 OK", m.render())
    } else {
        ("404 Not Found", "not found\n".to_owned())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("metrics-listen {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_label_follows_the_relay_in_use() {
        let m = TunnelMetrics::new();
        m.set_relay(Some("http://a"));
        m.set_relay(Some("http://b"));
        let text = m.render();
        assert!(
            text.contains("derpd_tunnel_relay{relay=\"http://b\"} 1"),
            "{text}"
        );
        assert!(!text.contains("http://a"), "{text}");
        assert!(text.contains("derpd_tunnel_relay_connected 1"));
        m.set_relay(None);
        assert!(m.render().contains("derpd_tunnel_relay_connected 0"));
        assert_eq!(m.relay(), None);
    }

    #[test]
    fn status_line_counts() {
        let m = TunnelMetrics::new();
        let p = m.peer("fw");
        p.to_relay_packets.inc_by(3);
        p.to_relay_bytes.inc_by(300);
        m.count_drop(DropReason::UnknownKey, 2);
        let line = status_line(&m, &[("fw".into(), p)]);
        assert!(line.contains("relay=none"), "{line}");
        assert!(line.contains("peer=fw tx=3p/300B rx=0p/0B"), "{line}");
        assert!(line.contains("drop_unknown_key=2"), "{line}");
        assert!(m
            .render()
            .contains("derpd_tunnel_dropped_packets_total{reason=\"unknown_key\"} 2"));
    }
}
