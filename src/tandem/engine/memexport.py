"""An in-memory Export: the reference implementation of the protocol, used by tests."""

from __future__ import annotations

import errno


class MemExport:
    """A volume held in a bytearray. Every write is "durable" as soon as it returns."""

    def __init__(
        self,
        size: int = 0,
        *,
        name: str = "",
        read_only: bool = False,
        block_size: int = 4096,
        data: bytes | bytearray | None = None,
        description: str | None = None,
    ) -> None:
        if data is not None:
            self._buf = bytearray(data)
        else:
            if size < 0:
                raise ValueError("size must not be negative")
            self._buf = bytearray(size)
        self.name = name
        self.size = len(self._buf)
        self.read_only = read_only
        self.block_size = block_size
        self.description = description
        self.flushes = 0

    def getvalue(self) -> bytes:
        """A copy of the whole volume."""
        return bytes(self._buf)

    def _check(self, offset: int, length: int, write: bool) -> None:
        if write and self.read_only:
            raise OSError(errno.EPERM, "export is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.ENOSPC if write else errno.EINVAL, "request outside the export")

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, False)
        return bytes(memoryview(self._buf)[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._check(offset, len(data), True)
        self._buf[offset : offset + len(data)] = data

    async def flush(self) -> None:
        self.flushes += 1

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        # Advisory: the data may stay as it is.
        self._check(offset, length, True)

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        self._check(offset, length, True)
        memoryview(self._buf)[offset : offset + length] = bytes(length)

    async def close(self) -> None:
        pass
