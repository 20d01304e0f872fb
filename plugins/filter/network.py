# Copyright: Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters for the network mapping file: validate it, map each VM's NICs to the other site,
and render the old -> new table.

One file covers both directions (oVirt-style): every network and subnet entry names its
`production` side and its `dr` side. Failover maps production -> dr, failback dr -> production.
All IP arithmetic is netaddr's. See docs/network-mapping.md.
"""

from __future__ import annotations

import hashlib
import re

from ansible.errors import AnsibleFilterError

try:
    import netaddr
except ImportError:  # reported when a filter is used, not when Ansible loads the plugin
    netaddr = None

SIDES = ("production", "dr")
DIRECTIONS = {"failover": ("production", "dr"), "failback": ("dr", "production")}
IP_POLICIES = ("keep", "same_offset", "pool")
MAC_POLICIES = ("keep", "generate")
# Generated MACs: QEMU's OUI, which libvirt also uses for the MACs it makes up. Its first
# octet 0x52 has the locally-administered bit set and the multicast bit clear.
MAC_PREFIX = "52:54:00"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
TOP_KEYS = {"mac_policy", "networks"}
NETWORK_KEYS = {"name", "production", "dr", "mac_policy", "subnets"}
INTERFACE_KEYS = {"network", "bridge", "vlan"}
SUBNET_KEYS = {"name", "production", "dr", "ip_policy", "pool", "overrides"}
SUBNET_SIDE_KEYS = {"cidr", "gateway", "dns", "reserved"}
OVERRIDE_KEYS = {"vm", "nic", "production", "dr"}
NIC_KEYS = {"network", "ip", "prefix", "mac"}


def _need_netaddr():
    if netaddr is None:
        raise AnsibleFilterError("the tandem.dr network filters need the Python library netaddr "
                                 "on the controller (pip install netaddr)")


def _problems(title, errors):
    listing = "\n  ".join(errors)
    return AnsibleFilterError(f"{title}: {len(errors)} problem(s):\n  {listing}")


def _unknown(obj, allowed, where, errors):
    unknown = sorted(str(k) for k in set(obj) - allowed)
    if unknown:
        errors.append(f"{where}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _ip(value, where, errors, what="address"):
    """An IPAddress from a string (no prefix), or None with the problem recorded."""
    if isinstance(value, str) and "/" not in value:
        try:
            return netaddr.IPAddress(value.strip())
        except (netaddr.AddrFormatError, ValueError, TypeError):
            pass
    errors.append(f"{where}: {what} {value!r} is not an IP address")
    return None


def _reserved_in(net):
    """Addresses of a subnet that no VM gets: the network address and, for IPv4 /30 and
    larger, the broadcast (IPv6 has no broadcast; its subnet-router anycast is the first)."""
    out = {net.network}
    if net.version == 4 and net.prefixlen <= 30:
        out.add(net.broadcast)
    return out


def _interface(side, where, errors):
    """A libvirt interface source: {type: network|bridge, source, vlan}."""
    if not isinstance(side, dict):
        errors.append(f"{where}: expected a mapping with 'network' (libvirt network) or 'bridge'")
        return None
    _unknown(side, INTERFACE_KEYS, where, errors)
    kinds = [k for k in ("network", "bridge") if side.get(k) is not None]
    if len(kinds) != 1:
        errors.append(f"{where}: give exactly one of 'network' (libvirt network) or 'bridge'")
        return None
    before = len(errors)
    source = side[kinds[0]]
    if not isinstance(source, str) or not NAME_RE.match(source):
        errors.append(f"{where}.{kinds[0]}: {source!r} must match {NAME_RE.pattern}")
    vlan = side.get("vlan")
    if vlan is not None:
        if isinstance(vlan, bool) or not isinstance(vlan, int) or not 1 <= vlan <= 4094:
            errors.append(f"{where}.vlan: must be an integer 1-4094, got {vlan!r}")
        elif kinds[0] != "bridge":
            errors.append(f"{where}.vlan: a VLAN needs its parent 'bridge', not a libvirt network")
    if len(errors) > before:
        return None
    return {"type": kinds[0], "source": source, "vlan": vlan}


def _subnet_side(side, where, errors):
    if not isinstance(side, dict):
        errors.append(f"{where}: expected a mapping with 'cidr' (and gateway, dns)")
        return None
    _unknown(side, SUBNET_SIDE_KEYS, where, errors)
    cidr = side.get("cidr")
    try:
        net = netaddr.IPNetwork(str(cidr)) if isinstance(cidr, str) else None
    except (netaddr.AddrFormatError, ValueError):
        net = None
    if net is None or "/" not in cidr:
        errors.append(f"{where}.cidr: {cidr!r} is not a subnet in CIDR form (e.g. 192.168.10.0/24)")
        return None
    if net.ip != net.network:
        errors.append(f"{where}.cidr: {cidr} has host bits set (the subnet is {net.cidr})")
        return None
    gateway = None
    if side.get("gateway") is not None:
        gateway = _ip(side["gateway"], f"{where}.gateway", errors, "gateway")
        if gateway is not None and (gateway not in net or gateway in _reserved_in(net)):
            errors.append(f"{where}.gateway: {gateway} is not a host address of {net.cidr}")
    dns = side.get("dns", [])
    if not isinstance(dns, list):
        errors.append(f"{where}.dns: expected a list of addresses")
        dns = []
    dns = [_ip(d, f"{where}.dns[{i}]", errors, "DNS server") for i, d in enumerate(dns)]
    reserved = side.get("reserved", [])
    if not isinstance(reserved, list):
        errors.append(f"{where}.reserved: expected a list of addresses")
        reserved = []
    reserved = [_ip(r, f"{where}.reserved[{i}]", errors) for i, r in enumerate(reserved)]
    for i, r in enumerate(reserved):
        if r is not None and r not in net:
            errors.append(f"{where}.reserved[{i}]: {r} is not in {net.cidr}")
    return {"cidr": net.cidr, "gateway": gateway, "dns": [d for d in dns if d is not None],
            "reserved": [r for r in reserved if r is not None]}


def _pool(value, net, where, errors):
    """A pool: 'FIRST-LAST' or a CIDR inside the subnet, or a list of them; returns an IPSet."""
    items = value if isinstance(value, list) else [value]
    pool = netaddr.IPSet()
    for i, item in enumerate(items):
        iwhere = f"{where}[{i}]" if isinstance(value, list) else where
        try:
            if isinstance(item, str) and "-" in item:
                first, last = (s.strip() for s in item.split("-", 1))
                part = netaddr.IPSet(netaddr.IPRange(first, last))
            elif isinstance(item, str) and "/" in item:
                part = netaddr.IPSet([netaddr.IPNetwork(item).cidr])
            else:
                raise ValueError
        except (netaddr.AddrFormatError, ValueError, TypeError):
            errors.append(f"{iwhere}: {item!r} is not a range (FIRST-LAST) or a CIDR")
            continue
        if net is not None and not part.issubset(netaddr.IPSet([net])):
            errors.append(f"{iwhere}: {item} is not inside {net}")
            continue
        pool |= part
    if net is not None:
        pool -= netaddr.IPSet(_reserved_in(net))
    if not pool:
        errors.append(f"{where}: the pool has no usable address")
    return pool


def _subnet(sub, where, vm_names, errors):
    if not isinstance(sub, dict):
        errors.append(f"{where}: expected a mapping with 'production' and 'dr'")
        return None
    if sub.get("name") is not None:
        where = f"{where} ({sub['name']})"
    _unknown(sub, SUBNET_KEYS, where, errors)
    sides = {s: _subnet_side(sub.get(s), f"{where}.{s}", errors) for s in SIDES}
    nets = {s: (sides[s] or {}).get("cidr") for s in SIDES}
    both = all(nets.values())
    if both and nets["production"].version != nets["dr"].version:
        errors.append(f"{where}: production {nets['production']} and dr {nets['dr']} "
                      "are not the same IP version")
        both = False
    same = both and nets["production"] == nets["dr"]
    policy = sub.get("ip_policy", "keep" if same else "same_offset")
    if policy not in IP_POLICIES:
        errors.append(f"{where}.ip_policy: must be one of {', '.join(IP_POLICIES)}, got {policy!r}")
    elif both and (policy == "keep") != same:
        errors.append(f"{where}.ip_policy: 'keep' is the policy exactly when both sides are the same subnet "
                      f"(production {nets['production']}, dr {nets['dr']}); got {policy!r}")
    pools = None
    if policy == "pool":
        raw = sub.get("pool")
        if not isinstance(raw, dict) or set(raw) != set(SIDES):
            errors.append(f"{where}.pool: ip_policy pool needs a pool for each side "
                          "({production: FIRST-LAST, dr: FIRST-LAST}), so both directions work")
        else:
            pools = {s: _pool(raw[s], nets[s], f"{where}.pool.{s}", errors) for s in SIDES}
    elif sub.get("pool") is not None:
        errors.append(f"{where}.pool: only used with ip_policy pool (the policy is {policy})")
    overrides = []
    raw = sub.get("overrides", [])
    if not isinstance(raw, list):
        errors.append(f"{where}.overrides: expected a list of {{vm, nic, production, dr}}")
        raw = []
    seen = set()
    for i, ov in enumerate(raw):
        owhere = f"{where}.overrides[{i}]"
        if not isinstance(ov, dict):
            errors.append(f"{owhere}: expected a mapping with vm, production and dr")
            continue
        _unknown(ov, OVERRIDE_KEYS, owhere, errors)
        vm, nic = ov.get("vm"), ov.get("nic")
        if not isinstance(vm, str) or not vm:
            errors.append(f"{owhere}.vm: must name a VM")
        elif vm_names is not None and vm not in vm_names:
            errors.append(f"{owhere}.vm: {vm} is not a VM of the protection group")
        if nic is not None and (isinstance(nic, bool) or not isinstance(nic, int) or nic < 0):
            errors.append(f"{owhere}.nic: must be a NIC index (0, 1, ...), got {nic!r}")
        key = (repr(vm), repr(nic))  # repr: whatever the YAML held, it can be a set member
        if key in seen:
            errors.append(f"{owhere}: a second override for {vm} nic {'(any)' if nic is None else nic}")
        seen.add(key)
        ips = {}
        for s in SIDES:
            ip = _ip(ov.get(s), f"{owhere}.{s}", errors)
            if ip is not None and nets[s] is not None and (ip not in nets[s] or ip in _reserved_in(nets[s])):
                errors.append(f"{owhere}.{s}: {ip} is not a host address of {nets[s]}")
            elif ip is not None and sides[s] and ip == sides[s]["gateway"]:
                errors.append(f"{owhere}.{s}: {ip} is the gateway of {nets[s]}")
            elif ip is not None and (s, ip) in seen:
                errors.append(f"{owhere}.{s}: {ip} is already the {s} address of another override")
            seen.add((s, ip))
            ips[s] = ip
        overrides.append({"vm": vm, "nic": nic, **ips})
    if not both:
        return None
    return {"name": sub.get("name") or f"{nets['production']} <-> {nets['dr']}",
            "production": sides["production"], "dr": sides["dr"], "ip_policy": policy,
            "pool": pools, "overrides": overrides}


def _validate(mapping, vm_names=None):
    """(normalised mapping with netaddr objects, errors)."""
    _need_netaddr()
    errors = []
    if not isinstance(mapping, dict):
        return None, ["network mapping: expected a mapping with 'networks'"]
    _unknown(mapping, TOP_KEYS, "network mapping", errors)
    default_mac = mapping.get("mac_policy", "keep")
    if default_mac not in MAC_POLICIES:
        errors.append(f"mac_policy: must be one of {', '.join(MAC_POLICIES)}, got {default_mac!r}")
    networks = mapping.get("networks")
    if not isinstance(networks, list) or not networks:
        return None, errors + ["networks: must be a non-empty list"]
    vm_names = set(vm_names) if vm_names is not None else None
    out, names, sources, cidrs = [], {}, {}, {}
    for i, entry in enumerate(networks):
        where = f"networks[{i}]"
        if not isinstance(entry, dict):
            errors.append(f"{where}: expected a mapping with name, production, dr and subnets")
            continue
        name = entry.get("name")
        where = f"networks[{i}] ({name})" if name else where
        _unknown(entry, NETWORK_KEYS, where, errors)
        if not isinstance(name, str) or not NAME_RE.match(name):
            errors.append(f"{where}.name: must match {NAME_RE.pattern}")
        elif name in names:
            errors.append(f"{where}.name: {name} is already the name of networks[{names[name]}]")
        else:
            names[name] = i
        ifaces = {s: _interface(entry.get(s), f"{where}.{s}", errors) for s in SIDES}
        for s, iface in ifaces.items():
            if iface is None:
                continue
            key = (s, iface["type"], iface["source"], iface["vlan"])
            other = sources.setdefault(key, (i, name))
            if other[0] != i:
                errors.append(f"{where}.{s}: {_iface_text(iface)} is already mapped by "
                              f"networks[{other[0]}] ({other[1]})")
        mac = entry.get("mac_policy", default_mac)
        if "mac_policy" in entry and mac not in MAC_POLICIES:
            errors.append(f"{where}.mac_policy: must be one of {', '.join(MAC_POLICIES)}, got {mac!r}")
        subnets = entry.get("subnets", [])
        if not isinstance(subnets, list):
            errors.append(f"{where}.subnets: expected a list")
            subnets = []
        subs = [_subnet(sub, f"{where}.subnets[{j}]", vm_names, errors) for j, sub in enumerate(subnets)]
        for j, sub in enumerate(subs):
            for s in SIDES if sub else ():
                net = sub[s]["cidr"]
                for (os_, onet), owhere in cidrs.items():
                    if os_ == s and (net in onet or onet in net):
                        errors.append(f"{where}.subnets[{j}].{s}: {net} overlaps {onet} of {owhere}")
                cidrs[(s, net)] = f"{where}.subnets[{j}]"
        out.append({"name": name, **ifaces, "mac_policy": mac, "subnets": [s for s in subs if s]})
    return {"mac_policy": default_mac, "networks": out}, errors


def _iface_text(iface):
    text = f"{iface['type']} {iface['source']}"
    return f"{text} vlan {iface['vlan']}" if iface.get("vlan") else text


def _export_subnet_side(side):
    return {"cidr": str(side["cidr"]), "gateway": str(side["gateway"]) if side["gateway"] else None,
            "dns": [str(d) for d in side["dns"]], "reserved": [str(r) for r in side["reserved"]]}


def network_mapping(mapping, vm_names=None):
    """Validate a network mapping and return it normalised (defaults filled, addresses as
    strings). `vm_names` (optional) are the VMs overrides may name. Raises AnsibleFilterError
    listing every problem with its path in the file."""
    norm, errors = _validate(mapping, vm_names)
    if errors:
        raise _problems("network mapping", errors)
    return {
        "mac_policy": norm["mac_policy"],
        "networks": [{
            "name": n["name"], "production": n["production"], "dr": n["dr"], "mac_policy": n["mac_policy"],
            "subnets": [{
                "name": s["name"], "ip_policy": s["ip_policy"],
                **{side: _export_subnet_side(s[side]) for side in SIDES},
                "pool": {side: [str(c) for c in s["pool"][side].iter_cidrs()] for side in SIDES}
                if s["pool"] else None,
                "overrides": [{"vm": o["vm"], "nic": o["nic"], "production": str(o["production"]),
                               "dr": str(o["dr"])} for o in s["overrides"]],
            } for s in n["subnets"]],
        } for n in norm["networks"]],
    }


def generated_mac(vm, nic, side):
    """The MAC that mac_policy generate gives NIC `nic` of `vm` at `side`: 52:54:00 plus the
    first 3 bytes of sha256("vm/nic/side"), so it is the same on every run and controller."""
    digest = hashlib.sha256(f"{vm}/{nic}/{side}".encode()).hexdigest()
    return f"{MAC_PREFIX}:{digest[0:2]}:{digest[2:4]}:{digest[4:6]}"


def _pool_start(vm, nic, size):
    """Where a NIC starts probing its pool: from a hash of its VM and index, so its address
    depends neither on the order of the file nor, unless two NICs hash alike, on other VMs."""
    return int.from_bytes(hashlib.sha256(f"{vm}/{nic}".encode()).digest()[:8], "big") % size


def _find_network(norm, nic, source_side):
    """The mapping entry a NIC is on: by entry name, else by its source-side libvirt network
    or bridge name."""
    want = nic.get("network")
    for entry in norm["networks"]:
        if entry["name"] == want:
            return entry
    hits = [e for e in norm["networks"] if e[source_side] and e[source_side]["source"] == want]
    return hits[0] if len(hits) == 1 else None


def _source_nics(vm):
    """A VM's NICs as given, or the targets of a previous network_plan (so its output can be
    fed back, e.g. failover then failback)."""
    nics = vm.get("nics") or []
    if not isinstance(nics, list):
        return nics
    return [dict(n["target"]) if isinstance(n, dict) and isinstance(n.get("target"), dict) else n
            for n in nics]


def _parse_nic(nic, where, errors):
    """(ip, prefix, mac) of an input NIC; ip may carry its prefix ('10.0.0.5/24')."""
    if not isinstance(nic, dict):
        errors.append(f"{where}: expected a mapping with network, ip (and prefix, mac)")
        return None
    extra = set(nic) - NIC_KEYS - {"interface", "cidr", "gateway", "dns"}
    if extra:
        errors.append(f"{where}: unknown keys {', '.join(sorted(map(str, extra)))} "
                      f"(allowed: {', '.join(sorted(NIC_KEYS))})")
    ip, prefix = nic.get("ip"), nic.get("prefix")
    if ip is not None:
        if isinstance(ip, str) and "/" in ip:
            ip, _sep, given = ip.partition("/")
            if prefix is not None and str(prefix) != given:
                errors.append(f"{where}: ip {nic['ip']} and prefix {prefix} disagree")
            prefix = given
        ip = _ip(ip, f"{where}.ip", errors)
    if prefix is not None:
        try:
            prefix = int(prefix)
        except (TypeError, ValueError):
            errors.append(f"{where}.prefix: {prefix!r} is not a prefix length")
            prefix = None
    mac = nic.get("mac")
    if mac is not None:
        try:
            mac = str(netaddr.EUI(str(mac), dialect=netaddr.mac_unix_expanded)).lower()
        except (netaddr.AddrFormatError, ValueError, TypeError):
            errors.append(f"{where}.mac: {mac!r} is not a MAC address")
            mac = None
    return ip, prefix, mac


def network_plan(vms, mapping, direction="failover", home=None):
    """Map every NIC of every VM to the other site.

    vms: [{name, nics: [{network, ip, prefix, mac}]}] (the protection group's VMs, or the
    output of a previous network_plan). direction: failover (production -> dr) or failback
    (dr -> production). Returns one entry per VM: {name, direction, from, to, nics: [{index,
    network, ip_policy, mac_policy, reason, source: {...}, target: {...}}]} where source and
    target are {network, interface, ip, prefix, cidr, gateway, dns, mac}. Pool addresses are
    allocated for all the VMs at once, so no two NICs get the same address.
    home: the VMs with their NICs at production (the protection group's VMs); on failback a
    pool NIC goes back to its production address when it is free.
    """
    if direction not in DIRECTIONS:
        raise AnsibleFilterError(f"network plan: direction must be failover or failback, got {direction!r}")
    src, dst = DIRECTIONS[direction]
    if not isinstance(vms, list):
        raise AnsibleFilterError("network plan: expected a list of VMs with name and nics")
    # Overrides may name VMs that are not in this run (a selection), so no vm_names here.
    norm, errors = _validate(mapping)
    if errors:
        raise _problems("network mapping", errors)
    planned, pending = [], []
    for i, vm in enumerate(vms):
        if not isinstance(vm, dict) or not isinstance(vm.get("name"), str):
            errors.append(f"vms[{i}]: expected a mapping with 'name' and 'nics'")
            continue
        name = vm["name"]
        nics = _source_nics(vm)
        if not isinstance(nics, list):
            errors.append(f"{name}: nics must be a list")
            continue
        out = {"name": name, "direction": direction, "from": src, "to": dst, "nics": []}
        for index, nic in enumerate(nics):
            where = f"{name} nic {index}"
            parsed = _parse_nic(nic, where, errors)
            if parsed is None:
                continue
            mapped = _map_nic(norm, name, index, nic, parsed, src, dst, where, errors)
            if mapped is None:
                continue
            out["nics"].append(mapped)
            if mapped["ip_policy"] == "pool" and mapped.get("_subnet"):
                pending.append(mapped)
        planned.append(out)
    if not errors:
        _allocate_pools(planned, pending, dst, _home_addresses(home) if dst == "production" else {}, errors)
    if not errors:
        _check_collisions(planned, src, dst, errors)
    if errors:
        raise _problems(f"network plan ({direction})", errors)
    for vm in planned:
        for nic in vm["nics"]:
            nic.pop("_subnet", None)
            nic.pop("_vm", None)
            for end in ("source", "target"):
                nic[end] = {k: (str(v) if isinstance(v, (netaddr.IPAddress, netaddr.IPNetwork)) else v)
                            for k, v in nic[end].items()}
                nic[end]["dns"] = [str(d) for d in nic[end]["dns"]]
    return planned


def _map_nic(norm, vm, index, nic, parsed, src, dst, where, errors):
    ip, prefix, mac = parsed
    entry = _find_network(norm, nic, src)
    if entry is None:
        names = ", ".join(str(e["name"]) for e in norm["networks"])
        errors.append(f"{where}: network {nic.get('network')!r} is not in the mapping (networks: {names})")
        return None
    mac_policy = entry["mac_policy"]
    target_mac = generated_mac(vm, index, dst) if mac_policy == "generate" else mac
    result = {"_vm": vm, "index": index, "network": entry["name"], "mac_policy": mac_policy,
              "source": {"network": entry["name"], "interface": entry[src], "ip": ip, "prefix": prefix,
                         "cidr": None, "gateway": None, "dns": [], "mac": mac},
              "target": {"network": entry["name"], "interface": entry[dst], "ip": None, "prefix": None,
                         "cidr": None, "gateway": None, "dns": [], "mac": target_mac}}
    if ip is None:
        result.update(ip_policy="dhcp", reason="no static address: the guest keeps using DHCP")
        return result
    sub = next((s for s in entry["subnets"] if ip in s[src]["cidr"]), None)
    if sub is None:
        errors.append(f"{where}: {ip} is in no {src} subnet of network {entry['name']}")
        return None
    snet, tside = sub[src]["cidr"], sub[dst]
    tnet = tside["cidr"]
    if prefix is not None and prefix != snet.prefixlen:
        errors.append(f"{where}: prefix /{prefix} does not match its subnet {snet}")
        return None
    if ip in _reserved_in(snet) or ip == sub[src]["gateway"]:
        errors.append(f"{where}: {ip} is the network, broadcast or gateway address of {snet}")
        return None
    sside = sub[src]
    result["source"].update(prefix=snet.prefixlen, cidr=snet, gateway=sside["gateway"], dns=sside["dns"])
    result["target"].update(prefix=tnet.prefixlen, cidr=tnet, gateway=tside["gateway"], dns=tside["dns"])
    override = next((o for o in sub["overrides"] if o["vm"] == vm and o["nic"] in (index, None)), None)
    if override is not None:
        if override[src] != ip:
            errors.append(f"{where}: the override of {sub['name']} gives {vm} {override[src]} at {src}, "
                          f"but the NIC has {ip}")
            return None
        result.update(ip_policy="override", reason=f"override {ip} -> {override[dst]}")
        result["target"]["ip"] = override[dst]
        return result
    policy = sub["ip_policy"]
    result["ip_policy"] = policy
    if policy == "keep":
        result["target"]["ip"] = ip
        result["reason"] = f"keep {ip} (same subnet {snet} at both sites)"
    elif policy == "same_offset":
        offset = int(ip) - int(snet.network)
        if offset >= tnet.size:
            errors.append(f"{where}: same_offset cannot map {ip} (offset {offset} in {snet}) into {tnet}: "
                          f"{tnet} has {tnet.size} addresses")
            return None
        target = netaddr.IPAddress(int(tnet.network) + offset, tnet.version)
        if target in _reserved_in(tnet) or target == tside["gateway"]:
            errors.append(f"{where}: same_offset maps {ip} to {target}, the network, broadcast or gateway "
                          f"address of {tnet}")
            return None
        result["target"]["ip"] = target
        result["reason"] = f"same_offset {ip} -> {target}"
    else:  # pool: allocated once every fixed address is known
        result["_subnet"] = sub
        result["reason"] = "pool"
    return result


def _home_addresses(home):
    """{(vm, nic index): address} of the VMs' NICs at production; what does not parse is
    left out (network_plan of those VMs reports it)."""
    out = {}
    for vm in home if isinstance(home, list) else []:
        nics = vm.get("nics") if isinstance(vm, dict) else None
        for index, nic in enumerate(nics if isinstance(nics, list) else []):
            ip = nic.get("ip") if isinstance(nic, dict) else None
            try:
                out[(vm.get("name"), index)] = netaddr.IPAddress(str(ip).split("/", 1)[0])
            except (netaddr.AddrFormatError, ValueError, TypeError):
                continue
    return out


def _allocate_pools(planned, pending, dst, home, errors):
    """Give each pool NIC a free address of its target pool: never the network, broadcast,
    gateway, a DNS server, a reserved address or an address another NIC gets. A NIC whose
    `home` address (on failback, its production address) is in the target subnet and free
    gets it back, before any NIC is given a pool slot."""
    taken = netaddr.IPSet(n["target"]["ip"] for vm in planned for n in vm["nics"] if n["target"]["ip"])

    def unusable(side):
        return (taken | netaddr.IPSet(side["dns"]) | netaddr.IPSet(side["reserved"])
                | netaddr.IPSet([side["gateway"]] if side["gateway"] else [])
                | netaddr.IPSet(_reserved_in(side["cidr"])))

    # Sorted by VM and NIC, so the result does not depend on the order of the VMs given.
    pending = sorted(pending, key=lambda n: (n["_vm"], n["index"]))
    for nic in pending:
        side = nic["_subnet"][dst]
        back = home.get((nic["_vm"], nic["index"]))
        if back is not None and back in side["cidr"] and back not in unusable(side):
            taken.add(back)
            nic["target"]["ip"] = back
            nic["reason"] = f"pool {nic['source']['ip']} -> {back} (its production address)"
    for nic in pending:
        if nic["target"]["ip"] is not None:
            continue
        sub = nic["_subnet"]
        side, pool = sub[dst], sub["pool"][dst]
        free = pool - unusable(side)
        if not free:
            errors.append(f"{nic['_vm']} nic {nic['index']}: the {dst} pool of {sub['name']} is exhausted "
                          f"({pool.size} addresses, all taken)")
            continue
        target = _first_free(free, _nth(pool, _pool_start(nic["_vm"], nic["index"], pool.size)))
        taken.add(target)
        nic["target"]["ip"] = target
        nic["reason"] = f"pool {nic['source']['ip']} -> {target}"


def _nth(ipset, k):
    """The k-th address of an IPSet, in address order (without listing a /64)."""
    for cidr in ipset.iter_cidrs():
        if k < cidr.size:
            return cidr[k]
        k -= cidr.size
    raise IndexError(k)


def _first_free(free, start):
    """The first address of `free` at or after `start`, wrapping round to the lowest."""
    for cidr in free.iter_cidrs():
        if cidr.last >= int(start):
            return netaddr.IPAddress(max(cidr.first, int(start)), cidr.version)
    return next(free.iter_cidrs())[0]


def _check_collisions(planned, src, dst, errors):
    """Two NICs may not share an address (source or target) or a MAC."""
    for end, site in (("source", src), ("target", dst)):
        for key in ("ip", "mac"):
            owner = {}
            for vm in planned:
                for nic in vm["nics"]:
                    value = nic[end][key]
                    if value is None:
                        continue
                    here = f"{vm['name']} nic {nic['index']}"
                    if str(value) in owner:
                        errors.append(f"{here}: {end} {key} {value} at {site} is also {owner[str(value)]}'s")
                    else:
                        owner[str(value)] = here


def _end_text(end):
    iface = _iface_text(end["interface"]) if end.get("interface") else "?"
    ip = f"{end['ip']}/{end['prefix']}" if end.get("ip") else "dhcp"
    return f"{iface} {ip}"


def network_table(plan):
    """A fixed-width text table (list of lines): per VM NIC, the old and new network and IP,
    the MAC and the reason, from the output of network_plan."""
    header = ("VM", "NIC", "NETWORK", "OLD (interface ip)", "NEW (interface ip)", "GATEWAY", "MAC", "REASON")
    rows = []
    for vm in plan:
        for nic in vm["nics"]:
            tgt = nic["target"]
            mac = tgt["mac"] or "(unchanged)"
            if nic["mac_policy"] == "generate":
                mac += " (generated)"
            rows.append((vm["name"], str(nic["index"]), nic["network"], _end_text(nic["source"]),
                         _end_text(tgt), tgt["gateway"] or "-", mac, nic["reason"]))
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in [header, *rows]]


class FilterModule:
    def filters(self):
        return {"network_mapping": network_mapping, "network_plan": network_plan,
                "network_table": network_table, "generated_mac": generated_mac}
