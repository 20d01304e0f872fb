"""Load and validate the lab topology (lab/topology.toml).

Everything the lab builds is derived from this one description, so that the
renderers stay pure and the whole lab can be checked before anything is
created on the machine.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "topology.toml"

# Linux interface names are at most 15 characters; the host-side veth is
# "<host>-<nic index>".
_IFNAME_MAX = 15
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")
_REQUIRED_GROUPS = ("hypervisors", "control_plane")


class TopologyError(ValueError):
    """The topology file is inconsistent; the message says where."""


@dataclass(frozen=True)
class Network:
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    site: str | None
    routes: tuple[ipaddress.IPv4Network, ...] = ()
    address_var: str | None = None

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The lab machine's own address on the bridge: the site router."""
        return self.subnet.network_address + 1


@dataclass(frozen=True)
class Nic:
    index: int
    network: Network
    address: ipaddress.IPv4Address

    @property
    def name(self) -> str:
        return f"eth{self.index}"


@dataclass(frozen=True)
class Host:
    name: str
    site: str
    groups: tuple[str, ...]
    nics: tuple[Nic, ...]
    hypervisor: bool = False
    vars: dict = field(default_factory=dict)

    @property
    def address(self) -> ipaddress.IPv4Address:
        """The management address: the first NIC, on the site LAN."""
        return self.nics[0].address

    def veth(self, nic: Nic) -> str:
        """Host-side name of the veth pair for one NIC (used by faults)."""
        return f"{self.name}-{nic.index}"

    @property
    def veths(self) -> tuple[str, ...]:
        return tuple(self.veth(n) for n in self.nics)


@dataclass(frozen=True)
class Topology:
    supernet: ipaddress.IPv4Network
    control_plane_vip: ipaddress.IPv4Address
    sites: dict[str, str]
    networks: dict[str, Network]
    hosts: dict[str, Host]

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise TopologyError(
                f"unknown host {name!r}; lab hosts are: {', '.join(self.hosts)}"
            ) from None

    def site(self, name: str) -> str:
        if name not in self.sites:
            raise TopologyError(
                f"unknown site {name!r}; lab sites are: {', '.join(self.sites)}"
            )
        return name

    def hosts_in(self, site: str) -> list[Host]:
        return [h for h in self.hosts.values() if h.site == site]

    def bridges(self) -> list[str]:
        return [n.bridge for n in self.networks.values()]


def load(path: Path = DEFAULT_PATH) -> Topology:
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    try:
        return parse(raw)
    except TopologyError as e:
        raise TopologyError(f"{path}: {e}") from None


def parse(raw: dict) -> Topology:
    supernet = _network(raw.get("supernet"), "supernet")
    sites = {name: spec.get("description", name) for name, spec in raw.get("sites", {}).items()}
    if not sites:
        raise TopologyError("no sites defined")
    networks = {name: _parse_network(name, spec, sites, supernet)
                for name, spec in raw.get("networks", {}).items()}
    _check_unique("bridge", [(n.name, n.bridge) for n in networks.values()])
    _check_disjoint(networks)
    hosts = {name: _parse_host(name, spec, sites, networks)
             for name, spec in raw.get("hosts", {}).items()}
    if not hosts:
        raise TopologyError("no hosts defined")
    _check_unique("address", [(f"{h.name}/{n.name}", str(n.address))
                              for h in hosts.values() for n in h.nics])
    groups = {g for h in hosts.values() for g in h.groups}
    missing = [g for g in _REQUIRED_GROUPS if g not in groups]
    if missing:
        raise TopologyError(f"no host in group(s): {', '.join(missing)}")
    # Ansible warns on every run about a group named like a host, and a pattern then means both.
    clash = sorted(groups & hosts.keys())
    if clash:
        raise TopologyError(f"group(s) named like a host: {', '.join(clash)}")
    vip = _address(raw.get("control_plane_vip"), "control_plane_vip")
    if not any(vip in n.subnet and n.site is None for n in networks.values()):
        raise TopologyError(f"control_plane_vip {vip} is not on a shared network")
    return Topology(supernet, vip, sites, networks, hosts)


def _parse_network(name, spec, sites, supernet) -> Network:
    where = f"network {name!r}"
    bridge = spec.get("bridge", "")
    if not _NAME_RE.match(bridge) or len(bridge) > _IFNAME_MAX:
        raise TopologyError(f"{where}: bridge name {bridge!r} is not a valid interface name")
    subnet = _network(spec.get("subnet"), f"{where} subnet")
    if not subnet.subnet_of(supernet):
        raise TopologyError(f"{where}: subnet {subnet} is outside the supernet {supernet}")
    site = spec.get("site")
    if site is not None and site not in sites:
        raise TopologyError(f"{where}: unknown site {site!r}")
    routes = tuple(_network(r, f"{where} route") for r in spec.get("routes", []))
    for r in routes:
        if not r.subnet_of(supernet):
            raise TopologyError(f"{where}: route {r} is outside the supernet {supernet}")
    return Network(name, bridge, subnet, site, routes, spec.get("address_var"))


def _parse_host(name, spec, sites, networks) -> Host:
    where = f"host {name!r}"
    if not _NAME_RE.match(name):
        raise TopologyError(f"{where}: not a valid host name")
    site = spec.get("site")
    if site not in sites:
        raise TopologyError(f"{where}: unknown site {site!r}")
    nics = []
    for index, nic in enumerate(spec.get("nics", [])):
        net = networks.get(nic.get("network"))
        if net is None:
            raise TopologyError(f"{where}: NIC {index} is on unknown network {nic.get('network')!r}")
        if net.site not in (None, site):
            raise TopologyError(f"{where}: NIC {index} is on {net.name}, which belongs to site {net.site}")
        address = _address(nic.get("address"), f"{where} NIC {index}")
        if address not in net.subnet or address in (net.gateway, net.subnet.broadcast_address):
            raise TopologyError(f"{where}: address {address} is not a host address of {net.subnet}"
                                f" other than the gateway {net.gateway}")
        if len(f"{name}-{index}") > _IFNAME_MAX:
            raise TopologyError(f"{where}: name too long for veth {name}-{index}")
        nics.append(Nic(index, net, address))
    if not nics:
        raise TopologyError(f"{where}: no NICs")
    if nics[0].network.site != site:
        raise TopologyError(f"{where}: the first NIC must be on the site's own LAN")
    groups = tuple(spec.get("groups", []))
    return Host(name, site, groups, tuple(nics), bool(spec.get("hypervisor", False)),
                dict(spec.get("vars", {})))


def _network(value, what) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value)
    except (ValueError, TypeError):
        raise TopologyError(f"{what}: {value!r} is not an IPv4 network") from None


def _address(value, what) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except (ValueError, TypeError):
        raise TopologyError(f"{what}: {value!r} is not an IPv4 address") from None


def _check_unique(what, pairs):
    seen = {}
    for owner, value in pairs:
        if value in seen:
            raise TopologyError(f"{what} {value} is used by both {seen[value]} and {owner}")
        seen[value] = owner


def _check_disjoint(networks):
    nets = list(networks.values())
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            if a.subnet.overlaps(b.subnet):
                raise TopologyError(f"networks {a.name} and {b.name} overlap")
