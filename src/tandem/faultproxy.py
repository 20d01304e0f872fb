"""A userspace TCP proxy that injects link faults between two daemons.

The lab's kernel has no netem, so latency, jitter, a bandwidth cap, a silent
peer, a link that goes down and connection resets are injected here instead:
point one tandemd at the proxy's listen address and the proxy forwards every
accepted connection to the real peer, byte-exact and in order, both ways.

Each direction of each connection is a `_Pipe`: a reader task takes chunks
from the source (waiting on a token bucket first when `rate` is set), stamps
each with its delivery time and queues it; a writer task sleeps until the
head chunk is due, writes it and waits for the destination to drain. The
queue is bounded, so a slow destination stops the reader and TCP
back-pressure reaches the sender.

Faults are plain settings read on every chunk, so changing them applies to
existing connections at once as well as to new ones:

- ``delay``, ``jitter`` (seconds): a chunk is delivered at
  ``max(previous chunk's time, read time + delay + uniform(0, jitter))``, so
  jitter never reorders bytes;
- ``rate`` (bytes/s, 0 = unlimited): per direction, per connection;
- ``blackhole``: connections stay open and new ones are still accepted and
  connected, but every byte read (or still queued) is discarded; an EOF is
  held until the blackhole ends, as a retransmitted FIN would be;
- ``down``: every connection is closed (FIN both ways) and new ones are
  closed right after accept;
- ``drop`` (0..1): each new connection is closed right after accept with
  that probability.

`FaultProxy.reset()` is an action, not a setting: it aborts every open
connection with an RST on both sides.

Run as its own process (``python -m tandem.faultproxy --help``), it prints
``{"port": N}`` on stdout once listening and takes JSON-lines requests on a
unix control socket; `ProxyControl` is the blocking client for it. See
docs/faultproxy.md.

Standard library only, like the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import socket
import stat
import struct
import sys

log = logging.getLogger("tandem.faultproxy")

#: Largest read from a socket; also the StreamReader limit (it pauses the transport at twice this).
CHUNK = 256 << 10
#: A pipe's queue never holds more than this (the most a delayed link keeps in flight per direction:
#: 16 MiB at 100 ms is 160 MiB/s).
MAX_QUEUED = 16 << 20
#: Once this much is queued and the oldest chunk is already due (the destination, not the delay, is
#: what holds it), the reader stops: without a delay the proxy adds at most this much buffering.
BACKLOG = 1 << 20
#: The destination's transport write buffer above which the writer waits for it to drain.
WRITE_HIGH_WATER = 1 << 20
#: The token bucket holds this many seconds' worth of `rate` (the largest burst).
BURST_SECONDS = 0.05
#: A rate-limited read waits until the bucket holds this much (or is full), so a low rate does not
#: turn into a storm of tiny reads.
MIN_RATE_READ = 16 << 10

FAULT_NAMES = ("delay", "jitter", "rate", "blackhole", "down", "drop")


@dataclasses.dataclass(slots=True)
class Faults:
    """The settings in force; all off by default."""

    delay: float = 0.0
    jitter: float = 0.0
    rate: float = 0.0
    blackhole: bool = False
    down: bool = False
    drop: float = 0.0


def check_fault(name: str, value) -> float | bool:
    """Validate one setting; return it normalised or raise ValueError with a readable message."""
    if name not in FAULT_NAMES:
        raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULT_NAMES)})")
    if name in ("blackhole", "down"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value
    # bool is an int: refuse it for numbers, `delay: true` is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
    if name == "drop" and value > 1:
        raise ValueError(f"drop is a probability (0..1), not {value!r}")
    return float(value)


class FaultProxy:
    """Forward `listen_host:listen_port` to `target_host:target_port`, with faults.

    All methods must be called from the event loop's thread. `port` is the
    listening port once `start()` has returned (useful with port 0).
    """

    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int,
                 *, seed: int | None = None):
        self.listen_host, self.port = listen_host, listen_port
        self.target_host, self.target_port = target_host, target_port
        self.faults = Faults()
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()        # one per accepted connection, until it ends
        self._conns: set[_Connection] = set()          # those connected to the target
        #: Set while not blackholed: a held EOF waits on it.
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._stats = dict.fromkeys(("accepted", "refused", "connect_failed", "bytes_to_target",
                                     "bytes_to_client", "bytes_discarded"), 0)

    # -- public API -------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_accept, self.listen_host, self.port,
                                                  limit=CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s:%d, forwarding to %s:%d", self.listen_host, self.port,
                 self.target_host, self.target_port)

    async def stop(self) -> None:
        """Stop listening and close every connection (FIN, not RST)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.kill(rst=False)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def set(self, **faults) -> dict:
        """Change some faults (all validated before any applies); return the settings now in force."""
        checked = {name: check_fault(name, value) for name, value in faults.items()}
        for name, value in checked.items():
            setattr(self.faults, name, value)
        if checked:
            log.info("faults: %s", self._describe())
        if self.faults.blackhole:
            self._forwarding.clear()
        else:
            self._forwarding.set()
        if self.faults.down:
            for conn in list(self._conns):
                conn.kill(rst=False)
        return dataclasses.asdict(self.faults)

    def clear(self) -> dict:
        """Turn every fault off."""
        return self.set(**dataclasses.asdict(Faults()))

    def reset(self) -> int:
        """Abort every open connection with an RST to both sides; return how many there were."""
        conns = list(self._conns)
        for conn in conns:
            conn.kill(rst=True)
        log.info("reset %d connection(s)", len(conns))
        return len(conns)

    def stats(self) -> dict:
        """Counters since start, the number of open connections and the faults in force."""
        return {**self._stats, "active": len(self._conns), "faults": dataclasses.asdict(self.faults)}

    # -- connections ------------------------------------------------------

    def _describe(self) -> str:
        on = {k: v for k, v in dataclasses.asdict(self.faults).items() if v}
        return ", ".join(f"{k}={v}" for k, v in on.items()) or "none"

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._stats["accepted"] += 1
        if self.faults.down or self._random.random() < self.faults.drop:
            self._stats["refused"] += 1
            client_w.close()
            return
        try:
            target_r, target_w = await asyncio.open_connection(self.target_host, self.target_port,
                                                               limit=CHUNK)
        except OSError as e:
            log.warning("cannot connect to %s:%d: %s", self.target_host, self.target_port, e)
            self._stats["connect_failed"] += 1
            client_w.close()
            return
        except asyncio.CancelledError:      # stop() while connecting
            client_w.transport.abort()
            raise
        if self.faults.down:                 # went down while we were connecting
            self._stats["refused"] += 1
            client_w.close()
            target_w.close()
            return
        conn = _Connection(self, client_r, client_w, target_r, target_w)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)


