//! Which probes exist for a DERP map and when they run. Every node gets
//! TLS, DERP and STUN probes (STUN-only nodes just STUN; IPv6 STUN where the
//! map gives a fixed IPv6), every ordered pair of DERP nodes in a region
//! gets a mesh probe (and a bandwidth probe when asked). Running forever,
//! the probes of one kind are spread evenly over their interval so they do
//! not fire together; `--once` runs all of them a few at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::dial::{TlsConfigs, Want};
use super::map::{DerpMap, Family, Node};
use super::probe::{within, Kind, Outcome, ProbeId};
use super::settings::{Cadence, ProberConfig};
use super::{bandwidth, derp, mesh, stun, tls};

/// Probes run at the same time by `--once`.
pub const ONCE_CONCURRENCY: usize = 16;
/// Extra time past a probe's own timeout before it is cut off regardless.
const GRACE: Duration = Duration::from_secs(1);

/// What a probe does.
#[derive(Debug, Clone)]
pub enum Job {
    /// TLS handshake and certificate.
    Tls(Node),
    /// STUN binding to a port over one family.
    Stun(Node, u16, Want),
    /// DERP connection and a packet to itself.
    Derp(Node),
    /// A packet from a client on the first node to one on the second.
    Mesh(Node, Node),
    /// A burst of this many bytes from the first node to the second.
    Bandwidth(Node, Node, usize),
}

/// A probe with its schedule.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Which probe.
    pub id: ProbeId,
    /// What it does.
    pub job: Job,
    /// How often and for how long.
    pub cadence: Cadence,
}

/// Every probe `config` asks for on `map`.
pub fn plan(map: &DerpMap, config: &ProberConfig) -> Vec<Planned> {
    let mut out = Vec::new();
    for region in &map.regions {
        let label = region.label();
        let mut add = |kind: Kind, node: &Node, to: Option<&Node>, job: Job| {
            if let Some(cadence) = config.cadence(kind) {
                out.push(Planned {
                    id: ProbeId {
                        region: label.clone(),
                        node: node.name.clone(),
                        to: to.map(|n| n.name.clone()),
                        kind,
                    },
                    job,
                    cadence,
                });
            }
        };
        for n in &region.nodes {
            if !n.stun_only {
                // Plain-HTTP lab nodes have no certificate to check.
                if !n.insecure_for_tests {
                    add(Kind::Tls, n, None, Job::Tls(n.clone()));
                }
                add(Kind::Derp, n, None, Job::Derp(n.clone()));
            }
            if let Some(port) = n.stun_port {
                if n.ipv4 != Family::Off {
                    add(Kind::Stun4, n, None, Job::Stun(n.clone(), port, Want::V4));
                }
                if matches!(n.ipv6, Family::Fixed(_)) {
                    add(Kind::Stun6, n, None, Job::Stun(n.clone(), port, Want::V6));
                }
            }
        }
        let derp: Vec<&Node> = region.nodes.iter().filter(|n| !n.stun_only).collect();
        for a in &derp {
            for b in &derp {
                if a.name == b.name {
                    continue;
                }
                add(
                    Kind::Mesh,
                    a,
                    Some(b),
                    Job::Mesh((*a).clone(), (*b).clone()),
                );
                add(
                    Kind::Bandwidth,
                    a,
                    Some(b),
                    Job::Bandwidth((*a).clone(), (*b).clone(), config.bw_size),
                );
            }
        }
    }
    out
}

/// Runs one probe once, bounded by its timeout.
pub async fn run(p: &Planned, tls_configs: &TlsConfigs) -> Outcome {
    let t = p.cadence.timeout;
    let job = async {
        match &p.job {
            Job::Tls(n) => within(t, tls::probe(n, tls_configs)).await,
            Job::Stun(n, port, want) => stun::probe(n, *port, *want, t).await,
            Job::Derp(n) => derp::probe(n, tls_configs, t).await,
            Job::Mesh(a, b) => mesh::probe(a, b, tls_configs, t).await,
            Job::Bandwidth(a, b, size) => bandwidth::probe(a, b, tls_configs, *size, t).await,
        }
    };
    within(t + GRACE, job).await
}

/// Where results go.
pub type Sink = Arc<dyn Fn(&ProbeId, &Outcome) + Send + Sync>;

/// Runs every probe once, [`ONCE_CONCURRENCY`] at a time.
pub async fn run_once(plan: Vec<Planned>, tls_configs: TlsConfigs, sink: Sink) {
    let slots = Arc::new(Semaphore::new(ONCE_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for p in plan {
        let (slots, tls_configs, sink) = (slots.clone(), tls_configs.clone(), sink.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await.expect("never closed");
            let o = run(&p, &tls_configs).await;
            sink(&p.id, &o);
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Runs every probe at its interval until `stop`; the probes of one kind
/// start spread evenly over one interval.
pub async fn run_forever(
    plan: Vec<Planned>,
    tls_configs: TlsConfigs,
    sink: Sink,
    stop: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    for kind in Kind::ALL {
        let of_kind: Vec<Planned> = plan.iter().filter(|p| p.id.kind == kind).cloned().collect();
        let n = of_kind.len() as u32;
        for (i, p) in of_kind.into_iter().enumerate() {
            let offset = p.cadence.interval * i as u32 / n.max(1);
            let (tls_configs, sink, stop) = (tls_configs.clone(), sink.clone(), stop.clone());
            tasks.spawn(async move {
                let first = tokio::time::Instant::now() + offset;
                let mut tick = tokio::time::interval_at(first, p.cadence.interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let o = tokio::select! {
                        _ = stop.cancelled() => return,
                        o = run(&p, &tls_configs) => o,
                    };
                    if let Err(e) = &o.result {
                        tracing::debug!(probe = %p.id.kind, target = %p.id.target(), error = %e, "probe failed");
                    }
                    sink(&p.id, &o);
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prober::map;
    use crate::prober::settings::ProberArgs;

    #[test]
    fn plan_covers_nodes_and_ordered_pairs() {
        let json = br#"{"Regions": {"900": {"RegionID": 900, "RegionCode": "dev", "Nodes": [
            {"Name": "a", "HostName": "a.test", "IPv4": "127.0.0.1", "IPv6": "::1"},
            {"Name": "b", "HostName": "b.test", "STUNPort": -1},
            {"Name": "c", "HostName": "c.test", "IPv4": "none", "InsecureForTests": true},
            {"Name": "s", "HostName": "s.test", "STUNOnly": true}
        ]}}}"#;
        let m = map::merge(vec![map::parse(json).unwrap()], &[]).unwrap();
        let args = ProberArgs {
            derp_maps: vec!["x".into()],
            ..Default::default()
        };
        let p = plan(&m, &args.resolve().unwrap());
        let mut names: Vec<String> = p
            .iter()
            .map(|p| format!("{} {}", p.id.target(), p.id.kind))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "a derp",
                "a stun4",
                "a stun6",
                "a tls",
                "a->b mesh",
                "a->c mesh",
                "b derp",
                "b tls",
                "b->a mesh",
                "b->c mesh",
                "c derp",
                "c->a mesh",
                "c->b mesh",
                "s stun4",
            ]
        );
    }
}
