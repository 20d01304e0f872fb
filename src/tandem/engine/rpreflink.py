"""Recovery points of one volume as reflink copies (FICLONE), where the filesystem has them.

An RP is `<rp_id>.img`: a reflink copy of the whole live volume file, made by
one FICLONE ioctl. The copy shares every block with the live file; when the
live file is later written, the filesystem copies on write (XFS, btrfs), so
an RP costs space only for the blocks changed after it, and nothing at all
in the write path: `needs_preserve` is always False.

Same public interface as rpstore.RPStore, so RPImage, Clone and recovery.py
use either. What differs:

- create() costs one FICLONE: proportional to the number of EXTENTS of the
  live file (not its size), and the filesystem holds the live file's I/O
  lock meanwhile (benchmarks/rp_create.py --reflink measures it);
- an image is a plain raw file of the volume's size: it can be read (or
  loop-mounted read-only) without tandem;
- there is no chain: every image is independent, delete() is an unlink;
- changed_since() and restore() compare the image with the live file. FIEMAP
  tells which extents the two still share at the same offset: those are equal
  without reading them. Everything else is read from both files and compared
  chunk by chunk (worst case: a read of both files in full);
- restore() puts the differing chunks back with FICLONERANGE (the live file
  shares them with the RP again; pwrite where the filesystem refuses);
- bytes_used() charges each block the RPs keep alive (one the live file no
  longer maps) to the NEWEST RP that maps it (FIEMAP, physical addresses):
  the delta log's measure (a chunk's old data sits in the log of the newest
  RP before its first write), and the sum over the RPs is what they cost.
  Measured in a background thread (seconds on a very fragmented volume), so
  the figure may be a few seconds old;

Where the images live: `<volume file>.rp/` (image_dir()), next to the volume,
because FICLONE works only within one filesystem and the resource's state
directory usually is on another. The manifest stays in the state directory.

Crash safety: create clones into `<rp_id>.img.tmp`, sets the xattr
`user.tandem.rp` (format version, creation seq, volume size, chunk), fsyncs,
renames to `<rp_id>.img` and fsyncs the directory; open removes leftover
`.img.tmp` files. delete unlinks and fsyncs the directory. restore can be run
again after a crash (the caller marked the ranges out of sync first).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator

from .durable import fsync_dir
from .fileexport import _pwrite_full
from .rpstore import (
    DEFAULT_CHUNK,
    PAGE,
    STREAM,
    CorruptLog,
    RPInUse,
    RPStoreError,
    StoreBase,
    UnknownRP,
    _merge,
    _pread_padded,
    _runs,
    check_rp_id,
)

FICLONE = 0x40049409                # _IOW(0x94, 9, int)
FICLONERANGE = 0x4020940D           # _IOW(0x94, 13, struct file_clone_range)
FS_IOC_FIEMAP = 0xC020660B          # _IOWR('f', 11, struct fiemap)

FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
#: Extent flags under which fe_physical is not the data's own blocks one to one
#: (unknown, delalloc, encoded/compressed, encrypted, not aligned, inline, tail).
FIEMAP_UNTRUSTED = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400

SUFFIX = ".img"
TMP = ".img.tmp"                    # a create (or a probe) in progress: open removes it
XATTR = "user.tandem.rp"
FORMAT = 1
#: Bytes of both files looked at per FIEMAP pair in changed_since / restore.
SCAN = 64 << 20
#: What the probe clones from the start of the live file.
PROBE_BYTES = 64 << 10
#: Seconds bytes_used() reuses one pass over the files' maps.
USAGE_TTL = 2.0

_FIEMAP_HEAD = struct.Struct("=QQIIII")         # start, length, flags, mapped, count, reserved
_FIEMAP_EXT = struct.Struct("=QQQ16xI12x")      # logical, physical, length, flags
_CLONE_RANGE = struct.Struct("=qQQQ")           # src fd, src offset, length, dest offset
_FIEMAP_BATCH = 512

log = logging.getLogger("tandem.engine.rpreflink")


def image_dir(volume_path: str) -> str:
    """Where a file-backed volume's reflink images go: next to it, on its filesystem."""
    return os.path.abspath(os.fspath(volume_path)) + ".rp"


def holds_images(directory: str) -> bool:
    """Does the directory hold reflink RP images (then the volume stays on reflink)?"""
    try:
        return any(n.endswith(SUFFIX) for n in os.listdir(directory))
    except FileNotFoundError:
        return False


