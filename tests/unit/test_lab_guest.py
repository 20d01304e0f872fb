"""The lab guest's pieces that need no lab: module order, the guest bridge unit, the seed
templates as the guest's own parser reads them, the record format; and, where QEMU is
installed on this machine, the guest's clean shutdown on the ACPI power button."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from tandem_lab import guest, topology
from tandem_lab.guest_qemu import QEMU
from tandem_lab.paths import Paths

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "lab"))
import guestlib  # noqa: E402

SEED_SCRIPT = REPO / "lab" / "guest" / "rootfs" / "bin" / "tdr-seed"


def test_modules_load_dependencies_first(tmp_path):
    (tmp_path / "9.9").mkdir()
    (tmp_path / "9.9" / "modules.dep").write_text(
        "kernel/virtio_ring.ko:\n"
        "kernel/virtio.ko: kernel/virtio_ring.ko\n"
        "kernel/virtio_pci.ko: kernel/virtio_pci_legacy_dev.ko kernel/virtio.ko kernel/virtio_ring.ko\n"
        "kernel/virtio_pci_legacy_dev.ko:\n"
        "kernel/virtio_blk.ko: kernel/virtio.ko kernel/virtio_ring.ko\n"
        "kernel/nls_iso8859-1.ko:\n")
    order = guest.module_order("9.9", ("virtio_pci", "virtio_blk", "nls_iso8859_1"), tmp_path)
    assert order == ["kernel/virtio_ring.ko", "kernel/virtio.ko", "kernel/virtio_pci_legacy_dev.ko",
                     "kernel/virtio_pci.ko", "kernel/virtio_blk.ko", "kernel/nls_iso8859-1.ko"]
    with pytest.raises(guest.GuestImageError, match="no module isofs"):
        guest.module_order("9.9", ("isofs",), tmp_path)


def test_each_hypervisor_gets_a_host_only_guest_bridge_in_its_site_subnet():
    topo = topology.load()
    specs = {h.name: h.vars[guest.NETWORK_VAR] for h in topo.hosts.values() if h.hypervisor}
    subnets = {n: s["subnet"] for n, s in specs.items()}
    assert subnets == {"hv-a1": "192.168.10.0/24", "hv-b1": "192.168.20.0/24"}
    unit = guest.bridge_unit(specs["hv-a1"])
    assert "ip addr replace 192.168.10.1/24 dev tdr-guest" in unit
    assert "ip link add tdr-guest type bridge" in unit
    with pytest.raises(guest.GuestImageError, match="not in"):
        guest.bridge_unit({"bridge": "x", "subnet": "192.168.10.0/24", "gateway": "192.168.20.1"})


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox-static is not installed")
def test_the_guest_reads_the_seed_the_templates_write():
    """Render network-config.j2 and meta-data.j2, then flatten them with the guest's own awk
    (busybox, as in the guest): the values the guest applies are the ones rendered."""
    seed = {"instance_id": "web01-2", "hostname": "web01",
            "nics": [{"name": "eth0", "mac": "52:54:00:AA:00:01", "addresses": ["192.168.20.10/24"],
                      "gateway": "192.168.20.1", "dns": ["192.168.20.1", "192.168.20.2"]}]}
    script = SEED_SCRIPT.read_text()
    flatten = script[script.index("flatten() {"):script.index("\n}\n", script.index("flatten() {")) + 3]

    def flat(text: str) -> list[str]:
        proc = subprocess.run(["busybox", "sh", "-c", flatten + "flatten"], input=text,
                              capture_output=True, text=True, check=True)
        return proc.stdout.splitlines()

    net = flat(guestlib.render("seed/network-config.j2", seed=seed))
    assert net == ["version=2",
                   "ethernets.eth0.match.macaddress=52:54:00:aa:00:01",
                   "ethernets.eth0.set-name=eth0",
                   "ethernets.eth0.addresses[]=192.168.20.10/24",
                   "ethernets.eth0.routes[0].to=default",
                   "ethernets.eth0.routes[0].via=192.168.20.1",
                   "ethernets.eth0.nameservers.addresses[]=192.168.20.1",
                   "ethernets.eth0.nameservers.addresses[]=192.168.20.2"]
    assert flat(guestlib.render("seed/meta-data.j2", seed=seed)) == ["instance-id=web01-2",
                                                                     "local-hostname=web01"]


def _record(seq: int, prev: str) -> bytes:
    body = f"TDR1 seq={seq} time=1796000000 host=g1 boot=abcd0123 prev={prev}"
    line = f"{body} sum={hashlib.sha256(body.encode()).hexdigest()[:16]}\n".encode()
    return line + bytes(guestlib.RECORD - len(line))


def test_records_are_the_valid_chained_prefix_of_the_disk():
    disk, prev = b"", guestlib.ZERO_SUM
    for seq in range(1, 4):
        block = _record(seq, prev)
        prev = guestlib.parse_record(block).sum
        disk += block
    assert [r.seq for r in guestlib.records(disk + bytes(guestlib.RECORD))] == [1, 2, 3]
    torn = bytearray(disk)
    torn[2 * guestlib.RECORD + 10] ^= 1                  # a bit flipped in record 3
    assert [r.seq for r in guestlib.records(bytes(torn))] == [1, 2]
    # A valid record that does not chain to the one before it ends the prefix too.
    assert [r.seq for r in guestlib.records(disk[:guestlib.RECORD] + _record(2, "f" * 16))] == [1]


def test_the_domain_template_gives_nbd_disks_then_the_seed_and_the_nics():
    xml = guestlib.render("libvirt-domain.xml.j2", domain={
        "name": "db<1>", "uuid": "6ee3e83b-2842-4850-a169-bc9c6900e82c", "kernel": "/k", "initrd": "/i",
        "disks": [{"socket": "/run/tandem/db1.nbd", "export": "db1/disk0"},
                  {"socket": "/run/tandem/db1.nbd", "export": "db1/disk1"}],
        "seed": "/var/lib/tandem-guest/db1/seed.img",
        "nics": [{"bridge": "tdr-guest", "mac": "52:54:00:00:00:01"}, {"network": "isolated"}]})
    dom = ET.fromstring(xml)
    assert dom.get("type") == "qemu" and dom.findtext("name") == "db<1>"
    assert dom.findtext("uuid") == "6ee3e83b-2842-4850-a169-bc9c6900e82c"
    assert dom.find("features/acpi") is not None and dom.findtext("os/kernel") == "/k"
    disks = dom.findall("devices/disk")
    assert [(d.find("source").get("name"), d.find("source/host").get("socket"), d.find("target").get("dev"))
            for d in disks[:2]] == [("db1/disk0", "/run/tandem/db1.nbd", "vda"),
                                    ("db1/disk1", "/run/tandem/db1.nbd", "vdb")]
    assert all(d.find("source/host").get("transport") == "unix" for d in disks[:2])
    seed = disks[2]
    assert (seed.find("source").get("file"), seed.find("target").get("dev")) == (
        "/var/lib/tandem-guest/db1/seed.img", "vdc")
    assert seed.find("readonly") is not None
    nics = dom.findall("devices/interface")
    assert [(n.get("type"), n.find("source").attrib) for n in nics] == [
        ("bridge", {"bridge": "tdr-guest"}), ("network", {"network": "isolated"})]
    assert nics[0].find("mac").get("address") == "52:54:00:00:00:01" and nics[1].find("mac") is None
    # Without a kernel the domain boots its first disk; without a console log, a pty.
    bare = ET.fromstring(guestlib.render("libvirt-domain.xml.j2", domain={
        "name": "x", "disks": [{"socket": "/s", "export": "x/disk0"}]}))
    assert bare.find("os/kernel") is None and bare.find("os/boot").get("dev") == "hd"
    assert bare.find("devices/serial").get("type") == "pty" and bare.find("uuid") is None


@pytest.mark.skipif(shutil.which(QEMU) is None, reason="qemu-system-x86 is not installed (a dev tool here)")
def test_the_guest_shuts_down_cleanly_on_the_acpi_power_button(tmp_path):
    """The built image under plain QEMU TCG: the power button (what `virsh shutdown` sends)
    powers it off by itself, and the app's last durable record is the disk's last record.
    The image from before acpid ignored the button and failed here (benchmarks/guest_shutdown.py
    --control); the lab test does the same through libvirt on hv-a1."""
    try:
        info = guest.build(Paths.from_env())
    except guest.GuestImageError as e:
        pytest.skip(str(e))
    timeout = 90                       # ~1 s on the host; TCG on a busy 2-core machine
    run = guestlib.acpi_shutdown_run(Paths.from_env().cache / "guest" / info["key"], tmp_path,
                                     records_before=3, timeout=timeout)
    assert run["exited"], f"QEMU still runs {timeout} s after the power button:\n{run['console'][-3000:]}"
    assert run["qemu_rc"] == 0 and "power button: shutting down" in run["console"], run["console"][-3000:]
    assert run["ok"], {k: v for k, v in run.items() if k != "console"}