class _Connection:
    """One proxied connection: two pipes, closed together."""

    def __init__(self, proxy: FaultProxy, client_r, client_w, target_r, target_w):
        self.writers = (client_w, target_w)
        for w in self.writers:
            w.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.pipes = (_Pipe(proxy, client_r, target_w, "bytes_to_target"),
                      _Pipe(proxy, target_r, client_w, "bytes_to_client"))
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        self.task = asyncio.current_task()
        try:
            async with asyncio.TaskGroup() as tg:
                for pipe in self.pipes:
                    tg.create_task(pipe.pump())
                    tg.create_task(pipe.deliver())
        except* OSError as group:
            # One side reset or broke the connection: pass that on to the other side as an RST, as
            # the link would carry the peer's RST.
            log.debug("connection ended: %s", group.exceptions[0])
            self._close(rst=True)
        finally:
            # Normally both directions have passed their EOF on: close() sends what the transports
            # still buffer, then the FIN. A no-op on a transport kill() or the RST above closed.
            for w in self.writers:
                w.close()

    def kill(self, rst: bool) -> None:
        """Close both sides now (RST if `rst`, else FIN), discarding whatever is still queued."""
        self._close(rst)
        if self.task is not None:
            self.task.cancel()

    def _close(self, rst: bool) -> None:
        for w in self.writers:
            transport = w.transport
            if transport.is_closing():
                continue
            if rst:
                # Linger on with a zero timeout: close() sends an RST instead of a FIN.
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # abort(), not close(): whatever the proxy still buffers is lost with the link.
            transport.abort()


class _Pipe:
    """One direction of a connection: source -> token bucket -> delay queue -> destination."""

    def __init__(self, proxy: FaultProxy, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                 counter: str):
        self.proxy, self.src, self.dst, self.counter = proxy, src, dst, counter
        self.loop = asyncio.get_running_loop()
        #: (delivery time, chunk); b"" is the source's EOF. Delivery times never decrease.
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.last_due = 0.0
        self.tokens = 0.0                    # refilled to a full bucket on first use
        self.stamp = float("-inf")
        self.has_room = asyncio.Event()       # set by the writer when it takes a chunk off
        self.has_data = asyncio.Event()       # set by the reader when it queues one

    def _full(self) -> bool:
        if self.queued >= MAX_QUEUED:
            return True
        # The head is due but not gone: the destination is slow, so stop reading (back-pressure).
        return self.queued >= BACKLOG and self.queue[0][0] <= self.loop.time()

    async def _allowance(self) -> int:
        """Wait for the token bucket (if `rate` is set); return how much the next read may take."""
        while rate := self.proxy.faults.rate:
            now = self.loop.time()
            burst = max(rate * BURST_SECONDS, 1.0)
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
            self.stamp = now
            want = min(burst, MIN_RATE_READ)
            if self.tokens >= want:
                return max(1, min(CHUNK, int(self.tokens)))
            # Sleep until there is enough; the loop re-reads `rate`, which may change meanwhile.
            await asyncio.sleep((want - self.tokens) / rate)
        return CHUNK

    async def pump(self) -> None:
        """Read the source until EOF, queueing each chunk with its delivery time."""
        faults = self.proxy.faults
        while True:
            while self.queue and self._full():
                self.has_room.clear()
                await self.has_room.wait()
            data = await self.src.read(await self._allowance())
            if data and faults.rate:
                self.tokens -= len(data)
            if data and faults.blackhole:
                self.proxy._stats["bytes_discarded"] += len(data)
                continue
            due = self.loop.time() + faults.delay
            if faults.jitter:
                due += self.proxy._random.uniform(0, faults.jitter)
            self.last_due = due = max(due, self.last_due)      # never overtake an earlier chunk
            self.queue.append((due, data))
            self.queued += len(data)
            self.has_data.set()
            if not data:
                return

    async def deliver(self) -> None:
        """Write each queued chunk to the destination once it is due; pass the EOF on last."""
        while True:
            while not self.queue:
                self.has_data.clear()
                await self.has_data.wait()
            due, data = self.queue[0]
            wait = due - self.loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:                                        # the source's EOF
                await self.proxy._forwarding.wait()
                if self.dst.can_write_eof():
                    self.dst.write_eof()
                return
            if self.proxy.faults.blackhole:                     # lost on the way
                self.proxy._stats["bytes_discarded"] += len(data)
            else:
                self.dst.write(data)
                await self.dst.drain()
                self.proxy._stats[self.counter] += len(data)
            self.queue.popleft()
            self.queued -= len(data)
            self.has_room.set()


