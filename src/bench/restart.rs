//! A relay restart seen from its clients (`--restart-pid`, `--restart-to`):
//! `--idle` plain-HTTP clients connect to the relay, the bench sends it
//! SIGTERM, and each client reads its connection until the relay closes it
//! (noting the `Restarting` frame's hints), then redials the other relay at
//! once, as tailscaled does (it ignores the hints and redials when its
//! connection breaks). Reported per second after the SIGTERM: when the
//! connections closed, when the clients were back on the other relay, and
//! when clients that obey the hint (receipt + ReconnectIn) would redial.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::idle::{dial_retrying, DialCounters};
use super::limits::source_addr;
use crate::proto::{Frame, FrameDecoder, NodePrivate, Role};

/// How long clients may take to be back after the SIGTERM.
const LIMIT: Duration = Duration::from_secs(120);

/// What the clients of a restarted relay saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestartReport {
    /// Clients connected to the restarted relay.
    pub clients: usize,
    /// Of those, clients that received a Restarting frame.
    pub told: usize,
    /// Clients back on the other relay.
    pub back: usize,
    /// Smallest, median and largest ReconnectIn received, ms.
    pub reconnect_in_ms: [u32; 3],
    /// Connections closed by the relay, per second after the SIGTERM.
    pub closed_per_sec: Vec<usize>,
    /// Clients back on the other relay (handshake done), per second after
    /// the SIGTERM.
    pub arrived_per_sec: Vec<usize>,
    /// When clients that obey the hint would redial (receipt +
    /// ReconnectIn), per second after the SIGTERM.
    pub hinted_per_sec: Vec<usize>,
    /// Seconds from the SIGTERM to the first and the last arrival.
    pub first_last_arrival_secs: [f64; 2],
    /// Every dial of the run (to both relays).
    pub dials: super::idle::DialStats,
}

#[derive(Default)]
struct Seen {
    reconnect_in_ms: Option<u32>,
    told_at: Option<f64>,
    closed_at: Option<f64>,
    arrived_at: Option<f64>,
    _conn: Option<std::net::TcpStream>,
}

/// Reads frames until the connection ends; the first Restarting frame's
/// ReconnectIn and when it came.
async fn watch(s: std::net::TcpStream) -> (Option<(u32, Instant)>, Instant) {
    let mut hint = None;
    let Ok(mut s) = s
        .set_nonblocking(true)
        .and_then(|_| tokio::net::TcpStream::from_std(s))
    else {
        return (hint, Instant::now());
    };
    let mut dec = FrameDecoder::new(Role::Client);
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(256);
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return (hint, Instant::now()),
            Ok(_) => {}
        }
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(Frame::Restarting {
                    reconnect_in_ms, ..
                })) => {
                    hint.get_or_insert((reconnect_in_ms, Instant::now()));
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return (hint, Instant::now()),
            }
        }
    }
}

fn per_sec(times: impl Iterator<Item = f64>) -> Vec<usize> {
    let mut v = Vec::new();
    for t in times {
        let i = t.max(0.0) as usize;
        if v.len() <= i {
            v.resize(i + 1, 0);
        }
        v[i] += 1;
    }
    v
}

