"""Recovery points (RPs) of one volume: a copy-before-write delta chain.

An RP is a read-only, crash-consistent image of the volume at one instant.
Creating one only starts an empty delta log; before a chunk of the live
volume is first overwritten after that, its current contents are appended to
the NEWEST log (`preserve`). Reading RP k takes each chunk from the first log
k, k+1, ... newest that holds it, else from the live volume: a chunk absent
from all of them has not changed since k was created.

Why copy-before-write and not redirect-on-write: the live volume stays a
plain raw file or block device that QEMU, the peer and the resync read
directly, and an RP costs space only for the chunks changed after it.
ext4 has no reflink and block devices have nothing like it.

One log file per RP, `<rp_id>.delta` in the volume's RP directory. Layout
(little-endian, every batch 4 KiB aligned):

    0      header (4 KiB): magic TANDEMRP, version, creation seq, volume size,
           chunk size, rp id, CRC32
    4096   batch 1: head (magic, CRC32 of the head, log seq, batch number,
           record count; then per record: chunk index, length, CRC32 of the
           data), padded to 4 KiB; then the records' data back to back,
           padded to 4 KiB
    ...    batch 2, 3, ...

A batch is what one `preserve` call (or one step of a delete) appends, and it
is followed by exactly one fdatasync before anything else is appended to that
log. So only the LAST batch of a log can be torn by a crash, and a torn batch
was never acknowledged: `preserve` had not returned, the live write it guards
had not started, and the live volume still holds what the batch would have
saved. Open therefore drops an invalid last batch of a log that may be
mid-append (the newest log; the log a delete was moving records into) and
calls anything else invalid corruption, naming the file. See docs/engine.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any

from .bitmap import Bitmap
from .durable import fsync_dir
from .fileexport import _pread_full, _pwrite_full

MAGIC = b"TANDEMRP"
VERSION = 1
HEADER_SIZE = 4096
PAGE = 4096
BATCH_MAGIC = 0x42505254            # "TRPB"
DEFAULT_CHUNK = 64 << 10
#: Bytes read or written per system call inside one batch (bounds memory, not fsyncs).
STREAM = 4 << 20
#: Bytes per batch (one fdatasync each) when a delete moves records into an older log;
#: it also bounds what open has to re-read to check a log's last batch.
MOVE_BATCH = 64 << 20
#: Bytes per step of a restore (preserve, read the RP, write the live volume).
RESTORE_STEP = 8 << 20

SUFFIX = ".delta"
DELETING = ".delta.deleting"        # a delete in progress: open finishes it
TMP = ".delta.tmp"                  # a create in progress: open removes it

RP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,80}")

_HEAD = struct.Struct("<8sIIQQIB81s")   # magic, version, header size, seq, size, chunk, id len, id
_BATCH = struct.Struct("<IIQQI4x")      # magic, crc, log seq, batch number, count
_ENTRY = struct.Struct("<QII")          # chunk index, length, crc of data
_BATCH_MAGIC_BYTES = struct.pack("<I", BATCH_MAGIC)


class RPStoreError(Exception):
    """The RP directory or a log in it is inconsistent, or an operation is not possible."""


class CorruptLog(RPStoreError):
    """A delta log failed a check (the message names the file and offset)."""


class UnknownRP(RPStoreError, LookupError):
    """No recovery point with this id on this volume."""


class RPInUse(RPStoreError):
    """The RP is served (RPImage) or cloned (Clone) and cannot be deleted."""


def check_rp_id(rp_id: str) -> str:
    if not isinstance(rp_id, str) or not RP_ID_RE.fullmatch(rp_id):
        raise ValueError(f"invalid recovery point id {rp_id!r} (want {RP_ID_RE.pattern})")
    return rp_id


def _round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def _pack_header(seq: int, size: int, chunk: int, rp_id: str) -> bytes:
    raw = rp_id.encode()
    body = _HEAD.pack(MAGIC, VERSION, HEADER_SIZE, seq, size, chunk, len(raw), raw)
    return body + struct.pack("<I", zlib.crc32(body)) + bytes(HEADER_SIZE - len(body) - 4)


def _unpack_header(path: str, raw: bytes) -> tuple[int, int, int, str]:
    """(seq, volume size, chunk, rp id) of a log header, or CorruptLog."""
    if len(raw) < _HEAD.size + 4 or raw[:8] != MAGIC:
        raise CorruptLog(f"{path}: not a tandem delta log (bad magic or short header)")
    (crc,) = struct.unpack_from("<I", raw, _HEAD.size)
    if zlib.crc32(raw[:_HEAD.size]) != crc:
        raise CorruptLog(f"{path}: header CRC mismatch")
    _, version, hsize, seq, size, chunk, id_len, raw_id = _HEAD.unpack_from(raw)
    if version != VERSION or hsize != HEADER_SIZE:
        raise CorruptLog(f"{path}: unsupported log version {version} / header size {hsize}")
    return seq, size, chunk, raw_id[:id_len].decode("ascii", "replace")


def _pread_padded(fd: int, length: int, offset: int) -> bytes:
    """pread that reads a short file's missing tail as zeroes (a sparse live file)."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            return data + bytes(length - len(data))
        data += more
    return data


