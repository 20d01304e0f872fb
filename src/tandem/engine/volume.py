"""One volume on one node: the backing file, its metadata, AL and bitmap.

Blocking I/O runs in a small thread pool so that a slow disk never stalls
the event loop (pings, other resources, NBD reads keep going). The one
exception is a small buffered write: it only copies into the page cache,
and the thread hop would cost several times the write itself, so it runs
inline -- until one takes longer than INLINE_STALL *and* slept in the
kernel meanwhile (the kernel is throttling writeback), after which writes
go through the pool again for a while. fdatasync never runs inline.
"""

from __future__ import annotations

import os
import stat
import time
from resource import RUSAGE_THREAD, getrusage

from .activity_log import ActivityLog
from .fileexport import IOPool
from .metadata import AL_CLEAN, CRASHED_PRIMARY, PRIMARY, MetadataFile

# One pool per daemon process (tandemd runs one event loop). IOPool hands
# completions back to the loop in batches: at queue depth 16 that is most of
# the cost of a thread hop per write.
_POOL: IOPool | None = None


async def run_io(fn, *args):
    global _POOL
    if _POOL is None:
        _POOL = IOPool(workers=4, name="tandem-io")
    return await _POOL.submit(fn, *args)


#: Largest buffered write (or batch of writes) done on the event loop.
INLINE_MAX = 256 << 10
#: The same for the writes a secondary applies: its loop only receives and applies
#: them, so a 1 MiB write costs it no NBD request's latency, while the thread hop
#: costs it a GIL hand-off each way (a fifth of its loop's time under 1 MiB writes).
APPLY_INLINE_MAX = 1 << 20
#: An inline write slower than this means the disk pushes back ...
INLINE_STALL = 0.002
#: ... so writes go through the pool for this long afterwards.
INLINE_BACKOFF = 1.0


class InlineWrites:
    """Decides whether small buffered writes may run on the event loop.

    A slow inline write only counts as a stall if the thread slept in the
    kernel during it (a voluntary context switch: writeback throttling, a
    page to read). On a busy host the loop is often just preempted in the
    middle of a write; sending every write through the pool then would only
    add a thread hop per write and make the CPU shortage worse.
    """

    def __init__(self):
        self._pool_until = 0.0
        self.stalls = 0
        self.preempted = 0

    def allowed(self, nbytes: int, limit: int = INLINE_MAX) -> bool:
        return nbytes <= limit and (not self._pool_until or time.monotonic() >= self._pool_until)

    def run(self, writes) -> None:
        slept = getrusage(RUSAGE_THREAD).ru_nvcsw
        t0 = time.monotonic()
        write_batch(writes, ())
        took = time.monotonic() - t0
        if took > INLINE_STALL:
            if getrusage(RUSAGE_THREAD).ru_nvcsw == slept:
                self.preempted += 1         # runnable all along: not the disk's fault
                return
            self.stalls += 1
            self._pool_until = t0 + took + INLINE_BACKOFF


INLINE = InlineWrites()


def backing_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def write_batch(writes, sync_fds) -> None:
    """Apply (fd, offset, data) writes in order, then fdatasync the given fds.

    One thread hop for a whole batch of replicated writes: the secondary's
    throughput no longer pays a pool round trip per write.
    """
    for fd, offset, data in writes:
        view, done = memoryview(data), 0
        while done < len(data):
            done += os.pwrite(fd, view[done:], offset + done)
    for fd in sync_fds:
        os.fdatasync(fd)


class Volume:
    def __init__(self, number: int, path: str, size: int, md: MetadataFile, fd: int):
        self.number, self.path, self.size, self.md, self.fd = number, path, size, md, fd
        self.al = ActivityLog(md, run_io=run_io)
        self.bytes_written = 0
        self.bytes_read = 0

    @property
    def bitmap(self):
        return self.md.bitmap

    @classmethod
    def open(cls, number: int, path: str, size: int, md_path: str, *,
             bitmap_block_size: int = 4096, al_extents: int = 1237) -> tuple[Volume, dict]:
        """Open (creating if needed) the backing file and metadata.

        Returns the volume and what recovery found: an unclean stop replays
        the activity log into the bitmap and, for a volume that was Primary,
        records a crashed primary (which decides resync direction later).
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            have = backing_size(fd)
            if have < size:
                if stat.S_ISBLK(os.fstat(fd).st_mode):
                    raise OSError(f"{path}: block device has {have} bytes, the volume needs {size}")
                os.ftruncate(fd, size)
            if os.path.exists(md_path):
                md = MetadataFile.open(md_path, volume_size=size)
            else:
                os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
                md = MetadataFile.create(md_path, size, bitmap_block_size=bitmap_block_size,
                                         al_extents=al_extents)
        except BaseException:
            os.close(fd)
            raise
        recovery = {"clean": md.sb.has(AL_CLEAN), "al_bits": 0, "crashed_primary": False}
        if not md.sb.has(AL_CLEAN):
            recovery["al_bits"] = md.apply_al()
            if md.sb.has(PRIMARY):
                recovery["crashed_primary"] = True
                md.set_flags(set_=CRASHED_PRIMARY)
        # From now on the AL may fill: the next clean shutdown sets AL_CLEAN again.
        md.set_flags(clear=AL_CLEAN)
        return cls(number, path, size, md, fd), recovery

    async def pread(self, offset: int, length: int) -> bytes:
        data = await run_io(os.pread, self.fd, length, offset)
        if len(data) < length:                       # sparse tail of a file
            data += bytes(length - len(data))
        self.bytes_read += length
        return data

    def write_inline(self, offset: int, data: bytes, durable: bool = False) -> bool:
        """Write on the event loop if InlineWrites allows it; False (nothing written) if not.

        The synchronous half of pwrite, for a caller on the write path: no coroutine
        to create and run when the write needs no thread.
        """
        if durable or not INLINE.allowed(len(data)):
            return False
        INLINE.run([(self.fd, offset, data)])
        self.bytes_written += len(data)
        return True

    async def pwrite(self, offset: int, data: bytes, durable: bool = False) -> None:
        if self.write_inline(offset, data, durable):
            return
        await run_io(self._pwrite, offset, data, durable)
        self.bytes_written += len(data)

    def _pwrite(self, offset: int, data: bytes, durable: bool) -> None:
        write_batch([(self.fd, offset, data)], [self.fd] if durable else [])

    async def flush(self) -> None:
        await run_io(os.fdatasync, self.fd)

    async def close(self, clean: bool) -> None:
        """Close; a clean close persists the bitmap and an empty AL."""
        if clean:
            await self.flush()
            try:
                await self.al.clean_shutdown()
            except RuntimeError:
                clean = False         # writes were cut off: the next start replays the AL
        if clean:
            await run_io(self.md.set_flags, AL_CLEAN)
        self.md.close()
        os.close(self.fd)
