#!/usr/bin/env bash
# The soak in docs/RELIABILITY.md: a release-build relay on loopback under
# idle clients, connection churn and active pairs, then a check of the
# server log for panics. Extra arguments go to `derpd bench`.
#   scripts/soak.sh [bench flags]     (default: the 10-minute soak)
# DERPD_BIN overrides the binary (default target/release/derpd).
# Exits non-zero on a panic or a packet delivered to the wrong key.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${DERPD_BIN:-target/release/derpd}
[ -x "$bin" ] || cargo build --release --quiet
if [ $# -eq 0 ]; then
  set -- --pairs 10 --rate 1000 --idle 5000 --churn-rate 250 --duration 10m
fi
out=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
metrics=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RUST_BACKTRACE=1 "$bin" serve --dev -a "127.0.0.1:$port" --stun=false \
  --metrics-addr "127.0.0.1:$metrics" >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.05
done
kill -0 "$pid"
"$bin" bench "http://127.0.0.1:$port" --server-pid "$pid" --json "$@" >"$out/report.json"
kill -0 "$pid" # the relay is still up
panics=$(grep -c "panicked" "$out/server.log" || true)
echo "report and server log: $out"
python3 - "$out/report.json" "$panics" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
panics = int(sys.argv[2])
c = r.get("churn") or {}
rss, fds = r.get("server_rss_kib_span") or {}, r.get("server_fds") or {}
print(f"seconds {r['seconds']:.0f} · pairs {r['pairs']} · {r['mode']} · idle {r['idle_clients']}")
print(f"panics {panics} · wrong key {r['wrong_key']} · wrong src {r['wrong_src']}")
print(f"pairs: sent {r['sent']} received {r['received']} lost {r['lost']}")
l = r["latency_us"]
print(f"latency µs p50 {l['p50']:.0f} · p99 {l['p99']:.0f} · p99.9 {l['p999']:.0f} · max {l['max']:.0f}")
print(f"churn {c.get('rate')}/s: connections {c.get('connections')} · dial errors {c.get('dial_errors')}"
      f" · rounds {c.get('rounds')} · skipped {c.get('skipped')} · timed out {c.get('timed_out')}"
      f" · delivered {c.get('delivered')}/{c.get('sent')}")
for name, s in (("RSS KiB", rss), ("FDs", fds)):
    if s:
        print(f"server {name}: start {s['start']} · max {s['max']} · end {s['end']} · after {s['after']}")
sys.exit(1 if panics or r["wrong_key"] or r["wrong_src"] else 0)
PY
