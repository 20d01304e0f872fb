"""Slot arithmetic and retention of the RP schedules (pure functions, no I/O).

A policy with rp_interval_s = I has one slot every I seconds, aligned on the Unix epoch:
slot k starts at k*I (UTC). Alignment on the epoch rather than on "the last RP" makes the slot
of an instant the same on every instance and after any restart or leader change, so the
catalogue's unique (vm, slot) key is what stops a second RP for the same slot.

An RP belongs to a slot if it is taken inside the slot's window [k*I, (k+1)*I): a slot whose
window passed without an RP is missed, never made up later (an RP taken then would not be the
point in time the slot stands for, and the current slot's RP is taken anyway).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

RP_PREFIX = "center-"


def slot_start(now: float, interval_s: int) -> float:
    """The start (epoch seconds) of the slot that contains `now`."""
    if interval_s <= 0:
        raise ValueError("interval_s must be positive")
    return math.floor(now / interval_s) * interval_s


def next_slot(now: float, interval_s: int) -> float:
    """The start of the first slot after the one containing `now`."""
    return slot_start(now, interval_s) + interval_s


def in_window(slot_at: float, interval_s: int, now: float) -> bool:
    """Whether an RP taken at `now` still belongs to the slot starting at slot_at."""
    return slot_at <= now < slot_at + interval_s


def rp_name(vm_id: int, slot_at: float) -> str:
    """The engine RP id of a VM's slot: the same on every try, by every leader, so that a retry
    returns the RP a crashed leader may already have made (tandemd's rp-create is idempotent
    by id). Within tandemd's center- namespace (tandem.engine.monitor.CENTER_RP_ID)."""
    stamp = datetime.fromtimestamp(slot_at, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{RP_PREFIX}v{vm_id}-{stamp}"


def to_expire(done: list[tuple[float, str]], keep: int) -> list[str]:
    """Retention: of a VM's done scheduled RPs as (slot_at, rp_name), the names beyond the
    `keep` newest. Labelled/tested RPs are not decided here: the engine refuses to delete them
    and the scheduler then marks them kept (they no longer count)."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    newest_first = sorted(done, key=lambda d: d[0], reverse=True)
    return [name for _, name in newest_first[keep:]]
