#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 20) on the
# stable toolchain without a sanitizer, starting from the committed seeds in
# fuzz/seeds/<target>/ plus the working corpus fuzz/corpus/<target>/ (not
# committed). Prints executions and coverage per target; exits non-zero if
# any target fails to build or finds a crash (inputs land in
# fuzz/artifacts/<target>/).
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-20}"
shift || true

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# -a: debug assertions (and so integer overflow checks) in the fuzzed code.
opts=(--sanitizer none -a)

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== cargo fuzz build (${#targets[@]} targets)"
cargo fuzz build "${opts[@]}"

logs="${FUZZ_LOG_DIR:-fuzz/logs}"
mkdir -p "$logs"
failed=()
printf '%-20s %12s %8s %8s %8s  %s\n' target execs exec/s cov ft result > "$logs/summary.txt"
for t in "${targets[@]}"; do
    echo "== fuzz $t for ${secs}s"
    mkdir -p "fuzz/corpus/$t"
    seeds="fuzz/seeds/$t"
    [ -d "$seeds" ] || seeds=""
    result=ok
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb bounds memory.
    if ! cargo fuzz run "${opts[@]}" "$t" "fuzz/corpus/$t" $seeds -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 > "$logs/$t.log" 2>&1; then
        result=FAILED
        failed+=("$t")
        tail -n 40 "$logs/$t.log"
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -n1)
    # The last status line (DONE, or the last pulse before a crash).
    last=$(grep -E '^#[0-9]+' "$logs/$t.log" | tail -n1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    printf '%-20s %12s %8s %8s %8s  %s\n' "$t" "${execs:--}" "${rate:--}" "${cov:--}" "${ft:--}" "$result" \
        >> "$logs/summary.txt"
done

echo "== fuzz summary (${secs}s per target; logs in $logs/)"
cat "$logs/summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (crash inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
