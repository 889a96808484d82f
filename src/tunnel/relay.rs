//! The relay connection: dial the first reachable relay in failover order,
//! carry frames both ways, ping it, and redial when it goes away, with
//! exponential backoff and jitter. A `Restarting` frame's hints are obeyed
//! (wait, then keep trying that relay for a while). While on a fallback
//! relay, the preferred ones are retried now and then and taken back as
//! soon as one answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::derpmap::{self, RelayTarget};
use super::forward::{Batch, Inbound};
use super::metrics::{DropReason, TunnelMetrics};
use super::settings::RelaySources;
use crate::client::{self, ClientError, DynClient};
use crate::proto::{ClientInfo, Frame, NodePrivate};

/// Longest a dial plus handshake may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// First delay after every relay failed; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between rounds of dialing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A connection that lived this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// Caps on a relay's Restarting hints (they come from the network).
const MAX_RECONNECT_IN: Duration = Duration::from_secs(60);
const MAX_TRY_FOR: Duration = Duration::from_secs(600);
/// Most frame batches written with one vectored write.
const MAX_BATCHES_PER_WRITE: usize = 256;
/// Most bytes of a relay's Health text that are logged.
const MAX_HEALTH_LOGGED: usize = 256;
/// Relay packets decoded before delivery is flushed anyway.
const MAX_PENDING_INBOUND: usize = 1024;

/// Exponential backoff with jitter: each delay is the nominal one times a
/// random factor in [0.5, 1.5).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// Starts at [`MIN_BACKOFF`].
    pub fn new() -> Backoff {
        Backoff { next: MIN_BACKOFF }
    }

    /// The next delay (jittered); doubles the nominal one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next.mul_f64(0.5 + fastrand::f64());
        self.next = (self.next * 2).min(MAX_BACKOFF);
        d
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Settings of the relay connection.
pub struct RelaySettings {
    /// Our key.
    pub key: NodePrivate,
    /// Where relays come from.
    pub sources: RelaySources,
    /// Skip TLS verification for every relay.
    pub insecure: bool,
    /// Ping interval; silence for twice this drops the connection.
    pub keepalive: Duration,
    /// Fail-back interval while on a fallback relay.
    pub failback: Option<Duration>,
}

/// How a session with one relay ended.
enum End {
    Stopped,
    Lost {
        why: String,
        /// A Restarting frame's hints: when to redial (the delay counts
        /// from the frame's arrival, not from the connection's end), and
        /// how long to keep trying.
        restart: Option<(Instant, Duration)>,
    },
    Failback(usize, DynClient),
}

/// The relay side of a running tunnel.
pub struct RelayLoop {
    settings: RelaySettings,
    metrics: Arc<TunnelMetrics>,
    inbound: Inbound,
    outq: mpsc::Receiver<Batch>,
    stop: CancellationToken,
    targets: Vec<RelayTarget>,
    map_targets: Vec<RelayTarget>,
}

impl RelayLoop {
    /// A loop that carries `outq` to the relay and relay packets to `inbound`.
    pub fn new(
        settings: RelaySettings,
        metrics: Arc<TunnelMetrics>,
        inbound: Inbound,
        outq: mpsc::Receiver<Batch>,
        stop: CancellationToken,
    ) -> RelayLoop {
        RelayLoop {
            settings,
            metrics,
            inbound,
            outq,
            stop,
            targets: Vec::new(),
            map_targets: Vec::new(),
        }
    }

