"""Property tests for the NBD server: hostile input never crashes it and never writes.

Every example runs a fresh server on a unix socket, throws bytes at it from a raw client,
and then checks that
* the event loop saw no unhandled exception and no connection ended in "internal-error",
* no write method (write, trim, write_zeroes) of the export was called unless the test
  sent a request that is valid by construction,
* the server still accepts a new connection and serves it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tandem.engine.memexport import MemExport
from tandem.engine.nbd import NBDServer

IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
REQUEST_MAGIC_BYTES = struct.pack(">I", REQUEST_MAGIC)
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK = 1
READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES = 0, 1, 2, 3, 4, 6
FUA, NO_HOLE = 1, 2
EPERM, EINVAL, ENOSPC = 1, 22, 28

SIZE = 1024 * 1024
MAX_PAYLOAD = 32 * 1024 * 1024
WRITE_METHODS = {"write", "trim", "write_zeroes"}
TIMEOUT = 20

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="nbdf-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Recorder:
    """An Export (backed by MemExport) that records which methods were called."""

    def __init__(self, read_only: bool = False) -> None:
        self.inner = MemExport(SIZE, read_only=read_only)
        self.name = ""
        self.size = SIZE
        self.read_only = read_only
        self.block_size = 4096
        self.calls: list[tuple[Any, ...]] = []

    async def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", offset, length))
        assert 0 < length <= MAX_PAYLOAD and offset + length <= SIZE
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.calls.append(("write", offset, len(data)))
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        self.calls.append(("flush",))

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        self.calls.append(("trim", offset, length))
        await self.inner.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self.calls.append(("write_zeroes", offset, length))
        await self.inner.write_zeroes(offset, length, fua, may_trim)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it hangs up (a reset counts as hanging up: a unix
    socket closed with unread data in it resets its peer)."""
    chunks = []
    try:
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


async def _hello(path: str, flags: int = 3) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    await reader.readexactly(18)
    writer.write(struct.pack(">I", flags))
    return reader, writer


async def _go(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _hello(path)
    data = struct.pack(">IH", 0, 0)
    writer.write(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", await reader.readexactly(20))
        assert magic == OPT_REPLY_MAGIC
        await reader.readexactly(length)
        if rtype == REP_ACK:
            return reader, writer
        assert not rtype & 0x80000000


async def _still_serving(path: str) -> None:
    reader, writer = await _go(path)
    writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, READ, 42, 0, 16))
    magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
    assert (magic, error, handle) == (SIMPLE_REPLY_MAGIC, 0, 42)
    await reader.readexactly(16)
    writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, DISC, 43, 0, 0))
    assert await asyncio.wait_for(reader.read(1), TIMEOUT) == b""
    writer.close()


def _run(sockdir: str, export: Recorder, scenario: Any) -> tuple[Any, list[tuple[Any, ...]]]:
    """Serve ``export``, run ``scenario(path)``, then check that the server is healthy.

    Returns what the scenario returned and the export calls it caused (the health check's
    own read comes after).
    """

    async def main() -> tuple[Any, list[tuple[Any, ...]]]:
        loop = asyncio.get_running_loop()
        loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
        server = NBDServer(lambda name: export if name == "" else None, list_exports=lambda: [""])
        path = os.path.join(sockdir, "f.sock")
        await server.start_unix(path)
        try:
            async with asyncio.timeout(TIMEOUT):
                result = await scenario(path)
                calls = list(export.calls)
                await _still_serving(path)
        finally:
            await server.close()
        stats = server.stats()
        assert "internal-error" not in stats["closed"], stats
        assert not loop_errors, loop_errors
        return result, calls

    return asyncio.run(main())


# --- strategies ---------------------------------------------------------------------------------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
near_edges = st.one_of(
    st.integers(0, 2 * SIZE),
    st.integers(2**64 - 2 * SIZE, 2**64 - 1),
    st.integers(2**32 - 4096, 2**32 + 4096),
    u64,
)
lengths = st.one_of(st.integers(0, 8192), st.integers(MAX_PAYLOAD - 2, MAX_PAYLOAD + 2), u32)
commands = st.one_of(st.sampled_from([READ, WRITE, DISC, FLUSH, TRIM, 5, WRITE_ZEROES, 7, 8]), u16)


