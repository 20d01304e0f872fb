"""The network mapping filters: validation (every problem, with its path), IP translation
(keep, same_offset, overrides, pool), both directions, collisions, MACs and the table."""

from __future__ import annotations

import contextlib
import copy
import random
from pathlib import Path

import netaddr
import pytest
import yaml
from ansible.errors import AnsibleFilterError
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.tandem.dr.plugins.filter import network

ROOT = Path(__file__).resolve().parents[4]


def subnet(production_cidr, dr_cidr, **over):
    sub = {"production": {"cidr": production_cidr}, "dr": {"cidr": dr_cidr}}
    sub.update(over)
    return sub


def mapping(*subnets, mac_policy=None, **net_over):
    net = {
        "name": "prod",
        "production": {"bridge": "br0", "vlan": 110},
        "dr": {"network": "prod-b"},
        "subnets": list(subnets),
    }
    net.update(net_over)
    out = {"networks": [net]}
    if mac_policy:
        out["mac_policy"] = mac_policy
    return out


def vm(name, *ips, network_name="prod", mac=None):
    nics = [{"network": network_name, "ip": ip} for ip in ips]
    if mac:
        nics[0]["mac"] = mac
    return {"name": name, "nics": nics}


def targets(plan):
    return {(v["name"], n["index"]): n["target"]["ip"] for v in plan for n in v["nics"]}


def problems(vms, m, direction="failover"):
    with pytest.raises(AnsibleFilterError) as e:
        network.network_plan(vms, m, direction)
    return str(e.value)


# -- same_offset, across prefix lengths and IP versions ------------------------------------

SAME_OFFSET = [
    # source subnet, target subnet, source ip, target ip
    ("192.168.10.0/24", "192.168.20.0/24", "192.168.10.50", "192.168.20.50"),
    ("10.0.0.0/24", "10.8.0.0/16", "10.0.0.200", "10.8.0.200"),  # into a larger subnet
    ("10.8.0.0/16", "10.0.0.0/24", "10.8.0.254", "10.0.0.254"),  # into a smaller one, fits
    ("10.0.0.0/24", "10.1.0.128/25", "10.0.0.100", "10.1.0.228"),  # offset 100 into a /25
    ("10.0.0.0/30", "10.9.9.4/30", "10.0.0.2", "10.9.9.6"),
    ("10.0.0.0/31", "10.9.9.0/31", "10.0.0.1", "10.9.9.1"),  # /31 has no broadcast
    ("2001:db8:a::/64", "2001:db8:b::/64", "2001:db8:a::50", "2001:db8:b::50"),
    ("2001:db8:a::/64", "2001:db8:b:0:1::/80", "2001:db8:a::ff", "2001:db8:b:0:1::ff"),
]


@pytest.mark.parametrize("src, dst, ip, want", SAME_OFFSET, ids=[f"{c[0]}->{c[1]}" for c in SAME_OFFSET])
def test_same_offset(src, dst, ip, want):
    (p,) = network.network_plan([vm("web01", ip)], mapping(subnet(src, dst)), "failover")
    nic = p["nics"][0]
    assert nic["target"]["ip"] == want
    assert nic["target"]["cidr"] == dst and nic["target"]["prefix"] == int(dst.split("/")[1])
    assert nic["ip_policy"] == "same_offset"
    assert nic["reason"] == f"same_offset {ip} -> {want}"


SAME_OFFSET_BAD = [
    ("10.8.0.0/16", "10.0.0.0/24", "10.8.1.5", "offset 261 in 10.8.0.0/16"),
    ("10.0.0.0/24", "10.1.0.0/25", "10.0.0.200", "10.1.0.0/25 has 128 addresses"),
    ("10.0.0.0/24", "10.1.0.0/25", "10.0.0.127", "the network, broadcast or gateway address of 10.1.0.0/25"),
    ("2001:db8::/64", "2001:db8:1::/120", "2001:db8::1:0", "2001:db8:1::/120 has 256 addresses"),
]


@pytest.mark.parametrize("src, dst, ip, message", SAME_OFFSET_BAD, ids=[c[2] for c in SAME_OFFSET_BAD])
def test_same_offset_that_does_not_fit_is_rejected(src, dst, ip, message):
    text = problems([vm("web01", ip)], mapping(subnet(src, dst)))
    assert "web01 nic 0" in text and message in text


