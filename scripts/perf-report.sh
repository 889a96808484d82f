#!/usr/bin/env bash
# Reproduces the figures of docs/PERFORMANCE.md: each scenario runs RUNS
# times (default 3) against a fresh release-build relay and the medians are
# printed as Markdown tables (throughput with the iperf3 baseline measured
# in the same run).
#   scripts/perf-report.sh [RUNS [SECONDS]] [SCENARIO...]
# Scenarios (default: all of them; the whole run is long):
#   tput     throughput, 1/10/100 pairs, window 32, plain and TLS (+ iperf3)
#   latency  10 pairs × 1,000 packets/s, plain and TLS
#   light    10 pairs × 1,000 packets/s plain: server CPU µs/packet
#   idle     10,000 idle clients, plain and TLS: bytes per idle client,
#            handshakes/s, server CPU µs per handshake
#   many     the most idle TLS clients the FD limit allows (19,000 at a hard
#            limit of 20,000) with 10 pairs × 1,000/s: µs/packet, loss, p99
#   storm    the same count, all dropped at once and redialed (--storm)
# Example: scripts/perf-report.sh 3 5 idle storm
set -euo pipefail
cd "$(dirname "$0")/.."
runs=3
secs=5
if [[ ${1:-} =~ ^[0-9]+$ ]]; then runs=$1; shift; fi
if [[ ${1:-} =~ ^[0-9]+$ ]]; then secs=$1; shift; fi
all=(tput latency light idle many storm)
if [ $# -eq 0 ]; then set -- "${all[@]}"; fi
for s in "$@"; do
  case " ${all[*]} " in *" $s "*) ;; *) echo "unknown scenario $s (want: ${all[*]})" >&2; exit 2 ;; esac
done
want() { [[ " $scenarios " == *" $1 "* ]]; }
scenarios=" $* "

# The most idle clients one bench process and one relay can hold: the hard
# FD limit less room for the pairs and the processes' own descriptors,
# rounded down to a thousand (at most 100,000, the issue's target); about
# 14,000 per loopback source address, so that a storm's TIME-WAIT ports and
# its redials fit in the ~28k ephemeral ports of each.
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
many=$(( (hard - 1000) / 1000 * 1000 ))
[ "$many" -gt 100000 ] && many=100000
sources=$(( many / 14000 + 1 ))

cargo build --release --quiet
out=$(mktemp -d)
bench() { # name, run-args...
  local name=$1; shift
  for i in $(seq "$runs"); do
    echo "… $name run $i/$runs" >&2
    scripts/bench-run.sh "$@" --json >"$out/$name.$i.json"
  done
}
iperf() {
  command -v iperf3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3; }
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  for i in $(seq "$runs"); do
    iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
    sleep 0.3
    iperf3 -c 127.0.0.1 -p "$port" -l 1237 -t "$secs" --json >"$out/iperf3.$i.json"
    wait
  done
}
if want tput; then
  iperf
  bench tput_p1 -- --pairs 1 --window 32 --duration "${secs}s"
  bench tput_p10 -- --pairs 10 --window 32 --duration "${secs}s"
  bench tput_p100 -- --pairs 100 --window 32 --duration "${secs}s"
  bench tput_p10_tls --tls -- --pairs 10 --window 32 --duration "${secs}s"
fi
if want latency; then
  bench latency_p10 -- --pairs 10 --rate 1000 --duration "$((secs * 2))s"
  bench latency_p10_tls --tls -- --pairs 10 --rate 1000 --duration "$((secs * 2))s"
fi
if want light; then
  bench light_p10 -- --pairs 10 --rate 1000 --duration "${secs}s"
fi
if want idle; then
  bench idle_plain -- --pairs 1 --rate 10 --duration 1s --idle 10000
  bench idle_tls --tls -- --pairs 1 --rate 10 --duration 1s --idle 10000
fi
if want many; then
  bench many_tls --tls -- --pairs 10 --rate 1000 --duration "${secs}s" --idle "$many" --source-addrs "$sources"
fi
if want storm; then
  # Steady for half of --duration, then the storm; the run lasts until
  # every client is back plus 1 s, or --duration, whichever is longer.
  bench storm_tls --tls -- --pairs 10 --rate 1000 --duration "$((secs * 2))s" --idle "$many" --source-addrs "$sources" --storm
