"""The vms filters: from a protected VM and one side of its network plan to the domain
template's input, tandem_vm's interfaces and disks, and the NoCloud seed. Run on the real
outputs of protection_plan and network_plan for the lab files, so a change of shape there
fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.tandem.dr.plugins.filter import network, protection, vms

ROOT = Path(__file__).resolve().parents[4]

GROUP = {"name": "g", "vms": [{
    "name": "app01", "production": "hv-a1", "dr": "hv-b1", "port": 7811,
    "disks": [{"size": "64MiB"}, {"size": "64MiB", "export": "app01-data"}],
    "nics": [{"network": "guests", "ip": "192.168.10.11/24", "mac": "52:54:00:0A:00:11"}],
    "domain": {"memory_mib": 128, "kernel": "/k", "initrd": "/i"},
}]}
MAPPING = {"mac_policy": "keep", "networks": [{
    "name": "guests", "production": {"bridge": "tdr-guest"}, "dr": {"bridge": "tdr-guest", "vlan": 20},
    "subnets": [{"production": {"cidr": "192.168.10.0/24", "gateway": "192.168.10.1"},
                 "dr": {"cidr": "192.168.20.0/24", "gateway": "192.168.20.1", "dns": ["192.168.20.53"]},
                 "ip_policy": "same_offset"}]}]}
HOSTVARS = {"hv-a1": {"ansible_host": "10.0.0.1"}, "hv-b1": {"ansible_host": "10.0.0.2"}}


@pytest.fixture
def vm_and_sides():
    (vm,) = protection.protection_plan(GROUP, HOSTVARS, ["hv-a1", "hv-b1"])
    (entry,) = network.network_plan([vm], MAPPING, "failover")
    return vm, [n["source"] for n in entry["nics"]], [n["target"] for n in entry["nics"]]


def test_domain_at_each_side(vm_and_sides):
    vm, production, dr = vm_and_sides
    at_a = vms.vm_domain(vm, production)
    assert at_a["name"] == "app01" and at_a["memory_mib"] == 128 and at_a["kernel"] == "/k"
    assert at_a["disks"] == [{"socket": "/run/tandem/app01.nbd", "export": "app01/disk0"},
                             {"socket": "/run/tandem/app01.nbd", "export": "app01-data"}]
    assert at_a["nics"] == [{"bridge": "tdr-guest", "mac": "52:54:00:0a:00:11"}]
    assert at_a["seed"] == "/var/lib/tandem-vms/app01/seed.img"
    at_b = vms.vm_domain(vm, dr)
    assert at_b["nics"] == [{"bridge": "tdr-guest", "vlan": 20, "mac": "52:54:00:0a:00:11"}]
    drill = vms.vm_domain(vm, dr, name="app01-drill", exports=["app01/disk0@clone-d", "app01-data@clone-d"])
    assert drill["name"] == "app01-drill" and drill["seed"] == "/var/lib/tandem-vms/app01-drill/seed.img"
    assert [d["export"] for d in drill["disks"]] == ["app01/disk0@clone-d", "app01-data@clone-d"]


def test_seed_carries_this_sides_address_gateway_and_dns(vm_and_sides):
    vm, production, dr = vm_and_sides
    assert vms.vm_seed(vm, production) == {"instance_id": "app01", "hostname": "app01", "nics": [
        {"name": "eth0", "addresses": ["192.168.10.11/24"], "gateway": "192.168.10.1", "dns": [],
         "mac": "52:54:00:0a:00:11"}]}
    seed = vms.vm_seed(vm, dr, name="app01-drill")
    assert seed["instance_id"] == "app01-drill" and seed["hostname"] == "app01"
    (nic,) = seed["nics"]
    assert nic["addresses"] == ["192.168.20.11/24"] and nic["dns"] == ["192.168.20.53"]
    assert vms.vm_address(production) == "192.168.10.11" and vms.vm_address(dr) == "192.168.20.11"


def test_nbd_disks_and_interfaces_for_tandem_vm(vm_and_sides):
    vm, _production, dr = vm_and_sides
    assert vms.vm_nbd_disks(vm, "/run/x") == [
        {"target": "vda", "socket": "/run/x/app01.nbd", "export": "app01/disk0"},
        {"target": "vdb", "socket": "/run/x/app01.nbd", "export": "app01-data"}]
    assert vms.vm_interfaces(dr) == [{"bridge": "tdr-guest", "vlan": 20, "mac": "52:54:00:0a:00:11"}]


def test_center_volumes_match_the_guest_disks(vm_and_sides):
    vm, _production, _dr = vm_and_sides
    volumes = vms.vm_center_volumes(vm)
    assert volumes == [{"resource": "app01", "volume": 0, "target_dev": "vda", "size_bytes": 64 << 20},
                       {"resource": "app01", "volume": 1, "target_dev": "vdb", "size_bytes": 64 << 20}]
    assert [v["target_dev"] for v in volumes] == [d["target"] for d in vms.vm_nbd_disks(vm)]


def test_a_vm_without_domain_or_a_bad_side_is_a_clear_error(vm_and_sides):
    vm, production, _dr = vm_and_sides
    with pytest.raises(AnsibleFilterError, match="no 'domain' in the protection group"):
        vms.vm_domain({**vm, "domain": None}, production)
    with pytest.raises(AnsibleFilterError, match="nic 0: expected a NIC side of network_plan"):
        vms.vm_interfaces([{"ip": "1.2.3.4"}])


def test_the_lab_files_give_a_domain_for_every_vm_at_both_sites():
    lab = ROOT / "inventories" / "lab"
    group = yaml.safe_load((lab / "protection_group.yml").read_text())["tandem_protection_group"]
    mapping = yaml.safe_load((lab / "network_mapping.yml").read_text())["tandem_network_mapping"]
    hostvars = {h: {"ansible_host": "10.0.0.1"} for h in ("hv-a1", "hv-b1")}
    plan = protection.protection_plan(group, hostvars, ["hv-a1", "hv-b1"])
    for entry, vm in zip(network.network_plan(plan, mapping, "failover"), plan, strict=True):
        for side in ("source", "target"):
            nics = [n[side] for n in entry["nics"]]
            assert vms.vm_address(nics)
            if vm.get("domain"):
                assert vms.vm_domain(vm, nics)["nics"]


def test_drill_nics_keep_dr_addresses_on_the_isolated_bridge_with_their_own_macs(vm_and_sides):
    vm, _production, dr = vm_and_sides
    (entry,) = network.network_plan([vm], MAPPING, "failover")
    nics = vms.vm_drill_nics([vm], {"app01": entry}, "tdr-drill", "d1")["app01"]
    assert vms.vm_address(nics) == vms.vm_address(dr) == "192.168.20.11"
    mac = network.generated_mac("app01", 0, "d1")
    assert vms.vm_interfaces(nics) == [{"bridge": "tdr-drill", "mac": mac}]
    assert nics[0]["mac"] != dr[0]["mac"]
    specs = vms.vm_run_specs([vm], {"app01": entry}, {"vms": {}}, "dr", "-d1", {"app01": ["x@clone-d1"]},
                             {"app01": nics}, "probe")
    assert specs["app01"]["domain_name"] == "app01-d1" and specs["app01"]["health_netns"] == "probe"
    assert specs["app01"]["ip_before"] == "192.168.10.11" and specs["app01"]["address"] == "192.168.20.11"


def test_drill_probe_takes_each_dr_gateway_once_for_the_hosts_vms(vm_and_sides):
    vm, _production, _dr = vm_and_sides
    (entry,) = network.network_plan([vm], MAPPING, "failover")
    nics = vms.vm_drill_nics([vm], {"app01": entry}, "tdr-drill", "d1")
    twice = {**nics, "app02": nics["app01"] + [{**nics["app01"][0], "gateway": None}]}
    assert vms.vm_drill_probe_addresses(twice, ["app01", "app02"]) == ["192.168.20.1/24"]
    assert vms.vm_drill_probe_addresses(twice, []) == []


CONVERTED = {"name": "legacy01", "production": "hv-a1", "dr": "hv-b1", "port": 7831, "convert": True,
             "seed_target": "sdb", "disks": [{"size": "64MiB", "path": "/srv/vms/legacy01.img"}]}


def converted(**over):
    (vm,) = protection.protection_plan({"name": "g", "vms": [{**CONVERTED, **over}]}, HOSTVARS,
                                       ["hv-a1", "hv-b1"])
    return vm


def domain_xml(*drives):
    """A domain with these drives: (device, type, target, source attributes or None)."""
    out = []
    for device, kind, target, source in drives:
        src = "" if source is None else "<source " + " ".join(f"{k}='{v}'" for k, v in source.items()) + "/>"
        out.append(f"<disk type='{kind}' device='{device}'>{src}<target dev='{target}'/></disk>")
    return f"<domain type='kvm'><name>legacy01</name><devices>{''.join(out)}</devices></domain>"


DATA = ("disk", "file", "vda", {"file": "/srv/vms/legacy01.img"})


def test_a_domain_with_its_disk_on_the_volume_and_its_seed_can_be_converted():
    seed = ("cdrom", "file", "sdb", {"file": "/var/lib/libvirt/images/legacy01-seed.iso"})
    assert vms.vm_convert_problems(converted(), domain_xml(DATA, seed)) == []
    # An empty cdrom has no source: nothing to miss at the DR site.
    assert vms.vm_convert_problems(converted(), domain_xml(DATA, seed, ("cdrom", "file", "hdc", None))) == []
    # A re-run: the disk is on its tandemd export already.
    nbd = '<disk type="network" device="disk"><source protocol="nbd" name="legacy01/disk0">' \
          '<host transport="unix" socket="/run/tandem/legacy01.nbd"/></source><target dev="vda"/></disk>'
    xml = domain_xml(seed).replace("<devices>", "<devices>" + nbd)
    assert vms.vm_convert_problems(converted(), xml) == []
    assert vms.vm_convert_problems(converted(), xml, "/run/other") != []


def test_convert_problems_list_each_drive_missing_at_the_dr_site():
    iso = ("cdrom", "file", "sdb", {"file": "/isos/seed.iso"})
    extra = ("disk", "block", "vdc", {"dev": "/dev/vg0/scratch"})
    # Without seed_target its seed drive, and any other drive, is refused.
    problems = vms.vm_convert_problems(converted(seed_target=None), domain_xml(DATA, iso, extra))
    assert problems == ["sdb (cdrom): file /isos/seed.iso is not replicated",
                        "vdc (disk): block /dev/vg0/scratch is not replicated"]
    # The replicated disk must be on the volume's path: tandemd would serve an empty new file.
    moved = ("disk", "file", "vda", {"file": "/elsewhere/legacy01.img"})
    assert vms.vm_convert_problems(converted(), domain_xml(moved, iso)) == [
        "vda: its source is file /elsewhere/legacy01.img, not replicated disk 0's path /srv/vms/legacy01.img"]
    assert vms.vm_convert_problems(converted(seed_target="hdc"), domain_xml(DATA, iso)) == [
        "hdc: seed_target is not a drive of the domain (it has ['sdb', 'vda'])",
        "sdb (cdrom): file /isos/seed.iso is not replicated"]
    assert vms.vm_convert_problems(converted(), domain_xml(iso)) == [
        "vda: replicated disk 0 (/srv/vms/legacy01.img) is not a disk of the domain"]
    assert vms.vm_convert_problems(converted(), "") == ["no libvirt domain legacy01 is defined on this host"]
    with pytest.raises(AnsibleFilterError, match="VM legacy01: its definition: not well-formed XML"):
        vms.vm_convert_problems(converted(), "<domain>")


def test_seed_file_disks_point_the_seed_target_at_each_domains_own_seed():
    assert vms.vm_seed_file_disks(converted(), "/v") == [{"target": "sdb", "path": "/v/legacy01/seed.img"}]
    # A drill copy reads a seed of its own, under its own name (removed with the copy).
    assert vms.vm_seed_file_disks(converted(), "/v", "legacy01-d1") == [
        {"target": "sdb", "path": "/v/legacy01-d1/seed.img"}]
    assert vms.vm_seed_file_disks(converted(seed_target=None)) == []


def test_seed_of_a_converted_vm_needs_no_domain():
    vm = converted(nics=[{"network": "guests", "ip": "192.168.10.31/24", "mac": "52:54:00:0a:00:31"}])
    (entry,) = network.network_plan([vm], MAPPING, "failover")
    seed = vms.vm_seed(vm, [n["target"] for n in entry["nics"]])
    assert seed["instance_id"] == "legacy01" and seed["nics"][0]["addresses"] == ["192.168.20.31/24"]