def test_same_offset_onto_the_target_gateway_is_rejected():
    m = mapping(subnet("10.0.0.0/24", "10.1.0.0/24", dr={"cidr": "10.1.0.0/24", "gateway": "10.1.0.9"}))
    assert "maps 10.0.0.9 to 10.1.0.9, the network, broadcast or gateway" in problems(
        [vm("a", "10.0.0.9")], m
    )


@pytest.mark.parametrize("ip", ["10.0.0.0", "10.0.0.255", "10.0.0.1"])
def test_source_network_broadcast_or_gateway_is_not_a_vm_address(ip):
    m = mapping(
        subnet("10.0.0.0/24", "10.1.0.0/24", production={"cidr": "10.0.0.0/24", "gateway": "10.0.0.1"})
    )
    assert f"{ip} is the network, broadcast or gateway address" in problems([vm("a", ip)], m)


# -- keep (stretched L2) -----------------------------------------------------------------


@pytest.mark.parametrize("cidr, ip", [("172.16.5.0/24", "172.16.5.50"), ("2001:db8:5::/64", "2001:db8:5::7")])
def test_same_subnet_keeps_the_ip(cidr, ip):
    m = mapping(subnet(cidr, cidr))
    (p,) = network.network_plan([vm("web01", ip)], m, "failover")
    nic = p["nics"][0]
    assert nic["ip_policy"] == "keep" and nic["target"]["ip"] == ip
    assert nic["reason"].startswith(f"keep {ip}")
    assert network.network_mapping(m)["networks"][0]["subnets"][0]["ip_policy"] == "keep"


def test_keep_needs_the_same_subnet_and_the_same_subnet_needs_keep():
    text = problems(
        [],
        mapping(
            subnet("10.0.0.0/24", "10.1.0.0/24", ip_policy="keep"),
            subnet("10.5.0.0/24", "10.5.0.0/24", ip_policy="same_offset"),
        ),
    )
    assert "subnets[0].ip_policy: 'keep' is the policy exactly when" in text
    assert "subnets[1].ip_policy: 'keep' is the policy exactly when" in text


# -- overrides and the round trip ----------------------------------------------------------


def test_override_wins_over_the_policy_and_names_the_nic():
    m = mapping(
        subnet(
            "10.0.0.0/24",
            "10.1.0.0/24",
            overrides=[{"vm": "db01", "nic": 1, "production": "10.0.0.20", "dr": "10.1.0.120"}],
        )
    )
    (p,) = network.network_plan([vm("db01", "10.0.0.5", "10.0.0.20")], m, "failover")
    assert [n["target"]["ip"] for n in p["nics"]] == ["10.1.0.5", "10.1.0.120"]
    assert p["nics"][1]["ip_policy"] == "override"
    assert p["nics"][1]["reason"] == "override 10.0.0.20 -> 10.1.0.120"


def test_override_must_agree_with_the_vms_address():
    m = mapping(
        subnet(
            "10.0.0.0/24",
            "10.1.0.0/24",
            overrides=[{"vm": "db01", "production": "10.0.0.20", "dr": "10.1.0.120"}],
        )
    )
    assert "gives db01 10.0.0.20 at production, but the NIC has 10.0.0.21" in problems(
        [vm("db01", "10.0.0.21")], m
    )


ROUND_TRIP = mapping(
    subnet(
        "192.168.10.0/24",
        "192.168.20.0/24",
        overrides=[{"vm": "db01", "production": "192.168.10.20", "dr": "192.168.20.220"}],
    ),
    subnet("10.8.0.0/16", "10.9.4.0/22"),
    subnet("172.16.5.0/24", "172.16.5.0/24"),
    subnet("2001:db8:a::/64", "2001:db8:b::/64"),
)
ROUND_TRIP_VMS = [
    vm("web01", "192.168.10.50", "10.8.3.4", "172.16.5.9", "2001:db8:a::5"),
    vm("db01", "192.168.10.20", "10.8.0.20"),
]


