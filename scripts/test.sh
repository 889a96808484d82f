#!/usr/bin/env bash
# Runs derpd's whole test suite. Installs anything the tests need first, so
# it works on a fresh machine; CI (.ci/run) calls this same script.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: pebble (+ pebble-challtestsrv) is the ACME
# test CA of tests/acme.rs; scripts/deploy-test.sh tests deploy/ with Docker
# (docker.io), promtool and Prometheus (prometheus), kubectl (kubernetes-client,
# unless a kubectl is installed already), systemd-analyze (systemd) and ss
# (iproute2). openssl: stock s_client for tests/tls_records.rs.
apt_packages=()
command -v pebble >/dev/null 2>&1 && command -v pebble-challtestsrv >/dev/null 2>&1 ||
    apt_packages+=(pebble)
command -v dockerd >/dev/null 2>&1 || apt_packages+=(docker.io)
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 ||
    apt_packages+=(prometheus)
command -v kubectl >/dev/null 2>&1 || apt_packages+=(kubernetes-client)
command -v systemd-analyze >/dev/null 2>&1 || apt_packages+=(systemd)
# ss and ip (iproute2): listener backlog and the namespaces of
# tests/tunnel_netns.rs, which runs real WireGuard (wireguard-go +
# wireguard-tools) over `derpd tunnel` with ping, iperf3 and python3.
for pair in ss:iproute2 ip:iproute2 wireguard-go:wireguard-go wg:wireguard-tools \
    iperf3:iperf3 ping:iputils-ping python3:python3 openssl:openssl; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || apt_packages+=("${pair#*:}")
done
if [ ${#apt_packages[@]} -gt 0 ]; then
    echo "installing ${apt_packages[*]} (Debian packages the tests use)"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # One package may be named twice (iproute2): apt takes it once.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
# kubernetes-validate (PyPI) checks the rendered Kubernetes manifests.
if ! python3 -c "import kubernetes_validate, yaml" >/dev/null 2>&1; then
    echo "installing kubernetes-validate (PyPI)"
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

cargo test --locked --all-targets "$@"

# The deployment files, against the real tools (only for the whole suite,
# not when cargo test arguments pick some tests).
if [ $# -eq 0 ]; then
    ./scripts/deploy-test.sh
fi
