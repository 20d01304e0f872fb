"""The resync decision: both sides must reach mirror-image conclusions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem.engine import handshake as h
from tandem.engine.metadata import GI_JUST_CREATED as JC


def side(node="a", current=JC, bitmap=0, history=(0, 0, 0, 0), consistent=True, primary=False,
         crashed=False, bits=0):
    return h.Side(node, current, bitmap, tuple(history), consistent, primary, crashed, bits)


@pytest.mark.parametrize("me, peer, expected", [
    (side(current=JC, consistent=False), side("b", JC, consistent=False), (h.NO_SYNC, "just-created-both")),
    (side(current=11), side("b", JC, consistent=False), (h.SOURCE_FULL, "just-created-peer")),
    (side(current=JC, consistent=False), side("b", 11), (h.TARGET_FULL, "just-created-self")),
    (side(current=11), side("b", 11), (h.NO_SYNC, "same-generation")),
    # Secondary b was away while a wrote: a moved to 22 and remembers 11.
    (side(current=22, bitmap=11, primary=True, bits=5), side("b", 11), (h.SOURCE_BITMAP, "bitmap-self")),
    (side(current=11), side("b", 22, bitmap=11, primary=True), (h.TARGET_BITMAP, "bitmap-peer")),
    # Both wrote after separating from 11: split brain.
    (side(current=22, bitmap=11), side("b", 33, bitmap=11), (h.SPLIT_BRAIN, "bitmap-both")),
    (side(current=22, history=(11, 0, 0, 0)), side("b", 33, history=(11, 0, 0, 0)),
     (h.SPLIT_BRAIN, "history-both")),
    (side(current=22, history=(11, 0, 0, 0)), side("b", 11), (h.SOURCE_FULL, "history-self")),
    (side(current=22), side("b", 33), (h.UNRELATED, "unrelated")),
    # Same generation with crash bits: the survivor of a crashed primary is the source.
    (side(current=11, crashed=True, bits=100), side("b", 11), (h.TARGET_BITMAP, "crashed-primary-self")),
    (side(current=11, primary=True), side("b", 11, bits=3), (h.SOURCE_BITMAP, "primary-self")),
    # An interrupted sync left the target inconsistent under the same generation.
    (side(current=11), side("b", 11, consistent=False), (h.SOURCE_FULL, "consistent-self")),
])
def test_decisions(me, peer, expected):
    assert h.decide(me, peer) == expected


gis = st.sampled_from([JC, 11, 22, 33, 0])
sides = st.builds(side, node=st.just("a"), current=gis, bitmap=st.sampled_from([0, 11, 22, 33]),
                  history=st.lists(st.sampled_from([0, 11, 22]), min_size=4, max_size=4),
                  consistent=st.booleans(), primary=st.booleans(), crashed=st.booleans(),
                  bits=st.integers(0, 3))


@given(me=sides, peer=sides)
def test_both_sides_agree(me, peer):
    peer = h.Side("b", *[getattr(peer, f) for f in ("current", "bitmap", "history", "consistent",
                                                   "primary", "crashed_primary", "bits")])
    mine, _ = h.decide(me, peer)
    theirs, _ = h.decide(peer, me)
    assert theirs == h.mirror(mine)


@given(me=sides, peer=sides, discard=st.sampled_from([None, "a", "b", "c"]))
def test_both_sides_agree_with_a_discard_choice(me, peer, discard):
    peer = h.Side("b", *[getattr(peer, f) for f in ("current", "bitmap", "history", "consistent",
                                                   "primary", "crashed_primary", "bits")])
    mine, rule = h.decide(me, peer, discard)
    theirs, _ = h.decide(peer, me, discard)
    assert theirs == h.mirror(mine)
    plain, _ = h.decide(me, peer)
    survivor = peer if discard == "a" else me
    if plain != h.SPLIT_BRAIN or discard not in ("a", "b") or not survivor.consistent:
        assert mine == plain            # the choice only ever resolves a real split brain ...
    else:                               # ... and never from an inconsistent survivor
        assert mine in (h.TARGETS if discard == "a" else h.SOURCES), rule


def test_discard_after_a_split_from_one_generation_is_a_bitmap_resync():
    a = side(current=22, bitmap=11, bits=5)
    b = side("b", 33, bitmap=11, bits=7)
    assert h.decide(a, b) == (h.SPLIT_BRAIN, "bitmap-both")
    assert h.decide(a, b, "b") == (h.SOURCE_BITMAP, "discard-peer-bitmap-both")
    assert h.decide(b, a, "b") == (h.TARGET_BITMAP, "discard-self-bitmap-both")
    # Without a known common generation the victim gets everything.
    c = side(current=22, bitmap=0, history=(11, 0, 0, 0))
    d = side("b", 33, bitmap=0, history=(11, 0, 0, 0))
    assert h.decide(c, d, "a") == (h.TARGET_FULL, "discard-self-history-both")
