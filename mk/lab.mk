# mk/lab.mk -- the LXC lab (two sites and a witness on this machine). See docs/lab.md.
#
# Targets: lab-deps lab-up lab-up-xfs lab-down lab-status lab-clean-cache lab-guest-image

ifndef TANDEM_LAB_MK
TANDEM_LAB_MK := 1

LABCTL := ./lab/labctl
# What the lab machine itself needs (the lab hosts get everything from the image).
# linux-image-amd64, busybox-static and cpio build the lab guest image (lab-guest-image).
LAB_HOST_PACKAGES := lxc debootstrap nftables iproute2 openssh-client xfsprogs curl \
	linux-image-amd64 busybox-static cpio
LAB_CACHE ?= /var/cache/tandem-lab

.PHONY: lab-deps lab-up lab-up-xfs lab-down lab-status lab-clean-cache lab-guest-image

lab-deps:
	@if [ "$$(id -u)" != 0 ]; then echo "the lab needs root" >&2; exit 1; fi
	@bash ci/apt-ensure.sh lab $(LAB_HOST_PACKAGES)

lab-up: lab-deps
	$(LABCTL) up

# Hypervisor data on XFS with reflink (a loop device), for reflink recovery points.
lab-up-xfs: lab-deps
	$(LABCTL) up --data-fs xfs

lab-down: lab-deps
	$(LABCTL) down

# The lab guest (docs/lab-guest.md): kernel + busybox initramfs, into $(LAB_CACHE)/guest/<key>.
lab-guest-image: lab-deps
	$(LABCTL) guest-image

lab-status:
	@$(LABCTL) status

# The cached rootfs and package downloads (about 1.2 GB); `lab-down` keeps them.
lab-clean-cache:
	rm -rf --one-file-system $(LAB_CACHE)

endif # TANDEM_LAB_MK
