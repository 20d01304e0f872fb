"""An Export backed by a raw file or a block device (standard library only).

Blocking calls (pread, pwrite, fdatasync, fallocate) run on a small dedicated thread
pool (IOPool) so they never stall the event loop. With ``nowait=True`` (the default, Linux) small
reads and writes are first tried inline with ``RWF_NOWAIT``, which the kernel completes
only if it can do so without blocking (page cache hit, no writeback throttling) and
otherwise refuses with EAGAIN; only then does the request go to the pool. That skips the
thread hand-off, the dominant cost of a 4 KiB request.

Durability: ``write(fua=True)``, ``trim(fua=True)`` and ``write_zeroes(fua=True)`` call
fdatasync before returning; ``flush()`` calls fdatasync, which covers every write that
completed before it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import queue
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: Largest chunk written when zeroes have to be written out for real.
ZERO_CHUNK = 1024 * 1024
#: Largest request tried inline with RWF_NOWAIT; bigger ones go to the pool, where the
#: copy into the page cache runs in parallel with the event loop.
NOWAIT_MAX = 128 * 1024

_ZERO_BUF = bytes(ZERO_CHUNK)
#: errnos meaning "this fallocate mode is not supported here": stop trying
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY})
#: ... and "not for this request" (e.g. a block device refuses a range not aligned to its
#: logical block size): fall back this time only
_NOT_THIS_TIME = frozenset({errno.EINVAL})
#: errnos meaning "RWF_NOWAIT is not supported for this file" (EINVAL: older kernels)
_NOWAIT_UNSUPPORTED = _UNSUPPORTED | {errno.EINVAL}


def _load_fallocate() -> Callable[[int, int, int, int], None] | None:
    """fallocate(2) through ctypes, or None where libc or ctypes lacks it."""
    try:
        import ctypes
    except ImportError:  # pragma: no cover - ctypes is part of every CPython we target
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):  # pragma: no cover
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if func(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return fallocate


_fallocate = _load_fallocate()
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    done = len(data)
    while done < length:
        chunk = os.pread(fd, length - done, offset + done)
        if not chunk:
            raise OSError(errno.EIO, f"short read at offset {offset + done} (file truncated?)")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def _pwrite_full(fd: int, data: Any, offset: int, fua: bool) -> None:
    view = memoryview(data)
    done = 0
    total = len(view)
    while done < total:
        done += os.pwrite(fd, view[done:], offset + done)
    if fua:
        os.fdatasync(fd)


def _write_zeroes_loop(fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        n = min(ZERO_CHUNK, end - offset)
        _pwrite_full(fd, memoryview(_ZERO_BUF)[:n], offset, False)
        offset += n


class IOPool:
    """A few threads that run blocking calls for one event loop.

    Lighter than ``loop.run_in_executor``: a job is a tuple on a SimpleQueue and its
    result an asyncio future, and finished jobs go back to the loop in batches, with one
    wake-up for however many completed meanwhile (at queue depth 16 that is most of the
    per-request cost of a thread hand-off).
    """

    def __init__(self, workers: int = 4, name: str = "tandem-io") -> None:
        if workers < 1:
            raise ValueError("workers must be positive")
        self._workers = workers
        self._name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]] = (
            collections.deque()
        )
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError("IOPool used from two event loops")
            self._loop = loop
        if self._closed:
            raise RuntimeError("IOPool is shut down")
        if not self._threads:
            for i in range(self._workers):
                thread = threading.Thread(target=self._work, name=f"{self._name}_{i}", daemon=True)
                thread.start()
                self._threads.append(thread)
        future = loop.create_future()
        self._jobs.put((future, func, args))
        return future

    def _work(self) -> None:
        jobs = self._jobs
        done = self._done
        while True:
            job = jobs.get()
            if job is None:
                return
            future, func, args = job
            del job
            try:
                result, error = func(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            # Hold no argument (a write's buffer) past the job: the NBD server reuses
            # a payload buffer only once nothing else references it.
            del args
            done.append((future, result, error))
            del result, error
            if not self._wake_pending:
                self._wake_pending = True
                # (RuntimeError: the loop is closed, nobody is waiting any more)
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._deliver)  # type: ignore[union-attr]

    def _deliver(self) -> None:
        # Clear the flag first: a worker finishing after this sees it clear and wakes us again.
        self._wake_pending = False
        done = self._done
        while done:
            future, result, exc = done.popleft()
            if future.cancelled():
                continue
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Let queued jobs finish, then stop the threads (blocks)."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()


class FileExport:
    """One file or block device, opened with os.open, served as an NBD export."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str = "",
        read_only: bool = False,
        block_size: int = 4096,
        executor: Executor | None = None,
        workers: int = 4,
        nowait: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.name = name
        self.read_only = read_only
        self.block_size = block_size
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(self.path, flags)
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                self.is_block_device = True
                self.size = os.lseek(fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                self.is_block_device = False
                self.size = st.st_size
            else:
                raise OSError(errno.EINVAL, "not a regular file or block device", self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        # Blocking calls go to ``executor`` if one is given (shared with other code), else
        # to a small pool of this export's own.
        self._executor = executor
        self._pool = IOPool(workers, "tandem-fileexport") if executor is None else None
        self._can_punch = _fallocate is not None
        self._can_zero_range = _fallocate is not None
        self._nowait_read = nowait and _RWF_NOWAIT is not None
        self._nowait_write = nowait and _RWF_NOWAIT is not None and not read_only
        self._closed = False

    def __repr__(self) -> str:
        return f"FileExport({self.path!r}, name={self.name!r}, size={self.size}, read_only={self.read_only})"

    def _call(self, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if self._pool is not None:
            return self._pool.submit(func, *args)
        return asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def read(self, offset: int, length: int) -> bytes:
        if self._nowait_read and length <= NOWAIT_MAX:
            buf = bytearray(length)
            try:
                n = os.preadv(self._fd, [buf], offset, _RWF_NOWAIT)  # type: ignore[arg-type]
            except BlockingIOError:
                n = 0
            except OSError as exc:
                if exc.errno not in _NOWAIT_UNSUPPORTED:
                    raise
                self._nowait_read = False
                n = 0
            if n == length:
                return bytes(buf)
            if n:
                rest = await self._call(_pread_full, self._fd, length - n, offset + n)
                return bytes(memoryview(buf)[:n]) + rest
        return await self._call(_pread_full, self._fd, length, offset)

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "export is read-only")
        done = 0
        if self._nowait_write and len(data) <= NOWAIT_MAX:
            try:
                done = os.pwritev(self._fd, [data], offset, _RWF_NOWAIT)  # type: ignore[arg-type]
            except BlockingIOError:
                done = 0
            except OSError as exc:
                if exc.errno not in _NOWAIT_UNSUPPORTED:
                    raise
                self._nowait_write = False
                done = 0
            if done == len(data):
                if fua:
                    await self._call(os.fdatasync, self._fd)
                return
        if done:
            await self._call(_pwrite_full, self._fd, memoryview(data)[done:], offset + done, fua)
        else:
            await self._call(_pwrite_full, self._fd, data, offset, fua)

    async def flush(self) -> None:
        if not self.read_only:
            await self._call(os.fdatasync, self._fd)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "export is read-only")
        if self._can_punch and await self._call(self._punch, offset, length, fua):
            return
        # Punching holes is not supported here: trim is advisory, so doing nothing is fine.

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "export is read-only")
        await self._call(self._zero, offset, length, fua, may_trim)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)
        os.close(self._fd)

    # --- run on the pool --------------------------------------------------------------

    def _punch(self, offset: int, length: int, fua: bool) -> bool:
        """Punch a hole (reads back as zeroes); False if this file cannot."""
        if not self._fallocate(FALLOC_FL_PUNCH_HOLE, offset, length, "_can_punch"):
            return False
        if fua:
            os.fdatasync(self._fd)
        return True

    def _zero(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        done = may_trim and self._can_punch and self._punch(offset, length, False)
        if not done:
            done = self._can_zero_range and self._zero_range(offset, length)
        if not done:
            _write_zeroes_loop(self._fd, offset, length)
        if fua:
            os.fdatasync(self._fd)

    def _zero_range(self, offset: int, length: int) -> bool:
        """FALLOC_FL_ZERO_RANGE: zeroes that stay allocated (no hole); False if unsupported."""
        return self._fallocate(FALLOC_FL_ZERO_RANGE, offset, length, "_can_zero_range")

    def _fallocate(self, mode: int, offset: int, length: int, capability: str) -> bool:
        """fallocate(mode | KEEP_SIZE); False if refused, and the `capability` flag
        is cleared when the file can never do this mode."""
        assert _fallocate is not None
        try:
            _fallocate(self._fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in _NOT_THIS_TIME:
                return False
            if exc.errno not in _UNSUPPORTED:
                raise
            setattr(self, capability, False)
            return False
        return True
