#!/usr/bin/env bash
# A Debian bookworm arm64 root that runs under qemu-user-static, for building (and trying) the
# aarch64 binaries on a machine without Docker. Needs root. Idempotent and cached: the first run
# takes a few minutes, later ones a few seconds.
#
#   build/arm64-root.sh                 make or refresh the root; prints its path last
#   build/arm64-root.sh exec CMD...     run CMD inside it, the repository mounted on /src
#
# SMALLY_ARM64_ROOT overrides where it lives (default ~/.cache/smally/arm64-root).
#
# What each step works around, as seen in trial builds:
# - onnxruntime parses /proc/cpuinfo at import and crashes on the host's x86 one: an
#   aarch64-style cpuinfo (/etc/smally/cpuinfo in the root) is bind-mounted over /proc/cpuinfo,
#   and also left as a plain file at <root>/proc/cpuinfo, which qemu-user finds through
#   QEMU_LD_PREFIX when the binaries run on the host (/proc is not mounted there then).
# - pip inside the root must trust the same extra CA certificates as the host.
# - Its venv holds exactly requirements/build.txt (the lock), installed with hashes required.
# - Every mount is made in a private mount namespace (unshare), so none outlives a run, even one
#   that fails half-way.
set -euo pipefail

ROOT=${SMALLY_ARM64_ROOT:-${HOME:-/root}/.cache/smally/arm64-root}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# python3.11 + libpython3.11 (PyInstaller bundles the shared library), binutils (objdump, for
# PyInstaller and the glibc check), ca-certificates (pip over TLS).
PACKAGES=python3,python3-venv,libpython3.11,binutils,ca-certificates
VENV=/opt/smally-venv
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "arm64-root: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        say "needs root (debootstrap, chroot, binfmt_misc)"
        exit 2
    fi
}

host_tools() {
    "$REPO/build/host-tools.sh" arm64
}

binfmt() {
    local dir=/proc/sys/fs/binfmt_misc
    if [ ! -e "$dir/register" ]; then
        mount -t binfmt_misc binfmt_misc "$dir"
    fi
    if [ ! -e "$dir/qemu-aarch64" ]; then
        [ -e /var/lib/binfmts/qemu-aarch64 ] || update-binfmts --import qemu-aarch64
        update-binfmts --enable qemu-aarch64
    fi
    if ! grep -q '^enabled' "$dir/qemu-aarch64"; then
        echo 1 >"$dir/qemu-aarch64"
    fi
}

# A /proc/cpuinfo as an aarch64 Linux kernel writes it (Neoverse N1), one block per host CPU.
write_cpuinfo() {
    local target=$1 cpus i
    cpus=$(nproc)
    : >"$target"
    for ((i = 0; i < cpus; i++)); do
        cat >>"$target" <<EOF
processor	: $i
BogoMIPS	: 50.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x3
CPU part	: 0xd0c
CPU revision	: 1

EOF
    done
}

# Run "$@" inside root $1 (with /proc, the aarch64 cpuinfo, /dev and the repository on /src).
in_root() {
    local root=$1
    shift
    unshare --mount --propagation private -- /bin/bash -euc '
        root=$1 repo=$2
        shift 2
        mount -t proc proc "$root/proc"
        mount --bind "$root/etc/smally/cpuinfo" "$root/proc/cpuinfo"
        mount --rbind /dev "$root/dev"
        mount --rbind /sys "$root/sys"  # onnxruntime also counts CPUs there
        mkdir -p "$root/src"
        mount --bind "$repo" "$root/src"
        cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
        exec chroot "$root" /usr/bin/env -i PATH="'"$CHROOT_PATH"'" HOME=/root LANG=C.UTF-8 \
            PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
            PIP_CERT=/etc/ssl/certs/ca-certificates.crt "$@"
    ' _ "$root" "$REPO" "$@"
}

bootstrap() {
    [ -e "$ROOT/etc/smally/bootstrapped" ] && return 0
    local partial="$ROOT.partial"
    say "debootstrap $SUITE arm64 into $ROOT (first run only; a few minutes under qemu)"
    rm -rf "$partial"
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --arch=arm64 --foreign --variant=minbase --include="$PACKAGES" \
        "$SUITE" "$partial" "$MIRROR" >&2
    cp /usr/bin/qemu-aarch64-static "$partial/usr/bin/"
    # The second stage runs the arm64 package scripts, through binfmt_misc and qemu.
    unshare --mount --propagation private -- /bin/bash -euc '
        mount --rbind /dev "$1/dev"
        chroot "$1" /debootstrap/debootstrap --second-stage
    ' _ "$partial" >&2
    mkdir -p "$partial/etc/smally"
    echo "$SUITE $(date -u +%FT%TZ)" >"$partial/etc/smally/bootstrapped"
    rm -rf "$ROOT"
    mv "$partial" "$ROOT"
}

refresh() {
    mkdir -p "$ROOT/etc/smally" "$ROOT/src" "$ROOT/proc"
    write_cpuinfo "$ROOT/etc/smally/cpuinfo"
    # A plain file under the (unmounted) proc directory: qemu-user, given QEMU_LD_PREFIX=$ROOT,
    # opens it instead of the host's /proc/cpuinfo. Hidden while /proc is mounted.
    if ! mountpoint -q "$ROOT/proc"; then
        cp "$ROOT/etc/smally/cpuinfo" "$ROOT/proc/cpuinfo"
    fi
    # The host's extra CA certificates (e.g. a TLS-inspecting proxy's), for pip in the root.
    local certs=(/usr/local/share/ca-certificates/*.crt) sum
    if [ -e "${certs[0]}" ]; then
        sum=$(cat "${certs[@]}" | sha256sum | cut -c1-64)
        if [ "$(cat "$ROOT/etc/smally/certs.sha256" 2>/dev/null)" != "$sum" ]; then
            mkdir -p "$ROOT/usr/local/share/ca-certificates"
            cp "${certs[@]}" "$ROOT/usr/local/share/ca-certificates/"
            in_root "$ROOT" update-ca-certificates >/dev/null
            echo "$sum" >"$ROOT/etc/smally/certs.sha256"
        fi
    fi
}

# The lock's build requirements (requirements/build.txt: the service's dependencies and
# PyInstaller), hashes required; reinstalled when the file changes. A venv made before the lock
# (from unpinned requirements) is made anew: nothing in it may come from outside the lock.
python_env() {
    local wanted
    wanted=$(cat "$REPO/requirements/build.txt")
    if [ "$(cat "$ROOT$VENV/requirements.txt" 2>/dev/null)" == "$wanted" ]; then
        return 0
    fi
    say "installing requirements/build.txt into $VENV (aarch64 wheels, hashes required)"
    if ! grep -q -- '--hash=' "$ROOT$VENV/requirements.txt" 2>/dev/null; then
        rm -rf "${ROOT:?}$VENV"
    fi
    [ -x "$ROOT$VENV/bin/python" ] || in_root "$ROOT" python3 -m venv "$VENV"
    in_root "$ROOT" "$VENV/bin/pip" install --quiet --require-hashes --no-deps --only-binary=:all: \
        -r /src/requirements/build.txt >&2
    echo "$wanted" >"$ROOT$VENV/requirements.txt"
}

need_root
host_tools
binfmt
if [ "${1:-}" == exec ]; then
    shift
    [ -e "$ROOT/etc/smally/bootstrapped" ] || { say "no root at $ROOT: run $0 first"; exit 2; }
    in_root "$ROOT" "$@"
    exit
fi
bootstrap
refresh
python_env
echo "$ROOT"