@st.composite
def request_frames(draw: st.DrawFn) -> bytes:
    """A request header with the right magic but anything else, plus some payload bytes."""
    header = struct.pack(
        ">IHHQQI", REQUEST_MAGIC, draw(u16), draw(commands), draw(u64), draw(near_edges), draw(lengths)
    )
    return header + draw(st.binary(max_size=512))


streams = st.lists(
    st.one_of(st.binary(min_size=1, max_size=256), request_frames()), min_size=1, max_size=8
).map(b"".join)


@st.composite
def options(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "info", "raw"]))
    if kind == "raw":
        return draw(st.binary(min_size=1, max_size=64))
    opt = draw(
        st.one_of(
            st.sampled_from([OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, 4, 5, OPT_INFO, OPT_GO, 8, 9, 10, 11]), u32
        )
    )
    if kind == "info":
        name = draw(st.sampled_from([b"", b"x", b"\xff", b"a\0b"]))
        infos = draw(st.lists(u16, max_size=5))
        namelen = draw(st.one_of(st.just(len(name)), u32))
        nreq = draw(st.one_of(st.just(len(infos)), u16))
        data = (
            struct.pack(">I", namelen)
            + name
            + struct.pack(">H", nreq)
            + b"".join(struct.pack(">H", i) for i in infos)
        )
    else:
        data = draw(st.binary(max_size=64))
    length = draw(st.one_of(st.just(len(data)), st.integers(0, 70_000), u32))
    return struct.pack(">QII", IHAVEOPT, opt, length) + data


# --- properties -----------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(min_size=1, max_size=4096))
def test_garbage_after_go_is_dropped_without_touching_the_export(sockdir: str, data: bytes) -> None:
    assume(data[:4] != REQUEST_MAGIC_BYTES)
    export = Recorder()

    async def scenario(path: str) -> None:
        reader, writer = await _go(path)
        writer.write(data)
        writer.write_eof()
        # the first frame is already bad: the server answers nothing and hangs up
        assert await _read_all(reader) == b""
        writer.close()

    _, calls = _run(sockdir, export, scenario)
    assert calls == []


@FUZZ
@given(data=streams)
def test_any_stream_after_go_never_writes_a_read_only_export(sockdir: str, data: bytes) -> None:
    export = Recorder(read_only=True)

    async def scenario(path: str) -> bytes:
        reader, writer = await _go(path)
        collector = asyncio.ensure_future(_read_all(reader))
        writer.write(data)
        writer.write_eof()
        out = await collector
        writer.close()
        return out

    out, calls = _run(sockdir, export, scenario)
    assert [c for c in calls if c[0] in WRITE_METHODS] == []
    # whatever came back is a sequence of well-formed simple replies
    while out:
        assert len(out) >= 16
        magic, _error, _handle = struct.unpack(">IIQ", out[:16])
        assert magic == SIMPLE_REPLY_MAGIC
        out = out[16:]
        # (a read's payload follows its reply; skip it by finding the next reply magic)
        if out and out[:4] != struct.pack(">I", SIMPLE_REPLY_MAGIC):
            nxt = out.find(struct.pack(">I", SIMPLE_REPLY_MAGIC))
            out = b"" if nxt < 0 else out[nxt:]


@FUZZ
@given(data=streams)
def test_any_stream_after_go_never_crashes_a_writable_export(sockdir: str, data: bytes) -> None:
    export = Recorder()

    async def scenario(path: str) -> None:
        reader, writer = await _go(path)
        collector = asyncio.ensure_future(_read_all(reader))
        writer.write(data)
        writer.write_eof()
        await collector
        writer.close()

    _, calls = _run(sockdir, export, scenario)
    # writes may happen here (a random frame can be a valid write), but only inside the export
    for call in (c for c in calls if c[0] in WRITE_METHODS):
        assert call[2] > 0 and call[1] + call[2] <= SIZE