# -- control channel ----------------------------------------------------------

def handle_request(proxy: FaultProxy, request) -> dict:
    """Carry out one control request (a decoded JSON object); never raises for bad input."""
    if not isinstance(request, dict):
        return {"ok": False, "error": "a request is a JSON object with an \"op\""}
    op = request.get("op")
    args = {k: v for k, v in request.items() if k != "op"}
    try:
        if op == "set":
            if not args:
                raise ValueError("set needs at least one fault")
            return {"ok": True, "faults": proxy.set(**args)}
        if op in ("reset", "clear", "stats") and args:
            raise ValueError(f"{op} takes no arguments, got {', '.join(sorted(args))}")
        if op == "reset":
            return {"ok": True, "reset": proxy.reset()}
        if op == "clear":
            return {"ok": True, "faults": proxy.clear()}
        if op == "stats":
            return {"ok": True, "stats": proxy.stats()}
        raise ValueError(f"unknown op {op!r} (known: set, reset, clear, stats)")
    except ValueError as e:
        return {"ok": False, "error": str(e)}


async def start_control(proxy: FaultProxy, path: str) -> asyncio.Server:
    """Serve JSON-lines control requests for `proxy` on a unix socket at `path`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:                  # over the reader's limit: answer, then hang up
                    writer.write(b'{"ok": false, "error": "request line too long"}\n')
                    break
                if not line:
                    break
                try:
                    request = json.loads(line)
                except ValueError as e:
                    reply = {"ok": False, "error": f"not JSON: {e}"}
                else:
                    try:
                        reply = handle_request(proxy, request)
                    except Exception as e:          # a bug here must not take the proxy down
                        log.exception("control request %r failed", request)
                        reply = {"ok": False, "error": f"internal error: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    # A socket left by a process that died is in the way; anything else at that path is not ours.
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    return await asyncio.start_unix_server(serve, path)


class ControlError(RuntimeError):
    """The proxy refused a control request (`ok: false`); the message is its error."""


class ProxyControl:
    """Blocking client for a proxy's control socket; one connection per request."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path, self.timeout = path, timeout

    def request(self, request: dict) -> dict:
        """Send one request and return the reply as is, `ok: false` included."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(self.path)
            s.sendall(json.dumps(request).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("the proxy closed the control connection without a reply")
                reply += chunk
        return json.loads(reply)

    def _call(self, request: dict) -> dict:
        reply = self.request(request)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "request failed"))
        return reply

    def set(self, **faults) -> dict:
        """Change faults; return the settings now in force."""
        return self._call({**faults, "op": "set"})["faults"]

    def reset(self) -> int:
        """RST every open connection; return how many there were."""
        return self._call({"op": "reset"})["reset"]

    def clear(self) -> dict:
        return self._call({"op": "clear"})["faults"]

    def stats(self) -> dict:
        return self._call({"op": "stats"})["stats"]


# -- command line -------------------------------------------------------------

def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.faultproxy",
                                description="TCP proxy that injects link faults (see docs/faultproxy.md)")
    p.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT",
                   help="address to listen on (port 0 picks a free one)")
    p.add_argument("--target", type=_address, required=True, metavar="HOST:PORT",
                   help="address every connection is forwarded to")
    p.add_argument("--control", metavar="PATH", help="unix socket for JSON-lines control requests")
    p.add_argument("--seed", type=int, help="seed for jitter and drop, for reproducible runs")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def run() -> int:
        proxy = FaultProxy(*args.listen, *args.target, seed=args.seed)
        await proxy.start()
        control = await start_control(proxy, args.control) if args.control else None
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        # The port line comes once everything (the control socket too) is ready.
        print(json.dumps({"port": proxy.port}), flush=True)
        await stopping.wait()
        if control is not None:
            control.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.control)
        await proxy.stop()
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