/// Runs the restart: `n` clients on `url`, SIGTERM to `pid`, redial to
/// `to`.
pub async fn run(
    url: &str,
    to: &str,
    pid: u32,
    n: usize,
    parallel: usize,
    sources: usize,
) -> Result<RestartReport, String> {
    let to = to.trim_end_matches('/').trim_end_matches("/derp");
    if url.starts_with("https://") || to.starts_with("https://") {
        return Err("--restart-pid measures plain-HTTP relays (http:// URLs)".into());
    }
    let keys: Vec<NodePrivate> = (0..n).map(|_| NodePrivate::generate()).collect();
    let counters = Arc::new(DialCounters::default());
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut dials = tokio::task::JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let (url, key, counters, sem) =
            (url.to_owned(), key.clone(), counters.clone(), sem.clone());
        dials.spawn(async move {
            let _p = sem.acquire_owned().await;
            let s = dial_retrying(
                &url,
                &key,
                false,
                source_addr(i, sources),
                Instant::now() + LIMIT,
                &counters,
            )
            .await;
            (i, s)
        });
    }
    let mut socks: Vec<Option<std::net::TcpStream>> = (0..n).map(|_| None).collect();
    while let Some(r) = dials.join_next().await {
        let (i, s) = r.map_err(|e| e.to_string())?;
        socks[i] = Some(s?);
    }
    // Settle, then SIGTERM.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut watchers = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for (i, s) in socks.into_iter().enumerate() {
        let s = s.expect("every client connected");
        let (to, key, counters) = (to.to_owned(), keys[i].clone(), counters.clone());
        watchers.spawn(async move {
            let (hint, closed) = watch(s).await;
            // As tailscaled: redial at once when the connection breaks.
            let back = dial_retrying(
                &to,
                &key,
                false,
                source_addr(i, sources),
                t0 + LIMIT,
                &counters,
            )
            .await;
            let secs = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
            Seen {
                reconnect_in_ms: hint.map(|h| h.0),
                told_at: hint.map(|(ms, at)| secs(at) + f64::from(ms) / 1e3),
                closed_at: Some(secs(closed)),
                arrived_at: back.as_ref().ok().map(|_| t0.elapsed().as_secs_f64()),
                // Held until every client is done, as clients that stay.
                _conn: back.ok(),
            }
        });
    }
    // SAFETY: kill(2) with a plain pid and signal number.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
        return Err(format!(
            "SIGTERM to {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut seen = Vec::with_capacity(n);
    while let Some(r) = watchers.join_next().await {
        seen.push(r.map_err(|e| e.to_string())?);
    }
    let mut hints: Vec<u32> = seen.iter().filter_map(|s| s.reconnect_in_ms).collect();
    hints.sort_unstable();
    let mut arrivals: Vec<f64> = seen.iter().filter_map(|s| s.arrived_at).collect();
    arrivals.sort_by(f64::total_cmp);
    Ok(RestartReport {
        clients: n,
        told: hints.len(),
        back: arrivals.len(),
        reconnect_in_ms: if hints.is_empty() {
            [0; 3]
        } else {
            [hints[0], hints[hints.len() / 2], hints[hints.len() - 1]]
        },
        closed_per_sec: per_sec(seen.iter().filter_map(|s| s.closed_at)),
        arrived_per_sec: per_sec(arrivals.iter().copied()),
        hinted_per_sec: per_sec(seen.iter().filter_map(|s| s.told_at)),
        first_last_arrival_secs: [
            arrivals.first().copied().unwrap_or(0.0),
            arrivals.last().copied().unwrap_or(0.0),
        ],
        dials: counters.stats(),
    })
}

impl RestartReport {
    /// The report as text: one line per second after the SIGTERM.
    pub fn table(&self) -> String {
        let mut s = format!(
            "restart: {} clients · {} told (ReconnectIn min/median/max {}/{}/{} ms) · {} back on the other relay, first {:.2} s, last {:.2} s after SIGTERM\n",
            self.clients,
            self.told,
            self.reconnect_in_ms[0],
            self.reconnect_in_ms[1],
            self.reconnect_in_ms[2],
            self.back,
            self.first_last_arrival_secs[0],
            self.first_last_arrival_secs[1],
        );
        s += &format!(
            "  dials {} · failed {} (timed out {}, refused {}, other {}) · last error {:?}\n",
            self.dials.attempts,
            self.dials.failures,
            self.dials.timed_out,
            self.dials.refused,
            self.dials.other,
            self.dials.last_error
        );
        s += "  second | closed | back on peer | would redial by the hint\n";
        let rows = self
            .closed_per_sec
            .len()
            .max(self.arrived_per_sec.len())
            .max(self.hinted_per_sec.len());
        let at = |v: &Vec<usize>, i: usize| v.get(i).copied().unwrap_or(0);
        for i in 0..rows {
            s += &format!(
                "  {:>6} | {:>6} | {:>12} | {:>6}\n",
                format!("{i}–{}", i + 1),
                at(&self.closed_per_sec, i),
                at(&self.arrived_per_sec, i),
                at(&self.hinted_per_sec, i)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_second_buckets() {
        assert_eq!(per_sec([0.1, 0.9, 2.5, 2.0].into_iter()), vec![2, 0, 2]);
        assert!(per_sec(std::iter::empty()).is_empty());
    }
}
