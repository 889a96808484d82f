#!/usr/bin/env bash
# Benchmark of `derpd tunnel` (docs/PERFORMANCE.md): builds the release
# binary, then runs scripts/netns-tunnel-test.sh --bench, i.e. iperf3 between
# a wireguard-go pair through two tunnels and a relay in network namespaces,
# RUNS times, reading the tunnels' CPU from /proc, and the same WireGuard
# pair over a direct veth RUNS times. Prints every run and the medians.
#
#   scripts/tunnel-bench.sh [RUNS [SECONDS]]     # default 3 runs of 10 s
#
# Needs root (namespaces) and wireguard-go, wireguard-tools, iperf3.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin derpd
DERPD=target/release/derpd exec scripts/netns-tunnel-test.sh --bench "${1:-3}" "${2:-10}"
