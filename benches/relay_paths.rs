//! Micro-benchmarks of the relay's hot paths: registry lookups (alone and
//! under contention), the outbox push/take cycle, and the writer's batched
//! vectored write compared with one `write_all` per frame.
//!
//! Run with `cargo bench --bench relay_paths` (add `-- --quick` for a fast
//! pass).
//!
//! The writer's own `write_batch` is private (and needs a full `Shared`), so
//! the batched write here mirrors it: a 37-byte `recv_packet_prefix` slice
//! plus the payload slice per packet, at most `MAX_IOVECS` slices per
//! `write_vectored` loop, `IoSlice::advance_slices` after short writes.

use std::collections::VecDeque;
use std::hint::black_box;
use std::io::{IoSlice, Read};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use derpd::metrics::Metrics;
use derpd::proto::frame::recv_packet_prefix;
use derpd::proto::NodePublic;
use derpd::relay::conn::ClientConn;
use derpd::relay::outbox::{Batch, Outbox, QueuedPacket};
use derpd::relay::registry::Registry;

/// Registered clients in the lookup benchmarks.
const CLIENTS: usize = 10_000;
/// Pre-drawn lookup keys (a power of two, cycled through).
const PROBES: usize = 1 << 14;
/// Packet payload size for the outbox and write benchmarks.
const PAYLOAD: usize = 1200;
/// Same bound on slices per `writev` as the writer.
const MAX_IOVECS: usize = 512;

fn random_key(rng: &mut fastrand::Rng) -> NodePublic {
    let mut k = [0u8; 32];
    rng.fill(&mut k);
    NodePublic(k)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------- registry

/// A registry of `CLIENTS` connections plus `PROBES` random present keys.
fn populated_registry() -> (Registry, Vec<NodePublic>) {
    let registry = Registry::new(Arc::new(Metrics::new()));
    let mut rng = fastrand::Rng::with_seed(0xde4b);
    let addr: SocketAddr = "127.0.0.1:41641".parse().expect("addr");
    let mut keys = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let key = random_key(&mut rng);
        let conn = ClientConn::new(
            key,
            addr,
            false,
            false,
            false,
            Outbox::new(32, 1024),
            CancellationToken::new(),
        );
        registry.register(Arc::new(conn));
        keys.push(key);
    }
    assert_eq!(registry.len(), CLIENTS);
    let probes = (0..PROBES)
        .map(|_| keys[rng.usize(..CLIENTS)])
        .collect::<Vec<_>>();
    (registry, probes)
}

/// `iters` lookups on each of two threads started together; the slower
/// thread's time counts.
fn contended_lookups(
    registry: &Registry,
    probes: &[NodePublic],
    iters: u64,
    same_key: bool,
) -> Duration {
    let barrier = Barrier::new(2);
    thread::scope(|s| {
        let handles = (0..2usize)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let offset = if same_key { 0 } else { t * PROBES / 2 };
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..iters as usize {
                        let key = if same_key {
                            &probes[0]
                        } else {
                            &probes[(i + offset) & (PROBES - 1)]
                        };
                        black_box(registry.lookup(black_box(key)));
                    }
                    start.elapsed()
                })
            })
            .collect::<Vec<_>>();
        handles
            .into_iter()
            .map(|h| h.join().expect("lookup thread"))
            .max()
            .expect("two threads")
    })
}

fn bench_registry(c: &mut Criterion) {
    let (registry, probes) = populated_registry();
    let mut g = c.benchmark_group("registry_lookup_10k");

    g.throughput(Throughput::Elements(1));
    g.bench_function("1_thread", |b| {
        let mut i = 0usize;
        b.iter(|| {
            let key = &probes[i & (PROBES - 1)];
            i = i.wrapping_add(1);
            black_box(registry.lookup(black_box(key)))
        })
    });

    // One iteration = one lookup on each thread (two in total).
    g.throughput(Throughput::Elements(2));
    g.bench_function("2_threads_random_keys", |b| {
        b.iter_custom(|iters| contended_lookups(&registry, &probes, iters, false))
    });
    g.bench_function("2_threads_same_key", |b| {
        b.iter_custom(|iters| contended_lookups(&registry, &probes, iters, true))
    });
    g.finish();
}

// ------------------------------------------------------------------ outbox

fn bench_outbox(c: &mut Criterion) {
    const N: usize = 32;
    let mut g = c.benchmark_group("outbox");
    g.throughput(Throughput::Elements(N as u64));
    let outbox = Outbox::new(N, 1024);
    let payload = Bytes::from(vec![0x5a; PAYLOAD]);
    let src = NodePublic([1; 32]);
    let mut batch = Batch::default();
    g.bench_function("push32_take", |b| {
        b.iter(|| {
            for _ in 0..N {
                black_box(outbox.push_packet(
                    QueuedPacket {
                        src,
                        payload: payload.clone(),
                    },
                    false,
                    1,
                ));
            }
            assert!(outbox.take(&mut batch));
            debug_assert_eq!(batch.packets.len(), N);
            black_box(&batch);
            batch.clear();
        })
    });
    g.finish();
}

