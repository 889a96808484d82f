//! Mesh metrics, registered into the relay's Prometheus registry.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every mesh metric.
pub struct MeshMetrics {
    /// Keys known through the mesh (with at least one forwarder).
    pub clients_remote: IntGauge,
    /// Payload bytes handed to mesh links as ForwardPacket.
    pub forwarded_out_bytes: IntCounter,
    /// 1 while the link to a peer is connected, per peer.
    pub link_up: IntGaugeVec,
    /// Times a link was re-established after breaking, per peer.
    pub link_reconnects: IntCounterVec,
    /// Forwarded packets dropped on a link (queue full, or link down), per peer.
    pub link_dropped: IntCounterVec,
    /// Forwarded packets waiting in a link's queue, per peer.
    pub link_queued: IntGaugeVec,
}

impl MeshMetrics {
    /// Creates the metrics and registers them in `r`.
    pub fn new(r: &Registry) -> MeshMetrics {
        let reg = |c: Box<dyn prometheus::core::Collector>| r.register(c).expect("unique metric");
        let clients_remote = IntGauge::new(
            "derp_clients_remote",
            "Distinct keys known through mesh peers (with at least one forwarder).",
        )
        .expect("valid metric");
        reg(Box::new(clients_remote.clone()));
        let forwarded_out_bytes = IntCounter::new(
            "derp_forwarded_out_bytes_total",
            "Payload bytes forwarded to mesh peers (ForwardPacket).",
        )
        .expect("valid metric");
        reg(Box::new(forwarded_out_bytes.clone()));
        let gauge_vec = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["peer"]).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let counter_vec = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &["peer"]).expect("valid metric");
            reg(Box::new(c.clone()));
            c
        };
        MeshMetrics {
            clients_remote,
            forwarded_out_bytes,
            link_up: gauge_vec(
                "derpd_mesh_link_up",
                "1 while the mesh link to this peer is connected and watching.",
            ),
            link_reconnects: counter_vec(
                "derpd_mesh_link_reconnects_total",
                "Mesh links re-established after breaking.",
            ),
            link_dropped: counter_vec(
                "derpd_mesh_forward_dropped_total",
                "Forwarded packets dropped on a mesh link (queue full or link down).",
            ),
            link_queued: gauge_vec(
                "derpd_mesh_forward_queued",
                "Forwarded packets waiting in a mesh link's queue.",
            ),
        }
    }
}
