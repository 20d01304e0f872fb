"""The inline-write guard: only a write that slept in the kernel sends writes to the pool.

The write itself is replaced by one that sleeps (what writeback throttling does
to a writer) or one that keeps the CPU busy for as long (what a loop preempted
on a busy host looks like from its clock: slow, but never asleep).
"""

from __future__ import annotations

import time

import pytest

from tandem.engine import volume


def _sleeping(writes, sync_fds) -> None:
    time.sleep(volume.INLINE_STALL * 3)


def _busy(writes, sync_fds) -> None:
    end = time.monotonic() + volume.INLINE_STALL * 3
    while time.monotonic() < end:
        pass


def test_a_write_that_slept_sends_writes_to_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volume, "write_batch", _sleeping)
    guard = volume.InlineWrites()
    assert guard.allowed(4096)
    guard.run([])
    assert guard.stalls == 1
    assert not guard.allowed(4096)      # for INLINE_BACKOFF from now


def test_a_slow_write_that_never_slept_keeps_writes_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volume, "write_batch", _busy)
    guard = volume.InlineWrites()
    guard.run([])
    assert (guard.stalls, guard.preempted) == (0, 1)
    assert guard.allowed(4096)


def test_big_writes_never_run_inline() -> None:
    assert not volume.InlineWrites().allowed(volume.INLINE_MAX + 1)
