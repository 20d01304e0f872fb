"""tandem_vm and tandem_vm_info against libvirt's own test driver (test:///default: a real
libvirt connection with an in-memory hypervisor, shared by every connection of this
process). Nothing of ours is mocked; libvirt normalises the XML as it does on a hypervisor,
which is what the idempotence checks are about. Real QEMU guests: tests/lab."""

from __future__ import annotations

import importlib
import uuid as uuidlib

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

from ansible_collections.tandem.dr.plugins.module_utils import _domain_xml as dx

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is in requirements-dev.txt")
URI = "test:///default"


@pytest.fixture(autouse=True, scope="module")
def hypervisor():
    """test:///default keeps its domains only while some connection is open."""
    conn = libvirt.open(URI)
    yield conn
    conn.close()


class Exit(Exception):
    def __init__(self, result, failed):
        super().__init__(result.get("msg", ""))
        self.result, self.failed = result, failed


def run(module_name, check=False, diff=True, expect_fail=False, **params):
    module = importlib.import_module(f"ansible_collections.tandem.dr.plugins.modules.{module_name}")

    def leave(failed):
        def exit_(self, **kwargs):
            raise Exit(kwargs, failed)
        return exit_

    mp = pytest.MonkeyPatch()
    mp.setattr(basic.AnsibleModule, "exit_json", leave(False))
    mp.setattr(basic.AnsibleModule, "fail_json", leave(True))
    try:
        uri = {"uri": URI} if module_name.startswith("tandem_vm") else {}
        args = {**uri, **params, "_ansible_check_mode": check, "_ansible_diff": diff}
        with patch_module_args(args), pytest.raises(Exit) as info:
            module.main()
    finally:
        mp.undo()
    assert info.value.failed == expect_fail, info.value.result
    return info.value.result


def vm(**params):
    return run("tandem_vm", **params)


def definition(memory_mib=64, disk="/srv/x.img", bridge="br-a", mac="52:54:00:00:00:01") -> str:
    return f"""<domain type='test'>
  <name>placeholder</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'><mac address='{mac}'/><source bridge='{bridge}'/></interface>
  </devices>
</domain>"""


NBD = [{"target": "vda", "socket": "/run/tandem/{}.nbd", "export": "{}/0"}]


def nbd(name):
    return [{k: v.format(name) if isinstance(v, str) else v for k, v in d.items()} for d in NBD]


@pytest.fixture
def name():
    """A fresh domain name per test, removed afterwards."""
    n = f"vm-{uuidlib.uuid4().hex[:8]}"
    yield n
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(n)
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


def lv_state(n):
    conn = libvirt.open(URI)
    try:
        return conn.lookupByName(n).state()[0]
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def test_define_with_nbd_disks_is_idempotent_and_check_mode_is_honest(name):
    r = vm(name=name, definition=definition(), nbd_disks=nbd(name), check=True)
    assert r["changed"] and r["actions"] == ["define"] and lv_state(name) is None
    assert r["diff"]["before"] == {"state": "absent"}
    r = vm(name=name, definition=definition(), nbd_disks=nbd(name))
    assert r["actions"] == ["define"] and r["domain"]["state"] == "shutoff"
    (disk,) = r["domain"]["disks"]
    assert disk == {"target": "vda", "type": "network", "protocol": "nbd", "export": f"{name}/0",
                    "socket": f"/run/tandem/{name}.nbd"}
    assert r["domain"]["definition_sha256"]
    # libvirt rewrote the XML (uuid, defaults, ...), yet nothing is to be done.
    again = vm(name=name, definition=definition(), nbd_disks=nbd(name))
    assert not again["changed"] and again["actions"] == []
    assert again["domain"]["uuid"] == r["domain"]["uuid"]
    # A real change is seen, in check mode too, and check mode leaves it alone.
    bigger = vm(name=name, definition=definition(memory_mib=128), nbd_disks=nbd(name), check=True)
    assert bigger["changed"] and bigger["actions"] == ["define"]
    assert vm(name=name, definition=definition(), nbd_disks=nbd(name))["changed"] is False
    # Redefining keeps the domain's UUID although the definition has none (libvirt would refuse).
    r = vm(name=name, definition=definition(memory_mib=128), nbd_disks=nbd(name))
    assert r["changed"] and r["domain"]["uuid"] == again["domain"]["uuid"]


def test_run_states(name):
    vm(name=name, definition=definition(), nbd_disks=nbd(name))
    r = vm(name=name, definition=definition(), nbd_disks=nbd(name), state="running", check=True)
    assert r["actions"] == ["start"] and lv_state(name) == libvirt.VIR_DOMAIN_SHUTOFF
    r = vm(name=name, definition=definition(), nbd_disks=nbd(name), state="running")
    assert r["actions"] == ["start"] and r["domain"]["state"] == "running"
    assert vm(name=name, state="running")["changed"] is False
    r = vm(name=name, state="shutoff", check=True)
    assert r["actions"] == ["shutdown"] and "stopped_by" not in r
    assert lv_state(name) == libvirt.VIR_DOMAIN_RUNNING
    r = vm(name=name, state="shutoff")
    assert r["actions"] == ["shutdown"] and r["domain"]["state"] == "shutoff"
    # The test driver's guest obeys the ACPI request at once: no power off was needed.
    assert r["stopped_by"] == "shutdown" and 0 <= r["shutdown_seconds"] < 5
    again = vm(name=name, state="shutoff")
    assert again["changed"] is False and "stopped_by" not in again


