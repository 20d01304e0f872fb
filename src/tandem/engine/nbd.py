"""NBD front end of tandemd: an asyncio NBD server (standard library only).

What it speaks (see the NBD protocol, doc/proto.md of the reference implementation):

* handshake: fixed newstyle only (``NBD_FLAG_FIXED_NEWSTYLE`` and ``NBD_FLAG_NO_ZEROES``);
  options ``NBD_OPT_GO``/``NBD_OPT_INFO`` (with ``NBD_INFO_EXPORT``, ``NBD_INFO_BLOCK_SIZE``,
  ``NBD_INFO_NAME``, ``NBD_INFO_DESCRIPTION``), ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_LIST`` and
  ``NBD_OPT_ABORT``. Every other option (``STARTTLS``, ``STRUCTURED_REPLY``, meta contexts,
  extended headers ...) gets ``NBD_REP_ERR_UNSUP``, so clients fall back to simple replies.
* transmission: ``READ``, ``WRITE``, ``FLUSH``, ``TRIM``, ``WRITE_ZEROES`` (``FUA`` and
  ``NO_HOLE`` honoured) and ``DISC``, with simple replies only. Requests run concurrently
  (one task each, at most ``max_inflight`` and ``max_inflight_bytes`` per connection) and
  are answered as they complete, in any order; each reply is written in one synchronous
  transport call, so replies never interleave.

Malformed frames (bad magic, truncated header or payload, a write payload larger than the
32 MiB maximum) end that one connection with a hard disconnect, logged with the peer and
the reason; they never reach the export. Requests that are well formed but invalid (bad
flags, out of range, zero length, read-only export ...) get an error reply per the spec
and never reach the export either.

Run ``python -m tandem.engine.nbd --file PATH --socket SOCK`` to serve one file or block
device until SIGTERM/SIGINT (used by tests and benchmarks until the daemon exists).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.engine.export import Export

LOGGER_NAME = "tandem.engine.nbd"

# --- protocol constants -------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPT_NAMES = {
    OPT_EXPORT_NAME: "export-name",
    OPT_ABORT: "abort",
    OPT_LIST: "list",
    OPT_PEEK_EXPORT: "peek-export",
    OPT_STARTTLS: "starttls",
    OPT_INFO: "info",
    OPT_GO: "go",
    OPT_STRUCTURED_REPLY: "structured-reply",
    OPT_LIST_META_CONTEXT: "list-meta-context",
    OPT_SET_META_CONTEXT: "set-meta-context",
    OPT_EXTENDED_HEADERS: "extended-headers",
}

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_PLATFORM = 2**31 + 4
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_SHUTDOWN = 2**31 + 7
REP_ERR_BLOCK_SIZE_REQD = 2**31 + 8
REP_ERR_TOO_BIG = 2**31 + 9

# NBD_REP_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = ("read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status")

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# error values on the wire (fixed by the spec, not the host's errno)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ESHUTDOWN = 108

#: Host errno -> NBD error value; anything else becomes EIO.
ERRNO_TO_NBD = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

#: Largest READ/WRITE payload accepted, and the maximum block size advertised.
MAX_PAYLOAD = 32 * 1024 * 1024
#: Largest option payload accepted during the handshake (a 4 KiB name plus room for the
#: NBD_OPT_GO/INFO framing and its information requests); larger ones end the connection.
MAX_OPTION_LEN = 8192
#: Longest export name (the spec's MUST for strings).
MAX_NAME_LEN = 4096
#: Options accepted on one connection before it is considered abusive.
MAX_OPTIONS = 1024

DEFAULT_MAX_INFLIGHT = 64
DEFAULT_MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
#: Receive buffer of a connection: requests and small write payloads are parsed in place.
RECV_BUFFER = 256 * 1024
#: Write payloads larger than this are received straight into a buffer of their own.
SMALL_PAYLOAD = 64 * 1024
#: Write payload buffers (over SMALL_PAYLOAD) a connection keeps for reuse, in bytes at
#: most: a fresh 1 MiB bytearray is zero-filled and page-faulted in every time, which was
#: a third of the server's CPU under 1 MiB writes.
SPARE_BYTES = 16 * 1024 * 1024
#: Transport write-buffer limits: above HIGH the connection stops reading requests.
WRITE_HIGH = 4 * 1024 * 1024
WRITE_LOW = 1024 * 1024

_HELLO = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPT_HDR = struct.Struct(">QII")  # magic, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_INFO_EXPORT = struct.Struct(">HQH")  # type, size, transmission flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # type, minimum, preferred, maximum
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_ZEROES_124 = bytes(124)

_SIMPLE_VALUE = re.compile(r"[A-Za-z0-9._:/@+-]+")


def _q(value: object) -> str:
    """A log value: bare when it is a simple token, JSON-quoted otherwise (empty, spaces ...)."""
    text = str(value)
    return text if _SIMPLE_VALUE.fullmatch(text) else json.dumps(text)


def nbd_error(exc: BaseException) -> int:
    """The NBD error value for an exception raised by an export."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return ERRNO_TO_NBD.get(exc.errno, NBD_EIO)
    return NBD_EIO


