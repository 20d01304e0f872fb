"""Who resyncs from whom: the generation-id comparison at connect time.

A pure function of both sides' persisted state, so both daemons reach the
same decision independently. It follows DRBD's `drbd_uuid_compare()` for two
nodes (see ../shared/reference/drbd-semantics.md §5.3), simplified where we
have exactly two nodes and one bitmap slot; docs/engine.md lists the
differences.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metadata import GI_JUST_CREATED

NO_SYNC = "no-sync"
SOURCE_BITMAP = "source-bitmap"     # I send; the union of both bitmaps moves
TARGET_BITMAP = "target-bitmap"
SOURCE_FULL = "source-full"         # I send every block
TARGET_FULL = "target-full"
SPLIT_BRAIN = "split-brain"         # both sides moved on from a common generation
UNRELATED = "unrelated"             # no common history: refuse to connect

SOURCES = {SOURCE_BITMAP, SOURCE_FULL}
TARGETS = {TARGET_BITMAP, TARGET_FULL}
_MIRROR = {NO_SYNC: NO_SYNC, SOURCE_BITMAP: TARGET_BITMAP, TARGET_BITMAP: SOURCE_BITMAP,
           SOURCE_FULL: TARGET_FULL, TARGET_FULL: SOURCE_FULL, SPLIT_BRAIN: SPLIT_BRAIN,
           UNRELATED: UNRELATED}


@dataclass(frozen=True)
class Side:
    node: str
    current: int
    bitmap: int
    history: tuple[int, ...]
    consistent: bool          # disk at least Consistent (not mid-sync / never synced)
    primary: bool             # role Primary right now
    crashed_primary: bool     # was Primary and stopped uncleanly
    bits: int                 # out-of-sync blocks this side knows of

    @classmethod
    def from_hello(cls, node: str, role: str, vol: dict) -> Side:
        return cls(node, int(vol["current"]), int(vol["bitmap"]),
                   tuple(int(h) for h in vol["history"]), bool(vol["consistent"]),
                   role == "Primary", bool(vol["crashed_primary"]), int(vol["bits"]))


def mirror(strategy: str) -> str:
    return _MIRROR[strategy]


def decide(me: Side, peer: Side, discard: str | None = None) -> tuple[str, str]:
    """(strategy for *me*, rule name). The peer computes the mirror image.

    `discard` names the node whose changes an operator chose to throw away
    after a split brain (`tandemctl resolve --discard NODE`); it is only
    used when the generations really are split.
    """
    strategy, rule = _compare(me, peer)
    survivor = peer if discard == me.node else me
    if strategy == SPLIT_BRAIN and discard in (me.node, peer.node) and survivor.consistent:
        # Both moved on from one generation (bitmap-both): the union of the two
        # bitmaps holds every block either side changed since, so a bitmap
        # resync suffices. Otherwise the common point is unknown: full sync.
        kind = "bitmap" if rule == "bitmap-both" else "full"
        if discard == me.node:
            return (TARGET_BITMAP if kind == "bitmap" else TARGET_FULL), f"discard-self-{rule}"
        return (SOURCE_BITMAP if kind == "bitmap" else SOURCE_FULL), f"discard-peer-{rule}"
    # A side that is not consistent can never be a source; one that is, never
    # needs a full sync from an inconsistent peer (initial sync, interrupted sync).
    if strategy == NO_SYNC and me.consistent != peer.consistent:
        return (SOURCE_FULL, "consistent-self") if me.consistent else (TARGET_FULL, "consistent-peer")
    return strategy, rule


def _compare(me: Side, peer: Side) -> tuple[str, str]:
    s = me.current or GI_JUST_CREATED
    p = peer.current or GI_JUST_CREATED
    if s == GI_JUST_CREATED and p == GI_JUST_CREATED:
        return NO_SYNC, "just-created-both"
    if s == GI_JUST_CREATED:
        return TARGET_FULL, "just-created-self"
    if p == GI_JUST_CREATED:
        return SOURCE_FULL, "just-created-peer"
    if s == p:
        return _same_generation(me, peer)
    if s == peer.bitmap and me.bitmap == p:
        # Each side claims to have moved on from the other's current generation:
        # impossible in one history, so neither may overwrite the other.
        return SPLIT_BRAIN, "bitmap-cross"
    if s == peer.bitmap:
        return TARGET_BITMAP, "bitmap-peer"
    if me.bitmap == p:
        return SOURCE_BITMAP, "bitmap-self"
    mine_in_peer, peer_in_mine = s in peer.history, p in me.history
    if mine_in_peer and not peer_in_mine:
        return TARGET_FULL, "history-peer"
    if peer_in_mine and not mine_in_peer:
        return SOURCE_FULL, "history-self"
    if me.bitmap and me.bitmap == peer.bitmap:
        return SPLIT_BRAIN, "bitmap-both"
    if (set(me.history) & set(peer.history)) - {0}:
        return SPLIT_BRAIN, "history-both"
    return UNRELATED, "unrelated"


def _same_generation(me: Side, peer: Side) -> tuple[str, str]:
    """Same data generation: only the bitmaps (AL replay after a crash) may differ."""
    if not me.bits and not peer.bits:
        return NO_SYNC, "same-generation"
    if me.primary != peer.primary:
        return (SOURCE_BITMAP, "primary-self") if me.primary else (TARGET_BITMAP, "primary-peer")
    if me.crashed_primary != peer.crashed_primary:
        # The side that stayed up holds every acknowledged write (protocol C);
        # the crashed one may hold writes that were never acknowledged.
        return (TARGET_BITMAP, "crashed-primary-self") if me.crashed_primary \
            else (SOURCE_BITMAP, "crashed-primary-peer")
    # Both (or neither) crashed: any consistent choice will do; make it stable.
    return (SOURCE_BITMAP, "tie-break") if me.node < peer.node else (TARGET_BITMAP, "tie-break")
