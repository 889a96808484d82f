#!/usr/bin/env bash
# Runs derpd's whole test suite. Installs anything the tests need first, so
# it works on a fresh machine; CI (.ci/run) calls this same script.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --locked --all-targets "$@"
