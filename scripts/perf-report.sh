#!/usr/bin/env bash
# Reproduces every figure in docs/PERFORMANCE.md: each scenario runs RUNS
# times (default 3) against a fresh release-build relay, with the iperf3
# baseline measured in the same run, and prints medians as a Markdown table.
#   scripts/perf-report.sh [RUNS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
secs=${2:-5}
command -v iperf3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3; }
cargo build --release --quiet
out=$(mktemp -d)
bench() { # name, run-args...
  local name=$1; shift
  for i in $(seq "$runs"); do
    scripts/bench-run.sh "$@" --json >"$out/$name.$i.json"
  done
}
iperf() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  for i in $(seq "$runs"); do
    iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
    sleep 0.3
    iperf3 -c 127.0.0.1 -p "$port" -l 1237 -t "$secs" --json >"$out/iperf3.$i.json"
    wait
  done
}
iperf
bench tput_p1 -- --pairs 1 --window 32 --duration "${secs}s"
bench tput_p10 -- --pairs 10 --window 32 --duration "${secs}s"
bench tput_p100 -- --pairs 100 --window 32 --duration "${secs}s"
bench tput_p10_tls --tls -- --pairs 10 --window 32 --duration "${secs}s"
bench latency_p10 -- --pairs 10 --rate 1000 --duration "$((secs * 2))s"
bench latency_p10_tls --tls -- --pairs 10 --rate 1000 --duration "$((secs * 2))s"
bench idle_plain -- --pairs 1 --rate 10 --duration 1s --idle 10000
bench idle_tls --tls -- --pairs 1 --rate 10 --duration 1s --idle 10000
python3 - "$out" "$runs" <<'PY'
import json, statistics, sys, glob, os
out, runs = sys.argv[1], int(sys.argv[2])
def load(name):
    return [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{name}.*.json"))]
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
ip = load("iperf3")
iperf_bps = med([r["end"]["sum_received"]["bits_per_second"] for r in ip])
iperf_pps = iperf_bps / 8 / 1237
print(f"iperf3 -c 127.0.0.1 -l 1237: {iperf_bps/1e9:.2f} Gbit/s = {iperf_pps:,.0f} writes/s (median of {runs})\n")
print("| scenario | packets/s | Gbit/s payload | loss | vs iperf3 | server CPU µs/packet | server cores |")
print("|---|---|---|---|---|---|---|")
for name, label in [("tput_p1","1 pair, window 32"),("tput_p10","10 pairs, window 32"),("tput_p100","100 pairs, window 32"),("tput_p10_tls","10 pairs, window 32, TLS")]:
    rs = load(name)
    pps = med([r["packets_per_sec"] for r in rs]); g = med([r["gbit_per_sec"] for r in rs])
    lost = max(r["lost"] for r in rs); cpu = med([r["server_cpu_us_per_packet"] for r in rs]); cores = med([r["server_cpu_cores"] for r in rs])
    print(f"| {label} | {pps:,.0f} | {g:.2f} | {lost} | {pps/iperf_pps*100:.0f}% | {cpu:.2f} | {cores:.2f} |")
print("\n| latency scenario | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | loss | server CPU µs/packet |")
print("|---|---|---|---|---|---|---|---|")
for name, label in [("latency_p10","10 pairs × 1,000/s"),("latency_p10_tls","10 pairs × 1,000/s, TLS")]:
    rs = load(name)
    l = lambda k: med([r["latency_us"][k] for r in rs])
    print(f"| {label} | {l('p50'):.0f} | {l('p90'):.0f} | {l('p99'):.0f} | {l('p999'):.0f} | {l('max'):.0f} | {max(r['lost'] for r in rs)} | {med([r['server_cpu_us_per_packet'] for r in rs]):.2f} |")
print("\n| idle clients | server bytes per idle client | handshakes/s |")
print("|---|---|---|")
for name, label in [("idle_plain","10,000 plain"),("idle_tls","10,000 TLS")]:
    rs = load(name)
    print(f"| {label} | {med([r['server_bytes_per_idle_client'] for r in rs]):,.0f} | {med([r['handshakes_per_sec'] for r in rs]):,.0f} |")
print(f"\n(raw JSON in {out})")
PY
