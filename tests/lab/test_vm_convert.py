"""An existing libvirt VM converted in place to tandemd and failed over with re-IP (issue 8).

On hv-a1 a plain libvirt domain runs the lab guest (docs/lab-guest.md) from files Tandem DR
did not make: its data disk a raw file (vda), its NoCloud seed a raw vfat image (vdb) with
192.168.10.31. The protection group names it `convert: true` with `seed_target: vdb`.

- Without `seed_target`, protect.yml refuses it before touching anything: the seed drive
  exists only at production, so the replica could not start. The VM keeps running, no
  resource is created.
- With it, protect converts the domain (one short shutdown): vda becomes the tandemd export
  of the same file, and the guest's app goes on from the records it wrote before, which are
  then at hv-b1 too.
- A planned failover starts the replica on hv-b1 from the kept definition, its seed drive on a
  seed written there with the DR address (192.168.20.31, lab network mapping); every record
  the guest had called durable is there. Failback brings it home with 192.168.10.31.

Figures (protect's wall time with the conversion, the RTO of each start) go to
tests/output/vm_convert_figures.json. Opt-in: `make test-convert`.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from dr_helpers import HYPERVISORS, ctl_status, forget_resources, playbook, remove_engine, start_crashed
from guestlib import VM_DIR, read_volume, records, status, undefine, write_seed

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "inventories" / "lab"
FIGURES = REPO / "tests" / "output" / "vm_convert_figures.json"
PROD, DR = "hv-a1", "hv-b1"
VM = "conv01"
IPS = ("192.168.10.31", "192.168.20.31")          # at site A, at site B (same_offset)
MAC = "52:54:00:0a:00:31"
DATA = f"/srv/tandem/{VM}/disk0.img"              # the volume's default path: converted in place
SEED = f"{VM_DIR}/{VM}/seed.img"                  # the VM's own seed: only at production
IMAGES = "/var/lib/libvirt/images/tandem-guest/current"
TANDEM_VM_DIR = "/var/lib/tandem-vms"             # the vm role's per-VM files (its seeds)
HEALTHY_TIMEOUT = 240                             # TCG on a shared 2-core machine

pytestmark = pytest.mark.opt_in("TANDEM_VM_CONVERT")


def group(seed_target: bool) -> dict:
    vm = {"name": VM, "production": PROD, "dr": DR, "port": 7831, "convert": True,
          "disks": [{"size": "64MiB"}],
          "nics": [{"network": "guests", "ip": f"{IPS[0]}/24", "mac": MAC}]}
    if seed_target:
        vm["seed_target"] = "vdb"
    return {"tandem_protection_group": {"name": "convert", "vms": [vm]}}


# Not the role's template: a domain as someone else wrote it, a file disk and a file seed.
# The serial console is a pty: a console log file would be one more file only at production.
DOMAIN = f"""<domain type='qemu'>
  <name>{VM}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{IMAGES}/vmlinux</kernel>
    <initrd>{IMAGES}/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 tdr.interval=0.5</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{DATA}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{SEED}'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='bridge'>
      <mac address='{MAC}'/>
      <source bridge='tdr-guest'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def _forget(lab) -> None:
    for host in HYPERVISORS:
        undefine(lab, host, VM)
        lab.attach(host, "rm", "-rf", f"{VM_DIR}/{VM}", f"{TANDEM_VM_DIR}/{VM}",
                   f"/var/lib/tandem/domains/{VM}.xml")
        forget_resources(lab, host, VM)


class Conv:
    def __init__(self, lab, tmp: Path):
        self.lab, self.runs, self.figures = lab, tmp / "runs", {}
        self.groups = {}
        for with_seed in (False, True):
            path = tmp / f"group-{'seed' if with_seed else 'noseed'}.yml"
            path.write_text(yaml.safe_dump(group(with_seed)))
            self.groups[with_seed] = path

    def play(self, name: str, *extra: str, seed_target: bool = True, **kw):
        return playbook(self.lab, name, "-e", f"tandem_network_mapping_file={LAB / 'network_mapping.yml'}",
                        "-e", f"tandem_runs_dir={self.runs}", *extra, group=self.groups[seed_target], **kw)

    def healthy(self, host: str, site: int, newer_than: int = 0) -> dict:
        """The guest's status from `host` at its address for that site (0: A, 1: B), once its app
        has gone past record `newer_than`."""
        st, deadline = None, time.monotonic() + HEALTHY_TIMEOUT
        while time.monotonic() < deadline:
            st = status(self.lab, host, IPS[site])
            if st and (st.get("last_durable_seq") or 0) > newer_than:
                assert (st["hostname"], st["ip"]) == (VM, IPS[site]), st
                return st
            time.sleep(2)
        raise AssertionError(f"{VM} not healthy at {IPS[site]} from {host} past record {newer_than}: {st}")

    def check_records(self, host: str, durable: int) -> None:
        chain = records(read_volume(self.lab, host, DATA, durable + 64))
        assert len(chain) >= durable, f"{len(chain)} intact records at {host}, {durable} were durable"

    def running(self, host: str) -> set[str]:
        proc = self.lab.attach(host, "virsh", "-q", "list", "--name")
        return {n for n in proc.stdout.split() if n}

    def drives(self, host: str) -> dict[str, ET.Element]:
        proc = self.lab.attach(host, "virsh", "dumpxml", "--inactive", VM)
        assert proc.returncode == 0, proc.stderr
        return {d.find("target").get("dev"): d for d in ET.fromstring(proc.stdout).iterfind("devices/disk")}

    def record(self, what: str, value) -> None:
        self.figures[what] = value
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps(self.figures, indent=2) + "\n")

    def rto(self, operation: str) -> float:
        newest = sorted(self.runs.glob(f"{operation}-2*.json"))[-1]
        report = json.loads(newest.read_text())
        assert report["result"] == "succeeded", report
        (vm,) = report["vms"]
        assert (vm["name"], vm["ip_before"], vm["ip_after"]) == \
            ((VM, *IPS) if operation == "failover" else (VM, *reversed(IPS))), vm
        return report["rto_seconds"]