def test_failback_reverses_failover_exactly():
    over = network.network_plan(ROUND_TRIP_VMS, ROUND_TRIP, "failover")
    assert targets(over) == {
        ("web01", 0): "192.168.20.50",
        ("web01", 1): "10.9.7.4",
        ("web01", 2): "172.16.5.9",
        ("web01", 3): "2001:db8:b::5",
        ("db01", 0): "192.168.20.220",
        ("db01", 1): "10.9.4.20",
    }
    back = network.network_plan(over, ROUND_TRIP, "failback")
    assert [[n["target"]["ip"] for n in v["nics"]] for v in back] == [
        ["192.168.10.50", "10.8.3.4", "172.16.5.9", "2001:db8:a::5"],
        ["192.168.10.20", "10.8.0.20"],
    ]
    assert back[0]["from"] == "dr" and back[0]["to"] == "production"
    assert back[0]["nics"][0]["target"]["interface"] == {"type": "bridge", "source": "br0", "vlan": 110}
    assert over[0]["nics"][0]["target"]["interface"] == {"type": "network", "source": "prod-b", "vlan": None}


def test_failback_of_a_dr_address_given_by_hand():
    (p,) = network.network_plan([vm("web01", "192.168.20.77/24")], ROUND_TRIP, "failback")
    assert p["nics"][0]["target"]["ip"] == "192.168.10.77"


# -- pools --------------------------------------------------------------------------------


def pool_mapping(dr_pool="10.1.0.10-10.1.0.19", **dr_side):
    return mapping(
        subnet(
            "10.0.0.0/24",
            "10.1.0.0/24",
            ip_policy="pool",
            pool={"production": "10.0.0.100-10.0.0.199", "dr": dr_pool},
            dr={"cidr": "10.1.0.0/24", **dr_side},
        )
    )


def pool_vms(n):
    return [vm(f"vm{i:02d}", f"10.0.0.{i + 1}") for i in range(1, n + 1)]


def test_pool_allocation_is_deterministic_and_ignores_order():
    m = pool_mapping()
    first = targets(network.network_plan(pool_vms(6), m, "failover"))
    for seed in range(5):
        shuffled = pool_vms(6)
        random.Random(seed).shuffle(shuffled)
        assert targets(network.network_plan(shuffled, copy.deepcopy(m), "failover")) == first
    assert len(set(first.values())) == 6
    assert all(netaddr.IPAddress(ip) in netaddr.IPRange("10.1.0.10", "10.1.0.19") for ip in first.values())


def test_pool_address_is_stable_when_other_vms_come_and_go():
    m = pool_mapping("10.1.0.0/24")
    alone = targets(network.network_plan([vm("web01", "10.0.0.50")], m, "failover"))
    crowd = targets(network.network_plan([vm("web01", "10.0.0.50"), *pool_vms(5)], m, "failover"))
    assert crowd[("web01", 0)] == alone[("web01", 0)]


def test_pool_skips_gateway_dns_reserved_and_addresses_other_vms_get():
    m = pool_mapping("10.1.0.1-10.1.0.6", gateway="10.1.0.1", dns=["10.1.0.2"], reserved=["10.1.0.3"])
    m["networks"][0]["subnets"][0]["overrides"] = [
        {"vm": "fixed", "production": "10.0.0.7", "dr": "10.1.0.4"}
    ]
    plan = network.network_plan(
        [vm("fixed", "10.0.0.7"), vm("a", "10.0.0.8"), vm("b", "10.0.0.9")], m, "failover"
    )
    got = targets(plan)
    assert got[("fixed", 0)] == "10.1.0.4"
    assert {got[("a", 0)], got[("b", 0)]} == {"10.1.0.5", "10.1.0.6"}
    assert all(n["reason"].startswith("pool 10.0.0.") for v in plan[1:] for n in v["nics"])


def test_pool_exhaustion_names_the_vm():
    m = pool_mapping("10.1.0.10-10.1.0.12")
    text = problems(pool_vms(4), m)
    assert "1 problem(s)" in text
    assert "the dr pool of 10.0.0.0/24 <-> 10.1.0.0/24 is exhausted (3 addresses, all taken)" in text


def test_pool_leaves_out_the_network_address():
    m = pool_mapping("10.1.0.0/30")  # of the /24: its network address 10.1.0.0 is left out
    got = targets(network.network_plan(pool_vms(3), m, "failover"))
    assert sorted(got.values()) == ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    assert "exhausted" in problems(pool_vms(4), m)