def _merge(chunks: Iterable[int], chunk: int, size: int) -> list[tuple[int, int]]:
    """Sorted chunk indexes -> merged (offset, length) byte ranges clipped to the volume."""
    ranges: list[tuple[int, int]] = []
    start = prev = None
    for c in chunks:
        if prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            ranges.append((start * chunk, min((prev + 1) * chunk, size) - start * chunk))
        start = prev = c
    if start is not None:
        ranges.append((start * chunk, min((prev + 1) * chunk, size) - start * chunk))
    return ranges


class _Log:
    """One RP's delta log: its fd and the index chunk -> (data offset << 32 | crc)."""

    __slots__ = ("path", "fd", "rp_id", "seq", "index", "end", "batches", "users", "doomed")

    def __init__(self, path: str, fd: int, rp_id: str, seq: int):
        self.path, self.fd, self.rp_id, self.seq = path, fd, rp_id, seq
        self.index: dict[int, int] = {}
        self.end = HEADER_SIZE            # where the next batch goes
        self.batches = 0
        self.users = 0                    # reads in progress (the fd must stay open)
        self.doomed = False               # deleted: close the fd when users reaches 0

    def __repr__(self) -> str:
        return f"_Log({self.rp_id!r}, seq={self.seq}, chunks={len(self.index)}, end={self.end})"


class StoreBase:
    """What both kinds of RP store share: pins, and the checks of their arguments.

    A subclass has size, chunk, _shift (log2 of chunk), directory, _lock, _pins,
    _closed and _by_id (rp id -> its log or image).
    """

    def __contains__(self, rp_id: str) -> bool:
        return rp_id in self._by_id

    def _find(self, rp_id: str):
        """The RP's log or image; UnknownRP if there is none."""
        found = self._by_id.get(rp_id)
        if found is None:
            raise UnknownRP(f"no recovery point {rp_id!r} in {self.directory}")
        return found

    def _chunk_len(self, c: int) -> int:
        return min(self.chunk, self.size - (c << self._shift))

    def pin(self, rp_id: str) -> None:
        """Keep the RP from being deleted until unpin() (RPImage and Clone do this)."""
        with self._lock:
            self._find(rp_id)
            self._pins[rp_id] = self._pins.get(rp_id, 0) + 1

    def unpin(self, rp_id: str) -> None:
        with self._lock:
            n = self._pins.get(rp_id, 0) - 1
            if n > 0:
                self._pins[rp_id] = n
            else:
                self._pins.pop(rp_id, None)

    def _check_open(self) -> None:
        if self._closed:
            raise RPStoreError(f"{self.directory}: RP store is closed")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside the volume ({self.size} bytes)")


