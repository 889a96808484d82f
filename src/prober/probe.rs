//! The prober's vocabulary: the kinds of probe, which probe is which
//! (kind, region and node, or kind, region and ordered node pair), and what
//! one run found.

use std::fmt;
use std::time::{Duration, SystemTime};

/// A kind of probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// TLS handshake and certificate of one node.
    Tls,
    /// STUN over IPv4 to one node.
    Stun4,
    /// STUN over IPv6 to one node.
    Stun6,
    /// DERP handshake and a packet to ourselves through one node.
    Derp,
    /// A packet from a client on one node to a client on another.
    Mesh,
    /// A burst from a client on one node to a client on another.
    Bandwidth,
}

impl Kind {
    /// Every kind, in table order.
    pub const ALL: [Kind; 6] = [
        Kind::Tls,
        Kind::Stun4,
        Kind::Stun6,
        Kind::Derp,
        Kind::Mesh,
        Kind::Bandwidth,
    ];

    /// The `probe` label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Tls => "tls",
            Kind::Stun4 => "stun4",
            Kind::Stun6 => "stun6",
            Kind::Derp => "derp",
            Kind::Mesh => "mesh",
            Kind::Bandwidth => "bandwidth",
        }
    }

    /// Whether it runs between two nodes (labels `from`, `to`) rather than
    /// on one (label `node`).
    pub fn is_pair(self) -> bool {
        matches!(self, Kind::Mesh | Kind::Bandwidth)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One probe: a kind on a node, or on an ordered pair of nodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeId {
    /// The region's label ([`super::map::Region::label`]).
    pub region: String,
    /// The node, or the sending node of a pair.
    pub node: String,
    /// The receiving node of a pair.
    pub to: Option<String>,
    /// What is probed.
    pub kind: Kind,
}

impl ProbeId {
    /// What the table and the status page call the target: `900a` or
    /// `900a->900b`.
    pub fn target(&self) -> String {
        match &self.to {
            Some(to) => format!("{}->{to}", self.node),
            None => self.node.clone(),
        }
    }
}

/// What one run of a probe found.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `Err` holds the reason, as the status page shows it.
    pub result: Result<(), String>,
    /// How long the probed exchange took (the kind says which exchange).
    pub latency: Duration,
    /// The node certificate's end of validity (TLS probes), known even
    /// when verification failed.
    pub cert_not_after: Option<SystemTime>,
    /// Bytes per second (bandwidth probes).
    pub throughput: Option<f64>,
    /// A short note for the table (mapped address, expiry, server key…).
    pub note: String,
}

impl Outcome {
    /// A success after `latency`.
    pub fn ok(latency: Duration) -> Outcome {
        Outcome {
            result: Ok(()),
            latency,
            cert_not_after: None,
            throughput: None,
            note: String::new(),
        }
    }

    /// A failure after `latency`.
    pub fn fail(latency: Duration, why: impl Into<String>) -> Outcome {
        Outcome {
            result: Err(why.into()),
            ..Outcome::ok(latency)
        }
    }

    /// Adds a note.
    pub fn with_note(mut self, note: impl Into<String>) -> Outcome {
        self.note = note.into();
        self
    }

    /// Whether it succeeded.
    pub fn is_ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// Runs `probe` for at most `limit`; past it the run fails saying so.
pub async fn within<F>(limit: Duration, probe: F) -> Outcome
where
    F: std::future::Future<Output = Outcome>,
{
    let start = tokio::time::Instant::now();
    match tokio::time::timeout(limit, probe).await {
        Ok(o) => o,
        Err(_) => Outcome::fail(start.elapsed(), format!("timed out after {limit:?}")),
    }
}
