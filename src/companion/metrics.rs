//! The companion's metrics, registered in the relay's registry.

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use super::headscale::FetchError;
use super::model::{now_ms, Cache};
use super::reason::{Reason, SyncCause};
use crate::metrics::CallbackMetric;

/// Counters of the companion.
pub struct CompanionMetrics {
    /// Sync attempts against headscale.
    pub sync_attempts: IntCounter,
    sync_failures: IntCounterVec,
    decisions: IntCounterVec,
    replications: IntCounterVec,
    verify_requests: IntCounterVec,
    refreshes: IntCounterVec,
    misses: IntCounterVec,
    shrinks_held: IntCounter,
    shrink_holding: prometheus::IntGauge,
}

fn vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl CompanionMetrics {
    /// Registers every companion metric in `r`; the cache gauges read `cache`.
    pub fn register(r: &Registry, cache: Arc<Cache>) -> CompanionMetrics {
        let sync_attempts = IntCounter::new(
            "derpd_companion_sync_attempts_total",
            "Node-list fetches attempted against headscale.",
        )
        .expect("valid metric");
        r.register(Box::new(sync_attempts.clone()))
            .expect("unique metric");
        let sync_failures = vec(
            r,
            "derpd_companion_sync_failures_total",
            "Failed headscale syncs, by reason (auth = the API key was rejected).",
            &["reason"],
        );
        for l in FetchError::LABELS {
            sync_failures.with_label_values(&[l]);
        }
        let decisions = vec(
            r,
            "derpd_admission_decisions_total",
            "Admission decisions on new DERP clients, by result and reason.",
            &["result", "reason"],
        );
        // Export the family from the start, so dashboards and alerts see zeros.
        for (result, reason) in [
            ("allow", Reason::Known),
            ("deny", Reason::Unknown),
            ("deny", Reason::Expired),
            ("deny", Reason::NotAllowed),
        ] {
            decisions.with_label_values(&[result, reason.label()]);
        }
        let replications = vec(
            r,
            "derpd_companion_snapshot_replications_total",
            "Snapshot replication between relays: direction served|fetched, result.",
            &["direction", "result"],
        );
        let verify_requests = vec(
            r,
            "derpd_companion_verify_requests_total",
            "POST /verify answers, by result (allow, deny, bad_request).",
            &["result"],
        );
        let refreshes = vec(
            r,
            "derpd_companion_refreshes_total",
            "Node-list fetches from headscale, by cause: poll (the interval) or miss (an unknown key asked for one).",
            &["cause"],
        );
        for cause in SyncCause::ALL {
            refreshes.with_label_values(&[cause.label()]);
        }
        let misses = vec(
            r,
            "derpd_companion_misses_total",
            "Admission checks of keys the cache did not know, by what became of them after the refresh: admitted or refused.",
            &["result"],
        );
        for result in ["admitted", "refused"] {
            misses.with_label_values(&[result]);
        }
        let shrinks_held = IntCounter::new(
            "derpd_companion_shrink_held_total",
            "headscale answers not applied because they would shrink the cache sharply (held until confirmed).",
        )
        .expect("valid metric");
        r.register(Box::new(shrinks_held.clone()))
            .expect("unique metric");
        let shrink_holding = prometheus::IntGauge::new(
            "derpd_companion_shrink_holding",
            "1 while a sharply shrunk node list from headscale is held back awaiting confirmation.",
        )
        .expect("valid metric");
        r.register(Box::new(shrink_holding.clone()))
            .expect("unique metric");
        for (direction, result) in [
            ("served", "ok"),
            ("served", "denied"),
            ("fetched", "installed"),
            ("fetched", "error"),
        ] {
            replications.with_label_values(&[direction, result]);
        }
        for result in ["allow", "deny", "bad_request"] {
            verify_requests.with_label_values(&[result]);
        }
        let (c1, c2) = (cache.clone(), cache);
        for m in [
            CallbackMetric::new(
                "derpd_companion_cache_age_seconds",
                "Seconds since the cached snapshot was fetched from headscale (absent before the first load).",
                false,
                move || {
                    let v = c1.view()?;
                    Some((now_ms() - v.snapshot.fetched_at_ms as i64).max(0) as f64 / 1000.0)
                },
            ),
            CallbackMetric::new(
                "derpd_companion_nodes_cached",
                "Nodes in the cached snapshot.",
                false,
                move || Some(c2.view().map_or(0, |v| v.len()) as f64),
            ),
        ] {
            r.register(Box::new(m)).expect("unique metric");
        }
        CompanionMetrics {
            sync_attempts,
            sync_failures,
            decisions,
            replications,
            verify_requests,
            refreshes,
            misses,
            shrinks_held,
            shrink_holding,
        }
    }

    /// Counts a held shrink.
    pub fn shrink_held(&self) {
        self.shrinks_held.inc();
    }

    /// Whether a shrink is being held now.
    pub fn shrink_holding(&self, holding: bool) {
        self.shrink_holding.set(i64::from(holding));
    }

    /// Counts a node-list fetch and its cause.
    pub fn refresh(&self, cause: SyncCause) {
        self.refreshes.with_label_values(&[cause.label()]).inc();
    }

    /// Counts a miss and whether it was admitted after the refresh.
    pub fn miss(&self, admitted: bool) {
        let result = if admitted { "admitted" } else { "refused" };
        self.misses.with_label_values(&[result]).inc();
    }

    /// Counts a failed sync.
    pub fn sync_failed(&self, e: &FetchError) {
        self.sync_failures.with_label_values(&[e.label()]).inc();
    }

    /// Counts an admission decision.
    pub fn decision(&self, allow: bool, reason: Reason) {
        let result = if allow { "allow" } else { "deny" };
        self.decisions
            .with_label_values(&[result, reason.label()])
            .inc();
    }

    /// Counts a replication event.
    pub fn replication(&self, direction: &str, result: &str) {
        self.replications
            .with_label_values(&[direction, result])
            .inc();
    }

    /// Counts a `/verify` answer.
    pub fn verify(&self, result: &str) {
        self.verify_requests.with_label_values(&[result]).inc();
    }
}
