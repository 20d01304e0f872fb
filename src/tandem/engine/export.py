"""What the NBD front end serves: one volume, as seen by a client.

The NBD server (nbd.py) knows nothing about replication; the engine hands
it objects with this interface. A replicated volume completes `write` only
when the data is durable where its protocol says (both nodes for protocol
C), so the NBD layer never needs to know which protocol is in force.
"""

from __future__ import annotations

from typing import Protocol


class Export(Protocol):
    """One NBD export. All offsets and lengths are in bytes.

    Methods raise OSError (with an errno) on failure; the NBD server maps the
    errno onto the NBD error reply. They never raise for a request the server
    has already validated (inside the export, length > 0).
    """

    name: str
    size: int
    read_only: bool
    #: The preferred block size advertised to clients (NBD_INFO_BLOCK_SIZE).
    block_size: int

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        """Write; with fua=True the data is on stable storage before returning."""

    async def flush(self) -> None:
        """Make every write completed so far durable."""

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Advisory discard: the range may read back as anything afterwards."""

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        """The range reads back as zeroes afterwards."""
