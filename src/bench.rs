//! `derpd bench`: a load generator that is a plain DERP client, so it
//! measures any DERP server. N sender→receiver pairs exchange packets that
//! carry a sequence number and a send timestamp; receivers compute one-way
//! latency (sender and receiver share this process's monotonic clock).
//!
//! Closed loop (`--window W`): each pair keeps at most W packets in flight,
//! so throughput is measured without loss. Open loop (`--rate PPS`): each
//! pair sends at a fixed rate, for latency under a known load.
//!
//! Every payload names its intended receiver (a prefix of its public key)
//! and receivers count packets meant for someone else (`wrong_key`, must be
//! zero). `--churn-rate N` adds short-lived clients connecting and leaving
//! at N per second alongside the pairs (`churn`); with `--server-pid`
//! the server's RSS and FD count are sampled at start, max and end
//! ([`sample`]) — together a soak test.
//!
//! Many clients (issue 14): `--idle N` holds N idle clients, each reduced
//! to its bare socket after the handshake ([`idle`]), and reports the
//! relay's memory and CPU per idle client and its handshake rate;
//! `--source-addrs N` spreads them over loopback source addresses (one
//! address has only ~28k ephemeral ports). The run checks up front that it
//! fits the file-descriptor limits of the bench and the relay and the
//! ephemeral ports ([`limits`]). `--storm` drops all idle clients at once
//! halfway through `--duration` and redials them all with backoff while the
//! pairs keep relaying: the pairs' figures before the storm (the steady
//! window) and during it (the storm window) are reported separately.

mod churn;
pub mod idle;
pub mod limits;
pub mod restart;
pub mod sample;

pub use churn::ChurnReport;
pub use idle::DialStats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::client::{dial, DynClient};
use crate::proto::{Frame, NodePrivate, NodePublic};

/// Bytes at the start of each payload: sequence number, send time and
/// the first [`TAG_LEN`] bytes of the intended receiver's public key.
const STAMP_LEN: usize = 16 + TAG_LEN;
/// Receiver key bytes carried in each payload.
const TAG_LEN: usize = 8;

/// Writes the stamp (sequence, send time, receiver tag) at the start of
/// `buf`, which must hold [`STAMP_LEN`] bytes; returns the send time.
fn stamp_payload(buf: &mut [u8], seq: u64, dst: &NodePublic) -> u64 {
    let now = clock();
    buf[..8].copy_from_slice(&seq.to_be_bytes());
    buf[8..16].copy_from_slice(&now.to_be_bytes());
    buf[16..STAMP_LEN].copy_from_slice(&dst.0[..TAG_LEN]);
    now
}

/// Whether a received payload names `me` as its receiver.
fn tag_matches(payload: &[u8], me: &NodePublic) -> bool {
    payload.get(16..STAMP_LEN) == Some(&me.0[..TAG_LEN])
}

/// Deliveries that went to the wrong place.
#[derive(Debug, Default)]
struct WrongKeys {
    /// Packets whose payload names a different receiver.
    wrong_key: AtomicU64,
    /// Packets for us but from a sender we did not expect.
    wrong_src: AtomicU64,
}

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Relay URL: http://host:port or https://host:port
    pub url: String,
    /// Sender→receiver pairs.
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// Payload bytes per packet (at least 24).
    #[arg(long, default_value_t = 1200)]
    pub size: usize,
    /// Measured duration (after a warm-up of a tenth of it, at most 1 s).
    /// With `--storm` the first half is the steady window and the storm
    /// starts halfway; the run then lasts until every idle client is back
    /// plus 1 s, or this long, whichever is longer.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Closed loop: at most this many packets in flight per pair.
    #[arg(long)]
    pub window: Option<usize>,
    /// Open loop: packets per second per pair.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Extra idle clients to hold connected during the run.
    #[arg(long, default_value_t = 0)]
    pub idle: usize,
    /// Idle clients connecting at once (also when redialing in a storm).
    #[arg(long, default_value_t = 64)]
    pub idle_parallel: usize,
    /// Loopback source addresses for the idle clients: they bind
    /// round-robin to 127.0.0.2 … 127.0.0.(N+1), each with its own
    /// ephemeral ports (~28k). 1: no binding, the kernel's choice. More
    /// than 1 needs a relay on IPv4 loopback.
    #[arg(long, default_value_t = 1)]
    pub source_addrs: usize,
    /// Reconnect storm (needs `--idle`): halfway through `--duration`,
    /// close every idle client at once and redial them all
    /// (`--idle-parallel` at a time, failed dials retried after a jittered
    /// backoff) while the pairs keep relaying.
    #[arg(long)]
    pub storm: bool,
    /// Mesh watchers that subscribe (WatchConns) and then never read,
    /// simulating stuck mesh peers; needs `--mesh-psk-file`.
    #[arg(long, default_value_t = 0)]
    pub stuck_watchers: usize,
    /// The relay's mesh key file (for `--stuck-watchers`).
    #[arg(long)]
    pub mesh_psk_file: Option<std::path::PathBuf>,
    /// Use TLS (the URL should be https://).
    #[arg(long)]
    pub tls: bool,
    /// Do not verify the server certificate.
    #[arg(long)]
    pub insecure: bool,
    /// New short-lived connections per second during the run (they
    /// connect in twos, relay a couple of packets, and leave).
    #[arg(long, default_value_t = 0)]
    pub churn_rate: u64,
    /// At most this many churn rounds (two connections each) in flight.
    #[arg(long, default_value_t = 256)]
    pub churn_parallel: usize,
    /// Restart measurement: once the `--idle` clients (plain HTTP) are
    /// connected, send SIGTERM to this relay process and report, per
    /// second, when their connections closed and when they were back on
    /// `--restart-to` (each redials it as soon as its connection closes,
    /// as tailscaled does). No pairs run.
    #[arg(long, requires = "restart_to")]
    pub restart_pid: Option<u32>,
    /// The relay that clients of `--restart-pid` redial (a mesh peer).
    #[arg(long, requires = "restart_pid")]
    pub restart_to: Option<String>,
    /// With `--server-pid`: how long after every client of the run has
    /// left to take the relay's last memory sample (`after` in
    /// `server_rss_kib_span`), e.g. 60s to see whether memory comes back.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub settle: Duration,
    /// Server process id: report its CPU per relayed packet, its memory
    /// and FD count (start, max, end).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The results of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BenchReport {
    /// Pairs.
    pub pairs: usize,
    /// Payload size.
    pub size: usize,
    /// Mode: "window N" or "rate N/s".
    pub mode: String,
    /// Measured seconds (with `--storm`: of the steady window before the
    /// storm, which every figure of this level describes).
    pub seconds: f64,
    /// Packets sent in the measured interval.
    pub sent: u64,
    /// Of those, packets received.
    pub received: u64,
    /// sent − received.
    pub lost: u64,
    /// Received packets per second.
    pub packets_per_sec: f64,
    /// Payload gigabits per second delivered.
    pub gbit_per_sec: f64,
    /// One-way latency percentiles in microseconds.
    pub latency_us: Percentiles,
    /// Server CPU microseconds per relayed packet (with `--server-pid`),
    /// over the measured (steady) window only.
    pub server_cpu_us_per_packet: Option<f64>,
    /// Server CPU cores used during the run (with `--server-pid`).
    pub server_cpu_cores: Option<f64>,
    /// Server resident memory at the end, KiB (with `--server-pid`).
    pub server_rss_kib: Option<u64>,
    /// Idle clients held.
    pub idle_clients: usize,
    /// Connections accepted and handshaken per second while connecting
    /// the idle clients.
    pub handshakes_per_sec: Option<f64>,
    /// Server CPU microseconds per idle client's connection and
    /// handshake: the server's CPU time while the idle clients connected,
    /// divided by their number (with `--server-pid`).
    pub server_cpu_us_per_handshake: Option<f64>,
    /// Server resident bytes per idle client (with `--server-pid`).
    pub server_bytes_per_idle_client: Option<f64>,
    /// The bench's own resident bytes per idle client (with the relay in
    /// another process).
    pub bench_bytes_per_idle_client: Option<f64>,
    /// Failed dials of idle clients while connecting them (each retried).
    pub idle_dial_failures: u64,
    /// Loopback source addresses the idle clients used (1: the kernel's
    /// choice).
    pub source_addrs: usize,
    /// Seconds from dropping every idle client until all were back (with
    /// `--storm`; `None` if some never came back).
    pub storm_all_back_secs: Option<f64>,
    /// The reconnect storm (with `--storm`).
    pub storm: Option<StormReport>,
    /// The restart (with `--restart-pid`).
    pub restart: Option<restart::RestartReport>,
    /// Packets delivered whose payload names another receiver (must be 0).
    pub wrong_key: u64,
    /// Packets delivered from an unexpected sender (must be 0).
    pub wrong_src: u64,
    /// Churn clients (with `--churn-rate`).
    pub churn: Option<ChurnReport>,
    /// Server RSS in KiB, start/max/end/after (with `--server-pid`).
    pub server_rss_kib_span: Option<sample::Span>,
    /// Server open FDs, start/max/end/after (with `--server-pid`).
    pub server_fds: Option<sample::Span>,
}

