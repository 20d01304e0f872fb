"""tandemd's read-only monitor endpoint: mutual TLS over TCP, off unless configured.

    tandemd --monitor-listen HOST:PORT --monitor-cert FILE --monitor-key FILE --monitor-ca FILE

A client sends one JSON object on one line and gets JSON lines back, as on the control
socket, but only two requests are served:

- {"cmd": "status"} or {"cmd": "status", "resource": NAME}: one reply, then the server closes;
- {"cmd": "events"}: an "exists" line per resource, then every engine event as it happens,
  until the client goes away.

- {"cmd": "rp-list", "resource": NAME}: the resource's recovery points (as `tandemctl rp list`).

With --control-clients CN[,CN...] (off by default) the clients whose certificate's subject
CN is in that list may also ask for the two things tandem-center's RP schedule needs, and
nothing else (no role change, no restore, no other RP):

- {"cmd": "rp-create", "resource": NAME, "id": "center-...", "not_after": EPOCH}: a
  crash-consistent RP of every volume with that id, reason "center"; idempotent (an existing
  center RP of that id is returned with "created": false), so a retried slot never makes a
  second RP. With the optional not_after (Unix seconds), a new RP is refused with
  {"ok": false, "late": true, ...} and nothing written if this node's clock has reached it
  when the RP would be stamped: a schedule slot's RP is inside its window or not taken;
- {"cmd": "rp-delete", "resource": NAME, "id": "center-..."}: delete such an RP ("deleted":
  false if it is already gone); refused for an RP of any other reason and for a labelled one.

Anything else gets {"ok": false, "error": ...} and the connection is closed. The client must
present a certificate that chains to --monitor-ca (TLS 1.3 only). Hostile clients are
bounded: a TLS handshake and the request line each have a timeout, the request line a size
limit, the number of connections a cap, an events reader that stops reading is dropped once
the engine's queue or the write timeout says so, and one that closes its side (or sends
anything more) ends its stream at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl

from .config import finite_number
from .recovery import RecoveryPointError, RecoveryPointTooLate
from .rpstore import RPStoreError

log = logging.getLogger("tandem.engine.monitor")

MAX_LINE = 4096            # a request is a few dozen bytes
REQUEST_TIMEOUT = 5.0      # seconds for the TLS handshake and for the request line
WRITE_TIMEOUT = 30.0       # a reader that takes longer than this to take a line is dropped
MAX_CLIENTS = 64
EVENT_QUEUE = 10000
#: Ids the control permission may create or delete: its own namespace, apart from the
#: engine's time-based ids, within rpstore's RP_ID_RE (at most 81 characters).
CENTER_RP_ID = re.compile(r"center-[A-Za-z0-9_.:-]{1,74}")
CONTROL_KEYS = {"cmd", "resource", "id", "not_after"}


class MonitorError(ValueError):
    """The monitor endpoint's settings cannot be used."""


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MonitorError(f"--monitor-listen {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED             # mutual TLS: no client certificate, no service
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.num_tickets = 0
    try:
        ctx.load_verify_locations(cafile=ca)
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise MonitorError(f"monitor TLS files (cert {cert!r}, key {key!r}, ca {ca!r}): {e}") from None
    return ctx


class MonitorServer:
    """Serves `status` and `events` of a Daemon (its `_handle` for status, its subscribers)."""

    def __init__(self, daemon, host: str, port: int, ctx: ssl.SSLContext,
                 control_clients: frozenset[str] = frozenset()):
        self.daemon, self.host, self.port, self.ctx = daemon, host, port, ctx
        #: subject CNs allowed rp-create / rp-delete (empty: the endpoint is read-only)
        self.control_clients = frozenset(control_clients)
        self._control_lock = asyncio.Lock()     # one control request at a time: check-then-create
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_client, self.host, self.port, ssl=self.ctx, limit=MAX_LINE,
            ssl_handshake_timeout=REQUEST_TIMEOUT)
        log.info("monitor endpoint listening on %s:%d (mutual TLS)", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._clients) >= MAX_CLIENTS:
            writer.close()
            return
        self._clients.add(task)
        peer = writer.get_extra_info("peername")
        try:
            writer.transport.set_write_buffer_limits(high=1 << 20)
            sock = writer.get_extra_info("socket")
            if sock is not None:          # a peer that vanished without a FIN is noticed eventually
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    line = await reader.readline()
            except TimeoutError:
                await self._send(writer, {"ok": False, "error": "no request within "
                                                                f"{REQUEST_TIMEOUT:g}s"})
                return
            except (ValueError, asyncio.LimitOverrunError):     # longer than MAX_LINE
                await self._send(writer, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                return
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not an object")
            except ValueError:
                await self._send(writer, {"ok": False, "error": "bad request: expected one JSON object"})
                return
            cmd = req.get("cmd")
            if cmd == "status":
                name = req.get("resource")
                if name is not None and not isinstance(name, str):
                    reply = {"ok": False, "error": "resource must be a string"}
                else:
                    try:
                        reply = await self.daemon._handle({"cmd": "status", "resource": name})
                    except KeyError as e:
                        reply = {"ok": False, "error": e.args[0]}
                await self._send(writer, reply)
            elif cmd == "events":
                await self._stream(reader, writer)
            elif cmd == "rp-list":
                await self._send(writer, self._rp_list(req))
            elif cmd in ("rp-create", "rp-delete"):
                await self._send(writer, await self._control(req, writer, peer))
            else:
                log.warning("monitor client %s: refused request %r (read-only endpoint)", peer,
                            str(cmd)[:40])
                await self._send(writer, {"ok": False, "error": f"refused: {str(cmd)[:40]!r} is not a "
                                                                "monitor request (status, events, rp-list)"})
        except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("monitor client %s failed", peer)
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    def _resource(self, req: dict):
        name = req.get("resource")
        if not isinstance(name, str) or name not in self.daemon.resources:
            raise LookupError(f"no resource {str(name)[:80]!r} on this node")
        return self.daemon.resources[name]

    def _rp_list(self, req: dict) -> dict:
        try:
            res = self._resource(req)
        except LookupError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "resource": res.name, "recovery_points": res.rp_list()}

    @staticmethod
    def _peer_cn(writer: asyncio.StreamWriter) -> str | None:
        cert = writer.get_extra_info("peercert") or {}
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return value
        return None

    async def _control(self, req: dict, writer: asyncio.StreamWriter, peer) -> dict:
        """rp-create / rp-delete, for the clients named by --control-clients only."""
        cmd, cn = req["cmd"], self._peer_cn(writer)
        if cn is None or cn not in self.control_clients:
            log.warning("monitor client %s (CN %r): refused %s: not a control client", peer, cn, cmd)
            return {"ok": False, "error": f"refused: {cmd} needs a control client (--control-clients)"}
        if set(req) - CONTROL_KEYS:
            extra = sorted(str(k)[:40] for k in set(req) - CONTROL_KEYS)
            return {"ok": False, "error": f"unknown key(s) {extra}"}
        rp_id = req.get("id")
        if not isinstance(rp_id, str) or not CENTER_RP_ID.fullmatch(rp_id):
            return {"ok": False, "error": f"id must match {CENTER_RP_ID.pattern}"}
        not_after = req.get("not_after")
        if not_after is not None and (cmd != "rp-create" or not finite_number(not_after)):
            return {"ok": False, "error": "not_after must be a finite number of seconds, for rp-create only"}
        try:
            res = self._resource(req)
        except LookupError as e:
            return {"ok": False, "error": str(e)}
        async with self._control_lock:
            try:
                if cmd == "rp-create":
                    manifest, created = await res.rp_create_center(rp_id, not_after)
                    log.info("control client %s: %s resource=%s id=%s", cn,
                             "created" if created else "already had", res.name, rp_id)
                    return {"ok": True, "recovery_point": manifest, "created": created}
                deleted = await res.rp_delete_center(rp_id)
                log.info("control client %s: %s resource=%s id=%s", cn,
                         "deleted" if deleted else "nothing to delete", res.name, rp_id)
                return {"ok": True, "deleted": deleted, "id": rp_id}
            except RecoveryPointTooLate as e:
                log.info("control client %s: refused %s resource=%s id=%s: too late", cn, cmd, res.name,
                         rp_id)
                return {"ok": False, "late": True, "error": str(e)}
            except (RecoveryPointError, RPStoreError, OSError) as e:
                return {"ok": False, "error": str(e)}

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        q: asyncio.Queue = asyncio.Queue(maxsize=EVENT_QUEUE)
        self.daemon.subscribers.add(q)
        # The client says nothing more: EOF (or anything it sends) ends the stream, so a client
        # that went away while no event came does not keep its slot until the next event.
        gone = asyncio.ensure_future(reader.read(MAX_LINE))
        try:
            for res in list(self.daemon.resources.values()):
                await self._send(writer, {"ts": None, "resource": res.name, "event": "exists",
                                          **{k: v for k, v in res.status().items() if k != "stats"}})
            while q in self.daemon.subscribers or not q.empty():   # the daemon drops a full queue
                get = asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return
                await self._send(writer, get.result())
        finally:
            gone.cancel()
            self.daemon.subscribers.discard(q)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, obj: dict) -> None:
        writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