def clone_file(dst_fd: int, src_fd: int) -> None:
    """Make dst a reflink copy of all of src (FICLONE)."""
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


def clone_range(src_fd: int, src_offset: int, length: int, dst_fd: int, dst_offset: int) -> None:
    """Share src's blocks for a range into dst (FICLONERANGE). Offsets and length must be
    filesystem-block aligned (the length may end at src's end of file)."""
    fcntl.ioctl(dst_fd, FICLONERANGE, _CLONE_RANGE.pack(src_fd, src_offset, length, dst_offset))


def fiemap(fd: int, start: int, length: int, *, sync: bool = False) -> list[tuple[int, int, int, int]]:
    """(logical, physical, length, flags) of the extents that overlap [start, start+length).

    sync: write the file's dirty pages back first (FIEMAP_FLAG_SYNC), so the
    map is that of the data a read returns. OSError where FIEMAP is unsupported.
    """
    out: list[tuple[int, int, int, int]] = []
    end = start + length
    pos = start
    flags = FIEMAP_FLAG_SYNC if sync else 0
    buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_BATCH * _FIEMAP_EXT.size)
    while pos < end:
        _FIEMAP_HEAD.pack_into(buf, 0, pos, end - pos, flags, 0, _FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        for i in range(mapped):
            out.append(_FIEMAP_EXT.unpack_from(buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXT.size))
        if mapped < _FIEMAP_BATCH or out[-1][3] & FIEMAP_EXTENT_LAST:
            break
        pos = max(pos + 1, out[-1][0] + out[-1][2])
        flags = 0                                   # synced once is enough
    return out


def extent_count(fd: int) -> int:
    """How many extents the file has (FIEMAP with no extent buffer: the kernel only counts).
    OSError where FIEMAP is unsupported."""
    buf = bytearray(_FIEMAP_HEAD.size)
    _FIEMAP_HEAD.pack_into(buf, 0, 0, 0xFFFF_FFFF_FFFF_FFFF, 0, 0, 0, 0)
    fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    return _FIEMAP_HEAD.unpack_from(buf)[3]


def probe(directory: str, live_fd: int) -> str | None:
    """None if reflink RPs of this live file can go into `directory`, else why not.

    Clones the first 64 KiB of the live file into a temporary file there (it
    fails with EXDEV across filesystems, EOPNOTSUPP/EINVAL/ENOTTY without
    reflink) and sets the xattr the images carry. Leaves nothing behind; a
    directory it had to create is removed again when the answer is no.
    """
    st = os.fstat(live_fd)
    if not stat.S_ISREG(st.st_mode):
        return "the volume is not a regular file"
    created = not os.path.isdir(directory)
    tmp = os.path.join(directory, f".probe-{os.getpid()}-{threading.get_ident()}{TMP}")
    why = None
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            n = min(st.st_size, PROBE_BYTES)
            if n:
                clone_range(live_fd, 0, n, fd, 0)
            else:
                clone_file(fd, live_fd)
            os.setxattr(fd, XATTR, b"probe")
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        why = f"{name}: {e.strerror}"
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
    return why


class _Closed(Exception):
    """The store was closed during a background usage pass."""


class _Image:
    __slots__ = ("path", "fd", "rp_id", "seq", "users", "doomed")

    def __init__(self, path: str, fd: int, rp_id: str, seq: int):
        self.path, self.fd, self.rp_id, self.seq = path, fd, rp_id, seq
        self.users = 0                    # reads in progress (the fd must stay open)
        self.doomed = False               # deleted: close the fd when users reaches 0

    def __repr__(self) -> str:
        return f"_Image({self.rp_id!r}, seq={self.seq})"


def _pack_xattr(seq: int, size: int, chunk: int) -> bytes:
    return f"{FORMAT} {seq} {size} {chunk}".encode()


def _segments(extents, lo: int, hi: int) -> Iterator[tuple[int, int, object]]:
    """Cover [lo, hi) with (start, end, key): key None for a hole, the physical-minus-
    logical delta for a shared extent we can trust, else a key equal to nothing else."""
    pos = lo
    for logical, physical, length, flags in extents:
        a, b = max(lo, logical), min(hi, logical + length)
        if a >= b:
            continue
        if a > pos:
            yield pos, a, None
        trusted = flags & FIEMAP_EXTENT_SHARED and not flags & FIEMAP_UNTRUSTED
        yield a, b, (physical - logical) if trusted else object()
        pos = b
    if pos < hi:
        yield pos, hi, None


def _same_ranges(a_extents, b_extents, lo: int, hi: int) -> list[tuple[int, int]]:
    """Sub-ranges of [lo, hi) where two files map the same blocks (or both have holes)."""
    same: list[tuple[int, int]] = []
    sa, sb = list(_segments(a_extents, lo, hi)), list(_segments(b_extents, lo, hi))
    i = j = 0
    while i < len(sa) and j < len(sb):
        a0, a1, ka = sa[i]
        b0, b1, kb = sb[j]
        start, end = max(a0, b0), min(a1, b1)
        if start < end and ka == kb and (ka is None or isinstance(ka, int)):
            if same and same[-1][1] == start:
                same[-1] = (same[-1][0], end)
            else:
                same.append((start, end))
        if a1 <= b1:
            i += 1
        if b1 <= a1:
            j += 1
    return same


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, merged [lo, hi) ranges covering the given ones."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _subtract(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """a minus b, both sorted and disjoint."""
    out: list[tuple[int, int]] = []
    j = 0
    for lo, hi in a:
        while j < len(b) and b[j][1] <= lo:
            j += 1
        k = j
        while lo < hi and k < len(b) and b[k][0] < hi:
            if b[k][0] > lo:
                out.append((lo, b[k][0]))
            lo = max(lo, b[k][1])
            k += 1
        if lo < hi:
            out.append((lo, hi))
    return out


def _length(ranges: list[tuple[int, int]]) -> int:
    return sum(hi - lo for lo, hi in ranges)


class ReflinkStore(StoreBase):
    """The recovery points of one volume as reflink copies of the live file.

    Thread-safe. `_admin` serialises create / delete / restore / close; `_lock`
    guards the image table and the pins, held only briefly, never across I/O.
    """

    kind = "reflink"

    def __init__(self, directory: str, live_fd: int, size: int, chunk: int, images: list[_Image]):
        self.directory, self.live_fd, self.size, self.chunk = directory, live_fd, size, chunk
        self._shift = chunk.bit_length() - 1
        self.nchunks = -(-size // chunk)
        self._by_id = {img.rp_id: img for img in sorted(images, key=lambda img: img.seq)}
        self._next_seq = max((img.seq for img in images), default=0) + 1
        self._pins: dict[str, int] = {}
        self._usage: tuple[float, int, dict[str, int]] | None = None   # (when, generation, per RP)
        self._usage_gen = 0               # bumped by create / delete / restore
        self._usage_thread: threading.Thread | None = None
        self._admin = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False
        #: Use FIEMAP to skip extents the image still shares with the live file.
        self.use_fiemap = True
        #: Restore by FICLONERANGE from the image (else, and where refused, pwrite).
        self.clone_back = True

    def __repr__(self) -> str:
        return f"ReflinkStore({self.directory!r}, size={self.size}, rps={self.rp_ids()})"

    # -- open / close ------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str, live_fd: int, size: int, chunk: int = DEFAULT_CHUNK) -> ReflinkStore:
        """Open (creating the directory if needed) the images in `directory`.

        `chunk` (a power of two >= 4 KiB, <= 64 MiB) is the granularity of
        changed_since and restore; it applies when the directory holds no image,
        otherwise the images' own one is used. Removes leftovers of an
        interrupted create.
        """
        if chunk < PAGE or chunk & (chunk - 1) or chunk > SCAN:
            raise ValueError(f"chunk must be a power of two in [{PAGE}, {SCAN}], got {chunk}")
        if size <= 0:
            raise ValueError(f"volume size must be positive, got {size}")
        directory = os.path.abspath(directory)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        images: list[_Image] = []
        chunks: set[int] = set()
        try:
            for name in sorted(os.listdir(directory)):
                path = os.path.join(directory, name)
                if name.endswith(TMP):
                    os.unlink(path)           # a create that never returned: no RP
                    continue
                if not name.endswith(SUFFIX):
                    continue
                rp_id = name[:-len(SUFFIX)]
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    try:
                        raw = os.getxattr(fd, XATTR)
                        version, seq, vsize, vchunk = (int(x) for x in raw.split())
                    except (OSError, ValueError):
                        raise CorruptLog(f"{path}: no valid {XATTR} xattr (not a tandem RP image)") from None
                    if version != FORMAT:
                        raise CorruptLog(f"{path}: unsupported image format {version}")
                    if vsize != size:
                        raise RPStoreError(f"{path}: image is for a volume of {vsize} bytes, "
                                           f"the volume has {size}")
                    if os.fstat(fd).st_size < size:
                        raise CorruptLog(f"{path}: shorter than the volume ({size} bytes)")
                    if vchunk < PAGE or vchunk & (vchunk - 1) or vchunk > SCAN:
                        raise CorruptLog(f"{path}: bad chunk size {vchunk}")
                except BaseException:
                    os.close(fd)
                    raise
                chunks.add(vchunk)
                images.append(_Image(path, fd, rp_id, seq))
            if len(chunks) > 1:
                raise CorruptLog(f"{directory}: images with different chunk sizes {sorted(chunks)}")
            seqs = [img.seq for img in images]
            if len(set(seqs)) != len(seqs):
                raise CorruptLog(f"{directory}: two images with the same creation seq")
        except BaseException:
            for img in images:
                with contextlib.suppress(OSError):
                    os.close(img.fd)
            raise
        store = cls(directory, live_fd, size, chunks.pop() if chunks else chunk, images)
        if images:
            with store._lock:
                store._start_usage_pass()     # bytes_used() then has figures soon
        return store

    def close(self) -> None:
        """Close the images (not the live fd, which belongs to the caller). Idempotent.
        Waits for a background usage pass to stop (it checks between files)."""
        with self._admin, self._lock:
            if self._closed:
                return
            self._closed = True
            for img in self._by_id.values():
                img.doomed = True
                if not img.users and img.fd >= 0:
                    os.close(img.fd)
                    img.fd = -1
            self._by_id = {}
            thread = self._usage_thread
        if thread is not None:
            thread.join()                 # it must not touch the live fd after we return

    # -- queries -----------------------------------------------------------------------

    def rp_ids(self) -> list[str]:
        """The RPs, oldest first."""
        with self._lock:
            return list(self._by_id)

    def bytes_used(self, rp_id: str) -> int:
        """Bytes of blocks that the live file no longer maps and no newer RP maps, but
        this one does: what the RP costs, charged as the delta chain charges it (to
        the newest RP that holds a block), so the sum over the RPs is their total.

        Never waits for the measurement (one FIEMAP of the live file and of every
        image: seconds on a volume of 100k extents, and list() runs on the daemon's
        event loop): returns the last pass's figure, 0 for an RP the pass did not see
        (a new RP shares everything), and starts a new pass in a background thread
        when that one is older than USAGE_TTL or RPs were created, deleted or
        restored since. usage() measures now.
        """
        with self._lock:
            self._find(rp_id)
            cached = self._usage
            if (cached is None or cached[1] != self._usage_gen
                    or time.monotonic() - cached[0] > USAGE_TTL):
                self._start_usage_pass()
        return 0 if cached is None else cached[2].get(rp_id, 0)

    def usage(self) -> dict[str, int]:
        """bytes_used of every RP, measured now (blocking). Without FIEMAP: each image's
        allocated bytes, an upper bound (the blocks it shares counted as its own)."""
        with self._lock:
            self._check_open()
            gen = self._usage_gen
        try:
            result = self._usage_all()
        except OSError:
            result = {}
            for rp_id in self.rp_ids():
                with contextlib.suppress(UnknownRP):
                    img = self._acquire(rp_id)
                    try:
                        result[rp_id] = os.fstat(img.fd).st_blocks * 512
                    finally:
                        self._release(img)
        with self._lock:
            self._usage = (time.monotonic(), gen, result)
        return result

    def _start_usage_pass(self) -> None:
        """Caller holds _lock."""
        if self._usage_thread is not None or self._closed:
            return

        def run():
            try:
                self.usage()
            except Exception as e:          # a figure for `rp list`: never worth a crash
                if not self._closed:        # closed meanwhile: nobody wants the figure
                    log.warning("%s: measuring recovery point space failed: %s", self.directory, e)
            finally:
                with self._lock:
                    self._usage_thread = None

        self._usage_thread = threading.Thread(target=run, name="rp-usage", daemon=True)
        self._usage_thread.start()

    def _usage_all(self) -> dict[str, int]:
        """bytes_used of every RP: newest first, each pays for its blocks that neither
        the live file nor a newer image maps."""
        def physical(extents):
            return _union([(p, p + n) for _lg, p, n, flags in extents
                           if flags & FIEMAP_EXTENT_SHARED and not flags & FIEMAP_UNTRUSTED])

        with self._lock:
            if self._closed:
                raise _Closed
            images = list(self._by_id.values())
            for img in images:
                img.users += 1
        try:
            covered = physical(fiemap(self.live_fd, 0, self.size))
            usage: dict[str, int] = {}
            for img in reversed(images):
                if self._closed:
                    raise _Closed
                extents = fiemap(img.fd, 0, self.size)
                own = sum(min(self.size, lg + n) - lg for lg, _p, n, flags in extents
                          if not flags & FIEMAP_EXTENT_SHARED and lg < self.size)
                shared = physical(extents)
                usage[img.rp_id] = own + _length(_subtract(shared, covered))
                covered = _union(covered + shared)
            return usage
        finally:
            for img in images:
                self._release(img)

    def changed_since(self, rp_id: str) -> list[tuple[int, int]]:
        """(offset, length) ranges (whole chunks) where the RP differs from the live volume.

        Not a lookup as in the delta store: a comparison. Extents that FIEMAP shows
        shared at the same offset are equal for free; the rest is read from both
        files (at worst, both files in full).
        """
        img = self._acquire(rp_id)
        try:
            return _merge(self._diff(img, write_back=False), self.chunk, self.size)
        finally:
            self._release(img)

    # -- the write path's hooks: the filesystem copies on write ------------------------------

    def needs_preserve(self, offset: int, length: int) -> bool:
        return self._closed and length > 0          # closed: preserve() says so

    def preserve(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if length > 0:
            self._check_open()

    # -- recovery points -----------------------------------------------------------------

    def create(self, rp_id: str) -> None:
        """Clone the live file into `<rp_id>.img`, durable on return.

        The caller must have drained and paused writes to the volume (FICLONE
        writes the live file's dirty pages back first and clones what is then on
        disk: a write landing meanwhile would be in or out at random).
        """
        check_rp_id(rp_id)
        with self._admin:
            self._check_open()
            if rp_id in self._by_id:
                raise RPStoreError(f"recovery point {rp_id!r} already exists")
            path = os.path.join(self.directory, rp_id + SUFFIX)
            tmp = os.path.join(self.directory, rp_id + TMP)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                try:
                    clone_file(fd, self.live_fd)
                    os.setxattr(fd, XATTR, _pack_xattr(self._next_seq, self.size, self.chunk))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, path)          # never a half-made image under the real name
                fsync_dir(self.directory)
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            with self._lock:
                self._by_id[rp_id] = _Image(path, fd, rp_id, self._next_seq)
                self._usage_gen += 1
            self._next_seq += 1

    def delete(self, rp_id: str) -> None:
        """Delete an RP: unlink its image (the other images are independent of it)."""
        with self._admin:
            self._check_open()
            with self._lock:                  # checked and hidden at once: no new pin or read
                img = self._find(rp_id)
                if self._pins.get(rp_id):
                    raise RPInUse(f"recovery point {rp_id!r} is in use "
                                  f"({self._pins[rp_id]} exports/clones)")
                del self._by_id[rp_id]
                self._usage_gen += 1
            try:
                os.unlink(img.path)
            except FileNotFoundError:
                pass
            except BaseException:
                with self._lock:
                    self._by_id[rp_id] = img
                    self._by_id = dict(sorted(self._by_id.items(), key=lambda kv: kv[1].seq))
                raise
            with self._lock:
                img.doomed = True
                if not img.users:
                    os.close(img.fd)
                    img.fd = -1
            fsync_dir(self.directory)

    def restore(self, rp_id: str) -> list[tuple[int, int]]:
        """Make the live volume equal to the RP. Returns the ranges that differed (whole chunks).

        Only differing chunks are written (shared back from the image by
        FICLONERANGE where the filesystem allows, else pwrite), then the live file
        is fsynced. The image and every other RP stay as they are. A crash part
        way leaves every RP valid and the restore can simply be run again.

        Blocking. The caller must keep other writes to the volume out for the
        duration and mark the returned ranges out of sync with the peer (mark
        changed_since(rp_id) BEFORE calling, to survive a crash half way).
        """
        with self._admin:
            self._check_open()
            img = self._acquire(rp_id)
            try:
                chunks = self._diff(img, write_back=True)
                os.fsync(self.live_fd)
            finally:
                self._release(img)
                with self._lock:
                    self._usage_gen += 1
            return _merge(chunks, self.chunk, self.size)

    def read(self, rp_id: str, offset: int, length: int) -> bytes:
        """The RP's image of a range."""
        self._check_range(offset, length)
        if length <= 0:
            return b""
        img = self._acquire(rp_id)
        try:
            return _pread_padded(img.fd, length, offset)
        finally:
            self._release(img)

    def verify(self) -> int:
        """Read every image in full (a scrub: surfaces I/O errors). Returns chunks read.
        Images carry no checksums; the filesystem's own (XFS metadata, btrfs data) apply."""
        checked = 0
        with self._admin:
            self._check_open()
            for rp_id in self.rp_ids():
                img = self._acquire(rp_id)
                try:
                    for lo in range(0, self.size, STREAM):
                        n = min(STREAM, self.size - lo)
                        _pread_padded(img.fd, n, lo)
                        checked += -(-n // self.chunk)
                finally:
                    self._release(img)
        return checked

    # -- internals ---------------------------------------------------------------------------

    def _acquire(self, rp_id: str) -> _Image:
        with self._lock:
            img = self._find(rp_id)
            img.users += 1
            return img

    def _release(self, img: _Image) -> None:
        with self._lock:
            img.users -= 1
            if img.doomed and not img.users and img.fd >= 0:
                os.close(img.fd)
                img.fd = -1

    def _candidates(self, img: _Image, lo: int, hi: int) -> list[int]:
        """Chunks of [lo, hi) that may differ: those not wholly inside a range FIEMAP
        shows both files mapping to the same blocks (or both to holes)."""
        first, last = lo >> self._shift, ((hi - 1) >> self._shift)
        if not self.use_fiemap:
            return list(range(first, last + 1))
        try:
            # The live file synced first: its map then describes what a read returns.
            same = _same_ranges(fiemap(img.fd, lo, hi - lo), fiemap(self.live_fd, lo, hi - lo, sync=True),
                                lo, hi)
        except OSError:
            self.use_fiemap = False           # not on this filesystem: compare everything
            return list(range(first, last + 1))
        out, k = [], 0
        for c in range(first, last + 1):
            c_lo = c << self._shift
            c_hi = c_lo + self._chunk_len(c)
            while k < len(same) and same[k][1] <= c_lo:
                k += 1
            if not (k < len(same) and same[k][0] <= c_lo and c_hi <= same[k][1]):
                out.append(c)
        return out

    def _diff(self, img: _Image, *, write_back: bool) -> list[int]:
        """Sorted chunks where the image and the live file differ; with write_back, each
        is made equal in the live file as it is found."""
        changed: list[int] = []
        for base in range(0, self.size, SCAN):
            hi = min(self.size, base + SCAN)
            for run in _runs(self._candidates(img, base, hi), STREAM // self.chunk):
                lo = run[0] << self._shift
                end = (run[-1] << self._shift) + self._chunk_len(run[-1])
                a = _pread_padded(img.fd, end - lo, lo)
                b = _pread_padded(self.live_fd, end - lo, lo)
                if a == b:
                    continue
                diff = []
                for c in run:
                    at = (c << self._shift) - lo
                    n = self._chunk_len(c)
                    if a[at:at + n] != b[at:at + n]:
                        diff.append(c)
                changed.extend(diff)
                if write_back:
                    for part in _runs(diff, len(diff)):
                        p_lo = part[0] << self._shift
                        p_hi = (part[-1] << self._shift) + self._chunk_len(part[-1])
                        self._write_back(img, a, lo, p_lo, p_hi)
        return changed

    def _write_back(self, img: _Image, data: bytes, data_at: int, lo: int, hi: int) -> None:
        if self.clone_back:
            try:
                clone_range(img.fd, lo, hi - lo, self.live_fd, lo)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOTTY):
                    raise
        _pwrite_full(self.live_fd, memoryview(data)[lo - data_at:hi - data_at], lo, False)