@pytest.fixture
def deaf_guest(monkeypatch):
    """A guest that ignores the ACPI shutdown request (as the lab guest did before it ran
    acpid): libvirt accepts the request and the domain keeps running. The test driver's
    guests always obey, so its virDomain.shutdown is what this replaces."""
    monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda self: 0)


def test_a_guest_that_ignores_acpi_is_powered_off_after_the_timeout_only_with_force_off(name, deaf_guest):
    vm(name=name, definition=definition(), nbd_disks=nbd(name), state="running")
    r = vm(name=name, state="shutoff", shutdown_timeout=1, expect_fail=True)
    assert "did not shut down within 1 s (set force_off" in r["msg"] and r["actions"] == ["shutdown"]
    assert lv_state(name) == libvirt.VIR_DOMAIN_RUNNING
    r = vm(name=name, state="shutoff", shutdown_timeout=1, force_off=True)
    assert r["actions"] == ["shutdown", "destroy"] and r["stopped_by"] == "destroy"
    assert 1 <= r["shutdown_seconds"] < 5 and lv_state(name) == libvirt.VIR_DOMAIN_SHUTOFF
    # absent powers it off after the timeout whatever force_off says.
    vm(name=name, state="running")
    r = vm(name=name, state="absent", shutdown_timeout=1)
    assert r["actions"] == ["shutdown", "destroy", "undefine"] and r["stopped_by"] == "destroy"
    assert lv_state(name) is None


def test_converting_a_running_vm_needs_restart_and_then_shuts_down_once(name):
    conn = libvirt.open(URI)
    xml = dx.parse(definition(disk="/var/lib/libvirt/images/legacy.img"))
    dx.set_identity(xml, name=name)
    conn.defineXML(dx.render(xml)).create()
    conn.close()
    refused = vm(name=name, nbd_disks=nbd(name), state="running", expect_fail=True)
    assert "is running and its disks would change" in refused["msg"]
    assert lv_state(name) == libvirt.VIR_DOMAIN_RUNNING
    r = vm(name=name, nbd_disks=nbd(name), state="running", restart=True)
    assert r["actions"] == ["shutdown", "define", "start"] and r["stopped_by"] == "shutdown"
    assert r["domain"]["disks"][0]["type"] == "network" and r["domain"]["state"] == "running"
    assert r["diff"]["before"]["disks"][0]["path"] == "/var/lib/libvirt/images/legacy.img"
    assert vm(name=name, nbd_disks=nbd(name), state="running", restart=True)["changed"] is False


def with_seed_drive(xml: str, device="cdrom", target="sdb", source="/var/lib/libvirt/images/seed.iso") -> str:
    """The definition with a NoCloud seed drive (a converted VM's, at production)."""
    drive = (f"<disk type='file' device='{device}'><driver name='qemu' type='raw'/>"
             f"<source file='{source}'/><target dev='{target}' bus='sata'/><readonly/></disk>")
    return xml.replace("<interface", drive + "<interface", 1)


def test_file_disks_point_a_seed_drive_at_this_sites_seed(name):
    kept = with_seed_drive(definition())
    seed = [{"target": "sdb", "path": f"/var/lib/tandem-vms/{name}/seed.img"}]
    r = vm(name=name, definition=kept, nbd_disks=nbd(name), file_disks=seed, check=True)
    assert r["actions"] == ["define"] and lv_state(name) is None
    assert r["domain"]["disks"][1] == {"target": "sdb", "type": "file", "device": "cdrom",
                                       "path": f"/var/lib/tandem-vms/{name}/seed.img"}
    r = vm(name=name, definition=kept, nbd_disks=nbd(name), file_disks=seed, state="running")
    assert r["actions"] == ["define", "start"]
    assert r["domain"]["disks"][1]["path"] == f"/var/lib/tandem-vms/{name}/seed.img"
    again = vm(name=name, definition=kept, nbd_disks=nbd(name), file_disks=seed, state="running")
    assert not again["changed"]
    # Without a definition (production after a failback): its own domain, compared by its drives.
    assert not vm(name=name, file_disks=seed, state="running")["changed"]
    other = [{"target": "sdb", "path": "/elsewhere/seed.img"}]
    refused = vm(name=name, file_disks=other, state="running", expect_fail=True)
    assert "is running and its disks would change" in refused["msg"]
    vm(name=name, state="shutoff")
    r = vm(name=name, file_disks=other, state="running", diff=True)
    assert r["actions"] == ["define", "start"]
    assert r["diff"]["before"]["disks"][1]["path"] == f"/var/lib/tandem-vms/{name}/seed.img"
    assert r["diff"]["after"]["disks"][1]["path"] == "/elsewhere/seed.img"
    assert not vm(name=name, file_disks=other, state="running")["changed"]


