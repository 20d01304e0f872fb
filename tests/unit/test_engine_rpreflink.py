"""Reflink recovery points (rpreflink.py) on a real XFS with reflink=1 (the reflink_fs fixture,
tests/unit/conftest.py), and the choice between reflink and delta storage in recovery.py."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule, run_state_machine_as_test
from test_engine_rpstore import RPChain  # pytest puts tests/unit on sys.path

from tandem.engine import recovery, rpreflink
from tandem.engine.recovery import RecoveryPointError, RecoveryPoints
from tandem.engine.rpreflink import (
    FIEMAP_EXTENT_SHARED,
    SUFFIX,
    TMP,
    XATTR,
    ReflinkStore,
    _length,
    _same_ranges,
    _subtract,
    _union,
    extent_count,
    fiemap,
    probe,
)
from tandem.engine.rpstore import Clone, CorruptLog, RPImage, RPInUse, RPStoreError, UnknownRP

CHUNK = 64 << 10
BLOCK = 4096


def pattern(seed, n: int) -> bytes:
    return hashlib.shake_128(str(seed).encode()).digest(n)


def make_live(directory: str, size: int, name: str = "live.img") -> int:
    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return fd


def scatter(fd: int, size: int, n: int, seed: int = 1) -> None:
    """n 4 KiB blocks at scattered offsets: a fragmented file, then on disk."""
    for k in range(n):
        b = (k * 7919 + seed * 104729) % (size // BLOCK)
        os.pwrite(fd, pattern((seed, k), BLOCK), b * BLOCK)
    os.fsync(fd)


def chunks_of(writes) -> set[int]:
    return {c for off, n in writes for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}


def as_ranges(chunks: set[int], size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in sorted(chunks):
        lo, hi = c * CHUNK, min(size, (c + 1) * CHUNK)
        if out and out[-1][0] + out[-1][1] == lo:
            out[-1] = (out[-1][0], hi - out[-1][0])
        else:
            out.append((lo, hi - lo))
    return out


@pytest.fixture
def live(reflink_dir):
    """(fd, directory, size): a 32 MiB fragmented live file on the XFS mount."""
    size = 32 << 20
    fd = make_live(reflink_dir, size)
    scatter(fd, size, 2000)
    yield fd, reflink_dir, size
    os.close(fd)


@pytest.fixture
def store(live):
    fd, directory, size = live
    s = ReflinkStore.open(os.path.join(directory, "live.img.rp"), fd, size, chunk=CHUNK)
    yield s
    s.close()


# -- create, read, write after --------------------------------------------------------------


def test_the_probe_says_yes_on_xfs_and_why_not_on_ext4(live, tmp_path):
    fd, directory, _ = live
    assert probe(os.path.join(directory, "live.img.rp"), fd) is None
    assert os.listdir(os.path.join(directory, "live.img.rp")) == []       # nothing left behind
    ext4_fd = make_live(str(tmp_path), 1 << 20)
    try:
        why = probe(str(tmp_path / "live.img.rp"), ext4_fd)
        assert why is not None and why.startswith(("EOPNOTSUPP", "ENOTSUP", "EXDEV", "EINVAL", "ENOTTY"))
        assert not (tmp_path / "live.img.rp").exists()                      # the dir it made is gone
        # Across filesystems: the directory on ext4, the volume on XFS.
        why = probe(str(tmp_path / "other.rp"), fd)
        assert why is not None and why.startswith("EXDEV")
    finally:
        os.close(ext4_fd)


def test_create_is_fast_shares_every_extent_and_leaves_the_volume_alone(live, store):
    fd, directory, size = live
    before = os.pread(fd, size, 0)
    live_map = fiemap(fd, 0, size, sync=True)
    assert len(live_map) > 1000                                              # fragmented
    t0 = time.monotonic()
    store.create("a")
    took = time.monotonic() - t0
    assert took < 2.0, f"create took {took:.2f}s"
    img = Path(directory, "live.img.rp", "a" + SUFFIX)
    assert img.stat().st_size == size
    assert img.read_bytes() == before
    assert os.pread(fd, size, 0) == before
    shared = [(lg, p, n, f | FIEMAP_EXTENT_SHARED) for lg, p, n, f in live_map]
    assert fiemap(fd, 0, size, sync=True) == shared                       # same blocks, now shared
    img_fd = os.open(img, os.O_RDONLY)
    try:
        assert all(f & FIEMAP_EXTENT_SHARED for *_, f in fiemap(img_fd, 0, size))
    finally:
        os.close(img_fd)
    assert store.usage() == {"a": 0}                                         # it shares everything
    assert store.read("a", 0, size) == before
    assert store.changed_since("a") == []
    assert not store.needs_preserve(0, size)
    store.preserve(0, size)                                                  # nothing to do


def test_writes_after_create_do_not_change_the_rp(live, store):
    fd, _, size = live
    before = os.pread(fd, size, 0)
    allocated = {b for lg, _p, n, _f in fiemap(fd, 0, size, sync=True)
                 for b in range(lg // BLOCK, (lg + n) // BLOCK)}
    store.create("a")
    writes = [(0, 100), (CHUNK - 10, 20), (5 * CHUNK, 3 * CHUNK), (size - BLOCK, BLOCK)]
    overwritten = {b for off, n in writes for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)}
    for k, (off, n) in enumerate(writes):
        os.pwrite(fd, b"\xee" * n, off)
        assert store.read("a", off, n) == before[off:off + n], k            # before any writeback
    os.fsync(fd)
    assert store.read("a", 0, size) == before
    # The RP alone now keeps the old blocks that were overwritten (holes cost nothing).
    assert store.usage()["a"] == len(overwritten & allocated) * BLOCK > 0
    store.create("b")
    os.pwrite(fd, b"\xdd" * BLOCK, 20 * CHUNK)
    os.fsync(fd)
    assert store.read("b", 20 * CHUNK, BLOCK) == before[20 * CHUNK:20 * CHUNK + BLOCK]
    assert store.read("a", 0, size) == before


def test_bytes_used_charges_each_kept_block_to_the_newest_rp_that_has_it(live, store):
    fd, _, size = live
    allocated = sorted({b for lg, _p, n, _f in fiemap(fd, 0, size, sync=True)
                        for b in range(lg // BLOCK, (lg + n) // BLOCK)})
    x, y = allocated[:40], allocated[100:110]

    def overwrite(blocks, seed):
        for b in blocks:
            os.pwrite(fd, pattern((seed, b), BLOCK), b * BLOCK)
        os.fsync(fd)

    store.create("a")
    store.create("b")
    overwrite(x, "x")                    # a and b both keep x's old blocks: b pays, as in the delta chain
    store.create("c")
    overwrite(y, "y")
    store.create("d")
    assert store.usage() == {"a": 0, "b": 40 * BLOCK, "c": 10 * BLOCK, "d": 0}
    store.delete("b")                    # now a is the newest that keeps x
    assert store.usage() == {"a": 40 * BLOCK, "c": 10 * BLOCK, "d": 0}
    overwrite(x[:5], "x2")               # d's (new) copies of them: d pays for those
    assert store.usage()["d"] == 5 * BLOCK


def test_bytes_used_never_waits_and_catches_up_in_the_background(live, store):
    fd, _, size = live
    store.create("a")
    first = fiemap(fd, 0, size, sync=True)[0]
    os.pwrite(fd, b"\x99" * BLOCK, first[0])             # a block the RP shares
    os.fsync(fd)
    store.bytes_used("a")                                  # starts a pass (a create happened)
    deadline = time.monotonic() + 10
    while store.bytes_used("a") != BLOCK:
        assert time.monotonic() < deadline, "the background pass never delivered"
        time.sleep(0.01)
    store.close()                                          # joins a pass still running
    with pytest.raises(RPStoreError, match="closed"):
        store.usage()


@pytest.mark.parametrize("use_fiemap,clone_back", [(True, True), (False, False), (True, False)])
def test_restore_returns_exactly_the_changed_ranges(live, store, use_fiemap, clone_back):
    fd, _, size = live
    store.use_fiemap, store.clone_back = use_fiemap, clone_back
    before = os.pread(fd, size, 0)
    store.create("a")
    writes = [(0, 1), (3 * CHUNK + 7, CHUNK), (100 * CHUNK, 20 * CHUNK), (size - 1, 1)]
    for off, n in writes:
        os.pwrite(fd, bytes(b ^ 0xFF for b in before[off:off + n]), off)   # every byte differs
    os.pwrite(fd, before[200 * CHUNK:201 * CHUNK], 200 * CHUNK)              # same bytes: no change
    expected = as_ranges(chunks_of(writes), size)
    assert store.changed_since("a") == expected
    after = os.pread(fd, size, 0)
    assert store.restore("a") == expected
    assert os.pread(fd, size, 0) == before
    assert store.changed_since("a") == [] and store.restore("a") == []
    if clone_back:
        # The live file shares the RP's blocks again (but for the chunk rewritten with
        # the same bytes: that one the filesystem copied and nothing restores).
        assert store.usage()["a"] <= CHUNK
    store.create("b")
    for off, n in writes:
        os.pwrite(fd, after[off:off + n], off)
    assert store.restore("b") == expected                 # and back
    assert os.pread(fd, size, 0) == before


def test_changed_since_with_fiemap_agrees_with_a_full_compare(live, store):
    fd, _, size = live
    store.create("a")
    scatter(fd, size, 300, seed=2)                        # on disk, CoW done
    for k in range(50):                                   # only in the page cache
        os.pwrite(fd, pattern(("dirty", k), 512), (k * 104723) % (size - 512))
    fast = store.changed_since("a")
    store.use_fiemap = False
    assert fast == store.changed_since("a") and fast


def test_delete_unlinks_and_refuses_a_pinned_rp(live, store):
    fd, directory, size = live
    store.create("a")
    store.create("b")
    store.pin("a")
    with pytest.raises(RPInUse):
        store.delete("a")
    store.unpin("a")
    store.delete("a")
    assert store.rp_ids() == ["b"] and "a" not in store
    assert sorted(os.listdir(os.path.join(directory, "live.img.rp"))) == ["b" + SUFFIX]
    with pytest.raises(UnknownRP):
        store.read("a", 0, 1)
    with pytest.raises(UnknownRP):
        store.delete("a")
    store.delete("b")
    assert os.listdir(os.path.join(directory, "live.img.rp")) == []


def test_reopen_keeps_order_content_and_cleans_a_torn_create(live):
    fd, directory, size = live
    rps = os.path.join(directory, "live.img.rp")
    s = ReflinkStore.open(rps, fd, size, chunk=CHUNK)
    images = {}
    for rp_id in ["zeta", "alpha", "m.1", "Beta"]:
        s.create(rp_id)
        images[rp_id] = os.pread(fd, size, 0)
        os.pwrite(fd, pattern(rp_id, 3 * BLOCK), len(images) * CHUNK)
    s.close()
    Path(rps, "x" + TMP).write_bytes(b"half")                   # a create that never returned
    s = ReflinkStore.open(rps, fd, size, chunk=1 << 20)         # the images' chunk size wins
    try:
        assert s.chunk == CHUNK
        assert s.rp_ids() == ["zeta", "alpha", "m.1", "Beta"]
        assert not Path(rps, "x" + TMP).exists()
        for rp_id, image in images.items():
            assert s.read(rp_id, 0, size) == image
        s.create("new")                                         # seq goes on after the old ones
        assert s.rp_ids()[-1] == "new"
    finally:
        s.close()
    s = ReflinkStore.open(rps, fd, size)
    assert s.rp_ids() == ["zeta", "alpha", "m.1", "Beta", "new"]
    s.close()


def test_open_refuses_foreign_or_mismatched_images(live):
    fd, directory, size = live
    rps = os.path.join(directory, "live.img.rp")
    s = ReflinkStore.open(rps, fd, size)
    s.create("a")
    s.close()
    with pytest.raises(RPStoreError, match="volume of"):
        ReflinkStore.open(rps, fd, size + BLOCK)
    Path(rps, "stray" + SUFFIX).write_bytes(bytes(size))          # no xattr: not ours
    with pytest.raises(CorruptLog, match=r"stray\.img: no valid user\.tandem\.rp"):
        ReflinkStore.open(rps, fd, size)
    os.unlink(os.path.join(rps, "stray" + SUFFIX))
    os.setxattr(os.path.join(rps, "a" + SUFFIX), XATTR, b"9 1 1 1")
    with pytest.raises(CorruptLog, match="unsupported image format"):
        ReflinkStore.open(rps, fd, size)


def test_a_closed_store_refuses_create_and_preserve(store):
    store.close()
    assert store.needs_preserve(0, 1)
    with pytest.raises(RPStoreError, match="closed"):
        store.preserve(0, 1)
    with pytest.raises(RPStoreError, match="closed"):
        store.create("a")
    store.close()                                                # idempotent


def test_verify_reads_every_image(store):
    store.create("a")
    store.create("b")
    assert store.verify() == 2 * store.nchunks


def test_create_fails_cleanly_where_reflink_is_gone(live, tmp_path):
    # The images' directory is ours but the live file is on another filesystem now:
    # FICLONE fails with EXDEV and leaves nothing behind.
    fd, directory, size = live
    other = make_live(str(tmp_path), size)
    try:
        s = ReflinkStore.open(os.path.join(directory, "live.img.rp"), other, size)
        with pytest.raises(OSError) as exc:
            s.create("a")
        assert exc.value.errno == errno.EXDEV
        assert s.rp_ids() == [] and os.listdir(s.directory) == []
        s.close()
    finally:
        os.close(other)


# -- exports and clones go through store.read ---------------------------------------------------


def test_rp_image_and_clone_of_a_reflink_rp(live, store, tmp_path):
    fd, _, size = live
    store.create("a")
    image = bytearray(os.pread(fd, size, 0))
    os.pwrite(fd, b"L" * size, 0)
    live_before = os.pread(fd, size, 0)

    async def go():
        img = RPImage(store, "a", name="vm/disk0@a")
        assert await img.read(CHUNK - 5, 10) == image[CHUNK - 5:CHUNK + 5]
        with pytest.raises(OSError) as exc:
            await img.write(0, b"x", False)
        assert exc.value.errno == errno.EROFS
        c = Clone.create(store, "a", str(tmp_path / "clone"), name="drill")
        await c.write(CHUNK + 100, b"w" * 50, False)
        await c.write(size - 10, b"e" * 10, True)
        image[CHUNK + 100:CHUNK + 150] = b"w" * 50
        image[size - 10:] = b"e" * 10
        assert await c.read(0, size) == image
        with pytest.raises(RPInUse):
            store.delete("a")
        await c.close()
        await img.close()

    asyncio.run(go())
    assert os.pread(fd, size, 0) == live_before
    store.delete("a")


# -- pure helpers -----------------------------------------------------------------------------------

_ranges = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)).map(lambda t: (t[0], t[0] + t[1])),
                   max_size=12)


@given(_ranges, _ranges)
def test_range_union_and_subtract_against_sets(a, b):
    def points(ranges):
        return {x for lo, hi in ranges for x in range(lo, hi)}

    ua, ub = _union(a), _union(b)
    assert points(ua) == points(a) and all(p[1] < q[0] for p, q in zip(ua, ua[1:], strict=False))
    diff = _subtract(ua, ub)
    assert points(diff) == points(a) - points(b) and _length(diff) == len(points(diff))


def test_same_ranges_needs_the_same_blocks_or_holes_in_both():
    s = FIEMAP_EXTENT_SHARED
    a = [(0, 1000, 100, s), (100, 5000, 100, s), (300, 9000, 100, 0)]
    b = [(0, 1000, 50, s), (50, 1050, 50, s), (100, 7000, 100, s), (300, 9000, 100, 0)]
    # [0, 100) same blocks (b in two extents); [100, 200) other blocks; [200, 300) holes in both;
    # [300, 400) the same address but not flagged shared: not trusted.
    assert _same_ranges(a, b, 0, 400) == [(0, 100), (200, 300)]
    assert _same_ranges(a, [], 0, 400) == [(200, 300)]
    assert _same_ranges([(0, 1000, 100, s | 0x8)], [(0, 1000, 100, s | 0x8)], 0, 100) == []   # encoded


# -- the model of test_engine_rpstore.py, on the reflink store ------------------------------------


class ReflinkChain(RPChain):
    """RPChain's writes, creates, deletes, restores and reopens on ReflinkStore; its crash
    rules are the delta log's (torn batches, interrupted moves) and do not apply here."""

    store_class = ReflinkStore
    crash_during_preserve = None
    crash_during_delete = None

    @rule()
    def crash_during_create(self):
        """FICLONE into the temporary file done, the machine died before the rename."""
        with open(os.path.join(self.dir, f"torn{TMP}"), "wb") as f:
            f.write(b"\x00" * 4096)
        self.reopen()
        assert not os.path.exists(os.path.join(self.dir, f"torn{TMP}"))

    @precondition(lambda self: self.images)
    @rule()
    def fiemap_agrees_with_reading(self):
        rp_id = list(self.images)[-1]
        fast = self.store.changed_since(rp_id)
        self.store.use_fiemap = False
        try:
            assert self.store.changed_since(rp_id) == fast
        finally:
            self.store.use_fiemap = True


