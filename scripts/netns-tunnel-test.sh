#!/usr/bin/env bash
# Plain WireGuard over DERP, end to end, with real wireguard-go.
#
# Three network namespaces that this script creates and always removes:
#
#   A (192.0.2.2) ── veth ── R (192.0.2.1 | 198.51.100.1) ── veth ── B (198.51.100.2)
#
# R runs `derpd serve` and does not forward, so A and B cannot reach each
# other; their only way out is TCP to the relay. A and B each run
# wireguard-go (203.0.113.1 and 203.0.113.2) and `derpd tunnel`;
# WireGuard's Endpoint for the other side is the local tunnel socket.
#
# Test mode (default) checks: the handshake completes, ping works both
# ways, a 4 MiB TCP transfer each way is byte-exact, iperf3 throughput is
# reported, traffic stops while the relay is stopped and resumes when it is
# back.
#
# Bench mode (`--bench RUNS [SECONDS]`) instead runs iperf3 RUNS times
# through the tunnel, reading the tunnels' CPU time from /proc, then moves
# the same WireGuard pair onto a direct A–B veth and runs iperf3 RUNS times
# again; it prints every run and the medians.
#
# Needs root, /dev/net/tun, wireguard-go, wg, iperf3, ping, python3.
# DERPD=path/to/derpd picks the binary (default target/debug/derpd).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=test
RUNS=3
SECS=10
if [ "${1:-}" = "--bench" ]; then
    MODE=bench
    RUNS=${2:-3}
    SECS=${3:-10}
