"""The quick-sync bitmap: one bit per block, set = may differ from the peer.

Held whole in memory (32 MiB per TiB at 4 KiB per bit) and written to the
metadata file page by page: callers ask which 4 KiB pages changed and
persist those (see activity_log.py for *when* that must happen).
"""

from __future__ import annotations

from collections.abc import Iterator

PAGE = 4096            # bytes of bitmap per on-disk page
_PAGE_BITS = PAGE * 8


class Bitmap:
    def __init__(self, volume_size: int, block_size: int = 4096, data: bytes | None = None):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"bitmap block size must be a power of two, got {block_size}")
        self.volume_size = volume_size
        self.block_size = block_size
        self._shift = block_size.bit_length() - 1
        self.bits = -(-volume_size // block_size)
        self.nbytes = -(-self.bits // _PAGE_BITS) * PAGE     # whole pages on disk
        if data is None:
            self._map = bytearray(self.nbytes)
        else:
            if len(data) != self.nbytes:
                raise ValueError(f"bitmap data is {len(data)} bytes, expected {self.nbytes}")
            self._map = bytearray(data)
            self._clear_padding()
        self._count = _popcount(self._map)
        self._dirty: set[int] = set()

    # -- queries -------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of set bits (out-of-sync blocks)."""
        return self._count

    @property
    def out_of_sync_bytes(self) -> int:
        """Bytes covered by set bits (the last block may be partial)."""
        if not self._count:
            return 0
        tail = self.volume_size - (self.bits - 1) * self.block_size
        return self._count * self.block_size - (self.block_size - tail if self.test(self.bits - 1) else 0)

    def test(self, bit: int) -> bool:
        return bool(self._map[bit >> 3] & (1 << (bit & 7)))

    def runs(self, start_bit: int = 0) -> Iterator[tuple[int, int]]:
        """Yield (first_bit, n_bits) for each run of set bits, in disk order."""
        m, n, bit = self._map, self.bits, start_bit
        while bit < n:
            byte = bit >> 3
            if m[byte] == 0 and bit & 7 == 0:
                # Skip zero bytes fast.
                nz = _next_nonzero(m, byte)
                if nz is None:
                    return
                bit = nz << 3
                continue
            if not m[byte] & (1 << (bit & 7)):
                bit += 1
                continue
            first = bit
            while bit < n and m[bit >> 3] & (1 << (bit & 7)):
                bit += 1
            yield first, bit - first

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) in bytes for each run, clipped to the volume."""
        for first, n in self.runs():
            offset = first << self._shift
            yield offset, min(n << self._shift, self.volume_size - offset)

    # -- changes -------------------------------------------------------------

    def set_range(self, offset: int, length: int) -> int:
        """Mark [offset, offset+length) out of sync (rounded outwards). Returns new bits."""
        if length <= 0:
            return 0
        first = offset >> self._shift
        last = min((offset + length - 1) >> self._shift, self.bits - 1)
        if first == last:
            # One block (every small write of a Primary without its peer): no slicing.
            byte, mask = first >> 3, 1 << (first & 7)
            if self._map[byte] & mask:
                return 0
            self._map[byte] |= mask
            self._count += 1
            self._dirty.add(byte // PAGE)
            return 1
        return self._change(first, last, True)

    def clear_range(self, offset: int, length: int) -> int:
        """Mark in sync only blocks wholly inside the range (rounded inwards)."""
        if length <= 0:
            return 0
        first = -(-offset >> self._shift)                   # round up
        end = offset + length
        # A range reaching the end of the volume covers the partial last block.
        last = self.bits - 1 if end >= self.volume_size else (end >> self._shift) - 1
        if last < first:
            return 0
        return self._change(first, last, False)

    def set_all(self) -> None:
        self._change(0, self.bits - 1, True)

    def clear_all(self) -> None:
        self._change(0, self.bits - 1, False)

    def merge(self, other: Bitmap) -> int:
        """OR another bitmap of the same geometry into this one (resync handshake)."""
        if (other.bits, other.block_size) != (self.bits, self.block_size):
            raise ValueError("bitmaps of different geometry cannot be merged")
        before = self._count
        merged = int.from_bytes(self._map, "little") | int.from_bytes(other._map, "little")
        new = merged.to_bytes(self.nbytes, "little")
        for page in range(self.nbytes // PAGE):
            s = slice(page * PAGE, (page + 1) * PAGE)
            if new[s] != self._map[s]:
                self._dirty.add(page)
        self._map[:] = new
        self._count = _popcount(self._map)
        return self._count - before

    def _change(self, first: int, last: int, value: bool) -> int:
        b0, b1 = first >> 3, last >> 3
        region = self._map[b0:b1 + 1]
        before = _popcount(region)
        lo_mask = (0xFF << (first & 7)) & 0xFF
        hi_mask = 0xFF >> (7 - (last & 7))
        if b0 == b1:
            mask = lo_mask & hi_mask
            region[0] = (region[0] | mask) if value else (region[0] & ~mask & 0xFF)
        else:
            fill = 0xFF if value else 0x00
            region[0] = (region[0] | lo_mask) if value else (region[0] & ~lo_mask & 0xFF)
            region[-1] = (region[-1] | hi_mask) if value else (region[-1] & ~hi_mask & 0xFF)
            region[1:-1] = bytes([fill]) * (len(region) - 2)
        delta = _popcount(region) - before
        if delta:
            self._map[b0:b1 + 1] = region
            self._count += delta
            self._dirty.update(range(b0 // PAGE, b1 // PAGE + 1))
        return abs(delta)

    def _clear_padding(self) -> None:
        # Bits past the end of the volume are never set (a corrupt page could).
        used = -(-self.bits // 8)
        if self.bits & 7:
            self._map[used - 1] &= (1 << (self.bits & 7)) - 1
        self._map[used:] = bytes(self.nbytes - used)

    # -- persistence ---------------------------------------------------------

    def dirty_pages(self) -> list[int]:
        return sorted(self._dirty)

    def pages_for(self, offset: int, length: int) -> set[int]:
        """The bitmap pages that hold the bits for a byte range of the volume."""
        first = offset >> self._shift
        last = min((offset + max(length, 1) - 1) >> self._shift, self.bits - 1)
        return set(range(first // _PAGE_BITS, last // _PAGE_BITS + 1))

    def page(self, index: int) -> bytes:
        return bytes(self._map[index * PAGE:(index + 1) * PAGE])

    def mark_clean(self, pages) -> None:
        self._dirty.difference_update(pages)

    def to_bytes(self) -> bytes:
        return bytes(self._map)


def _popcount(buf) -> int:
    return int.from_bytes(buf, "little").bit_count()


def _next_nonzero(m: bytearray, start: int) -> int | None:
    # bytes.find on a translated view would allocate; scanning in chunks is
    # fast enough and avoids copying the whole map.
    n = len(m)
    step = 4096
    i = start
    while i < n:
        chunk = m[i:i + step]
        if any(chunk):
            for j, b in enumerate(chunk):
                if b:
                    return i + j
        i += step
    return None