def test_reflink_store_against_the_model(reflink_fs):
    ReflinkChain.root = reflink_fs
    run_state_machine_as_test(ReflinkChain, settings=settings(
        max_examples=100, stateful_step_count=30, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


# -- recovery.py: which storage a volume gets ------------------------------------------------------


def volume(directory, number: int, size: int = 1 << 20, fill: bytes = b"\x01"):
    path = os.path.join(str(directory), f"disk{number}.img")
    Path(path).write_bytes(fill * size)
    return SimpleNamespace(number=number, fd=os.open(path, os.O_RDWR), size=size, path=path)


def create(rps, reason="manual"):
    return rps.create(reason, role="Secondary", consistent=True, generations=["0"] * len(rps.stores))


@pytest.fixture
def closing():
    fds = []
    yield fds
    for v in fds:
        os.close(v.fd)


def test_xfs_volume_gets_reflink_ext4_volume_gets_delta(reflink_dir, tmp_path, closing):
    on_xfs, on_ext4 = volume(reflink_dir, 0, fill=b"\x01"), volume(tmp_path, 1, fill=b"\x02")
    closing += [on_xfs, on_ext4]
    state = tmp_path / "state" / "rp"
    rps = RecoveryPoints.open(str(state), "a", [on_xfs, on_ext4])
    assert rps.storage() == ["reflink", "delta"] and rps.summary()["storage"] == ["reflink", "delta"]
    assert not Path(on_ext4.path + ".rp").exists()               # the failed probe left nothing
    m = create(rps)
    assert Path(on_xfs.path + ".rp", m.id + SUFFIX).exists()
    assert Path(state, "vol1", m.id + ".delta").exists() and not Path(state, "vol0").exists()
    assert Path(state, m.id + ".json").exists()                  # the manifest stays in the state dir
    for v in (on_xfs, on_ext4):
        if rps.needs_preserve(v.number, 0, 4096):
            rps.preserve(v.number, 0, 4096)
        os.pwrite(v.fd, b"\xff" * 4096, 0)
    assert not rps.needs_preserve(0, 0, 4096)                    # reflink: never
    (entry,) = rps.list()
    assert entry["storage"] == ["reflink", "delta"]
    assert rps.changed_since(m.id) == [[(0, CHUNK)], [(0, CHUNK)]]
    rps.clone(m.id, "drill", ["r/0", "r/1"])
    assert rps.clones["drill"][0].read_sync(0, 8) == b"\x01" * 8
    rps.delete_clone("drill")
    rps.close()
    rps = RecoveryPoints.open(str(state), "a", [on_xfs, on_ext4])
    assert rps.storage() == ["reflink", "delta"] and list(rps.manifests) == [m.id]
    assert rps.restore(m.id) == [[(0, CHUNK)], [(0, CHUNK)]]
    assert os.pread(on_xfs.fd, 4096, 0) == b"\x01" * 4096 and os.pread(on_ext4.fd, 4096, 0) == b"\x02" * 4096
    rps.delete(m.id)
    assert os.listdir(on_xfs.path + ".rp") == []
    rps.close()


def test_extent_count_counts_what_fiemap_maps(reflink_dir):
    fd = make_live(str(reflink_dir), 1 << 20, "sparse.img")
    try:
        assert extent_count(fd) == 0
        for k in range(5):                                   # holes between: 5 extents
            os.pwrite(fd, b"x" * BLOCK, k * 4 * BLOCK)
        os.fsync(fd)
        assert extent_count(fd) == len(fiemap(fd, 0, 1 << 20)) == 5
    finally:
        os.close(fd)


def test_auto_keeps_a_fragmented_volume_on_delta_but_reflink_asked_for_is_honoured(
        reflink_dir, tmp_path, closing, monkeypatch, caplog):
    monkeypatch.setattr(recovery, "AUTO_REFLINK_MAX_EXTENTS", 3)
    v = volume(reflink_dir, 0, fill=b"\0")
    closing.append(v)
    os.ftruncate(v.fd, 0)
    os.ftruncate(v.fd, v.size)                               # sparse again, then 4 extents
    for k in range(4):
        os.pwrite(v.fd, b"x" * BLOCK, k * 4 * BLOCK)
    os.fsync(v.fd)
    caplog.set_level("INFO", logger=recovery.log.name)
    rps = RecoveryPoints.open(str(tmp_path / "auto"), "a", [v], storage="auto")
    assert rps.storage() == ["delta"]
    assert "has 4 extents (over 3)" in caplog.text
    rps.close()
    rps = RecoveryPoints.open(str(tmp_path / "reflink"), "a", [v], storage="reflink")
    assert rps.storage() == ["reflink"]
    rps.close()
    os.pwrite(v.fd, b"x" * (13 * BLOCK), 0)                 # the holes filled: 1 extent
    os.fsync(v.fd)
    rps = RecoveryPoints.open(str(tmp_path / "auto2"), "a", [v], storage="auto")
    assert rps.storage() == ["reflink"]
    rps.close()


def test_existing_rps_keep_their_kind_until_none_is_left(reflink_dir, tmp_path, closing):
    v = volume(reflink_dir, 0)
    closing.append(v)
    state = str(tmp_path / "rp")
    rps = RecoveryPoints.open(state, "a", [v], storage="delta")
    assert rps.storage() == ["delta"]
    m = create(rps)
    rps.close()
    rps = RecoveryPoints.open(state, "a", [v])                   # .delta logs: stays delta on XFS
    assert rps.storage() == ["delta"]
    with pytest.raises(RecoveryPointError, match="no reflink recovery points"):
        RecoveryPoints.open(state, "a", [v], storage="reflink")
    rps.delete(m.id)
    rps.close()
    rps = RecoveryPoints.open(state, "a", [v])                   # none left: reflink from now on
    assert rps.storage() == ["reflink"]
    m = create(rps)
    rps.close()
    rps = RecoveryPoints.open(state, "a", [v], storage="delta")  # images: stays reflink
    assert rps.storage() == ["reflink"] and list(rps.manifests) == [m.id]
    rps.close()
    # Both kinds at once is never made by tandem: refuse rather than guess.
    Path(state, "vol0").mkdir(exist_ok=True)
    Path(state, "vol0", "x.delta").write_bytes(b"")
    with pytest.raises(RecoveryPointError, match="delta logs .* and reflink images"):
        RecoveryPoints.open(state, "a", [v])


def test_reflink_images_without_a_manifest_go_and_a_lost_image_drops_the_rp(reflink_dir, tmp_path, closing):
    v = volume(reflink_dir, 0)
    closing.append(v)
    state = tmp_path / "rp"
    rps = RecoveryPoints.open(str(state), "a", [v])
    a, b = create(rps), create(rps)
    rps.close()
    os.unlink(state / f"{a.id}.json")                           # crashed before the manifest
    os.unlink(Path(v.path + ".rp", b.id + SUFFIX))               # image lost afterwards
    rps = RecoveryPoints.open(str(state), "a", [v])
    assert rps.manifests == {} and rps.stores[0].rp_ids() == []
    assert os.listdir(v.path + ".rp") == []
    rps.close()


def test_volume_without_a_path_or_on_a_block_device_gets_delta(tmp_path, closing):
    v = volume(tmp_path, 0)
    closing.append(v)
    pathless = SimpleNamespace(number=0, fd=v.fd, size=v.size)
    rps = RecoveryPoints.open(str(tmp_path / "rp"), "a", [pathless])
    assert rps.storage() == ["delta"]
    rps.close()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        assert rpreflink.probe(str(tmp_path / "null.rp"), null) == "the volume is not a regular file"
    finally:
        os.close(null)
