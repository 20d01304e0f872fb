"""Metadata files: layout, double-buffered superblock and AL, crash recovery."""

from __future__ import annotations

import os

import pytest

from tandem.engine import metadata as md_mod
from tandem.engine.metadata import (
    AL_CLEAN,
    CONSISTENT,
    GI_JUST_CREATED,
    SB_SIZE,
    MetadataError,
    MetadataFile,
)

MiB = 1 << 20


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "vol0.md")


def test_create_gives_a_just_created_inconsistent_volume(path):
    md = MetadataFile.create(path, 64 * MiB)
    try:
        assert md.sb.current_gi == GI_JUST_CREATED
        assert not md.sb.has(CONSISTENT) and md.sb.has(AL_CLEAN)
        assert md.bitmap.count == 0 and md.read_al() == []
        assert os.path.getsize(path) == MetadataFile.file_size(64 * MiB, 4096, 1237)
        assert not os.path.exists(path + ".new")
    finally:
        md.close()


def test_size_is_small_32k_per_gib_plus_fixed(path):
    # 1 bit per 4 KiB: 32 KiB of bitmap per GiB.
    one_gib = MetadataFile.file_size(1 << 30, 4096, 1237)
    two_gib = MetadataFile.file_size(2 << 30, 4096, 1237)
    assert two_gib - one_gib == 32 * 1024


def test_superblock_survives_a_torn_write_of_the_newer_slot(path):
    md = MetadataFile.create(path, 8 * MiB)
    md.write_superblock(current_gi=111, flags=CONSISTENT)
    md.write_superblock(current_gi=222, flags=CONSISTENT)
    newest_slot = md.sb.seq % 2
    md.close()
    with open(path, "r+b") as f:           # tear the newest copy
        f.seek(newest_slot * SB_SIZE + 100)
        f.write(b"\xff" * 16)
    md = MetadataFile.open(path)
    try:
        assert md.sb.current_gi == 111     # the previous copy wins
    finally:
        md.close()


def test_open_refuses_garbage_wrong_size_and_truncation(path, tmp_path):
    with open(path, "wb") as f:
        f.write(os.urandom(3 * SB_SIZE))
    with pytest.raises(MetadataError, match="no valid superblock"):
        MetadataFile.open(path)
    os.unlink(path)
    MetadataFile.create(path, 8 * MiB).close()
    with pytest.raises(MetadataError, match="volume of 8388608 bytes"):
        MetadataFile.open(path, volume_size=16 * MiB)
    os.truncate(path, 3 * SB_SIZE)
    with pytest.raises(MetadataError, match="truncated"):
        MetadataFile.open(path)
    with pytest.raises(MetadataError, match="no metadata"):
        MetadataFile.open(str(tmp_path / "missing.md"))


def test_bitmap_pages_persist(path):
    md = MetadataFile.create(path, 256 * MiB)
    md.bitmap.set_range(100 * MiB, 3 * 4096)
    assert md.write_bitmap_pages() == 1
    md.close()
    md = MetadataFile.open(path)
    try:
        assert md.bitmap.count == 3
    finally:
        md.close()


def test_al_transactions_alternate_and_the_newest_valid_wins(path):
    md = MetadataFile.create(path, 64 * MiB)
    md.write_al([1, 2])
    md.write_al([2, 3, 4])
    assert md.read_al() == [2, 3, 4]
    slot = md._al_seq % 2
    md.close()
    with open(path, "r+b") as f:            # tear the newest transaction
        f.seek(2 * SB_SIZE + slot * md.sb.al_block + 20)
        f.write(b"\x00\x01\x02")
    md = MetadataFile.open(path)
    try:
        assert md.read_al() == [1, 2]
        md.write_al([7])                    # continues after the newest seen number
        assert md.read_al() == [7]
    finally:
        md.close()


def test_apply_al_marks_hot_extents_and_empties_the_log(path):
    md = MetadataFile.create(path, 64 * MiB)
    md.write_al([0, 3])
    md.close()
    md = MetadataFile.open(path)             # as after a crash
    try:
        newly = md.apply_al()
        assert newly == 2 * (4 * MiB // 4096)
        assert md.read_al() == []
        assert md.bitmap.test(0) and md.bitmap.test(3 * 1024) and not md.bitmap.test(1024)
    finally:
        md.close()
    md = MetadataFile.open(path)
    try:
        assert md.bitmap.count == newly      # the bits were made durable
    finally:
        md.close()


def test_apply_al_ignores_extents_past_the_end(path):
    md = MetadataFile.create(path, 6 * MiB)  # the second extent is partial
    md.write_al([1, 5000])
    assert md.apply_al() == (2 * MiB) // 4096
    md.close()


def test_create_rejects_bad_sizes(path):
    with pytest.raises(MetadataError, match="multiple of 4096"):
        MetadataFile.create(path, 1000)


def test_al_block_holds_the_whole_active_set():
    assert md_mod.al_block_size(1237) == 8192
    assert md_mod.al_block_size(67) == 4096
