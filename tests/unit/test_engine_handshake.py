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
