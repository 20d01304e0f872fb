"""tandemd: runs every configured resource of this node.

- reads /etc/tandem/resources.d/*.toml (see docs/engine-config.md);
- serves each resource's volumes over NBD on a unix socket (optionally TCP),
  read-write only while the resource is Primary;
- answers `tandemctl` on a unix control socket with one JSON object per line.

Control requests: {"cmd": "status" | "primary" | "secondary" | "resolve" |
"verify" | "adjust" | "events", "resource": ..., "force": bool, "dry_run": bool,
"discard": node, "resync": bool}. Every reply has
"ok"; a refusal carries "error" with the engine's reason. "verify" answers when
the verify ends (a verify that stopped early: "ok": false, "error", and the
"volumes" it checked).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import grp
import json
import logging
import os
import re
import signal
import sys

from . import config as config_mod
from . import monitor as monitor_mod
from . import security
from .nbd import NBDServer
from .recovery import RecoveryPointError
from .resource import Resource, RoleError, StartError
from .rpstore import RPStoreError
from .verify import VerifyError

log = logging.getLogger("tandem.engine.daemon")
LABEL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,63}")

DEFAULT_CONFIG_DIR = "/etc/tandem/resources.d"
DEFAULT_STATE_DIR = "/var/lib/tandem"
DEFAULT_RUN_DIR = "/run/tandem"


class VolumeExport:
    """One volume of a resource, as the NBD server sees it."""

    def __init__(self, resource: Resource, number: int, name: str):
        self.resource, self.number, self.name = resource, number, name
        self.size = resource.vols[number].vol.size
        self.block_size = 4096

    @property
    def read_only(self) -> bool:
        return self.resource.role != "Primary"

    async def read(self, offset, length):
        return await self.resource.read(self.number, offset, length)

    def write(self, offset, data, fua):
        # Not a coroutine itself: the resource's is awaited directly (one frame less per write).
        if self.read_only:
            raise OSError(errno.EPERM, "not Primary")
        return self.resource.write(self.number, offset, data, fua)

    async def flush(self):
        await self.resource.flush(self.number)

    async def trim(self, offset, length, fua):
        # Advisory in NBD: keeping the old data is always allowed.
        if fua:
            await self.flush()

    async def write_zeroes(self, offset, length, fua, may_trim):
        chunk = 1 << 20
        zero = bytes(min(chunk, length))
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            await self.write(offset, zero[:n], fua and offset + n >= end)
            offset += n


class Daemon:
    def __init__(self, config_dir: str, state_dir: str, run_dir: str, monitor: dict | None = None):
        self.config_dir, self.state_dir, self.run_dir = config_dir, state_dir, run_dir
        #: {"listen": "HOST:PORT", "cert", "key", "ca", "control_clients"}: the monitor endpoint,
        #: or None.
        self.monitor_settings = monitor
        self.monitor: monitor_mod.MonitorServer | None = None
        self.resources: dict[str, Resource] = {}
        self.nbd: dict[str, list] = {}         # resource -> [NBDServer, ...]
        self.subscribers: set[asyncio.Queue] = set()
        self._control = None
        self._stopped = asyncio.Event()

    @property
    def control_path(self) -> str:
        return os.path.join(self.run_dir, "tandemd.sock")

    def nbd_socket(self, cfg) -> str:
        return cfg.nbd.socket or os.path.join(self.run_dir, f"{cfg.name}.nbd")

    def emit(self, event: dict) -> None:
        for q in list(self.subscribers):
            if q.full():
                self.subscribers.discard(q)      # a stuck reader must not hold the engine
            else:
                q.put_nowait(event)

    async def start(self) -> None:
        os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        desired = config_mod.load_directory(self.config_dir)
        for cfg in desired.values():
            try:
                await self._add(cfg)
            except (security.SecurityError, StartError) as e:
                # A missing or bad certificate, key, secret or backing file stops this
                # resource only; once it is fixed, `tandemctl adjust` starts it.
                log.error("resource %s not started:\n%s", cfg.name, e)
        # Before the control socket, whose appearance tells that tandemd is ready.
        if self.monitor_settings:
            m = self.monitor_settings
            host, port = monitor_mod.parse_listen(m["listen"])
            self.monitor = monitor_mod.MonitorServer(
                self, host, port, monitor_mod.server_context(m["cert"], m["key"], m["ca"]),
                control_clients=frozenset(m.get("control_clients") or ()))
            await self.monitor.start()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        self._control = await asyncio.start_unix_server(self._on_control, self.control_path)
        os.chmod(self.control_path, 0o600)
        log.info("tandemd started resources=%s control=%s", ",".join(self.resources) or "-",
                 self.control_path)

    async def stop(self) -> None:
        if self._control:
            self._control.close()
        if self.monitor:
            await self.monitor.close()
        for name in list(self.resources):
            await self._remove(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def _add(self, cfg) -> None:
        gid = _group_id(cfg)                 # before anything starts: nothing to undo
        res = Resource(cfg, state_dir=self.state_dir, emit=self.emit)
        await res.start()
        exports = {v.export: VolumeExport(res, v.number, v.export) for v in cfg.volumes}
        # The default export "" is the first volume, so `nbd+unix:///?socket=` works.
        exports.setdefault("", exports[cfg.volumes[0].export])

        def lookup(name: str):
            if "@" in name:                  # an exported RP or a drill clone: any role
                return res.rps.exports.get(name)
            export = exports.get(name)
            return export if export is not None and res.role == "Primary" else None

        def names() -> list[str]:
            live = [v.export for v in cfg.volumes] if res.role == "Primary" else []
            return live + sorted(res.rps.exports)

        server = NBDServer(lookup, list_exports=names)
        path = self.nbd_socket(cfg)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await server.start_unix(path, mode=0o660)
        if gid is not None:
            os.chown(path, -1, gid)
        if cfg.nbd.tcp is not None:
            await server.start_tcp(cfg.nbd.tcp.host, cfg.nbd.tcp.port)
        self.resources[cfg.name] = res
        self.nbd[cfg.name] = [server, path]

    async def _remove(self, name: str) -> None:
        server, path = self.nbd.pop(name)
        await server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await self.resources.pop(name).stop()

    # -- control socket ------------------------------------------------------

    async def _on_control(self, reader, writer) -> None:
        try:
            line = await reader.readline()
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except ValueError:
                await _reply(writer, {"ok": False, "error": "bad request: expected one JSON object"})
                return
            if req.get("cmd") == "events":
                await self._stream_events(writer)
                return
            try:
                reply = await self._handle(req)
            except (RoleError, RecoveryPointError, RPStoreError, config_mod.ConfigError, KeyError,
                    ValueError, StartError, security.SecurityError) as e:
                reply = {"ok": False, "error": e.args[0] if isinstance(e, KeyError) and e.args else str(e)}
            except Exception as e:
                # A bug, not a refusal: log it whole, but still answer, so that the
                # operator sees an error instead of a dropped connection.
                log.exception("control request failed request=%s", req.get("cmd"))
                reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
            await _reply(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        name = req.get("resource")
        if cmd == "status":
            names = [name] if name else sorted(self.resources)
            return {"ok": True, "resources": [self._res(n).status() for n in names]}
        if cmd == "primary":
            await self._res(name).promote(force=bool(req.get("force")))
            return {"ok": True, "resource": self._res(name).status()}
        if cmd == "secondary":
            await self._res(name).demote()
            return {"ok": True, "resource": self._res(name).status()}
        if cmd == "rp":
            return await self._rp(self._res(name), req)
        if cmd == "disconnect":
            await self._res(name).disconnect()
            return {"ok": True, "resource": self._res(name).status()}
        if cmd == "connect":
            self._res(name).connect()
            return {"ok": True, "resource": self._res(name).status()}
        if cmd == "resolve":
            await self._res(name).resolve(str(req.get("discard")))
            return {"ok": True, "resource": self._res(name).status()}
        if cmd == "verify":
            res = self._res(name)
            try:
                result = await res.verify(resync=bool(req.get("resync")))
            except VerifyError as e:
                return {"ok": False, "error": str(e), "resource": name, "volumes": e.volumes}
            return {"ok": True, "resource": name, **result}
        if cmd == "adjust":
            return await self._adjust(name, bool(req.get("dry_run")))
        raise ValueError(f"unknown command {cmd!r}")

    async def _rp(self, res: Resource, req: dict) -> dict:
        op, rp_id = req.get("op"), req.get("id")
        if op == "list":
            return {"ok": True, "recovery_points": res.rp_list()}
        if op == "create":
            labels = req.get("labels") or {}
            if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
                raise ValueError("labels must map names to strings")
            return {"ok": True, "recovery_point": await res.rp_create(labels)}
        if not isinstance(rp_id, str) and op != "clone-delete":
            raise ValueError(f"rp {op}: an RP id is required")
        if op == "label":
            labels = req.get("labels") or {}
            if not isinstance(labels, dict) or not labels or not all(
                    isinstance(k, str) and LABEL_KEY.fullmatch(k) and (v is None or isinstance(v, str))
                    and len(v or "") <= 256 for k, v in labels.items()):
                raise ValueError("labels must map names ([a-z][a-z0-9_.-]*) to strings of at most 256 "
                                 "characters, or to null to remove one")
            return {"ok": True, "recovery_point": await res.rp_label(rp_id, labels)}
        if op == "delete":
            await res.rp_delete(rp_id)
            return {"ok": True, "deleted": rp_id}
        if op == "export":
            return {"ok": True, "exports": res.rp_export(rp_id), "socket": self.nbd[res.name][1]}
        if op == "unexport":
            return {"ok": True, "unexported": res.rp_unexport(rp_id)}
        if op == "restore":
            return {"ok": True, **await res.rp_restore(rp_id), "resource": res.status()}
        if op == "clone":
            return {"ok": True, "exports": await res.rp_clone(rp_id, str(req.get("name"))),
                    "socket": self.nbd[res.name][1]}
        if op == "clone-delete":
            await res.rp_clone_delete(str(req.get("name")))
            return {"ok": True, "deleted_clone": req.get("name")}
        raise ValueError(f"unknown rp operation {op!r}")

    def _res(self, name) -> Resource:
        if name not in self.resources:
            raise KeyError(f"no resource {name!r} on this node")
        return self.resources[name]

    async def _adjust(self, only: str | None, dry_run: bool) -> dict:
        desired = config_mod.load_directory(self.config_dir)
        running = {n: r.cfg for n, r in self.resources.items()}
        if only:
            desired = {k: v for k, v in desired.items() if k == only}
            running = {k: v for k, v in running.items() if k == only}
        actions = config_mod.diff(running, desired)
        plan = [{"kind": a.kind, "resource": a.resource, "detail": dict(a.detail)} for a in actions]
        if dry_run or not actions:
            return {"ok": True, "changed": bool(actions), "actions": plan, "dry_run": dry_run}
        for name in sorted({a.resource for a in actions}):
            kinds = {a.kind for a in actions if a.resource == name}
            if "remove-resource" in kinds:
                if self.resources[name].role == "Primary":
                    raise RoleError(f"{name}: demote it before removing it")
                await self._remove(name)
            elif "add-resource" in kinds:
                await self._add(desired[name])
            elif _online(kinds, [a for a in actions if a.resource == name]) and not any(
                    a.needs_down for a in actions if a.resource == name):
                if "change-nbd" in kinds:          # the socket's group only (_online)
                    gid = _group_id(desired[name])
                    os.chown(self.nbd[name][1], -1, os.getgid() if gid is None else gid)
                if "change-security" in kinds:
                    # New files first (SecurityError: nothing changed), then a reconnect.
                    await self.resources[name].change_security(desired[name])
                self.resources[name].cfg = desired[name]    # read at use: effective at once
            else:
                # Any other change (0.1): restart the resource with the new file.
                # A Primary keeps its role only through a demote by the operator.
                if self.resources[name].role == "Primary":
                    raise RoleError(f"{name}: is Primary; demote it to apply {', '.join(sorted(kinds))}")
                security.load(desired[name])        # unusable TLS files or secret: keep it running
                await self._remove(name)
                await self._add(desired[name])
        return {"ok": True, "changed": True, "actions": plan, "dry_run": False}

    async def _stream_events(self, writer) -> None:
        q: asyncio.Queue = asyncio.Queue(maxsize=10000)
        self.subscribers.add(q)
        try:
            for res in self.resources.values():
                await _reply(writer, {"ts": None, "resource": res.name, "event": "exists",
                                      **{k: v for k, v in res.status().items() if k != "stats"}})
            while True:
                await _reply(writer, await q.get())
        finally:
            self.subscribers.discard(q)


def _group_id(cfg) -> int | None:
    """The gid of the resource's nbd.group, or None; StartError if the group does not exist here."""
    if cfg.nbd.group is None:
        return None
    try:
        return grp.getgrnam(cfg.nbd.group).gr_gid
    except KeyError:
        raise StartError(f"resource {cfg.name!r}: nbd.group {cfg.nbd.group!r} is not a group on this host") \
            from None


