//! Micro-benchmarks of the pure protocol layer: frame decoding (server role),
//! RecvPacket encoding, the 37-byte RecvPacket prefix, and the handshake's
//! sealed boxes.
//!
//! Run with `cargo bench --bench codec` (add `-- --quick` for a fast pass).

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use derpd::proto::frame::recv_packet_prefix;
use derpd::proto::handshake::{
    open_client_info, open_server_info, seal_client_info, seal_server_info,
};
use derpd::proto::{ClientInfo, Frame, FrameDecoder, NodePrivate, NodePublic, Role, ServerInfo};

/// Size of the read buffer filled with back-to-back frames.
const DECODE_BUF: usize = 64 * 1024;

/// Payload sizes exercised: a tiny packet, a typical WireGuard MTU-sized one,
/// and a large one.
const PAYLOAD_SIZES: [usize; 3] = [64, 1200, 16 * 1024];

fn key(n: u8) -> NodePublic {
    let mut k = [n; 32];
    k[0] = 0xa5;
    NodePublic(k)
}

/// As many complete SendPacket frames of `payload_len` bytes as fit in 64 KiB.
fn send_packet_buffer(payload_len: usize) -> (Bytes, usize) {
    let frame = Frame::SendPacket {
        dst: key(7),
        payload: Bytes::from(vec![0x42; payload_len]),
    };
    let one = frame.to_bytes();
    let count = DECODE_BUF / one.len();
    let mut buf = BytesMut::with_capacity(count * one.len());
    for _ in 0..count {
        buf.extend_from_slice(&one);
    }
    (buf.freeze(), count)
}

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_send_packet_64k");
    for &size in &PAYLOAD_SIZES {
        let (template, count) = send_packet_buffer(size);
        g.throughput(Throughput::Bytes(template.len() as u64));
        g.bench_function(format!("payload_{size}"), |b| {
            b.iter_batched(
                || BytesMut::from(&template[..]),
                |mut buf| {
                    let mut dec = FrameDecoder::new(Role::Server);
                    dec.allow_mesh_frames(false);
                    let mut n = 0;
                    while let Some(frame) = dec.decode(&mut buf).expect("valid frames") {
                        black_box(&frame);
                        n += 1;
                    }
                    debug_assert_eq!(n, count);
                    black_box(n);
                    // Returned so its (untimed) drop is not measured.
                    buf
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_recv_packet");
    let src = key(3);
    for &size in &PAYLOAD_SIZES {
        let frame = Frame::RecvPacket {
            src,
            payload: Bytes::from(vec![0x17; size]),
        };
        let wire_len = frame.to_bytes().len();
        g.throughput(Throughput::Bytes(wire_len as u64));
        let mut out = BytesMut::with_capacity(wire_len);
        g.bench_function(format!("encode_{size}"), |b| {
            b.iter(|| {
                out.clear();
                black_box(&frame).encode(&mut out);
                black_box(out.len());
            })
        });
    }
    let frame = Frame::RecvPacket {
        src,
        payload: Bytes::from(vec![0x17; 1200]),
    };
    g.throughput(Throughput::Bytes(frame.to_bytes().len() as u64));
    g.bench_function("to_bytes_1200", |b| {
        b.iter(|| black_box(black_box(&frame).to_bytes()))
    });
    g.finish();
}

fn bench_prefix(c: &mut Criterion) {
    let mut g = c.benchmark_group("recv_packet_prefix");
    g.throughput(Throughput::Elements(1));
    let src = key(9);
    g.bench_function("prefix_1200", |b| {
        b.iter(|| black_box(recv_packet_prefix(black_box(&src), black_box(1200))))
    });
    g.finish();
}

fn bench_handshake(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    let client = NodePrivate::generate();
    let server = NodePrivate::generate();
    let (client_pub, server_pub) = (client.public(), server.public());
    let client_info = ClientInfo {
        version: 2,
        can_ack_pings: true,
        app_name: Some("bench".into()),
        ..ClientInfo::default()
    };
    let server_info = ServerInfo::current(0, 0);

    g.bench_function("seal_client_info", |b| {
        b.iter(|| {
            black_box(seal_client_info(
                &client,
                &server_pub,
                black_box(&client_info),
            ))
        })
    });
    let Frame::ClientInfo { nonce, sealed, .. } =
        seal_client_info(&client, &server_pub, &client_info)
    else {
        unreachable!("seal_client_info builds a ClientInfo frame")
    };
    g.bench_function("open_client_info", |b| {
        b.iter(|| {
            black_box(
                open_client_info(&server, &client_pub, black_box(&nonce), black_box(&sealed))
                    .expect("opens"),
            )
        })
    });

    g.bench_function("seal_server_info", |b| {
        b.iter(|| {
            black_box(seal_server_info(
                &server,
                &client_pub,
                black_box(&server_info),
            ))
        })
    });
    let Frame::ServerInfo { nonce, sealed } = seal_server_info(&server, &client_pub, &server_info)
    else {
        unreachable!("seal_server_info builds a ServerInfo frame")
    };
    g.bench_function("open_server_info", |b| {
        b.iter(|| {
            black_box(
                open_server_info(&client, &server_pub, black_box(&nonce), black_box(&sealed))
                    .expect("opens"),
            )
        })
    });
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
    targets = bench_decode, bench_encode, bench_prefix, bench_handshake
}
criterion_main!(benches);
