"""The replication link: one TCP connection between the two daemons of a resource.

An asyncio BufferedProtocol rather than streams, because the data path is
all small messages and every await costs a loop iteration:

- received bytes are decoded where they land: small messages out of one
  receive buffer, big ones (over BIG) straight into a buffer of their own,
  so a 1 MiB write is copied once between the kernel and the disk;
- during the handshake, messages wait in an inbox for `read_message()`;
  afterwards they go to the `on_messages` callback, one call per receive,
  so the secondary applies and acknowledges a whole batch without waking
  any task;
- `send()` queues and everything queued in one loop iteration leaves in
  one syscall.

A malformed message (wire.ProtocolError) or an exception from the callback
aborts the connection; `done` then holds that error, otherwise a LinkClosed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from . import wire
from .waiters import wait, wake_all

RECV_BUFFER = 512 << 10
#: Payloads bigger than this are received into a buffer of their own.
BIG = 64 << 10


class LinkClosed(ConnectionError):
    """The connection ended (EOF, reset, or closed by us)."""


class Link(asyncio.BufferedProtocol):
    def __init__(self, on_connect: Callable[[Link], None] | None = None,
                 on_error: Callable[[Link, BaseException], None] | None = None):
        self._on_connect = on_connect
        #: Told once about the error that ends the link (malformed input, a failing callback).
        self.on_error = on_error
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._r = self._w = 0
        self._big: tuple[wire.T, int, bytearray, memoryview] | None = None
        self._got = 0
        self._inbox: collections.deque[wire.Message] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self.on_messages: Callable[[list[wire.Message]], None] | None = None
        self._out: list = []
        self._out_scheduled = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self.reading_paused = False
        self.error: BaseException | None = None
        self.done: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self.done = self._loop.create_future()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._on_connect is not None:
            self._on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return self._big[3][self._got:]
        if len(self._buf) - self._w < BIG + wire.HEADER.size:
            # Move the unparsed tail to the front; it is shorter than one small message.
            tail = self._w - self._r
            self._buf[:tail] = self._view[self._r:self._w]
            self._r, self._w = 0, tail
        return self._view[self._w:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.error is not None:
            return
        try:
            if self._big is not None:
                self._got += nbytes
                t, flags, payload, _ = self._big
                if self._got < len(payload):
                    return
                self._big = None
                msgs = [wire.parse_payload(t, flags, payload)]
            else:
                self._w += nbytes
                msgs = self._parse()
            if msgs:
                self._deliver(msgs)
        except Exception as exc:        # noqa: BLE001 - any failure ends this one link
            self.fail(exc)

    def _parse(self) -> list[wire.Message]:
        buf, view = self._buf, self._view
        r, w = self._r, self._w
        hsize = wire.HEADER.size
        unpack = wire.HEADER.unpack_from
        msgs = []
        try:
            while w - r >= hsize:
                t, flags, length = wire.parse_header(unpack(buf, r))
                if length > BIG:
                    payload = bytearray(length)
                    have = min(w - r - hsize, length)
                    payload[:have] = view[r + hsize:r + hsize + have]
                    r += hsize + have
                    if have == length:
                        msgs.append(wire.parse_payload(t, flags, payload))
                        continue
                    self._big, self._got = (t, flags, payload, memoryview(payload)), have
                    break
                end = r + hsize + length
                if end > w:
                    break
                # A copy: the receive buffer is reused, the message may be kept.
                msgs.append(wire.parse_payload(t, flags, bytes(view[r + hsize:end])))
                r = end
        finally:
            if r == w:
                r = w = 0
            self._r, self._w = r, w
        return msgs

    def _deliver(self, msgs: list[wire.Message]) -> None:
        if self.on_messages is not None:
            self.on_messages(msgs)
            return
        self._inbox.extend(msgs)
        self._wake_reader()

    def eof_received(self) -> bool:
        return False                    # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = LinkClosed(f"link to {self.peer} lost" + (f": {exc}" if exc else ""))
        if self.done is not None and not self.done.done():
            self.done.set_exception(self.error)
            self.done.exception()       # retrieved: not every link is awaited
        self._wake_reader()
        wake_all(self._drain_waiters)
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        wake_all(self._drain_waiters)

    # -- for the resource --------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """End the link because of exc (which `done` and `read_message` then raise)."""
        if self.error is None:
            self.error = exc
            if self.on_error is not None:
                self.on_error(self, exc)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def finish(self) -> None:
        """Close after sending what is queued (a refusal the peer must hear about)."""
        if self.transport is not None and not self.transport.is_closing():
            self._flush()
            self.transport.close()

    async def read_message(self, timeout: float) -> wire.Message:
        """The next message, during the handshake (before on_messages is set)."""
        async with asyncio.timeout(timeout):
            while not self._inbox:
                if self.error is not None:
                    raise self.error
                self._waiter = self._loop.create_future()
                await self._waiter
        return self._inbox.popleft()

    def start_dispatch(self, on_messages: Callable[[list[wire.Message]], None]) -> None:
        """From now on every received message goes to on_messages, in order."""
        self.on_messages = on_messages
        if self._inbox:
            msgs = list(self._inbox)
            self._inbox.clear()
            try:
                on_messages(msgs)
            except Exception as exc:     # noqa: BLE001
                self.fail(exc)

    def send(self, buffers: list) -> None:
        """Queue for the peer. On a closed link this drops the data: whoever needs
        to know what did not arrive counts acknowledgements, not sends."""
        if self.transport is None:
            return
        self._out += buffers
        if not self._out_scheduled:
            self._out_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._out_scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    async def drain(self) -> None:
        """Wait while the send buffer is over its high-water mark (or until the link ends)."""
        while self._write_paused and self.transport is not None:
            await wait(self._drain_waiters)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def _wake_reader(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def connect(host: str, port: int, timeout: float,
                  on_error: Callable[[Link, BaseException], None] | None = None) -> Link:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, link = await loop.create_connection(lambda: Link(on_error=on_error), host, port)
    return link


async def listen(host: str, port: int, on_connect: Callable[[Link], None],
                 on_error: Callable[[Link, BaseException], None] | None = None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Link(on_connect, on_error), host, port)

