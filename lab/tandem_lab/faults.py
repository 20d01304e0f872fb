"""Reversible faults for tests and the demo.

Network faults are nft rules (tagged with a comment that names the fault)
and tc qdiscs on the host-side veths; host faults are container states. The
machine itself is the record: `active()` reads the rules, qdiscs and states
back, so `lab status` never disagrees with what is really in force.
"""

from __future__ import annotations

import json
import re

from . import network, render
from .containers import Containers
from .paths import Paths
from .system import run, step
from .topology import Topology, TopologyError

FAMILY, TABLE = network.FAULTS_TABLE
_RATE_RE = re.compile(r"^\d+(\.\d+)?(bit|kbit|mbit|gbit)$")


def _pair(topo: Topology, a: str, b: str) -> tuple[str, str]:
    topo.site(a), topo.site(b)
    if a == b:
        raise TopologyError("a fault between a site and itself makes no sense; name two sites")
    return tuple(sorted((a, b)))  # type: ignore[return-value]


REPLICATION_VAR = "tandem_replication_address"


def _ports(topo: Topology, site: str, replication_only: bool = False) -> str:
    ports = [h.veth(n) for h in topo.hosts_in(site) for n in h.nics
             if not replication_only or n.network.address_var == REPLICATION_VAR]
    if not ports:
        raise TopologyError(f"site {site} has no replication network")
    return "{ " + ", ".join(f'"{p}"' for p in ports) + " }"


def _require_table() -> None:
    if not network.table_exists(FAMILY, TABLE):
        raise RuntimeError("the lab is not up (no fault table); run `make lab-up` first")


def _add_rule(chain: str, expr: str, comment: str) -> None:
    run(["nft", "add", "rule", FAMILY, TABLE, chain, *expr.split(), "counter", "drop",
         "comment", f'"{comment}"'])


def _delete_rules(match) -> list[str]:
    removed = []
    for rule in network.list_rules(FAMILY, TABLE):
        comment = rule.get("comment", "")
        if comment and match(comment):
            run(["nft", "delete", "rule", FAMILY, TABLE, rule["chain"], "handle", str(rule["handle"])])
            removed.append(comment)
    return sorted(set(removed))


def _comments() -> set[str]:
    return {r["comment"] for r in network.list_rules(FAMILY, TABLE) if r.get("comment")}


# -- network faults ----------------------------------------------------------

def partition(topo: Topology, a: str, b: str, replication_only: bool = False) -> bool:
    """Drop every packet between the hosts of two sites (routed and bridged), or with
    `replication_only` only what goes to the other site's replication networks: the data link
    between the hypervisors, with management and the control plane left up."""
    a, b = _pair(topo, a, b)
    ports = {site: _ports(topo, site, replication_only) for site in (a, b)}
    _require_table()
    tag = f"partition {a} {b}" + (" replication" if replication_only else "")
    if tag in _comments():
        return False
    marks = render.site_marks(topo)
    for src, dst in ((a, b), (b, a)):
        _add_rule("postrouting", f"meta mark {marks[src]} oifname {ports[dst]}", tag)
    step(f"partitioned site {a} from site {b}" + (" (replication networks only)" if replication_only else ""))
    return True


def loss(topo: Topology, a: str, b: str, percent: int) -> None:
    """Drop `percent`% of packets between two sites, at random (nft numgen)."""
    if not 0 < percent < 100:
        raise ValueError("loss must be a percentage between 1 and 99 (use partition for 100)")
    a, b = _pair(topo, a, b)
    _require_table()
    prefix = f"loss {a} {b} "
    _delete_rules(lambda c: c.startswith(prefix))
    marks = render.site_marks(topo)
    for src, dst in ((a, b), (b, a)):
        _add_rule("postrouting", f"meta mark {marks[src]} oifname {_ports(topo, dst)} "
                  f"numgen random mod 100 < {percent}", f"{prefix}{percent}%")
    step(f"{percent}% packet loss between site {a} and site {b}")


def isolate(topo: Topology, host: str) -> bool:
    """Cut one host off from everything, the lab machine included."""
    h = topo.host(host)
    _require_table()
    tag = f"isolate {h.name}"
    if tag in _comments():
        return False
    ports = "{ " + ", ".join(f'"{p}"' for p in h.veths) + " }"
    _add_rule("prerouting", f"iifname {ports}", tag)
    _add_rule("postrouting", f"oifname {ports}", tag)
    step(f"{h.name} cut off")
    return True


def ratelimit(topo: Topology, a: str, b: str, rate: str) -> None:
    """Shape traffic between two sites to `rate` in each direction (tbf).

    The limit is applied on the egress of each receiving host's veth, so it
    holds per receiving host. Traffic from the lab machine (Ansible, tests)
    is not shaped.
    """
    if not _RATE_RE.match(rate):
        raise ValueError(f"rate {rate!r}: use a tc rate such as 512kbit, 10mbit or 1gbit")
    a, b = _pair(topo, a, b)
    _require_table()
    marks = render.site_marks(topo)
    for src, dst in ((a, b), (b, a)):
        for port in _ports_of(topo, dst):
            limits = _read_limits(port)
            limits[marks[src]] = rate
            _apply_limits(port, limits)
    step(f"rate limit {rate} between site {a} and site {b}")


