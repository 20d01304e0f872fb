"""The lab's networks on the lab machine: bridges, routing and nft tables.

The lab machine is the router between the site subnets (L3 between sites,
no stretched L2 except the control-plane VIP segment).
"""

from __future__ import annotations

import json

from . import render
from .system import ok, out, run, step
from .topology import Topology

GUARD_TABLE = ("inet", "tandem-lab-guard")
FAULTS_TABLE = ("bridge", "tandem-lab-faults")
TABLES = (GUARD_TABLE, FAULTS_TABLE)


def bridge_exists(name: str) -> bool:
    return ok(["ip", "link", "show", "dev", name])


def ensure_bridges(topo: Topology) -> None:
    for net in topo.networks.values():
        if not bridge_exists(net.bridge):
            run(["ip", "link", "add", net.bridge, "type", "bridge"])
            step(f"bridge {net.bridge} created ({net.subnet})")
        # The lab is IPv4 only; keep the bridges from talking IPv6 at all.
        run(["sysctl", "-q", "-w", f"net.ipv6.conf.{net.bridge}.disable_ipv6=1"])
        addr = f"{net.gateway}/{net.subnet.prefixlen}"
        if addr not in out(["ip", "-4", "-o", "addr", "show", "dev", net.bridge]):
            run(["ip", "addr", "add", addr, "dev", net.bridge])
        run(["ip", "link", "set", net.bridge, "up"])


def remove_bridges(topo: Topology) -> None:
    for bridge in topo.bridges():
        if bridge_exists(bridge):
            run(["ip", "link", "del", bridge])
            step(f"bridge {bridge} removed")


def ip_forward() -> str:
    return out(["sysctl", "-n", "net.ipv4.ip_forward"]).strip()


def set_ip_forward(value: str) -> None:
    run(["sysctl", "-q", "-w", f"net.ipv4.ip_forward={value}"])


def table_exists(family: str, name: str) -> bool:
    return ok(["nft", "list", "table", family, name])


def ensure_tables(topo: Topology) -> None:
    # The guard is replaced atomically on every `up`, so it always matches
    # the topology; the faults table is kept, so active faults survive.
    run(["nft", "-f", "-"], input=render.guard_ruleset(topo))
    if not table_exists(*FAULTS_TABLE):
        run(["nft", "-f", "-"], input=render.faults_ruleset(topo))
    step("nft egress guard and fault table in place")


def remove_tables() -> None:
    for family, name in TABLES:
        if table_exists(family, name):
            run(["nft", "delete", "table", family, name])
            step(f"nft table {family} {name} removed")


def list_rules(family: str, table: str) -> list[dict]:
    """Rules of a table, from nft's JSON output, with chain, handle, comment."""
    if not table_exists(family, table):
        return []
    data = json.loads(out(["nft", "-j", "-a", "list", "table", family, table]))
    return [item["rule"] for item in data.get("nftables", []) if "rule" in item]
