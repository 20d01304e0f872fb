"""`lab/labctl`: bring the lab up or down, inject and heal faults, show status."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import faults, guest, lab
from .paths import Paths
from .system import CommandError
from .topology import TopologyError, load


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="labctl",
        description="The Tandem DR lab: LXC hosts on one machine, two sites and a witness site.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="create or update the lab (idempotent)")
    up.add_argument("--data-fs", choices=("dir", "xfs"),
                    default=os.environ.get("TANDEM_LAB_DATA_FS", "dir"),
                    help="hypervisor data on plain directories or on XFS with reflink (loop device)")
    sub.add_parser("down", help="remove everything the lab made (keeps the rootfs cache)")
    g = sub.add_parser("guest-image", help="build the lab guest image (kernel + busybox initramfs) "
                       "into the cache; with HOST..., also copy it into those lab hosts")
    g.add_argument("hosts", nargs="*", metavar="HOST")
    g.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
    st = sub.add_parser("status", help="hosts, networks and active faults")
    st.add_argument("--json", action="store_true")

    f = sub.add_parser("partition", help="cut all traffic between two sites")
    f.add_argument("site_a"), f.add_argument("site_b")
    f.add_argument("--replication", action="store_true",
                   help="only the replication networks (the hypervisors' data link)")
    f = sub.add_parser("heal", help="remove network faults: all, a site pair's, or a host's isolation")
    f.add_argument("target", nargs="*", metavar="SITE|HOST")
    f = sub.add_parser("isolate", help="cut one host off the network")
    f.add_argument("host")
    f = sub.add_parser("loss", help="drop PERCENT%% of packets between two sites")
    f.add_argument("site_a"), f.add_argument("site_b"), f.add_argument("percent", type=int)
    f = sub.add_parser("ratelimit", help="shape traffic between two sites (tbf), e.g. 10mbit")
    f.add_argument("site_a"), f.add_argument("site_b"), f.add_argument("rate")
    for name, text in (("crash", "kill a host (lxc-stop -k)"),
                       ("start", "start a stopped host and wait until it has booted"),
                       ("restart", "crash a host, then start it again"),
                       ("freeze", "freeze every process of a host"),
                       ("thaw", "thaw a frozen host")):
        f = sub.add_parser(name, help=text)
        f.add_argument("host")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    paths = Paths.from_env()
    try:
        topo = load()
        return _dispatch(args, topo, paths)
    except (TopologyError, guest.GuestImageError, ValueError, RuntimeError, CommandError, TimeoutError) as e:
        print(f"labctl {args.cmd}: {e}", file=sys.stderr)
        return 1


def _dispatch(args, topo, paths) -> int:
    cmd = args.cmd
    if cmd == "up":
        result = lab.up(topo, paths, data_fs=args.data_fs)
        print(json.dumps({"lab": "up", **result}))
    elif cmd == "down":
        lab.down(topo, paths)
    elif cmd == "guest-image":
        info = guest.build(paths, force=args.force)
        info["hosts"] = {h: guest.push(paths, h, info) for h in args.hosts}
        print(json.dumps(info, indent=2))
    elif cmd == "status":
        st = lab.status(topo, paths)
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            _print_status(st)
    elif cmd == "partition":
        faults.partition(topo, args.site_a, args.site_b, replication_only=args.replication)
    elif cmd == "heal":
        if len(args.target) not in (0, 1, 2):
            raise ValueError("heal takes nothing, one host, or two sites")
        removed = faults.heal(topo, *args.target)
        print("healed: " + (", ".join(removed) if removed else "nothing was active"))
    elif cmd == "isolate":
        faults.isolate(topo, args.host)
    elif cmd == "loss":
        faults.loss(topo, args.site_a, args.site_b, args.percent)
    elif cmd == "ratelimit":
        faults.ratelimit(topo, args.site_a, args.site_b, args.rate)
    else:
        getattr(faults, cmd)(topo, paths, args.host)
    return 0


def _print_status(st: dict) -> None:
    print("hosts:")
    for name, h in st["hosts"].items():
        mem = h.get("memory")
        mem_text = (f"rss+shmem {(mem['rss'] + mem['shmem']) / 2**20:5.1f} MiB, "
                    f"cache {mem['cache'] / 2**20:5.1f} MiB") if mem else "-"
        print(f"  {name:<8} {h['state']:<8} site {h['site']}  {h['address']:<15} "
              f"{', '.join(h['groups']):<22} {mem_text}")
    missing = [b for b, present in st["bridges"].items() if not present]
    print(f"bridges: {'all present' if not missing else 'missing ' + ', '.join(missing)}")
    print(f"image: {st['image']}   data: {st['data_fs'] or '-'}   "
          f"inventory: {st['inventory'] or '-'}")
    print("faults:" + ("" if st["faults"] else " none"))
    for fault in st["faults"]:
        print(f"  {faults.describe(fault)}")
