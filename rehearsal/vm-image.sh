#!/usr/bin/env bash
# The throwaway servers of the rehearsals: a Debian 12 base image, built once with debootstrap
# and cached. The VM of `make rehearse` boots a fresh qcow2 overlay of the amd64 image; the
# nspawn machines (rehearsal/machines.sh) mount base.raw under an overlay of their own.
#
#   rehearsal/vm-image.sh [amd64|arm64]   build the image unless cached; prints its directory last
#
# arm64 (for `make rehearse ARCH=arm64`): debootstrapped and configured under qemu-user through
# binfmt_misc, no kernel (it boots under nspawn only), base.raw without the qcow2.
#
# The image is what a freshly installed Debian 12 server looks like before our playbook: the
# standard debootstrap package set (systemd, ifupdown with DHCP on eth0, nftables, cron...),
# dbus, openssh-server, sudo, python3 and linux-image-amd64; an `admin` user with passwordless sudo,
# the way cloud images come. It carries no SSH key: each run makes its own and passes its public
# half on the kernel command line (smally.authorized_key=<base64>), which a boot unit writes to
# ~admin/.ssh/authorized_keys. Nothing of Smally is in it and nothing is configured for it; the
# one shortcut: the Debian packages that ansible/site.yml's step 1 names (read from the playbook,
# so the two lists cannot differ) are installed here, natively, with services left stopped. Under
# qemu's TCG the same apt transaction took 507 s of the first deployment; here it takes seconds.
# The playbook still declares them (apt, state present: `ok` instead of `changed`) and does every
# other step itself; a package name the mirror lacks fails this build the way it would fail a
# deployment.
#
# The cache key is the hash of this script and of that package list: changing either builds a new
# image. Needs root (debootstrap, chroot, device nodes in the image).
#   SMALLY_VM_CACHE   where images live (default ~/.cache/smally/vm)
#   DEBIAN_MIRROR     the mirror debootstrap and the VM's apt use (default http://deb.debian.org/debian)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${SMALLY_VM_CACHE:-${HOME:-/root}/.cache/smally/vm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
SUITE=bookworm
DISK_SIZE=8G
ARCH=${1:-amd64}
case $ARCH in
amd64) QEMU_ARCH=x86_64 KERNEL=linux-image-amd64 ;;
arm64) QEMU_ARCH=aarch64 KERNEL="" ;;
*)
    echo "usage: $0 [amd64|arm64]" >&2
    exit 2
    ;;
esac
FOREIGN=$([ "$(uname -m)" == "$QEMU_ARCH" ] && echo false || echo true)
PACKAGES=systemd-sysv,dbus,openssh-server,sudo,python3,ca-certificates${KERNEL:+,$KERNEL}

say() { echo "vm-image: $*" >&2; }

[ "$(id -u)" == 0 ] || { say "needs root (debootstrap, chroot)"; exit 2; }

# The packages of the playbook's step 1 (the `- name` lines of its apt task), one per line.
playbook_packages() {
    awk '/name: 1\. System \| Install the packages/ { on = 1; next }
         on && /state: present/ { exit }
         on && /^ +- [a-z0-9][a-z0-9.+-]*$/ { print $2 }' "$HERE/../ansible/site.yml"
}
SMALLY_PACKAGES=$(playbook_packages)
[ -n "$SMALLY_PACKAGES" ] || { say "no package list found in ansible/site.yml's step 1"; exit 1; }

key=$({ cat "${BASH_SOURCE[0]}"; echo "$SMALLY_PACKAGES"; } | sha256sum | cut -c1-12)
IMAGE="$CACHE/debian12-$ARCH-$key"
if [ -e "$IMAGE/ready" ]; then
    echo "$IMAGE"
    exit 0
fi

for tool in debootstrap mkfs.ext4 qemu-img; do
    command -v "$tool" >/dev/null || { say "$tool is missing (rehearsal/host-tools.sh installs it)"; exit 2; }
done

work="$IMAGE.partial"
root="$work/root"
cleanup() {
    # Nothing may stay mounted in the root, even when a step fails half-way.
    for m in dev/pts dev proc sys; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    return 0
}
trap cleanup EXIT
cleanup
rm -rf "$work"
mkdir -p "$root"

started=$SECONDS
say "debootstrap $SUITE $ARCH (first run only, a few minutes; under qemu-user more)"
debootstrap_failed() {
    tail -n 30 "$work/debootstrap.log" >&2
    say "debootstrap failed; the full log is $work/debootstrap.log"
    exit 1
}
if ! $FOREIGN; then
    debootstrap --arch="$ARCH" --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || debootstrap_failed