fi
DERPD=$(realpath "${DERPD:-target/debug/derpd}")
[ -x "$DERPD" ] || { echo "no derpd binary at $DERPD (cargo build first)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
[ -c /dev/net/tun ] || { echo "needs /dev/net/tun for wireguard-go" >&2; exit 1; }
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH # system python3, not a shim
for tool in wireguard-go wg iperf3 ping python3 ip ss; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

export NO_COLOR=1
ID="$$"
NA="dtA$ID"
NR="dtR$ID"
NB="dtB$ID"
# wireguard-go's control socket (/var/run/wireguard/<if>.sock) is shared by
# every namespace, so each interface gets a name of its own.
WA="wga$ID"
WB="wgb$ID"
WORK=$(mktemp -d)
PIDS=()
RELAY_PID=""

cleanup() {
    local rc=$?
    set +e
    if [ "$rc" -ne 0 ]; then
        echo "== FAILED (rc=$rc); logs:" >&2
        for f in "$WORK"/*.log; do
            [ -f "$f" ] || continue
            echo "--- $f" >&2
            tail -n 30 "$f" >&2
        done
    fi
    for p in "${PIDS[@]}" $RELAY_PID; do
        kill "$p" 2>/dev/null
    done
    for p in "${PIDS[@]}" $RELAY_PID; do
        wait "$p" 2>/dev/null
    done
    for ns in "$NA" "$NB" "$NR"; do
        # Anything still running in the namespace (e.g. an iperf3 server).
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    # wireguard-go removes its control socket on a clean exit; not if killed.
    rm -f "/var/run/wireguard/$WA.sock" "/var/run/wireguard/$WB.sock"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# (Background jobs call `ip netns exec` directly, so $! is the process
# itself and not a subshell.)
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
say() { echo "== $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# Polls "$@" until it succeeds, for at most $WAIT_FOR seconds.
WAIT_FOR=20
until_ok() {
    local deadline=$((SECONDS + WAIT_FOR))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# ---- namespaces and underlay -------------------------------------------
say "namespaces $NA $NR $NB"
for ns in "$NA" "$NR" "$NB"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip -n "$NA" link add veth0 type veth peer name vetha netns "$NR"
ip -n "$NB" link add veth0 type veth peer name vethb netns "$NR"
ip -n "$NA" addr add 192.0.2.2/24 dev veth0
ip -n "$NR" addr add 192.0.2.1/24 dev vetha
ip -n "$NB" addr add 198.51.100.2/24 dev veth0
ip -n "$NR" addr add 198.51.100.1/24 dev vethb
for pair in "$NA veth0" "$NB veth0" "$NR vetha" "$NR vethb"; do
    set -- $pair
    ip -n "$1" link set "$2" up
done
in_ns "$NR" sysctl -qw net.ipv4.ip_forward=0
if in_ns "$NA" ping -c 1 -W 1 198.51.100.2 >/dev/null 2>&1; then
    fail "A reaches B's underlay directly; the test would prove nothing"
fi

# ---- relay ---------------------------------------------------------------
start_relay() {
    ip netns exec "$NR" "$DERPD" serve --addr 0.0.0.0:3340 --hostname relay.test \
        --certmode none --stun=false --metrics-addr off \
        --state-dir "$WORK/relay-state" >>"$WORK/relay.log" 2>&1 &
    RELAY_PID=$!
    WAIT_FOR=10 until_ok in_ns "$NA" bash -c 'exec 3<>/dev/tcp/192.0.2.1/3340' ||
        fail "relay did not start"
}
say "relay in $NR on 192.0.2.1:3340 / 198.51.100.1:3340"
start_relay

# ---- keys ----------------------------------------------------------------
DK_A=$("$DERPD" keygen --out "$WORK/a.key")
DK_B=$("$DERPD" keygen --out "$WORK/b.key")
[ "$("$DERPD" keygen --public "$WORK/a.key")" = "$DK_A" ] || fail "keygen --public disagrees"
(umask 077 && wg genkey >"$WORK/a.wg" && wg genkey >"$WORK/b.wg")
WG_A=$(wg pubkey <"$WORK/a.wg")
WG_B=$(wg pubkey <"$WORK/b.wg")

# ---- tunnels -------------------------------------------------------------
say "derpd tunnel in $NA and $NB"
ip netns exec "$NA" "$DERPD" tunnel --server http://192.0.2.1:3340 --key-file "$WORK/a.key" \
    --peer "$DK_B=127.0.0.1:51900" --wg-addr 127.0.0.1:51820 \
    --metrics-listen 127.0.0.1:9341 --status-interval 5s --keepalive 2s >"$WORK/tunnel-a.log" 2>&1 &
TUN_A=$!
PIDS+=("$TUN_A")
ip netns exec "$NB" "$DERPD" tunnel --server http://198.51.100.1:3340 --key-file "$WORK/b.key" \
    --peer "$DK_A=127.0.0.1:51900" --wg-addr 127.0.0.1:51820 \
    --metrics-listen 127.0.0.1:9341 --status-interval 5s --keepalive 2s >"$WORK/tunnel-b.log" 2>&1 &
TUN_B=$!
PIDS+=("$TUN_B")

metrics() { # ns → the tunnel's /metrics text
    in_ns "$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9341 && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && cat <&3'
}
metric() { # ns series → value (0 if absent)
    metrics "$1" | awk -v s="$2" '$1 == s { print $2; found=1 } END { if (!found) print 0 }'
}
connected() { [ "$(metric "$1" derpd_tunnel_relay_connected)" = 1 ]; }
not_connected() { ! connected "$1"; }
until_ok connected "$NA" || fail "tunnel A never connected"
until_ok connected "$NB" || fail "tunnel B never connected"

# ---- WireGuard (wireguard-go) ---------------------------------------------
wg_up() { # ns iface privkey-file own-ip peer-pubkey peer-ip
    local ns=$1 wif=$2 key=$3 ip=$4 peer=$5 peer_ip=$6
    ip netns exec "$ns" env WG_PROCESS_FOREGROUND=1 wireguard-go -f "$wif" >"$WORK/wg-$ns.log" 2>&1 &
    PIDS+=("$!")
    WAIT_FOR=10 until_ok ip -n "$ns" link show "$wif" || fail "wireguard-go did not create $wif in $ns"
    WAIT_FOR=10 until_ok in_ns "$ns" wg show "$wif" || fail "wireguard-go in $ns not answering"
    in_ns "$ns" wg set "$wif" private-key "$key" listen-port 51820 \
        peer "$peer" endpoint 127.0.0.1:51900 allowed-ips "$peer_ip/32" persistent-keepalive 5
    ip -n "$ns" addr add "$ip/24" dev "$wif"
    ip -n "$ns" link set "$wif" up
}
say "wireguard-go: $NA $WA 203.0.113.1, $NB $WB 203.0.113.2"
wg_up "$NA" "$WA" "$WORK/a.wg" 203.0.113.1 "$WG_B" 203.0.113.2
wg_up "$NB" "$WB" "$WORK/b.wg" 203.0.113.2 "$WG_A" 203.0.113.1

handshake_done() { # ns iface
    in_ns "$1" wg show "$2" latest-handshakes | awk '$2 > 0 { ok=1 } END { exit !ok }'
}
say "waiting for the WireGuard handshake"
WAIT_FOR=30 until_ok handshake_done "$NA" "$WA" || fail "no handshake on A"
WAIT_FOR=30 until_ok handshake_done "$NB" "$WB" || fail "no handshake on B"
echo "handshake: A at $(in_ns "$NA" wg show "$WA" latest-handshakes | awk '{print $2}'), B at $(in_ns "$NB" wg show "$WB" latest-handshakes | awk '{print $2}') (unix time)"

iperf() { # label → runs iperf3 A→B for $SECS s, prints Gbit/s
    ip netns exec "$NB" iperf3 -s -1 -B 203.0.113.2 -p 5201 >"$WORK/iperf3-server.log" 2>&1 &
    local srv=$!
    WAIT_FOR=5 until_ok in_ns "$NB" bash -c "ss -ltn | grep -q ':5201 '" || true
    in_ns "$NA" iperf3 -c 203.0.113.2 -p 5201 -t "$SECS" -J >"$WORK/iperf3.json"
    wait "$srv" || true
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' "$WORK/iperf3.json"
}

if [ "$MODE" = test ]; then
    # ---- ping both ways ------------------------------------------------------
    say "ping"
    in_ns "$NA" ping -c 3 -i 0.2 -W 2 203.0.113.2 >/dev/null || fail "ping A → B"
    in_ns "$NB" ping -c 3 -i 0.2 -W 2 203.0.113.1 >/dev/null || fail "ping B → A"
    echo "ping A → B and B → A: ok"

    # ---- 4 MiB TCP transfer, both ways ------------------------------------------
    say "4 MiB TCP transfers"
    head -c $((4 << 20)) /dev/urandom >"$WORK/data"
    xfer() { # from-ns to-ns to-ip
        ip netns exec "$2" python3 - "$3" "$WORK/recv" <<'EOF' &
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); s.settimeout(30)
c, _ = s.accept(); c.settimeout(30)
with open(sys.argv[2], "wb") as f:
    while True:
        b = c.recv(1 << 16)
        if not b: break
        f.write(b)
EOF
        local rx=$!
        WAIT_FOR=5 until_ok in_ns "$2" bash -c "ss -ltn | grep -q ':5001 '"
        in_ns "$1" python3 - "$3" "$WORK/data" <<'EOF'
import socket, sys
c = socket.create_connection((sys.argv[1], 5001), timeout=30)
with open(sys.argv[2], "rb") as f:
    c.sendall(f.read())
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
EOF
        wait "$rx"
        cmp "$WORK/data" "$WORK/recv" || fail "transfer $1 → $2 altered"
        rm -f "$WORK/recv"
    }
    xfer "$NA" "$NB" 203.0.113.2
    xfer "$NB" "$NA" 203.0.113.1
    echo "4 MiB A → B and B → A: byte-exact ($(sha256sum <"$WORK/data" | cut -c1-16)…)"

    # ---- iperf3 ----------------------------------------------------------------
    SECS=5
    say "iperf3 A → B through WireGuard over derpd (${SECS}s)"
    echo "iperf3: $(iperf) Gbit/s"
    [ "$(metric "$NA" derpd_tunnel_dropped_packets_total'{reason="unknown_key"}')" = 0 ] ||
        fail "tunnel A dropped packets from unknown keys"

    # ---- relay stopped: traffic stops; back: traffic resumes ---------------------
    say "stopping the relay"
    kill -TERM "$RELAY_PID"
    wait "$RELAY_PID" || true
    RELAY_PID=""
    WAIT_FOR=10 until_ok not_connected "$NA" || fail "tunnel A still claims a relay"
    if in_ns "$NA" ping -c 3 -i 0.3 -W 1 203.0.113.2 >/dev/null 2>&1; then
        fail "ping A → B works with the relay stopped"
    fi
    echo "relay stopped: ping A → B fails, as it must"
    say "restarting the relay"
    start_relay
    WAIT_FOR=30 until_ok connected "$NA" || fail "tunnel A did not reconnect"
    WAIT_FOR=30 until_ok connected "$NB" || fail "tunnel B did not reconnect"
    WAIT_FOR=30 until_ok in_ns "$NA" ping -c 1 -W 1 203.0.113.2 || fail "traffic did not resume"
    echo "relay back: tunnels reconnected (A reconnects: $(metric "$NA" derpd_tunnel_reconnects_total)), ping resumes"
    say "PASS"
    exit 0
fi

# ---- bench ------------------------------------------------------------------
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
packets() { # ns → every datagram the tunnel carried, both directions
    metrics "$1" | awk '$1 ~ /^derpd_tunnel_packets_total/ { s += $2 } END { print s + 0 }'
}
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

say "iperf3 through WireGuard over derpd: $RUNS runs of ${SECS}s"
: >"$WORK/tunnel-runs"
for i in $(seq "$RUNS"); do
    a0=$(cpu_ticks "$TUN_A"); b0=$(cpu_ticks "$TUN_B"); r0=$(cpu_ticks "$RELAY_PID")
    pa0=$(packets "$NA"); pb0=$(packets "$NB")
    gbps=$(iperf)
    a1=$(cpu_ticks "$TUN_A"); b1=$(cpu_ticks "$TUN_B"); r1=$(cpu_ticks "$RELAY_PID")
    pa1=$(packets "$NA"); pb1=$(packets "$NB")
    python3 - "$gbps" "$HZ" "$SECS" "$((a1 - a0))" "$((b1 - b0))" "$((r1 - r0))" "$((pa1 - pa0))" "$((pb1 - pb0))" >>"$WORK/tunnel-runs" <<'EOF'
import sys
gbps, hz, secs = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
ta, tb, tr, pa, pb = (int(x) for x in sys.argv[4:9])
cpu_us = (ta + tb) / hz * 1e6
us_per_packet = cpu_us / max(pa + pb, 1)
# Each datagram is handled once by each tunnel (A sends it, B delivers it).
pps_1g = 1e9 / 8 / 1452
print(f"{gbps:.3f} {us_per_packet:.2f} {ta/hz/secs:.2f} {tb/hz/secs:.2f} {tr/hz/secs:.2f} {(pa+pb)/2/secs:.0f} {us_per_packet*pps_1g/1e6:.3f}")
EOF
    echo "run $i: $(tail -n 1 "$WORK/tunnel-runs")"
done

say "same WireGuard pair over a direct veth ($NA 203.0.113.129 ↔ $NB 203.0.113.130)"
ip -n "$NA" link add veth1 type veth peer name veth1 netns "$NB"
ip -n "$NA" addr add 203.0.113.129/25 dev veth1
ip -n "$NB" addr add 203.0.113.130/25 dev veth1
ip -n "$NA" link set veth1 up
ip -n "$NB" link set veth1 up
ip -n "$NA" addr del 203.0.113.1/24 dev "$WA" && ip -n "$NA" addr add 203.0.113.1/32 dev "$WA"
ip -n "$NB" addr del 203.0.113.2/24 dev "$WB" && ip -n "$NB" addr add 203.0.113.2/32 dev "$WB"
ip -n "$NA" route add 203.0.113.2/32 dev "$WA"
ip -n "$NB" route add 203.0.113.1/32 dev "$WB"
in_ns "$NA" wg set "$WA" peer "$WG_B" endpoint 203.0.113.130:51820
in_ns "$NB" wg set "$WB" peer "$WG_A" endpoint 203.0.113.129:51820
WAIT_FOR=10 until_ok in_ns "$NA" ping -c 1 -W 1 203.0.113.2 || fail "direct path does not work"
: >"$WORK/direct-runs"
for i in $(seq "$RUNS"); do
    gbps=$(iperf)
    echo "$gbps" >>"$WORK/direct-runs"
    echo "run $i: $gbps Gbit/s"
done

say "medians ($RUNS runs of ${SECS}s)"
echo "direct veth:        $(median <"$WORK/direct-runs") Gbit/s"
echo "through derpd:      $(awk '{print $1}' "$WORK/tunnel-runs" | median) Gbit/s"
echo "tunnel CPU/packet:  $(awk '{print $2}' "$WORK/tunnel-runs" | median) µs (per tunnel per datagram)"
echo "tunnel A cores:     $(awk '{print $3}' "$WORK/tunnel-runs" | median)"
echo "tunnel B cores:     $(awk '{print $4}' "$WORK/tunnel-runs" | median)"
echo "relay cores:        $(awk '{print $5}' "$WORK/tunnel-runs" | median)"
echo "datagrams/s:        $(awk '{print $6}' "$WORK/tunnel-runs" | median)"
echo "cores per tunnel at 1 Gbit/s (1452-byte datagrams): $(awk '{print $7}' "$WORK/tunnel-runs" | median)"