@FUZZ
@given(flags=st.one_of(st.sampled_from([0, 1, 2, 3]), u32), opts=st.lists(options(), max_size=6))
def test_random_option_phases(sockdir: str, flags: int, opts: list[bytes]) -> None:
    export = Recorder()

    async def scenario(path: str) -> bytes:
        reader, writer = await _hello(path, flags)
        collector = asyncio.ensure_future(_read_all(reader))
        for opt in opts:
            writer.write(opt)
        writer.write_eof()
        out = await collector
        writer.close()
        return out

    out, calls = _run(sockdir, export, scenario)
    assert calls == []
    # the server's side of the haggling is well-formed option replies (an accepted
    # NBD_OPT_EXPORT_NAME ends it with its 10- or 134-byte answer)
    while len(out) >= 20:
        magic, _opt, _rtype, length = struct.unpack(">QIII", out[:20])
        if magic != OPT_REPLY_MAGIC:
            break
        out = out[20 + length :]
    assert len(out) in (0, 10, 134), out[:32]


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[int, int, int, int, bytes, int]:
    """(flags, cmd, offset, length, payload, expected error) for a request that is invalid by
    construction (on a writable export; a read-only one refuses writes with valid flags first)."""
    kind = draw(st.sampled_from(["range", "zero", "flags", "unknown", "huge-read"]))
    if kind == "range":
        cmd = draw(st.sampled_from([READ, WRITE, TRIM, WRITE_ZEROES]))
        length = draw(st.integers(1, 4096))
        offset = draw(
            st.one_of(st.integers(SIZE - length + 1, SIZE + 8192), st.integers(2**64 - 8192, 2**64 - 1))
        )
        payload = bytes(length) if cmd == WRITE else b""
        return 0, cmd, offset, length, payload, (ENOSPC if cmd in (WRITE, WRITE_ZEROES) else EINVAL)
    if kind == "zero":
        cmd = draw(st.sampled_from([READ, WRITE, TRIM, WRITE_ZEROES]))
        return 0, cmd, draw(st.integers(0, SIZE)), 0, b"", EINVAL
    if kind == "flags":
        cmd = draw(st.sampled_from([READ, WRITE, FLUSH, TRIM, WRITE_ZEROES]))
        allowed = FUA | (NO_HOLE if cmd == WRITE_ZEROES else 0)
        flags = draw(u16.filter(lambda f: f & ~allowed))
        length = 0 if cmd == FLUSH else draw(st.integers(1, 4096))
        payload = bytes(length) if cmd == WRITE else b""
        return flags, cmd, 0, length, payload, EINVAL
    if kind == "unknown":
        cmd = draw(st.one_of(st.sampled_from([5, 7, 8, 9]), st.integers(10, 2**16 - 1)))
        return draw(u16), cmd, draw(u64), draw(u32), b"", EINVAL
    return (
        draw(u16.map(lambda f: f & FUA)),
        READ,
        0,
        draw(st.integers(MAX_PAYLOAD + 1, 2**32 - 1)),
        b"",
        EINVAL,
    )


@FUZZ
@given(requests=st.lists(hostile_requests(), min_size=1, max_size=20), read_only=st.booleans())
def test_valid_but_hostile_requests_get_errors_and_never_reach_the_export(
    sockdir: str, requests: list[tuple[int, int, int, int, bytes, int]], read_only: bool
) -> None:
    export = Recorder(read_only=read_only)

    async def scenario(path: str) -> None:
        reader, writer = await _go(path)
        expected = {}
        for handle, (flags, cmd, offset, length, payload, error) in enumerate(requests):
            writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload)
            allowed = FUA | (NO_HOLE if cmd == WRITE_ZEROES else 0)
            if read_only and cmd in (WRITE, TRIM, WRITE_ZEROES) and not flags & ~allowed:
                error = EPERM  # refused for being read-only before length and range are looked at
            expected[handle] = error
        got = {}
        for _ in requests:
            magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
            assert magic == SIMPLE_REPLY_MAGIC
            got[handle] = error
        assert got == expected
        # still in sync: a valid read works on the same connection
        writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, READ, 999, SIZE - 8, 8))
        assert struct.unpack(">IIQ", await reader.readexactly(16)) == (SIMPLE_REPLY_MAGIC, 0, 999)
        assert await reader.readexactly(8) == bytes(8)
        writer.close()

    _, calls = _run(sockdir, export, scenario)
    assert calls == [("read", SIZE - 8, 8)]
