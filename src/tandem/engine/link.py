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
  one syscall (`flush_now()` sends at once when nothing else can join).

A malformed message (wire.ProtocolError) or an exception from the callback
aborts the connection; `done` then holds that error, otherwise a LinkClosed.

With TLS (`connect(..., tls=)`, `listen(..., tls=)`) both ends present a
certificate, and each checks that the other's names the peer node it
expects; a failure is reported to `on_error` as an auth.AuthError. On the
listening side the Link only comes into being once the handshake and that
check have passed, so it never sees a byte from an unauthenticated peer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from . import wire
from .auth import AuthError, cert_names, names_peer
from .waiters import wait, wake_all

log = logging.getLogger("tandem.engine.link")

RECV_BUFFER = 512 << 10
#: Payloads bigger than this are received into a buffer of their own.
BIG = 64 << 10
#: The longest a TLS handshake may take before the connection is dropped.
HANDSHAKE_TIMEOUT = 5.0
#: TLS handshakes a listener runs at once; more connections are dropped at once
#: (each costs the ssl module a 256 KiB buffer before anyone is authenticated).
MAX_HANDSHAKES = 16
#: Over TLS, runs of buffers smaller than a record are joined into pieces of at most
#: this many bytes before encryption (see _join_small).
TLS_JOIN = 64 << 10
#: The largest TLS record's payload.
TLS_RECORD = 16 << 10
#: Big receive buffers kept for reuse (see recycle()), in bytes at most: a fresh
#: 1 MiB bytearray is zero-filled and page-faulted in every time, which was about
#: a quarter of a secondary's CPU under 1 MiB writes.
SPARE_BYTES = 16 << 20


