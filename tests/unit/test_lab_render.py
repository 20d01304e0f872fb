"""Files the lab generates, checked before anything touches the machine."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml
from tandem_lab import render, topology

TOPO = topology.load()


def test_hypervisors_get_tun_and_a_data_mount_others_do_not():
    hv = render.lxc_config(TOPO.hosts["hv-a1"], "/rootfs", "/lxc/hv-a1", "/data/hv-a1")
    cp = render.lxc_config(TOPO.hosts["cp-a"], "/rootfs", "/lxc/cp-a", None)
    assert "lxc.mount.entry = /dev/net/tun dev/net/tun none bind,create=file 0 0" in hv
    assert "lxc.cgroup.devices.allow = c 10:200 rwm" in hv
    assert "lxc.mount.entry = /data/hv-a1 srv/tandem none bind,create=dir 0 0" in hv
    assert "tun" not in cp and "srv/tandem" not in cp
    assert "lxc.rootfs.path = overlay:/rootfs:/lxc/cp-a/delta" in cp


def test_each_nic_gets_a_predictable_veth_and_a_stable_unique_mac():
    cfg = render.lxc_config(TOPO.hosts["cp-b"], "/r", "/c", None)
    assert "lxc.net.0.veth.pair = cp-b-0" in cfg and "lxc.net.1.veth.pair = cp-b-1" in cfg
    assert "lxc.net.1.link = tdr-vip" in cfg
    macs = [render.mac_address(h.name, n.index) for h in TOPO.hosts.values() for n in h.nics]
    assert len(set(macs)) == len(macs)
    assert render.mac_address("cp-b", 1) == render.mac_address("cp-b", 1)
    assert all(int(m.split(":")[0], 16) & 0b10 for m in macs)   # locally administered


def test_routes_cover_the_lab_only_and_secondary_nics_route_by_source():
    unit = render.routes_unit(TOPO, TOPO.hosts["cp-a"])
    assert "route replace default" not in unit and "route add default" not in unit
    assert "ExecStart=/sbin/ip route replace 10.202.0.0/16 via 10.202.10.1 dev eth0" in unit
    assert "ExecStart=/sbin/ip rule add from 10.202.40.0/24 lookup 101" in unit
    assert "10.202.0.0/16 via 10.202.40.1 dev eth1 table 101" in unit
    hv = render.routes_unit(TOPO, TOPO.hosts["hv-b1"])
    assert "ExecStart=/sbin/ip route replace 10.202.96.0/19 via 10.202.120.1 dev eth1" in hv


def test_etc_hosts_names_every_host_and_the_vip():
    hosts = render.etc_hosts(TOPO, TOPO.hosts["witness"])
    for h in TOPO.hosts.values():
        assert f"{h.address}\t{h.name}\n" in hosts
    assert "10.202.110.11\thv-a1-repl-a" in hosts
    assert "10.202.40.100\tcontrol-plane-vip" in hosts


def test_inventory_round_trips_through_yaml_with_the_required_groups():
    inv = render.inventory(TOPO, "/k/id", "/k/known_hosts")
    parsed = yaml.safe_load(render.to_yaml(inv))
    assert parsed == inv
    children = parsed["all"]["children"]
    for group in ("site_a", "site_b", "site_c", "hypervisors", "control_plane"):
        assert group in children
    assert set(children["site_a"]["hosts"]) == {"hv-a1", "cp-a"}
    v = parsed["all"]["vars"]
    assert v["ansible_ssh_pipelining"] is True
    assert "ControlPersist" in v["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=yes" in v["ansible_ssh_common_args"]
    assert parsed["all"]["hosts"]["hv-a1"]["tandem_replication_address"] == "10.202.110.11"


def test_yaml_emitter_quotes_awkward_strings():
    data = {"a": {"s": "yes", "n": "010", "c": "x: y # z", "t": True, "i": 3}}
    assert yaml.safe_load(render.to_yaml(data)) == data


def test_guard_keeps_multicast_and_blocks_egress():
    rules = render.guard_ruleset(TOPO)
    assert "ip daddr != { 10.202.0.0/16, 224.0.0.0/4, 255.255.255.255 }" in rules
    assert "iifname @lab_bridges oifname != @lab_bridges counter drop" in rules
    for bridge in TOPO.bridges():
        assert f'"{bridge}"' in rules


def test_fault_table_marks_every_host_port_with_its_site():
    rules = render.faults_ruleset(TOPO)
    marks = render.site_marks(TOPO)
    for h in TOPO.hosts.values():
        for port in h.veths:
            assert f'"{port}" : {marks[h.site]}' in rules


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="nft -c needs root")
@pytest.mark.parametrize("ruleset", [render.guard_ruleset, render.faults_ruleset])
def test_rulesets_are_valid_nft(ruleset):
    # `nft -c` parses and checks against the kernel without changing anything.
    proc = subprocess.run(["nft", "-c", "-f", "-"], input=ruleset(TOPO), text=True, check=False,
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr
