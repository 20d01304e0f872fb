"""Keep overlapping writes, resync reads and verify reads to the same blocks apart.

Every hold excludes every overlapping hold:

- Two overlapping application writes must reach the local disk in the
  order they were sent to the peer, which applies them in that order. If
  both were in flight at once (one inline, one through the thread pool, a
  FUA), they could land locally in the other order and the two nodes would
  silently keep different data. DRBD's conflict detection does the same.
  (Ordering concurrent overlapping writes is otherwise the client's
  business, as on any block device; what must hold is that both nodes pick
  the same order.)
- A resync block (and a verify request) is read and queued for the peer
  under a hold, so an application write cannot send newer contents that a
  stale resync copy would then overtake.

A write holds its range from before it is sent until its local write is
done, not while it waits for the peer. The common case, no overlap, is a
synchronous scan of a short list (`try_acquire`/`release`). A new request
also defers to an overlapping one that is already waiting, so a hot block
written without pause cannot starve a resync read.
"""

from __future__ import annotations

import asyncio
import contextlib

from .waiters import wait, wake_all


class RangeLock:
    def __init__(self):
        self._held: list[tuple[int, int]] = []          # (start, end)
        self._waiting: list[tuple[int, int]] = []
        self._waiters: list[asyncio.Future] = []

    @staticmethod
    def _overlaps(entries, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in entries)

    def try_acquire(self, start: int, length: int) -> tuple[int, int] | None:
        """Take a hold without waiting; None if an overlapping one is held or waited for."""
        entry = (start, start + length)
        if self._overlaps(self._held, *entry) or (self._waiting and self._overlaps(self._waiting, *entry)):
            return None
        self._held.append(entry)
        return entry

    async def acquire(self, start: int, length: int) -> tuple[int, int]:
        entry = (start, start + length)
        self._waiting.append(entry)
        try:
            while self._overlaps(self._held, *entry):
                await wait(self._waiters)
        finally:
            self._waiting.remove(entry)
        self._held.append(entry)
        return entry

    def release(self, entry: tuple[int, int]) -> None:
        self._held.remove(entry)
        if self._waiters:
            # Wake every waiter to re-check its range (holds are few and short).
            wake_all(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, start: int, length: int):
        entry = self.try_acquire(start, length) or await self.acquire(start, length)
        try:
            yield
        finally:
            self.release(entry)
