//! Every Prometheus metric derpd exports, defined in one place.
//!
//! Hot-path counters are resolved to their label children once, at startup,
//! so counting a packet is a single atomic add.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why a packet was dropped (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Destination not connected here or in the mesh.
    UnknownDest,
    /// Forwarded packet whose destination is not connected here.
    UnknownDestOnFwd,
    /// Destination connection was closing.
    GoneDisconnected,
    /// Oldest queued packet evicted by a newer one.
    QueueHead,
    /// New packet dropped because the queue stayed full.
    QueueTail,
    /// Writing to the destination failed.
    WriteError,
    /// Destination key had duplicate connections and none was active.
    DupClient,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 7] = [
        DropReason::UnknownDest,
        DropReason::UnknownDestOnFwd,
        DropReason::GoneDisconnected,
        DropReason::QueueHead,
        DropReason::QueueTail,
        DropReason::WriteError,
        DropReason::DupClient,
    ];

    /// The label value (as Tailscale's relay names it).
    pub fn label(self) -> &'static str {
        match self {
            DropReason::UnknownDest => "unknown_dest",
            DropReason::UnknownDestOnFwd => "unknown_dest_on_fwd",
            DropReason::GoneDisconnected => "gone_disconnected",
            DropReason::QueueHead => "queue_head",
            DropReason::QueueTail => "queue_tail",
            DropReason::WriteError => "write_error",
            DropReason::DupClient => "dup_client",
        }
    }
}

/// Counter pair (packets, bytes) for one label combination.
#[derive(Clone)]
pub struct PacketCounter {
    /// Packets.
    pub packets: IntCounter,
    /// Payload bytes.
    pub bytes: IntCounter,
}

impl PacketCounter {
    /// Counts one packet of `len` payload bytes.
    #[inline]
    pub fn add(&self, packets: u64, bytes: u64) {
        self.packets.inc_by(packets);
        self.bytes.inc_by(bytes);
    }
}

/// All of derpd's metrics.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Connections handed to the DERP layer.
    pub accepts: IntCounter,
    /// Connections currently in the DERP layer (duplicates counted individually).
    pub current_connections: IntGauge,
    /// Connections that sent NotePreferred(true).
    pub current_home_connections: IntGauge,
    /// Connections that sent an `Ideal-Node` header.
    pub current_notideal_connections: IntGauge,
    /// Distinct keys connected locally.
    pub clients_local: IntGauge,
    /// Keys with two or more connections.
    pub current_dup_client_keys: IntGauge,
    /// Connections belonging to such keys.
    pub current_dup_client_conns: IntGauge,
    /// Connections accepted while their key was already connected.
    pub dup_client_conns_total: IntCounter,
    handshake_failures: IntCounterVec,
    /// Packets received from clients, disco kind.
    pub received_disco: PacketCounter,
    /// Packets received from clients, other kind.
    pub received_other: PacketCounter,
    /// Packets written to clients.
    pub sent: PacketCounter,
    dropped: [[PacketCounter; 2]; 7],
    /// PeerGone(Disconnected) frames written.
    pub peer_gone_disconnected_frames: IntCounter,
    /// PeerGone(NotHere) frames written.
    pub peer_gone_not_here_frames: IntCounter,
    /// Pings received.
    pub pings_received: IntCounter,
    /// Pongs sent.
    pub pongs_sent: IntCounter,
    /// Frames skipped because this side does not act on their type.
    pub unknown_frames: IntCounter,
    /// Writers that ended on the write timeout.
    pub write_timeouts: IntCounter,
    /// Readers that ended because a frame was not completed in time.
    pub frame_timeouts: IntCounter,
    /// Mesh watchers subscribed.
    pub watchers: IntGauge,
    /// Packets forwarded to mesh peers.
    pub packets_forwarded_out: IntCounter,
    /// Packets received from mesh peers.
    pub packets_forwarded_in: IntCounter,
    /// Connections refused for presenting mesh-only frames without the mesh key.
    pub mesh_frame_refusals: IntCounter,
    /// Time the oldest packet of each write batch spent queued.
    pub queue_delay: prometheus::Histogram,
    /// Times a client's reader waited for its receive rate limit.
    pub rate_limit_waits: IntCounter,
    /// Frames written per flush, summed (with `write_batches` gives the average batch).
    pub write_batch_frames: IntCounter,
    /// Flushes (vectored write batches).
    pub write_batches: IntCounter,
    /// TCP connections admitted by the listeners.
    pub connections_accepted: IntCounter,
    /// accept() failures (EMFILE and the like).
    pub accept_errors: IntCounter,
    connections_rejected: IntCounterVec,
    /// Failed or timed-out TLS handshakes.
    pub tls_handshake_errors: IntCounter,
    /// Times free allocator memory was handed back after connections left.
    pub memory_trims: IntCounter,
    /// The most connections at once since the last memory trim (not
    /// exported; the trim compares it with the current count).
    pub connections_high_water: std::sync::atomic::AtomicI64,
    /// Handshakes (TLS, DERP) started and not yet finished.
    pub handshakes_in_flight: IntGauge,
    /// How long handshake steps waited for the handshake gate.
    pub handshake_queue_wait: prometheus::Histogram,
    /// DERP connections accepted over WebSocket.
    pub websocket_accepts: IntCounter,
    /// HTTP requests by route and status.
    pub http_requests: IntCounterVec,
    /// Requests refused, or connections closed, before a request head was
    /// complete and acceptable, by reason.
    pub http_request_errors: IntCounterVec,
    /// Build information.
    pub build_info: IntGaugeVec,
}

