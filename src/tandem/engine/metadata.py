"""On-disk metadata of one volume: superblock, activity log and bitmap.

Metadata is *external*: one file per volume, beside the engine's state, so
the VM disk keeps its exact size and a raw image needs no conversion to be
protected. Layout (all integers little-endian, every region 4 KiB aligned):

    0             superblock slot A (4 KiB)
    4096          superblock slot B (4 KiB)
    8192          activity-log slot A (al_block bytes)
    8192+al_block activity-log slot B (al_block bytes)
    8192+2*al     bitmap (1 bit per bitmap block, whole 4 KiB pages)

Superblocks and AL transactions are double-buffered: a new one is written to
the slot holding the older copy and made durable with fdatasync; readers take
the valid copy (magic + CRC) with the highest sequence number. A crash while
writing therefore leaves the previous copy intact. See docs/engine.md.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import zlib
from dataclasses import dataclass, field, replace

from .bitmap import PAGE, Bitmap
from .durable import fsync_dir

MAGIC = b"TANDEMMD"
VERSION = 1
SB_SIZE = 4096
AL_MAGIC = 0x54414C31          # "TAL1"
AL_EXTENT_SHIFT = 22           # 4 MiB activity-log extents, as DRBD
HISTORY = 4

# Superblock flags.
CONSISTENT = 1 << 0        # the data is a consistent image (not mid-sync target)
WAS_UP_TO_DATE = 1 << 1    # the data was UpToDate when last written
PRIMARY = 1 << 2           # the volume was Primary when this was written
CRASHED_PRIMARY = 1 << 3   # found PRIMARY set at open without a clean shutdown
AL_CLEAN = 1 << 4          # clean shutdown: the activity log is empty
PEER_OUTDATED = 1 << 5     # the peer is known to hold outdated data
FULL_SYNC = 1 << 6         # every block must go to the peer (initial sync pending)

FLAG_NAMES = {
    CONSISTENT: "consistent", WAS_UP_TO_DATE: "was-up-to-date", PRIMARY: "primary",
    CRASHED_PRIMARY: "crashed-primary", AL_CLEAN: "al-clean", PEER_OUTDATED: "peer-outdated",
    FULL_SYNC: "full-sync",
}

# A just-created volume has this generation id, as DRBD's UUID_JUST_CREATED.
GI_JUST_CREATED = 4

_SB = struct.Struct(f"<8sIIQQIIIIQQQQ{HISTORY}Q")
_AL_HEAD = struct.Struct("<IIQII")     # magic, crc, transaction, n_extents, pad


class MetadataError(Exception):
    """The metadata file is missing, corrupt or does not fit the volume."""


@dataclass(frozen=True)
class Superblock:
    volume_size: int
    bitmap_block_size: int
    al_extents: int
    al_block: int
    flags: int = 0
    device_uuid: int = 0
    current_gi: int = GI_JUST_CREATED
    bitmap_gi: int = 0
    history: tuple[int, ...] = field(default=(0,) * HISTORY)
    seq: int = 0

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def flag_names(self) -> list[str]:
        return [name for bit, name in FLAG_NAMES.items() if self.flags & bit]

    def pack(self) -> bytes:
        body = _SB.pack(MAGIC, VERSION, 0, self.seq, self.volume_size, self.bitmap_block_size,
                        AL_EXTENT_SHIFT, self.al_extents, self.al_block, self.flags,
                        self.device_uuid, self.current_gi, self.bitmap_gi, *self.history)
        return body + struct.pack("<I", zlib.crc32(body)) + bytes(SB_SIZE - len(body) - 4)

    @classmethod
    def unpack(cls, raw: bytes) -> Superblock | None:
        """The superblock in a slot, or None if the slot is empty or corrupt."""
        body = raw[:_SB.size]
        if len(raw) < SB_SIZE or body[:8] != MAGIC:
            return None
        (crc,) = struct.unpack_from("<I", raw, _SB.size)
        if zlib.crc32(body) != crc:
            return None
        (_, version, _, seq, size, bm_block, shift, al_extents, al_block, flags, uuid,
         current, bitmap_gi, *history) = _SB.unpack(body)
        if version != VERSION or shift != AL_EXTENT_SHIFT:
            return None
        return cls(size, bm_block, al_extents, al_block, flags, uuid, current, bitmap_gi,
                   tuple(history), seq)


def al_block_size(al_extents: int) -> int:
    """Bytes of one AL transaction: the whole active set fits in one block."""
    return -(-(_AL_HEAD.size + 4 * al_extents) // PAGE) * PAGE


class MetadataFile:
    """Synchronous access to one volume's metadata file.

    Every write is followed by fdatasync: callers rely on "returned" meaning
    "durable". The engine runs these calls in a worker thread.
    """

    def __init__(self, path: str, fd: int, sb: Superblock, bitmap: Bitmap):
        self.path, self._fd, self.sb, self.bitmap = path, fd, sb, bitmap
        self._al_seq, self._al_slot_seq = 0, [0, 0]

    # -- layout ----------------------------------------------------------------

    @property
    def al_offset(self) -> int:
        return 2 * SB_SIZE

    @property
    def bitmap_offset(self) -> int:
        return self.al_offset + 2 * self.sb.al_block

    @staticmethod
    def file_size(volume_size: int, bitmap_block_size: int, al_extents: int) -> int:
        bm = Bitmap(0 if volume_size < 0 else volume_size, bitmap_block_size)
        return 2 * SB_SIZE + 2 * al_block_size(al_extents) + bm.nbytes

    # -- create / open -----------------------------------------------------------

    @classmethod
    def create(cls, path: str, volume_size: int, *, bitmap_block_size: int = 4096,
               al_extents: int = 1237) -> MetadataFile:
        """Create fresh metadata: just-created GI, Inconsistent, empty bitmap."""
        if volume_size <= 0 or volume_size % 4096:
            raise MetadataError(f"{path}: volume size must be a positive multiple of 4096")
        sb = Superblock(volume_size, bitmap_block_size, al_extents, al_block_size(al_extents),
                        flags=AL_CLEAN, device_uuid=secrets.randbits(64))
        size = cls.file_size(volume_size, bitmap_block_size, al_extents)
        tmp = f"{path}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, sb.pack(), 0)
            os.fsync(fd)
            os.rename(tmp, path)        # never leave a half-made file under the real name
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        md = cls(path, fd, sb, Bitmap(volume_size, bitmap_block_size))
        md.write_al([])
        return md

    @classmethod
    def open(cls, path: str, volume_size: int | None = None) -> MetadataFile:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MetadataError(f"{path}: no metadata (create it first)") from None
        try:
            slots = [Superblock.unpack(os.pread(fd, SB_SIZE, i * SB_SIZE)) for i in (0, 1)]
            valid = [s for s in slots if s is not None]
            if not valid:
                raise MetadataError(f"{path}: no valid superblock (not tandem metadata, or corrupt)")
            sb = max(valid, key=lambda s: s.seq)
            if volume_size is not None and volume_size != sb.volume_size:
                raise MetadataError(f"{path}: metadata is for a volume of {sb.volume_size} bytes, "
                                    f"the volume has {volume_size}")
            expected = cls.file_size(sb.volume_size, sb.bitmap_block_size, sb.al_extents)
            if os.fstat(fd).st_size < expected:
                raise MetadataError(f"{path}: truncated ({os.fstat(fd).st_size} < {expected} bytes)")
            bm_len = Bitmap(sb.volume_size, sb.bitmap_block_size).nbytes
            bm_off = 2 * SB_SIZE + 2 * sb.al_block
            bitmap = Bitmap(sb.volume_size, sb.bitmap_block_size, os.pread(fd, bm_len, bm_off))
        except BaseException:
            os.close(fd)
            raise
        md = cls(path, fd, sb, bitmap)
        md._load_al_seq()
        return md

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- superblock ----------------------------------------------------------------

    def write_superblock(self, **changes) -> Superblock:
        """Persist a new superblock (durable on return) and make it current."""
        sb = replace(self.sb, seq=self.sb.seq + 1, **changes)
        os.pwrite(self._fd, sb.pack(), (sb.seq % 2) * SB_SIZE)
        os.fdatasync(self._fd)
        self.sb = sb
        return sb

    def set_flags(self, set_: int = 0, clear: int = 0) -> Superblock:
        flags = (self.sb.flags | set_) & ~clear
        return self.sb if flags == self.sb.flags else self.write_superblock(flags=flags)

    # -- activity log ----------------------------------------------------------------

    def write_al(self, extents) -> None:
        """Persist the whole active extent set as one transaction (durable on return)."""
        extents = list(extents)
        if len(extents) > self.sb.al_extents:
            raise ValueError(f"{len(extents)} active extents > al_extents {self.sb.al_extents}")
        self._al_seq += 1
        payload = struct.pack(f"<{len(extents)}I", *extents)
        head = _AL_HEAD.pack(AL_MAGIC, 0, self._al_seq, len(extents), 0)
        crc = zlib.crc32(head + payload)
        block = _AL_HEAD.pack(AL_MAGIC, crc, self._al_seq, len(extents), 0) + payload
        slot = self._al_seq % 2
        os.pwrite(self._fd, block + bytes(self.sb.al_block - len(block)),
                  self.al_offset + slot * self.sb.al_block)
        os.fdatasync(self._fd)
        self._al_slot_seq[slot] = self._al_seq

    def read_al(self) -> list[int]:
        """The active extents of the newest valid AL transaction."""
        best = (0, [])
        for slot in (0, 1):
            parsed = self._read_al_slot(slot)
            if parsed and parsed[0] > best[0]:
                best = parsed
        return best[1]

    def _read_al_slot(self, slot: int):
        raw = os.pread(self._fd, self.sb.al_block, self.al_offset + slot * self.sb.al_block)
        if len(raw) < _AL_HEAD.size:
            return None
        magic, crc, seq, n, _ = _AL_HEAD.unpack_from(raw)
        if magic != AL_MAGIC or _AL_HEAD.size + 4 * n > len(raw):
            return None
        # The CRC covers the header as stored (with the CRC field zeroed) and the payload.
        checked = raw[:4] + bytes(4) + raw[8:_AL_HEAD.size + 4 * n]
        payload = raw[_AL_HEAD.size:_AL_HEAD.size + 4 * n]
        if zlib.crc32(checked) != crc:
            return None
        return seq, list(struct.unpack(f"<{n}I", payload))

    def _load_al_seq(self) -> None:
        for slot in (0, 1):
            parsed = self._read_al_slot(slot)
            self._al_slot_seq[slot] = parsed[0] if parsed else 0
        self._al_seq = max(self._al_slot_seq)

    # -- bitmap ----------------------------------------------------------------------

    def write_bitmap_pages(self, pages=None) -> int:
        """Write dirty (or the given) bitmap pages; durable on return. Returns pages written."""
        pages = sorted(self.bitmap.dirty_pages() if pages is None else pages)
        for page in pages:
            os.pwrite(self._fd, self.bitmap.page(page), self.bitmap_offset + page * PAGE)
        if pages:
            os.fdatasync(self._fd)
            self.bitmap.mark_clean(pages)
        return len(pages)

    # -- recovery --------------------------------------------------------------------

    def apply_al(self) -> int:
        """After an unclean stop: every extent that was hot may differ from the peer.

        Sets the bits of all extents of the last AL transaction, persists the
        bitmap, then empties the AL. Returns the number of bits newly set. Like
        DRBD's `drbdmeta apply-al`, this bounds the resync after a crash to
        al_extents x 4 MiB instead of a full sync.
        """
        newly = 0
        size = 1 << AL_EXTENT_SHIFT
        for extent in self.read_al():
            offset = extent * size
            if offset < self.sb.volume_size:
                newly += self.bitmap.set_range(offset, min(size, self.sb.volume_size - offset))
        self.write_bitmap_pages()
        self.write_al([])
        return newly


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
