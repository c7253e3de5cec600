#!/usr/bin/env bash
# A Debian bookworm root of the target architecture (amd64 or arm64), for building the frozen
# binaries with Debian's python3.11: the interpreter PyInstaller freezes into them is the one
# Debian patches (its security updates are applied on each refresh), not the build machine's.
# A foreign architecture runs under qemu-user-static. Needs root. Idempotent and cached: the
# first run takes a few minutes (natively about one), later ones a few seconds.
#
#   build/debian-root.sh ARCH                 make or refresh the root; prints its path last
#   build/debian-root.sh ARCH exec CMD...     run CMD inside it, the repository mounted on /src
#   build/debian-root.sh ARCH path            only print where it lives
#
# ARCH: amd64 (x86_64) or arm64 (aarch64). SMALLY_AMD64_ROOT / SMALLY_ARM64_ROOT override where
# each lives (default ~/.cache/smally/<arch>-root).
#
# What each step works around, as seen in trial builds:
# - onnxruntime parses /proc/cpuinfo at import and crashes on the host's x86 one under qemu: an
#   aarch64-style cpuinfo (/etc/smally/cpuinfo in the root) is bind-mounted over /proc/cpuinfo,
#   and also left as a plain file at <root>/proc/cpuinfo, which qemu-user finds through
#   QEMU_LD_PREFIX when the binaries run on the host (/proc is not mounted there then).
# - pip inside the root must trust the same extra CA certificates as the host.
# - Its venv holds exactly requirements/build.txt (the lock), installed with hashes required.
# - Every mount is made in a private mount namespace (unshare), so none outlives a run, even one
#   that fails half-way.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${1:-}" in
amd64 | x86_64) ARCH=amd64 QEMU_ARCH=x86_64 ROOT=${SMALLY_AMD64_ROOT:-} ;;
arm64 | aarch64) ARCH=arm64 QEMU_ARCH=aarch64 ROOT=${SMALLY_ARM64_ROOT:-} ;;
*)
    echo "usage: $0 amd64|arm64 [exec CMD... | path]" >&2
    exit 2
    ;;
esac
shift
ROOT=${ROOT:-${HOME:-/root}/.cache/smally/$ARCH-root}
# Under qemu-user when the machine is of another architecture.
FOREIGN=$([ "$(uname -m)" == "$QEMU_ARCH" ] && echo false || echo true)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
# python3.11 + libpython3.11 (PyInstaller bundles the shared library), binutils (objdump, for
# PyInstaller and the glibc check), ca-certificates (pip over TLS).
PACKAGES=python3,python3-venv,libpython3.11,binutils,ca-certificates
VENV=/opt/smally-venv
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "debian-root $ARCH: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        say "needs root (debootstrap, chroot, binfmt_misc)"
        exit 2
    fi
}

host_tools() {
    if $FOREIGN; then "$REPO/build/host-tools.sh" "root-$ARCH"; else "$REPO/build/host-tools.sh" root; fi
}

binfmt() {
    $FOREIGN || return 0
    local dir=/proc/sys/fs/binfmt_misc
    if [ ! -e "$dir/register" ]; then
        mount -t binfmt_misc binfmt_misc "$dir"
    fi
    if [ ! -e "$dir/qemu-$QEMU_ARCH" ]; then
        [ -e "/var/lib/binfmts/qemu-$QEMU_ARCH" ] || update-binfmts --import "qemu-$QEMU_ARCH"
        update-binfmts --enable "qemu-$QEMU_ARCH"
    fi
    if ! grep -q '^enabled' "$dir/qemu-$QEMU_ARCH"; then
        echo 1 >"$dir/qemu-$QEMU_ARCH"
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
        [ ! -e "$root/etc/smally/cpuinfo" ] || mount --bind "$root/etc/smally/cpuinfo" "$root/proc/cpuinfo"
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
    rm -rf "$partial"
    mkdir -p "$(dirname "$ROOT")"
    if ! $FOREIGN; then
        say "debootstrap $SUITE $ARCH into $ROOT (first run only; about a minute)"
        debootstrap --arch="$ARCH" --variant=minbase --include="$PACKAGES" \
            "$SUITE" "$partial" "$MIRROR" >&2
    else
        say "debootstrap $SUITE $ARCH into $ROOT (first run only; a few minutes under qemu)"
        debootstrap --arch="$ARCH" --foreign --variant=minbase --include="$PACKAGES" \
            "$SUITE" "$partial" "$MIRROR" >&2
        cp "/usr/bin/qemu-$QEMU_ARCH-static" "$partial/usr/bin/"
        # The second stage runs the package scripts of the other architecture, through
        # binfmt_misc and qemu.
        unshare --mount --propagation private -- /bin/bash -euc '
            mount --rbind /dev "$1/dev"
            chroot "$1" /debootstrap/debootstrap --second-stage
        ' _ "$partial" >&2
    fi
    mkdir -p "$partial/etc/smally"
    echo "$SUITE $(date -u +%FT%TZ)" >"$partial/etc/smally/bootstrapped"
    rm -rf "$ROOT"
    mv "$partial" "$ROOT"
}

# Debian's security updates of the interpreter (bookworm-security, then the point releases):
# looked for when the root's package lists are a day old, so that a cached root does not keep
# freezing an interpreter that has since been patched.
security_updates() {
    local lists="$ROOT/etc/smally/apt-updated"
    if [ -n "$(find "$lists" -mmin -1440 2>/dev/null)" ]; then
        return 0
    fi
    if [ ! -e "$ROOT/etc/apt/sources.list.d/security.list" ]; then
        echo "deb $SECURITY_MIRROR $SUITE-security main" >"$ROOT/etc/apt/sources.list.d/security.list"
        echo "deb $MIRROR $SUITE-updates main" >>"$ROOT/etc/apt/sources.list.d/security.list"
    fi
    say "apt-get upgrade (Debian's fixes to python3.11 and the rest of the root)"
    in_root "$ROOT" apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
    in_root "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
        apt-get -o DPkg::Lock::Timeout=600 upgrade -y -qq >&2
    in_root "$ROOT" apt-get clean
    date -u +%FT%TZ >"$lists"
}

refresh() {
    mkdir -p "$ROOT/etc/smally" "$ROOT/src" "$ROOT/proc"
    if [ "$ARCH" == arm64 ] && $FOREIGN; then
        write_cpuinfo "$ROOT/etc/smally/cpuinfo"
        # A plain file under the (unmounted) proc directory: qemu-user, given
        # QEMU_LD_PREFIX=$ROOT, opens it instead of the host's /proc/cpuinfo. Hidden while
        # /proc is mounted.
        if ! mountpoint -q "$ROOT/proc"; then
            cp "$ROOT/etc/smally/cpuinfo" "$ROOT/proc/cpuinfo"
        fi
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
    say "installing requirements/build.txt into $VENV ($ARCH wheels, hashes required)"
    if ! grep -q -- '--hash=' "$ROOT$VENV/requirements.txt" 2>/dev/null; then
        rm -rf "${ROOT:?}$VENV"
    fi
    [ -x "$ROOT$VENV/bin/python" ] || in_root "$ROOT" python3 -m venv "$VENV"
    in_root "$ROOT" "$VENV/bin/pip" install --quiet --require-hashes --no-deps --only-binary=:all: \
        -r /src/requirements/build.txt >&2
    echo "$wanted" >"$ROOT$VENV/requirements.txt"
}

if [ "${1:-}" == path ]; then
    echo "$ROOT"
    exit 0
fi
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
security_updates
python_env
echo "$ROOT"
