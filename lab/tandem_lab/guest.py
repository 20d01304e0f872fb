"""The lab guest image: the lab machine's Debian kernel and a busybox initramfs.

See docs/lab-guest.md. The output goes to a cache directory named by a hash of
its inputs (kernel version, busybox, the files under lab/guest/rootfs and this
builder), so a rebuild with the same inputs is skipped, and the same inputs
give the same bytes (fixed mtimes and owners, sorted cpio, gzip without a
timestamp).

    <cache>/guest/<key>/vmlinux            the kernel's ELF with the PVH entry (boots ~2x
                                           faster under TCG than the bzImage)
    <cache>/guest/<key>/vmlinuz            the Debian bzImage, as installed
    <cache>/guest/<key>/initramfs.cpio.gz
    <cache>/guest/<key>/manifest.json      key, kernel version, sizes and sha256 sums
"""

from __future__ import annotations

import gzip
import hashlib
import ipaddress
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .paths import REPO, Paths
from .system import run, step

GUEST_DIR = REPO / "lab" / "guest"
ROOTFS = GUEST_DIR / "rootfs"
# What the guest needs from the kernel: virtio PCI, the disk, the NIC, the file systems a
# NoCloud config drive can carry (vfat from qemu-img, or iso9660), and the ACPI power button
# as an input device (button, evdev: modules in Debian's kernel), which busybox acpid reads to
# shut down cleanly on `virsh shutdown`.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "vfat", "nls_cp437", "nls_utf8", "nls_ascii",
           "isofs", "button", "evdev")
HOST_PACKAGES = ("linux-image-amd64", "busybox-static", "cpio")
BUSYBOX = Path("/bin/busybox")
EPOCH = 0          # every file in the initramfs gets this mtime
# Where `push` puts the image inside a hypervisor host (QEMU, as libvirt-qemu, reads it).
REMOTE_DIR = "/var/lib/libvirt/images/tandem-guest"


class GuestImageError(RuntimeError):
    pass


def kernel_version() -> str:
    """The newest Debian amd64 kernel installed on the lab machine with its modules."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*-amd64"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / version / "modules.dep").exists():
            found.append(version)
    if not found:
        raise GuestImageError(
            "no Debian kernel with modules on the lab machine; install it with\n"
            f"  apt-get install -y -o DPkg::Lock::Timeout=600 {' '.join(HOST_PACKAGES)}\n"
            "(`make lab-deps` does this)")
    return max(found, key=_version_key)


def _version_key(v: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", v)]


def module_order(version: str, wanted=MODULES, modules_root: Path = Path("/lib/modules")) -> list[str]:
    """The module files (relative to /lib/modules/VERSION) to load, dependencies first."""
    deps = {}
    for line in (modules_root / version / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in reversed(deps[mod]):      # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise GuestImageError(f"kernel {version} has no module {name}")
        visit(by_name[name])
    return order


def image_key(version: str) -> str:
    h = hashlib.sha256()
    h.update(version.encode() + b"\0")
    h.update((Path("/boot") / f"vmlinuz-{version}").read_bytes())
    h.update(BUSYBOX.read_bytes())
    for f in sorted(p for p in ROOTFS.rglob("*") if p.is_file()) + [Path(__file__)]:
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(paths: Paths, force: bool = False) -> dict:
    """Build the image (or find it in the cache) and return its manifest."""
    version = kernel_version()
    for tool, package in ((str(BUSYBOX), "busybox-static"), ("cpio", "cpio")):
        if shutil.which(tool) is None:
            raise GuestImageError(f"{tool} is missing: apt-get install {package} (`make lab-deps`)")
    key = image_key(version)
    dest = paths.cache / "guest" / key
    manifest = dest / "manifest.json"
    if manifest.exists() and not force:
        step(f"guest image {key} is cached: {dest}")
        return json.loads(manifest.read_text())
    step(f"building guest image {key} (kernel {version})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{key}.building.", dir=dest.parent))
    try:
        shutil.copyfile(f"/boot/vmlinuz-{version}", work / "vmlinuz")
        _extract_vmlinux(work / "vmlinuz", work / "vmlinux")
        modules = module_order(version)
        _initramfs(version, modules, work / "initramfs.cpio.gz")
        files = {}
        for name in ("vmlinux", "vmlinuz", "initramfs.cpio.gz"):
            data = (work / name).read_bytes()
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        info = {"key": key, "kernel": version, "modules": [Path(m).name for m in modules],
                "files": files}
        (work / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        work.chmod(0o755)
        work.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    step(f"guest image {key}: initramfs {files['initramfs.cpio.gz']['size']} B, "
         f"vmlinux {files['vmlinux']['size']} B in {dest}")
    return info


def _extract_vmlinux(vmlinuz: Path, vmlinux: Path) -> None:
    """The ELF inside Debian's xz-compressed bzImage: QEMU boots it through its PVH note,
    skipping the real-mode setup and the decompressor (slow under TCG)."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise GuestImageError(f"{vmlinuz}: no xz stream (not a Debian amd64 bzImage?)")
    elf = lzma.LZMADecompressor().decompress(data[start:])
    if not elf.startswith(b"\x7fELF"):
        raise GuestImageError(f"{vmlinuz}: the xz stream is not an ELF kernel")
    vmlinux.write_bytes(elf)