class RPStore(StoreBase):
    """The recovery points of one volume (a directory of delta logs).

    Thread-safe. Locks, always taken in this order:
      _admin  create / delete / restore / close (one at a time)
      _plock  appends to the newest log and changes of which log is newest
      _lock   the chain and the indexes; held only briefly, never across I/O
    """

    def __init__(self, directory: str, live_fd: int, size: int, chunk: int, logs: list[_Log]):
        self.directory, self.live_fd, self.size, self.chunk = directory, live_fd, size, chunk
        self._shift = chunk.bit_length() - 1
        self.nchunks = -(-size // chunk)
        self._chain = logs                                  # by creation seq, oldest first
        self._by_id = {log.rp_id: log for log in logs}
        self._newest: _Log | None = logs[-1] if logs else None
        self._next_seq = max((log.seq for log in logs), default=0) + 1
        self._pins: dict[str, int] = {}
        self._admin = threading.Lock()
        self._plock = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RPStore({self.directory!r}, size={self.size}, chunk={self.chunk}, rps={self.rp_ids()})"

    # -- open / close ------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str, live_fd: int, size: int, chunk: int = DEFAULT_CHUNK) -> RPStore:
        """Open (creating the directory if needed) and rebuild the indexes from the logs.

        `chunk` (a power of two >= 4 KiB) applies when the directory holds no log;
        otherwise the logs' own chunk size is used (they all share one). Finishes a
        delete that a crash interrupted.
        """
        if chunk < PAGE or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= {PAGE}, got {chunk}")
        if size <= 0:
            raise ValueError(f"volume size must be positive, got {size}")
        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        logs: list[_Log] = []
        deleting: set[_Log] = set()
        try:
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                if name.endswith(TMP):
                    os.unlink(path)           # a create that never returned: no RP yet
                    continue
                if name.endswith(DELETING):
                    rp_id = name[:-len(DELETING)]
                elif name.endswith(SUFFIX):
                    rp_id = name[:-len(SUFFIX)]
                else:
                    continue                  # not ours (e.g. the resource layer's manifest)
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    seq, vsize, vchunk, hid = _unpack_header(path, os.pread(fd, HEADER_SIZE, 0))
                    if hid != rp_id:
                        raise CorruptLog(f"{path}: header names RP {hid!r}, the file name {rp_id!r}")
                    if vsize != size:
                        raise RPStoreError(f"{path}: log is for a volume of {vsize} bytes, "
                                           f"the volume has {size}")
                    if vchunk < PAGE or vchunk & (vchunk - 1):
                        raise CorruptLog(f"{path}: bad chunk size {vchunk}")
                    if logs and vchunk != chunk:
                        raise CorruptLog(f"{path}: chunk size {vchunk}, other logs use {chunk}")
                except BaseException:
                    os.close(fd)
                    raise
                chunk = vchunk
                log = _Log(path, fd, rp_id, seq)
                logs.append(log)
                if name.endswith(DELETING):
                    deleting.add(log)
            logs.sort(key=lambda log: log.seq)
            for a, b in zip(logs, logs[1:], strict=False):
                if a.seq == b.seq:
                    raise CorruptLog(f"{b.path}: same creation seq {b.seq} as {a.path}")
            store = cls(directory, live_fd, size, chunk, logs)
            # Only these logs can be mid-append at a crash: the newest (preserve), and
            # the log just older than one being deleted (the delete's move).
            tolerant = {logs[-1]} if logs else set()
            tolerant |= {logs[i - 1] for i, log in enumerate(logs) if log in deleting and i > 0}
            for log in logs:
                store._scan(log, log in tolerant)
            store._by_id = {log.rp_id: log for log in logs if log not in deleting}
            for log in sorted(deleting, key=lambda log: -log.seq):
                store._finish_delete(log)
        except BaseException:
            for log in logs:
                with contextlib.suppress(OSError):
                    os.close(log.fd)
            raise
        return store

    def close(self) -> None:
        """Close the logs (not the live fd, which belongs to the caller). Idempotent."""
        with self._admin, self._plock, self._lock:
            if self._closed:
                return
            self._closed = True
            self._newest = None
            for log in self._chain:
                if log.fd >= 0:
                    os.close(log.fd)
                    log.fd = -1
            self._chain, self._by_id = [], {}

    # -- queries -----------------------------------------------------------------------

    def rp_ids(self) -> list[str]:
        """The RPs, oldest first."""
        with self._lock:
            return [log.rp_id for log in self._chain if log.rp_id in self._by_id]

    def bytes_used(self, rp_id: str) -> int:
        """Bytes of the RP's log file (header, batch heads and preserved data)."""
        with self._lock:
            return self._find(rp_id).end

    def changed_since(self, rp_id: str) -> list[tuple[int, int]]:
        """(offset, length) ranges where the RP may differ from the live volume."""
        with self._lock:
            chunks: set[int] = set()
            for log in self._chain_from(rp_id):
                chunks.update(log.index)
        return _merge(sorted(chunks), self.chunk, self.size)

    # -- the write path's hooks ----------------------------------------------------------

    def needs_preserve(self, offset: int, length: int) -> bool:
        """Must preserve() run before a live write of this range? In memory, no lock.

        False is final: the chunks are durably saved in the newest log. True may be
        stale (another thread saving them right now); preserve() then does nothing.
        """
        log = self._newest
        if log is None or length <= 0:
            return self._closed and length > 0     # closed: preserve() says so
        idx = log.index
        first = offset >> self._shift
        last = (offset + length - 1) >> self._shift
        if first == last:
            return first not in idx
        return any(c not in idx for c in range(first, last + 1))

    def preserve(self, offset: int, length: int) -> None:
        """Save the current contents of every chunk of the range not yet in the newest
        log: one batch, one fdatasync. Blocking; call it BEFORE the live write.

        On return every such chunk is durable in the newest log. Two threads on
        overlapping ranges: the second waits for the first and copies nothing twice.
        """
        self._check_range(offset, length)
        if length <= 0:
            return
        first, last = offset >> self._shift, (offset + length - 1) >> self._shift
        with self._plock:
            self._check_open()              # never let a write past a closed store silently
            log = self._newest
            if log is None:
                return
            todo = [c for c in range(first, last + 1) if c not in log.index]
            if todo:
                self._append(log, todo, self._live_records(todo))

    # -- recovery points -----------------------------------------------------------------

    def create(self, rp_id: str) -> None:
        """Start a new RP: an empty newest log, durable on return. O(1).

        The caller must have drained and paused writes to the volume: a write that
        checked needs_preserve() before this and lands after it would be missed.
        """
        check_rp_id(rp_id)
        with self._admin, self._plock:
            self._check_open()
            if rp_id in self._by_id:
                raise RPStoreError(f"recovery point {rp_id!r} already exists")
            old = self._newest
            if old is not None and os.fstat(old.fd).st_size != old.end:
                # Junk after the last good batch (a failed append that could not be
                # undone): cut it now, as only the newest log may have a torn tail.
                os.ftruncate(old.fd, old.end)
                os.fsync(old.fd)
            path = os.path.join(self.directory, rp_id + SUFFIX)
            tmp = os.path.join(self.directory, rp_id + TMP)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _pwrite_full(fd, _pack_header(self._next_seq, self.size, self.chunk, rp_id), 0, False)
                os.fsync(fd)
                os.rename(tmp, path)          # never a half-made log under the real name
                fsync_dir(self.directory)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            log = _Log(path, fd, rp_id, self._next_seq)
            self._next_seq += 1
            with self._lock:
                self._chain.append(log)
                self._by_id[rp_id] = log
                self._newest = log

    def delete(self, rp_id: str) -> None:
        """Delete an RP, keeping every other RP's image.

        Records it holds that the next older RP lacks move to that older log first.
        Why that is the older RP's value too: the newer log N saved chunk c, so c
        was first written after N's creation and N's record is c as it was when N
        was created. The older log O lacking c means nobody wrote c while O was the
        newest (that write would have saved c in O), and any log between O and N
        that saved it was deleted earlier and moved it into O. So c did not change
        between O's creation and N's: N's record is O's image of c as well.

        Crash ordering: the log is first renamed to `<id>.delta.deleting` (and the
        directory fsynced), then the records are appended to the older log in
        fdatasync'ed batches, then the file is unlinked. Open finishes a delete
        it finds half done: the older log's torn tail (if any) is dropped and the
        move redone, moving only what the older log still lacks. So no record is
        ever duplicated and no RP is wrong at any instant.
        """
        with self._admin:
            self._check_open()
            with self._lock:                  # checked and hidden at once: no new pin or read
                log = self._find(rp_id)
                if self._pins.get(rp_id):
                    raise RPInUse(f"recovery point {rp_id!r} is in use "
                                  f"({self._pins[rp_id]} exports/clones)")
                del self._by_id[rp_id]
            # Deleting the newest: no preserve may append to it meanwhile, and the
            # older log becomes the newest.
            with self._plock if log is self._newest else contextlib.nullcontext():
                if self._chain[0] is not log:
                    deleting = os.path.join(self.directory, rp_id + DELETING)
                    try:
                        os.rename(log.path, deleting)
                    except BaseException:
                        with self._lock:      # nothing changed: the RP is still there
                            self._by_id[rp_id] = log
                        raise
                    log.path = deleting
                    fsync_dir(self.directory)
                # From here a failure (ENOSPC in the older log) leaves the RP hidden
                # and its records still in the chain; the next open finishes the delete.
                self._finish_delete(log)

    def restore(self, rp_id: str) -> list[tuple[int, int]]:
        """Write the RP's image back onto the live volume. Returns the ranges written.

        Writes only changed_since(rp_id), each step preserved first like any other
        write: every RP stays valid, the newer ones included (they keep the state
        being rolled back, so a restore can itself be undone), and the restored RP
        still reads its image (its records now equal the live data). A crash part
        way leaves every RP valid and the restore can simply be run again.

        Blocking. The caller must keep other writes to the volume out for the
        duration and mark the returned ranges out of sync with the peer (mark
        changed_since(rp_id) BEFORE calling, to survive a crash half way).
        """
        with self._admin:
            self._check_open()
            ranges = self.changed_since(rp_id)
            for offset, length in ranges:
                end = offset + length
                while offset < end:
                    n = min(RESTORE_STEP, end - offset)
                    self.preserve(offset, n)
                    _pwrite_full(self.live_fd, self.read(rp_id, offset, n), offset, False)
                    offset += n
            os.fdatasync(self.live_fd)
            return ranges

    def read(self, rp_id: str, offset: int, length: int) -> bytes:
        """The RP's image of a range. Thread-safe with preserve(), delete() and create()."""
        self._check_range(offset, length)
        if length <= 0:
            return b""
        buf = bytearray(length)
        end = offset + length
        todo = list(range(offset >> self._shift, ((end - 1) >> self._shift) + 1))
        while todo:
            with self._lock:
                chain = self._chain_from(rp_id)
                from_logs: dict[_Log, list[tuple[int, int]]] = {}
                live: list[int] = []
                for c in todo:
                    for log in chain:
                        entry = log.index.get(c)
                        if entry is not None:
                            from_logs.setdefault(log, []).append((c, entry))
                            break
                    else:
                        live.append(c)
                for log in from_logs:
                    log.users += 1
            try:
                for log, items in from_logs.items():
                    self._read_records(log, items, buf, offset, end)
            finally:
                self._unref(from_logs)
            if not live:
                break
            for run in _runs(live, STREAM // self.chunk):
                lo = max(offset, run[0] << self._shift)
                hi = min(end, (run[-1] + 1) << self._shift)
                buf[lo - offset:hi - offset] = _pread_padded(self.live_fd, hi - lo, lo)
            # A live write of chunk c starts only after preserve() marked c saved in the
            # newest log. So a chunk still unsaved now was not being overwritten while we
            # read it; one saved meanwhile may have been, and is read again from its log.
            with self._lock:
                chain = self._chain_from(rp_id)
                todo = [c for c in live if any(c in log.index for log in chain)]
        return bytes(buf)

    def verify(self) -> int:
        """Check the data CRC of every record of every log (a scrub). Returns records checked."""
        checked = 0
        with self._admin:
            self._check_open()
            for log in list(self._chain):
                with self._lock:            # the newest log's index grows meanwhile
                    items = sorted(log.index.items(), key=lambda item: item[1])
                for _c, _data in self._log_records(log, items):
                    checked += 1
        return checked

    # -- internals ---------------------------------------------------------------------------

    def _chain_from(self, rp_id: str) -> list[_Log]:
        log = self._find(rp_id)
        return self._chain[self._chain.index(log):]

    def _unref(self, logs: Iterable[_Log]) -> None:
        with self._lock:
            for log in logs:
                log.users -= 1
                if log.doomed and not log.users and log.fd >= 0:
                    os.close(log.fd)
                    log.fd = -1

    def _live_records(self, chunks: list[int]) -> Iterator[tuple[int, memoryview]]:
        """(chunk, current live contents) for sorted chunks, read in runs."""
        for run in _runs(chunks, STREAM // self.chunk):
            lo = run[0] << self._shift
            hi = min(self.size, (run[-1] + 1) << self._shift)
            view = memoryview(_pread_padded(self.live_fd, hi - lo, lo))
            for c in run:
                at = (c << self._shift) - lo
                yield c, view[at:at + self._chunk_len(c)]

    def _log_records(self, log: _Log, items: list[tuple[int, int]]) -> Iterator[tuple[int, memoryview]]:
        """(chunk, data) for index items sorted by data offset, CRC-checked, read in runs."""
        i = 0
        while i < len(items):
            j, nbytes = i + 1, self._chunk_len(items[i][0])
            while (j < len(items) and nbytes < STREAM
                   and items[j][1] >> 32 == (items[i][1] >> 32) + nbytes):
                nbytes += self._chunk_len(items[j][0])
                j += 1
            start = items[i][1] >> 32
            view = memoryview(_pread_full(log.fd, nbytes, start))
            for c, entry in items[i:j]:
                at = (entry >> 32) - start
                data = view[at:at + self._chunk_len(c)]
                if zlib.crc32(data) != entry & 0xFFFFFFFF:
                    raise CorruptLog(f"{log.path}: data CRC mismatch for chunk {c} at offset {entry >> 32}")
                yield c, data
            i = j

    def _read_records(self, log: _Log, items: list[tuple[int, int]], buf: bytearray,
                      offset: int, end: int) -> None:
        """Copy the wanted parts of these records into buf; whole records are CRC-checked."""
        i = 0
        while i < len(items):
            j = i + 1
            while (j < len(items) and items[j][0] == items[j - 1][0] + 1
                   and items[j][1] >> 32 == (items[j - 1][1] >> 32) + self.chunk):
                j += 1
            c0 = items[i][0]
            lo = max(offset, c0 << self._shift)
            hi = min(end, (items[j - 1][0] << self._shift) + self._chunk_len(items[j - 1][0]))
            at = (items[i][1] >> 32) + lo - (c0 << self._shift)
            data = _pread_full(log.fd, hi - lo, at)
            buf[lo - offset:hi - offset] = data
            for c, entry in items[i:j]:
                c_lo = c << self._shift
                c_hi = c_lo + self._chunk_len(c)
                whole = c_lo >= lo and c_hi <= hi        # partial reads are not checked
                if whole and zlib.crc32(memoryview(data)[c_lo - lo:c_hi - lo]) != entry & 0xFFFFFFFF:
                    raise CorruptLog(f"{log.path}: data CRC mismatch for chunk {c} at offset {entry >> 32}")
            i = j

    def _append(self, log: _Log, chunks: list[int], records: Iterator[tuple[int, Any]]) -> None:
        """Append ONE batch holding `records` (chunk, data) to log, fdatasync once, then
        mark the chunks saved. Caller holds _plock (the newest log) or _admin (a move)."""
        head_len = _round_up(_BATCH.size + len(chunks) * _ENTRY.size)
        start = log.end
        at = pos = start + head_len           # at: first byte not yet written
        entries = bytearray()
        index: dict[int, int] = {}
        parts: list[Any] = []
        pending = 0
        try:
            for c, data in records:
                crc = zlib.crc32(data)
                entries += _ENTRY.pack(c, len(data), crc)
                index[c] = (pos << 32) | crc
                parts.append(data)
                pos += len(data)
                pending += len(data)
                if pending >= STREAM:
                    _pwrite_full(log.fd, b"".join(parts), at, False)
                    at, parts, pending = pos, [], 0
            if len(index) != len(chunks):
                raise RuntimeError("batch records do not match the chunks announced")
            parts.append(bytes(_round_up(pos) - pos))
            head = _BATCH.pack(BATCH_MAGIC, 0, log.seq, log.batches + 1, len(chunks)) + entries
            crc = zlib.crc32(head[:4] + bytes(4) + head[8:])
            head = head[:4] + struct.pack("<I", crc) + head[8:]
            head += bytes(head_len - len(head))
            if at == start + head_len:        # small batch: head and data in one write
                _pwrite_full(log.fd, head + b"".join(parts), start, False)
            else:
                _pwrite_full(log.fd, b"".join(parts), at, False)
                _pwrite_full(log.fd, head, start, False)
            os.fdatasync(log.fd)
        except BaseException:
            # Leave no half batch behind (the next one would land after it).
            with contextlib.suppress(OSError):
                os.ftruncate(log.fd, log.end)
            raise
        with self._lock:
            log.index.update(index)
            log.end = _round_up(pos)
            log.batches += 1

    def _finish_delete(self, log: _Log) -> None:
        """Move what the next older log lacks into it, then drop the log (see delete)."""
        i = self._chain.index(log)
        older = self._chain[i - 1] if i > 0 else None
        if older is not None:
            items = sorted(((c, e) for c, e in log.index.items() if c not in older.index),
                           key=lambda item: item[1])
            per_batch = max(1, MOVE_BATCH // self.chunk)
            for k in range(0, len(items), per_batch):
                part = items[k:k + per_batch]
                self._append(older, [c for c, _ in part], self._log_records(log, part))
        with self._lock:
            self._chain.remove(log)
            self._by_id.pop(log.rp_id, None)
            if self._newest is log:
                self._newest = self._chain[-1] if self._chain else None
            log.doomed = True
            if not log.users:
                os.close(log.fd)
                log.fd = -1
        os.unlink(log.path)
        fsync_dir(self.directory)

    # -- open: scanning a log ----------------------------------------------------------------

    def _scan(self, log: _Log, tolerant: bool) -> None:
        """Rebuild log's index from its batch heads. A tolerant log (one that may be
        mid-append) loses an invalid LAST batch; anything else invalid is CorruptLog."""
        file_size = os.fstat(log.fd).st_size
        pos, n = HEADER_SIZE, 0
        last: tuple[int, list[tuple[int, int, int]]] | None = None     # not yet in the index
        torn_at = None
        while pos < file_size:
            parsed, why = self._parse_batch(log, pos, file_size, n + 1)
            if parsed is None:
                if tolerant and not self._later_batch(log, pos, n, file_size):
                    torn_at = pos
                    break
                raise CorruptLog(f"{log.path}: batch {n + 1} at offset {pos}: {why}")
            entries, extent = parsed
            if last is not None:
                self._index_batch(log, last[1])
            last = (pos, entries)
            pos += extent
            n += 1
        if last is not None and tolerant and torn_at is None and not self._data_ok(log, last[1]):
            torn_at = last[0]       # its head made it to disk but not all of its data
            last = None
            n -= 1
        if last is not None:
            self._index_batch(log, last[1])
        log.batches = n
        log.end = pos if torn_at is None else torn_at
        if torn_at is not None:
            os.ftruncate(log.fd, torn_at)
            os.fsync(log.fd)

    @staticmethod
    def _index_batch(log: _Log, entries: list[tuple[int, int, int]]) -> None:
        for c, off, crc in entries:
            # The first record of a chunk in a log wins (there is never a second one:
            # preserve and the delete's move both skip chunks the log already has).
            log.index.setdefault(c, (off << 32) | crc)

    def _parse_head(self, log: _Log, pos: int) -> tuple[int, int, bytes] | None:
        """(batch number, count, head bytes) if a valid batch head of this log is at pos."""
        raw = os.pread(log.fd, PAGE, pos)
        if len(raw) < _BATCH.size:
            return None
        magic, crc, seq, number, count = _BATCH.unpack_from(raw)
        if magic != BATCH_MAGIC or seq != log.seq or not 0 < count <= self.nchunks:
            return None
        need = _BATCH.size + count * _ENTRY.size
        if need > len(raw):
            raw += os.pread(log.fd, need - len(raw), pos + len(raw))
            if len(raw) < need:
                return None
        if zlib.crc32(raw[:4] + bytes(4) + raw[8:need]) != crc:
            return None
        return number, count, raw[:need]

    def _parse_batch(self, log: _Log, pos: int, file_size: int, number: int):
        """((chunk, data offset, crc) list, extent) of the batch at pos, or (None, why)."""
        head = self._parse_head(log, pos)
        if head is None:
            return None, "bad or torn batch head"
        got, count, raw = head
        if got != number:
            return None, f"batch number {got}, expected {number}"
        data = pos + _round_up(_BATCH.size + count * _ENTRY.size)
        entries, seen = [], set()
        for k in range(count):
            c, length, crc = _ENTRY.unpack_from(raw, _BATCH.size + k * _ENTRY.size)
            if c >= self.nchunks or length != self._chunk_len(c) or c in seen:
                return None, f"bad record {k} (chunk {c}, length {length})"
            seen.add(c)
            entries.append((c, data, crc))
            data += length
        extent = _round_up(data) - pos
        if pos + extent > file_size:
            return None, f"data runs past the end of the file ({pos + extent} > {file_size})"
        return (entries, extent), ""

    def _later_batch(self, log: _Log, pos: int, good: int, file_size: int) -> bool:
        """Is there a valid head of a batch numbered > good after pos? Then the bad batch
        at pos was followed by a later one, so it was fdatasync'ed: corruption, not a tear."""
        block = 1 << 20
        for base in range(pos + PAGE, file_size, block):
            raw = os.pread(log.fd, min(block, file_size - base), base)
            for at in range(0, len(raw), PAGE):
                if raw[at:at + 4] == _BATCH_MAGIC_BYTES:
                    head = self._parse_head(log, base + at)
                    if head is not None and head[0] > good:
                        return True
        return False

    def _data_ok(self, log: _Log, entries: list[tuple[int, int, int]]) -> bool:
        for c, off, crc in entries:
            data = os.pread(log.fd, self._chunk_len(c), off)
            if len(data) != self._chunk_len(c) or zlib.crc32(data) != crc:
                return False
        return True


def _runs(chunks: list[int], most: int) -> Iterator[list[int]]:
    """Split sorted chunk indexes into runs of consecutive ones, at most `most` long."""
    run: list[int] = []
    for c in chunks:
        if run and (c != run[-1] + 1 or len(run) >= most):
            yield run
            run = []
        run.append(c)
    if run:
        yield run


async def _run(executor: Executor | None, fn: Callable[..., Any], *args: Any) -> Any:
    if executor is None:
        return await asyncio.to_thread(fn, *args)
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def _eio(exc: RPStoreError) -> OSError:
    return OSError(errno.EIO, str(exc))


class RPImage:
    """An RP served read-only over NBD (see export.py). Pins the RP while open."""

    read_only = True

    def __init__(self, store: RPStore, rp_id: str, *, name: str = "", block_size: int = 4096,
                 executor: Executor | None = None):
        store.pin(rp_id)
        self.store, self.rp_id, self.name = store, rp_id, name
        self.size, self.block_size = store.size, block_size
        self._executor = executor
        self._closed = False

    def __repr__(self) -> str:
        return f"RPImage({self.rp_id!r}, name={self.name!r}, size={self.size})"

    async def read(self, offset: int, length: int) -> bytes:
        try:
            return await _run(self._executor, self.store.read, self.rp_id, offset, length)
        except RPStoreError as exc:
            raise _eio(exc) from exc

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        raise OSError(errno.EROFS, "a recovery point is read-only")

    async def flush(self) -> None:
        # Nothing was written, so everything written is durable. nbd.py advertises
        # FLUSH on every export and clients send it on read-only ones too.
        return None

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        raise OSError(errno.EROFS, "a recovery point is read-only")

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        raise OSError(errno.EROFS, "a recovery point is read-only")

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.store.unpin(self.rp_id)


_CLONE_MAGIC = b"TANDEMCL"
_CLONE_HEAD = struct.Struct("<8sIIQIB81s")   # magic, version, header size, size, chunk, id len, id


class Clone:
    """A writable copy of an RP for drills, as an Export (see export.py).

    `<directory>/data` is a sparse file the size of the volume: a chunk written in
    the clone lives there at its own offset. `<directory>/map` is a header (the RP
    id) and one bit per chunk, set = the chunk is in `data`. The first write to a
    chunk copies the RP's chunk into `data` before applying the write (partial
    writes merge). Nothing is ever written to the live volume or to the RP logs.

    Durability: flush() fdatasyncs `data`, then writes the map's dirty pages and
    fdatasyncs it. A bit reaches the disk only after its chunk's data did (bits
    only ever go 0 -> 1, so an old or new map page is valid either way); writes not
    flushed may be lost at a crash, as on a disk with a volatile cache.

    create() and open() are blocking; the async methods run blocking I/O on the
    given executor (else asyncio.to_thread). Pins the RP while open.
    """

    read_only = False

    def __init__(self, store: RPStore, rp_id: str, directory: str, data_fd: int, map_fd: int,
                 bitmap: Bitmap, *, name: str, block_size: int, executor: Executor | None):
        self.store, self.rp_id, self.directory, self.name = store, rp_id, directory, name
        self.size, self.block_size = store.size, block_size
        self.chunk = bitmap.block_size
        self._shift = self.chunk.bit_length() - 1
        self._data_fd, self._map_fd, self._map = data_fd, map_fd, bitmap
        self._executor = executor
        self._lock = threading.Lock()        # first writes of chunks, and flush
        self._closed = False

    def __repr__(self) -> str:
        return f"Clone({self.directory!r}, rp={self.rp_id!r}, chunks={self._map.count})"

    @classmethod
    def create(cls, store: RPStore, rp_id: str, directory: str, *, name: str = "",
               block_size: int = 4096, executor: Executor | None = None) -> Clone:
        """A new, empty clone of the RP in `directory` (which must not exist yet)."""
        check_rp_id(rp_id)
        if rp_id not in store:
            raise UnknownRP(f"no recovery point {rp_id!r} in {store.directory}")
        directory = os.path.abspath(directory)
        os.makedirs(directory)
        fd = os.open(os.path.join(directory, "data"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, store.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        raw = rp_id.encode()
        body = _CLONE_HEAD.pack(_CLONE_MAGIC, VERSION, PAGE, store.size, store.chunk, len(raw), raw)
        head = body + struct.pack("<I", zlib.crc32(body))
        bitmap = Bitmap(store.size, store.chunk)
        tmp = os.path.join(directory, "map.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _pwrite_full(fd, head + bytes(PAGE - len(head)) + bitmap.to_bytes(), 0, False)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(directory, "map"))
        fsync_dir(directory)
        return cls.open(store, directory, name=name, block_size=block_size, executor=executor)

    @classmethod
    def open(cls, store: RPStore, directory: str, *, name: str = "", block_size: int = 4096,
             executor: Executor | None = None) -> Clone:
        directory = os.path.abspath(directory)
        map_path = os.path.join(directory, "map")
        try:
            map_fd = os.open(map_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RPStoreError(f"{directory}: not a clone (no map file)") from None
        data_fd = -1
        try:
            raw = os.pread(map_fd, PAGE, 0)
            if len(raw) < _CLONE_HEAD.size + 4 or raw[:8] != _CLONE_MAGIC:
                raise CorruptLog(f"{map_path}: not a clone map")
            (crc,) = struct.unpack_from("<I", raw, _CLONE_HEAD.size)
            if zlib.crc32(raw[:_CLONE_HEAD.size]) != crc:
                raise CorruptLog(f"{map_path}: header CRC mismatch")
            _, version, _, size, chunk, id_len, raw_id = _CLONE_HEAD.unpack_from(raw)
            rp_id = raw_id[:id_len].decode("ascii", "replace")
            if version != VERSION:
                raise CorruptLog(f"{map_path}: unsupported clone version {version}")
            if size != store.size:
                raise RPStoreError(f"{map_path}: clone of a {size}-byte volume, this one has {store.size}")
            bitmap = Bitmap(size, chunk)
            bits = os.pread(map_fd, bitmap.nbytes, PAGE)
            if len(bits) != bitmap.nbytes:
                raise CorruptLog(f"{map_path}: truncated chunk map")
            bitmap = Bitmap(size, chunk, bits)
            data_fd = os.open(os.path.join(directory, "data"), os.O_RDWR | os.O_CLOEXEC)
            store.pin(rp_id)           # UnknownRP: the RP was deleted under the clone
        except BaseException:
            os.close(map_fd)
            if data_fd >= 0:
                os.close(data_fd)
            raise
        return cls(store, rp_id, directory, data_fd, map_fd, bitmap, name=name,
                   block_size=block_size, executor=executor)

    # -- blocking --------------------------------------------------------------------------

    def read_sync(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, "request outside the clone")
        buf = bytearray(length)
        end = offset + length
        c, last = offset >> self._shift, (end - 1) >> self._shift
        while c <= last:
            mine = self._map.test(c)
            c1 = c
            while c1 + 1 <= last and self._map.test(c1 + 1) == mine:
                c1 += 1
            lo, hi = max(offset, c << self._shift), min(end, (c1 + 1) << self._shift)
            if mine:
                buf[lo - offset:hi - offset] = _pread_padded(self._data_fd, hi - lo, lo)
            else:
                buf[lo - offset:hi - offset] = self.store.read(self.rp_id, lo, hi - lo)
            c = c1 + 1
        return bytes(buf)

    def write_sync(self, offset: int, data: Any, fua: bool = False) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise OSError(errno.ENOSPC, "write outside the clone")
        if not len(data):
            return
        end = offset + len(data)
        first, last = offset >> self._shift, (end - 1) >> self._shift
        if all(self._map.test(c) for c in range(first, last + 1)):
            _pwrite_full(self._data_fd, data, offset, False)
        else:
            with self._lock:
                for c in {first, last}:
                    c_lo = c << self._shift
                    c_hi = min(self.size, c_lo + self.chunk)
                    # A partly covered chunk not yet here: bring the RP's chunk first.
                    if not self._map.test(c) and (offset > c_lo or end < c_hi):
                        _pwrite_full(self._data_fd, self.store.read(self.rp_id, c_lo, c_hi - c_lo),
                                     c_lo, False)
                _pwrite_full(self._data_fd, data, offset, False)
                self._map.set_range(offset, len(data))
        if fua:
            self.flush_sync()

    def flush_sync(self) -> None:
        with self._lock:
            os.fdatasync(self._data_fd)           # the data before the bits that point at it
            pages = self._map.dirty_pages()
            for page in pages:
                _pwrite_full(self._map_fd, self._map.page(page), PAGE + page * PAGE, False)
            if pages:
                os.fdatasync(self._map_fd)
                self._map.mark_clean(pages)

    def write_zeroes_sync(self, offset: int, length: int, fua: bool) -> None:
        end = offset + length
        zeroes = bytes(min(length, 1 << 20))
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.write_sync(offset, memoryview(zeroes)[:n])
            offset += n
        if fua:
            self.flush_sync()

    def close_sync(self) -> None:
        if self._closed:
            return
        self.flush_sync()
        self._closed = True
        os.close(self._data_fd)
        os.close(self._map_fd)
        self.store.unpin(self.rp_id)

    # -- Export --------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        try:
            return await _run(self._executor, self.read_sync, offset, length)
        except RPStoreError as exc:
            raise _eio(exc) from exc

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        try:
            await _run(self._executor, self.write_sync, offset, data, fua)
        except RPStoreError as exc:
            raise _eio(exc) from exc

    async def flush(self) -> None:
        await _run(self._executor, self.flush_sync)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        # Advisory: the data may stay as it is.
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        try:
            await _run(self._executor, self.write_zeroes_sync, offset, length, fua)
        except RPStoreError as exc:
            raise _eio(exc) from exc

    async def close(self) -> None:
        await _run(self._executor, self.close_sync)
