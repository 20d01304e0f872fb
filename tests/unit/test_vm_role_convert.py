"""The vm role's entry points for a converted VM with a seed drive (issue 8), run by
ansible-playbook on this machine against libvirt's test driver: a node file
(test:///PATH) holds the hypervisor's domains, so each module run sees them as a hypervisor
would (every run starts from the file again; what a run defined is read from its result).

- check_convert fails, listing the drive, when the seed drive is not the VM's seed_target,
  also in check mode, and passes when it is;
- start at the DR site (a kept definition, no such domain yet) writes a seed with the DR
  address and points the seed drive at it; a drill copy gets its own seed, which `remove`
  deletes;
- start at production after a failback (no kept definition) repoints its own domain's drive.
Real QEMU guests: tests/lab/test_vm_convert.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ansible_collections.tandem.dr.plugins.filter import network, protection

pytest.importorskip("libvirt", reason="libvirt-python is in requirements-dev.txt")
ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / ".cache" / "collections"
MAC = "52:54:00:0a:00:31"
DATA = "/srv/tandem/conv01/disk0.img"
MAPPING = {"mac_policy": "keep", "networks": [{
    "name": "guests", "production": {"bridge": "br-a"}, "dr": {"bridge": "br-b"},
    "subnets": [{"production": {"cidr": "192.168.10.0/24", "gateway": "192.168.10.1"},
                 "dr": {"cidr": "192.168.20.0/24", "gateway": "192.168.20.1"}, "ip_policy": "same_offset"}]}]}

PLAYBOOK = """
- name: One entry point of the vm role
  hosts: localhost
  gather_facts: false
  tasks:
    - name: The entry point
      ansible.builtin.include_role:
        name: tandem.dr.vm
        tasks_from: "{{ entry }}"
    - name: What tandem_vm returned
      ansible.builtin.copy:
        content: "{{ __tandem_vm_started_xml | default({}) | to_json }}"
        dest: "{{ result_file }}"
        mode: "0600"
      check_mode: false
"""


def domain(disk0: str, seed: str, state: str = "", bridge="br-a") -> str:
    runstate = f"<test:runstate>{state}</test:runstate>" if state else ""
    return f"""<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>conv01</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    {disk0}
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{seed}'/>
      <target dev='vdb' bus='virtio'/><readonly/></disk>
    <interface type='bridge'><mac address='{MAC}'/><source bridge='{bridge}'/></interface>
  </devices>{runstate}
</domain>"""


FILE_DISK = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{DATA}'/>"
             "<target dev='vda' bus='virtio'/></disk>")
NBD_DISK = ("<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>"
            "<source protocol='nbd' name='conv01/disk0'>"
            "<host transport='unix' socket='/run/tandem/conv01.nbd'/>"
            "</source><target dev='vda' bus='virtio'/></disk>")


def plan(seed_target="vdb"):
    vm = {"name": "conv01", "production": "hv-a1", "dr": "hv-b1", "port": 7831, "convert": True,
          "disks": [{"size": "64MiB"}], "nics": [{"network": "guests", "ip": "192.168.10.31/24", "mac": MAC}]}
    if seed_target:
        vm["seed_target"] = seed_target
    (entry,) = protection.protection_plan({"name": "g", "vms": [vm]}, {"hv-a1": {}, "hv-b1": {}},
                                          ["hv-a1", "hv-b1"])
    (nics,) = network.network_plan([entry], MAPPING, "failover")
    return entry, nics["nics"]


class Played:
    def __init__(self, proc, result):
        self.proc, self.stdout, self.result = proc, proc.stdout, result

    def __getitem__(self, key):
        return self.result[key]


def play(tmp_path, entry, node_domains, check=False, diff=False, expect_ok=True, **role_vars):
    """Run one entry point: its output, and tandem_vm's result (`[key]`; {} if it did not run)."""
    if not (COLLECTIONS / "ansible_collections" / "tandem" / "dr").exists():
        pytest.fail("run `make collections` first (tandem.dr must resolve to this checkout)")
    node = tmp_path / "node.xml"
    node.write_text("<node>" + "".join(node_domains) + "</node>")
    book = tmp_path / "play.yml"
    book.write_text(PLAYBOOK)
    result_file = tmp_path / "result.json"
    result_file.unlink(missing_ok=True)
    extra = {"entry": entry, "tandem_vm_uri": f"test://{node}", "result_file": str(result_file),
             "tandem_vm_dir": str(tmp_path / "vms"), "tandem_vm_definitions_dir": str(tmp_path / "domains"),
             "ansible_python_interpreter": sys.executable, **role_vars}
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
           str(book), "-e", f"@{tmp_path / 'extra.json'}", *(["--check"] if check else []),
           *(["--diff"] if diff else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False,
                          cwd=tmp_path)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-4000:] + proc.stderr[-2000:]
    return Played(proc, json.loads(result_file.read_text()) if result_file.exists() else {})