def _initramfs(version: str, modules: list[str], target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        root = Path(tmp) / "root"
        shutil.copytree(ROOTFS, root, symlinks=True)
        for d in ("dev", "proc", "sys", "run", "tmp", "etc", "seed", "lib/modules"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
        (root / "bin" / "busybox").chmod(0o755)
        for m in modules:
            shutil.copyfile(Path("/lib/modules") / version / m, root / "lib" / "modules" / Path(m).name)
        (root / "lib" / "modules" / "load-order").write_text(
            "".join(Path(m).name + "\n" for m in modules))
        entries = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        for p in [root, *(root / e for e in entries)]:
            os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)
        listing = "".join(e + "\n" for e in ["."] + entries)
        archive = subprocess.run(
            ["cpio", "--create", "--format=newc", "--owner=0:0", "--reproducible", "--quiet"],
            cwd=root, input=listing.encode(), capture_output=True, check=True).stdout
        with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                      compresslevel=9, filename="") as gz:
            gz.write(archive)


def push(paths: Paths, host: str, info: dict) -> dict[str, str]:
    """Copy the image into a lab host (lab hosts cannot fetch anything) unless it is there.
    Returns the image's paths inside the host: {"kernel", "vmlinuz", "initrd"}."""
    src = paths.cache / "guest" / info["key"]
    remote = f"{REMOTE_DIR}/{info['key']}"
    attach = ["lxc-attach", "-P", str(paths.lxcpath), "-n", host, "--clear-env", "--"]
    for name, meta in info["files"].items():
        target = f"{remote}/{name}"
        have = subprocess.run([*attach, "sha256sum", target], capture_output=True, text=True)
        if have.returncode == 0 and have.stdout.split()[0] == meta["sha256"]:
            continue
        step(f"{host}: copying guest {name} ({meta['size']} B) to {target}")
        with open(src / name, "rb") as f:
            subprocess.run([*attach, "sh", "-c", 'mkdir -p "${0%/*}" && cat > "$0.tmp" && mv "$0.tmp" "$0"',
                            target], stdin=f, check=True, timeout=300)
    # A stable name for the image the host has now, for domains defined by path (the lab's
    # protection group): <REMOTE_DIR>/current -> <key>.
    subprocess.run([*attach, "ln", "-sfn", info["key"], f"{REMOTE_DIR}/current"], check=True, timeout=60)
    return {"kernel": f"{remote}/vmlinux", "vmlinuz": f"{remote}/vmlinuz",
            "initrd": f"{remote}/initramfs.cpio.gz"}


NETWORK_VAR = "tandem_guest_network"
BRIDGE_UNIT = "tandem-lab-guest-bridge.service"


def bridge_unit(spec: dict) -> str:
    """A systemd unit that makes the guests' host-only bridge inside a hypervisor host.

    A plain Linux bridge, not a libvirt network: the lab image has no dnsmasq, and libvirt
    9.0 then crashes (SIGSEGV) at every start while a network is active or autostarted. The
    host holds the gateway address; with the host's ip_forward off (the container default),
    guests reach only the host and each other."""
    net = ipaddress.ip_network(spec["subnet"])
    gateway = ipaddress.ip_address(spec["gateway"])
    if gateway not in net:
        raise GuestImageError(f"guest bridge {spec['bridge']}: gateway {gateway} is not in {net}")
    br = spec["bridge"]
    return (f"# Generated by the Tandem DR lab (lab/tandem_lab/guest.py); do not edit.\n"
            "[Unit]\nDescription=Tandem DR lab: host-only bridge for guests\n"
            "Before=libvirtd.service\n\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            f"ExecStart=/bin/sh -c 'ip link show {br} >/dev/null 2>&1 || "
            f"ip link add {br} type bridge stp_state 0'\n"
            f"ExecStart=/sbin/ip addr replace {gateway}/{net.prefixlen} dev {br}\n"
            f"ExecStart=/sbin/ip link set {br} up\n"
            f"ExecStop=/sbin/ip link del {br}\n\n"
            "[Install]\nWantedBy=multi-user.target\n")


def ensure_networks(topo, paths: Paths) -> list[str]:
    """Install and start each hypervisor's guest bridge unit (idempotent). Returns the hosts
    where something changed."""
    changed = []
    for host in topo.hosts.values():
        spec = host.vars.get(NETWORK_VAR)
        if not host.hypervisor or not spec:
            continue
        attach = ["lxc-attach", "-P", str(paths.lxcpath), "-n", host.name, "--clear-env", "--"]
        unit = bridge_unit(spec)
        path = f"/etc/systemd/system/{BRIDGE_UNIT}"
        have = run([*attach, "cat", path], check=False).stdout
        if have != unit:
            run([*attach, "sh", "-c", 'cat > "$0"', path], input=unit)
            run([*attach, "systemctl", "daemon-reload"])
            run([*attach, "systemctl", "restart", BRIDGE_UNIT])
            changed.append(host.name)
        run([*attach, "systemctl", "enable", "--now", "--quiet", BRIDGE_UNIT])
    if changed:
        step(f"guest bridges (re)made on {', '.join(changed)}")
    return changed