def test_pool_failback_goes_home_when_the_production_address_is_free():
    m = pool_mapping("10.1.0.10-10.1.0.19")
    group = [vm("web01", "10.0.0.5"), vm("db01", "10.0.0.6")]
    over = network.network_plan(group, m, "failover")
    # Without the production addresses, failback can only take free slots of the production pool.
    blind = targets(network.network_plan(over, m, "failback"))
    assert all(netaddr.IPAddress(ip) in netaddr.IPRange("10.0.0.100", "10.0.0.199") for ip in blind.values())
    back = network.network_plan(over, m, "failback", group)
    assert targets(back) == {("web01", 0): "10.0.0.5", ("db01", 0): "10.0.0.6"}
    assert back[0]["nics"][0]["reason"].endswith("-> 10.0.0.5 (its production address)")
    # On failover the home addresses change nothing.
    assert targets(network.network_plan(group, m, "failover", group)) == targets(over)


def test_pool_failback_home_address_taken_by_another_vm_falls_back_to_the_pool():
    m = pool_mapping("10.1.0.10-10.1.0.19")
    m["networks"][0]["subnets"][0]["overrides"] = [
        {"vm": "fixed", "production": "10.0.0.5", "dr": "10.1.0.99"}
    ]
    over = network.network_plan([vm("web01", "10.0.0.7")], m, "failover")
    # The group says web01 lived at 10.0.0.5, but the override gives that address to "fixed".
    back = network.network_plan([*over, vm("fixed", "10.1.0.99")], m, "failback", [vm("web01", "10.0.0.5")])
    got = targets(back)
    assert got[("fixed", 0)] == "10.0.0.5"
    assert netaddr.IPAddress(got[("web01", 0)]) in netaddr.IPRange("10.0.0.100", "10.0.0.199")


def test_ipv6_pool():
    m = mapping(
        subnet(
            "2001:db8:a::/64",
            "2001:db8:b::/64",
            ip_policy="pool",
            pool={"production": "2001:db8:a::1000/116", "dr": "2001:db8:b::/64"},
        )
    )
    got = targets(
        network.network_plan([vm("web01", "2001:db8:a::5"), vm("db01", "2001:db8:a::6")], m, "failover")
    )
    assert len(set(got.values())) == 2
    assert all(netaddr.IPAddress(ip) in netaddr.IPNetwork("2001:db8:b::/64") for ip in got.values())


# -- collisions ----------------------------------------------------------------------------


def test_duplicate_target_ips_across_vms_are_detected():
    m = mapping(
        subnet(
            "10.0.0.0/24",
            "10.1.0.0/24",
            overrides=[{"vm": "db01", "production": "10.0.0.20", "dr": "10.1.0.50"}],
        )
    )
    text = problems([vm("web01", "10.0.0.50"), vm("db01", "10.0.0.20")], m)
    assert "db01 nic 0: target ip 10.1.0.50 at dr is also web01 nic 0's" in text


def test_duplicate_source_ips_are_detected():
    text = problems(
        [vm("web01", "10.0.0.50"), vm("db01", "10.0.0.50")], mapping(subnet("10.0.0.0/24", "10.1.0.0/24"))
    )
    assert "db01 nic 0: source ip 10.0.0.50 at production is also web01 nic 0's" in text


def test_two_subnets_mapped_onto_overlapping_targets_are_rejected():
    text = problems([], mapping(subnet("10.0.0.0/24", "10.1.0.0/24"), subnet("10.0.1.0/24", "10.1.0.0/23")))
    assert "subnets[1].dr: 10.1.0.0/23 overlaps 10.1.0.0/24" in text


# -- MACs --------------------------------------------------------------------------------


def test_mac_keep_and_generate():
    kept = network.network_plan(
        [vm("web01", "10.0.0.5", mac="52-54-00-AA-BB-CC")],
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24")),
        "failover",
    )
    assert kept[0]["nics"][0]["target"]["mac"] == "52:54:00:aa:bb:cc"
    m = mapping(subnet("10.0.0.0/24", "10.1.0.0/24"), mac_policy="generate")
    gen = network.network_plan([vm("web01", "10.0.0.5", "10.0.0.6", mac="52:54:00:aa:bb:cc")], m, "failover")
    macs = [n["target"]["mac"] for n in gen[0]["nics"]]
    assert macs == [network.generated_mac("web01", 0, "dr"), network.generated_mac("web01", 1, "dr")]
    assert len(set(macs)) == 2
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert mac.startswith("52:54:00:") and first & 2 and not first & 1  # local, unicast
    again = network.network_plan([vm("web01", "10.0.0.5", "10.0.0.6")], copy.deepcopy(m), "failover")
    assert [n["target"]["mac"] for n in again[0]["nics"]] == macs
    back = network.network_plan(gen, m, "failback")
    assert back[0]["nics"][0]["target"]["mac"] == network.generated_mac("web01", 0, "production")


