"""Keep resync reads and application writes to the same blocks apart.

A resync block is read and queued for the peer under an exclusive hold on
its range; application writes take shared holds. Without this, a resync
could read a block's old contents, an application write could then send
the new contents, and the stale resync copy would arrive last.
Application writes never exclude each other: ordering overlapping writes
is the client's business, as on any block device.

Application writes take and drop a shared hold on every request, so that
path is synchronous (`try_shared`/`release`) and costs a list append when
no resync is running; only a conflicting hold waits.
"""

from __future__ import annotations

import asyncio
import contextlib

from .waiters import wait, wake_all


class RangeLock:
    def __init__(self):
        self._held: list[tuple[int, int, bool]] = []     # (start, end, exclusive)
        self._exclusive = 0                               # exclusive entries in _held
        self._waiters: list[asyncio.Future] = []

    def _conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        return any(s < end and start < e and (exclusive or x) for s, e, x in self._held)

    def try_shared(self, start: int, length: int) -> tuple[int, int, bool] | None:
        """Take a shared hold without waiting; None if an exclusive hold overlaps."""
        entry = (start, start + length, False)
        if self._exclusive and self._conflicts(*entry):
            return None
        self._held.append(entry)
        return entry

    async def acquire(self, start: int, length: int, exclusive: bool = False) -> tuple[int, int, bool]:
        entry = (start, start + length, exclusive)
        while self._conflicts(*entry):
            await wait(self._waiters)
        self._held.append(entry)
        self._exclusive += exclusive
        return entry

    def release(self, entry: tuple[int, int, bool]) -> None:
        self._held.remove(entry)
        self._exclusive -= entry[2]
        if self._waiters:
            # Wake every waiter to re-check its range (holds are few and short).
            wake_all(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, start: int, length: int, exclusive: bool = False):
        entry = await self.acquire(start, length, exclusive)
        try:
            yield
        finally:
            self.release(entry)
