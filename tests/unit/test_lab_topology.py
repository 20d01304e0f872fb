"""The lab topology file and its validation."""

from __future__ import annotations

import copy
import ipaddress
import tomllib

import pytest
from tandem_lab import topology
from tandem_lab.topology import TopologyError

RAW = tomllib.loads(topology.DEFAULT_PATH.read_text())


def parse_with(change):
    raw = copy.deepcopy(RAW)
    change(raw)
    return topology.parse(raw)


def test_shipped_topology_has_the_five_hosts_on_three_sites():
    topo = topology.load()
    assert set(topo.hosts) == {"hv-a1", "cp-a", "hv-b1", "cp-b", "witness"}
    assert {h.name: h.site for h in topo.hosts.values()} == {
        "hv-a1": "a", "cp-a": "a", "hv-b1": "b", "cp-b": "b", "witness": "c"}
    assert [h.name for h in topo.hosts.values() if h.hypervisor] == ["hv-a1", "hv-b1"]


def test_sites_are_separate_subnets_and_only_the_vip_segment_is_shared():
    topo = topology.load()
    shared = [n for n in topo.networks.values() if n.site is None]
    assert [n.name for n in shared] == ["cp"]
    assert topo.control_plane_vip in shared[0].subnet
    members = {h.name for h in topo.hosts.values() for nic in h.nics if nic.network.site is None}
    assert members == {"cp-a", "cp-b"}


def test_gateway_is_the_first_address():
    topo = topology.load()
    assert topo.networks["lan-a"].gateway == ipaddress.IPv4Address("10.202.10.1")


def test_veth_names_fit_the_interface_name_limit():
    topo = topology.load()
    assert all(len(v) <= 15 for h in topo.hosts.values() for v in h.veths)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["networks"]["lan-b"].update(subnet="10.202.10.0/25"), "overlap"),
    (lambda r: r["networks"]["lan-b"].update(subnet="192.168.1.0/24"), "outside the supernet"),
    (lambda r: r["networks"]["lan-b"].update(bridge="tdr-a"), "used by both"),
    (lambda r: r["networks"]["lan-b"].update(bridge="a-very-long-bridge-name"), "not a valid interface"),
    (lambda r: r["hosts"]["cp-b"]["nics"][0].update(address="10.202.10.99"), "not a host address"),
    (lambda r: r["hosts"]["cp-b"]["nics"][0].update(address="10.202.20.1"), "other than the gateway"),
    (lambda r: r["hosts"]["cp-b"]["nics"][0].update(address="10.202.20.11"), "used by both"),
    (lambda r: r["hosts"]["cp-b"]["nics"][0].update(network="lan-a"), "belongs to site a"),
    (lambda r: r["hosts"]["cp-b"].update(site="x"), "unknown site"),
    (lambda r: r["hosts"]["cp-b"]["nics"][0].update(network="nope"), "unknown network"),
    (lambda r: [r["hosts"][h].update(groups=[]) for h in ("hv-a1", "hv-b1")],
     r"no host in group\(s\): hypervisors"),
    (lambda r: r["hosts"]["witness"].update(groups=["control_plane", "witness"]),
     "named like a host: witness"),
    (lambda r: r.update(control_plane_vip="10.202.10.100"), "not on a shared network"),
    (lambda r: r.update(supernet="bogus"), "not an IPv4 network"),
])
def test_inconsistent_topologies_are_rejected_with_a_clear_message(change, message):
    with pytest.raises(TopologyError, match=message):
        parse_with(change)


def test_unknown_host_and_site_lookups_name_the_valid_ones():
    topo = topology.load()
    with pytest.raises(TopologyError, match="lab hosts are: hv-a1"):
        topo.host("hv-c1")
    with pytest.raises(TopologyError, match="lab sites are: a, b, c"):
        topo.site("d")