/// The reconnect storm: the redials and the pairs during it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StormReport {
    /// Idle clients dropped at once and redialed.
    pub clients: usize,
    /// Of those, back before the deadline (all, normally).
    pub back: usize,
    /// Redials completed per second (`back` / time until all back).
    pub handshakes_per_sec: Option<f64>,
    /// Server CPU microseconds per redial, with the pairs' steady CPU use
    /// subtracted (with `--server-pid`).
    pub server_cpu_us_per_handshake: Option<f64>,
    /// The redials: tries, failures and why, the most tries one needed.
    pub dials: DialStats,
    /// Seconds of the storm window: from the drop until the end of the run.
    pub seconds: f64,
    /// Pair packets sent in the storm window.
    pub sent: u64,
    /// Of those, received.
    pub received: u64,
    /// sent − received.
    pub lost: u64,
    /// The pairs' one-way latency in the storm window, microseconds.
    pub latency_us: Percentiles,
    /// Server CPU cores used in the storm window (with `--server-pid`).
    pub server_cpu_cores: Option<f64>,
    /// The bench's own CPU cores from the drop until all were back: near
    /// the machine's core count, the bench (not the relay) limited the
    /// redial rate and the pairs' latency.
    pub bench_cpu_cores: Option<f64>,
}

/// Latency percentiles.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

/// The origin of [`clock`].
fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds on this process's monotonic clock (payload timestamps and
/// window bounds).
fn clock() -> u64 {
    clock_base().elapsed().as_nanos() as u64
}

/// The moment [`clock`] reads `t`.
fn instant_at(t: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(clock_base() + Duration::from_nanos(t))
}

/// The measured windows, in [`clock`] time of sending: the steady window
/// `[from, split)` and, with `--storm`, the storm window `[split, end)`.
/// Without a storm `split == end`. The storm's end is only known once
/// every idle client is back: until then it is `u64::MAX`.
struct Windows {
    from: u64,
    split: u64,
    end: AtomicU64,
}

/// Index of the steady window.
const STEADY: usize = 0;
/// Index of the storm window.
const STORM: usize = 1;

impl Windows {
    /// The window a packet sent at `t` belongs to, if any.
    fn of(&self, t: u64) -> Option<usize> {
        if t < self.from {
            None
        } else if t < self.split {
            Some(STEADY)
        } else if t < self.end.load(Ordering::Relaxed) {
            Some(STORM)
        } else {
            None
        }
    }

    /// Whether `t` is past the last window.
    fn past_end(&self, t: u64) -> bool {
        t >= self.end.load(Ordering::Relaxed)
    }
}

/// CPU seconds (user + system) and RSS of a process, from /proc.
pub fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some((ticks / clock_ticks_per_sec(), rss_kib(pid)?))
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn clock_ticks_per_sec() -> f64 {
    // USER_HZ is 100 on every Linux architecture we run on.
    100.0
}

/// One pair's packets per window ([`STEADY`], [`STORM`]).
#[derive(Default)]
struct PairStats {
    sent: [AtomicU64; 2],
    received: [AtomicU64; 2],
}

/// Until every idle client is connected (first connect or storm); then the
/// run goes on without the missing ones (storm) or fails (first connect).
const RECONNECT_LIMIT: Duration = Duration::from_secs(300);
/// How long the storm window goes on after the last idle client is back.
const STORM_TAIL: Duration = Duration::from_secs(1);