    /// Runs until `stop`.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut connections = 0u64;
        while !self.stop.is_cancelled() {
            self.refresh_targets().await;
            let Some((mut idx, mut client)) = self.first_reachable(self.targets.len()).await else {
                let d = backoff.next_delay();
                tracing::warn!(retry_in = ?d, "no relay reachable");
                if !self.drain_for(d).await {
                    return;
                }
                continue;
            };
            loop {
                let name = self.targets[idx].name.clone();
                connections += 1;
                if connections > 1 {
                    self.metrics.reconnects.inc();
                }
                self.metrics.set_relay(Some(&name));
                tracing::info!(relay = %name, server_key = %client.server_key(), "using relay");
                let started = Instant::now();
                let end = self.session(client, idx).await;
                self.metrics.set_relay(None);
                if started.elapsed() >= STABLE {
                    backoff.reset();
                }
                match end {
                    End::Stopped => return,
                    End::Failback(j, c) => {
                        tracing::info!(from = %name, to = %self.targets[j].name, "preferred relay is back; moving");
                        (idx, client) = (j, c);
                    }
                    End::Lost { why, restart } => {
                        tracing::warn!(relay = %name, reason = %why, "relay connection lost");
                        let Some((at, try_for)) = restart else {
                            break;
                        };
                        let wait = at.saturating_duration_since(Instant::now());
                        match self.after_restart(idx, wait, try_for).await {
                            Some(c) => client = c,
                            None => break,
                        }
                    }
                }
            }
            let d = backoff.next_delay();
            if !self.drain_for(d).await {
                return;
            }
        }
    }

    /// Rebuilds the relay list: `--server` URLs, then the DERP map's nodes
    /// (the previous map is kept if it cannot be read now).
    async fn refresh_targets(&mut self) {
        let src = &self.settings.sources;
        if let Some(map) = &src.derp_map {
            match derpmap::load(map, &src.regions).await {
                Ok(t) => self.map_targets = t,
                Err(e) => tracing::warn!(error = %e, "DERP map unreadable; keeping the last one"),
            }
        }
        self.targets = src
            .servers
            .iter()
            .map(|u| RelayTarget::from_url(u))
            .chain(self.map_targets.iter().cloned())
            .collect();
    }

    /// Dials the first `n` targets in order; the first that answers wins.
    async fn first_reachable(&mut self, n: usize) -> Option<(usize, DynClient)> {
        for i in 0..n.min(self.targets.len()) {
            let t = self.targets[i].clone();
            match self.dial_draining(&t).await {
                Some(Ok(c)) => return Some((i, c)),
                Some(Err(e)) => {
                    self.metrics.connect_errors.inc();
                    tracing::warn!(relay = %t.name, error = %e, "relay unreachable");
                }
                None => return None,
            }
        }
        None
    }

    /// Dials `t` while local datagrams (which have nowhere to go) are
    /// dropped and counted. `None` if stopped meanwhile.
    async fn dial_draining(&mut self, t: &RelayTarget) -> Option<Result<DynClient, String>> {
        let dial = dial(&self.settings, t);
        tokio::pin!(dial);
        loop {
            tokio::select! {
                r = &mut dial => return Some(r),
                _ = self.stop.cancelled() => return None,
                b = self.outq.recv() => match b {
                    Some(b) => self.metrics.count_drop(DropReason::NoRelay, b.packets),
                    None => return None,
                },
            }
        }
    }

    /// Waits `d`, dropping (and counting) local datagrams. False if stopped.
    async fn drain_for(&mut self, d: Duration) -> bool {
        let sleep = tokio::time::sleep(d);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return true,
                _ = self.stop.cancelled() => return false,
                b = self.outq.recv() => match b {
                    Some(b) => self.metrics.count_drop(DropReason::NoRelay, b.packets),
                    None => return false,
                },
            }
        }
    }

    /// After a Restarting frame: wait as asked, then keep trying the same
    /// relay for as long as asked.
    async fn after_restart(
        &mut self,
        idx: usize,
        wait: Duration,
        try_for: Duration,
    ) -> Option<DynClient> {
        let t = self.targets[idx].clone();
        tracing::info!(relay = %t.name, reconnect_in = ?wait, try_for = ?try_for, "relay restarting");
        if !self.drain_for(wait).await {
            return None;
        }
        let deadline = Instant::now() + try_for;
        let mut backoff = Backoff::new();
        loop {
            match self.dial_draining(&t).await? {
                Ok(c) => return Some(c),
                Err(e) => {
                    self.metrics.connect_errors.inc();
                    tracing::debug!(relay = %t.name, error = %e, "restarting relay not back yet");
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            let d = backoff.next_delay().min(Duration::from_secs(1));
            if !self.drain_for(d).await {
                return None;
            }
        }
    }

    /// Carries frames over `client` until it fails, we stop, or a more
    /// preferred relay answers.
    async fn session(&mut self, client: DynClient, idx: usize) -> End {
        let (mut reader, mut writer) = client.into_split();
        let RelayLoop {
            settings,
            metrics,
            inbound,
            outq,
            stop,
            targets,
            ..
        } = self;
        let keepalive = settings.keepalive;
        let epoch = Instant::now();
        let last_rx = AtomicU64::new(0);
        let (pong_tx, mut pong_rx) = mpsc::channel::<[u8; 8]>(8);
        let mut restart: Option<(Instant, Duration)> = None;

        // Each half runs until it fails, and says why.
        let read = async {
            loop {
                let f = match reader.recv().await {
                    Ok(f) => f,
                    Err(e) => return describe(e),
                };
                last_rx.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                handle(f, inbound, &pong_tx, &mut restart);
                loop {
                    match reader.try_recv_buffered() {
                        Ok(Some(f)) => handle(f, inbound, &pong_tx, &mut restart),
                        Ok(None) => break,
                        Err(e) => return describe(e),
                    }
                    if inbound.pending() >= MAX_PENDING_INBOUND {
                        inbound.flush().await;
                    }
                }
                inbound.flush().await;
            }
        };

        let write_timeout = (keepalive * 2).max(Duration::from_secs(5));
        let write = async {
            let mut ping = tokio::time::interval(keepalive);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping.tick().await;
            let mut bufs: Vec<Bytes> = Vec::new();
            loop {
                let r = tokio::select! {
                    b = outq.recv() => {
                        let Some(b) = b else { return "stopping".to_owned() };
                        bufs.push(b.frames);
                        while bufs.len() < MAX_BATCHES_PER_WRITE {
                            match outq.try_recv() {
                                Ok(b) => bufs.push(b.frames),
                                Err(_) => break,
                            }
                        }
                        metrics.relay_writes.inc();
                        timed(write_timeout, writer.write_encoded(&mut bufs)).await
                    }
                    Some(data) = pong_rx.recv() => {
                        writer.queue(&Frame::Pong(data));
                        timed(write_timeout, writer.flush()).await
                    }
                    _ = ping.tick() => {
                        let heard = Duration::from_millis(last_rx.load(Ordering::Relaxed));
                        let silent = epoch.elapsed().saturating_sub(heard);
                        if silent > keepalive * 2 {
                            return format!("relay silent for {silent:?}");
                        }
                        writer.queue(&Frame::Ping(fastrand::u64(..).to_be_bytes()));
                        timed(write_timeout, writer.flush()).await
                    }
                };
                if let Err(e) = r {
                    return e;
                }
            }
        };

        let failback = async {
            let Some(every) = settings.failback.filter(|_| idx > 0) else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(every).await;
                for (j, t) in targets[..idx].iter().enumerate() {
                    if let Ok(c) = dial(settings, t).await {
                        return (j, c);
                    }
                }
            }
        };

        let end = tokio::select! {
            why = read => End::Lost { why, restart: None },
            why = write => End::Lost { why, restart: None },
            (j, c) = failback => End::Failback(j, c),
            _ = stop.cancelled() => End::Stopped,
        };
        match end {
            End::Lost { why, .. } => End::Lost { why, restart },
            other => other,
        }
    }
}

