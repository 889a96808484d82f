//! The prober's Prometheus metrics, all defined here. Node probes carry
//! the labels `probe`, `region`, `node`; pair probes (mesh, bandwidth)
//! carry `probe`, `region`, `from`, `to`.

use std::time::SystemTime;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use super::probe::{Outcome, ProbeId};

/// Every prober metric.
pub struct ProberMetrics {
    registry: Registry,
    node_success: GaugeVec,
    node_latency: GaugeVec,
    node_runs: IntCounterVec,
    pair_success: GaugeVec,
    pair_latency: GaugeVec,
    pair_runs: IntCounterVec,
    duration: HistogramVec,
    cert_expiry: GaugeVec,
    bandwidth: GaugeVec,
    last_run: GaugeVec,
}

const NODE: &[&str] = &["probe", "region", "node"];
const PAIR: &[&str] = &["probe", "region", "from", "to"];

impl ProberMetrics {
    /// Registers every metric in a registry of its own.
    pub fn new() -> ProberMetrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let with_result = |l: &[&'static str]| -> Vec<&'static str> { [l, &["result"]].concat() };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "derpd_prober_probe_duration_seconds",
                "How long probe runs took, successful or not, by kind.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["probe"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        ProberMetrics {
            node_success: gauge(
                "derpd_prober_node_success",
                "1 if the last run of this probe of a node succeeded, else 0.",
                NODE,
            ),
            node_latency: gauge(
                "derpd_prober_node_latency_seconds",
                "Latency of the last successful run: the TLS handshake, the STUN \
                 round trip, or the DERP connection plus a packet to itself.",
                NODE,
            ),
            node_runs: counter(
                "derpd_prober_node_probes_total",
                "Runs of a node probe by result (ok, fail).",
                &with_result(NODE),
            ),
            pair_success: gauge(
                "derpd_prober_pair_success",
                "1 if the last run of this probe between two nodes of a region \
                 succeeded, else 0.",
                PAIR,
            ),
            pair_latency: gauge(
                "derpd_prober_pair_latency_seconds",
                "Mesh: round trip from a client on `from` to a client on `to` and \
                 back; bandwidth: time for the whole burst.",
                PAIR,
            ),
            pair_runs: counter(
                "derpd_prober_pair_probes_total",
                "Runs of a pair probe by result (ok, fail).",
                &with_result(PAIR),
            ),
            cert_expiry: gauge(
                "derpd_prober_cert_expiry_timestamp_seconds",
                "When the node's TLS certificate expires (Unix time), as last seen.",
                &["region", "node"],
            ),
            bandwidth: gauge(
                "derpd_prober_bandwidth_bytes_per_second",
                "Throughput of the last successful burst from `from` to `to`.",
                &["region", "from", "to"],
            ),
            last_run: gauge(
                "derpd_prober_last_run_timestamp_seconds",
                "When a probe of this kind last finished (Unix time).",
                &["probe"],
            ),
            duration,
            registry,
        }
    }

    /// Records one run.
    pub fn record(&self, id: &ProbeId, o: &Outcome) {
        let kind = id.kind.label();
        let result = if o.is_ok() { "ok" } else { "fail" };
        let ok = if o.is_ok() { 1.0 } else { 0.0 };
        let secs = o.latency.as_secs_f64();
        match &id.to {
            None => {
                let l = [kind, &id.region, &id.node];
                self.node_success.with_label_values(&l).set(ok);
                if o.is_ok() {
                    self.node_latency.with_label_values(&l).set(secs);
                }
                self.node_runs
                    .with_label_values(&[kind, &id.region, &id.node, result])
                    .inc();
            }
            Some(to) => {
                let l = [kind, &id.region, &id.node, to];
                self.pair_success.with_label_values(&l).set(ok);
                if o.is_ok() {
                    self.pair_latency.with_label_values(&l).set(secs);
                }
                self.pair_runs
                    .with_label_values(&[kind, &id.region, &id.node, to, result])
                    .inc();
                if let Some(bps) = o.throughput {
                    self.bandwidth
                        .with_label_values(&[&id.region, &id.node, to])
                        .set(bps);
                }
            }
        }
        if let Some(t) = o.cert_not_after {
            self.cert_expiry
                .with_label_values(&[&id.region, &id.node])
                .set(unix(t));
        }
        self.duration.with_label_values(&[kind]).observe(secs);
        self.last_run
            .with_label_values(&[kind])
            .set(unix(SystemTime::now()));
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("utf-8")
    }
}

impl Default for ProberMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prober::probe::Kind;
    use std::time::Duration;

    #[test]
    fn node_and_pair_runs_are_labelled() {
        let m = ProberMetrics::new();
        let node = ProbeId {
            region: "dev".into(),
            node: "a".into(),
            to: None,
            kind: Kind::Tls,
        };
        let mut ok = Outcome::ok(Duration::from_millis(2));
        ok.cert_not_after = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000));
        m.record(&node, &ok);
        let pair = ProbeId {
            to: Some("b".into()),
            kind: Kind::Mesh,
            ..node.clone()
        };
        m.record(&pair, &Outcome::fail(Duration::from_secs(1), "lost"));
        let text = m.render();
        for want in [
            "derpd_prober_node_success{node=\"a\",probe=\"tls\",region=\"dev\"} 1",
            "derpd_prober_node_latency_seconds{node=\"a\",probe=\"tls\",region=\"dev\"} 0.002",
            "derpd_prober_node_probes_total{node=\"a\",probe=\"tls\",region=\"dev\",result=\"ok\"} 1",
            "derpd_prober_cert_expiry_timestamp_seconds{node=\"a\",region=\"dev\"} 2000000000",
            "derpd_prober_pair_success{from=\"a\",probe=\"mesh\",region=\"dev\",to=\"b\"} 0",
            "derpd_prober_pair_probes_total{from=\"a\",probe=\"mesh\",region=\"dev\",result=\"fail\",to=\"b\"} 1",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert!(
            !text.contains("derpd_prober_pair_latency_seconds{"),
            "{text}"
        );
    }
}
