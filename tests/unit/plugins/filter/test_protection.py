"""The protection-group filters: validation (every problem, nothing half-planned), the plan's
shape, VM selection, and the per-VM status table."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.tandem.dr.plugins.filter import protection

HOSTVARS = {
    "hv-a1": {"tandem_replication_address": "10.202.110.11", "ansible_host": "10.202.10.11"},
    "hv-b1": {"ansible_host": "10.202.20.11"},
    "hv-c1": {"tandem_replication_address": "fd00::11"},
}
HYPERVISORS = ["hv-a1", "hv-b1", "hv-c1"]


def vm(**over):
    base = {"name": "web01", "production": "hv-a1", "dr": "hv-b1", "port": 7800,
            "disks": [{"size": "256MiB"}]}
    base.update(over)
    return base


def plan(*vms, selection=None):
    return protection.protection_plan({"name": "g", "vms": list(vms)}, HOSTVARS, HYPERVISORS, selection)


def test_plan_normalises_one_vm():
    (p,) = plan(vm(tunables={"sync_timeout": 2}))
    assert p == {
        "name": "web01", "production": "hv-a1", "dr": "hv-b1", "hosts": ["hv-a1", "hv-b1"], "port": 7800,
        "protocol": "C", "tunables": {"sync_timeout": 2},
        "volumes": [{"path": "/srv/tandem/web01/disk0.img", "size": 256 << 20,
                     "export": "web01/disk0"}],
        # The replication address wins over ansible_host; without it ansible_host is used.
        "nodes": [{"name": "hv-a1", "address": "10.202.110.11:7800"},
                  {"name": "hv-b1", "address": "10.202.20.11:7800"}],
        "nics": [],
        "convert": False,
    }


def test_nics_are_passed_through_for_the_network_plan():
    nics = [{"network": "prod", "ip": "192.168.10.11/24"}]
    (p,) = plan(vm(nics=nics))
    assert p["nics"] == nics


def test_ipv6_replication_address_is_bracketed():
    (p,) = plan(vm(dr="hv-c1"))
    assert p["nodes"][1]["address"] == "[fd00::11]:7800"


def test_explicit_disk_path_export_and_byte_size():
    (p,) = plan(vm(disks=[{"size": 8192, "path": "/dev/vg0/web01", "export": "web01-root"}]))
    assert p["volumes"] == [{"path": "/dev/vg0/web01", "size": 8192, "export": "web01-root"}]


BAD = [
    ("unknown vm key", vm(prodution="hv-a1"), "unknown keys prodution"),
    ("bad name", vm(name="Web 01"), "name must match"),
    ("host not a hypervisor", vm(dr="cp-a"), "dr host 'cp-a' is not in the hypervisors group"),
    ("same host twice", vm(dr="hv-a1"), "production and dr must be different hosts"),
    ("port not int", vm(port="7800"), "port must be an integer"),
    ("port is bool", vm(port=True), "port must be an integer"),
    ("protocol", vm(protocol="B"), "protocol must be A or C"),
    ("no disks", vm(disks=[]), "disks must be a non-empty list"),
    ("decimal size", vm(disks=[{"size": "2GB"}]), "is not a size"),
    ("unaligned size", vm(disks=[{"size": 1000}]), "multiple of 4096"),
    ("relative path", vm(disks=[{"size": "1M", "path": "disk.img"}]), "path must be absolute"),
    ("unknown disk key", vm(disks=[{"size": "1M", "fmt": "raw"}]), "unknown keys fmt"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_rejected_with_the_vm_named(case):
    bad, message = case[1], case[2]
    with pytest.raises(AnsibleFilterError) as e:
        plan(bad)
    assert message in str(e.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(AnsibleFilterError) as e:
        plan(vm(port=0), vm(name="db01", dr="nowhere"))
    text = str(e.value)
    assert "2 problem(s)" in text and "web01" in text and "db01" in text


def test_duplicates_and_port_clashes():
    with pytest.raises(AnsibleFilterError) as e:
        plan(vm(), vm(), vm(name="db01"))
    text = str(e.value)
    assert "VM web01 is listed twice" in text
    assert "port 7800 on hv-a1 is already used by web01" in text


@pytest.mark.parametrize("group", [None, [], {"vms": []}, {"vms": "web01"}])
def test_group_shape(group):
    with pytest.raises(AnsibleFilterError):
        protection.protection_plan(group, HOSTVARS, HYPERVISORS)


@pytest.mark.parametrize("selection, expected", [
    (None, ["web01", "db01"]), ("all", ["web01", "db01"]), ("db01", ["db01"]),
    ("db01, web01", ["web01", "db01"]), (["web01"], ["web01"]),
])
def test_selection(selection, expected):
    got = plan(vm(), vm(name="db01", port=7801), selection=selection)
    assert [p["name"] for p in got] == expected


def test_unknown_selection_is_an_error():
    with pytest.raises(AnsibleFilterError, match="not in the protection group: nope"):
        plan(vm(), selection="web01,nope")


def status(role, disk="UpToDate", **over):
    s = {"name": "web01", "role": role, "connection": "Connected", "peer_role": "Secondary",
         "in_sync": True, "degraded": None, "rpo": {"bytes": 0, "seconds": 0.0},
         "volumes": [{"disk": disk, "replication": "Established"}],
         "recovery_points": {"count": 1, "last": {"id": "rp1", "age_seconds": 42.4, "reason": "periodic"}}}
    s.update(over)
    return s


@pytest.mark.parametrize("st, word", [
    (None, "unknown"),
    (status("Primary"), "in-sync"),
    (status("Primary", in_sync=False, degraded={"kind": "peer-timeout"}), "degraded"),
    (status("Primary", in_sync=False, volumes=[{"replication": "SyncSource", "sync_percent": 12.5}]),
     "syncing 12.5%"),
    (status("Primary", in_sync=False, connection="StandAlone", volumes=[]), "standalone"),
])
def test_replication_state(st, word):
    assert protection.replication_state(st) == word


def test_table_rows_and_unreachable_site():
    (p,) = plan(vm())
    hostvars = {"hv-a1": {"tandem_status": {"web01": status("Primary", rpo={"bytes": 4096, "seconds": 1.5},
                                                            in_sync=False, degraded={"kind": "link-lost"})}},
                "hv-b1": {}}
    rows = protection.status_rows([p], hostvars, notes={"web01": "hello"})
    assert rows[0]["dr_status"] is None
    lines = protection.vm_table(rows)
    assert lines[0].split()[:2] == ["VM", "PRODUCTION"]
    assert "hv-a1 Primary/UpToDate" in lines[1]
    assert "hv-b1 unreachable" in lines[1]
    assert "degraded" in lines[1] and "4.0 KiB / 1.5s" in lines[1]
    assert "42s ago" in lines[1] and lines[1].endswith("hello")


def test_domain_and_convert():
    (p,) = plan(vm(domain={"memory_mib": 128}))
    assert p["domain"] == {"memory_mib": 128} and p["convert"] is False
    (p,) = plan(vm(convert=True))
    assert "domain" not in p and p["convert"] is True
    with pytest.raises(AnsibleFilterError, match="domain must be a mapping"):
        plan(vm(domain="big"))
    with pytest.raises(AnsibleFilterError, match="exclude each other"):
        plan(vm(domain={}, convert=True))


def test_seed_target_is_for_a_converted_vm_and_a_target_name():
    (p,) = plan(vm(convert=True, seed_target="sdb"))
    assert p["seed_target"] == "sdb"
    (p,) = plan(vm(convert=True))
    assert "seed_target" not in p
    with pytest.raises(AnsibleFilterError, match="seed_target is for a converted VM") as info:
        plan(vm(seed_target="hdc"), vm(name="db01", port=7801, domain={}, seed_target="vdc"))
    assert "2 problem(s)" in str(info.value)
    for bad in ("sdb1", "/dev/sdb", "eth0", "", 3, "SDB"):
        with pytest.raises(AnsibleFilterError, match="seed_target must be a disk target dev"):
            plan(vm(convert=True, seed_target=bad))
    # The replicated disks are vda, vdb, ... in order: the seed cannot be one of them.
    with pytest.raises(AnsibleFilterError, match="seed_target vdb is the target of replicated disk 1"):
        plan(vm(convert=True, seed_target="vdb", disks=[{"size": "1M"}, {"size": "1M"}]))
    (p,) = plan(vm(convert=True, seed_target="vdc", disks=[{"size": "1M"}, {"size": "1M"}]))
    assert p["seed_target"] == "vdc"