def test_file_disks_turn_a_network_drive_into_a_raw_file_and_the_driver_format_is_set(name):
    vm(name=name, definition=with_seed_drive(definition(), device="disk", target="vdb"), nbd_disks=nbd(name))
    r = vm(name=name, file_disks=[{"target": "vda", "path": "/srv/a.qcow2", "format": "qcow2"},
                                  {"target": "vdb", "path": "/srv/seed.img"}])
    assert [d["type"] for d in r["domain"]["disks"]] == ["file", "file"]
    assert [d["path"] for d in r["domain"]["disks"]] == ["/srv/a.qcow2", "/srv/seed.img"]
    root = dx.parse(run("tandem_vm_info", names=[name], xml=True)["domains"][name]["xml"])
    assert [d.find("driver").get("type") for d in root.iterfind("devices/disk")] == ["qcow2", "raw"]


def test_interfaces_are_mapped_by_mac_with_a_vlan(name):
    vm(name=name, definition=definition(), nbd_disks=nbd(name))
    iface = [{"match_mac": "52:54:00:00:00:01", "bridge": "br-dr", "vlan": 120, "mac": "52:54:00:00:00:99"}]
    r = vm(name=name, interfaces=iface)
    assert r["domain"]["interfaces"][0] == {"type": "bridge", "bridge": "br-dr", "vlan": 120,
                                            "mac": "52:54:00:00:00:99"}
    # The MAC it matched on is gone now; by position it is the same interface, already right.
    r = vm(name=name, interfaces=[{"bridge": "br-dr", "vlan": 120, "mac": "52:54:00:00:00:99"}])
    assert not r["changed"]
    r = vm(name=name, interfaces=[{"network": "isolated"}])
    assert r["domain"]["interfaces"][0]["network"] == "isolated"
    missing = vm(name=name, interfaces=[{"match_mac": "52:54:00:de:ad:00", "bridge": "x"}],
                 expect_fail=True)
    assert "no interface with MAC 52:54:00:de:ad:00" in missing["msg"]


def test_absent_stops_and_undefines_and_check_mode_keeps_it(name):
    vm(name=name, definition=definition(), nbd_disks=nbd(name), state="running")
    r = vm(name=name, state="absent", check=True)
    assert r["actions"] == ["shutdown", "undefine"] and lv_state(name) == libvirt.VIR_DOMAIN_RUNNING
    r = vm(name=name, state="absent")
    assert r["actions"] == ["shutdown", "undefine"] and lv_state(name) is None
    assert r["stopped_by"] == "shutdown"
    assert vm(name=name, state="absent")["changed"] is False


def test_new_domain_takes_the_given_uuid(name):
    want = str(uuidlib.uuid4())
    r = vm(name=name, definition=definition(), uuid=want)
    assert r["domain"]["uuid"] == want


@pytest.mark.parametrize("params, message", [
    ({"definition": "<domain><name>x</name"}, "not well-formed XML"),
    ({"definition": "<network><name>x</name></network>"}, "root element is <network>"),
    ({"definition": definition(), "nbd_disks": [{"target": "vdz", "socket": "/s", "export": "e"}]},
     "no disk with target 'vdz' (it has ['vda'])"),
    ({}, "does not exist: give its definition"),
    ({"definition": definition(), "interfaces": [{"bridge": "a"}, {"bridge": "b"}]},
     "interface 1: the domain has only 1 interface(s)"),
    ({"definition": definition(), "file_disks": [{"target": "sdb", "path": "/seed.img"}]},
     "no disk with target 'sdb' (it has ['vda'])"),
    ({"definition": with_seed_drive(definition()), "nbd_disks": NBD,
      "file_disks": [{"target": "vda", "path": "/x"}]},
     "targets vda are in both nbd_disks and file_disks"),
])
def test_bad_input_fails_clearly_and_defines_nothing(name, params, message):
    r = vm(name=name, expect_fail=True, **params)
    assert message in r["msg"] and name in r["msg"]
    assert lv_state(name) is None


def test_info_reads_states_disks_and_the_definition(name):
    vm(name=name, definition=definition(), nbd_disks=nbd(name), state="running")
    r = run("tandem_vm_info", names=[name, "no-such-vm"], xml=True)
    assert r["domains"]["no-such-vm"] == {"state": "absent"}
    got = r["domains"][name]
    assert got["state"] == "running" and got["disks"][0]["socket"] == f"/run/tandem/{name}.nbd"
    assert dx.definition_marker(dx.parse(got["xml"])) == got["definition_sha256"]
    # The XML read back defines the same domain elsewhere (how the DR site keeps a copy).
    assert dx.summary(dx.parse(got["xml"]))["disks"] == got["disks"]


def test_fingerprint_ignores_layout_uuid_and_marker():
    a = dx.parse(definition())
    b = dx.parse(definition().replace("\n  ", "\n").replace("type='raw'", 'type="raw"'))
    dx.set_identity(b, uuid=str(uuidlib.uuid4()))
    dx.mark(b)
    assert dx.fingerprint(a) == dx.fingerprint(b)
    assert dx.fingerprint(a) != dx.fingerprint(dx.parse(definition(memory_mib=65)))
