#!/usr/bin/env bash
# `make build [ARCH=arm64]`: the one-file `api` and `create_api_key` for ARCH (x86_64 or aarch64;
# Linux, glibc 2.35+, e.g. Ubuntu 22.04) in OUT, with the same spec files and build script
# (build/build_binaries.py) on every route, each freezing Debian 12's python3.11 (patched by
# Debian) rather than the build machine's interpreter:
#   - root (the default): the cached Debian bookworm root of ARCH (build/debian-root.sh), under
#     qemu-user-static when the machine is of another architecture. Needs root.
#   - docker (aarch64 only; chosen when a Docker engine with buildx answers): an ARM64 image
#     of the same Debian and its python3.11 (build/Dockerfile.arm64) through
#     `docker buildx build --platform linux/arm64 --output`.
# SMALLY_BUILD_ROUTE=docker|root forces a route.
#
#   build/build-frozen.sh x86_64|aarch64 OUT
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${1:-}" in
x86_64 | amd64) ARCH=x86_64 ROOT_ARCH=amd64 ;;
aarch64 | arm64) ARCH=aarch64 ROOT_ARCH=arm64 ;;
*)
    echo "usage: $0 x86_64|aarch64 OUT" >&2
    exit 2
    ;;
esac
OUT=${2:?usage: $0 x86_64|aarch64 OUT}
cd "$REPO"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
started=$(date +%s)

route=${SMALLY_BUILD_ROUTE:-}
if [ -z "$route" ]; then
    route=root
    if [ "$ARCH" == aarch64 ] && [ "$(uname -m)" != aarch64 ] && command -v docker >/dev/null &&
        docker info >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
        route=docker
    fi
fi
echo "build-frozen: $ARCH, route $route, into $OUT"

# Build info comes from the host's git: neither the image nor the root has the repository's .git.
info=$(python3 build/build_binaries.py --print-build-info)
export SMALLY_GIT_HASH SMALLY_GIT_DIRTY SMALLY_GIT_DIFF_SHA256 SMALLY_LOCK_SHA256 SMALLY_BUILD_TIMESTAMP
eval "$info"

case "$route" in
docker)
    [ "$ARCH" == aarch64 ] || { echo "build-frozen: the docker route builds aarch64 only" >&2; exit 2; }
    docker buildx build --platform linux/arm64 --file build/Dockerfile.arm64 \
        --build-arg SMALLY_GIT_HASH --build-arg SMALLY_GIT_DIRTY \
        --build-arg SMALLY_GIT_DIFF_SHA256 --build-arg SMALLY_LOCK_SHA256 \
        --build-arg SMALLY_BUILD_TIMESTAMP --output "type=local,dest=$OUT" .
    ;;
root)
    build/debian-root.sh "$ROOT_ARCH" >/dev/null
    # The repository is mounted on /src inside the root; OUT must be inside it.
    case "$OUT/" in
    "$REPO"/*) ;;
    *)
        echo "build-frozen: OUT must be inside $REPO for the root route" >&2
        exit 2
        ;;
    esac
    build/debian-root.sh "$ROOT_ARCH" exec /usr/bin/env SMALLY_GIT_HASH="$SMALLY_GIT_HASH" \
        SMALLY_GIT_DIRTY="$SMALLY_GIT_DIRTY" SMALLY_GIT_DIFF_SHA256="$SMALLY_GIT_DIFF_SHA256" \
        SMALLY_LOCK_SHA256="$SMALLY_LOCK_SHA256" SMALLY_BUILD_TIMESTAMP="$SMALLY_BUILD_TIMESTAMP" \
        /opt/smally-venv/bin/python /src/build/build_binaries.py \
        --dist "/src/${OUT#"$REPO"/}" --work "/src/.cache/pyinstaller/root-$ARCH"
    ;;
*)
    echo "build-frozen: unknown route $route (root or docker)" >&2
    exit 2
    ;;
esac
file "$OUT/api" "$OUT/create_api_key" 2>/dev/null || true
echo "build-frozen: done in $(($(date +%s) - started)) s"
