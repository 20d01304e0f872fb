"""The NBD server (tandem.engine.nbd) against a small hand-written client over a real unix socket.

The client here is deliberately independent of the server code: it has its own constants
and framing, straight from the NBD protocol document.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from tandem.engine.fileexport import FileExport
from tandem.engine.memexport import MemExport
from tandem.engine.nbd import NBDServer

# --- protocol constants (independent of the server module) ----------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

C_FIXED_NEWSTYLE, C_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_UNKNOWN = 2**31 + 1, 2**31 + 2, 2**31 + 3, 2**31 + 6
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

F_HAS_FLAGS, F_READ_ONLY, F_SEND_FLUSH, F_SEND_FUA = 1, 2, 4, 8
F_SEND_TRIM, F_SEND_WRITE_ZEROES, F_CAN_MULTI_CONN = 32, 64, 256

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 108

MiB = 1024 * 1024
TIMEOUT = 20


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function in a fresh event loop, with a timeout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            async with asyncio.timeout(TIMEOUT):
                await fn(*args, **kwargs)

        asyncio.run(main())

    return wrapper


@pytest.fixture
def sockdir() -> Any:
    # short path: unix socket paths are limited to 107 bytes
    path = tempfile.mkdtemp(prefix="nbdt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Recording:
    """An Export wrapper that records every call and can be slowed down or made to fail."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        self.read_only = inner.read_only
        self.block_size = inner.block_size
        self.description = getattr(inner, "description", None)
        self.calls: list[tuple[Any, ...]] = []
        self.gates: dict[tuple[str, int], asyncio.Event] = {}
        self.fail: dict[str, BaseException] = {}
        self.started: list[tuple[str, int]] = []

    async def _enter(self, method: str, offset: int) -> None:
        self.started.append((method, offset))
        gate = self.gates.get((method, offset))
        if gate is not None:
            await gate.wait()
        exc = self.fail.get(method)
        if exc is not None:
            raise exc

    async def read(self, offset: int, length: int) -> bytes:
        await self._enter("read", offset)
        self.calls.append(("read", offset, length))
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        await self._enter("write", offset)
        self.calls.append(("write", offset, len(data), fua))
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        await self._enter("flush", 0)
        self.calls.append(("flush",))
        await self.inner.flush()

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._enter("trim", offset)
        self.calls.append(("trim", offset, length, fua))
        await self.inner.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        await self._enter("write_zeroes", offset)
        self.calls.append(("write_zeroes", offset, length, fua, may_trim))
        await self.inner.write_zeroes(offset, length, fua, may_trim)