fn counter(reg: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    reg.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(reg: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    reg.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(c.clone())).expect("unique metric");
    c
}

/// Kind label of a packet.
pub fn kind_label(disco: bool) -> &'static str {
    if disco {
        "disco"
    } else {
        "other"
    }
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let received_packets = counter_vec(
            &r,
            "derp_packets_received_total",
            "Packets received from DERP clients (SendPacket), by kind.",
            &["kind"],
        );
        let received_bytes = counter_vec(
            &r,
            "derp_received_bytes_total",
            "Payload bytes received from DERP clients (SendPacket), by kind.",
            &["kind"],
        );
        let dropped_packets = counter_vec(
            &r,
            "derp_packets_dropped_total",
            "Packets dropped, by reason and kind.",
            &["reason", "kind"],
        );
        let dropped_bytes = counter_vec(
            &r,
            "derp_dropped_bytes_total",
            "Payload bytes dropped, by reason and kind.",
            &["reason", "kind"],
        );
        let pc = |p: &IntCounterVec, b: &IntCounterVec, labels: &[&str]| PacketCounter {
            packets: p.with_label_values(labels),
            bytes: b.with_label_values(labels),
        };
        let dropped = DropReason::ALL.map(|reason| {
            [false, true].map(|disco| {
                pc(
                    &dropped_packets,
                    &dropped_bytes,
                    &[reason.label(), kind_label(disco)],
                )
            })
        });
        let handshake_failures = counter_vec(
            &r,
            "derp_handshake_failures_total",
            "DERP handshakes that failed, by reason.",
            &["reason"],
        );
        for reason in [
            "timeout",
            "not_client_info",
            "box_open",
            "bad_mesh_key",
            "bad_client_info",
            "bad_frame",
            "io",
        ] {
            handshake_failures.with_label_values(&[reason]);
        }
        let build_info = IntGaugeVec::new(
            Opts::new("derpd_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        r.register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let sent_packets = counter(
            &r,
            "derp_packets_sent_total",
            "Packets written to DERP clients (RecvPacket).",
        );
        let sent_bytes = counter(
            &r,
            "derp_sent_bytes_total",
            "Payload bytes written to DERP clients (RecvPacket).",
        );
        Metrics {
            accepts: counter(
                &r,
                "derp_accepts_total",
                "Connections handed to the DERP layer, including failed handshakes.",
            ),
            current_connections: gauge(
                &r,
                "derp_current_connections",
                "DERP connections open now (duplicates counted individually).",
            ),
            current_home_connections: gauge(
                &r,
                "derp_current_home_connections",
                "Connections whose client says this relay is its home.",
            ),
            current_notideal_connections: gauge(
                &r,
                "derp_current_notideal_connections",
                "Connections whose client is not on the first node of its region.",
            ),
            clients_local: gauge(
                &r,
                "derp_clients_local",
                "Distinct node keys connected here.",
            ),
            current_dup_client_keys: gauge(
                &r,
                "derp_current_dup_client_keys",
                "Node keys with two or more connections.",
            ),
            current_dup_client_conns: gauge(
                &r,
                "derp_current_dup_client_conns",
                "Connections belonging to node keys with two or more connections.",
            ),
            dup_client_conns_total: counter(
                &r,
                "derp_dup_client_conns_total",
                "Connections accepted while their node key was already connected.",
            ),
            handshake_failures,
            received_disco: pc(&received_packets, &received_bytes, &["disco"]),
            received_other: pc(&received_packets, &received_bytes, &["other"]),
            sent: PacketCounter {
                packets: sent_packets,
                bytes: sent_bytes,
            },
            dropped,
            peer_gone_disconnected_frames: counter(
                &r,
                "derp_peer_gone_disconnected_frames_total",
                "PeerGone(Disconnected) frames written.",
            ),
            peer_gone_not_here_frames: counter(
                &r,
                "derp_peer_gone_not_here_frames_total",
                "PeerGone(NotHere) frames written.",
            ),
            pings_received: counter(&r, "derp_pings_received_total", "Ping frames received."),
            pongs_sent: counter(&r, "derp_pongs_sent_total", "Pong frames written."),
            unknown_frames: counter(
                &r,
                "derp_unknown_frames_total",
                "Frames from clients of types the server does not act on (skipped).",
            ),
            write_timeouts: counter(
                &r,
                "derp_write_timeouts_total",
                "Client connections closed because a write did not finish in time.",
            ),
            frame_timeouts: counter(
                &r,
                "derp_frame_timeouts_total",
                "Client connections closed because a frame they started was not completed within the frame timeout.",
            ),
            watchers: gauge(
                &r,
                "derp_watchers",
                "Mesh watchers subscribed to connection events.",
            ),
            packets_forwarded_out: counter(
                &r,
                "derp_packets_forwarded_out_total",
                "Packets forwarded to mesh peers.",
            ),
            packets_forwarded_in: counter(
                &r,
                "derp_packets_forwarded_in_total",
                "Packets received from mesh peers for local delivery.",
            ),
            mesh_frame_refusals: counter(
                &r,
                "derp_mesh_frame_refusals_total",
                "Connections closed for sending a mesh-only frame without the mesh key.",
            ),
            queue_delay: {
                let h = prometheus::Histogram::with_opts(
                    prometheus::HistogramOpts::new(
                        "derp_queue_delay_seconds",
                        "Time the oldest packet of each write batch waited in its client's queue.",
                    )
                    .buckets(vec![
                        10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
                        25e-3, 50e-3, 100e-3, 250e-3, 1.0,
                    ]),
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            rate_limit_waits: counter(
                &r,
                "derp_rate_limit_waits_total",
                "Times a client's reads were paused by its receive rate limit.",
            ),
            write_batch_frames: counter(
                &r,
                "derp_write_batch_frames_total",
                "Frames written to clients, summed over write batches.",
            ),
            write_batches: counter(
                &r,
                "derp_write_batches_total",
                "Vectored write batches to clients.",
            ),
            connections_accepted: counter(
                &r,
                "derpd_connections_accepted_total",
                "TCP connections admitted by the listeners.",
            ),
            accept_errors: counter(
                &r,
                "derpd_accept_errors_total",
                "accept() calls that failed (out of file descriptors and the like); the listener backs off up to 1s.",
            ),
            connections_rejected: {
                let c = counter_vec(
                    &r,
                    "derpd_connections_rejected_total",
                    "TCP connections closed at accept, by reason (max_connections, accept_rate).",
                    &["reason"],
                );
                for reason in ["max_connections", "accept_rate"] {
                    c.with_label_values(&[reason]);
                }
                c
            },
            tls_handshake_errors: counter(
                &r,
                "derpd_tls_handshake_errors_total",
                "TLS handshakes that failed or timed out.",
            ),
            connections_high_water: std::sync::atomic::AtomicI64::new(0),
            memory_trims: counter(
                &r,
                "derpd_memory_trims_total",
                "Times free allocator memory was handed back to the system after many connections left.",
            ),
            handshakes_in_flight: gauge(
                &r,
                "derpd_handshakes_in_flight",
                "Handshakes (TLS, DERP with admission) started and not yet finished.",
            ),
            handshake_queue_wait: {
                let h = prometheus::Histogram::with_opts(
                    prometheus::HistogramOpts::new(
                        "derpd_handshake_queue_wait_seconds",
                        "Time a handshake step waited for the handshake gate (--handshake-parallelism), when it had to.",
                    )
                    .buckets(vec![
                        100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
                        250e-3, 1.0, 2.5,
                    ]),
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            websocket_accepts: counter(
                &r,
                "derpd_websocket_accepts_total",
                "DERP connections accepted over WebSocket.",
            ),
            http_requests: counter_vec(
                &r,
                "derpd_http_requests_total",
                "HTTP requests on the main listener, by route and status code.",
                &["route", "code"],
            ),
            http_request_errors: {
                let c = counter_vec(
                    &r,
                    "derpd_http_request_errors_total",
                    "Connections whose first request head was refused or never completed, by reason: head_timeout (slowloris), malformed, too_large, missing_host, bad_content_length, bad_transfer_encoding, unsupported_transfer_encoding.",
                    &["reason"],
                );
                for l in [
                    "head_timeout",
                    "malformed",
                    "too_large",
                    "missing_host",
                    "bad_content_length",
                    "bad_transfer_encoding",
                    "unsupported_transfer_encoding",
                ] {
                    c.with_label_values(&[l]);
                }
                c
            },
            build_info,
            registry: r,
        }
    }

    /// The drop counter for a reason and kind.
    #[inline]
    pub fn dropped(&self, reason: DropReason, disco: bool) -> &PacketCounter {
        &self.dropped[reason as usize][usize::from(disco)]
    }

    /// Counts a connection turned away at accept.
    pub fn connections_rejected(&self, reason: &str) {
        self.connections_rejected.with_label_values(&[reason]).inc();
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures.with_label_values(&[reason]).inc();
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("Prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Exposes [`crate::stun::StunStats`] as Prometheus counters.
pub struct StunCollector {
    stats: std::sync::Arc<crate::stun::StunStats>,
    requests: prometheus::core::Desc,
    families: prometheus::core::Desc,
}

impl StunCollector {
    /// A collector reading `stats`.
    pub fn new(stats: std::sync::Arc<crate::stun::StunStats>) -> StunCollector {
        StunCollector {
            stats,
            requests: prometheus::core::Desc::new(
                "derpd_stun_requests_total".into(),
                "STUN datagrams by result (success, not_stun, read_error, write_error).".into(),
                vec!["result".into()],
                Default::default(),
            )
            .expect("valid metric"),
            families: prometheus::core::Desc::new(
                "derpd_stun_requests_by_family_total".into(),
                "Accepted STUN binding requests by address family.".into(),
                vec!["family".into()],
                Default::default(),
            )
            .expect("valid metric"),
        }
    }
}

impl prometheus::core::Collector for StunCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.requests, &self.families]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto::{Counter, LabelPair, Metric, MetricFamily, MetricType};
        let s = self.stats.snapshot();
        let family = |desc: &prometheus::core::Desc, label: &str, values: &[(&str, u64)]| {
            let mut mf = MetricFamily::default();
            mf.set_name(desc.fq_name.clone());
            mf.set_help(desc.help.clone());
            mf.set_field_type(MetricType::COUNTER);
            for (v, n) in values {
                let mut lp = LabelPair::default();
                lp.set_name(label.to_owned());
                lp.set_value((*v).to_owned());
                let mut c = Counter::default();
                c.set_value(*n as f64);
                let mut m = Metric::default();
                m.set_label(vec![lp]);
                m.set_counter(c);
                mf.mut_metric().push(m);
            }
            mf
        };
        vec![
            family(
                &self.requests,
                "result",
                &[
                    ("success", s.success),
                    ("not_stun", s.not_stun),
                    ("read_error", s.read_error),
                    ("write_error", s.write_error),
                ],
            ),
            family(
                &self.families,
                "family",
                &[("ipv4", s.ipv4), ("ipv6", s.ipv6)],
            ),
        ]
    }
}

/// A metric whose value is read from a closure at scrape time.
pub struct CallbackMetric {
    desc: prometheus::core::Desc,
    counter: bool,
    read: Box<dyn Fn() -> Option<f64> + Send + Sync>,
}

impl CallbackMetric {
    /// A counter (`counter = true`) or gauge named `name`; `read` returning
    /// `None` omits the sample.
    pub fn new(
        name: &str,
        help: &str,
        counter: bool,
        read: impl Fn() -> Option<f64> + Send + Sync + 'static,
    ) -> CallbackMetric {
        CallbackMetric {
            desc: prometheus::core::Desc::new(name.into(), help.into(), vec![], Default::default())
                .expect("valid metric"),
            counter,
            read: Box::new(read),
        }
    }
}

impl prometheus::core::Collector for CallbackMetric {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        use prometheus::proto::{Counter, Gauge, Metric, MetricFamily, MetricType};
        let Some(v) = (self.read)() else {
            return Vec::new();
        };
        let mut mf = MetricFamily::default();
        mf.set_name(self.desc.fq_name.clone());
        mf.set_help(self.desc.help.clone());
        let mut m = Metric::default();
        if self.counter {
            mf.set_field_type(MetricType::COUNTER);
            let mut c = Counter::default();
            c.set_value(v);
            m.set_counter(c);
        } else {
            mf.set_field_type(MetricType::GAUGE);
            let mut g = Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        mf.mut_metric().push(m);
        vec![mf]
    }
}