@pytest.fixture(scope="module")
def conv(lab, tmp_path_factory):
    lab.labctl("heal")
    start_crashed(lab)
    lab.labctl("guest-image", *HYPERVISORS, timeout=1800)
    playbook(lab, "engine")
    _forget(lab)
    c = Conv(lab, tmp_path_factory.mktemp("convert"))
    # The VM as it ran before Tandem DR: an empty data disk file, its seed, defined and started.
    seed = {"instance_id": VM, "hostname": VM,
            "nics": [{"name": "eth0", "mac": MAC, "addresses": [f"{IPS[0]}/24"], "gateway": "192.168.10.1",
                      "dns": []}]}
    assert write_seed(lab, PROD, VM, seed) == SEED
    proc = lab.attach(PROD, "sh", "-c", f"mkdir -p -m 0755 /srv/tandem/{VM} && truncate -s 64M {DATA}")
    assert proc.returncode == 0, proc.stderr
    lab.put(PROD, f"{VM_DIR}/{VM}/domain.xml", DOMAIN)
    for cmd in (("define", f"{VM_DIR}/{VM}/domain.xml"), ("start", VM)):
        proc = lab.attach(PROD, "virsh", "-q", *cmd, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    yield c
    lab.labctl("heal")
    start_crashed(lab)
    _forget(lab)
    remove_engine(lab)


def test_a_drive_only_at_production_is_refused_before_anything_changes(conv):
    before = conv.healthy(PROD, 0)
    refused = conv.play("protect", seed_target=False, expect_ok=False)
    assert refused.proc.returncode != 0
    assert f"vdb (disk): file {SEED} is not replicated" in refused.output, refused.output[-3000:]
    assert "seed_target" in refused.output
    # Nothing was done: the VM ran on, no resource at either site.
    assert conv.running(PROD) == {VM}
    assert conv.healthy(PROD, 0)["boot"] == before["boot"]
    for host in HYPERVISORS:
        assert conv.lab.attach(host, "test", "-e", f"/etc/tandem/resources.d/{VM}.toml").returncode != 0


def test_protect_converts_it_with_one_short_shutdown_and_its_records_go_on(conv):
    before = conv.healthy(PROD, 0, newer_than=5)
    t0 = time.monotonic()
    conv.play("protect")
    conv.record("protect_seconds", round(time.monotonic() - t0, 1))
    st = ctl_status(conv.lab, PROD, VM)
    assert (st["role"], st["connection"]) == ("Primary", "Connected"), st
    vda = conv.drives(PROD)["vda"]
    assert (vda.get("type"), vda.find("source").get("name")) == ("network", f"{VM}/disk0")
    assert conv.drives(PROD)["vdb"].find("source").get("file") == SEED      # production keeps its seed
    assert conv.lab.attach(DR, "test", "-s", f"/var/lib/tandem/domains/{VM}.xml").returncode == 0
    # Booted once more (the shutdown), on tandemd, and its app went on from its old records.
    after = conv.healthy(PROD, 0, newer_than=before["last_durable_seq"])
    assert after["boot"] != before["boot"]
    chain = records(read_volume(conv.lab, DR, DATA, after["last_durable_seq"] + 64))
    assert len(chain) >= before["last_durable_seq"]
    assert {r.boot for r in chain[:before["last_durable_seq"]]} == {before["boot"]}
    again = conv.play("protect")
    assert again.changed == 0, again.output[-3000:]


def test_planned_failover_starts_it_at_b_on_a_seed_with_the_dr_address(conv):
    before = conv.healthy(PROD, 0)
    assert conv.lab.attach(DR, "test", "-e", SEED).returncode != 0              # never copied there
    conv.play("failover", "-e", "mode=planned")
    assert conv.running(PROD) == set() and conv.running(DR) == {VM}            # never two copies
    after = conv.healthy(DR, 1, newer_than=before["last_durable_seq"])
    conv.check_records(DR, before["last_durable_seq"])
    assert after["instance_id"] == VM
    vdb = conv.drives(DR)["vdb"]
    assert vdb.find("source").get("file") == f"{TANDEM_VM_DIR}/{VM}/seed.img"
    assert conv.drives(DR)["vda"].find("source").get("name") == f"{VM}/disk0"
    conv.record("failover_rto_seconds", conv.rto("failover"))


def test_failback_brings_it_home_with_its_production_address(conv):
    before = conv.healthy(DR, 1)
    conv.play("failback")
    assert conv.running(DR) == set() and conv.running(PROD) == {VM}
    conv.healthy(PROD, 0, newer_than=before["last_durable_seq"])
    conv.check_records(PROD, before["last_durable_seq"])
    assert conv.drives(PROD)["vdb"].find("source").get("file") == f"{TANDEM_VM_DIR}/{VM}/seed.img"
    conv.record("failback_rto_seconds", conv.rto("failback"))