def test_check_convert_lists_a_seed_drive_that_is_not_the_seed_target(tmp_path):
    vm = plan(seed_target=None)[0]
    for check in (False, True):
        proc = play(tmp_path, "check_convert", [domain(FILE_DISK, "/old/seed.img")], check=check,
                    expect_ok=False, tandem_vm=vm, tandem_vm_nics=[])
        assert "VM conv01 on localhost cannot be converted, nothing was changed" in proc.stdout
        assert "vdb (disk): file /old/seed.img is not replicated" in proc.stdout
        assert "name it `seed_target`" in proc.stdout
    vm = plan()[0]
    play(tmp_path, "check_convert", [domain(FILE_DISK, "/old/seed.img")], tandem_vm=vm, tandem_vm_nics=[])


def test_check_convert_refuses_a_domain_that_is_not_there(tmp_path):
    vm = plan()[0]
    proc = play(tmp_path, "check_convert", [], expect_ok=False, tandem_vm=vm, tandem_vm_nics=[])
    assert "no libvirt domain conv01 is defined on this host" in proc.stdout


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img makes the seed image (qemu-utils)")
def test_start_at_dr_writes_a_seed_with_the_dr_address_and_a_drill_copy_its_own(tmp_path):
    vm, nics = plan()
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / "conv01.xml").write_text(domain(NBD_DISK, "/old/seed.img"))
    dr_nics = [n["target"] for n in nics]
    r = play(tmp_path, "start", [], tandem_vm=vm, tandem_vm_nics=dr_nics)
    seed = tmp_path / "vms" / "conv01" / "seed.img"
    assert r["actions"] == ["define", "start"] and r["domain"]["state"] == "running"
    assert r["domain"]["disks"][1] == {"target": "vdb", "type": "file", "path": str(seed)}
    assert r["domain"]["disks"][0]["export"] == "conv01/disk0"
    assert r["domain"]["interfaces"] == [{"type": "bridge", "bridge": "br-b", "mac": MAC}]
    assert seed.stat().st_size > 0
    config = (tmp_path / "vms" / "conv01" / "seed" / "network-config").read_text()
    assert '["192.168.20.31/24"]' in config and "192.168.10.31" not in config
    # A drill copy: its own seed under its own name, its clone's export; `remove` deletes it.
    r = play(tmp_path, "start", [], tandem_vm=vm, tandem_vm_nics=dr_nics,
             tandem_vm_domain_name="conv01-d1", tandem_vm_exports=["conv01/disk0@clone-d1"])
    drill_seed = tmp_path / "vms" / "conv01-d1" / "seed.img"
    assert r["domain"]["name"] == "conv01-d1" and r["domain"]["disks"][1]["path"] == str(drill_seed)
    assert r["domain"]["disks"][0]["export"] == "conv01/disk0@clone-d1"
    assert drill_seed.exists() and seed.exists()
    play(tmp_path, "remove", [], tandem_vm=vm, tandem_vm_nics=[], tandem_vm_domain_name="conv01-d1")
    assert not (tmp_path / "vms" / "conv01-d1").exists() and seed.exists()


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img makes the seed image (qemu-utils)")
def test_start_at_production_after_failback_repoints_its_own_domain(tmp_path):
    vm, nics = plan()
    # No kept definition at production: the converted domain is there, shut off at the failover.
    r = play(tmp_path, "start", [domain(NBD_DISK, "/old/seed.img", state="5", bridge="br-a")], diff=True,
             tandem_vm=vm, tandem_vm_nics=[n["source"] for n in nics])
    seed = tmp_path / "vms" / "conv01" / "seed.img"
    assert r["actions"] == ["define", "start"]
    assert r["diff"]["before"]["disks"][1]["path"] == "/old/seed.img"
    assert r["domain"]["disks"][1]["path"] == str(seed)
    assert '["192.168.10.31/24"]' in (tmp_path / "vms" / "conv01" / "seed" / "network-config").read_text()
    # Check mode changes nothing on the host, and says what it would do.
    shutil.rmtree(tmp_path / "vms")
    r = play(tmp_path, "start", [domain(NBD_DISK, "/old/seed.img", state="5")], check=True,
             tandem_vm=vm, tandem_vm_nics=[n["source"] for n in nics])
    assert r["actions"] == ["define", "start"] and not (tmp_path / "vms").exists()
