#!/usr/bin/env python3
"""Before/after figures for issue 14, in one run: each scenario runs RUNS
times against each relay binary, alternating (before, after, before, …) so
both see the same machine, always with the same load generator. Prints the
medians side by side as Markdown.

    scripts/perf-compare.py BEFORE_BIN AFTER_BIN [--runs 3] [--bench BIN] [SCENARIO ...]

Scenarios: idle_plain idle_tls idle_many_plain idle_many_tls light light_tls
window_tls many storm (default: all). "many" is the most idle TLS clients one process's
FD limit allows (19,000 under a hard limit of 20,000) with 10 pairs x 1,000
packets/s; "storm" drops them all at once and redials them, and at the end
reads the relay's memory 60 s after every client has left.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hard_limit():
    out = subprocess.run(["bash", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
    return 1048576 if out == "unlimited" else int(out)


MANY = min(100000, (hard_limit() - 1000) // 1000 * 1000)
SOURCES = str(MANY // 14000 + 1)
IDLE = ["--pairs", "1", "--rate", "10", "--duration", "1s", "--source-addrs", SOURCES]
SCENARIOS = {
    "idle_plain": ([], IDLE + ["--idle", "10000"]),
    "idle_tls": (["--tls"], IDLE + ["--idle", "10000"]),
    "idle_many_plain": ([], IDLE + ["--idle", str(MANY)]),
    "idle_many_tls": (["--tls"], IDLE + ["--idle", str(MANY)]),
    "light": ([], ["--pairs", "10", "--rate", "1000", "--duration", "10s"]),
    "light_tls": (["--tls"], ["--pairs", "10", "--rate", "1000", "--duration", "10s"]),
    "window_tls": (["--tls"], ["--pairs", "10", "--window", "32", "--duration", "10s"]),
    "many": (["--tls"], ["--pairs", "10", "--rate", "1000", "--duration", "10s",
                         "--idle", str(MANY), "--source-addrs", SOURCES]),
    "storm": (["--tls"], ["--pairs", "10", "--rate", "1000", "--duration", "10s",
                          "--idle", str(MANY), "--source-addrs", SOURCES, "--storm",
                          "--idle-parallel", "256", "--settle", "60s"]),
}
# (label, path into the JSON report, format)
FIELDS = {
    "idle": [("bytes per idle client", "server_bytes_per_idle_client", "{:,.0f}"),
             ("server CPU µs per handshake", "server_cpu_us_per_handshake", "{:.0f}"),
             ("handshakes/s", "handshakes_per_sec", "{:,.0f}")],
    "light": [("server CPU µs/packet", "server_cpu_us_per_packet", "{:.1f}"),
              ("packets/s", "packets_per_sec", "{:,.0f}"),
              ("p99 µs", "latency_us.p99", "{:.0f}"),
              ("loss", "lost", "{:.0f}")],
    "storm": [("all back, s", "storm_all_back_secs", "{:.1f}"),
              ("p99 µs during storm", "storm.latency_us.p99", "{:,.0f}"),
              ("lost during storm", "storm.lost", "{:,.0f}"),
              ("p99 µs before storm", "latency_us.p99", "{:.0f}"),
              ("server CPU µs per redial", "storm.server_cpu_us_per_handshake", "{:.0f}"),
              ("relay RSS MiB before any client", "server_rss_kib_span.start", "{:.1f}", 1 / 1024),
              ("relay RSS MiB, peak", "server_rss_kib_span.max", "{:.1f}", 1 / 1024),
              ("relay RSS MiB 60 s after all left", "server_rss_kib_span.after", "{:.1f}", 1 / 1024)],
}


def kind(name):
    if name.startswith("idle"):
        return "idle"
    if name == "storm":
        return "storm"
    return "light"


def get(report, path):
    for part in path.split("."):
        if not isinstance(report, dict) or part not in report:
            return None
        report = report[part]
    return report


def run(relay, bench, name):
    pre, args = SCENARIOS[name]
    env = dict(os.environ, DERPD_BIN=relay, BENCH_BIN=bench)
    cmd = [os.path.join(ROOT, "scripts/bench-run.sh")] + pre + ["--"] + args + ["--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{name} with {relay} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bench", default=os.path.join(ROOT, "target/release/derpd"))
    ap.add_argument("scenarios", nargs="*")
    a = ap.parse_intermixed_args()
    names = a.scenarios or list(SCENARIOS)
    print(f"medians of {a.runs} runs, alternating; idle count for many/storm: {MANY} "
          f"from {SOURCES} source addresses\n")
    print("| scenario | figure | before | after |")
    print("|---|---|---|---|")
    for name in names:
        results = {"before": [], "after": []}
        for i in range(a.runs):
            for which, binary in (("before", a.before), ("after", a.after)):
                print(f"… {name} {which} {i + 1}/{a.runs}", file=sys.stderr)
                results[which].append(run(binary, a.bench, name))
        for label, path, fmt, *scale in FIELDS[kind(name)]:
            cells = []
            for which in ("before", "after"):
                vals = [v * (scale[0] if scale else 1)
                        for v in (get(r, path) for r in results[which]) if v is not None]
                cells.append(fmt.format(statistics.median(vals)) if vals else "—")
            print(f"| {name} | {label} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