def test_mac_policy_per_network_overrides_the_default():
    m = mapping(subnet("10.0.0.0/24", "10.1.0.0/24"), mac_policy="generate")
    m["networks"][0]["mac_policy"] = "keep"
    (p,) = network.network_plan([vm("web01", "10.0.0.5", mac="52:54:00:00:00:01")], m, "failover")
    assert p["nics"][0]["target"]["mac"] == "52:54:00:00:00:01" and p["nics"][0]["mac_policy"] == "keep"


def test_duplicate_macs_are_detected():
    text = problems(
        [vm("a", "10.0.0.5", mac="52:54:00:00:00:01"), vm("b", "10.0.0.6", mac="52:54:00:00:00:01")],
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24")),
    )
    assert "b nic 0: source mac 52:54:00:00:00:01 at production is also a nic 0's" in text


# -- matching NICs to networks, DHCP ---------------------------------------------------------


def test_nic_matches_by_source_interface_name_and_dhcp_nic_keeps_dhcp():
    m = mapping(subnet("10.0.0.0/24", "10.1.0.0/24"))
    (p,) = network.network_plan([{"name": "a", "nics": [{"network": "br0"}]}], m, "failover")
    nic = p["nics"][0]
    assert nic["network"] == "prod" and nic["ip_policy"] == "dhcp" and nic["target"]["ip"] is None


# -- bad shapes: every problem, with its path ------------------------------------------------

