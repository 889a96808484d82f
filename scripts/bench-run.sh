#!/usr/bin/env bash
# Runs one `derpd bench` against a fresh release-build relay on loopback.
#   scripts/bench-run.sh [--tls] [--server "extra serve flags"] -- <bench flags>
# Example: scripts/bench-run.sh -- --pairs 10 --window 32 --duration 10s
# DERPD_BIN picks the relay binary, BENCH_BIN the load generator (both
# default to target/release/derpd): see scripts/perf-compare.py.
#          scripts/bench-run.sh --tls -- --pairs 10 --rate 1000 --idle 10000 --source-addrs 2 --storm
set -euo pipefail
cd "$(dirname "$0")/.."
# The relay and the bench may hold as many sockets as the hard limit allows
# (both also raise their own soft limit at start, as Go programs do).
ulimit -n "$(ulimit -Hn)"
tls=0
server_flags=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tls) tls=1; shift ;;
    --server) server_flags="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
bin=${DERPD_BIN:-target/release/derpd}
[ -x "$bin" ] || cargo build --release --quiet
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ "$tls" = 1 ]; then
  # shellcheck disable=SC2086
  "$bin" serve -a "127.0.0.1:$port" --certmode self-signed --hostname localhost --http-port -1 \
    --key-file "$(mktemp -d)/k" --stun=false --metrics-addr off $server_flags >/dev/null 2>&1 &
  url="https://127.0.0.1:$port"
  extra=(--tls --insecure)
else
  # shellcheck disable=SC2086
  "$bin" serve --dev -a "127.0.0.1:$port" --stun=false --metrics-addr off $server_flags >/dev/null 2>&1 &
  url="http://127.0.0.1:$port"
  extra=()
fi
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  sleep 0.05
done
kill -0 "$pid"
"${BENCH_BIN:-$bin}" bench "$url" --server-pid "$pid" "${extra[@]}" "$@"
