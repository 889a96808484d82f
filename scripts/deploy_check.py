#!/usr/bin/env python3
"""Checks of the files in deploy/ that need more than one command line.
Called by scripts/deploy-test.sh; each subcommand exits non-zero with a
message saying what is wrong.

  alert-tests              every alert has tests/<Alert>.yml, firing and not
  kustomize-render FILE    the render has a StatefulSet, Services, Secrets, a PDB
  prober-render FILE       the prober component's render: a non-root Deployment
  validate-output FILE     kubernetes-validate --strict output: all passed
  live DERPD PROMETHEUS    real derpd relays + real Prometheus with the rules
  base-config DERPD        derpd runs with the Kubernetes base's derpd.toml and
                           derpmap.json, and refuses the placeholder mesh key
  role-render FILE BASE EXPECT DERPD
                           the Ansible role's render FILE is the Kustomize
                           render BASE changed only as the role's variables
                           (JSON file EXPECT) ask, and derpd runs with it
  outage-recipe DERPD      README's "Surviving a headscale outage": its derpd
                           settings outlive a headscale outage and a restart,
                           refuse a stranger and report the outage; its
                           policy grants cache-network-maps
  free-port                print a free loopback port (TCP and UDP)
  wait-healthy URL         wait until URL answers 200
"""
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "deploy", "prometheus", "derpd-alerts.yml")
PROBER_RULES = os.path.join(ROOT, "deploy", "prometheus", "derpd-prober-alerts.yml")
RULE_FILES = [RULES, PROBER_RULES]
TESTS = os.path.join(ROOT, "deploy", "prometheus", "tests")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "derpd.json")
# Kinds that are not part of Kubernetes itself (CRDs): kubernetes-validate
# has no schema for them.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
}


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def alerts():
    out = []
    for path in RULE_FILES:
        with open(path) as f:
            doc = yaml.safe_load(f)
        out += [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    return out


def alert_tests():
    names = [r["alert"] for r in alerts()]
    problems = []
    for name in names:
        path = os.path.join(TESTS, f"{name}.yml")
        if not os.path.exists(path):
            problems.append(f"{name}: no test file {path}")
            continue
        with open(path) as f:
            doc = yaml.safe_load(f)
        cases = [
            c
            for t in doc.get("tests", [])
            for c in t.get("alert_rule_test", [])
            if c.get("alertname") == name
        ]
        if not any(c.get("exp_alerts") for c in cases):
            problems.append(f"{name}: no case where it fires")
        if not any(not c.get("exp_alerts") for c in cases):
            problems.append(f"{name}: no case where it does not fire")
    if problems:
        fail("; ".join(problems))
    print(f"{len(names)} alerts, each tested firing and not firing")


def kustomize_render(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d["metadata"]["name"])
    for kind in ["StatefulSet", "Service", "Secret", "PodDisruptionBudget"]:
        if kind not in kinds:
            fail(f"{path}: no {kind} in the render (kinds: {sorted(kinds)})")
    # Every Secret/ConfigMap the pods mount or read exists in the render.
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for d in docs:
        if d["kind"] != "StatefulSet":
            continue
        spec = d["spec"]["template"]["spec"]
        for v in spec.get("volumes", []):
            if "secret" in v and ("Secret", v["secret"]["secretName"]) not in names:
                if v["secret"]["secretName"] != "derpd-tls":  # made by cert-manager
                    fail(f"volume {v['name']}: Secret {v['secret']['secretName']} not rendered")
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
                fail(f"volume {v['name']}: ConfigMap {v['configMap']['name']} not rendered")
        c = spec["containers"][0]
        sc = c.get("securityContext", {})
        if not (sc.get("readOnlyRootFilesystem") and sc.get("runAsNonRoot")
                and sc.get("capabilities", {}).get("drop") == ["ALL"]):
            fail(f"container securityContext is not read-only/non-root/drop ALL: {sc}")
    print(", ".join(f"{k} x{len(v)}" for k, v in sorted(kinds.items())))


def prober_render(path):
    """deploy/kubernetes/prober: one Deployment running `derpd prober`,
    read-only, non-root, with its Service; every ConfigMap it mounts is
    rendered."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d["metadata"]["name"])
    for kind in ["Deployment", "Service", "ConfigMap"]:
        if kind not in kinds:
            fail(f"{path}: no {kind} in the render (kinds: {sorted(kinds)})")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    dep = next(d for d in docs if d["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    for v in spec.get("volumes", []):
        if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
            fail(f"volume {v['name']}: ConfigMap {v['configMap']['name']} not rendered")
    c = spec["containers"][0]
    if c.get("args", [])[:1] != ["prober"]:
        fail(f"the container does not run `derpd prober`: {c.get('args')}")
    sc = c.get("securityContext", {})
    if not (sc.get("readOnlyRootFilesystem") and sc.get("runAsNonRoot")
            and sc.get("capabilities", {}).get("drop") == ["ALL"]):
        fail(f"container securityContext is not read-only/non-root/drop ALL: {sc}")
    print(", ".join(f"{k} x{len(v)}" for k, v in sorted(kinds.items())))


def validate_output(path):
    """kubernetes-validate prints one line per object; all must pass, except
    the known CRD kinds, which it has no schema for."""
    with open(path) as f:
        lines = [l.strip() for l in f if l.strip()]
    bad = []
    for l in lines:
        if " passed for resource " in l:
            continue
        m = re.search(r"Couldn't find schema for kind (\S+) with api version (\S+)", l)
        if m and (m.group(2), m.group(1)) in CRD_KINDS:
            continue
        bad.append(l)
    if bad:
        fail("kubernetes-validate: " + " | ".join(bad))
    if not any(" passed for resource " in l for l in lines):
        fail("kubernetes-validate validated nothing")
    print(f"{sum(' passed for resource ' in l for l in lines)} objects passed strict validation")


# --- PromQL expressions and the metric names they use ----------------------

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "and", "or", "unless", "atan2", "inf", "nan", "start", "end",
    # aggregation operators (may be followed by a by/without clause)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
    "count_values", "bottomk", "topk", "quantile",
}


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p.get('title')!r}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return out, dash


def grafana_to_promql(expr):
    """Replaces Grafana's variables by values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r'\$\{?instance\}?', ".*", expr)


def metric_names(expr):
    """Metric names in a PromQL expression: identifiers that are not
    functions, keywords, label names or durations."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # strings
    e = re.sub(r"\{[^}]*\}", "", e)                           # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                          # ranges, subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)", e):
        name = m.group(1)
        rest = e[m.end():].lstrip()
        if rest.startswith("(") or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def all_exprs():
    exprs = [(f"alert {r['alert']}", r["expr"]) for r in alerts()]
    dash, doc = dashboard_exprs()
    exprs += [(w, grafana_to_promql(e)) for w, e in dash]
    for v in doc.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.match(r"label_values\((\w+)", q or "")
        if m:
            exprs.append((f"variable {v['name']}", m.group(1)))
    return exprs


# --- running processes -----------------------------------------------------

def free_port():
    """A loopback port free for TCP and UDP, below the ephemeral range."""
    import random
    for _ in range(1000):
        port = random.randint(20000, 31999)
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            t.bind(("127.0.0.1", port))
            u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    fail("no free loopback port")


def http_get(url, timeout=3):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # derpd's self-signed certificate
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return None, str(e)


def wait_for(what, cond, timeout=60):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = cond()
        if ok:
            return last
        time.sleep(0.25)
    fail(f"timed out waiting for {what}: {last}")


def scrape_names(text):
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, 1)[0])
    return names


def prom_api(base, path, **params):
    url = f"{base}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    status, body = http_get(url)
    if status is None:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None  # e.g. 503 "Service Unavailable" while Prometheus starts


def live(derpd, prometheus):
    derpd = os.path.abspath(derpd)
    tmp = tempfile.mkdtemp(prefix="derpd-deploy-")
    procs = []

    def start(name, args):
        log = open(os.path.join(tmp, f"{name}.log"), "w")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
        procs.append((name, p))
        return p

    try:
        _live(derpd, prometheus, tmp, start)
    except SystemExit:
        for name, _ in procs:
            path = os.path.join(tmp, f"{name}.log")
            with open(path) as f:
                tail = f.read()[-3000:]
            print(f"--- last lines of {name}'s log:\n{tail}", file=sys.stderr)
        raise
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _live(derpd, prometheus, tmp, start):
    mesh_key = os.path.join(tmp, "mesh.key")
    with open(mesh_key, "w") as f:
        f.write(subprocess.check_output([derpd, "keygen", "--mesh"], text=True))
    api_key = os.path.join(tmp, "headscale.key")
    with open(api_key, "w") as f:
        f.write("hskey-test.0123456789abcdef\n")
    # A stand-in headscale: python's static file server answers
    # GET /api/v1/node with a node list in headscale's JSON.
    os.makedirs(os.path.join(tmp, "hs", "api", "v1"))
    with open(os.path.join(tmp, "hs", "api", "v1", "node"), "w") as f:
        json.dump({"nodes": [{
            "id": "1", "name": "n1", "givenName": "n1",
            "nodeKey": "nodekey:" + "ab" * 32,
            "user": {"id": "1", "name": "proj-a"},
            "tags": [], "expiry": None, "online": True,
        }]}, f)
    ph = free_port()
    start("headscale-stand-in", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                 "--directory", os.path.join(tmp, "hs"), str(ph)])

    pa, sa, ma, pb, sb, mb, pp = (free_port() for _ in range(7))
    # Relay B: plain, a mesh member that A dials.
    start("derpd-b", [derpd, "serve", "--addr", f"127.0.0.1:{pb}", "--stun-port", str(sb),
                      "--metrics-addr", f"127.0.0.1:{mb}", "--state-dir", os.path.join(tmp, "b"),
                      "--mesh-psk-file", mesh_key])
    # Relay A: TLS (self-signed, so the certificate metrics exist), meshed
    # with B, headscale companion, a connection limit.
    start("derpd-a", [derpd, "serve", "--addr", f"127.0.0.1:{pa}", "--certmode", "self-signed",
                      "--http-port", "-1", "--stun-port", str(sa),
                      "--metrics-addr", f"127.0.0.1:{ma}", "--state-dir", os.path.join(tmp, "a"),
                      "--mesh-psk-file", mesh_key, "--mesh-with", f"http://127.0.0.1:{pb}",
                      "--headscale-url", f"http://127.0.0.1:{ph}",
                      "--headscale-api-key-file", api_key, "--verify-clients", "headscale",
                      "--max-connections", "1000"])

    wait_for("relay A ready (headscale snapshot loaded)",
             lambda: (lambda r: (r[0] == 200, r))(http_get(f"https://127.0.0.1:{pa}/readyz")))
    wait_for("relay B healthy",
             lambda: (lambda r: (r[0] == 200, r))(http_get(f"http://127.0.0.1:{pb}/healthz")))

    def mesh_up():
        s, body = http_get(f"http://127.0.0.1:{ma}/metrics")
        return (s == 200 and re.search(r"^derpd_mesh_link_up\{[^}]*\} 1$", body or "", re.M)
                is not None), body[-300:] if body else body
    wait_for("A's mesh link to B", mesh_up)

    # A prober watching both relays: A (TLS, self-signed, so its TLS and
    # DERP probes fail but the certificate's expiry is read) and B twice
    # (plain HTTP), so a mesh pair and a bandwidth burst succeed.
    mp = free_port()
    derpmap = os.path.join(tmp, "prober-map.json")
    with open(derpmap, "w") as f:
        json.dump({"Regions": {"900": {"RegionID": 900, "RegionCode": "live", "Nodes": [
            {"Name": "a", "RegionID": 900, "HostName": "localhost", "IPv4": "127.0.0.1",
             "IPv6": "none", "DERPPort": pa, "STUNPort": sa},
            {"Name": "b1", "RegionID": 900, "HostName": "127.0.0.1", "IPv6": "none",
             "DERPPort": pb, "STUNPort": sb, "InsecureForTests": True},
            {"Name": "b2", "RegionID": 900, "HostName": "127.0.0.1", "IPv6": "none",
             "DERPPort": pb, "STUNPort": sb, "InsecureForTests": True},
        ]}}}, f)
    start("derpd-prober", [derpd, "prober", "--derp-map", derpmap,
                           "--listen", f"127.0.0.1:{mp}", "--interval", "1s",
                           "--mesh-timeout", "2s", "--bw-interval", "1s", "--bw-size", "100000",
                           "--bw-timeout", "3s"])

    def prober_ran():
        s, body = http_get(f"http://127.0.0.1:{mp}/metrics")
        names = scrape_names(body or "") if s == 200 else set()
        want = {"derpd_prober_bandwidth_bytes_per_second",
                "derpd_prober_cert_expiry_timestamp_seconds", "derpd_prober_pair_latency_seconds"}
        return want <= names, sorted(want - names)
    wait_for("the prober's first runs", prober_ran)

    exported = set()
    for m in (ma, mb, mp):
        s, body = http_get(f"http://127.0.0.1:{m}/metrics")
        if s != 200:
            fail(f"/metrics on 127.0.0.1:{m} answered {s}: {body}")
        exported |= scrape_names(body)

    # Every metric name the alerts and the dashboard use is exported.
    missing = []
    exprs = all_exprs()
    for where, expr in exprs:
        for name in sorted(metric_names(expr) - exported):
            missing.append(f"{where}: {name}")
    if missing:
        fail("metrics not exported by a running derpd or derpd prober: " + "; ".join(missing))
    print(f"{len(exprs)} expressions; every metric they name is exported "
          f"({len(exported)} series names scraped)")

    # Real Prometheus scrapes both relays with the alert rules loaded.
    cfg = os.path.join(tmp, "prometheus.yml")
    with open(cfg, "w") as f:
        yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": RULE_FILES,
            "scrape_configs": [
                {"job_name": "derpd", "static_configs": [
                    {"targets": [f"127.0.0.1:{ma}", f"127.0.0.1:{mb}"]}]},
                {"job_name": "derpd-prober", "static_configs": [
                    {"targets": [f"127.0.0.1:{mp}"]}]},
            ],
        }, f)
    start("prometheus", [prometheus, f"--config.file={cfg}",
                         f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
                         f"--web.listen-address=127.0.0.1:{pp}"])
    base = f"http://127.0.0.1:{pp}"

    def targets_up():
        r = prom_api(base, "/api/v1/targets")
        if not r:
            return False, "Prometheus not answering"
        t = r["data"]["activeTargets"]
        return len(t) == 3 and all(x["health"] == "up" for x in t), [
            (x["scrapeUrl"], x["health"], x.get("lastError")) for x in t]
    print("targets:", wait_for("both relays and the prober scraped and up", targets_up))

    # Rules evaluated after both targets had been scraped at least once more.
    t0 = float(prom_api(base, "/api/v1/query", query="time()")["data"]["result"][0]) + 2

    def evaluated_at(rule):
        m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z", rule.get("lastEvaluation", ""))
        if not m:
            return 0.0
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) - time.timezone
        return t + float(m.group(2) or 0)

    def rules_evaluated():
        r = prom_api(base, "/api/v1/rules")
        if not r:
            return False, "Prometheus not answering"
        rules = [x for g in r["data"]["groups"] for x in g["rules"]]
        done = rules and all(evaluated_at(x) > t0 for x in rules)
        return bool(done), rules
    rules = wait_for("every rule evaluated", rules_evaluated)
    errors = [(x["name"], x.get("lastError")) for x in rules if x["health"] != "ok"]
    if errors:
        fail(f"rules failed to evaluate: {errors}")
    info = len(rules)
    print(f"{info} alert rules evaluated without error")

    # Every expression parses and evaluates in this Prometheus.
    for where, expr in exprs:
        r = prom_api(base, "/api/v1/query", query=expr)
        if not r or r.get("status") != "success":
            fail(f"{where}: {expr!r}: {r}")
    # And the data is what the relays report: both up, A's mesh link up.
    r = prom_api(base, "/api/v1/query", query="count(derpd_build_info)")
    if r["data"]["result"][0]["value"][1] != "2":
        fail(f"count(derpd_build_info) = {r}")
    r = prom_api(base, "/api/v1/alerts")
    firing = [a["labels"]["alertname"] for a in r["data"]["alerts"]]
    for name in ("DerpdRelayDown", "DerpdNoRelays", "DerpdMeshLinkDown"):
        if name in firing:
            fail(f"{name} is pending or firing against healthy relays: {r['data']['alerts']}")
    print(f"{len(exprs)} expressions evaluated by Prometheus; no false alert")


def base_config(derpd):
    """derpd starts with deploy/kubernetes/base/derpd.toml (file paths and
    the certificate mode overridden for loopback), serves the base's DERP
    map, and refuses to start with the placeholder mesh key of the base's
    Secret."""
    base = os.path.join(ROOT, "deploy", "kubernetes", "base")
    with open(os.path.join(base, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    placeholders = {}
    for g in kust["secretGenerator"]:
        for lit in g["literals"]:
            k, v = lit.split("=", 1)
            placeholders[k] = v
    tmp = tempfile.mkdtemp(prefix="derpd-base-config-")
    p = None
    try:
        with open(os.path.join(base, "derpd.toml")) as f:
            toml = f.read().replace("/etc/derpd/config/derpmap.json",
                                    os.path.join(base, "derpmap.json"))
        cfg = os.path.join(tmp, "derpd.toml")
        with open(cfg, "w") as f:
            f.write(toml)
        mesh = os.path.join(tmp, "mesh.key")
        with open(mesh, "w") as f:
            f.write(placeholders["mesh.key"] + "\n")
        api = os.path.join(tmp, "api.key")
        with open(api, "w") as f:
            f.write(placeholders["api.key"] + "\n")
        port, stun = free_port(), free_port()
        common = [derpd, "serve", "--config", cfg, "--certmode", "none", "--http-port", "-1",
                  "--addr", f"127.0.0.1:{port}", "--stun-port", str(stun), "--metrics-addr", "off",
                  "--state-dir", os.path.join(tmp, "state"), "--headscale-api-key-file", api,
                  "--headscale-url", "http://127.0.0.1:9"]
        r = subprocess.run(common + ["--mesh-psk-file", mesh], capture_output=True, text=True,
                           timeout=30)
        if r.returncode == 0 or "mesh-psk-file" not in r.stderr:
            fail(f"derpd did not refuse the placeholder mesh key: rc {r.returncode}, {r.stderr}")
        print("placeholder mesh key refused:", r.stderr.strip().splitlines()[-1])
        with open(mesh, "w") as f:
            f.write(subprocess.check_output([derpd, "keygen", "--mesh"], text=True))
        log = open(os.path.join(tmp, "derpd.log"), "w")
        p = subprocess.Popen(common + ["--mesh-psk-file", mesh], stdout=log,
                             stderr=subprocess.STDOUT)
        status, body = wait_for("derpd with the base config serving /derpmap.json", lambda: (
            lambda r: (r[0] == 200, r))(http_get(f"http://127.0.0.1:{port}/derpmap.json")))
        regions = json.loads(body)["Regions"]
        with open(os.path.join(base, "derpmap.json")) as f:
            if regions != json.load(f)["Regions"]:
                fail(f"/derpmap.json differs from the base's derpmap.json: {body}")
        print(f"base config accepted; /derpmap.json serves region(s) {sorted(regions)}")
    finally:
        if p and p.poll() is None:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# --- the Ansible role's render -------------------------------------------

HASHED = re.compile(r"\b(derpd-config|derpd-mesh-key|derpd-headscale-api-key)-[a-z0-9]{10}\b")


def unhash(obj):
    """The object with Kustomize's name hashes removed (derpd-config-abc → derpd-config)."""
    return json.loads(HASHED.sub(r"\1", json.dumps(obj)))


def differences(a, b, where=""):
    """(path, a's value, b's value) wherever two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from differences(a.get(k), b.get(k), f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{where}[{i}]")
    elif a != b:
        yield where or ".", a, b


def role_render(path, base_path, expect_path, derpd):
    """Compares the role's render with the Kustomize base's, object by object:
    every difference must be one the variables asked for, and everything
    the variables asked for must be there."""
    import base64
    import copy
    with open(path) as f:
        docs = [unhash(d) for d in yaml.safe_load_all(f) if d]
    with open(base_path) as f:
        base = {(d["kind"], d["metadata"]["name"]): d
                for d in (unhash(x) for x in yaml.safe_load_all(f) if x)}
    with open(expect_path) as f:
        want = json.load(f)
    n, hosts, ns = want["replicas"], want["hostnames"], want["namespace"]
    problems = []

    def same(what, got, expected):
        if got != expected:
            if isinstance(got, dict) and isinstance(expected, dict):
                for where, g, e in differences(got, expected):
                    problems.append(f"{what}: {where}: got {g!r}, want {e!r}")
            else:
                problems.append(f"{what}: got {got!r}, want {expected!r}")

    got = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    pristine = copy.deepcopy(got)  # the checks below reduce `got` to the base
    relays = [f"derpd-{i}" for i in range(n)]
    base_relays = sorted(k[1] for k, d in base.items()
                         if k[0] == "Service" and d["spec"].get("type") == "LoadBalancer")
    expected = set(base) - {("Secret", "derpd-headscale-api-key")}
    expected -= {("Service", r) for r in base_relays}
    expected |= {("Service", r) for r in relays}
    if not want["servicemonitor"]:
        expected -= {("ServiceMonitor", "derpd")}
    same("objects", sorted(got), sorted(expected))
    for (kind, name), d in got.items():
        same(f"{kind} {name}: namespace", d["metadata"].get("namespace"), ns)
        d["metadata"].pop("namespace", None)

    sts = got.get(("StatefulSet", "derpd"))
    bsts = copy.deepcopy(base[("StatefulSet", "derpd")])
    if sts:
        same("replicas", sts["spec"]["replicas"], n)
        sts["spec"]["replicas"] = bsts["spec"]["replicas"]
        c, bc = sts["spec"]["template"]["spec"]["containers"][0], bsts["spec"]["template"]["spec"]["containers"][0]
        same("image", c["image"], want["image"])
        same("imagePullPolicy", c.pop("imagePullPolicy", None), want["image_pull_policy"])
        c["image"] = bc["image"]
        pattern = want["hostname_arg"]
        args, bargs = c["args"], bc["args"]
        hi = next(i for i, a in enumerate(bargs) if a.startswith("--hostname="))
        mi = next(i for i, a in enumerate(bargs) if a.startswith("--mesh-with="))
        same("--hostname", args[hi], "--hostname=" + pattern)
        mesh = args[mi].split("=", 1)[1].split(",")
        same("--mesh-with names", [m.split("/")[0] for m in mesh], hosts)
        same("--mesh-with dial addresses", [m.split("/")[1] for m in mesh],
             [f"derpd-{i}.derpd-mesh.$(POD_NAMESPACE).svc.cluster.local:8443" for i in range(n)])
        same("added flags", args[len(bargs):],
             [f"--headscale-url={want['headscale_url']}", f"--acme-email={want['acme_email']}"]
             + want.get("extra_args", []))
        args[hi], args[mi] = bargs[hi], bargs[mi]
        del args[len(bargs):]
        env = {e["name"]: e for e in c["env"]}
        same("POD_INDEX", env.get("POD_INDEX", {}).get("valueFrom"),
             {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}})
        c["env"] = [e for e in c["env"] if e["name"] != "POD_INDEX"]
        if want.get("resources"):
            same("resources", c["resources"], want["resources"])
            c["resources"] = bc["resources"]
        vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        same("headscale API key volume", vols.get("headscale-api-key", {}).get("secret"), {
            "secretName": want["api_key_secret"], "defaultMode": 0o440,
            "items": [{"key": want["api_key_key"], "path": "api.key"}]})
        bvols = {v["name"]: v for v in bsts["spec"]["template"]["spec"]["volumes"]}
        vols["headscale-api-key"] = bvols["headscale-api-key"]
        sts["spec"]["template"]["spec"]["volumes"] = sorted(vols.values(), key=lambda v: v["name"])
        bsts["spec"]["template"]["spec"]["volumes"].sort(key=lambda v: v["name"])
        same("StatefulSet apart from the above", sts, bsts)

    cm = got.get(("ConfigMap", "derpd-config"))
    if cm:
        dmap = json.loads(cm["data"].pop("derpmap.json"))
        region = dmap["Regions"].get(str(want["region_id"]), {})
        same("derpmap.json hostnames", [x["HostName"] for x in region.get("Nodes", [])], hosts)
        same("domain", cm["data"].pop("domain"), hosts[0].split(".", 1)[1])
        b = copy.deepcopy(base[("ConfigMap", "derpd-config")])
        del b["data"]["derpmap.json"], b["data"]["domain"]
        same("ConfigMap apart from the above", cm, b)

    sec = got.get(("Secret", "derpd-mesh-key"))
    if sec:
        same("mesh key", base64.b64decode(sec["data"]["mesh.key"]).decode().strip(), want["mesh_psk"])
        b = copy.deepcopy(base[("Secret", "derpd-mesh-key")])
        sec["data"] = b["data"]
        same("mesh key Secret apart from the key", sec, b)

    template = base[("Service", base_relays[0])]
    for i, r in enumerate(relays):
        svc = got.get(("Service", r))
        if not svc:
            continue
        same(f"Service {r}: annotations", svc["metadata"].pop("annotations", {}),
             want.get("service_annotations", {}))
        b = base.get(("Service", r)) or json.loads(json.dumps(template).replace(
            f'"{base_relays[0]}"', f'"{r}"'))
        same(f"Service {r}", svc, b)
    for k in expected:
        if k[0] not in ("StatefulSet", "ConfigMap", "Secret") and not (
                k[0] == "Service" and k[1] in relays) and k in got:
            same(f"{k[0]} {k[1]}", got[k], base[k])
    if problems:
        fail("the role's render differs from the base beyond its variables:\n  "
             + "\n  ".join(problems))
    print(f"{len(docs)} objects: the base's, changed only as the variables ask "
          f"({n} relays, {want['image']}, {hosts[0]} …, secret {want['api_key_secret']})")
    if derpd:
        role_render_runs(pristine, want, derpd)


def role_render_runs(got, want, derpd):
    """derpd starts with relay 0's flags, derpd.toml and DERP map from the
    role's render (file paths and the certificate mode changed for
    loopback) and serves the rendered map at /derpmap.json."""
    import base64
    c = got[("StatefulSet", "derpd")]["spec"]["template"]["spec"]["containers"][0]
    cm, sec = got[("ConfigMap", "derpd-config")], got[("Secret", "derpd-mesh-key")]
    ns = want["namespace"]
    subst = {"POD_NAME": "derpd-0", "POD_INDEX": "0", "POD_NAMESPACE": ns,
             "DERP_DOMAIN": want["hostnames"][0].split(".", 1)[1]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: subst[m.group(1)], a) for a in c["args"]]
    tmp = tempfile.mkdtemp(prefix="derpd-role-render-")
    p = None
    try:
        for k, v in cm["data"].items():
            with open(os.path.join(tmp, k), "w") as f:
                f.write(v.replace("/etc/derpd/config/", tmp + "/").replace(
                    "/etc/derpd/mesh/", tmp + "/").replace("/etc/derpd/headscale/", tmp + "/"))
        with open(os.path.join(tmp, "mesh.key"), "wb") as f:
            f.write(base64.b64decode(sec["data"]["mesh.key"]))
        with open(os.path.join(tmp, "api.key"), "w") as f:
            f.write("hskey-test.0123456789abcdef\n")
        port, stun = free_port(), free_port()
        args = [a.replace("/etc/derpd/config/", tmp + "/") for a in args
                if not a.startswith("--headscale-url=")]
        args += ["--certmode", "none", "--http-port", "-1", "--addr", f"127.0.0.1:{port}",
                 "--stun-port", str(stun), "--metrics-addr", "off",
                 "--state-dir", os.path.join(tmp, "state"), "--headscale-url", "http://127.0.0.1:9"]
        log = open(os.path.join(tmp, "derpd.log"), "w")
        p = subprocess.Popen([derpd] + args, stdout=log, stderr=subprocess.STDOUT)
        try:
            status, body = wait_for("derpd with the role's flags serving /derpmap.json", lambda: (
                lambda r: (r[0] == 200, r))(http_get(f"http://127.0.0.1:{port}/derpmap.json")), 30)
        except SystemExit:
            with open(os.path.join(tmp, "derpd.log")) as f:
                print(f.read()[-2000:], file=sys.stderr)
            raise
        served = json.loads(body)["Regions"][str(want["region_id"])]
        if [x["HostName"] for x in served["Nodes"]] != want["hostnames"]:
            fail(f"/derpmap.json does not list the relays: {body}")
        print(f"derpd runs with relay 0's rendered flags; /derpmap.json lists {len(served['Nodes'])} relays")
    finally:
        if p and p.poll() is None:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# --- README's outage recipe ----------------------------------------------

def readme_block(marker):
    """The fenced block after `<!-- outage-recipe: MARKER -->` in README.md,
    without its indentation."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    m = re.search(r"<!-- outage-recipe: " + re.escape(marker) + r" -->\s*\n( *)```\w*\n(.*?)\n *```",
                  text, re.S)
    if not m:
        fail(f"README.md: no block marked outage-recipe: {marker}")
    indent = len(m.group(1))
    return "\n".join(l[indent:] for l in m.group(2).splitlines())


