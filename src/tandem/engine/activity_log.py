"""The activity log: which 4 MiB extents may hold writes the peer lacks.

A write may only start once its extent is *active* in the on-disk AL. A
write to a cold extent first persists a new AL transaction (one small
synchronous metadata write), evicting the least recently used idle extent
if the log is full. Before an extent is evicted, the bitmap pages covering
it are made durable, so that at every instant

    on-disk AL  ∪  on-disk bitmap  ⊇  every block that may differ between nodes.

After a crash, `MetadataFile.apply_al()` turns the AL into bitmap bits, so the
resync is bounded by al_extents × 4 MiB rather than the whole volume.

An extent stays referenced until the write is settled for the peer (acked,
or recorded in the bitmap); callers pair `acquire` (or a successful
`try_acquire`) with `release`. Both fast paths are synchronous: a write to a
hot extent costs a few dict operations, and nothing awaits unless the log
has to change.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from .metadata import AL_EXTENT_SHIFT, MetadataFile
from .waiters import wait, wake_all

EXTENT_SIZE = 1 << AL_EXTENT_SHIFT


class ActivityLog:
    def __init__(self, md: MetadataFile, run_io=None):
        self.md = md
        self.max_extents = md.sb.al_extents
        # extent -> number of writes holding it, least recently used first.
        self._active: OrderedDict[int, int] = OrderedDict((e, 0) for e in md.read_al())
        self._lock = asyncio.Lock()
        self._released: list[asyncio.Future] = []     # _activate waiting for a free slot
        self._run_io = run_io or _to_thread
        self.transactions = 0

    @staticmethod
    def extents(offset: int, length: int) -> range:
        return range(offset >> AL_EXTENT_SHIFT, ((offset + max(length, 1) - 1) >> AL_EXTENT_SHIFT) + 1)

    @property
    def active(self) -> list[int]:
        return list(self._active)

    def try_acquire(self, offset: int, length: int) -> bool:
        """Reference the extents if all are active already; False means call `acquire`."""
        active = self._active
        first = offset >> AL_EXTENT_SHIFT
        if first == (offset + max(length, 1) - 1) >> AL_EXTENT_SHIFT:
            # One extent (nearly every write): no range object, one lookup.
            refs = active.get(first)
            if refs is None:
                return False
            active[first] = refs + 1
            active.move_to_end(first)
            return True
        wanted = self.extents(offset, length)
        for e in wanted:
            if e not in active:
                return False
        for e in wanted:
            active[e] += 1
            active.move_to_end(e)
        return True

    async def acquire(self, offset: int, length: int) -> None:
        wanted = self.extents(offset, length)
        if len(wanted) > self.max_extents:
            raise ValueError("a single write spans more extents than the activity log holds")
        if not all(e in self._active for e in wanted):
            async with self._lock:
                await self._activate(wanted)
        for e in wanted:
            self._active[e] += 1
            self._active.move_to_end(e)

    def release(self, offset: int, length: int) -> None:
        active = self._active
        first = offset >> AL_EXTENT_SHIFT
        if first == (offset + max(length, 1) - 1) >> AL_EXTENT_SHIFT:
            active[first] -= 1
        else:
            for e in self.extents(offset, length):
                active[e] -= 1
        if self._released:
            wake_all(self._released)

    async def _activate(self, wanted: range) -> None:
        missing = [e for e in wanted if e not in self._active]
        if not missing:
            return
        while True:
            overflow = len(self._active) + len(missing) - self.max_extents
            idle = [e for e, refs in self._active.items() if refs == 0 and e not in wanted]
            if overflow <= len(idle):
                break
            # every slot busy: wait for a write to finish
            await wait(self._released)
        victims = idle[:max(overflow, 0)]
        # Forget the victims *before* any await: a write arriving meanwhile for
        # one of them must queue behind this transaction, not count on it.
        for e in victims:
            del self._active[e]
        if victims:
            # The bitmap must cover an extent before the AL stops covering it.
            pages = set()
            for e in victims:
                pages |= self.md.bitmap.pages_for(e << AL_EXTENT_SHIFT, EXTENT_SIZE)
            pages &= set(self.md.bitmap.dirty_pages())
            if pages:
                await self._run_io(self.md.write_bitmap_pages, pages)
        await self._run_io(self.md.write_al, list(self._active) + missing)
        self.transactions += 1
        for e in missing:
            self._active[e] = 0

    async def settle(self) -> bool:
        """Drop idle extents after a flush made every completed write durable.

        Only the extents of writes still in flight stay active, so a crash
        after this replays (and later resyncs) only what was really at risk.
        Returns True if a transaction was written.
        """
        async with self._lock:
            idle = [e for e, refs in self._active.items() if refs == 0]
            if not idle:
                return False
            for e in idle:
                del self._active[e]
            await self._run_io(self.md.write_al, list(self._active))
            self.transactions += 1
            return True

    async def clean_shutdown(self) -> None:
        """Persist the bitmap and empty the AL: the next start needs no AL replay."""
        async with self._lock:
            if any(self._active.values()):
                raise RuntimeError("writes are still in flight")
            await self._run_io(self.md.write_bitmap_pages)
            await self._run_io(self.md.write_al, [])
            self._active.clear()


async def _to_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)