BAD_MAPPINGS = [
    ("not a mapping", [], "expected a mapping with 'networks'"),
    ("no networks", {"networks": []}, "networks: must be a non-empty list"),
    ("unknown top key", {"networks": [], "mac": 1}, "unknown keys mac"),
    (
        "bad mac policy",
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24"), mac_policy="random"),
        "mac_policy: must be one of keep, generate",
    ),
    (
        "both network and bridge",
        mapping(dr={"network": "a", "bridge": "b"}),
        "networks[0] (prod).dr: give exactly one of 'network'",
    ),
    (
        "vlan on a libvirt network",
        mapping(dr={"network": "a", "vlan": 3}),
        "a VLAN needs its parent 'bridge'",
    ),
    ("vlan out of range", mapping(production={"bridge": "br0", "vlan": 4095}), "must be an integer 1-4094"),
    ("bad cidr", mapping(subnet("10.0.0/24", "10.1.0.0/24")), "subnets[0].production.cidr: '10.0.0/24'"),
    (
        "host bits",
        mapping(subnet("10.0.0.5/24", "10.1.0.0/24")),
        "has host bits set (the subnet is 10.0.0.0/24)",
    ),
    ("no prefix", mapping(subnet("10.0.0.0", "10.1.0.0/24")), "is not a subnet in CIDR form"),
    ("mixed versions", mapping(subnet("10.0.0.0/24", "2001:db8::/64")), "not the same IP version"),
    (
        "gateway outside",
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24", dr={"cidr": "10.1.0.0/24", "gateway": "10.2.0.1"})),
        "dr.gateway: 10.2.0.1 is not a host address of 10.1.0.0/24",
    ),
    (
        "gateway is broadcast",
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24", dr={"cidr": "10.1.0.0/24", "gateway": "10.1.0.255"})),
        "10.1.0.255 is not a host address",
    ),
    (
        "bad dns",
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24", dr={"cidr": "10.1.0.0/24", "dns": ["x"]})),
        "dr.dns[0]: DNS server 'x'",
    ),
    (
        "unknown policy",
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24", ip_policy="nat")),
        "ip_policy: must be one of",
    ),
    (
        "pool without pools",
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24", ip_policy="pool")),
        "needs a pool for each side",
    ),
    (
        "pool outside",
        mapping(
            subnet(
                "10.0.0.0/24",
                "10.1.0.0/24",
                ip_policy="pool",
                pool={"production": "10.0.0.10-10.0.0.20", "dr": "10.2.0.0/28"},
            )
        ),
        "pool.dr: 10.2.0.0/28 is not inside 10.1.0.0/24",
    ),
    (
        "pool garbage",
        mapping(
            subnet(
                "10.0.0.0/24", "10.1.0.0/24", ip_policy="pool", pool={"production": "10.0.0.10-", "dr": "x"}
            )
        ),
        "is not a range",
    ),
    (
        "pool without pool policy",
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24", pool={"dr": "10.1.0.0/28"})),
        "only used with ip_policy pool",
    ),
    (
        "override off subnet",
        mapping(
            subnet(
                "10.0.0.0/24",
                "10.1.0.0/24",
                overrides=[{"vm": "web01", "production": "10.0.0.5", "dr": "10.9.0.5"}],
            )
        ),
        "overrides[0].dr: 10.9.0.5 is not a host",
    ),
    (
        "override onto gateway",
        mapping(
            subnet(
                "10.0.0.0/24",
                "10.1.0.0/24",
                dr={"cidr": "10.1.0.0/24", "gateway": "10.1.0.1"},
                overrides=[{"vm": "web01", "production": "10.0.0.5", "dr": "10.1.0.1"}],
            )
        ),
        "is the gateway of 10.1.0.0/24",
    ),
    (
        "override of unknown vm",
        mapping(
            subnet(
                "10.0.0.0/24",
                "10.1.0.0/24",
                overrides=[{"vm": "nope", "production": "10.0.0.5", "dr": "10.1.0.5"}],
            )
        ),
        "nope is not a VM of the protection group",
    ),
    (
        "two overrides, one address",
        mapping(
            subnet(
                "10.0.0.0/24",
                "10.1.0.0/24",
                overrides=[
                    {"vm": "web01", "production": "10.0.0.5", "dr": "10.1.0.9"},
                    {"vm": "db01", "production": "10.0.0.6", "dr": "10.1.0.9"},
                ],
            )
        ),
        "overrides[1].dr: 10.1.0.9 is already the dr address of another override",
    ),
    (
        "override twice",
        mapping(
            subnet(
                "10.0.0.0/24",
                "10.1.0.0/24",
                overrides=[
                    {"vm": "web01", "production": "10.0.0.5", "dr": "10.1.0.9"},
                    {"vm": "web01", "production": "10.0.0.7", "dr": "10.1.0.7"},
                ],
            )
        ),
        "overrides[1]: a second override for web01 nic (any)",
    ),
    (
        "override vm not a name",
        mapping(subnet("10.0.0.0/24", "10.1.0.0/24", overrides=[{"vm": ["x"], "nic": [0], "dr": 1}])),
        "overrides[0].vm: must name a VM",
    ),
    ("subnets not a list", mapping(subnets="10.0.0.0/24"), "subnets: expected a list"),
    ("unknown subnet key", mapping(subnet("10.0.0.0/24", "10.1.0.0/24", policy="x")), "unknown keys policy"),
]


@pytest.mark.parametrize("case", BAD_MAPPINGS, ids=[c[0] for c in BAD_MAPPINGS])
def test_bad_mapping_is_rejected_with_its_path(case):
    with pytest.raises(AnsibleFilterError) as e:
        network.network_mapping(case[1], ["web01"])
    assert case[2] in str(e.value)
    if case[0] != "override of unknown vm":  # network_plan may see a selection of the VMs only
        with pytest.raises(AnsibleFilterError) as e:
            network.network_plan([vm("web01", "10.0.0.5")], case[1], "failover")
        assert case[2] in str(e.value)


def test_every_mapping_problem_at_once():
    m = mapping(
        subnet("10.0.0.0/24", "10.1.0.0/24", ip_policy="nat"), mac_policy="x", dr={"bridge": "b", "vlan": 0}
    )
    m["networks"].append(dict(m["networks"][0]))
    with pytest.raises(AnsibleFilterError) as e:
        network.network_mapping(m)
    text = str(e.value)
    assert "networks[1] (prod).name: prod is already the name of networks[0]" in text
    assert (
        "networks[1] (prod).production: bridge br0 vlan 110 is already mapped by networks[0] (prod)" in text
    )
    assert text.count("ip_policy: must be one of") == 2 and "vlan: must be an integer" in text


