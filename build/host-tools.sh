#!/usr/bin/env bash
# Install, with apt-get, the host tools the frozen builds and their tests use, if missing:
#   build/host-tools.sh             objdump (binutils), file, ldd
#   build/host-tools.sh root        and debootstrap, unshare (build/debian-root.sh)
#   build/host-tools.sh root-arm64  and qemu-user-static, binfmt-support (a foreign root)
set -euo pipefail

missing=()
command -v objdump >/dev/null || missing+=(binutils)
command -v file >/dev/null || missing+=(file)
command -v ldd >/dev/null || missing+=(libc-bin)
case "${1:-}" in
root*)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v unshare >/dev/null || missing+=(util-linux)
    ;;
esac
case "${1:-}" in
root-arm64)
    [ -x /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    ;;
root-amd64)
    [ -x /usr/bin/qemu-x86_64-static ] || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    ;;
esac
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "host-tools: please install ${missing[*]} (needs root and apt-get)" >&2
    exit 2
fi
echo "host-tools: installing ${missing[*]}" >&2
apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