def transmission_flags(export: Export) -> int:
    flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN
    if export.read_only:
        flags |= FLAG_READ_ONLY
    else:
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
    return flags


def _preferred_block_size(export: Export) -> int:
    size = getattr(export, "block_size", 4096)
    if not isinstance(size, int) or size < 1 or size & (size - 1):
        return 4096
    return min(size, MAX_PAYLOAD)


class _ProtocolError(Exception):
    """Ends a connection with a hard disconnect; args[0] is the logged reason."""


# phases of a connection
_HANDSHAKE = 0
_TRANSMISSION = 1
_CLOSING = 2  # after DISC, EOF or OPT_ABORT: finish what is in flight, then close
_DEAD = 3  # aborted or lost: nothing more is parsed or written

if sys.version_info >= (3, 12):

    def _start_task(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[None]:
        # Run the request up to its first real suspension right away: requests that
        # complete synchronously (page-cache hits, memory exports) never wait for the loop.
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]

else:

    def _start_task(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[None]:
        return loop.create_task(coro)


def _refs(obj: object) -> int:
    return sys.getrefcount(obj)


def _refs_when_alone() -> int:
    obj = bytearray(1)
    return _refs(obj)


#: What _refs() says of an object that only its caller's variable holds (the count
#: depends on the interpreter version, so it is measured rather than assumed).
_ALONE = _refs_when_alone()


def _describe_peer(transport: asyncio.BaseTransport) -> str:
    """``peer=...`` for log lines: ``host:port`` for TCP, ``unix pid=N uid=N`` for unix sockets."""
    sock = transport.get_extra_info("socket")
    family = getattr(sock, "family", None)
    if family == socket.AF_UNIX:
        try:
            pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        except (OSError, AttributeError, struct.error):
            return "peer=unix"
        return f"peer=unix pid={pid} uid={uid}"
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        host = f"[{name[0]}]" if family == socket.AF_INET6 else str(name[0])
        return f"peer={host}:{name[1]}"
    return f"peer={_q(name)}"


class _Connection(asyncio.BufferedProtocol):
    """One client connection: handshake coroutine, then in-place request parsing.

    The kernel receives into ``buf`` (``recv_into``); complete requests are parsed from
    it in ``buffer_updated`` without further copies except each small write payload.
    A write payload larger than SMALL_PAYLOAD is received straight into its own buffer.
    Replies produced while parsing, or by requests completing in the same loop pass, are
    collected in ``out`` and sent with one ``writelines`` call.

    Flow control: parsing stops while ``max_inflight`` requests or ``max_inflight_bytes``
    of payload are in flight, and reading stops while the receive buffer is full or the
    transport's write buffer is above WRITE_HIGH (a client that does not read replies).
    """

    def __init__(self, server: NBDServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.log = server._log
        server._next_cid += 1
        self.cid = server._next_cid
        self.peer = "peer=?"
        self.transport: asyncio.Transport | None = None
        self.phase = _HANDSHAKE
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.rpos = 0
        self.wpos = 0
        self.pview: memoryview | None = None  # a large write payload being received
        self.pgot = 0
        self.phdr = (0, 0, 0, 0)
        self.eof = False
        self.lost = False
        self.waiter: asyncio.Future[None] | None = None  # handshake waiting for data
        self.drain_waiter: asyncio.Future[None] | None = None
        self.hs_task: asyncio.Task[None] | None = None
        self.export: Export | None = None
        self.export_name: str | None = None
        self.size = 0
        self.read_only = True
        self.no_zeroes = False
        self.inflight = 0
        self.inflight_bytes = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.spare: dict[int, list[bytearray]] = {}  # payload length -> buffers to reuse
        self.spare_bytes = 0
        self.out: list[Any] = []
        self.flush_pending = False
        self.in_process = False
        self.blocked = False  # parsing stopped at the in-flight limits
        self.write_paused = False
        self.read_paused = False
        self.reason: str | None = None
        self.detail = ""
        self.level = logging.INFO
        self.requests = 0
        self.errors = 0
        self.logged_errors = 0
        self.finished: asyncio.Future[None] = loop.create_future()

    # --- asyncio protocol callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = _describe_peer(transport)
        server = self.server
        server._conns[self.cid] = self
        server._connections_total += 1
        if server._closing:
            self.reason = "server-close"
            self.phase = _DEAD
            transport.abort()
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.log.debug("nbd connection opened conn=%d %s", self.cid, self.peer)
        self.hs_task = self.loop.create_task(self._handshake_main())

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.pview is not None:
            return self.pview[self.pgot :]
        if self.wpos == RECV_BUFFER:
            self._compact()
        return self.view[self.wpos :]

    def buffer_updated(self, nbytes: int) -> None:
        pview = self.pview
        if pview is not None:
            self.pgot += nbytes
            if self.pgot < len(pview):
                return
            self.pview = None
            # The buffer is this request's own: hand it on without a copy (a 1 MiB
            # copy per write was a quarter of the server's CPU at 1 MiB QD16).
            data = pview.obj
            pview.release()
            flags, handle, offset, length = self.phdr
            if self.phase == _TRANSMISSION:
                self.in_process = True
                try:
                    self._write(flags, handle, offset, length, data)
                finally:
                    self.in_process = False
                self._process()
            return
        self.wpos += nbytes
        phase = self.phase
        if phase == _TRANSMISSION:
            self._process()
        elif phase == _HANDSHAKE:
            self._wake()
            self._update_reading()
        else:
            # after DISC the client must not send anything: ignore whatever comes
            self.rpos = self.wpos = 0

    def eof_received(self) -> bool:
        self.eof = True
        if self.phase == _HANDSHAKE:
            self._wake()
        elif self.phase == _TRANSMISSION:
            self._process()
        # keep the transport open: replies to requests in flight can still be sent
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None:
            self.drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.reason is None:
            if exc is None:
                self.reason = "eof"
            else:
                self.reason = "connection-error"
                self.detail = (
                    self.detail
                    or errno.errorcode.get(getattr(exc, "errno", 0) or 0, "")
                    or type(exc).__name__
                )
                if not isinstance(exc, ConnectionError):
                    self.level = logging.WARNING
        self.phase = _DEAD
        self.out.clear()
        self._wake()
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.hs_task is not None and not self.hs_task.done():
            self.hs_task.cancel()
        if self.inflight == 0:
            self._finalize()

    # --- buffer and flow control ----------------------------------------------------------

    def _compact(self) -> None:
        rpos, wpos = self.rpos, self.wpos
        if rpos:
            n = wpos - rpos
            # (copy first: source and destination may overlap)
            self.buf[:n] = bytes(self.view[rpos:wpos])
            self.rpos, self.wpos = 0, n

    def _update_reading(self) -> None:
        want = (
            self.phase <= _TRANSMISSION
            and not self.blocked
            and not self.write_paused
            and (self.pview is not None or self.wpos - self.rpos < RECV_BUFFER)
        )
        if want == self.read_paused:
            transport = self.transport
            if transport is None:
                return
            self.read_paused = not want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- output ---------------------------------------------------------------------------

    def _send(self, *data: Any) -> None:
        if self.phase == _DEAD:
            return
        self.out += data
        if self.in_process:
            return  # _process sends everything once it has parsed the whole buffer
        if self.inflight <= 1:
            # The only request in flight (queue depth 1): nothing can join this reply,
            # so send it now rather than one loop pass later.
            self._flush()
        elif not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_pending = False
        out = self.out
        if out:
            self.out = []
            if self.phase != _DEAD and self.transport is not None:
                if len(out) == 1:
                    self.transport.write(out[0])
                else:
                    self.transport.writelines(out)

    # --- ending ---------------------------------------------------------------------------

    def _fatal(self, reason: str, detail: str = "", protocol_error: bool = True) -> None:
        """Hard disconnect: nothing more is parsed or written (queued replies are dropped)."""
        if self.phase == _DEAD:
            return
        self.reason = reason
        self.detail = detail
        self.level = logging.WARNING
        if protocol_error:
            self.server._protocol_errors += 1
        self.phase = _DEAD
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()

    def _begin_close(self, reason: str) -> None:
        """Soft end (DISC, EOF, OPT_ABORT): finish requests in flight, send their replies, close."""
        self.reason = reason
        self.phase = _CLOSING
        self.rpos = self.wpos = 0
        self.pview = None
        if self.out:
            self._flush()
        self._update_reading()
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.inflight == 0 and not self.lost and self.transport is not None:
            self._flush()
            self.transport.close()

    def _finalize(self) -> None:
        if self.finished.done():
            return
        server = self.server
        server._conns.pop(self.cid, None)
        reason = self.reason or "eof"
        server._closed_reasons[reason] = server._closed_reasons.get(reason, 0) + 1
        detail = f" detail={_q(self.detail)}" if self.detail else ""
        self.log.log(
            self.level,
            "nbd connection closed conn=%d %s export=%s reason=%s requests=%d errors=%d%s",
            self.cid,
            self.peer,
            "-" if self.export_name is None else _q(self.export_name),
            reason,
            self.requests,
            self.errors,
            detail,
        )
        self.finished.set_result(None)

    def _abort_for_shutdown(self) -> None:
        if self.reason is None:
            self.reason = "server-close"
        self.phase = _DEAD
        self.out.clear()
        if self.transport is not None:
            self.transport.abort()
        if self.hs_task is not None:
            self.hs_task.cancel()
        for task in list(self.tasks):
            task.cancel()

    # --- handshake ------------------------------------------------------------------------

    async def _read_exact(self, n: int) -> bytes:
        while self.wpos - self.rpos < n:
            if self.lost:
                raise ConnectionResetError("connection lost")
            if self.eof:
                partial = bytes(self.view[self.rpos : self.wpos])
                self.rpos = self.wpos = 0
                raise asyncio.IncompleteReadError(partial, n)
            if RECV_BUFFER - self.rpos < n:
                self._compact()
            self._update_reading()
            waiter = self.loop.create_future()
            self.waiter = waiter
            await waiter
        start = self.rpos
        self.rpos = start + n
        data = bytes(self.view[start : start + n])
        if self.rpos == self.wpos:
            self.rpos = self.wpos = 0
        self._update_reading()
        return data

    async def _drain(self) -> None:
        while self.write_paused and not self.lost:
            waiter = self.loop.create_future()
            self.drain_waiter = waiter
            await waiter
        if self.lost:
            raise ConnectionResetError("connection lost")

    def _rep(self, opt: int, rtype: int, data: bytes = b"") -> None:
        assert self.transport is not None
        self.transport.write(_OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)

    async def _handshake_main(self) -> None:
        try:
            try:
                async with asyncio.timeout(self.server._handshake_timeout):
                    go = await self._handshake()
            except TimeoutError:
                raise _ProtocolError("handshake-timeout") from None
        except _ProtocolError as exc:
            self._fatal(str(exc.args[0]), self.detail)
            return
        except asyncio.IncompleteReadError as exc:
            # the client went away during the handshake (probes; giving up after an error)
            if exc.partial:
                self.detail = f"got={len(exc.partial)} wanted={exc.expected}"
            self._begin_close("truncated-handshake" if exc.partial else "eof")
            return
        except ConnectionError:
            if self.transport is not None:
                self.transport.abort()
            return
        except Exception:
            self.log.exception("nbd internal error conn=%d %s", self.cid, self.peer)
            self._fatal("internal-error", protocol_error=False)
            return
        if not go:
            self._begin_close("abort")
            return
        self.phase = _TRANSMISSION
        self.server._handshakes += 1
        self._process()  # requests the client pipelined behind its NBD_OPT_GO

    async def _handshake(self) -> bool:
        """Fixed newstyle negotiation. True: go to transmission; False: client aborted."""
        assert self.transport is not None
        self.transport.write(_HELLO)
        (cflags,) = _U32.unpack(await self._read_exact(4))
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            self.detail = f"client-flags=0x{cflags:x}"
            raise _ProtocolError("bad-client-flags")
        self.no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, opt, length = _OPT_HDR.unpack(await self._read_exact(_OPT_HDR.size))
            if magic != IHAVEOPT:
                self.detail = f"magic=0x{magic:x}"
                raise _ProtocolError("bad-option-magic")
            if length > MAX_OPTION_LEN:
                self.detail = f"option={OPT_NAMES.get(opt, opt)} length={length}"
                raise _ProtocolError("option-too-long")
            data = await self._read_exact(length) if length else b""
            self.log.debug(
                "nbd option conn=%d option=%s length=%d", self.cid, OPT_NAMES.get(opt, opt), length
            )
            if opt == OPT_EXPORT_NAME:
                self._opt_export_name(data)
                return True
            if opt in (OPT_GO, OPT_INFO):
                if self._opt_info(opt, data):
                    return True
            elif opt == OPT_LIST:
                self._opt_list(data)
            elif opt == OPT_ABORT:
                # Clients may hang up without waiting for this ACK (spec): not an error.
                self._rep(opt, REP_ACK)
                return False
            else:
                self._rep(opt, REP_ERR_UNSUP, b"option not supported by this server")
            await self._drain()
        self.detail = f"options={MAX_OPTIONS}"
        raise _ProtocolError("too-many-options")

    def _find(self, name: str) -> Export | None:
        try:
            return self.server._lookup(name)
        except Exception:
            self.log.exception("nbd export lookup failed conn=%d %s export=%s", self.cid, self.peer, _q(name))
            return None

    def _opt_export_name(self, data: bytes) -> None:
        # No way to report an error: an unusable name ends the session (spec).
        name = _decode_name(data)
        if name is None:
            raise _ProtocolError("bad-export-name")
        export = self._find(name)
        if export is None:
            self.export_name = name
            raise _ProtocolError("unknown-export")
        self._select(name, export, "export-name")
        assert self.transport is not None
        reply = _EXPORT_NAME_REPLY.pack(self.size, transmission_flags(export))
        self.transport.write(reply if self.no_zeroes else reply + _ZEROES_124)

    def _opt_info(self, opt: int, data: bytes) -> bool:
        """NBD_OPT_INFO / NBD_OPT_GO. Returns True when GO succeeded."""
        if len(data) < 6:
            self._rep(opt, REP_ERR_INVALID, b"option too short")
            return False
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > len(data) - 6:
            self._rep(opt, REP_ERR_INVALID, b"name length exceeds option length")
            return False
        (nreq,) = _U16.unpack_from(data, 4 + namelen)
        if len(data) != 6 + namelen + 2 * nreq:
            self._rep(opt, REP_ERR_INVALID, b"option length does not match its contents")
            return False
        raw_name = data[4 : 4 + namelen]
        name = _decode_name(raw_name)
        if name is None:
            self._rep(opt, REP_ERR_INVALID, b"export name is not a valid NBD string")
            return False
        requests = struct.unpack_from(f">{nreq}H", data, 6 + namelen) if nreq else ()
        export = self._find(name)
        if export is None:
            self._rep(opt, REP_ERR_UNKNOWN, b"no such export: " + raw_name[:256])
            return False
        if INFO_NAME in requests:
            self._rep(opt, REP_INFO, _U16.pack(INFO_NAME) + raw_name)
        if INFO_DESCRIPTION in requests:
            desc = getattr(export, "description", None)
            if isinstance(desc, str) and desc:
                raw = desc.encode("utf-8")[:MAX_NAME_LEN]
                self._rep(opt, REP_INFO, _U16.pack(INFO_DESCRIPTION) + raw)
        # Sent whether requested or not: minimum 1 means no alignment constraint.
        block = _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, 1, _preferred_block_size(export), MAX_PAYLOAD)
        self._rep(opt, REP_INFO, block)
        self._rep(opt, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, int(export.size), transmission_flags(export)))
        self._rep(opt, REP_ACK)
        if opt == OPT_GO:
            self._select(name, export, "go")
            return True
        return False

    def _opt_list(self, data: bytes) -> None:
        if data:
            self._rep(OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        list_exports = self.server._list_exports
        if list_exports is None:
            self._rep(OPT_LIST, REP_ERR_POLICY, b"listing exports is disabled")
            return
        try:
            names = list(list_exports())
        except Exception:
            self.log.exception("nbd list_exports failed conn=%d %s", self.cid, self.peer)
            self._rep(OPT_LIST, REP_ERR_PLATFORM, b"cannot list exports")
            return
        for name in names:
            raw = name.encode("utf-8")
            if len(raw) <= MAX_NAME_LEN:
                self._rep(OPT_LIST, REP_SERVER, _U32.pack(len(raw)) + raw)
        self._rep(OPT_LIST, REP_ACK)

    def _select(self, name: str, export: Export, via: str) -> None:
        self.export = export
        self.export_name = name
        self.size = int(export.size)
        self.read_only = bool(export.read_only)
        self.log.info(
            "nbd export opened conn=%d %s export=%s size=%d read_only=%d via=%s",
            self.cid,
            self.peer,
            _q(name),
            self.size,
            int(self.read_only),
            via,
        )

    # --- transmission ---------------------------------------------------------------------

    def _process(self) -> None:
        """Parse and start every complete request in the buffer, then send the replies."""
        if self.in_process or self.phase != _TRANSMISSION:
            return
        self.in_process = True
        try:
            self._parse()
        finally:
            self.in_process = False
        phase = self.phase
        if phase == _TRANSMISSION:
            if self.out:
                self._flush()
            if self.eof and not self.blocked:
                if self.pview is not None:
                    self._fatal("truncated-write", f"length={len(self.pview)} got={self.pgot}")
                elif self.wpos - self.rpos >= 28:  # a write whose payload never came
                    self._fatal("truncated-write", f"got={self.wpos - self.rpos - 28}")
                elif self.wpos != self.rpos:
                    self._fatal("truncated-request", f"got={self.wpos - self.rpos}")
                else:
                    self._begin_close("eof")
                return
            self._update_reading()
        elif phase == _CLOSING:
            self._begin_close(self.reason or "disc")

    def _parse(self) -> None:
        buf = self.buf
        view = self.view
        rpos = self.rpos
        wpos = self.wpos
        unpack_from = _REQUEST.unpack_from
        max_inflight = self.server._max_inflight
        max_bytes = self.server._max_inflight_bytes
        try:
            while wpos - rpos >= 28:
                if self.inflight >= max_inflight or (self.inflight and self.inflight_bytes >= max_bytes):
                    self.blocked = True
                    return
                magic, flags, cmd, handle, offset, length = unpack_from(buf, rpos)
                if magic != REQUEST_MAGIC:
                    self._fatal("bad-magic", f"magic=0x{magic:08x}")
                    return
                if cmd == CMD_WRITE:
                    if length > MAX_PAYLOAD:
                        self._fatal("oversized-write", f"length={length}")
                        return
                    end = rpos + 28 + length
                    if end > wpos:
                        if length > SMALL_PAYLOAD:
                            # receive the rest straight into a buffer of its own
                            have = wpos - rpos - 28
                            payload = self._payload_buffer(length)
                            payload[:have] = view[rpos + 28 : wpos]
                            self.pview = memoryview(payload)
                            self.pgot = have
                            self.phdr = (flags, handle, offset, length)
                            rpos = wpos
                        return
                    data = bytes(view[rpos + 28 : end])
                    rpos = end
                    self._write(flags, handle, offset, length, data)
                else:
                    rpos += 28
                    self._command(cmd, flags, handle, offset, length)
                if self.phase != _TRANSMISSION:
                    return
        finally:
            if rpos == wpos:
                rpos = wpos = 0
            self.rpos = rpos
            self.wpos = wpos

    def _write(self, flags: int, handle: int, offset: int, length: int, data: bytes | bytearray) -> None:
        self.requests += 1
        self.server._requests[CMD_WRITE] += 1
        if flags & ~CMD_FLAG_FUA:
            err = NBD_EINVAL
        elif self.read_only:
            err = NBD_EPERM
        elif length == 0:
            err = NBD_EINVAL
        elif offset + length > self.size:
            err = NBD_ENOSPC
        else:
            self.inflight += 1
            self.inflight_bytes += length
            task = _start_task(self.loop, self._run(CMD_WRITE, flags, handle, offset, length, data, length))
            if not task.done():
                self.tasks.add(task)        # _run takes it out again as it ends
            return
        self._reply_error(handle, err, CMD_WRITE, offset, length, None)

    def _payload_buffer(self, length: int) -> bytearray:
        spare = self.spare.get(length)
        if spare:
            self.spare_bytes -= length
            return spare.pop()
        return bytearray(length)

    def _keep(self, data: bytearray) -> None:
        n = len(data)
        if self.spare_bytes + n <= SPARE_BYTES:
            self.spare.setdefault(n, []).append(data)
            self.spare_bytes += n

    def _command(self, cmd: int, flags: int, handle: int, offset: int, length: int) -> None:
        self.requests += 1
        counts = self.server._requests
        err = 0
        cost = 0
        if cmd == CMD_READ:
            counts[CMD_READ] += 1
            cost = length
            if flags & ~CMD_FLAG_FUA or length == 0 or length > MAX_PAYLOAD or offset + length > self.size:
                err = NBD_EINVAL
        elif cmd == CMD_FLUSH:
            # offset/length are reserved (zero); like qemu, don't reject a flush over them
            counts[CMD_FLUSH] += 1
            if flags & ~CMD_FLAG_FUA:
                err = NBD_EINVAL
        elif cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
            counts[cmd] += 1
            allowed = CMD_FLAG_FUA if cmd == CMD_TRIM else CMD_FLAG_FUA | CMD_FLAG_NO_HOLE
            if flags & ~allowed:
                err = NBD_EINVAL
            elif self.read_only:
                err = NBD_EPERM
            elif length == 0:
                err = NBD_EINVAL
            elif offset + length > self.size:
                err = NBD_EINVAL if cmd == CMD_TRIM else NBD_ENOSPC
        elif cmd == CMD_DISC:
            # Finish what is in flight (its replies are sent), then close; no reply.
            counts[CMD_DISC] += 1
            self.reason = "disc"
            self.phase = _CLOSING
            return
        else:
            # Unknown or never advertised: without extended headers there is no payload
            # to skip, and the spec says EINVAL.
            if cmd < len(counts):
                counts[cmd] += 1
            else:
                self.server._requests_other += 1
            err = NBD_EINVAL
        if err:
            self._reply_error(handle, err, cmd, offset, length, None)
            return
        self.inflight += 1
        self.inflight_bytes += cost
        task = _start_task(self.loop, self._run(cmd, flags, handle, offset, length, None, cost))
        if not task.done():
            self.tasks.add(task)

    async def _run(
        self,
        cmd: int,
        flags: int,
        handle: int,
        offset: int,
        length: int,
        data: bytes | bytearray | None,
        cost: int,
    ) -> None:
        export: Any = self.export
        try:
            if cmd == CMD_READ:
                buf = await export.read(offset, length)
                if len(buf) != length:
                    raise OSError(errno.EIO, f"export returned {len(buf)} bytes for a {length}-byte read")
                self._send(_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle), buf)
                self.server._bytes_read += length
            else:
                fua = bool(flags & CMD_FLAG_FUA)
                if cmd == CMD_WRITE:
                    await export.write(offset, data, fua)
                    self.server._bytes_written += length
                    # Its own buffer, if held by nothing else now (the replication link's
                    # send queue, a memoryview anywhere ...), can take a later payload.
                    if length > SMALL_PAYLOAD and type(data) is bytearray and _refs(data) == _ALONE:
                        self._keep(data)
                elif cmd == CMD_FLUSH:
                    await export.flush()
                elif cmd == CMD_TRIM:
                    await export.trim(offset, length, fua)
                else:
                    await export.write_zeroes(offset, length, fua, not flags & CMD_FLAG_NO_HOLE)
                self._send(_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._reply_error(handle, nbd_error(exc), cmd, offset, length, exc)
        finally:
            # Not a done callback: that would cost every request that waited (a protocol-C
            # write waits for the peer) one more pass of the event loop.
            self.tasks.discard(asyncio.current_task(self.loop))  # type: ignore[arg-type]
            self.inflight -= 1
            self.inflight_bytes -= cost
            if self.blocked:
                server = self.server
                if self.inflight < server._max_inflight and (
                    not self.inflight or self.inflight_bytes < server._max_inflight_bytes
                ):
                    self.blocked = False
                    self.loop.call_soon(self._process)
            if self.inflight == 0 and self.phase != _TRANSMISSION:
                if self.lost:
                    self._finalize()
                elif self.phase == _CLOSING and not self.in_process:
                    self._maybe_close()

    def _reply_error(
        self,
        handle: int,
        err: int,
        cmd: int,
        offset: int,
        length: int,
        exc: BaseException | None,
    ) -> None:
        self.server._errors += 1
        self.errors += 1
        self._send(_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))
        log = self.log
        cmd_name = CMD_NAMES[cmd] if cmd < len(CMD_NAMES) else str(cmd)
        if exc is None:
            # an invalid request: the client's bug, not ours; keep it quiet
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "nbd request rejected conn=%d %s cmd=%s offset=%d length=%d error=%d",
                    self.cid,
                    self.peer,
                    cmd_name,
                    offset,
                    length,
                    err,
                )
            return
        # export failures: the first few per connection at WARNING, the rest at DEBUG
        self.logged_errors += 1
        level = logging.WARNING if self.logged_errors <= 10 else logging.DEBUG
        if log.isEnabledFor(level):
            log.log(
                level,
                "nbd export error conn=%d %s export=%s cmd=%s offset=%d length=%d error=%d exc=%s",
                self.cid,
                self.peer,
                _q(self.export_name),
                cmd_name,
                offset,
                length,
                err,
                _q(repr(exc)),
                exc_info=not isinstance(exc, OSError),
            )