fn handle(
    f: Frame,
    inbound: &mut Inbound,
    pong_tx: &mpsc::Sender<[u8; 8]>,
    restart: &mut Option<(Instant, Duration)>,
) {
    match f {
        Frame::RecvPacket { src, payload } => inbound.packet(&src, &payload),
        Frame::Ping(data) => {
            // At most a few outstanding; a flood of pings is not answered.
            let _ = pong_tx.try_send(data);
        }
        Frame::Restarting {
            reconnect_in_ms,
            try_for_ms,
        } => {
            // A relay spreading its restart keeps serving until the time
            // it names, then closes: the wait counts from now.
            *restart = Some((
                Instant::now()
                    + Duration::from_millis(reconnect_in_ms.into()).min(MAX_RECONNECT_IN),
                Duration::from_millis(try_for_ms.into()).min(MAX_TRY_FOR),
            ));
        }
        Frame::Health(text) if !text.is_empty() => {
            let text = String::from_utf8_lossy(&text[..text.len().min(MAX_HEALTH_LOGGED)]);
            tracing::warn!(problem = %text, "relay reports a health problem");
        }
        Frame::PeerGone { key, reason } => {
            tracing::debug!(peer = %key, ?reason, "relay says peer is gone");
        }
        _ => {}
    }
}

fn describe(e: ClientError) -> String {
    e.to_string()
}

async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(describe),
        Err(_) => Err(format!("write blocked for {limit:?}")),
    }
}

async fn dial(s: &RelaySettings, t: &RelayTarget) -> Result<DynClient, String> {
    let info = ClientInfo {
        can_ack_pings: true,
        app_name: Some("derpd-tunnel".into()),
        ..ClientInfo::default()
    };
    let fut = client::dial_via(&t.url, t.connect_to, &s.key, s.insecure || t.insecure, info);
    match tokio::time::timeout(DIAL_TIMEOUT, fut).await {
        Ok(r) => r.map_err(describe),
        Err(_) => Err(format!("no handshake within {DIAL_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(
            first >= MIN_BACKOFF / 2 && first < MIN_BACKOFF * 3 / 2,
            "{first:?}"
        );
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d < MAX_BACKOFF * 3 / 2, "{d:?}");
        }
        let late = b.next_delay();
        assert!(late >= MAX_BACKOFF / 2, "{late:?}");
        b.reset();
        assert!(b.next_delay() < MIN_BACKOFF * 3 / 2);
    }
}
