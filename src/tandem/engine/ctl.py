"""tandemctl: the admin CLI of tandemd (JSON with --json, a readable view without).

Exit codes: 0 ok, 1 the engine refused (the reason is printed), 2 usage or
connection problems.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

DEFAULT_SOCKET = os.path.join(os.environ.get("TANDEM_RUN_DIR", "/run/tandem"), "tandemd.sock")


def request(path: str, req: dict, timeout: float | None = 300) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_status(resources: list[dict]) -> None:
    for r in resources:
        print(f"{r['name']} role:{r['role']} connection:{r['connection']} "
              f"peer:{r['peer']} peer-role:{r['peer_role']} protocol:{r['protocol']}")
        for v in r["volumes"]:
            line = (f"  volume:{v['volume']} disk:{v['disk']} peer-disk:{v['peer_disk']} "
                    f"replication:{v['replication']}")
            if "verify_percent" in v:
                line += f" verify:{v['verify_percent']}%"
            if "sync_percent" in v:
                eta = v.get("sync_eta_seconds")
                line += f" done:{v['sync_percent']}%" + (f" eta:{eta}s" if eta is not None else "")
            line += (f" out-of-sync:{_human_size(v['out_of_sync_bytes'])}"
                     f" in-flight:{_human_size(v['in_flight_bytes'])}"
                     f" latency:{v['write_latency_us']}us gi:{v['generation']['current']}")
            print(line)
        if r.get("degraded"):
            d = r["degraded"]
            print(f"  degraded:{d['kind']} since:{time.strftime('%H:%M:%S', time.localtime(d['since']))} "
                  f"reason:{d['reason']}")
        rpo = r.get("rpo") or {"bytes": 0, "seconds": 0}
        if rpo["bytes"]:
            print(f"  rpo-exposure:{_human_size(rpo['bytes'])} oldest:{rpo['seconds']}s")
        rps = r.get("recovery_points")
        if rps and rps["count"]:
            last = rps["last"]
            print(f"  recovery-points:{rps['count']} last:{last['id']} "
                  f"({last['reason']}, {last['age_seconds']}s)")


def print_rp(op: str, reply: dict) -> None:
    if op == "list":
        for m in reply["recovery_points"]:
            print(f"{m['id']} reason:{m['reason']} consistent:{'yes' if m['consistent'] else 'no'} "
                  f"age:{m['age_seconds']}s role:{m['role']} used:{_human_size(m['bytes_used'])}"
                  + (f" storage:{','.join(m['storage'])}" if m.get("storage") else "")
                  + (f" exported:{','.join(m['exported'])}" if m["exported"] else "")
                  + (f" clones:{','.join(m['clones'])}" if m["clones"] else ""))
        if not reply["recovery_points"]:
            print("no recovery points")
    elif op == "create":
        m = reply["recovery_point"]
        print(f"created {m['id']} consistent:{'yes' if m['consistent'] else 'no'}")
    elif op == "label":
        m = reply["recovery_point"]
        print(f"{m['id']} " + " ".join(f"{k}={v}" for k, v in sorted(m["labels"].items())))
    elif op in ("export", "clone"):
        for name in reply["exports"]:
            print(f"nbd+unix:///{name}?socket={reply['socket']}")
    elif op == "restore":
        print(f"restored {reply['id']}: {_human_size(reply['restored_bytes'])} rewritten")
    else:
        print(json.dumps({k: v for k, v in reply.items() if k != "ok"}))


def print_verify(reply: dict) -> None:
    for v in reply["volumes"]:
        print(f"{reply['resource']} volume:{v['volume']} checked:{_human_size(v['checked_bytes'])} "
              f"out-of-sync:{_human_size(v['out_of_sync_bytes'])} in {v['seconds']}s")
        for offset, length in v["ranges"][:10]:
            print(f"  out of sync: offset {offset} length {length}")
        more = len(v["ranges"]) - 10
        if more > 0 or v.get("ranges_truncated"):
            print(f"  ... {'more than ' if v.get('ranges_truncated') else ''}{max(more, 0)} more ranges "
                  "(--json lists up to 1000)")
    if not reply.get("ok"):
        return
    if reply.get("resync_started"):
        print("resync: the out-of-sync blocks are in the bitmap and the connection was dropped; "
              "the reconnect resyncs them (see `tandemctl status`)")
    elif reply.get("out_of_sync_bytes"):
        print(f"run `tandemctl verify {reply['resource']} --resync` to resync them")
    else:
        print("in sync")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tandemctl", description="Administer tandemd")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="tandemd's control socket")
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="state of one or all resources")
    st.add_argument("resource", nargs="?")
    st.add_argument("--json", action="store_true")
    pr = sub.add_parser("primary", help="promote a resource")
    pr.add_argument("resource")
    pr.add_argument("--force", action="store_true",
                    help="promote even without the peer (disaster failover) or with Inconsistent data")
    se = sub.add_parser("secondary", help="demote a resource")
    se.add_argument("resource")
    rv = sub.add_parser("resolve", help="after a split brain: discard one node's changes and reconnect")
    rv.add_argument("resource")
    rv.add_argument("--discard", required=True, metavar="NODE",
                    help="the node whose changes since the split are thrown away (it becomes sync target)")
    dc = sub.add_parser("disconnect", help="drop the link and stay StandAlone")
    dc.add_argument("resource")
    cn = sub.add_parser("connect", help="leave StandAlone and connect to the peer")
    cn.add_argument("resource")
    rp = sub.add_parser("rp", help="recovery points: list, create, delete, export, restore, clone")
    rps = rp.add_subparsers(dest="op", required=True)
    rp_parsers = []
    for op, help_, args_ in (
            ("list", "the resource's recovery points", ()),
            ("create", "take a crash-consistent recovery point of every volume now", ()),
            ("delete", "delete a recovery point", ("id",)),
            ("label", "set labels of a recovery point (KEY= removes one), e.g. tested=... after a drill",
             ("id",)),
            ("export", "serve a recovery point read-only over NBD (<export>@<id>)", ("id",)),
            ("unexport", "stop serving a recovery point", ("id",)),
            ("restore", "roll this node (Secondary, StandAlone) back to a recovery point", ("id",)),
            ("clone", "a writable copy for a drill, served as <export>@clone-<name>", ("id", "name")),
            ("clone-delete", "delete a drill clone", ("name",))):
        sp = rps.add_parser(op, help=help_)
        sp.add_argument("resource")
        for a in args_:
            sp.add_argument(a)
        sp.add_argument("--json", action="store_true")
        rp_parsers.append(sp)
        if op in ("create", "label"):
            sp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                            required=op == "label")
    vf = sub.add_parser("verify", help="compare the data of both nodes online, block by block")
    vf.add_argument("resource")
    vf.add_argument("--resync", action="store_true",
                    help="resync the blocks that differ (drops and re-establishes the connection)")
    ad = sub.add_parser("adjust", help="make the running resources match the resource files")
    ad.add_argument("resource", nargs="?")
    ad.add_argument("--dry-run", action="store_true", help="print the planned actions only")
    sub.add_parser("events", help="stream state changes as JSON lines")
    va = sub.add_parser("validate", help="check a resource directory with the loader (no daemon needed)")
    va.add_argument("--config-dir", default=os.environ.get("TANDEM_CONFIG_DIR", "/etc/tandem/resources.d"),
                    help="the resource directory to load (default: %(default)s)")
    va.add_argument("--json", action="store_true")
    for sp in (pr, se, rv, dc, cn, vf, ad):
        sp.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "validate":
        return _validate(args.config_dir, args.json)

    req = {"cmd": args.cmd}
    if getattr(args, "resource", None):
        req["resource"] = args.resource
    if getattr(args, "force", False):
        req["force"] = True
    if getattr(args, "dry_run", False):
        req["dry_run"] = True
    if getattr(args, "discard", None):
        req["discard"] = args.discard
    if args.cmd == "rp":
        req["op"] = args.op
        for key in ("id", "name"):
            if getattr(args, key, None) is not None:
                req[key] = getattr(args, key)
        if getattr(args, "label", None):
            bad = [item for item in args.label if "=" not in item]
            if bad:
                p.error(f"--label expects KEY=VALUE, got {bad[0]!r}")
            req["labels"] = dict(item.split("=", 1) for item in args.label)
            if args.op == "label":                  # KEY= removes the label
                req["labels"] = {k: (v if v != "" else None) for k, v in req["labels"].items()}
    if getattr(args, "resync", False):
        req["resync"] = True
    try:
        if args.cmd == "events":
            return _events(args.socket)
        # A verify answers when it ends: as long as the volumes take at the resync rate.
        reply = request(args.socket, req, timeout=None if args.cmd == "verify" else 300)
    except (OSError, ValueError) as e:
        print(f"tandemctl: cannot talk to tandemd at {args.socket}: {e}", file=sys.stderr)
        return 2
    if not reply.get("ok"):
        if getattr(args, "json", False):
            print(json.dumps(reply))
        elif args.cmd == "verify" and reply.get("volumes"):
            print_verify(reply)
        print(f"tandemctl {args.cmd}: {reply.get('error')}", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(reply, indent=2))
    elif args.cmd == "status":
        print_status(reply["resources"])
    elif args.cmd == "rp":
        print_rp(args.op, reply)
    elif args.cmd == "verify":
        print_verify(reply)
    elif args.cmd == "adjust":
        for action in reply["actions"]:
            print(f"{'would ' if reply['dry_run'] else ''}{action['kind']} {action['resource']}")
        if not reply["actions"]:
            print("nothing to do")
    else:
        print_status([reply["resource"]])
    return 0


def _validate(config_dir: str, as_json: bool) -> int:
    """Load config_dir like tandemd and adjust do, without contacting the daemon.

    0: valid ({"ok": true, "resources": [names]}); 1: the loader's errors, verbatim.
    """
    from . import config  # only here: the other commands need nothing but the socket

    try:
        resources = config.load_directory(config_dir)
    except config.ConfigError as e:
        if as_json:
            print(json.dumps({"ok": False, "errors": str(e),
                              "problems": [{"source": p.source, "key": p.key, "message": p.message}
                                           for p in e.problems]}, indent=2))
        print(f"tandemctl validate: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"ok": True, "resources": sorted(resources)}, indent=2))
    else:
        print(f"{config_dir}: {len(resources)} resource(s) valid" + (": " + ", ".join(sorted(resources))
                                                                    if resources else ""))
    return 0


def _events(path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(b'{"cmd": "events"}\n')
        f = s.makefile("r")
        try:
            for line in f:
                sys.stdout.write(line)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