class NBDServer:
    """An NBD server for the exports that ``lookup`` finds by name.

    ``lookup(name)`` returns the export to serve for a client's export name (the default
    export is the empty name, looked up like any other) or None if there is none.
    ``list_exports()``, if given, names the exports for ``NBD_OPT_LIST``; without it
    ``NBD_OPT_LIST`` is refused with ``NBD_REP_ERR_POLICY``.
    """

    def __init__(
        self,
        lookup: Callable[[str], Export | None],
        *,
        list_exports: Callable[[], list[str]] | None = None,
        logger: logging.Logger | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        if max_inflight < 1 or max_inflight_bytes < 1:
            raise ValueError("max_inflight and max_inflight_bytes must be positive")
        self._lookup = lookup
        self._list_exports = list_exports
        self._log = logger if logger is not None else logging.getLogger(LOGGER_NAME)
        self._max_inflight = max_inflight
        self._max_inflight_bytes = max_inflight_bytes
        self._handshake_timeout = handshake_timeout
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[tuple[str, int]] = []
        self._conns: dict[int, _Connection] = {}
        self._next_cid = 0
        self._closing = False
        # counters (see stats())
        self._connections_total = 0
        self._handshakes = 0
        self._requests = [0] * len(CMD_NAMES)
        self._requests_other = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._errors = 0
        self._protocol_errors = 0
        self._closed_reasons: dict[str, int] = {}

    def _factory(self) -> _Connection:
        return _Connection(self, asyncio.get_running_loop())

    async def start_unix(self, path: str | os.PathLike[str], mode: int = 0o660) -> asyncio.AbstractServer:
        """Listen on a unix socket at ``path`` with permissions ``mode``.

        A stale socket file is replaced; a live one (something accepts on it) is an error.
        The socket only listens once its mode is set, so nobody can connect in between.
        """
        path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
            if _unix_socket_alive(path):
                raise OSError(errno.EADDRINUSE, "a server is already listening on", path)
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, mode)
            inode = os.stat(path).st_ino
            server = await asyncio.get_running_loop().create_unix_server(self._factory, sock=sock)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self._servers.append(server)
        self._unix_paths.append((path, inode))
        self._log.info("nbd listening socket=%s mode=%04o", _q(path), mode)
        return server

    async def start_tcp(self, host: str | None, port: int) -> asyncio.AbstractServer:
        """Listen on TCP ``host:port`` (port 0 picks a free port; see the server's sockets)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._factory, host, port, reuse_address=True)
        self._servers.append(server)
        for sock in server.sockets:
            name = sock.getsockname()
            self._log.info("nbd listening addr=%s", _q(f"{name[0]}:{name[1]}"))
        return server

    async def close(self) -> None:
        """Stop listening and abort every live connection (in-flight requests are cancelled)."""
        self._closing = True
        for server in self._servers:
            server.close()
        conns = list(self._conns.values())
        for conn in conns:
            conn._abort_for_shutdown()
        waits: list[Any] = [conn.finished for conn in conns]
        waits += [conn.hs_task for conn in conns if conn.hs_task is not None]
        if waits:
            await asyncio.wait(waits, timeout=10)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._servers.clear()
        for path, inode in self._unix_paths:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
        self._unix_paths.clear()

    def stats(self) -> dict[str, Any]:
        """Counters for status output (a fresh dict; safe to keep or mutate)."""
        requests = {name: self._requests[i] for i, name in enumerate(CMD_NAMES)}
        requests["other"] = self._requests_other
        return {
            "connections_active": len(self._conns),
            "connections_total": self._connections_total,
            "handshakes_completed": self._handshakes,
            "requests": requests,
            "bytes_read": self._bytes_read,
            "bytes_written": self._bytes_written,
            "errors": self._errors,
            "protocol_errors": self._protocol_errors,
            "closed": dict(self._closed_reasons),
        }


def _decode_name(raw: bytes) -> str | None:
    """An export name from the wire, or None if it is not a valid NBD string."""
    if len(raw) > MAX_NAME_LEN or b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _unix_socket_alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


# --- runner -------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.engine.nbd",
        description=(
            "Serve one file or block device over NBD on a unix socket until SIGTERM/SIGINT. "
            "The export is reachable under --name and as the default export ''."
        ),
    )
    parser.add_argument("--file", required=True, help="raw file or block device to export")
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--name", default="", help="export name (default: '')")
    parser.add_argument("--read-only", action="store_true", help="export read-only")
    parser.add_argument(
        "--mode", type=lambda s: int(s, 8), default=0o660, help="socket permissions (octal, default 660)"
    )
    parser.add_argument("--block-size", type=int, default=4096, help="preferred block size to advertise")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser.parse_args(argv)


async def _serve_file(args: argparse.Namespace) -> int:
    from tandem.engine.fileexport import FileExport

    export = FileExport(args.file, name=args.name, read_only=args.read_only, block_size=args.block_size)
    names = {args.name, ""}

    def lookup(name: str) -> Export | None:
        return export if name in names else None

    server = NBDServer(lookup, list_exports=lambda: [args.name])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log = logging.getLogger(LOGGER_NAME)
    try:
        await server.start_unix(args.socket, args.mode)
        log.info(
            "nbd serving file=%s export=%s size=%d read_only=%d",
            _q(args.file),
            _q(args.name),
            export.size,
            int(args.read_only),
        )
        await stop.wait()
        log.info("nbd stopping stats=%s", json.dumps(server.stats(), separators=(",", ":")))
    finally:
        await server.close()
        await export.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(_serve_file(args))
    except OSError as exc:
        logging.getLogger(LOGGER_NAME).error("nbd cannot serve error=%s", _q(str(exc)))
        return 1


if __name__ == "__main__":
    sys.exit(main())
