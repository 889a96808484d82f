#!/usr/bin/env bash
# Runs derpd's whole test suite. Installs anything the tests need first, so
# it works on a fresh machine; CI (.ci/run) calls this same script.
set -euo pipefail
cd "$(dirname "$0")/.."

# tests/acme.rs runs a real ACME test CA: Debian's pebble (+ pebble-challtestsrv).
if ! command -v pebble >/dev/null 2>&1 || ! command -v pebble-challtestsrv >/dev/null 2>&1; then
    echo "installing pebble (ACME test server) for tests/acme.rs"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pebble >/dev/null
fi

# tests/tunnel_netns.rs runs real WireGuard (wireguard-go + wireguard-tools)
# over `derpd tunnel` in network namespaces, with ping, iperf3 and python3.
need=()
for pair in wireguard-go:wireguard-go wg:wireguard-tools iperf3:iperf3 ping:iputils-ping python3:python3 ip:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "installing ${need[*]} for tests/tunnel_netns.rs"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo test --locked --all-targets "$@"
