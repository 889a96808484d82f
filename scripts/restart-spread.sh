#!/usr/bin/env bash
# A relay restart seen from its clients: two meshed plain-HTTP relays on
# loopback (A and its peer B), N idle clients on A, SIGTERM to A; each
# client redials B as soon as A closes its connection (as tailscaled does).
# Prints, per second after the SIGTERM, connections closed by A and
# clients back on B.
#   scripts/restart-spread.sh [N] [-- extra serve flags for A]
# Example: scripts/restart-spread.sh 10000 -- --restart-reconnect-spread 10s
# DERPD_BIN picks the relay binary, BENCH_BIN the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)"
n=${1:-10000}
shift || true
[ "${1:-}" = "--" ] && shift
bin=${DERPD_BIN:-target/release/derpd}
[ -x "$bin" ] || cargo build --release --quiet
dir=$(mktemp -d)
"${BENCH_BIN:-$bin}" keygen --mesh > "$dir/psk"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pa=$(free_port); pb=$(free_port)
common=(serve --dev --stun=false --metrics-addr off --mesh-psk-file "$dir/psk")
# shellcheck disable=SC2086
"$bin" "${common[@]}" -a "127.0.0.1:$pb" --mesh-with "http://127.0.0.1:$pa" ${PEER_FLAGS:-} >/dev/null 2>&1 &
b=$!
"$bin" "${common[@]}" -a "127.0.0.1:$pa" --mesh-with "http://127.0.0.1:$pb" "$@" >/dev/null 2>&1 &
a=$!
trap 'kill $a $b 2>/dev/null; wait $a $b 2>/dev/null || true; rm -rf "$dir"' EXIT
for p in $pa $pb; do
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then break; fi
    sleep 0.05
  done
done
sleep 1 # the mesh links come up
"${BENCH_BIN:-$bin}" bench "http://127.0.0.1:$pa" --idle "$n" --idle-parallel 64 \
  --source-addrs 2 --restart-pid "$a" --restart-to "http://127.0.0.1:$pb" ${JSON:+--json}
