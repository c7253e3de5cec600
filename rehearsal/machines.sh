#!/usr/bin/env bash
# Throwaway servers for `make rehearse-cluster`: Debian 12 machines booted under systemd-nspawn,
# each with systemd as its PID 1, its own network namespace and address on a private bridge,
# reached over SSH like the VM of `make rehearse` — from the same base image (rehearsal/
# vm-image.sh: the VM's disk, mounted read-only as the lower layer of one overlay per machine).
# A container boots in seconds where a VM under TCG takes minutes, and three fit in the memory of
# one.
#
#   rehearsal/machines.sh up DIR KEY NAME=ADDRESS...   boot them (state in DIR; KEY.pub authorized)
#   rehearsal/machines.sh down DIR                     power them off, remove what `up` made
#
# The network: bridge $BRIDGE with the host at .1 of $SUBNET, every machine its ADDRESS/24 and
# the host as its gateway (masqueraded, for apt). Needs root. The host needs no systemd: nspawn
# runs with --register=no --keep-unit, each machine started from a cgroup of its own.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BRIDGE=${SMALLY_MACHINES_BRIDGE:-smally-br0}
SUBNET=${SMALLY_MACHINES_SUBNET:-10.77.0}
NFT_TABLE=smally_machines_${BRIDGE//-/_}  # one per bridge: two rehearsals can run side by side

say() { echo "machines: $*" >&2; }
die() {
    say "$*"
    exit 1
}

[ "$(id -u)" == 0 ] || die "needs root (nspawn, mounts, the bridge)"

# The VM image's disk as a raw file next to it (once per image), mounted read-only at DIR/lower.
mount_image() {
    local dir=$1 image raw
    image=$("$HERE/vm-image.sh" | tail -n 1)
    raw="$image/base.raw"
    if [ ! -e "$raw" ]; then
        qemu-img convert -O raw "$image/base.qcow2" "$raw.partial"
        mv "$raw.partial" "$raw"
    fi
    mkdir -p "$dir/lower"
    mountpoint -q "$dir/lower" || mount -o loop,ro "$raw" "$dir/lower"
}

network_up() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    sysctl -q -w net.ipv4.ip_forward=1
    nft delete table inet "$NFT_TABLE" 2>/dev/null || true
    nft -f - <<EOF
table inet $NFT_TABLE {
    chain postrouting {
        type nat hook postrouting priority srcnat;
        ip saddr $SUBNET.0/24 oifname != "$BRIDGE" masquerade
    }
}
EOF
}

# The machine's own files, written into its overlay's upper layer before it boots.
configure() {
    local root=$1 name=$2 address=$3 key=$4 others=$5
    echo "$name" >"$root/etc/hostname"
    {
        printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' "$name"
        printf '%s' "$others"
    } >"$root/etc/hosts"
    # The VM's eth0 by DHCP becomes nspawn's host0, static.
    cat >"$root/etc/network/interfaces" <<EOF
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

auto host0
iface host0 inet static
    address $address/24
    gateway $SUBNET.1
EOF
    grep -m1 '^nameserver' /etc/resolv.conf >"$root/etc/resolv.conf" || echo "nameserver 1.1.1.1" >"$root/etc/resolv.conf"
    install -m 0600 -o 1000 -g 1000 "$key.pub" "$root/home/admin/.ssh/authorized_keys"
    # Nothing to mount: the root is the overlay nspawn hands over.
    : >"$root/etc/fstab"
}

start() {
    local dir=$1 name=$2
    for hierarchy in systemd unified; do
        [ -d "/sys/fs/cgroup/$hierarchy" ] && mkdir -p "/sys/fs/cgroup/$hierarchy/smally-machines/$name"
    done
    # Its own cgroup first: without a host systemd, nspawn --keep-unit puts the machine's
    # payload under the cgroup it runs in, and machines started from one cgroup would share it.
    # A reboot inside (exit status 133) boots it again, as a server would.
    setsid bash -c '
        for h in systemd unified; do
            [ -d "/sys/fs/cgroup/$h/smally-machines/$2" ] && echo $$ >"/sys/fs/cgroup/$h/smally-machines/$2/cgroup.procs"
        done
        while :; do
            systemd-nspawn -D "$1/$2/root" -M "$2" --boot --register=no --keep-unit \
                --network-bridge="$3" --console=passive
            status=$?
            [ $status == 133 ] || exit $status
        done' machine "$dir" "$name" "$BRIDGE" >"$dir/$name/console.log" 2>&1 </dev/null &
    echo $! >"$dir/$name/pid"
}

up() {
    local dir=$1 key=$2
    shift 2
    [ -f "$key.pub" ] || die "no $key.pub"
    mkdir -p "$dir"
    mount_image "$dir"
    network_up
    local hosts="" spec
    for spec in "$@"; do
        hosts+="${spec#*=}	${spec%%=*}"$'\n'
    done
    for spec in "$@"; do
        local name=${spec%%=*} address=${spec#*=}
        mkdir -p "$dir/$name/upper" "$dir/$name/work" "$dir/$name/root"
        mountpoint -q "$dir/$name/root" ||
            mount -t overlay overlay -o "lowerdir=$dir/lower,upperdir=$dir/$name/upper,workdir=$dir/$name/work" "$dir/$name/root"
        configure "$dir/$name/root" "$name" "$address" "$key" "$hosts"
        start "$dir" "$name"
    done
    local deadline=$((SECONDS + 120))
    for spec in "$@"; do
        until ssh -i "$key" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
            -o ConnectTimeout=2 -o LogLevel=ERROR "admin@${spec#*=}" true 2>/dev/null; do
            [ $SECONDS -lt $deadline ] || die "${spec%%=*} did not answer SSH in 120 s: $(tail -n 20 "$dir/${spec%%=*}/console.log")"
            sleep 1
        done
    done
    say "up: $*"
}

down() {
    local dir=$1 pidfile name pid nspawn
    for pidfile in "$dir"/*/pid; do
        [ -e "$pidfile" ] || continue
        name=$(basename "$(dirname "$pidfile")")
        pid=$(cat "$pidfile")
        # SIGTERM to nspawn powers the machine off cleanly (its systemd shuts down).
        nspawn=$(pgrep -P "$pid" -x systemd-nspawn || true)
        [ -n "$nspawn" ] && kill -TERM "$nspawn" 2>/dev/null
        for _ in $(seq 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
        [ -n "$nspawn" ] && kill -KILL "$nspawn" 2>/dev/null || true
        mountpoint -q "$dir/$name/root" && umount -l "$dir/$name/root"
        for hierarchy in systemd unified; do
            [ -d "/sys/fs/cgroup/$hierarchy/smally-machines/$name" ] &&
                find "/sys/fs/cgroup/$hierarchy/smally-machines/$name" -depth -type d -exec rmdir {} + 2>/dev/null
        done
        rm -f "$pidfile"
    done
    mountpoint -q "$dir/lower" 2>/dev/null && umount -l "$dir/lower"
    nft delete table inet "$NFT_TABLE" 2>/dev/null || true
    ip link del "$BRIDGE" 2>/dev/null || true
    return 0
}

case "${1-}" in
up)
    [ $# -ge 4 ] || die "usage: machines.sh up DIR KEY NAME=ADDRESS..."
    shift
    up "$@"
    ;;
down)
    [ $# -eq 2 ] || die "usage: machines.sh down DIR"
    down "$2"
    ;;
*) die "usage: machines.sh up DIR KEY NAME=ADDRESS... | down DIR" ;;
esac