def heal(topo: Topology, a: str | None = None, b: str | None = None) -> list[str]:
    """Remove network faults: all of them, one site pair's, or one host's isolation."""
    if a and b is None and a in topo.hosts:
        return _delete_rules(lambda c: c == f"isolate {a}")
    if a or b:
        a, b = _pair(topo, a or "", b or "")
        removed = _delete_rules(lambda c: c.split()[1:3] == [a, b])
        marks = render.site_marks(topo)
        for src, dst in ((a, b), (b, a)):
            for port in _ports_of(topo, dst):
                limits = _read_limits(port)
                if limits.pop(marks[src], None):
                    _apply_limits(port, limits)
                    removed.append(f"ratelimit {a} {b}")
        return sorted(set(removed))
    removed = _delete_rules(lambda c: True)
    removed += [f"ratelimit on {p}" for p in clear_tc(topo)]
    return removed


def clear_tc(topo: Topology) -> list[str]:
    cleared = []
    for h in topo.hosts.values():
        for port in h.veths:
            if _read_limits(port):
                run(["tc", "qdisc", "del", "dev", port, "root"], check=False)
                cleared.append(port)
    return cleared


def _ports_of(topo: Topology, site: str) -> list[str]:
    return [p for h in topo.hosts_in(site) for p in h.veths]


def _read_limits(port: str) -> dict[int, str]:
    """{source site mark: rate} from the tbf qdiscs on one veth."""
    proc = run(["tc", "-j", "qdisc", "show", "dev", port], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return {}
    limits = {}
    for q in json.loads(proc.stdout):
        parent = q.get("parent", "")
        if q.get("kind") == "tbf" and parent.startswith("1:"):
            limits[int(parent[2:]) - 10] = _format_rate(q["options"]["rate"])
    return limits


def _format_rate(bytes_per_s: int) -> str:
    bits = bytes_per_s * 8
    for unit, size in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits >= size and bits % size == 0:
            return f"{bits // size}{unit}"
    return f"{bits}bit"


def _apply_limits(port: str, limits: dict[int, str]) -> None:
    """Rebuild one veth's qdisc tree: unshaped by default, tbf per source site.

    Packets carry their source site as the mark set by the fault table, and
    u32 classifies on it (this kernel has no fw classifier).
    """
    run(["tc", "qdisc", "del", "dev", port, "root"], check=False)
    if not limits:
        return
    tc = ["tc"]
    run(tc + ["qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "1",
              "r2q", "100000"])
    run(tc + ["class", "add", "dev", port, "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit"])
    for mark, rate in sorted(limits.items()):
        cls = f"1:{10 + mark}"
        run(tc + ["class", "add", "dev", port, "parent", "1:", "classid", cls, "htb", "rate", "10gbit"])
        run(tc + ["qdisc", "add", "dev", port, "parent", cls, "handle", f"{10 + mark}:", "tbf",
                  "rate", rate, "burst", "32kbit", "latency", "400ms"])
        run(tc + ["filter", "add", "dev", port, "parent", "1:", "protocol", "ip", "prio", "1",
                  "u32", "match", "mark", str(mark), "0xffffffff", "flowid", cls])


# -- host faults ---------------------------------------------------------------

def crash(topo: Topology, paths: Paths, host: str) -> None:
    """Kill a host outright (lxc-stop -k): no shutdown, no flush."""
    h = topo.host(host)
    Containers(paths).kill(h.name)
    step(f"{h.name} crashed")


def start(topo: Topology, paths: Paths, host: str) -> float:
    h = topo.host(host)
    lxc = Containers(paths)
    if lxc.state(h.name) == "ABSENT":
        raise RuntimeError(f"{h.name} does not exist; run `make lab-up`")
    lxc.start(h.name)
    seconds = lxc.wait_booted([h.name])[h.name]
    step(f"{h.name} is running again ({seconds:.1f}s)")
    return seconds


def restart(topo: Topology, paths: Paths, host: str) -> float:
    crash(topo, paths, host)
    return start(topo, paths, host)


def freeze(topo: Topology, paths: Paths, host: str) -> None:
    """Hang a host: every process stops, the kernel still answers ping."""
    Containers(paths).freeze(topo.host(host).name)
    step(f"{host} frozen")


def thaw(topo: Topology, paths: Paths, host: str) -> None:
    Containers(paths).thaw(topo.host(host).name)
    step(f"{host} thawed")


# -- what is in force ------------------------------------------------------------

def active(topo: Topology, paths: Paths) -> list[dict]:
    found = []
    for comment in sorted(_comments()):
        kind, *args = comment.split()
        if kind == "partition":
            found.append({"fault": "partition", "sites": args[:2],
                          **({"networks": "replication"} if args[2:] == ["replication"] else {})})
        elif kind == "loss":
            found.append({"fault": "loss", "sites": args[:2], "percent": int(args[2].rstrip("%"))})
        elif kind == "isolate":
            found.append({"fault": "isolate", "host": args[0]})
    marks = {m: s for s, m in render.site_marks(topo).items()}
    limits = set()
    for h in topo.hosts.values():
        for port in h.veths:
            for mark, rate in _read_limits(port).items():
                pair = tuple(sorted((marks.get(mark, "?"), h.site)))
                limits.add((pair, rate))
    for pair, rate in sorted(limits):
        found.append({"fault": "ratelimit", "sites": list(pair), "rate": rate})
    lxc = Containers(paths)
    for h in topo.hosts.values():
        state = lxc.state(h.name)
        if state == "STOPPED":
            found.append({"fault": "crashed", "host": h.name})
        elif state == "FROZEN":
            found.append({"fault": "frozen", "host": h.name})
    return found


def describe(fault: dict) -> str:
    if "sites" in fault:
        extra = (fault.get("rate") or (f"{fault['percent']}%" if "percent" in fault else "")
                 or (f"({fault['networks']} networks)" if "networks" in fault else ""))
        return f"{fault['fault']} {' <-> '.join(fault['sites'])} {extra}".strip()
    return f"{fault['fault']} {fault['host']}"