@dataclass(frozen=True)
class TLS:
    """TLS for one end of a link: the context and the node name the peer's certificate must carry."""

    context: ssl.SSLContext
    peer_name: str
    handshake_timeout: float = HANDSHAKE_TIMEOUT


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
        self._buf = bytearray()         # allocated in connection_made
        self._view = memoryview(self._buf)
        self._r = self._w = 0
        self._big: tuple[wire.T, int, bytearray, memoryview] | None = None
        self._spare: dict[int, list[bytearray]] = {}    # payload length -> buffers to reuse
        self._spare_bytes = 0
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
        self._tls = False
        self._dialed = False            # set by connect()
        self._heard = False             # a message arrived before start_dispatch
        self._closed = False            # close() was called
        #: The TLS settings this link was made with (None: plaintext).
        self.tls: TLS | None = None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self.done = self._loop.create_future()
        self.peer = _address(transport)
        self._tls = transport.get_extra_info("ssl_object") is not None
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
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
                    payload = self._payload_buffer(length)
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

    def _payload_buffer(self, length: int) -> bytearray:
        spare = self._spare.get(length)
        if spare:
            self._spare_bytes -= length
            return spare.pop()
        return bytearray(length)

    def recycle(self, payload) -> None:
        """Take back the payload buffer of a big received message for a later one.

        Only for a caller that is done with the message: the next message of that
        size is received into the same memory. Anything else is ignored.
        """
        n = len(payload)
        if type(payload) is bytearray and n > BIG and self._spare_bytes + n <= SPARE_BYTES:
            self._spare.setdefault(n, []).append(payload)
            self._spare_bytes += n

    def _deliver(self, msgs: list[wire.Message]) -> None:
        if self.on_messages is not None:
            self.on_messages(msgs)
            return
        self._heard = True
        self._inbox.extend(msgs)
        self._wake_reader()

    def eof_received(self) -> bool:
        return False                    # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None and isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
            # The TLS layer refused the peer's input: typically, in TLS 1.3, the
            # peer's alert that it rejected our certificate after the handshake.
            self.error = AuthError(f"TLS: connection with {self.peer} failed: {_tls_reason(exc)}")
            if self.on_error is not None:
                self.on_error(self, self.error)
        if (self.error is None and self._tls and self._dialed and not self._heard and not self._closed
                and self.on_messages is None):
            # In TLS 1.3 the listener checks our certificate after our side of the
            # handshake is done; when it refuses it, it just closes (asyncio sends no alert).
            log.warning("%s closed the TLS connection before sending anything (if this repeats, it "
                        "does not accept this node's certificate: its log says why)", self.peer)
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
        self._closed = True
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

    def send(self, buffers: list, now: bool = False) -> None:
        """Queue for the peer. On a closed link this drops the data: whoever needs
        to know what did not arrive counts acknowledgements, not sends.

        now: send it, and whatever is queued before it, at once (see flush_now)
        rather than at the end of the loop pass, without scheduling that pass's flush.
        """
        if self.transport is None:
            return
        self._out += buffers
        if now:
            self._flush()
        elif not self._out_scheduled:
            self._out_scheduled = True
            self._loop.call_soon(self._flush)

    def flush_now(self) -> None:
        """Send what is queued without waiting for the end of the loop pass: for a
        caller that knows nothing else will join it (a lone write, the acks of a
        whole receive), so a round trip does not pay an extra loop iteration."""
        if self._out:
            self._flush()

    def _flush(self) -> None:
        self._out_scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            if self._tls and len(out) > 1:
                out = _join_small(out)
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

    def _feed(self, data: bytes) -> None:
        """Take bytes that arrived before this Link was the transport's protocol."""
        view = memoryview(data)
        while view and self.error is None:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def _wake_reader(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def connect(host: str, port: int, timeout: float,
                  on_error: Callable[[Link, BaseException], None] | None = None,
                  tls: TLS | None = None) -> Link:
    """Dial the peer. With tls, the handshake (bounded by timeout too) must succeed and the
    server's certificate must name tls.peer_name; otherwise on_error hears an AuthError and
    this raises an OSError, like any failed connection attempt."""
    loop = asyncio.get_running_loop()
    made: list[Link] = []

    def factory() -> Link:
        made.append(Link(on_error=on_error))
        return made[-1]

    kw = {} if tls is None else {"ssl": tls.context, "server_hostname": tls.peer_name,
                                 "ssl_handshake_timeout": timeout}
    try:
        async with asyncio.timeout(timeout):
            _, link = await loop.create_connection(factory, host, port, **kw)
    except ssl.SSLError as e:
        if made and not isinstance(e, ssl.SSLEOFError):
            made[-1].peer = f"{host}:{port}"
            made[-1].fail(AuthError(f"TLS handshake with {host}:{port} failed: {_tls_reason(e)}"))
        raise
    if tls is not None:
        cert = link.transport.get_extra_info("peercert")
        if not names_peer(cert, tls.peer_name):    # check_hostname passed: a wildcard or an IP
            err = AuthError(f"unknown peer {link.peer}: its certificate is for {cert_names(cert)}, "
                            f"not for {tls.peer_name!r}")
            link.fail(err)
            raise ConnectionRefusedError(str(err))
        _established(link.transport, link.peer, tls.peer_name)
    link.tls, link._dialed = tls, True
    return link


async def listen(host: str, port: int, on_connect: Callable[[Link], None],
                 on_error: Callable[[Link, BaseException], None] | None = None,
                 tls: Callable[[], TLS | None] | None = None) -> asyncio.Server:
    """Accept links. tls is asked at every connection, so the settings can change while the
    listener stays bound; None from it (or no tls) means plaintext."""
    loop = asyncio.get_running_loop()
    handshakes: set[asyncio.Task] = set()

    def factory() -> asyncio.BaseProtocol:
        settings = tls() if tls is not None else None
        if settings is None:
            return Link(on_connect, on_error)
        return _Handshake(settings, on_connect, on_error, handshakes)

    return await loop.create_server(factory, host, port)


class _Handshake(asyncio.Protocol):
    """An accepted connection until TLS is up and the client's certificate names the peer.

    The protocol of the TCP transport first (reading paused until start_tls
    takes over), then of the TLS transport for the moment between the end of
    the handshake and the Link taking over, keeping what arrives meanwhile.
    """

    def __init__(self, tls: TLS, on_connect, on_error, running: set[asyncio.Task]):
        self._tls, self._on_connect, self._on_error = tls, on_connect, on_error
        self._running = running
        self._early = bytearray()
        self._gone = False

    def connection_made(self, transport) -> None:
        transport.pause_reading()
        if len(self._running) >= MAX_HANDSHAKES:
            log.warning("dropping a connection from %s: %d TLS handshakes are running already",
                        _address(transport), len(self._running))
            transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._run(transport))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def data_received(self, data: bytes) -> None:
        self._early += data
        if len(self._early) > RECV_BUFFER:
            self._gone = True           # nothing legitimate sends that much at once

    def eof_received(self) -> bool:
        self._gone = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True

    async def _run(self, raw: asyncio.Transport) -> None:
        tls = self._tls
        link = Link(self._on_connect, self._on_error)
        link.peer = _address(raw)
        try:
            transport = await asyncio.get_running_loop().start_tls(
                raw, self, tls.context, server_side=True, ssl_handshake_timeout=tls.handshake_timeout)
        except ssl.SSLError as e:
            if isinstance(e, ssl.SSLEOFError):
                log.debug("TLS handshake from %s: the client went away", link.peer)
            else:
                plain = e.reason == "WRONG_VERSION_NUMBER"
                hint = " (not TLS: is the peer in plaintext mode?)" if plain else ""
                link.fail(AuthError(f"TLS handshake from {link.peer} failed: {_tls_reason(e)}{hint}"))
            return
        except (OSError, TimeoutError) as e:  # closed, reset, or too slow: a stray connection
            log.debug("TLS handshake from %s did not finish: %r", link.peer, e)
            raw.abort()
            return
        cert = transport.get_extra_info("peercert")
        if not names_peer(cert, tls.peer_name):
            transport.abort()
            link.fail(AuthError(f"unknown peer {link.peer}: its certificate is for {cert_names(cert)}, "
                                f"not for {tls.peer_name!r}"))
            return
        if self._gone:
            transport.abort()
            return
        _established(transport, link.peer, tls.peer_name)
        link.tls = tls
        transport.set_protocol(link)
        link.connection_made(transport)
        if self._early and link.transport is not None and not link.transport.is_closing():
            link._feed(bytes(self._early))


