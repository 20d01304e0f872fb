#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_drill_network
short_description: A drill's isolated network on a hypervisor - a bridge with no uplink and a probe namespace
version_added: 0.1.0
description:
  - V(present) makes a Linux bridge with no address and no uplink for a drill's VM copies, a network
    namespace O(netns) joined to it by a veth pair (C(<bridge>-p) on the bridge, C(probe0) inside),
    and gives C(probe0) exactly O(addresses) (typically each DR subnet's gateway), so health checks
    and isolation probes run from inside the drill network.
  - V(absent) removes all three. V(inspected) changes nothing.
  - Every state returns what the network looks like now, for the drill's isolation proof - the bridge's
    ports with their MACs, any address on the bridge itself, and the MACs learned on every other bridge
    of the host.
  - Uses the C(ip) and C(bridge) commands of iproute2 (JSON output).
extends_documentation_fragment:
  - tandem.dr._attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
options:
  bridge:
    description: Bridge name (at most 13 characters, so C(<bridge>-p) fits an interface name).
    type: str
    required: true
  netns:
    description: Probe namespace name (at most 64 characters).
    type: str
    required: true
  addresses:
    description: Addresses of C(probe0) in CIDR form, with V(present).
    type: list
    elements: str
    default: []
  state:
    description: See the description.
    type: str
    choices: [present, absent, inspected]
    default: present
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: The drill network at the DR hypervisor
  tandem.dr.tandem_drill_network:
    bridge: tdr-drill
    netns: tdr-drill-probe
    addresses: [192.168.20.1/24]
"""

RETURN = r"""
exists:
  description: Whether the bridge and the namespace exist (after the change).
  returned: always
  type: dict
  sample: {bridge: true, netns: true}
ports:
  description: The bridge's ports, with their MAC addresses.
  returned: always
  type: list
  elements: dict
  sample: [{name: tdr-drill-p, mac: "aa:bb:cc:dd:ee:ff"}, {name: vnet3, mac: "fe:54:00:12:34:56"}]
bridge_addresses:
  description: Addresses on the bridge itself (an isolated bridge has none).
  returned: always
  type: list
  elements: str
probe_addresses:
  description: Addresses of C(probe0) in the namespace.
  returned: always
  type: list
  elements: str
macs_on_other_bridges:
  description: MACs learned on the host's other bridges (a drill MAC must never be among them).
  returned: always
  type: list
  elements: str
actions:
  description: The commands run (or that would run in check mode).
  returned: always
  type: list
  elements: list
"""

import json
import re

from ansible.module_utils.basic import AnsibleModule

PROBE = "probe0"
# The bridge's name must leave room for "-p" in the 15 characters of an interface name.
NAMES = {"bridge": re.compile(r"^[A-Za-z0-9_.-]{1,13}$"), "netns": re.compile(r"^[A-Za-z0-9_.-]{1,64}$")}


class Net:
    def __init__(self, module):
        self.module = module
        self.actions = []

    def json(self, *argv, netns=None):
        cmd = ["ip", "-j", *(["-n", netns] if netns else []), *argv]
        rc, out, err = self.module.run_command(cmd)
        if rc != 0:
            return None
        return json.loads(out or "[]")

    def run(self, *argv):
        self.actions.append(list(argv))
        if self.module.check_mode:
            return
        rc, _out, err = self.module.run_command(list(argv))
        if rc != 0:
            self.module.fail_json(msg=f"{' '.join(argv)} failed: {err.strip()}", actions=self.actions)

    def link(self, name, netns=None):
        found = self.json("link", "show", "dev", name, netns=netns)
        return found[0] if found else None

    def netns_exists(self, name):
        rc, out, _err = self.module.run_command(["ip", "-j", "netns", "list"])
        return rc == 0 and any(n.get("name") == name for n in json.loads(out or "[]"))

    def addresses(self, name, netns=None):
        found = self.json("addr", "show", "dev", name, netns=netns) or []
        return [f"{a['local']}/{a['prefixlen']}" for entry in found for a in entry.get("addr_info", [])
                if a.get("scope") == "global"]

    def report(self, bridge, netns):
        ports = [{"name": p["ifname"], "mac": p.get("address")}
                 for p in (self.json("link", "show", "master", bridge) or [])] if self.link(bridge) else []
        rc, out, _err = self.module.run_command(["bridge", "-j", "fdb", "show"])
        fdb = json.loads(out or "[]") if rc == 0 else []
        others = sorted({e["mac"] for e in fdb if e.get("master") and e.get("master") != bridge
                         and e.get("ifname") != bridge and not e.get("flags", []).count("permanent")})
        has_ns = self.netns_exists(netns)
        return {"exists": {"bridge": self.link(bridge) is not None, "netns": has_ns},
                "ports": ports,
                "bridge_addresses": self.addresses(bridge) if self.link(bridge) else [],
                "probe_addresses": self.addresses(PROBE, netns) if has_ns and self.link(PROBE, netns) else [],
                "macs_on_other_bridges": others}


def present(net, bridge, netns, addresses):
    if net.link(bridge) is None:
        net.run("ip", "link", "add", bridge, "type", "bridge", "stp_state", "0")
    if not (net.link(bridge) or {}).get("flags", []).count("UP"):
        net.run("ip", "link", "set", bridge, "up")
    has_ns = net.netns_exists(netns)
    if not has_ns:
        net.run("ip", "netns", "add", netns)
    if net.link(f"{bridge}-p") is None:
        net.run("ip", "link", "add", f"{bridge}-p", "type", "veth", "peer", "name", PROBE, "netns", netns)
    veth = net.link(f"{bridge}-p") or {}
    if veth.get("master") != bridge or not veth.get("flags", []).count("UP"):
        net.run("ip", "link", "set", f"{bridge}-p", "master", bridge, "up")
    probe = net.link(PROBE, netns) if has_ns else None
    lo = net.link("lo", netns) if has_ns else None
    if not lo or not lo.get("flags", []).count("UP"):
        net.run("ip", "-n", netns, "link", "set", "lo", "up")
    if not probe or not probe.get("flags", []).count("UP"):
        net.run("ip", "-n", netns, "link", "set", PROBE, "up")
    have = net.addresses(PROBE, netns) if probe else []
    for a in addresses:
        if a not in have:
            net.run("ip", "-n", netns, "addr", "add", a, "dev", PROBE)
    for a in have:
        if a not in addresses:
            net.run("ip", "-n", netns, "addr", "del", a, "dev", PROBE)


def absent(net, bridge, netns):
    if net.netns_exists(netns):
        net.run("ip", "netns", "del", netns)
    if net.link(f"{bridge}-p") is not None:
        net.run("ip", "link", "del", f"{bridge}-p")
    if net.link(bridge) is not None:
        net.run("ip", "link", "del", bridge)


def main():
    module = AnsibleModule(
        argument_spec={"bridge": {"type": "str", "required": True},
                       "netns": {"type": "str", "required": True},
                       "addresses": {"type": "list", "elements": "str", "default": []},
                       "state": {"type": "str", "default": "present",
                                 "choices": ["present", "absent", "inspected"]}},
        supports_check_mode=True,
    )
    p = module.params
    for key, pattern in NAMES.items():
        if not pattern.match(p[key]):
            most = 13 if key == "bridge" else 64
            module.fail_json(msg=f"{key} {p[key]!r}: use [A-Za-z0-9_.-], at most {most} characters")
    net = Net(module)
    if p["state"] == "present":
        present(net, p["bridge"], p["netns"], p["addresses"])
    elif p["state"] == "absent":
        absent(net, p["bridge"], p["netns"])
    module.exit_json(changed=bool(net.actions), actions=net.actions, **net.report(p["bridge"], p["netns"]))


if __name__ == "__main__":
    main()