/// Runs the benchmark.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, String> {
    if opts.size < STAMP_LEN || opts.size > crate::proto::limits::MAX_PACKET_SIZE {
        return Err(format!(
            "--size must be between {STAMP_LEN} and {}",
            crate::proto::limits::MAX_PACKET_SIZE
        ));
    }
    if let (Some(pid), Some(to)) = (opts.restart_pid, &opts.restart_to) {
        let r = restart::run(
            opts.url.trim_end_matches('/').trim_end_matches("/derp"),
            to,
            pid,
            opts.idle,
            opts.idle_parallel,
            opts.source_addrs,
        )
        .await?;
        return Ok(BenchReport {
            idle_clients: opts.idle,
            restart: Some(r),
            ..Default::default()
        });
    }
    if opts.window.is_some() == opts.rate.is_some() {
        return Err(
            "give exactly one of --window N (closed loop) or --rate PPS (open loop)".into(),
        );
    }
    if opts.pairs == 0 {
        return Err("--pairs must be at least 1".into());
    }
    if opts.storm && opts.idle == 0 {
        return Err("--storm needs idle clients to drop and redial: give --idle N".into());
    }
    let insecure = opts.insecure;
    let url = opts
        .url
        .trim_end_matches('/')
        .trim_end_matches("/derp")
        .to_owned();
    if opts.tls != url.starts_with("https://") {
        return Err("--tls goes with an https:// URL".into());
    }
    check_capacity(opts, &url)?;
    let mut report = BenchReport {
        pairs: opts.pairs,
        size: opts.size,
        mode: match (opts.window, opts.rate) {
            (Some(w), _) => format!("window {w}"),
            (_, Some(r)) => format!("rate {r}/s per pair"),
            _ => unreachable!(),
        },
        idle_clients: opts.idle,
        source_addrs: opts.source_addrs,
        ..Default::default()
    };
    let relay_in_process = opts.server_pid == Some(std::process::id());

    // Server resources before any of our clients connect.
    let tracker = Arc::new(parking_lot::Mutex::new(sample::Tracker::default()));
    let mut sampler = None;
    if let Some(pid) = opts.server_pid {
        let first = sample::sample(pid).ok_or(format!("--server-pid {pid}: /proc unreadable"))?;
        tracker.lock().observe(first);
        sampler = Some(tokio::spawn(sample::sample_loop(
            pid,
            Duration::from_secs(1),
            tracker.clone(),
        )));
    }

    // Idle clients first: handshake rate and cost, memory per idle client.
    let stuck = connect_stuck_watchers(&url, opts, insecure).await?;
    let server_before_idle = opts.server_pid.and_then(proc_usage);
    let bench_rss_before_idle = rss_kib(std::process::id());
    let mut idle = idle::IdleClients::new(&url, insecure, opts.source_addrs, opts.idle);
    if opts.idle > 0 {
        let t0 = Instant::now();
        // One dial without retries: a wrong URL fails at once.
        idle.connect_one(0).await?;
        let counters = Arc::new(idle::DialCounters::default());
        let up = idle
            .connect_all(
                opts.idle_parallel.max(1),
                Instant::now() + RECONNECT_LIMIT,
                &counters,
            )
            .await;
        let secs = t0.elapsed().as_secs_f64();
        let server_after_idle = opts.server_pid.and_then(proc_usage);
        let dials = counters.stats();
        if up.missing > 0 {
            return Err(format!(
                "only {} of {} idle clients connected within {RECONNECT_LIMIT:?} \
                 ({} failed dials; last error: {})",
                opts.idle - up.missing,
                opts.idle,
                dials.failures,
                dials.last_error.unwrap_or_default()
            ));
        }
        report.idle_dial_failures = dials.failures;
        report.handshakes_per_sec = Some(opts.idle as f64 / secs);
        if let (Some((c0, _)), Some((c1, _))) = (server_before_idle, server_after_idle) {
            report.server_cpu_us_per_handshake = Some((c1 - c0) * 1e6 / opts.idle as f64);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let (Some((_, before)), Some((_, after))) =
            (server_before_idle, opts.server_pid.and_then(proc_usage))
        {
            report.server_bytes_per_idle_client =
                Some((after as f64 - before as f64) * 1024.0 / opts.idle as f64);
        }
        if !relay_in_process {
            if let (Some(before), Some(after)) =
                (bench_rss_before_idle, rss_kib(std::process::id()))
            {
                report.bench_bytes_per_idle_client =
                    Some((after as f64 - before as f64) * 1024.0 / opts.idle as f64);
            }
        }
    }

    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..opts.pairs {
        let (sk, rk) = (NodePrivate::generate(), NodePrivate::generate());
        let s = dial(&url, &sk, insecure).await.map_err(|e| e.to_string())?;
        let r = dial(&url, &rk, insecure).await.map_err(|e| e.to_string())?;
        senders.push((s, rk.public()));
        receivers.push((r, sk.public()));
    }

    let warmup = (opts.duration / 10).min(Duration::from_secs(1));
    let start = clock();
    let from = start + warmup.as_nanos() as u64;
    let steady = if opts.storm {
        opts.duration / 2
    } else {
        opts.duration
    };
    let split = from + steady.as_nanos() as u64;
    let windows = Arc::new(Windows {
        from,
        split,
        end: AtomicU64::new(if opts.storm { u64::MAX } else { split }),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let done = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut receivers_done = tokio::task::JoinSet::new();
    let mut stats = Vec::new();
    let wrong = Arc::new(WrongKeys::default());
    let new_hist =
        || Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let hists = Arc::new([
        parking_lot::Mutex::new(new_hist()),
        parking_lot::Mutex::new(new_hist()),
    ]);
    // Open loop: one pacing thread with a fine-grained clock spreads the
    // pairs' sends evenly (tokio's timer has 1 ms granularity, which would
    // fire every pair in the same millisecond and measure self-made bursts).
    let paces: Vec<Arc<tokio::sync::Notify>> = (0..opts.pairs)
        .map(|_| Arc::new(tokio::sync::Notify::new()))
        .collect();
    if let Some(rate) = opts.rate {
        let (paces, stop, windows) = (paces.clone(), stop.clone(), windows.clone());
        std::thread::spawn(move || pace_loop(&paces, rate, &windows, &stop));
    }
    for (i, ((sender, dst), (receiver, sender_key))) in
        senders.into_iter().zip(receivers).enumerate()
    {
        let st = Arc::new(PairStats::default());
        stats.push(st.clone());
        let window = Arc::new(Semaphore::new(opts.window.unwrap_or(0)));
        tasks.spawn(send_loop(
            sender,
            dst,
            opts.size,
            opts.window,
            opts.rate.map(|_| paces[i].clone()),
            window.clone(),
            st.clone(),
            windows.clone(),
        ));
        receivers_done.spawn(recv_loop(
            receiver,
            sender_key,
            wrong.clone(),
            window,
            st,
            hists.clone(),
            windows.clone(),
            done.clone(),
        ));
    }
    let churn_counters = Arc::new(churn::ChurnCounters::default());
    let churn_task = (opts.churn_rate > 0).then(|| {
        tokio::spawn(churn::churn_loop(
            url.clone(),
            opts.churn_rate,
            Instant::now() + warmup + opts.duration,
            insecure,
            opts.churn_parallel,
            churn_counters.clone(),
            wrong.clone(),
        ))
    });
    // The steady window: CPU per packet is measured over it only (not
    // while the clients connect, not during the storm).
    tokio::time::sleep_until(instant_at(from)).await;
    let cpu_start = opts.server_pid.and_then(proc_usage);
    let t0 = Instant::now();
    tokio::time::sleep_until(instant_at(split)).await;
    let cpu_end = opts.server_pid.and_then(proc_usage);
    let elapsed = t0.elapsed().as_secs_f64();
    let steady_cores = match (cpu_start, cpu_end) {
        (Some((c0, _)), Some((c1, _))) => Some((c1 - c0) / elapsed),
        _ => None,
    };

    let mut storm = None;
    if opts.storm {
        let t_drop = Instant::now();
        let bench_cpu_drop = proc_usage(std::process::id());
        let dropped = idle.drop_all();
        let counters = Arc::new(idle::DialCounters::default());
        let up = idle
            .connect_all(
                opts.idle_parallel.max(1),
                t_drop + RECONNECT_LIMIT,
                &counters,
            )
            .await;
        let cpu_back = opts.server_pid.and_then(proc_usage);
        let bench_cpu_back = proc_usage(std::process::id());
        let back_secs = t_drop.elapsed().as_secs_f64();
        // The storm window goes on a little after the last one is back, and
        // at least until --duration is over.
        let end =
            (from + opts.duration.as_nanos() as u64).max(clock() + STORM_TAIL.as_nanos() as u64);
        windows.end.store(end, Ordering::Relaxed);
        tokio::time::sleep_until(instant_at(end)).await;
        let cpu_storm_end = opts.server_pid.and_then(proc_usage);
        let secs = t_drop.elapsed().as_secs_f64();
        let all_back = up.missing == 0;
        let back_after = (up.last_up - t_drop).as_secs_f64();
        report.storm_all_back_secs = all_back.then_some(back_after);
        let mut s = StormReport {
            clients: dropped,
            back: up.connected,
            handshakes_per_sec: (all_back && back_after > 0.0)
                .then(|| up.connected as f64 / back_after),
            dials: counters.stats(),
            seconds: secs,
            ..Default::default()
        };
        if let (Some((b0, _)), Some((b1, _))) = (bench_cpu_drop, bench_cpu_back) {
            s.bench_cpu_cores = Some((b1 - b0) / back_secs);
        }
        if let (Some((c0, _)), Some((c1, _)), Some((c2, _)), Some(cores)) =
            (cpu_end, cpu_back, cpu_storm_end, steady_cores)
        {
            s.server_cpu_cores = Some((c2 - c0) / secs);
            if up.connected > 0 {
                let redials = (c1 - c0 - cores * back_secs).max(0.0);
                s.server_cpu_us_per_handshake = Some(redials * 1e6 / up.connected as f64);
            }
        }
        storm = Some(s);
    }
    if let Some(s) = opts.server_pid.and_then(sample::sample) {
        tracker.lock().end(s);
    }
    if let Some(t) = churn_task {
        // Each round is time-bounded, so this ends.
        let _ = t.await;
        report.churn = Some(churn_counters.report(opts.churn_rate));
    }
    // Let packets in flight arrive, then stop the receivers.
    let drain_until = Instant::now() + Duration::from_secs(2);
    loop {
        let all_in = [STEADY, STORM].iter().all(|&w| {
            let (s, r) = totals(&stats, w);
            s == r
        });
        if all_in || Instant::now() > drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    done.cancel();
    while receivers_done.join_next().await.is_some() {}
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(idle);
    drop(stuck);
    if let Some(pid) = opts.server_pid {
        // Give the server a moment to notice the closed connections (or
        // as long as asked, to see memory come back).
        tokio::time::sleep(opts.settle).await;
        if let Some(s) = sample::sample(pid) {
            tracker.lock().after(s);
        }
    }
    if let Some(t) = sampler {
        t.abort();
    }
    if let Some((rss, fds)) = tracker.lock().spans() {
        report.server_rss_kib_span = Some(rss);
        report.server_fds = Some(fds);
    }
    report.wrong_key = wrong.wrong_key.load(Ordering::Relaxed);
    report.wrong_src = wrong.wrong_src.load(Ordering::Relaxed);

    let (sent, received) = totals(&stats, STEADY);
    report.seconds = elapsed;
    report.sent = sent;
    report.received = received;
    report.lost = sent.saturating_sub(received);
    report.packets_per_sec = received as f64 / elapsed;
    report.gbit_per_sec = report.packets_per_sec * opts.size as f64 * 8.0 / 1e9;
    report.latency_us = percentiles(&hists[STEADY].lock());
    if let (Some((c0, _)), Some((c1, rss))) = (cpu_start, cpu_end) {
        let cpu = c1 - c0;
        report.server_cpu_cores = Some(cpu / elapsed);
        if received > 0 {
            report.server_cpu_us_per_packet = Some(cpu * 1e6 / received as f64);
        }
        report.server_rss_kib = Some(rss);
    }
    if let Some(mut s) = storm {
        let (sent, received) = totals(&stats, STORM);
        s.sent = sent;
        s.received = received;
        s.lost = sent.saturating_sub(received);
        s.latency_us = percentiles(&hists[STORM].lock());
        report.storm = Some(s);
    }
    Ok(report)
}

/// Fails at once if the run cannot fit: file descriptors of the bench
/// (and of the relay, with `--server-pid`), loopback source addresses and
/// their ephemeral ports.
fn check_capacity(opts: &BenchOptions, url: &str) -> Result<(), String> {
    limits::check_sources(url, opts.source_addrs)?;
    let conns = limits::Connections {
        idle: opts.idle as u64,
        pairs: opts.pairs as u64,
        stuck_watchers: opts.stuck_watchers as u64,
        churn_rounds: if opts.churn_rate > 0 {
            opts.churn_parallel as u64
        } else {
            0
        },
    };
    let relay_in_process = opts.server_pid == Some(std::process::id());
    let (soft, _) = crate::rlimit::nofile().map_err(|e| format!("getrlimit: {e}"))?;
    limits::check_fds(
        conns.bench_fds(relay_in_process),
        soft,
        opts.idle as u64,
        if relay_in_process {
            "this process (bench and relay)"
        } else {
            "the bench"
        },
    )?;
    if let Some(pid) = opts.server_pid.filter(|_| !relay_in_process) {
        if let Some(limit) = crate::rlimit::nofile_of(pid) {
            limits::check_fds(
                conns.relay_fds(),
                limit,
                opts.idle as u64,
                &format!("the relay (pid {pid})"),
            )?;
        }
    }
    if let Some(ports) = limits::ephemeral_ports() {
        limits::check_ports(
            opts.idle as u64,
            opts.source_addrs as u64,
            opts.storm,
            ports,
        )?;
    }
    Ok(())
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Percentiles {
        p50: us(0.5),
        p90: us(0.9),
        p99: us(0.99),
        p999: us(0.999),
        max: h.max() as f64 / 1000.0,
    }
}

/// Wakes pair `i`'s sender at `rate` per second, pairs evenly staggered,
/// until the last window is over.
fn pace_loop(paces: &[Arc<tokio::sync::Notify>], rate: u64, windows: &Windows, stop: &AtomicBool) {
    let pairs = paces.len() as u64;
    let gap = Duration::from_nanos(1_000_000_000 / (rate.max(1) * pairs));
    let mut next = Instant::now();
    let mut i = 0usize;
    let grace = Duration::from_millis(50).as_nanos() as u64;
    while clock() < windows.end.load(Ordering::Relaxed).saturating_add(grace)
        && !stop.load(Ordering::Relaxed)
    {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        paces[i].notify_one();
        i = (i + 1) % paces.len();
        next += gap;
    }
}

fn totals(stats: &[Arc<PairStats>], window: usize) -> (u64, u64) {
    stats.iter().fold((0, 0), |(s, r), p| {
        (
            s + p.sent[window].load(Ordering::Relaxed),
            r + p.received[window].load(Ordering::Relaxed),
        )
    })
}

/// Connects mesh watchers that subscribe to connection events and never
/// read: the relay must keep relaying for everyone else.
async fn connect_stuck_watchers(
    url: &str,
    opts: &BenchOptions,
    insecure: bool,
) -> Result<Vec<DynClient>, String> {
    if opts.stuck_watchers == 0 {
        return Ok(Vec::new());
    }
    let path = opts
        .mesh_psk_file
        .as_ref()
        .ok_or("--stuck-watchers needs --mesh-psk-file")?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mesh_key = crate::proto::MeshKey::from_hex(&text)
        .map_err(|_| format!("{}: not a 64-hex mesh key", path.display()))?;
    let mut out = Vec::new();
    for _ in 0..opts.stuck_watchers {
        let info = crate::proto::ClientInfo {
            mesh_key: Some(mesh_key.clone()),
            ..Default::default()
        };
        let mut c = crate::client::dial_with(url, &NodePrivate::generate(), insecure, info)
            .await
            .map_err(|e| format!("stuck watcher: {e}"))?;
        c.send(&Frame::WatchConns)
            .await
            .map_err(|e| format!("stuck watcher: {e}"))?;
        out.push(c);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn send_loop(
    mut c: DynClient,
    dst: NodePublic,
    size: usize,
    window: Option<usize>,
    pace: Option<Arc<tokio::sync::Notify>>,
    permits: Arc<Semaphore>,
    st: Arc<PairStats>,
    windows: Arc<Windows>,
) {
    let mut seq = 0u64;
    let mut stamp = |buf: &mut [u8]| {
        let now = stamp_payload(buf, seq, &dst);
        seq += 1;
        now
    };
    loop {
        let mut n = 1usize;
        if window.is_some() {
            let Ok(p) = permits.acquire().await else {
                return;
            };
            p.forget();
            while n < 64 {
                match permits.try_acquire() {
                    Ok(p) => {
                        p.forget();
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
        } else if let Some(tick) = &pace {
            tick.notified().await;
        }
        let mut measured = [0; 2];
        let mut past_end = false;
        for _ in 0..n {
            let mut t = 0;
            c.queue_packet_with(dst, size, |b| t = stamp(b));
            if let Some(w) = windows.of(t) {
                measured[w] += 1;
            }
            past_end |= windows.past_end(t);
        }
        for (w, m) in measured.into_iter().enumerate() {
            if m > 0 {
                st.sent[w].fetch_add(m, Ordering::Relaxed);
            }
        }
        if c.flush().await.is_err() {
            return;
        }
        if past_end {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn recv_loop(
    mut c: DynClient,
    from_key: NodePublic,
    wrong: Arc<WrongKeys>,
    permits: Arc<Semaphore>,
    st: Arc<PairStats>,
    hists: Arc<[parking_lot::Mutex<Histogram<u64>>; 2]>,
    windows: Arc<Windows>,
    done: CancellationToken,
) {
    let new_hist =
        || Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let mut local = [new_hist(), new_hist()];
    let merge = |local: &mut [Histogram<u64>; 2]| {
        for (shared, l) in hists.iter().zip(local.iter_mut()) {
            if !l.is_empty() {
                shared.lock().add(&*l).expect("same bounds");
                l.reset();
            }
        }
    };
    let me = c.public_key();
    let mut last_merge = Instant::now();
    let receive = async {
        while let Ok(frame) = c.recv().await {
            let Frame::RecvPacket { src, payload } = frame else {
                continue;
            };
            permits.add_permits(1);
            if !tag_matches(&payload, &me) {
                wrong.wrong_key.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if src != from_key {
                wrong.wrong_src.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let sent_at = u64::from_be_bytes(payload[8..16].try_into().expect("8 bytes"));
            if let Some(w) = windows.of(sent_at) {
                st.received[w].fetch_add(1, Ordering::Relaxed);
                let _ = local[w].record(clock().saturating_sub(sent_at).max(1));
            }
            if last_merge.elapsed() > Duration::from_millis(200) {
                merge(&mut local);
                last_merge = Instant::now();
            }
        }
    };
    // Stopped from outside once every packet is in: the samples since the
    // last merge still count.
    tokio::select! {
        () = receive => {}
        () = done.cancelled() => {}
    }
    merge(&mut local);
}

impl BenchReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        if let Some(r) = &self.restart {
            return r.table();
        }
        let mut s = String::new();
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.2}{unit}"));
        s += &format!(
            "pairs {} · size {} B · {} · {:.1} s{}\n",
            self.pairs,
            self.size,
            self.mode,
            self.seconds,
            if self.storm.is_some() {
                " (steady window, before the storm)"
            } else {
                ""
            }
        );
        s += &format!(
            "  sent       {:>12}\n  received   {:>12}\n  lost       {:>12}\n",
            self.sent, self.received, self.lost
        );
        s += &format!(
            "  packets/s  {:>12.0}\n  Gbit/s     {:>12.3}\n",
            self.packets_per_sec, self.gbit_per_sec
        );
        let l = &self.latency_us;
        s += &format!(
            "  latency µs p50 {:.1} · p90 {:.1} · p99 {:.1} · p99.9 {:.1} · max {:.1}\n",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        s += &format!(
            "  server CPU {} per packet · {} cores · RSS {} KiB\n",
            opt(self.server_cpu_us_per_packet, " µs"),
            opt(self.server_cpu_cores, ""),
            self.server_rss_kib.map_or("-".into(), |v| v.to_string())
        );
        s += &format!(
            "  wrong key  {:>12}\n  wrong src  {:>12}\n",
            self.wrong_key, self.wrong_src
        );
        if let (Some(r), Some(f)) = (&self.server_rss_kib_span, &self.server_fds) {
            s += &format!(
                "  server RSS KiB start {} · max {} · end {} · after {}\n",
                r.start, r.max, r.end, r.after
            );
            s += &format!(
                "  server FDs     start {} · max {} · end {} · after {}\n",
                f.start, f.max, f.end, f.after
            );
        }
        if let Some(c) = &self.churn {
            s += &format!(
                "  churn {}/s · connections {} · dial errors {} · rounds {} · skipped {} · timed out {} · packets {}/{} delivered\n",
                c.rate, c.connections, c.dial_errors, c.rounds, c.skipped, c.timed_out, c.delivered, c.sent
            );
        }
        if self.idle_clients > 0 {
            s += &format!(
                "  idle clients {} from {} · handshakes/s {} · server CPU {} per handshake · dial failures {}\n",
                self.idle_clients,
                if self.source_addrs > 1 {
                    format!("{} source addresses", self.source_addrs)
                } else {
                    "1 source address".into()
                },
                opt(self.handshakes_per_sec, ""),
                opt(self.server_cpu_us_per_handshake, " µs"),
                self.idle_dial_failures,
            );
            s += &format!(
                "  bytes per idle client: server {} · bench {}\n",
                opt(self.server_bytes_per_idle_client, ""),
                opt(self.bench_bytes_per_idle_client, ""),
            );
        }
        if let Some(st) = &self.storm {
            s += &st.table(self.storm_all_back_secs);
        }
        s
    }
}

impl StormReport {
    /// The storm's lines of [`BenchReport::table`].
    fn table(&self, all_back_secs: Option<f64>) -> String {
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.2}{unit}"));
        let d = &self.dials;
        let mut s = format!(
            "storm: {} idle clients dropped at once · back {} · all back in {} ({} handshakes/s)\n",
            self.clients,
            self.back,
            opt(all_back_secs, " s"),
            opt(self.handshakes_per_sec, ""),
        );
        s += &format!(
            "  redials {} · failed {} (timed out {} · refused {} · other {}) · most tries by one client {}\n",
            d.attempts, d.failures, d.timed_out, d.refused, d.other, d.most_attempts
        );
        if let Some(e) = &d.last_error {
            s += &format!("  last dial error: {e}\n");
        }
        s += &format!(
            "  storm window {:.1} s: sent {} · received {} · lost {}\n",
            self.seconds, self.sent, self.received, self.lost
        );
        let l = &self.latency_us;
        s += &format!(
            "  latency µs p50 {:.1} · p90 {:.1} · p99 {:.1} · p99.9 {:.1} · max {:.1}\n",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        s += &format!(
            "  server CPU {} per redial (pairs' steady share subtracted) · {} cores · bench {} cores until all back\n",
            opt(self.server_cpu_us_per_handshake, " µs"),
            opt(self.server_cpu_cores, ""),
            opt(self.bench_cpu_cores, ""),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_names_the_receiver_and_only_it() {
        let (a, b) = (
            NodePrivate::generate().public(),
            NodePrivate::generate().public(),
        );
        let mut buf = [0u8; STAMP_LEN + 4];
        let t = stamp_payload(&mut buf, 7, &a);
        assert!(tag_matches(&buf, &a));
        assert!(!tag_matches(&buf, &b));
        assert_eq!(u64::from_be_bytes(buf[..8].try_into().unwrap()), 7);
        assert_eq!(u64::from_be_bytes(buf[8..16].try_into().unwrap()), t);
        // Too short to carry a tag: never counted as ours.
        assert!(!tag_matches(&buf[..STAMP_LEN - 1], &a));
    }
}