BAD_NICS = [
    ("unknown network", {"network": "nowhere", "ip": "10.0.0.5"}, "network 'nowhere' is not in the mapping"),
    (
        "ip outside",
        {"network": "prod", "ip": "10.7.0.5"},
        "10.7.0.5 is in no production subnet of network prod",
    ),
    ("prefix mismatch", {"network": "prod", "ip": "10.0.0.5/25"}, "prefix /25 does not match its subnet"),
    ("prefix disagree", {"network": "prod", "ip": "10.0.0.5/24", "prefix": 25}, "disagree"),
    ("bad ip", {"network": "prod", "ip": "10.0.0.300"}, "'10.0.0.300' is not an IP address"),
    ("bad mac", {"network": "prod", "ip": "10.0.0.5", "mac": "zz"}, "mac: 'zz' is not a MAC"),
    ("unknown nic key", {"network": "prod", "ip": "10.0.0.5", "addr": 1}, "unknown keys addr"),
]


@pytest.mark.parametrize("case", BAD_NICS, ids=[c[0] for c in BAD_NICS])
def test_bad_nic_names_vm_and_nic(case):
    text = problems([{"name": "web01", "nics": [case[1]]}], mapping(subnet("10.0.0.0/24", "10.1.0.0/24")))
    assert "web01 nic 0" in text and case[2] in text


def test_bad_direction_and_vm_list():
    m = mapping(subnet("10.0.0.0/24", "10.1.0.0/24"))
    with pytest.raises(AnsibleFilterError, match="direction must be failover or failback"):
        network.network_plan([], m, "sideways")
    with pytest.raises(AnsibleFilterError, match="expected a list of VMs"):
        network.network_plan({"web01": {}}, m)
    assert "vms[0]: expected a mapping" in problems(["web01"], m)


# -- normalised mapping, table, example files ----------------------------------------------


def test_normalised_mapping_fills_defaults():
    norm = network.network_mapping(mapping(subnet("10.0.0.0/24", "10.1.0.0/24")))
    assert norm["mac_policy"] == "keep"
    (net,) = norm["networks"]
    assert net["mac_policy"] == "keep" and net["production"] == {
        "type": "bridge",
        "source": "br0",
        "vlan": 110,
    }
    (sub,) = net["subnets"]
    assert sub == {
        "name": "10.0.0.0/24 <-> 10.1.0.0/24",
        "ip_policy": "same_offset",
        "production": {"cidr": "10.0.0.0/24", "gateway": None, "dns": [], "reserved": []},
        "dr": {"cidr": "10.1.0.0/24", "gateway": None, "dns": [], "reserved": []},
        "pool": None,
        "overrides": [],
    }


def test_table():
    m = mapping(subnet("10.0.0.0/24", "10.1.0.0/24", dr={"cidr": "10.1.0.0/24", "gateway": "10.1.0.1"}))
    lines = network.network_table(network.network_plan([vm("web01", "10.0.0.5")], m, "failover"))
    assert lines[0].split()[:3] == ["VM", "NIC", "NETWORK"]
    assert lines[1].split() == [
        "web01",
        "0",
        "prod",
        "bridge",
        "br0",
        "vlan",
        "110",
        "10.0.0.5/24",
        "network",
        "prod-b",
        "10.1.0.5/24",
        "10.1.0.1",
        "(unchanged)",
        "same_offset",
        "10.0.0.5",
        "->",
        "10.1.0.5",
    ]


@pytest.mark.parametrize("inventory", ["example", "lab"])
def test_shipped_files_map_both_ways(inventory):
    base = ROOT / "inventories" / inventory
    group = yaml.safe_load((base / "protection_group.yml").read_text())["tandem_protection_group"]
    m = yaml.safe_load((base / "network_mapping.yml").read_text())["tandem_network_mapping"]
    over = network.network_plan(group["vms"], m, "failover")
    back = network.network_plan(over, m, "failback")
    assert all(v["nics"] for v in over)
    for vm_in, vm_back in zip(group["vms"], back, strict=True):
        for nic_in, nic_back in zip(vm_in["nics"], vm_back["nics"], strict=True):
            if nic_back["ip_policy"] != "pool":
                assert nic_back["target"]["ip"] == nic_in["ip"].split("/")[0]