fi
python3 - "$out" "$runs" "$many" "$sources" <<'PY'
import json, statistics, sys, glob, os
out, runs, many, sources = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def load(name):
    return [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{name}.*.json"))]
def have(*names):
    return all(load(n) for n in names)
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def f(v, fmt=",.0f"):
    return "-" if v is None else format(v, fmt)
def get(r, path):
    for k in path.split("."):
        r = r.get(k) if isinstance(r, dict) else None
    return r
def m(rs, path):
    return med([get(r, path) for r in rs])
print(f"(medians of {runs} runs; raw JSON in {out})\n")
if have("iperf3", "tput_p1", "tput_p10", "tput_p100", "tput_p10_tls"):
    ip = load("iperf3")
    iperf_bps = med([r["end"]["sum_received"]["bits_per_second"] for r in ip])
    iperf_pps = iperf_bps / 8 / 1237
    print(f"iperf3 -c 127.0.0.1 -l 1237: {iperf_bps/1e9:.2f} Gbit/s = {iperf_pps:,.0f} writes/s\n")
    print("| scenario | packets/s | Gbit/s payload | loss | vs iperf3 | server CPU µs/packet | server cores |")
    print("|---|---|---|---|---|---|---|")
    for name, label in [("tput_p1","1 pair, window 32"),("tput_p10","10 pairs, window 32"),("tput_p100","100 pairs, window 32"),("tput_p10_tls","10 pairs, window 32, TLS")]:
        rs = load(name)
        pps = m(rs, "packets_per_sec")
        print(f"| {label} | {f(pps)} | {f(m(rs,'gbit_per_sec'),'.2f')} | {max(r['lost'] for r in rs)} | {pps/iperf_pps*100:.0f}% | {f(m(rs,'server_cpu_us_per_packet'),'.2f')} | {f(m(rs,'server_cpu_cores'),'.2f')} |")
    print()
lat = [(n, l) for n, l in [("latency_p10","10 pairs × 1,000/s"),("latency_p10_tls","10 pairs × 1,000/s, TLS"),("light_p10","light load: 10 pairs × 1,000/s")] if have(n)]
if lat:
    print("| latency scenario | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | loss | server CPU µs/packet |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label in lat:
        rs = load(name)
        l = lambda k: f(m(rs, "latency_us." + k))
        print(f"| {label} | {l('p50')} | {l('p90')} | {l('p99')} | {l('p999')} | {l('max')} | {max(r['lost'] for r in rs)} | {f(m(rs,'server_cpu_us_per_packet'),'.2f')} |")
    print()
idle = [(n, l) for n, l in [("idle_plain","10,000 plain"),("idle_tls","10,000 TLS"),("many_tls",f"{many:,} TLS, {sources} source addresses, + 10 pairs × 1,000/s")] if have(n)]
if idle:
    print("| idle clients | server bytes per idle client | handshakes/s | server CPU µs per handshake | bench bytes per idle client | dial failures |")
    print("|---|---|---|---|---|---|")
    for name, label in idle:
        rs = load(name)
        print(f"| {label} | {f(m(rs,'server_bytes_per_idle_client'))} | {f(m(rs,'handshakes_per_sec'))} | {f(m(rs,'server_cpu_us_per_handshake'))} | {f(m(rs,'bench_bytes_per_idle_client'))} | {max(r['idle_dial_failures'] for r in rs)} |")
    print()
if have("many_tls"):
    rs = load("many_tls")
    print(f"| {many:,} idle TLS clients held | server CPU µs/packet | server cores | loss | p50 µs | p99 µs | p99.9 µs | max µs |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 10 pairs × 1,000/s | {f(m(rs,'server_cpu_us_per_packet'),'.2f')} | {f(m(rs,'server_cpu_cores'),'.2f')} | {max(r['lost'] for r in rs)} | {f(m(rs,'latency_us.p50'))} | {f(m(rs,'latency_us.p99'))} | {f(m(rs,'latency_us.p999'))} | {f(m(rs,'latency_us.max'))} |")
    print()
if have("storm_tls"):
    rs = load("storm_tls")
    print(f"Reconnect storm: {many:,} idle TLS clients ({sources} source addresses) dropped at once and redialed, 10 pairs × 1,000/s relaying throughout.\n")
    print("| all back in s | redials/s | failed dials (timed out / refused / other) | most tries by one client | server CPU µs per redial | bench cores until all back |")
    print("|---|---|---|---|---|---|")
    d = lambda k: f(m(rs, "storm.dials." + k))
    print(f"| {f(m(rs,'storm_all_back_secs'),'.2f')} | {f(m(rs,'storm.handshakes_per_sec'))} | {d('failures')} ({d('timed_out')} / {d('refused')} / {d('other')}) | {d('most_attempts')} | {f(m(rs,'storm.server_cpu_us_per_handshake'))} | {f(m(rs,'storm.bench_cpu_cores'),'.2f')} |")
    print()
    print("| pairs' window | loss | p50 µs | p99 µs | p99.9 µs | max µs | server cores |")
    print("|---|---|---|---|---|---|---|")
    for label, p in [("steady, before the storm", ""), ("during the storm", "storm.")]:
        print(f"| {label} | {max(get(r, p + 'lost') for r in rs)} | {f(m(rs,p+'latency_us.p50'))} | {f(m(rs,p+'latency_us.p99'))} | {f(m(rs,p+'latency_us.p999'))} | {f(m(rs,p+'latency_us.max'))} | {f(m(rs,p+'server_cpu_cores'),'.2f')} |")
    print(f"\n(a run lasts until every client is back plus 1 s, or --duration, whichever is longer; the storm starts halfway through --duration)")
PY
