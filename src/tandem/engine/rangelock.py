"""Keep resync reads and application writes to the same blocks apart.

A resync block is read and queued for the peer under an exclusive hold on
its range; application writes take shared holds. Without this, a resync
could read a block's old contents, an application write could then send
the new contents, and the stale resync copy would arrive last.
Application writes never exclude each other: ordering overlapping writes
is the client's business, as on any block device.
"""

from __future__ import annotations

import asyncio
import contextlib


class RangeLock:
    def __init__(self):
        self._held: list[tuple[int, int, bool]] = []     # (start, end, exclusive)
        self._changed = asyncio.Condition()

    def _conflicts(self, start: int, end: int, exclusive: bool) -> bool:
        return any(s < end and start < e and (exclusive or x) for s, e, x in self._held)

    @contextlib.asynccontextmanager
    async def hold(self, start: int, length: int, exclusive: bool = False):
        entry = (start, start + length, exclusive)
        async with self._changed:
            await self._changed.wait_for(lambda: not self._conflicts(*entry))
            self._held.append(entry)
        try:
            yield
        finally:
            async with self._changed:
                self._held.remove(entry)
                self._changed.notify_all()