# -- property: same_offset round trip for any subnets the offset fits ------------------------


@settings(max_examples=200, deadline=None)
@given(
    src_prefix=st.integers(min_value=16, max_value=30),
    dst_prefix=st.integers(min_value=16, max_value=30),
    src_net=st.integers(min_value=0, max_value=2**16 - 1),
    dst_net=st.integers(min_value=0, max_value=2**16 - 1),
    offset=st.integers(min_value=1, max_value=2**16 - 2),
)
def test_same_offset_round_trip_or_a_clear_refusal(src_prefix, dst_prefix, src_net, dst_net, offset):
    src = netaddr.IPNetwork(f"10.{src_net >> 8}.{src_net & 255}.0/{src_prefix}").cidr
    dst = netaddr.IPNetwork(f"172.{16 + (dst_net >> 12)}.{(dst_net >> 4) & 255}.0/{dst_prefix}").cidr
    size = min(src.size, dst.size)
    offset = offset % (size - 2) + 1  # a host address of both subnets
    ip = str(netaddr.IPAddress(int(src.network) + offset))
    m = mapping(subnet(str(src), str(dst)))
    over = network.network_plan([vm("web01", ip)], m, "failover")
    assert over[0]["nics"][0]["target"]["ip"] == str(netaddr.IPAddress(int(dst.network) + offset))
    back = network.network_plan(over, m, "failback")
    assert back[0]["nics"][0]["target"]["ip"] == ip
    if src.size > dst.size:  # the same offset past the end of the smaller subnet is refused
        far = str(netaddr.IPAddress(int(src.network) + dst.size))
        assert "same_offset cannot map" in problems([vm("web01", far)], m)


# -- hostile input: any YAML-shaped value is refused with AnsibleFilterError, never a crash -----

YAMLISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5000)
    | st.sampled_from(
        [
            "",
            "prod",
            "br0",
            "10.0.0.0/24",
            "10.0.0.5",
            "10.1.0.0/24",
            "2001:db8::/64",
            "pool",
            "keep",
            "generate",
            "10.0.0.1-10.0.0.9",
            "52:54:00:00:00:01",
            "x/33",
        ]
    ),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "networks",
                    "production",
                    "dr",
                    "subnets",
                    "cidr",
                    "gateway",
                    "dns",
                    "ip_policy",
                    "pool",
                    "overrides",
                    "vm",
                    "nic",
                    "bridge",
                    "network",
                    "vlan",
                    "mac_policy",
                    "ip",
                    "nics",
                    "mac",
                    "prefix",
                    "reserved",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(m=YAMLISH, vms=YAMLISH)
def test_hostile_input_is_refused_cleanly(m, vms):
    for call in (
        lambda: network.network_mapping(m, ["web01"]),
        lambda: network.network_plan(vms if isinstance(vms, list) else [vms], m, "failover"),
    ):
        with contextlib.suppress(AnsibleFilterError):
            call()


def _paths(node, path=()):
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*path, key))


def _replaced(root, path, value):
    root = copy.deepcopy(root)
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


HOSTILE = [None, True, 0, -1, 70000, "", "x", "10.0.0.0/8", "::", [], [None], {}, {"x": 1}]


def test_every_value_of_the_example_replaced_by_junk_is_refused_or_still_valid():
    """Each value of the example mapping, in turn, replaced by each hostile value: the filters
    either accept the result or refuse it with AnsibleFilterError; nothing else escapes."""
    example = yaml.safe_load((ROOT / "inventories/example/network_mapping.yml").read_text())
    m = example["tandem_network_mapping"]
    group = yaml.safe_load((ROOT / "inventories/example/protection_group.yml").read_text())
    vms = group["tandem_protection_group"]["vms"]
    refused = 0
    cases = [(_replaced(m, path, junk), vms) for path in _paths(m) for junk in HOSTILE]
    cases += [(m, _replaced(vms, path, junk)) for path in _paths(vms) for junk in HOSTILE]
    for mapping_, vms_ in cases:
        try:
            over = network.network_plan(vms_, mapping_, "failover")
            network.network_table(network.network_plan(over, mapping_, "failback", vms_))
        except AnsibleFilterError:
            refused += 1
    assert refused > 100