def _join_small(out: list) -> list:
    """Join runs of small buffers into pieces of up to TLS_JOIN bytes.

    The ssl transport encrypts each buffer it is given into records of its own:
    a 26-byte DATA header and its 4 KiB block were two records, and 16 writes
    coalesced in one loop pass were 32. A copy of up to 64 KiB is cheaper than
    that; buffers of a full record (TLS_RECORD) or more go as they are.
    """
    joined, run, run_len = [], [], 0
    for buf in out:
        n = len(buf)
        if n >= TLS_RECORD:
            if run:
                joined.append(b"".join(run) if len(run) > 1 else run[0])
                run, run_len = [], 0
            joined.append(buf)
            continue
        if run_len + n > TLS_JOIN:
            joined.append(b"".join(run) if len(run) > 1 else run[0])
            run, run_len = [], 0
        run.append(buf)
        run_len += n
    if run:
        joined.append(b"".join(run) if len(run) > 1 else run[0])
    return joined


def _address(transport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def _established(transport, address: str, peer_name: str) -> None:
    version, cipher = transport.get_extra_info("ssl_object").version(), transport.get_extra_info("cipher")
    log.info("tls established peer=%s from=%s version=%s cipher=%s", peer_name, address, version,
             cipher[0] if cipher else "?")


def _tls_reason(e: ssl.SSLError) -> str:
    """What went wrong, without the _ssl.c location: 'tlsv1 alert unknown ca', ..."""
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {e.verify_message}"
    return (e.reason or str(e)).lower().replace("_", " ")
