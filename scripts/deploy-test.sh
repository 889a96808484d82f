#!/usr/bin/env bash
# Tests the deployment files in deploy/ with the real tools that consume
# them: Docker (the image), kubectl's kustomize + kubernetes-validate (the
# Kubernetes manifests, the prober's component included), promtool and a
# real Prometheus (alert rules and dashboard queries against running relays
# and a running prober), systemd-analyze (the relay's and the prober's
# units), ansible-playbook and ansible-lint (the Ansible role in
# deploy/ansible, installed from PyPI here when missing), and derpd itself
# (README's outage recipe). scripts/test.sh installs the other tools and
# runs this; it needs root (Docker).
#
# Prints "ok:" or "FAILED:" per check and a closing "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work="$root/target/deploy-test"
mkdir -p "$work"
derpd="$root/target/debug/derpd"
check="python3 $root/scripts/deploy_check.py"

passed=0
failed=0
failures=()
run() {
    local name=$1
    shift
    echo
    echo "== deploy: $name"
    if "$@"; then
        echo "ok: $name"
        passed=$((passed + 1))
    else
        echo "FAILED: $name"
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

# --- cleanup of everything this script starts ------------------------------
tag="derpd-deploy-test:$$"
container="derpd-deploy-test-$$"
volume="derpd-deploy-test-$$"
started_dockerd=""
cleanup() {
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        docker rm -f "$container" >/dev/null 2>&1 || true
        docker volume rm "$volume" >/dev/null 2>&1 || true
        docker rmi -f "$tag" >/dev/null 2>&1 || true
    fi
    if [ -n "$started_dockerd" ]; then
        kill "$started_dockerd" 2>/dev/null || true
        wait "$started_dockerd" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# --- Kubernetes --------------------------------------------------------------

# Debian's kubectl (1.20, with the old kustomize v2 inside), unpacked into
# target/ when the kubectl on PATH is another one, so the manifests are
# rendered by both the old and a current kustomize.
debian_kubectl() {
    local dir="$work/debian-kubectl"
    if [ ! -x "$dir/usr/bin/kubectl" ]; then
        mkdir -p "$dir"
        local get="apt-get download -qq -o APT::Sandbox::User=root kubernetes-client"
        (cd "$dir" && { $get >/dev/null 2>&1 || { apt-get update -qq && $get >/dev/null; }; } &&
            dpkg-deb -x kubernetes-client_*.deb .) || return 1
    fi
    echo "$dir/usr/bin/kubectl"
}

kustomize_one() { # KUBECTL DIR OUT
    local kubectl=$1 dir=$2 out=$3
    echo "$($kubectl version --client 2>/dev/null | head -1)"
    "$kubectl" kustomize "$dir" >"$out" 2>"$out.err" || { cat "$out.err"; return 1; }
    grep -v "deprecated" "$out.err" || true
    $check kustomize-render "$out" || return 1
    python3 -m kubernetes_validate --strict "$out" >"$out.validate" 2>&1
    local rc=$?
    $check validate-output "$out.validate" || return 1
    [ $rc -eq 0 ] || { cat "$out.validate"; return 1; }
}

check_kubernetes() {
    local kubectls=(kubectl) old
    if ! kubectl version --client 2>/dev/null | grep -q 'v1\.20\.'; then
        old=$(debian_kubectl) || { echo "cannot fetch Debian's kubernetes-client"; return 1; }
        kubectls+=("$old")
    fi
    local k d n=0
    for k in "${kubectls[@]}"; do
        for d in deploy/kubernetes deploy/kubernetes/overlays/cert-manager; do
            n=$((n + 1))
            echo "-- $d with $k"
            kustomize_one "$k" "$d" "$work/render-$n.yaml" || return 1
        done
    done
    echo "-- derpd and the base's derpd.toml, derpmap.json, placeholder Secrets"
    $check base-config "$derpd" || return 1
    for k in "${kubectls[@]}"; do
        n=$((n + 1))
        echo "-- deploy/kubernetes/prober (its own component) with $k"
        local out="$work/render-$n.yaml"
        "$k" kustomize deploy/kubernetes/prober >"$out" 2>"$out.err" || { cat "$out.err"; return 1; }
        $check prober-render "$out" || return 1
        python3 -m kubernetes_validate --strict "$out" >"$out.validate" 2>&1
        local rc=$?
        $check validate-output "$out.validate" || return 1
        [ $rc -eq 0 ] || { cat "$out.validate"; return 1; }
    done
    echo "-- derpd prober reads the component's derpmap.json"
    "$derpd" prober --once --derp-map deploy/kubernetes/prober/derpmap.json --regions 900 \
        --tls-timeout 1s --stun-timeout 1s --derp-timeout 1s --mesh-timeout 1s >"$work/prober-once.txt" 2>&1
    grep -q '^ms  *900a  *tls ' "$work/prober-once.txt" || { cat "$work/prober-once.txt"; return 1; }
}

# --- Ansible (deploy/ansible: the role for metal-stack control planes) ---------

# ansible (it bundles kubernetes.core) and ansible-lint from PyPI, pinned so
# that a new lint rule cannot fail an unchanged tree; skipped when installed.
ansible_pins=(ansible==12.3.0 ansible-lint==26.10.1)
ensure_ansible() {
    local have
    have=$(python3 -m pip list --format=freeze --disable-pip-version-check 2>/dev/null |
        grep -E '^(ansible|ansible-lint)==' | sort | tr '\n' ' ')
    if [ "$have" != "$(printf '%s\n' "${ansible_pins[@]}" | sort | tr '\n' ' ')" ] || ! command -v ansible-playbook >/dev/null ||
        ! command -v ansible-lint >/dev/null; then
        echo "installing ${ansible_pins[*]} (PyPI)"
        python3 -m pip install --quiet --disable-pip-version-check "${ansible_pins[@]}" || return 1
    fi
    ansible-playbook --version | sed -n 1p
}

# Renders the role with the sample playbook and extra arguments into
# target/deploy-test/ansible/NAME (nothing is applied), then: strict schema
# validation, and the render is the Kustomize base changed only as the
# variables ask (deploy/ansible/tests/expect/NAME.json), and derpd starts
# with relay 0's rendered flags and serves the rendered DERP map.
role_render() { # NAME [ansible-playbook args...]
    local name=$1 out="$work/ansible/$1"
    shift
    echo "-- render: $name"
    (cd deploy/ansible && ansible-playbook playbook.yaml -e "derpd_render_dir=$out" "$@") \
        >"$out.log" 2>&1 || { tail -30 "$out.log"; return 1; }
    python3 -m kubernetes_validate --strict "$out/derpd.yaml" >"$out.validate" 2>&1
    local rc=$?
    $check validate-output "$out.validate" || return 1
    [ $rc -eq 0 ] || { cat "$out.validate"; return 1; }
    $check role-render "$out/derpd.yaml" "$work/ansible/base.yaml" \
        "deploy/ansible/tests/expect/$name.json" "$derpd"
}

# The play must fail with the role's assert naming the missing variable.
role_refuses() { # NAME MESSAGE PLAYBOOK [args...]
    local name=$1 msg=$2 out="$work/ansible/$1.log"
    shift 2
    echo "-- refused: $name"
    if (cd deploy/ansible && ansible-playbook "$@") >"$out" 2>&1; then
        echo "the play succeeded"
        return 1
    fi
    grep -F "$msg" "$out" | sed 's/^.*"msg": /msg: /' || { tail -20 "$out"; return 1; }
}

check_ansible() {
    ensure_ansible || return 1
    rm -rf "$work/ansible" && mkdir -p "$work/ansible"
    echo "-- ansible-playbook --syntax-check"
    (cd deploy/ansible && ansible-playbook --syntax-check playbook.yaml) || return 1
    echo "-- ansible-lint (profile production, deploy/ansible/.ansible-lint)"
    (cd deploy/ansible && ansible-lint) || return 1
    kubectl kustomize deploy/kubernetes >"$work/ansible/base.yaml" 2>/dev/null || return 1
    local psk=(-e @tests/test-psk.yaml)
    role_render sample "${psk[@]}" || return 1
    role_render scaled -e @tests/scaled.yaml || return 1
    role_render two "${psk[@]}" -e derpd_replicas=2 || return 1
    # The sample's mesh key comes from a vault variable, here not set.
    role_refuses missing-psk "derpd: the mandatory variable derpd_mesh_psk is not set" \
        playbook.yaml -e "derpd_render_dir=$work/ansible/missing-psk" || return 1
    role_refuses missing-tag "derpd: the mandatory variable derpd_image_tag is not set" \
        tests/missing-tag.yaml -i localhost, || return 1
}

# --- README's "Surviving a headscale outage" ---------------------------------------

check_outage() {
    $check outage-recipe "$derpd"
}

# --- Prometheus ----------------------------------------------------------------

check_rules() {
    promtool check rules deploy/prometheus/derpd-alerts.yml deploy/prometheus/derpd-prober-alerts.yml &&
        promtool test rules deploy/prometheus/tests/*.yml &&
        $check alert-tests
}

check_live() {
    $check live "$derpd" "$(command -v prometheus)"
}

# --- systemd ---------------------------------------------------------------------

check_systemd() {
    check_systemd_relay && check_systemd_prober
}

check_systemd_prober() {
    local dir="$work/systemd-prober"
    rm -rf "$dir" && mkdir -p "$dir"
    sed "s#/usr/local/bin/derpd#$derpd#g" deploy/systemd/derpd-prober.service >"$dir/derpd-prober.service"
    local out
    out=$(cd "$dir" && systemd-analyze verify ./derpd-prober.service 2>&1) || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "systemd-analyze verify complained:"; echo "$out"; return 1; }
    out=$(cd "$dir" && systemd-analyze security --offline=yes ./derpd-prober.service 2>&1)
    echo "$out" | grep -E 'User=|Overall exposure'
    echo "$out" | grep -q '✓ User=/DynamicUser=' || { echo "the prober unit runs as root"; return 1; }
    # The unit's command line is one derpd accepts.
    local cmd
    cmd=$(sed -n 's#^ExecStart=/usr/local/bin/derpd ##p' deploy/systemd/derpd-prober.service)
    # shellcheck disable=SC2086
    "$derpd" $cmd --help >/dev/null || { echo "derpd refuses: $cmd"; return 1; }
}

check_systemd_relay() {
    local dir="$work/systemd"
    rm -rf "$dir" && mkdir -p "$dir"
    # verify wants the ExecStart binary to exist: point it at the built one.
    sed "s#/usr/local/bin/derpd#$derpd#g" deploy/systemd/derpd.service >"$dir/derpd.service"
    local out
    out=$(cd "$dir" && systemd-analyze verify ./derpd.service 2>&1) || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "systemd-analyze verify complained:"; echo "$out"; return 1; }
    out=$(cd "$dir" && systemd-analyze security --offline=yes ./derpd.service 2>&1)
    echo "$out" | grep -E 'User=|Overall exposure'
    echo "$out" | grep -q '✓ User=/DynamicUser=' || { echo "the unit runs as root"; return 1; }
    grep -q '^ExecReload=/bin/kill -HUP \$MAINPID' deploy/systemd/derpd.service ||
        { echo "no SIGHUP reload"; return 1; }
}

# --- container -------------------------------------------------------------------

ensure_dockerd() {
    docker info >/dev/null 2>&1 && return 0
    echo "starting dockerd (no bridge, no iptables; containers use the host network)"
    dockerd --bridge=none --iptables=false >"$work/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    tail -20 "$work/dockerd.log"
    return 1
}

check_container() {
    ensure_dockerd || return 1
    DERPD_CARGO_PROFILE=container-test deploy/container/build.sh "$tag" || return 1
    local user
    user=$(docker image inspect -f '{{.Config.User}}' "$tag")
    echo "image user: $user"
    case "$user" in "" | 0 | 0:* | root*) echo "image runs as root"; return 1 ;; esac
    local port stun metrics
    port=$($check free-port) && stun=$($check free-port) && metrics=$($check free-port) || return 1
    docker run -d --name "$container" --network host --read-only --cap-drop ALL \
        --security-opt no-new-privileges -v "$volume:/var/lib/derpd" "$tag" \
        serve --addr "127.0.0.1:$port" --stun-port "$stun" \
        --metrics-addr "127.0.0.1:$metrics" >/dev/null || return 1
    if ! $check wait-healthy "http://127.0.0.1:$port/healthz"; then
        docker logs "$container" 2>&1 | tail -20
        return 1
    fi
    # The process runs as the image's numeric user, not root.
    local pid uid
    pid=$(docker inspect -f '{{.State.Pid}}' "$container")
    uid=$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")
    echo "uid (real, effective, saved, fs): $uid"
    [ "$uid" = "65532 65532 65532 65532" ] || { echo "not running as 65532"; return 1; }
    # The root file system is read-only; the node key went to the volume.
    [ "$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$container")" = true ] || return 1
    local state
    state=$(docker volume inspect -f '{{.Mountpoint}}' "$volume")
    ls -ln "$state"
    [ -s "$state/derpd.key" ] || { echo "no node key in the state volume"; return 1; }
    # Tailscale's DERP client relays packets through the container.
    DERPD_TEST_RELAY="127.0.0.1:$port" cargo test --locked -q --test deploy -- --ignored ||
        { docker logs "$container" 2>&1 | tail -20; return 1; }
    # Metrics are served.
    $check wait-healthy "http://127.0.0.1:$metrics/metrics"
}

echo "== deploy: building derpd"
cargo build --locked -q --bin derpd || exit 1

run "kubernetes: kustomize renders (old and new kustomize), strict schema validation" check_kubernetes
run "ansible: syntax-check, ansible-lint production, renders validated and diffed against the base, asserts" check_ansible
run "outage recipe: README's derpd settings outlive headscale and a restart, refuse a stranger, show in metrics" check_outage
run "prometheus: promtool check rules, promtool test rules" check_rules
run "systemd: systemd-analyze verify, not root (relay and prober units)" check_systemd
run "live: real Prometheus scrapes running relays and a prober, rules evaluate, every metric exists" check_live
run "container: build.sh image, non-root, --read-only, ts_derp relays through it" check_container

echo
for f in "${failures[@]}"; do echo "FAILED: $f"; done
echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