def outage_recipe(derpd):
    derpd = os.path.abspath(derpd)
    policy = json.loads(readme_block("policy.json"))
    if {"target": ["*"], "attr": ["cache-network-maps"]} not in policy.get("nodeAttrs", []):
        fail(f"the recipe's policy does not grant cache-network-maps: {policy}")
    print("policy: nodeAttrs grants cache-network-maps to every node")
    with open(os.path.join(ROOT, "README.md")) as f:
        recipe = f.read().split("## Surviving a headscale outage", 1)[1].split("\n## ", 1)[0]
    defined = {r["alert"] for r in alerts()}
    named = set(re.findall(r"`(Derpd[A-Za-z]+)`", recipe))
    if not named or named - defined:
        fail(f"alerts named in the recipe but not defined: {sorted(named - defined)}")
    metrics = set(re.findall(r"`(derpd_[a-z_]+)", recipe))

    tmp = tempfile.mkdtemp(prefix="derpd-outage-")
    procs = {}

    def start(name, args):
        log = open(os.path.join(tmp, f"{name}.log"), "a")
        procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)

    def stop(name, sig=signal.SIGTERM):
        p = procs.pop(name)
        p.send_signal(sig)
        p.wait(timeout=30)

    try:
        os.makedirs(os.path.join(tmp, "hs", "api", "v1"))
        with open(os.path.join(tmp, "hs", "api", "v1", "node"), "w") as f:
            json.dump({"nodes": [{
                "id": "1", "name": "n1", "givenName": "n1", "nodeKey": "nodekey:" + "cd" * 32,
                "user": {"id": "1", "name": "proj-a"}, "tags": [], "expiry": None,
                "online": True}]}, f)
        ph = free_port()
        start("headscale", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                            "--directory", os.path.join(tmp, "hs"), str(ph)])
        api, mesh = os.path.join(tmp, "api.key"), os.path.join(tmp, "mesh.key")
        with open(api, "w") as f:
            f.write("hskey-test.0123456789abcdef\n")
        with open(mesh, "w") as f:
            f.write(subprocess.check_output([derpd, "keygen", "--mesh"], text=True))
        toml = readme_block("derpd.toml")
        toml = re.sub(r'(?m)^headscale-url = .*$', f'headscale-url = "http://127.0.0.1:{ph}"', toml)
        toml = toml.replace("/etc/derpd/headscale/api.key", api).replace("/etc/derpd/mesh/mesh.key", mesh)
        cfg = os.path.join(tmp, "derpd.toml")
        with open(cfg, "w") as f:
            f.write(toml)
        port, stun, met = free_port(), free_port(), free_port()
        relay = [derpd, "serve", "--config", cfg, "--certmode", "none", "--http-port", "-1",
                 "--addr", f"127.0.0.1:{port}", "--stun-port", str(stun),
                 "--metrics-addr", f"127.0.0.1:{met}", "--state-dir", os.path.join(tmp, "state")]
        ready = f"http://127.0.0.1:{port}/readyz"
        start("derpd", relay)
        wait_for("the relay ready with headscale up", lambda: (lambda r: (r[0] == 200, r))(http_get(ready)))

        # headscale goes away; the relay restarts during the outage.
        stop("headscale", signal.SIGKILL)
        stop("derpd")
        t0 = time.monotonic()
        start("derpd", relay)
        status, body = wait_for("the restarted relay ready", lambda: (
            lambda r: (r[0] == 200, r))(http_get(ready)), timeout=10)
        print(f"restarted during the outage: ready after {time.monotonic() - t0:.1f}s "
              f"from the stored snapshot")
        r = subprocess.run([derpd, "probe", f"http://127.0.0.1:{port}"], capture_output=True,
                           text=True, timeout=30)
        if r.returncode == 0:
            fail(f"a stranger was admitted during the outage: {r.stdout}")
        print("stranger refused:", (r.stderr.strip().splitlines() or ["?"])[-1])
        body = wait_for("/readyz reporting the failing sync", lambda: (
            lambda r: ("last sync failing" in (r[1] or ""), r[1]))(http_get(ready)), timeout=30)
        print("/readyz:", " | ".join(body.strip().splitlines()))
        scrape = http_get(f"http://127.0.0.1:{met}/metrics")[1]
        for series in ['derpd_companion_sync_failures_total{reason="unreachable"}',
                       'derpd_admission_decisions_total{reason="unknown",result="deny"}']:
            m = re.search(r"^" + re.escape(series) + r" (\S+)$", scrape, re.M)
            if not m or float(m.group(1)) < 1:
                fail(f"{series} does not show the outage: {m and m.group(0)}")
        missing = metrics - scrape_names(scrape)
        if missing:
            fail(f"metrics named in the recipe but not exported: {sorted(missing)}")
        print(f"the outage shows in the metrics; all {len(metrics)} metrics the recipe names are exported")
    except SystemExit:
        for name in ("derpd", "headscale"):
            path = os.path.join(tmp, f"{name}.log")
            if os.path.exists(path):
                with open(path) as f:
                    print(f"--- {name}'s log:\n{f.read()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    if len(sys.argv) < 2:
        fail(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    {"alert-tests": alert_tests, "kustomize-render": kustomize_render,
     "validate-output": validate_output, "prober-render": prober_render,
     "live": live, "base-config": base_config,
     "role-render": role_render, "outage-recipe": outage_recipe,
     "free-port": lambda: print(free_port()),
     "wait-healthy": lambda url: wait_for(
         url, lambda: (lambda r: (r[0] == 200, r))(http_get(url)), timeout=30)}[cmd](*args)


if __name__ == "__main__":
    main()
