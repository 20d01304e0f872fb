"""Recovery points: the delta chain against a model, crash states, concurrency, exports."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tandem.engine.rpstore import (
    DELETING,
    HEADER_SIZE,
    PAGE,
    SUFFIX,
    TMP,
    Clone,
    CorruptLog,
    RPImage,
    RPInUse,
    RPStore,
    RPStoreError,
    UnknownRP,
)

CHUNK = 8192
# Five whole chunks and a half one: the partial last chunk is always in play.
SIZE = 5 * CHUNK + 4096


def make_live(directory, size=SIZE, fill=b"\x11"):
    path = os.path.join(directory, "live.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill * size, 0)
    return fd


def live_write(store, fd, offset, data):
    """What the write path does: preserve first (only when needed), then write."""
    if store.needs_preserve(offset, len(data)):
        store.preserve(offset, len(data))
    assert not store.needs_preserve(offset, len(data))
    os.pwrite(fd, data, offset)


def pattern(seed, n):
    return hashlib.shake_128(str(seed).encode()).digest(n)


@pytest.fixture
def env(tmp_path):
    fd = make_live(str(tmp_path))
    rps = str(tmp_path / "rps")
    stores = []

    def open_store(chunk=CHUNK):
        s = RPStore.open(rps, fd, SIZE, chunk=chunk)
        stores.append(s)
        return s

    yield fd, rps, open_store
    for s in stores:
        s.close()
    os.close(fd)


def log_path(rps, rp_id):
    return os.path.join(rps, rp_id + SUFFIX)


# -- the model ---------------------------------------------------------------------------


def _in_ranges(offset, ranges):
    return any(o <= offset < o + n for o, n in ranges)


class RPChain(RuleBasedStateMachine):
    """Random writes, creates, deletes, restores, reopens and crashes against a model:
    the live file and every RP's image are known exactly at every step.

    test_engine_rpreflink.py runs it on the reflink store too (store_class, root)."""

    store_class = RPStore
    root: str | None = None               # where the live file goes (None: the default tmp)

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="rpstore-", dir=self.root)
        self.fd = make_live(self.tmp)
        self.dir = os.path.join(self.tmp, "rps")
        self.store = self.store_class.open(self.dir, self.fd, SIZE, chunk=CHUNK)
        self.live = bytearray(b"\x11" * SIZE)
        self.images: dict[str, bytes] = {}         # creation order = dict order
        self.n = 0

    def teardown(self):
        self.store.close()
        os.close(self.fd)
        shutil.rmtree(self.tmp)

    def reopen(self):
        self.store.close()
        self.store = self.store_class.open(self.dir, self.fd, SIZE, chunk=CHUNK)

    @initialize()
    def first_rp(self):
        self.create()

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(1, 3 * CHUNK), seed=st.integers(0, 10**6))
    def write(self, offset, length, seed):
        length = min(length, SIZE - offset)
        data = pattern(seed, length)
        self.store.preserve(offset, length)      # always, like the write path's pool hop
        if self.images:
            assert not self.store.needs_preserve(offset, length)
        os.pwrite(self.fd, data, offset)
        self.live[offset:offset + length] = data

    @rule()
    def create(self):
        self.n += 1
        rp_id = f"rp-{self.n}"
        self.store.create(rp_id)
        self.images[rp_id] = bytes(self.live)

    @precondition(lambda self: self.images)
    @rule(data=st.data())
    def delete(self, data):
        rp_id = data.draw(st.sampled_from(sorted(self.images)))
        self.store.delete(rp_id)
        del self.images[rp_id]

    @precondition(lambda self: self.images)
    @rule(data=st.data())
    def restore(self, data):
        rp_id = data.draw(st.sampled_from(sorted(self.images)))
        before = bytes(self.live)
        ranges = self.store.restore(rp_id)
        image = self.images[rp_id]
        for i in range(SIZE):
            if before[i] != image[i]:
                assert _in_ranges(i, ranges), f"byte {i} restored outside {ranges}"
        self.live[:] = image

    @rule()
    def reopen_rule(self):
        self.reopen()

    @precondition(lambda self: self.images)
    @rule(offset=st.integers(0, SIZE - 1), cut=st.floats(0, 1), zero_page=st.booleans())
    def crash_during_preserve(self, offset, cut, zero_page):
        """preserve() appended its batch, the machine died before the fdatasync, and
        only part of the batch reached the disk. The live write never happened."""
        if not self.store.needs_preserve(offset, 1):
            return                           # nothing would be appended
        event("crash during preserve")
        newest = list(self.images)[-1]
        path = log_path(self.dir, newest)
        before = self.store.bytes_used(newest)
        self.store.preserve(offset, 1)
        after = self.store.bytes_used(newest)
        self.store.close()
        if zero_page:                        # the size made it, one page of data did not
            page = before + int(cut * ((after - before) // PAGE - 1) + 1) * PAGE
            with open(path, "r+b") as f:
                f.seek(min(page, after - PAGE))
                f.write(bytes(PAGE))
        else:
            os.truncate(path, before + int(cut * (after - before - 1)))
        self.store = RPStore.open(self.dir, self.fd, SIZE, chunk=CHUNK)
        assert self.store.bytes_used(newest) == before
        assert os.path.getsize(path) == before
        assert self.store.needs_preserve(offset, 1)

    @precondition(lambda self: len(self.images) >= 2)
    @rule(data=st.data(), cut=st.floats(0, 1))
    def crash_during_delete(self, data, cut):
        """delete() renamed the log, moved part of its records into the older log, and
        the machine died. Open must finish the delete with every other RP intact."""
        event("crash during delete")
        ids = list(self.images)
        rp_id = data.draw(st.sampled_from(ids[1:]))        # the oldest is a plain unlink
        older = ids[ids.index(rp_id) - 1]
        saved = os.path.join(self.tmp, "saved.delta")
        shutil.copyfile(log_path(self.dir, rp_id), saved)
        old_size = self.store.bytes_used(older)
        self.store.delete(rp_id)
        new_size = self.store.bytes_used(older)
        self.store.close()
        os.rename(saved, os.path.join(self.dir, rp_id + DELETING))
        os.truncate(log_path(self.dir, older), old_size + int(cut * (new_size - old_size)))
        del self.images[rp_id]
        self.store = RPStore.open(self.dir, self.fd, SIZE, chunk=CHUNK)
        assert not os.path.exists(os.path.join(self.dir, rp_id + DELETING))
        assert self.store.bytes_used(older) == new_size

    @invariant()
    def everything_reads_as_modelled(self):
        assert os.pread(self.fd, SIZE, 0) == self.live
        assert self.store.rp_ids() == list(self.images)
        for rp_id, image in self.images.items():
            assert self.store.read(rp_id, 0, SIZE) == image, rp_id
            changed = self.store.changed_since(rp_id)
            for i in range(0, SIZE, 512):
                if image[i:i + 512] != self.live[i:i + 512]:
                    assert _in_ranges(i, changed)


RPChain.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRPChain = RPChain.TestCase


# -- basics ---------------------------------------------------------------------------------


def test_reads_at_odd_offsets_span_logs_and_live(env):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    live_write(s, fd, 100, b"X" * 9000)           # chunks 0 and 1 saved in a
    s.create("b")
    live_write(s, fd, CHUNK + 5, b"Y" * CHUNK)    # chunks 1 and 2 saved in b
    base = b"\x11" * SIZE
    for lo, n in [(0, SIZE), (1, 1), (CHUNK - 3, 7), (2 * CHUNK - 1, CHUNK + 2), (SIZE - 5, 5)]:
        assert s.read("a", lo, n) == base[lo:lo + n]
    img_b = bytearray(base)
    img_b[100:9100] = b"X" * 9000
    assert s.read("b", 0, SIZE) == img_b
    assert s.changed_since("a") == [(0, 3 * CHUNK)]
    assert s.changed_since("b") == [(CHUNK, 2 * CHUNK)]


def test_rp_ids_are_validated_and_unique(env):
    _, _, open_store = env
    s = open_store()
    for bad in ["", "-x", "a/b", "a b", "x" * 82, "é", ".hidden", "a\x00"]:
        with pytest.raises(ValueError):
            s.create(bad)
    s.create("2024-05-01T10:00:00Z.daily_1")
    with pytest.raises(RPStoreError, match="already exists"):
        s.create("2024-05-01T10:00:00Z.daily_1")
    with pytest.raises(UnknownRP):
        s.read("nope", 0, 1)
    with pytest.raises(UnknownRP):
        s.delete("nope")


def test_order_survives_reopen_whatever_the_names(env):
    _, _, open_store = env
    s = open_store()
    for rp_id in ["zeta", "alpha", "m.1", "Beta"]:
        s.create(rp_id)
    s.close()
    assert open_store().rp_ids() == ["zeta", "alpha", "m.1", "Beta"]


def test_no_rp_means_no_work_and_an_rp_costs_only_changed_chunks(env):
    fd, rps, open_store = env
    s = open_store()
    assert not s.needs_preserve(0, SIZE)
    s.preserve(0, SIZE)                           # harmless without an RP
    s.create("a")
    assert s.bytes_used("a") == HEADER_SIZE
    assert s.needs_preserve(0, 1) and s.needs_preserve(SIZE - 1, 1)
    s.preserve(CHUNK + 10, 20)
    assert not s.needs_preserve(CHUNK, CHUNK)
    assert s.needs_preserve(CHUNK - 1, 2)         # straddles an unsaved chunk
    assert s.bytes_used("a") == HEADER_SIZE + PAGE + CHUNK
    s.preserve(CHUNK, CHUNK)                      # already saved: nothing appended
    assert s.bytes_used("a") == HEADER_SIZE + PAGE + CHUNK
    s.create("b")
    assert s.needs_preserve(CHUNK, 1)             # the newest log is the one that counts


def test_store_refuses_a_volume_of_another_size_and_keeps_its_chunk(env, tmp_path):
    fd, rps, open_store = env
    s = open_store(chunk=CHUNK)
    s.create("a")
    live_write(s, fd, 0, b"Z" * 10)
    s.close()
    with pytest.raises(RPStoreError, match="volume of"):
        RPStore.open(rps, fd, SIZE + 4096)
    s = open_store(chunk=65536)                   # the logs' chunk size wins
    assert s.chunk == CHUNK
    assert s.read("a", 0, 10) == b"\x11" * 10


def test_a_closed_store_refuses_preserve(env):
    fd, _, open_store = env
    s = open_store()
    s.create("a")
    s.close()
    assert s.needs_preserve(0, 1)
    with pytest.raises(RPStoreError, match="closed"):
        s.preserve(0, 1)


# -- delete and restore --------------------------------------------------------------------


def test_delete_moves_only_what_the_older_rp_lacks(env):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    live_write(s, fd, 0, b"1" * CHUNK)                 # chunk 0 -> a
    s.create("b")
    live_write(s, fd, 0, b"2" * (2 * CHUNK))           # chunks 0, 1 -> b
    s.create("c")
    a_before = s.bytes_used("a")
    s.delete("b")
    # chunk 1 moved to a (one batch: a head page and one chunk); chunk 0 did not
    assert s.bytes_used("a") == a_before + PAGE + CHUNK
    assert s.read("a", 0, 2 * CHUNK) == b"\x11" * (2 * CHUNK)
    assert s.read("c", 0, 2 * CHUNK) == b"2" * (2 * CHUNK)
    assert not os.path.exists(log_path(rps, "b"))
    s.delete("a")                                       # the oldest: just removed
    s.delete("c")
    assert s.rp_ids() == [] and os.listdir(rps) == []
    assert not s.needs_preserve(0, SIZE)


def test_deleting_the_newest_makes_the_older_one_newest(env):
    fd, _, open_store = env
    s = open_store()
    s.create("a")
    s.create("b")
    live_write(s, fd, 0, b"2" * 100)                    # chunk 0 -> b only
    s.delete("b")
    assert not s.needs_preserve(0, 100)                 # a now holds chunk 0
    live_write(s, fd, CHUNK, b"3" * 100)
    assert s.read("a", 0, 2 * CHUNK) == b"\x11" * (2 * CHUNK)


def test_restore_keeps_newer_rps_and_the_restored_one(env):
    fd, _, open_store = env
    s = open_store()
    s.create("a")
    live_write(s, fd, 0, b"A" * CHUNK)
    s.create("b")
    live_write(s, fd, CHUNK, b"B" * CHUNK)
    b_image = s.read("b", 0, SIZE)
    ranges = s.restore("a")
    assert ranges == [(0, 2 * CHUNK)]
    assert os.pread(fd, SIZE, 0) == b"\x11" * SIZE
    assert s.read("a", 0, SIZE) == b"\x11" * SIZE
    assert s.read("b", 0, SIZE) == b_image             # the rolled-back state is kept
    s.restore("b")                                      # ... so the restore can be undone
    assert os.pread(fd, SIZE, 0) == b_image
    assert s.restore("b") == s.changed_since("b")       # idempotent


def test_an_interrupted_delete_of_a_middle_rp_is_finished_at_open(env):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    s.create("b")
    live_write(s, fd, 0, b"B" * SIZE)
    s.create("c")
    live_write(s, fd, 0, b"C" * SIZE)
    s.close()
    os.rename(log_path(rps, "b"), os.path.join(rps, "b" + DELETING))   # crashed after the rename
    s = open_store()
    assert s.rp_ids() == ["a", "c"]
    assert s.read("a", 0, SIZE) == b"\x11" * SIZE
    assert s.read("c", 0, SIZE) == b"B" * SIZE
    assert sorted(os.listdir(rps)) == ["a" + SUFFIX, "c" + SUFFIX]


# -- crash states and corruption -------------------------------------------------------------


def test_a_torn_tail_is_dropped_and_fully_preserved_data_stays(env):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    live_write(s, fd, 0, b"1" * 3 * CHUNK)            # one batch, durable, live written
    good = s.bytes_used("a")
    s.preserve(4 * CHUNK, 10)                          # the next one is torn
    s.close()
    os.truncate(log_path(rps, "a"), good + PAGE + 100)
    s = open_store()
    assert s.bytes_used("a") == good
    assert s.read("a", 0, SIZE) == b"\x11" * SIZE
    assert s.needs_preserve(4 * CHUNK, 10) and not s.needs_preserve(0, 3 * CHUNK)
    s.preserve(4 * CHUNK, 10)                          # appends cleanly after the cut
    s.close()
    assert open_store().bytes_used("a") == good + PAGE + CHUNK


def test_a_torn_head_page_with_data_behind_it_is_a_tear_too(env):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    s.preserve(0, 1)
    good = s.bytes_used("a")
    s.preserve(0, SIZE)
    s.close()
    with open(log_path(rps, "a"), "r+b") as f:         # the head never reached the disk
        f.seek(good)
        f.write(bytes(PAGE))
    s = open_store()
    assert s.bytes_used("a") == good


def test_a_corrupt_batch_in_the_middle_is_an_error_naming_the_file(env):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    s.preserve(0, 1)
    s.preserve(CHUNK, 1)
    s.preserve(2 * CHUNK, 1)
    s.close()
    with open(log_path(rps, "a"), "r+b") as f:          # flip a bit in batch 2's head
        f.seek(HEADER_SIZE + PAGE + CHUNK + 24)
        f.write(b"\x7f")
    with pytest.raises(CorruptLog, match=r"a\.delta: batch 2 at offset"):
        open_store()


def test_a_torn_tail_of_an_older_log_is_corruption(env):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    s.preserve(0, 1)
    s.preserve(CHUNK, 1)
    s.create("b")
    s.close()
    os.truncate(log_path(rps, "a"), os.path.getsize(log_path(rps, "a")) - 100)
    with pytest.raises(CorruptLog, match=r"a\.delta"):
        open_store()


def test_corrupt_data_is_caught_by_reads_of_whole_chunks_and_by_verify(env):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    s.preserve(0, 1)
    s.preserve(CHUNK, 1)
    s.close()
    with open(log_path(rps, "a"), "r+b") as f:          # data of the first record
        f.seek(HEADER_SIZE + PAGE + 5)
        f.write(b"\x00")
    s = open_store()                                     # only the last batch's data is checked at open
    with pytest.raises(CorruptLog, match="data CRC mismatch for chunk 0"):
        s.read("a", 0, CHUNK)
    with pytest.raises(CorruptLog, match=r"a\.delta"):
        s.verify()


def test_a_bad_header_or_leftovers(env):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    s.close()
    Path(rps, "b" + TMP).touch()                         # a create that never returned
    Path(rps, "manifest.json").touch()
    s = open_store()
    assert s.rp_ids() == ["a"] and not os.path.exists(os.path.join(rps, "b" + TMP))
    s.close()
    with open(log_path(rps, "a"), "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    with pytest.raises(CorruptLog, match="header CRC"):
        open_store()


# -- concurrency --------------------------------------------------------------------------------


def test_concurrent_preserves_copy_each_chunk_once_and_keep_the_pre_image(env):
    fd, rps, open_store = env
    s = open_store()
    live_write(s, fd, 0, pattern("before", SIZE))
    s.create("a")
    before = s.read("a", 0, SIZE)
    start = threading.Barrier(8)
    errors = []

    def writer(k):
        try:
            start.wait()
            for i in range(20):
                offset = (k * 1237 + i * 4099) % (SIZE - 3 * CHUNK)
                live_write(s, fd, offset, pattern((k, i), 2 * CHUNK + 17))
        except BaseException as exc:   # surfaced below
            errors.append(exc)

    def reader():
        try:
            start.wait()
            for _ in range(40):
                assert s.read("a", 0, SIZE) == before
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert s.read("a", 0, SIZE) == before
    chunks = sum(-(-n // CHUNK) for _, n in s.changed_since("a"))
    assert s.verify() == chunks                                     # each chunk saved once
    s.close()
    assert open_store().read("a", 0, SIZE) == before


# -- exports ------------------------------------------------------------------------------------


def test_rp_image_reads_the_rp_and_refuses_writes(env):
    fd, _, open_store = env
    s = open_store()
    s.create("a")
    live_write(s, fd, 0, b"new" * 100)

    async def go():
        img = RPImage(s, "a", name="vm/disk0@a")
        assert img.read_only and img.size == SIZE
        assert await img.read(0, 300) == b"\x11" * 300
        for call in (img.write(0, b"x", False), img.trim(0, 4096, False),
                     img.write_zeroes(0, 4096, False, False)):
            with pytest.raises(OSError) as exc:
                await call
            assert exc.value.errno == errno.EROFS
        await img.flush()                     # nothing to make durable: succeeds
        with pytest.raises(RPInUse):
            s.delete("a")
        await img.close()

    asyncio.run(go())
    s.delete("a")


def test_clone_reads_the_rp_writes_stay_in_the_clone_and_survive_reopen(env, tmp_path):
    fd, rps, open_store = env
    s = open_store()
    s.create("a")
    live_write(s, fd, 0, b"L" * SIZE)                 # the live volume moves on
    live_before = os.pread(fd, SIZE, 0)
    log_before = Path(log_path(rps, "a")).read_bytes()
    image = bytearray(s.read("a", 0, SIZE))
    cdir = str(tmp_path / "clone")

    async def go():
        c = Clone.create(s, "a", cdir, name="drill")
        assert await c.read(0, SIZE) == image
        await c.write(CHUNK + 100, b"w" * 50, False)             # partial: merges with the RP
        await c.write(2 * CHUNK, b"W" * CHUNK, False)             # a whole chunk
        await c.write(SIZE - 10, b"e" * 10, True)                 # the partial last chunk, FUA
        await c.write_zeroes(3 * CHUNK - 5, 10, False, True)
        await c.trim(0, 4096, False)                              # advisory: no change
        image[CHUNK + 100:CHUNK + 150] = b"w" * 50
        image[2 * CHUNK:3 * CHUNK] = b"W" * CHUNK
        image[SIZE - 10:] = b"e" * 10
        image[3 * CHUNK - 5:3 * CHUNK + 5] = bytes(10)
        assert await c.read(0, SIZE) == image
        with pytest.raises(RPInUse):
            s.delete("a")
        await c.close()

    asyncio.run(go())
    assert os.pread(fd, SIZE, 0) == live_before
    assert Path(log_path(rps, "a")).read_bytes() == log_before
    s.close()
    s = open_store()

    async def again():
        c = Clone.open(s, cdir)
        assert c.rp_id == "a"
        assert await c.read(0, SIZE) == image
        await c.close()

    asyncio.run(again())
    assert s.read("a", 0, SIZE) == b"\x11" * SIZE


def test_clone_of_a_deleted_rp_does_not_open(env, tmp_path):
    _, _, open_store = env
    s = open_store()
    s.create("a")
    Clone.create(s, "a", str(tmp_path / "c")).close_sync()
    s.delete("a")
    with pytest.raises(UnknownRP):
        Clone.open(s, str(tmp_path / "c"))


def test_an_rp_read_racing_first_writes_never_sees_new_data(tmp_path):
    # The race read() must close: it finds chunk c in no log and reads it from the live
    # volume while a writer saves c and overwrites it. Big reads (long live preads)
    # against a writer first-touching many chunks make the window wide.
    size, chunk = 8 << 20, 16 << 10
    fd = make_live(str(tmp_path), size, fill=b"")
    os.pwrite(fd, pattern("old", size), 0)
    s = RPStore.open(str(tmp_path / "rps"), fd, size, chunk=chunk)
    s.create("a")
    before = os.pread(fd, size, 0)
    done = threading.Event()
    bad = []

    def writer():
        try:
            for k in range(size // chunk):
                c = (k * 97) % (size // chunk)                # scattered first touches
                live_write(s, fd, c * chunk, b"\xee" * chunk)
        finally:
            done.set()

    def reader():
        while not done.is_set() and not bad:
            if s.read("a", 0, size) != before:
                bad.append("an RP read returned data written after the RP")

    threads = [threading.Thread(target=writer), threading.Thread(target=reader),
               threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not bad, bad[0]
        assert s.read("a", 0, size) == before
    finally:
        s.close()
        os.close(fd)
