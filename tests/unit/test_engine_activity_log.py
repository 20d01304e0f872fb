"""The activity log's invariant: on-disk AL ∪ on-disk bitmap covers every write in flight."""

from __future__ import annotations

import asyncio

import pytest

from tandem.engine.activity_log import EXTENT_SIZE, ActivityLog
from tandem.engine.metadata import MetadataFile

MiB = 1 << 20


def run(coro):
    return asyncio.run(coro)


async def direct(fn, *args):
    return fn(*args)


@pytest.fixture
def md(tmp_path):
    m = MetadataFile.create(str(tmp_path / "v.md"), 64 * MiB, al_extents=67)
    yield m
    m.close()


def test_first_write_to_an_extent_costs_one_transaction(md):
    async def go():
        al = ActivityLog(md, run_io=direct)
        await al.acquire(0, 4096)
        al.release(0, 4096)
        await al.acquire(4096, 4096)            # same extent: no new transaction
        al.release(4096, 4096)
        await al.acquire(EXTENT_SIZE - 10, 20)  # spans extents 0 and 1
        al.release(EXTENT_SIZE - 10, 20)
        return al
    al = run(go())
    assert al.transactions == 2
    assert sorted(md.read_al()) == [0, 1]


def test_eviction_persists_the_bitmap_before_dropping_an_extent(tmp_path):
    md = MetadataFile.create(str(tmp_path / "v.md"), 1024 * MiB, al_extents=67)
    order = []

    async def recording(fn, *args):
        order.append(fn.__name__)
        return fn(*args)

    async def go():
        al = ActivityLog(md, run_io=recording)
        for e in range(67):
            await al.acquire(e * EXTENT_SIZE, 4096)
            md.bitmap.set_range(e * EXTENT_SIZE, 4096)   # the peer is away: track it
            al.release(e * EXTENT_SIZE, 4096)
        order.clear()
        await al.acquire(67 * EXTENT_SIZE, 4096)          # evicts extent 0
        al.release(67 * EXTENT_SIZE, 4096)
        return al
    al = run(go())
    assert order == ["write_bitmap_pages", "write_al"]
    assert 0 not in md.read_al() and 67 in md.read_al()
    # The evicted extent's bit is on disk, not only in memory.
    md.close()
    again = MetadataFile.open(md.path)
    assert again.bitmap.test(0)
    again.close()
    assert len(al.active) == 67


def test_busy_extents_are_never_evicted(md):
    async def go():
        al = ActivityLog(md, run_io=direct)
        for e in range(67):
            await al.acquire(e * EXTENT_SIZE, 4096)      # all held
        waiter = asyncio.ensure_future(al.acquire(67 * EXTENT_SIZE, 4096))
        await asyncio.sleep(0.01)
        assert not waiter.done()                        # must wait for a slot
        al.release(5 * EXTENT_SIZE, 4096)
        await asyncio.wait_for(waiter, 1)
        return al
    al = run(go())
    assert 5 not in al.active and 67 in al.active
    assert all(e in md.read_al() for e in range(67) if e != 5)


def test_clean_shutdown_empties_the_log(md):
    async def go():
        al = ActivityLog(md, run_io=direct)
        await al.acquire(0, 4096)
        with pytest.raises(RuntimeError):
            await al.clean_shutdown()
        al.release(0, 4096)
        await al.clean_shutdown()
    run(go())
    assert md.read_al() == []
