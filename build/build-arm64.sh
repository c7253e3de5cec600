#!/usr/bin/env bash
# `make build ARCH=arm64`: the one-file `api` and `create_api_key` for aarch64 (Linux, glibc
# 2.35+, e.g. Ubuntu 22.04) in OUT (default dist/arm64), with the same spec files and the same
# build script (build/build_binaries.py) as the host build. Three routes:
#   - on an aarch64 machine: the project's venv, as `make build` does;
#   - with a Docker engine: an ARM64 image (build/Dockerfile.arm64, python:3.11-slim-bullseye,
#     glibc 2.31) through `docker buildx build --platform linux/arm64 --output`;
#   - otherwise (no engine, as on our machines): the cached Debian bookworm arm64 root of
#     build/arm64-root.sh under qemu-user-static. Needs root.
# SMALLY_ARM64_ROUTE=docker|root forces a route.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-dist/arm64}
cd "$REPO"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
started=$(date +%s)

route=${SMALLY_ARM64_ROUTE:-}
if [ -z "$route" ]; then
    if [ "$(uname -m)" == aarch64 ]; then
        route=native
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1 &&
        docker buildx version >/dev/null 2>&1; then
        route=docker
    else
        route=root
    fi
fi
echo "build-arm64: route $route, into $OUT"

# Build info comes from the host's git: neither the image nor the root has the repository's .git.
info=$(python3 build/build_binaries.py --print-build-info)
export SMALLY_GIT_HASH SMALLY_GIT_DIRTY SMALLY_GIT_DIFF_SHA256 SMALLY_LOCK_SHA256 SMALLY_BUILD_TIMESTAMP
eval "$info"

case "$route" in
native)
    .venv/bin/python build/build_binaries.py --dist "$OUT"
    ;;
docker)
    docker buildx build --platform linux/arm64 --file build/Dockerfile.arm64 \
        --build-arg SMALLY_GIT_HASH --build-arg SMALLY_GIT_DIRTY \
        --build-arg SMALLY_GIT_DIFF_SHA256 --build-arg SMALLY_LOCK_SHA256 \
        --build-arg SMALLY_BUILD_TIMESTAMP --output "type=local,dest=$OUT" .
    ;;
root)
    build/arm64-root.sh >/dev/null
    # The repository is mounted on /src inside the root; OUT must be inside it.
    case "$OUT/" in
    "$REPO"/*) ;;
    *)
        echo "build-arm64: OUT must be inside $REPO for the root route" >&2
        exit 2
        ;;
    esac
    build/arm64-root.sh exec /usr/bin/env SMALLY_GIT_HASH="$SMALLY_GIT_HASH" \
        SMALLY_GIT_DIRTY="$SMALLY_GIT_DIRTY" SMALLY_GIT_DIFF_SHA256="$SMALLY_GIT_DIFF_SHA256" \
        SMALLY_LOCK_SHA256="$SMALLY_LOCK_SHA256" SMALLY_BUILD_TIMESTAMP="$SMALLY_BUILD_TIMESTAMP" \
        /opt/smally-venv/bin/python /src/build/build_binaries.py \
        --dist "/src/${OUT#"$REPO"/}" --work /src/.cache/pyinstaller/aarch64
    ;;
*)
    echo "build-arm64: unknown route $route (native, docker or root)" >&2
    exit 2
    ;;
esac
file "$OUT/api" "$OUT/create_api_key" 2>/dev/null || true
echo "build-arm64: done in $(($(date +%s) - started)) s"
