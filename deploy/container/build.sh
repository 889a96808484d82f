#!/usr/bin/env bash
# Builds the derpd image offline: a static derpd built here with cargo, put
# into the runtime stage of deploy/container/Dockerfile (FROM scratch, so no
# base image is pulled).
#
#   deploy/container/build.sh TAG
#
# DERPD_CARGO_PROFILE picks the cargo profile (default release; the tests
# use the lighter "container" profile). The static build has its own target
# directory (target/container) so it does not disturb the normal build cache.
set -euo pipefail
tag=${1:?usage: deploy/container/build.sh TAG}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
profile=${DERPD_CARGO_PROFILE:-release}
triple="$(uname -m)-unknown-linux-gnu"
target_dir=${DERPD_STATIC_TARGET_DIR:-$root/target/container}

echo "building a static derpd (profile $profile, target $triple)" >&2
(cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
    cargo build --locked --profile "$profile" --target "$triple" --bin derpd)
outdir=$profile
[ "$profile" = dev ] && outdir=debug
bin="$target_dir/$triple/$outdir/derpd"
if readelf -d "$bin" | grep -q NEEDED; then
    echo "build.sh: $bin is dynamically linked" >&2
    exit 1
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/out/state"
cp "$bin" "$ctx/out/derpd"
strip "$ctx/out/derpd"
sed -n '/^FROM scratch AS runtime/,$p' "$here/Dockerfile" |
    sed -e 's#--from=build ##' -e 's# /out/# out/#g' >"$ctx/Dockerfile"
grep -q '^FROM scratch AS runtime' "$ctx/Dockerfile" ||
    { echo "build.sh: no runtime stage in $here/Dockerfile" >&2; exit 1; }
docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "built $tag" >&2
