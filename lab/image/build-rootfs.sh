#!/bin/bash
# Build the shared Debian 12 rootfs that every lab host runs on (via overlayfs).
#
#   build-rootfs.sh TARGET_DIR PACKAGES_FILE
#
# Run as root on the lab machine. Downloads are cached under
# $TANDEM_LAB_CACHE (default /var/cache/tandem-lab) so a rebuild after a
# package-list change only fetches what is new. The result is built in a
# temporary directory and renamed into place, so an interrupted build never
# leaves a half-made rootfs behind.
set -euo pipefail

target=${1:?usage: build-rootfs.sh TARGET_DIR PACKAGES_FILE}
packages_file=${2:?usage: build-rootfs.sh TARGET_DIR PACKAGES_FILE}
cache=${TANDEM_LAB_CACHE:-/var/cache/tandem-lab}
suite=bookworm
# Reuse the mirror the machine itself is configured with.
mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

mapfile -t packages < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$packages_file")
work="${target}.building.$$"
mounted=()

cleanup() {
    local m
    for ((i=${#mounted[@]}-1; i>=0; i--)); do
        m=${mounted[i]}
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

step() { printf '[rootfs %(%H:%M:%S)T] %s\n' -1 "$*"; }

mkdir -p "$cache/debootstrap" "$cache/apt-archives/partial" "$(dirname "$target")"
step "debootstrap $suite (minbase) from $mirror"
debootstrap --variant=minbase --cache-dir="$cache/debootstrap" \
    --include=ca-certificates,apt-utils "$suite" "$work" "$mirror" >"$work.log" 2>&1 \
    || { tail -30 "$work.log"; exit 1; }
rm -f "$work.log"

cat >"$work/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
EOF

# Keep package scripts from starting daemons inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$work/usr/sbin/policy-rc.d"
chmod 755 "$work/usr/sbin/policy-rc.d"
for m in proc sys dev dev/pts; do
    mount --bind "/$m" "$work/$m"; mounted+=("$work/$m")
done
mount --bind "$cache/apt-archives" "$work/var/cache/apt/archives"
mounted+=("$work/var/cache/apt/archives")
cp /etc/resolv.conf "$work/etc/resolv.conf"   # only for the build; replaced below

step "apt-get install ${#packages[@]} packages"
chroot "$work" apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive chroot "$work" apt-get install -y -q \
    -o DPkg::Lock::Timeout=600 --no-install-recommends "${packages[@]}" >"$work.apt.log" 2>&1 \
    || { tail -40 "$work.apt.log"; exit 1; }
rm -f "$work.apt.log"

for ((i=${#mounted[@]}-1; i>=0; i--)); do umount "${mounted[i]}"; done
mounted=()

step "configure image"
rm -f "$work/usr/sbin/policy-rc.d"
# No DNS inside the lab: names come from /etc/hosts (written per host).
printf '# lab: no DNS, names come from /etc/hosts\noptions timeout:1 attempts:1\n' \
    >"$work/etc/resolv.conf"
# Per-host identity: machine-id and ssh host keys are made at first boot.
: >"$work/etc/machine-id"
rm -f "$work"/etc/ssh/ssh_host_*
install -d "$work/etc/systemd/system/ssh.service.d"
printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
    >"$work/etc/systemd/system/ssh.service.d/keygen.conf"
printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n' \
    >"$work/etc/ssh/sshd_config.d/lab.conf"
# A busybox-style guest ignores ACPI shutdown; don't let it hold up a host stop.
if [ -f "$work/etc/default/libvirt-guests" ]; then
    sed -i 's/^#\?SHUTDOWN_TIMEOUT=.*/SHUTDOWN_TIMEOUT=5/' "$work/etc/default/libvirt-guests"
fi
chroot "$work" systemctl mask getty@tty1.service serial-getty@ttyS0.service \
    console-getty.service systemd-networkd-wait-online.service >/dev/null 2>&1
chroot "$work" systemctl disable apt-daily.timer apt-daily-upgrade.timer \
    e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
chroot "$work" apt-get clean

# Record what the image holds, for debugging and for the cache key check.
chroot "$work" dpkg-query -W -f '${Package} ${Version}\n' >"$work/etc/tandem-lab-image.packages"

rm -rf --one-file-system "$target"
mv "$work" "$target"
trap - EXIT
step "rootfs ready: $target ($(du -sh --one-file-system "$target" | cut -f1))"
