"""The quick-sync bitmap against a plain set-of-blocks model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.engine.bitmap import PAGE, Bitmap

BLOCK = 4096


def model_blocks(bm: Bitmap) -> set[int]:
    return {b for b in range(bm.bits) if bm.test(b)}


def test_geometry_rounds_up_to_whole_pages():
    bm = Bitmap(10 * BLOCK + 1)
    assert bm.bits == 11
    assert bm.nbytes == PAGE
    assert Bitmap(PAGE * 8 * BLOCK + BLOCK).nbytes == 2 * PAGE


def test_set_rounds_out_and_clear_rounds_in():
    bm = Bitmap(16 * BLOCK)
    assert bm.set_range(BLOCK + 1, 10) == 1          # touches block 1 only
    assert model_blocks(bm) == {1}
    bm.set_range(2 * BLOCK - 1, 2)                   # straddles blocks 1 and 2
    assert model_blocks(bm) == {1, 2}
    assert bm.clear_range(BLOCK + 1, 2 * BLOCK) == 1  # only block 2 is wholly inside
    assert model_blocks(bm) == {1}
    assert bm.clear_range(BLOCK, BLOCK) == 1
    assert bm.count == 0


def test_partial_last_block_counts_only_real_bytes():
    bm = Bitmap(3 * BLOCK + 512)
    bm.set_all()
    assert bm.count == 4
    assert bm.out_of_sync_bytes == 3 * BLOCK + 512
    assert bm.clear_range(3 * BLOCK, 512) == 1       # the tail block is wholly covered to the end
    assert bm.out_of_sync_bytes == 3 * BLOCK


def test_runs_and_ranges_are_in_disk_order():
    bm = Bitmap(100 * BLOCK)
    for b in (3, 4, 5, 50, 99):
        bm.set_range(b * BLOCK, BLOCK)
    assert list(bm.runs()) == [(3, 3), (50, 1), (99, 1)]
    assert list(bm.ranges())[0] == (3 * BLOCK, 3 * BLOCK)


def test_reload_from_bytes_ignores_bits_past_the_end():
    bm = Bitmap(10 * BLOCK)
    raw = bytearray(bm.nbytes)
    raw[0] = 0xFF
    raw[1] = 0xFF            # bits 8..15: only 8 and 9 exist
    raw[100] = 0xFF          # far past the end
    loaded = Bitmap(10 * BLOCK, data=bytes(raw))
    assert loaded.count == 10


def test_merge_is_a_union_and_marks_pages_dirty():
    a, b = Bitmap(64 * BLOCK), Bitmap(64 * BLOCK)
    a.set_range(0, BLOCK)
    b.set_range(10 * BLOCK, BLOCK)
    a.mark_clean(a.dirty_pages())
    assert a.merge(b) == 1
    assert model_blocks(a) == {0, 10}
    assert a.dirty_pages() == [0]
    with pytest.raises(ValueError):
        a.merge(Bitmap(65 * BLOCK))


def test_dirty_pages_track_changes_only():
    bm = Bitmap(PAGE * 8 * BLOCK * 3)    # three bitmap pages
    bm.set_range(PAGE * 8 * BLOCK * 2 + 5, 1)
    assert bm.dirty_pages() == [2]
    assert bm.pages_for(0, PAGE * 8 * BLOCK + 1) == {0, 1}


ops = st.lists(st.tuples(st.booleans(), st.integers(0, 40 * BLOCK), st.integers(0, 12 * BLOCK)),
               max_size=40)


@settings(max_examples=300, deadline=None)
@given(size_blocks=st.integers(1, 40), ops=ops, block=st.sampled_from([4096, 8192, 65536]))
def test_matches_a_set_model(size_blocks, ops, block):
    size = size_blocks * 4096
    bm = Bitmap(size, block)
    model: set[int] = set()
    for is_set, offset, length in ops:
        offset %= size
        if length <= 0:
            continue
        end = min(offset + length, size)
        if is_set:
            model |= set(range(offset // block, (end - 1) // block + 1))
            bm.set_range(offset, end - offset)
        else:
            first = -(-offset // block)
            last = bm.bits - 1 if end >= size else end // block - 1
            model -= set(range(first, last + 1))
            bm.clear_range(offset, end - offset)
        assert bm.count == len(model)
    assert model_blocks(bm) == model
    assert Bitmap(size, block, bm.to_bytes()).count == len(model)