// ------------------------------------------------------------- write path

/// A batch of `n` regular packets from distinct sources sharing one payload.
fn packet_batch(n: usize) -> Batch {
    let payload = Bytes::from(vec![0x33; PAYLOAD]);
    let packets = (0..n)
        .map(|i| QueuedPacket {
            src: NodePublic([i as u8; 32]),
            payload: payload.clone(),
        })
        .collect::<VecDeque<_>>();
    Batch {
        packets,
        ..Batch::default()
    }
}

/// Writes all of `slices` (then flushes), as the writer's `write_all_timed`
/// does without a deadline.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    w.flush().await
}

/// The writer's batched path: prefixes built into a reused scratch vector,
/// prefix + payload slices per packet, one vectored write loop per batch.
async fn write_batch_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &Batch,
    prefixes: &mut Vec<[u8; 37]>,
) -> std::io::Result<()> {
    prefixes.clear();
    let packets = batch.disco.iter().chain(batch.packets.iter());
    for p in packets.clone() {
        prefixes.push(recv_packet_prefix(&p.src, p.payload.len()));
    }
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + 2 * prefixes.len().min(MAX_IOVECS));
    for (prefix, p) in prefixes.iter().zip(packets) {
        slices.push(IoSlice::new(prefix));
        if !p.payload.is_empty() {
            slices.push(IoSlice::new(&p.payload));
        }
        if slices.len() >= MAX_IOVECS {
            write_all_vectored(w, &mut slices).await?;
            slices.clear();
        }
    }
    if !slices.is_empty() {
        write_all_vectored(w, &mut slices).await?;
    }
    Ok(())
}

/// The naive alternative: each RecvPacket encoded contiguously (copying the
/// payload) and written with its own `write_all`.
async fn write_batch_per_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &Batch,
    frame: &mut BytesMut,
) -> std::io::Result<()> {
    for p in batch.disco.iter().chain(batch.packets.iter()) {
        frame.clear();
        frame.put_slice(&recv_packet_prefix(&p.src, p.payload.len()));
        frame.put_slice(&p.payload);
        w.write_all(frame).await?;
    }
    w.flush().await
}

/// Times `iters` writes of `batch` to `w` with both strategies' shared loop.
fn time_writes<W: AsyncWrite + Unpin>(
    rt: &tokio::runtime::Runtime,
    w: &mut W,
    batch: &Batch,
    iters: u64,
    vectored: bool,
) -> Duration {
    rt.block_on(async {
        let mut prefixes = Vec::new();
        let mut frame = BytesMut::with_capacity(37 + PAYLOAD);
        let start = Instant::now();
        for _ in 0..iters {
            if vectored {
                write_batch_vectored(w, batch, &mut prefixes).await
            } else {
                write_batch_per_frame(w, batch, &mut frame).await
            }
            .expect("write");
        }
        start.elapsed()
    })
}

/// A loopback TCP connection whose far end is drained by a thread. Returns
/// the near end (a tokio stream on `rt`) and the drainer, which ends at EOF.
fn loopback_pair(rt: &tokio::runtime::Runtime) -> (tokio::net::TcpStream, thread::JoinHandle<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let client = std::net::TcpStream::connect(listener.local_addr().expect("addr"))
        .expect("connect loopback");
    let (mut server, _) = listener.accept().expect("accept");
    let drainer = thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match server.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    });
    client.set_nodelay(true).expect("nodelay");
    client.set_nonblocking(true).expect("nonblocking");
    let _guard = rt.enter();
    let stream = tokio::net::TcpStream::from_std(client).expect("tokio stream");
    (stream, drainer)
}

fn bench_write_path(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("write_batch");
    for n in [32usize, 64] {
        let batch = packet_batch(n);
        g.throughput(Throughput::Elements(n as u64));

        let mut sink = tokio::io::sink();
        g.bench_function(format!("sink/vectored/{n}"), |b| {
            b.iter_custom(|iters| time_writes(&rt, &mut sink, &batch, iters, true))
        });
        g.bench_function(format!("sink/write_all_per_frame/{n}"), |b| {
            b.iter_custom(|iters| time_writes(&rt, &mut sink, &batch, iters, false))
        });

        let (mut tcp, drainer) = loopback_pair(&rt);
        g.bench_function(format!("tcp/vectored/{n}"), |b| {
            b.iter_custom(|iters| time_writes(&rt, &mut tcp, &batch, iters, true))
        });
        g.bench_function(format!("tcp/write_all_per_frame/{n}"), |b| {
            b.iter_custom(|iters| time_writes(&rt, &mut tcp, &batch, iters, false))
        });
        drop(tcp);
        black_box(drainer.join().expect("drainer"));
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_registry, bench_outbox, bench_write_path
}
criterion_main!(benches);