class Client:
    """A minimal asyncio NBD client: fixed newstyle, simple replies, pipelining by handle."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer
        self.hello: tuple[int, int, int] = (0, 0, 0)
        self.pending: dict[int, tuple[int, int]] = {}
        self.next_handle = 1
        self.size = 0
        self.flags = 0

    @classmethod
    async def connect(cls, path: str, flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> Client:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        client.hello = struct.unpack(">QQH", await reader.readexactly(18))
        writer.write(struct.pack(">I", flags))
        return client

    @classmethod
    async def open(cls, path: str, name: str = "") -> Client:
        client = await cls.connect(path)
        info = await client.go(name)
        assert info["final"] == REP_ACK, info
        return client

    def send_option(self, opt: int, data: bytes = b"") -> None:
        self.w.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    async def option_replies(self, opt: int) -> list[tuple[int, bytes]]:
        replies = []
        while True:
            magic, ropt, rtype, length = struct.unpack(">QIII", await self.r.readexactly(20))
            assert magic == OPT_REPLY_MAGIC
            assert ropt == opt
            replies.append((rtype, await self.r.readexactly(length)))
            if rtype == REP_ACK or rtype & 0x80000000:
                return replies

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.send_option(opt, data)
        return await self.option_replies(opt)

    async def go(self, name: str = "", infos: tuple[int, ...] = (), opt: int = OPT_GO) -> dict[str, Any]:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
        replies = await self.option(opt, data)
        result: dict[str, Any] = {"final": replies[-1][0], "message": replies[-1][1], "infos": []}
        for rtype, payload in replies[:-1]:
            assert rtype == REP_INFO
            (itype,) = struct.unpack(">H", payload[:2])
            result["infos"].append(itype)
            if itype == INFO_EXPORT:
                result["size"], result["flags"] = struct.unpack(">QH", payload[2:])
            elif itype == INFO_BLOCK_SIZE:
                result["block"] = struct.unpack(">III", payload[2:])
            elif itype == INFO_NAME:
                result["name"] = payload[2:].decode()
            elif itype == INFO_DESCRIPTION:
                result["description"] = payload[2:].decode()
        if opt == OPT_GO and result["final"] == REP_ACK:
            self.size, self.flags = result["size"], result["flags"]
        return result

    def send(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
        handle: int | None = None,
    ) -> int:
        if handle is None:
            handle = self.next_handle
            self.next_handle += 1
        self.pending[handle] = (cmd, length)
        self.w.write(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload)
        return handle

    async def reply(self) -> tuple[int, int, bytes]:
        magic, error, handle = struct.unpack(">IIQ", await self.r.readexactly(16))
        assert magic == SIMPLE_REPLY_MAGIC
        cmd, length = self.pending.pop(handle)
        data = b""
        if cmd == READ and error == 0:
            data = await self.r.readexactly(length)
        return handle, error, data

    async def call(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> tuple[int, bytes]:
        handle = self.send(cmd, offset, length, flags, payload)
        got, error, data = await self.reply()
        assert got == handle
        return error, data

    async def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        error, data = await self.call(READ, offset, length, flags)
        assert error == 0, error
        return data

    async def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        error, _ = await self.call(WRITE, offset, len(data), flags, data)
        return error

    async def disc(self) -> None:
        self.send(DISC)
        self.pending.clear()
        await self.closed()

    async def closed(self) -> bool:
        """True once the server has closed the connection (EOF), having sent nothing more."""
        data = await asyncio.wait_for(self.r.read(1), TIMEOUT)
        self.w.close()
        return data == b""

    def close(self) -> None:
        self.w.close()


@contextlib.asynccontextmanager
async def serving(
    sockdir: str,
    exports: dict[str, Any],
    *,
    listing: bool = True,
    **kwargs: Any,
) -> AsyncIterator[tuple[NBDServer, str]]:
    looked_up: list[str] = []

    def lookup(name: str) -> Any:
        looked_up.append(name)
        return exports.get(name)

    server = NBDServer(lookup, list_exports=(lambda: list(exports)) if listing else None, **kwargs)
    server.looked_up = looked_up  # type: ignore[attr-defined]
    path = os.path.join(sockdir, "nbd.sock")
    await server.start_unix(path)
    try:
        yield server, path
    finally:
        await server.close()


def mem(size: int = MiB, **kwargs: Any) -> Recording:
    return Recording(MemExport(size, **kwargs))


# --- handshake -------------------------------------------------------------------------------


@async_test
async def test_greeting_is_fixed_newstyle_with_no_zeroes(sockdir: str) -> None:
    async with serving(sockdir, {"": mem()}) as (_, path):
        client = await Client.connect(path)
        assert client.hello == (NBDMAGIC, IHAVEOPT, 0b11)
        client.close()


@pytest.mark.parametrize("flags", [0x4, 0x80000000, 0xFFFFFFFF])
@async_test
async def test_unknown_client_flags_end_the_connection(sockdir: str, flags: int) -> None:
    async with serving(sockdir, {"": mem()}) as (server, path):
        client = await Client.connect(path, flags=flags)
        assert await client.closed()
        assert server.stats()["closed"] == {"bad-client-flags": 1}


@async_test
async def test_opt_list(sockdir: str) -> None:
    async with serving(sockdir, {"vol0": mem(), "vol1": mem()}) as (_, path):
        client = await Client.connect(path)
        replies = await client.option(OPT_LIST)
        assert [r[0] for r in replies] == [REP_SERVER, REP_SERVER, REP_ACK]
        names = []
        for _, payload in replies[:-1]:
            (n,) = struct.unpack(">I", payload[:4])
            names.append(payload[4 : 4 + n].decode())
        assert names == ["vol0", "vol1"]
        # NBD_OPT_LIST carries no data
        assert (await client.option(OPT_LIST, b"x"))[-1][0] == REP_ERR_INVALID
        client.close()


@async_test
async def test_opt_list_without_a_lister_is_refused_by_policy(sockdir: str) -> None:
    async with serving(sockdir, {"": mem()}, listing=False) as (_, path):
        client = await Client.connect(path)
        assert (await client.option(OPT_LIST))[-1][0] == REP_ERR_POLICY
        assert (await client.go(""))["final"] == REP_ACK
        client.close()


@async_test
async def test_opt_info_then_go_with_block_size_name_and_description(sockdir: str) -> None:
    export = mem(8 * MiB, name="vol0", block_size=65536, description="first volume")
    async with serving(sockdir, {"vol0": export}) as (server, path):
        client = await Client.connect(path)
        info = await client.go("vol0", (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE), opt=OPT_INFO)
        assert info["final"] == REP_ACK
        assert info["name"] == "vol0"
        assert info["description"] == "first volume"
        assert info["block"] == (1, 65536, 32 * MiB)
        assert info["size"] == 8 * MiB
        expected = (
            F_HAS_FLAGS | F_SEND_FLUSH | F_SEND_FUA | F_SEND_TRIM | F_SEND_WRITE_ZEROES | F_CAN_MULTI_CONN
        )
        assert info["flags"] == expected
        assert info["infos"][-1] == INFO_EXPORT
        # INFO leaves us in option haggling; GO (no info requests) enters transmission
        info = await client.go("vol0")
        assert info["final"] == REP_ACK
        assert "name" not in info and "description" not in info
        assert info["block"] == (1, 65536, 32 * MiB)  # sent whether requested or not
        assert await client.read(0, 512) == bytes(512)
        await client.disc()
        assert server.stats()["handshakes_completed"] == 1


@async_test
async def test_read_only_export_flags(sockdir: str) -> None:
    async with serving(sockdir, {"ro": mem(read_only=True)}) as (_, path):
        client = await Client.connect(path)
        info = await client.go("ro")
        assert info["flags"] == F_HAS_FLAGS | F_READ_ONLY | F_SEND_FLUSH | F_SEND_FUA | F_CAN_MULTI_CONN
        await client.disc()


@async_test
async def test_default_export_is_looked_up_like_any_other_name(sockdir: str) -> None:
    async with serving(sockdir, {"": mem(2 * MiB)}) as (server, path):
        client = await Client.open(path, "")
        assert client.size == 2 * MiB
        assert server.looked_up == [""]  # type: ignore[attr-defined]
        await client.disc()


@async_test
async def test_unknown_export_is_an_error_the_client_can_recover_from(sockdir: str) -> None:
    async with serving(sockdir, {"vol0": mem()}) as (_, path):
        client = await Client.connect(path)
        for opt in (OPT_INFO, OPT_GO):
            info = await client.go("nope", opt=opt)
            assert info["final"] == REP_ERR_UNKNOWN
        assert (await client.go("vol0"))["final"] == REP_ACK
        await client.disc()


@pytest.mark.parametrize(
    "opt",
    [
        OPT_STARTTLS,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        OPT_EXTENDED_HEADERS,
        4,
        99,
    ],
)
@async_test
async def test_unsupported_options_get_err_unsup(sockdir: str, opt: int) -> None:
    async with serving(sockdir, {"": mem()}) as (_, path):
        client = await Client.connect(path)
        assert (await client.option(opt, b"\0\0\0\0"))[-1][0] == REP_ERR_UNSUP
        assert (await client.option(opt))[-1][0] == REP_ERR_UNSUP
        # ... and the client falls back to simple replies
        assert (await client.go(""))["final"] == REP_ACK
        assert await client.write(0, b"abc") == 0
        assert await client.read(0, 3) == b"abc"
        await client.disc()


@pytest.mark.parametrize(
    "data",
    [
        b"",  # too short
        b"\0\0\0\x10vol0\0\0",  # name longer than the option
        b"\0\0\0\x04vol0\0\x01",  # one info request announced, none sent
        b"\0\0\0\x04vol0\0\0\0",  # trailing byte
        b"\0\0\0\x02\xff\xfe\0\0",  # not UTF-8
        b"\0\0\0\x02a\0\0\0",  # NUL in the name
    ],
)
@async_test
async def test_malformed_info_and_go_get_err_invalid(sockdir: str, data: bytes) -> None:
    async with serving(sockdir, {"vol0": mem()}) as (_, path):
        client = await Client.connect(path)
        for opt in (OPT_INFO, OPT_GO):
            assert (await client.option(opt, data))[-1][0] == REP_ERR_INVALID
        assert (await client.go("vol0"))["final"] == REP_ACK
        await client.disc()


@async_test
async def test_unknown_info_requests_are_ignored(sockdir: str) -> None:
    async with serving(sockdir, {"": mem()}) as (_, path):
        client = await Client.connect(path)
        info = await client.go("", (77, 0xFFFF, INFO_EXPORT))
        assert info["final"] == REP_ACK
        assert set(info["infos"]) == {INFO_BLOCK_SIZE, INFO_EXPORT}
        await client.disc()


@async_test
async def test_oversized_option_ends_the_connection(sockdir: str) -> None:
    async with serving(sockdir, {"": mem()}) as (server, path):
        client = await Client.connect(path)
        client.w.write(struct.pack(">QII", IHAVEOPT, OPT_GO, 1 << 30))
        assert await client.closed()
        assert server.stats()["closed"] == {"option-too-long": 1}


@async_test
async def test_bad_option_magic_ends_the_connection(sockdir: str) -> None:
    async with serving(sockdir, {"": mem()}) as (server, path):
        client = await Client.connect(path)
        client.w.write(struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
        assert await client.closed()
        assert server.stats()["closed"] == {"bad-option-magic": 1}


@pytest.mark.parametrize("no_zeroes", [True, False])
@async_test
async def test_old_style_export_name(sockdir: str, no_zeroes: bool) -> None:
    async with serving(sockdir, {"vol0": mem(3 * MiB)}) as (_, path):
        client = await Client.connect(path, C_FIXED_NEWSTYLE | (C_NO_ZEROES if no_zeroes else 0))
        client.send_option(OPT_EXPORT_NAME, b"vol0")
        size, flags = struct.unpack(">QH", await client.r.readexactly(10))
        assert size == 3 * MiB
        assert flags & F_HAS_FLAGS and flags & F_SEND_FLUSH
        if not no_zeroes:
            assert await client.r.readexactly(124) == bytes(124)
        assert await client.write(5, b"hello") == 0
        assert await client.read(5, 5) == b"hello"
        await client.disc()


@async_test
async def test_old_style_export_name_for_an_unknown_export_ends_the_connection(sockdir: str) -> None:
    async with serving(sockdir, {"vol0": mem()}) as (server, path):
        client = await Client.connect(path)
        client.send_option(OPT_EXPORT_NAME, b"nope")
        assert await client.closed()
        assert server.stats()["closed"] == {"unknown-export": 1}


@async_test
async def test_opt_abort(sockdir: str) -> None:
    async with serving(sockdir, {"": mem()}) as (server, path):
        client = await Client.connect(path)
        assert await client.option(OPT_ABORT) == [(REP_ACK, b"")]
        assert await client.closed()
        await asyncio.sleep(0.05)
        assert server.stats()["closed"] == {"abort": 1}
        # a client that hangs up without waiting for the ACK is fine too
        client = await Client.connect(path)
        client.send_option(OPT_ABORT)
        client.close()
        await asyncio.sleep(0.1)
        assert server.stats()["protocol_errors"] == 0


@async_test
async def test_handshake_timeout(sockdir: str) -> None:
    async with serving(sockdir, {"": mem()}, handshake_timeout=0.2) as (server, path):
        client = await Client.connect(path)
        assert await client.closed()
        assert server.stats()["closed"] == {"handshake-timeout": 1}


# --- transmission ----------------------------------------------------------------------------


@async_test
async def test_read_write_with_and_without_fua(sockdir: str) -> None:
    export = mem(4 * MiB)
    async with serving(sockdir, {"": export}) as (server, path):
        client = await Client.open(path)
        a, b = os.urandom(4096), os.urandom(100_000)
        assert await client.write(0, a) == 0
        assert await client.write(MiB + 3, b, FUA) == 0
        assert await client.read(0, 4096) == a
        assert await client.read(MiB + 3, len(b), FUA) == b  # FUA on a read is accepted
        assert export.calls[:2] == [("write", 0, 4096, False), ("write", MiB + 3, len(b), True)]
        data = export.inner.getvalue()
        assert data[:4096] == a and data[MiB + 3 : MiB + 3 + len(b)] == b
        await client.disc()
        stats = server.stats()
        assert stats["requests"]["write"] == 2 and stats["requests"]["read"] == 2
        assert stats["requests"]["disc"] == 1
        assert stats["bytes_written"] == 4096 + len(b)
        assert stats["bytes_read"] == 4096 + len(b)
        assert stats["errors"] == 0


@async_test
async def test_large_write_and_read(sockdir: str) -> None:
    export = mem(40 * MiB)
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        blob = os.urandom(32 * MiB)  # the maximum payload
        assert await client.write(MiB, blob) == 0
        assert await client.read(MiB, 32 * MiB) == blob
        await client.disc()


@async_test
async def test_flush(sockdir: str) -> None:
    export = mem()
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        assert await client.write(0, b"x" * 512) == 0
        assert (await client.call(FLUSH))[0] == 0
        assert (await client.call(FLUSH, flags=FUA))[0] == 0
        assert export.calls == [("write", 0, 512, False), ("flush",), ("flush",)]
        await client.disc()


@async_test
async def test_trim_and_write_zeroes(sockdir: str) -> None:
    export = mem(MiB)
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        assert await client.write(0, b"\xff" * 65536) == 0
        assert (await client.call(TRIM, 0, 4096))[0] == 0
        assert (await client.call(TRIM, 4096, 4096, FUA))[0] == 0
        assert (await client.call(WRITE_ZEROES, 8192, 100))[0] == 0
        assert (await client.call(WRITE_ZEROES, 16384, 4096, FUA | NO_HOLE))[0] == 0
        assert await client.read(8192, 100) == bytes(100)
        assert await client.read(16384, 4096) == bytes(4096)
        assert await client.read(8292, 10) == b"\xff" * 10
        assert export.calls[1:] == [
            ("trim", 0, 4096, False),
            ("trim", 4096, 4096, True),
            ("write_zeroes", 8192, 100, False, True),
            ("write_zeroes", 16384, 4096, True, False),
            ("read", 8192, 100),
            ("read", 16384, 4096),
            ("read", 8292, 10),
        ]
        await client.disc()


@async_test
async def test_read_only_export_refuses_writes_with_eperm(sockdir: str) -> None:
    export = mem(MiB, read_only=True)
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        assert await client.write(0, b"abc") == EPERM
        assert (await client.call(TRIM, 0, 4096))[0] == EPERM
        assert (await client.call(WRITE_ZEROES, 0, 4096))[0] == EPERM
        assert await client.read(0, 3) == bytes(3)
        assert (await client.call(FLUSH))[0] == 0
        assert [c[0] for c in export.calls] == ["read", "flush"]
        await client.disc()


@async_test
async def test_requests_outside_the_export(sockdir: str) -> None:
    export = mem(MiB)
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        top = 2**64 - 1
        cases = [
            (READ, MiB - 10, 11, b"", EINVAL),
            (READ, MiB, 1, b"", EINVAL),
            (READ, top, 1, b"", EINVAL),
            (WRITE, MiB - 1, 2, b"ab", ENOSPC),
            (WRITE, top - 1, 2, b"ab", ENOSPC),
            (TRIM, MiB - 4096, 8192, b"", EINVAL),
            (TRIM, top, 0xFFFFFFFF, b"", EINVAL),
            (WRITE_ZEROES, MiB, 4096, b"", ENOSPC),
            (WRITE_ZEROES, top - 4095, 4096, b"", ENOSPC),
        ]
        for cmd, offset, length, payload, expected in cases:
            assert await client.call(cmd, offset, length, 0, payload) == (expected, b""), (cmd, offset)
        # right up to the end is fine
        assert await client.write(MiB - 2, b"ab") == 0
        assert await client.read(MiB - 2, 2) == b"ab"
        assert [c[0] for c in export.calls] == ["write", "read"]
        await client.disc()


@async_test
async def test_zero_length_requests_are_einval(sockdir: str) -> None:
    export = mem(MiB)
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        for cmd in (READ, WRITE, TRIM, WRITE_ZEROES):
            assert (await client.call(cmd, 4096, 0))[0] == EINVAL
        assert export.calls == []
        await client.disc()


@async_test
async def test_bad_flags_and_unknown_commands_are_einval(sockdir: str) -> None:
    export = mem(MiB)
    async with serving(sockdir, {"": export}) as (server, path):
        client = await Client.open(path)
        assert (await client.call(READ, 0, 512, NO_HOLE))[0] == EINVAL
        assert (await client.call(READ, 0, 512, DF))[0] == EINVAL  # no structured replies
        assert (await client.call(WRITE, 0, 3, DF, b"abc"))[0] == EINVAL  # payload still consumed
        assert (await client.call(WRITE, 0, 3, 0x8000, b"abc"))[0] == EINVAL
        assert (await client.call(TRIM, 0, 512, NO_HOLE))[0] == EINVAL
        assert (await client.call(WRITE_ZEROES, 0, 512, FAST_ZERO))[0] == EINVAL
        assert (await client.call(FLUSH, 0, 0, REQ_ONE))[0] == EINVAL
        for cmd in (CACHE, BLOCK_STATUS, 8, 99, 0xFFFF):
            assert (await client.call(cmd, 0, 512))[0] == EINVAL
        assert (await client.call(READ, 0, 32 * MiB + 1))[0] == EINVAL  # > maximum block size
        assert export.calls == []
        assert await client.read(0, 3) == bytes(3)  # the connection is still in sync
        await client.disc()
        stats = server.stats()
        assert stats["errors"] == 13
        assert stats["protocol_errors"] == 0
        assert stats["requests"]["other"] == 3


@async_test
async def test_trim_and_zeroes_may_exceed_the_maximum_payload(sockdir: str) -> None:
    export = mem(80 * MiB)
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        assert (await client.call(WRITE_ZEROES, 0, 64 * MiB))[0] == 0
        assert (await client.call(TRIM, 0, 80 * MiB))[0] == 0
        await client.disc()


@async_test
async def test_export_errors_map_to_nbd_errors(sockdir: str) -> None:
    export = mem(MiB)
    cases = [
        (OSError(errno.EIO, "x"), EIO),
        (OSError(errno.ENOSPC, "x"), ENOSPC),
        (OSError(errno.EDQUOT, "x"), ENOSPC),
        (OSError(errno.EFBIG, "x"), ENOSPC),
        (OSError(errno.EROFS, "x"), EPERM),
        (OSError(errno.EPERM, "x"), EPERM),
        (OSError(errno.ENOMEM, "x"), ENOMEM),
        (OSError(errno.EINVAL, "x"), EINVAL),
        (OSError(errno.EOVERFLOW, "x"), EOVERFLOW),
        (OSError(errno.ESHUTDOWN, "x"), ESHUTDOWN),
        (OSError(errno.ENOENT, "x"), EIO),
        (OSError("no errno"), EIO),
        (RuntimeError("bug"), EIO),
    ]
    async with serving(sockdir, {"": export}) as (server, path):
        client = await Client.open(path)
        for exc, expected in cases:
            for method in ("read", "write", "flush", "trim", "write_zeroes"):
                export.fail = {method: exc}
                cmd = {
                    "read": READ,
                    "write": WRITE,
                    "flush": FLUSH,
                    "trim": TRIM,
                    "write_zeroes": WRITE_ZEROES,
                }
                length = 0 if method == "flush" else 4
                payload = b"abcd" if method == "write" else b""
                assert await client.call(cmd[method], 0, length, 0, payload) == (expected, b""), (exc, method)
        export.fail = {}
        assert await client.read(0, 4) == bytes(4)
        await client.disc()
        assert server.stats()["errors"] == len(cases) * 5


@async_test
async def test_short_read_from_the_export_is_eio(sockdir: str) -> None:
    export = mem(MiB)

    async def short_read(offset: int, length: int) -> bytes:
        return b"x"

    export.read = short_read  # type: ignore[method-assign]
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        assert await client.call(READ, 0, 10) == (EIO, b"")
        await client.disc()


@async_test
async def test_concurrent_requests_are_answered_out_of_order_by_handle(sockdir: str) -> None:
    export = mem(MiB)
    gate = asyncio.Event()
    export.gates[("read", 0)] = gate
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        assert await client.write(4096, b"B" * 10) == 0
        slow = client.send(READ, 0, 10)
        fast = client.send(READ, 4096, 10)
        handle, error, data = await client.reply()
        assert (handle, error, data) == (fast, 0, b"B" * 10)
        gate.set()
        handle, error, data = await client.reply()
        assert (handle, error, data) == (slow, 0, bytes(10))
        await client.disc()


@async_test
async def test_many_pipelined_requests_with_arbitrary_handles(sockdir: str) -> None:
    export = mem(4 * MiB)
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        expected = {}
        for i in range(300):
            handle = (i * 0x9E3779B97F4A7C15) % 2**64  # handles are opaque 64-bit values
            data = os.urandom(4096)
            client.send(WRITE, i * 8192, 4096, FUA if i % 7 == 0 else 0, data, handle=handle)
            expected[handle] = (i * 8192, data)
        for _ in range(300):
            handle, error, _ = await client.reply()
            assert error == 0
        reads = {client.send(READ, offset, 4096): data for offset, data in expected.values()}
        for _ in range(300):
            handle, error, data = await client.reply()
            assert error == 0 and data == reads[handle]
        await client.disc()


@async_test
async def test_flush_covers_writes_replied_before_it(sockdir: str) -> None:
    export = mem(MiB)
    async with serving(sockdir, {"": export}) as (_, path):
        client = await Client.open(path)
        for i in range(10):
            client.send(WRITE, i * 512, 512, 0, b"w" * 512)
        for _ in range(10):
            assert (await client.reply())[1] == 0
        assert (await client.call(FLUSH))[0] == 0
        assert [c[0] for c in export.calls] == ["write"] * 10 + ["flush"]
        await client.disc()


@async_test
async def test_disc_finishes_requests_in_flight_first(sockdir: str) -> None:
    export = mem(MiB)
    gate = asyncio.Event()
    export.gates[("write", 0)] = gate
    async with serving(sockdir, {"": export}) as (server, path):
        client = await Client.open(path)
        handle = client.send(WRITE, 0, 5, 0, b"hello")
        client.send(DISC)
        await asyncio.sleep(0.05)
        assert server.stats()["connections_active"] == 1
        gate.set()
        assert (await client.reply())[:2] == (handle, 0)
        assert await client.closed()
        assert export.inner.getvalue()[:5] == b"hello"
        await asyncio.sleep(0.05)
        assert server.stats()["closed"] == {"disc": 1}


@async_test
async def test_inflight_limit(sockdir: str) -> None:
    export = mem(MiB)
    gates = {}
    for i in range(6):
        gates[i] = export.gates[("read", i * 4096)] = asyncio.Event()
    async with serving(sockdir, {"": export}, max_inflight=2) as (_, path):
        client = await Client.open(path)
        for i in range(6):
            client.send(READ, i * 4096, 16)
        await asyncio.sleep(0.1)
        assert export.started == [("read", 0), ("read", 4096)]
        gates[0].set()
        await client.reply()
        await asyncio.sleep(0.05)
        assert len(export.started) == 3
        for gate in gates.values():
            gate.set()
        for _ in range(5):
            assert (await client.reply())[1] == 0
        await client.disc()


@async_test
async def test_inflight_byte_limit(sockdir: str) -> None:
    export = mem(MiB)
    gate = export.gates[("read", 0)] = asyncio.Event()
    async with serving(sockdir, {"": export}, max_inflight_bytes=64 * 1024) as (_, path):
        client = await Client.open(path)
        client.send(READ, 0, 64 * 1024)
        client.send(READ, 65536, 16)
        await asyncio.sleep(0.1)
        assert export.started == [("read", 0)]
        gate.set()
        for _ in range(2):
            assert (await client.reply())[1] == 0
        await client.disc()


@async_test
async def test_requests_pipelined_behind_go_are_served(sockdir: str) -> None:
    async with serving(sockdir, {"": mem()}) as (_, path):
        client = await Client.connect(path)
        data = struct.pack(">IH", 0, 0)
        client.send_option(OPT_GO, data)
        handle = client.send(WRITE, 0, 4, 0, b"pipe")
        replies = await client.option_replies(OPT_GO)
        assert replies[-1][0] == REP_ACK
        assert (await client.reply())[:2] == (handle, 0)
        assert await client.read(0, 4) == b"pipe"
        await client.disc()


# --- framing errors: hard disconnect, nothing written -----------------------------------------


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (struct.pack(">IHHQQI", 0x12345678, 0, WRITE, 1, 0, 4) + b"abcd", "bad-magic"),
        (struct.pack(">IHHQQI", REQUEST_MAGIC, 0, WRITE, 1, 0, 32 * MiB + 1), "oversized-write"),
        (struct.pack(">IHHQQI", REQUEST_MAGIC, 0, WRITE, 1, 0, 0xFFFFFFFF), "oversized-write"),
        (struct.pack(">IHHQQI", REQUEST_MAGIC, 0, WRITE, 1, 0, 100) + b"short", "truncated-write"),
        (struct.pack(">IHHQQI", REQUEST_MAGIC, 0, WRITE, 1, 0, 200_000) + b"short", "truncated-write"),
        (struct.pack(">IHHQQI", REQUEST_MAGIC, 0, READ, 1, 0, 4)[:20], "truncated-request"),
    ],
)
@async_test
async def test_framing_errors_close_only_that_connection(
    sockdir: str, frame: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    export = mem(MiB)
    caplog.set_level(logging.INFO, logger="tandem.engine.nbd")
    async with serving(sockdir, {"": export}) as (server, path):
        other = await Client.open(path)
        client = await Client.open(path)
        client.w.write(frame)
        if reason.startswith("truncated"):
            client.w.write_eof()
        assert await client.closed()  # no reply at all
        await asyncio.sleep(0.05)
        assert export.calls == []
        assert server.stats()["closed"] == {reason: 1}
        assert server.stats()["protocol_errors"] == 1
        # the other connection and new ones still work
        assert await other.write(0, b"ok") == 0
        fresh = await Client.open(path)
        assert await fresh.read(0, 2) == b"ok"
        await fresh.disc()
        await other.disc()
    closed = [
        r for r in caplog.records if "nbd connection closed" in r.getMessage() and reason in r.getMessage()
    ]
    assert len(closed) == 1
    message = closed[0].getMessage()
    assert closed[0].levelno == logging.WARNING
    assert f"reason={reason}" in message and "peer=unix pid=" in message and "export=" in message


@async_test
async def test_eof_without_disc_is_a_clean_close(sockdir: str) -> None:
    export = mem(MiB)
    async with serving(sockdir, {"": export}) as (server, path):
        client = await Client.open(path)
        handle = client.send(WRITE, 0, 3, 0, b"eof")
        client.w.write_eof()
        assert (await client.reply())[:2] == (handle, 0)
        assert await client.closed()
        await asyncio.sleep(0.05)
        assert server.stats()["closed"] == {"eof": 1}


# --- server lifecycle ----------------------------------------------------------------------------


@async_test
async def test_close_aborts_live_connections_and_removes_the_socket(sockdir: str) -> None:
    export = mem(MiB)
    export.gates[("read", 0)] = asyncio.Event()  # never set: a request stuck in flight
    server = NBDServer(lambda name: export)
    path = os.path.join(sockdir, "s.sock")
    await server.start_unix(path)
    idle = await Client.open(path)
    busy = await Client.open(path)
    busy.send(READ, 0, 10)
    handshaking = await Client.connect(path)
    await asyncio.sleep(0.05)
    assert server.stats()["connections_active"] == 3
    await server.close()
    for client in (idle, busy, handshaking):
        assert await client.closed()
    assert not os.path.exists(path)
    assert server.stats()["connections_active"] == 0
    with pytest.raises(OSError):
        await Client.connect(path)


@async_test
async def test_unix_socket_mode_and_stale_socket(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    server = NBDServer(lambda name: None)
    await server.start_unix(path, mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    second = NBDServer(lambda name: None)
    with pytest.raises(OSError) as info:
        await second.start_unix(path)
    assert info.value.errno == errno.EADDRINUSE
    await server.close()
    regular = os.path.join(sockdir, "file")
    open(regular, "w").close()
    with pytest.raises(FileExistsError):
        await second.start_unix(regular)


@async_test
async def test_tcp_listener(sockdir: str) -> None:
    export = mem(MiB)
    server = NBDServer(lambda name: export)
    listener = await server.start_tcp("127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Client(reader, writer)
    client.hello = struct.unpack(">QQH", await reader.readexactly(18))
    writer.write(struct.pack(">I", 3))
    assert (await client.go(""))["final"] == REP_ACK
    assert await client.write(0, b"tcp") == 0
    assert await client.read(0, 3) == b"tcp"
    await client.disc()
    await server.close()


@async_test
async def test_lookup_failure_is_an_unknown_export(sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    def lookup(name: str) -> Any:
        raise RuntimeError("boom")

    server = NBDServer(lookup)
    path = os.path.join(sockdir, "s.sock")
    await server.start_unix(path)
    client = await Client.connect(path)
    assert (await client.go("x"))["final"] == REP_ERR_UNKNOWN
    client.close()
    await server.close()
    assert any("lookup failed" in r.getMessage() for r in caplog.records)


@async_test
async def test_two_connections_share_the_export(sockdir: str) -> None:
    export = mem(MiB)
    async with serving(sockdir, {"": export}) as (server, path):
        one = await Client.open(path)
        two = await Client.open(path)
        assert one.flags & F_CAN_MULTI_CONN
        assert await one.write(0, b"one") == 0
        assert (await one.call(FLUSH))[0] == 0
        assert await two.read(0, 3) == b"one"
        await one.disc()
        await two.disc()
        await asyncio.sleep(0.05)
        assert server.stats()["connections_total"] == 2
        assert server.stats()["closed"] == {"disc": 2}


def test_stats_shape() -> None:
    stats = NBDServer(lambda name: None).stats()
    assert stats["requests"] == {
        "read": 0,
        "write": 0,
        "disc": 0,
        "flush": 0,
        "trim": 0,
        "cache": 0,
        "write_zeroes": 0,
        "block_status": 0,
        "other": 0,
    }
    for key in ("connections_active", "connections_total", "bytes_read", "bytes_written", "errors"):
        assert stats[key] == 0


# --- the file export, served -------------------------------------------------------------------


@pytest.mark.parametrize("nowait", [True, False])
@async_test
async def test_file_export_over_nbd(sockdir: str, nowait: bool) -> None:
    path = os.path.join(sockdir, "disk.img")
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MiB))
    export = FileExport(path, name="disk", nowait=nowait)
    try:
        assert export.size == 4 * MiB
        async with serving(sockdir, {"disk": export}) as (_, sock):
            client = await Client.open(sock, "disk")
            blob = os.urandom(300_000)
            assert await client.write(12345, blob, FUA) == 0
            assert await client.write(0, b"head") == 0
            assert (await client.call(FLUSH))[0] == 0
            assert await client.read(12345, len(blob)) == blob
            assert await client.read(0, 4) == b"head"
            # punch a hole (trim) and zero with and without NO_HOLE
            assert (await client.call(TRIM, MiB, MiB, FUA))[0] == 0
            assert (await client.call(WRITE_ZEROES, 2 * MiB, MiB + 7))[0] == 0
            assert (await client.call(WRITE_ZEROES, 3 * MiB + 10, 1000, NO_HOLE | FUA))[0] == 0
            assert await client.read(2 * MiB, MiB + 7) == bytes(MiB + 7)
            assert await client.read(3 * MiB + 10, 1000) == bytes(1000)
            await client.disc()
    finally:
        await export.close()
    with open(path, "rb") as f:
        content = f.read()
    assert content[12345 : 12345 + len(blob)] == blob
    assert content[2 * MiB : 3 * MiB + 7] == bytes(MiB + 7)
    assert len(content) == 4 * MiB


@async_test
async def test_file_export_write_zeroes_fallbacks(sockdir: str) -> None:
    path = os.path.join(sockdir, "disk.img")
    with open(path, "wb") as f:
        f.write(b"\xee" * (3 * MiB))
    export = FileExport(path)
    try:
        # as if fallocate were unavailable: zeroes are written out in chunks
        export._can_punch = export._can_zero_range = False
        await export.write_zeroes(10, 2 * MiB + 5, fua=True, may_trim=True)
        await export.trim(0, 4096, fua=False)  # a no-op now
        assert await export.read(0, 10) == b"\xee" * 10
        assert await export.read(10, 2 * MiB + 5) == bytes(2 * MiB + 5)
        assert await export.read(2 * MiB + 15, 10) == b"\xee" * 10
    finally:
        await export.close()


@async_test
async def test_read_only_file_export(sockdir: str) -> None:
    path = os.path.join(sockdir, "disk.img")
    with open(path, "wb") as f:
        f.write(b"r" * MiB)
    os.chmod(path, 0o444)
    export = FileExport(path, read_only=True)
    try:
        assert export.read_only
        async with serving(sockdir, {"": export}) as (_, sock):
            client = await Client.open(sock)
            assert client.flags & F_READ_ONLY
            assert await client.read(0, 3) == b"rrr"
            assert await client.write(0, b"x") == EPERM
            await client.disc()
        with pytest.raises(OSError):
            await export.write(0, b"x", False)
    finally:
        await export.close()


def test_file_export_rejects_other_file_types(sockdir: str) -> None:
    with pytest.raises(OSError):
        FileExport(sockdir)  # a directory