else
    # The second stage runs the other architecture's package scripts through binfmt_misc.
    [ -e "/proc/sys/fs/binfmt_misc/qemu-$QEMU_ARCH" ] ||
        { say "no binfmt_misc entry for qemu-$QEMU_ARCH (build/host-tools.sh root-$ARCH installs it)"; exit 2; }
    debootstrap --arch="$ARCH" --foreign --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 || debootstrap_failed
    cp "/usr/bin/qemu-$QEMU_ARCH-static" "$root/usr/bin/"
    mount --bind /dev "$root/dev"
    chroot "$root" /debootstrap/debootstrap --second-stage >>"$work/debootstrap.log" 2>&1 || debootstrap_failed
    umount "$root/dev"
fi
say "debootstrap done in $((SECONDS - started)) s"

# --- configuration of the root -------------------------------------------------------------
echo smally-vm >"$root/etc/hostname"
cat >"$root/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	smally-vm
::1		localhost ip6-localhost ip6-loopback
EOF
echo "/dev/vda / ext4 defaults,errors=remount-ro 0 1" >"$root/etc/fstab"

cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF

# Network: eth0 (net.ifnames=0 on the kernel command line) by DHCP from qemu's user-mode network.
cat >"$root/etc/network/interfaces" <<EOF
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
EOF

# The playbook's packages (see the header), as apt on the server would install them: from this
# sources.list, no recommends; no service may start in the chroot (policy-rc.d says no).
say "installing the playbook's packages: $(echo $SMALLY_PACKAGES)"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount -t sysfs sysfs "$root/sys"
# shellcheck disable=SC2086 # one package per word
chroot "$root" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends $(echo $SMALLY_PACKAGES)" >"$work/packages.log" 2>&1 || {
    tail -n 30 "$work/packages.log" >&2
    say "installing the playbook's packages failed; the full log is $work/packages.log"
    exit 1
}
cleanup
rm -f "$root/usr/sbin/policy-rc.d"
say "packages installed ($((SECONDS - started)) s so far)"
rm -f "$root/etc/resolv.conf"

# The `admin` user, with passwordless sudo, as a cloud image has it; no password logins.
chroot "$root" useradd --create-home --shell /bin/bash --groups sudo admin
echo "admin ALL=(ALL) NOPASSWD:ALL" >"$root/etc/sudoers.d/90-admin"
chmod 0440 "$root/etc/sudoers.d/90-admin"
install -d -m 0700 -o 1000 -g 1000 "$root/home/admin/.ssh"
cat >"$root/etc/ssh/sshd_config.d/rehearsal.conf" <<EOF
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
EOF

# The run's public key, from the kernel command line, before sshd starts.
cat >"$root/usr/local/sbin/rehearsal-ssh-key" <<'EOF'
#!/bin/sh
set -eu
for word in $(cat /proc/cmdline); do
    case "$word" in
    smally.authorized_key=*)
        echo "${word#smally.authorized_key=}" | base64 -d >/home/admin/.ssh/authorized_keys
        chown admin:admin /home/admin/.ssh/authorized_keys
        chmod 0600 /home/admin/.ssh/authorized_keys
        ;;
    esac
done
EOF
chmod 0755 "$root/usr/local/sbin/rehearsal-ssh-key"
cat >"$root/etc/systemd/system/rehearsal-ssh-key.service" <<EOF
[Unit]
Description=Authorize the rehearsal's SSH key from the kernel command line
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/rehearsal-ssh-key

[Install]
WantedBy=multi-user.target
EOF
chroot "$root" systemctl enable rehearsal-ssh-key.service >/dev/null 2>&1

# A fresh machine-id at every boot of an overlay; the apt cache is not part of the image.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
chroot "$root" apt-get clean
rm -rf "$root/var/lib/apt/lists/"*

# --- kernel, host key, disk image ----------------------------------------------------------
if [ -n "$KERNEL" ]; then
    kernel=$(find "$root/boot" -name 'vmlinuz-*' | sort | tail -n 1)
    initrd=$(find "$root/boot" -name 'initrd.img-*' | sort | tail -n 1)
    [ -n "$kernel" ] && [ -n "$initrd" ] || { say "no kernel or initrd in $root/boot"; exit 1; }
    cp "$kernel" "$work/vmlinuz"
    cp "$initrd" "$work/initrd.img"
fi
cp "$root/etc/ssh/ssh_host_ed25519_key.pub" "$work/ssh_host_ed25519_key.pub"

cleanup
say "writing the ext4 image ($DISK_SIZE, sparse)"
mkfs.ext4 -q -F -L smally-root -d "$root" "$work/base.raw" "$DISK_SIZE" >&2 # stdout is for the path alone
if [ -n "$KERNEL" ]; then
    qemu-img convert -O qcow2 "$work/base.raw" "$work/base.qcow2"
    rm -f "$work/base.raw"
fi
rm -rf "$root"
date -u +%FT%TZ >"$work/ready"

# Older images of other recipes are of no further use.
find "$CACHE" -mindepth 1 -maxdepth 1 -name "debian12-$ARCH-*" ! -name "$(basename "$IMAGE").partial" \
    -exec rm -rf {} +
mv "$work" "$IMAGE"
say "image ready in $((SECONDS - started)) s: $IMAGE"
echo "$IMAGE"