def _online(kinds: set[str], actions) -> bool:
    """Changes a running resource takes without a restart: tunables, security files, and the
    NBD socket's group (a chown)."""
    if not kinds <= {"change-tunables", "change-security", "change-nbd"}:
        return False
    return all(set(a.detail) == {"group"} for a in actions if a.kind == "change-nbd")


async def _reply(writer, obj: dict) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tandemd", description="Tandem DR replication engine")
    p.add_argument("--config-dir", default=os.environ.get("TANDEM_CONFIG_DIR", DEFAULT_CONFIG_DIR))
    p.add_argument("--state-dir", default=os.environ.get("TANDEM_STATE_DIR", DEFAULT_STATE_DIR))
    p.add_argument("--run-dir", default=os.environ.get("TANDEM_RUN_DIR", DEFAULT_RUN_DIR))
    p.add_argument("--log-level", default="INFO")
    m = p.add_argument_group("monitor endpoint", "read-only status and events over mutual TLS; "
                             "off unless --monitor-listen is given (docs/engine.md, Monitoring)")
    m.add_argument("--monitor-listen", metavar="HOST:PORT")
    m.add_argument("--monitor-cert", help="this node's certificate (PEM)")
    m.add_argument("--monitor-key", help="its private key (PEM, unencrypted)")
    m.add_argument("--monitor-ca", help="CA bundle the clients' certificates must chain to")
    m.add_argument("--control-clients", metavar="CN[,CN...]", default="",
                   help="subject CNs of the monitor clients (tandem-center) that may also create and "
                        "delete their own scheduled recovery points (rp-create, rp-delete); off by default")
    args = p.parse_args(argv)
    monitor = None
    control_clients = [c.strip() for c in args.control_clients.split(",") if c.strip()]
    if control_clients and not args.monitor_listen:
        p.error("--control-clients needs the monitor endpoint (--monitor-listen)")
    if args.monitor_listen:
        if not (args.monitor_cert and args.monitor_key and args.monitor_ca):
            p.error("--monitor-listen needs --monitor-cert, --monitor-key and --monitor-ca")
        monitor = {"listen": args.monitor_listen, "cert": args.monitor_cert, "key": args.monitor_key,
                   "ca": args.monitor_ca, "control_clients": control_clients}
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    daemon = Daemon(args.config_dir, args.state_dir, args.run_dir, monitor=monitor)

    async def run() -> int:
        try:
            await daemon.start()
        except config_mod.ConfigError as e:
            log.error("configuration error:\n%s", e)
            return 2
        except (monitor_mod.MonitorError, OSError) as e:
            log.error("monitor endpoint: %s", e)
            await daemon.stop()
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(daemon.stop()))
        await daemon.wait()
        log.info("tandemd stopped")
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
