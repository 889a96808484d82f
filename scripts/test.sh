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

cargo test --locked --all-targets "$@"
