"""Split brain: both nodes wrote as Primary. Detected, refused, resolved only by the operator."""

from __future__ import annotations

import hashlib

from .harness import Pair
from .nbdclient import Client

BLOCK = 4096


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_blocks(node, pair: Pair, blocks: range, fill: bytes) -> None:
    c = Client(node.nbd_socket(pair.resource), f"{pair.resource}/disk0")
    try:
        for b in blocks:
            c.write(b * BLOCK, fill * BLOCK, fua=True)
    finally:
        c.close()


def read_block(node, pair: Pair, block: int) -> bytes:
    """From the backing file: a Secondary serves no NBD export."""
    with open(pair.data_file(node), "rb") as f:
        f.seek(block * BLOCK)
        return f.read(BLOCK)


def standalone(pair: Pair) -> bool:
    return all(n.status(pair.resource)["connection"] == "StandAlone" for n in (pair.a, pair.b))


def test_split_brain_is_refused_until_the_operator_discards_one_side(tmp_path):
    pair = Pair(tmp_path, proxy=True, tunables={"sync_timeout": 0.5})
    try:
        pair.start_in_sync()
        write_blocks(pair.a, pair, range(0, 4), b"0")          # replicated: on both
        # The link goes down and the DR site is promoted while a is still
        # Primary and writing: both sides move on from the same generation.
        pair.link.set(down=True)
        pair.wait(lambda: pair.a.status(pair.resource)["connection"] != "Connected", what="link loss")
        pair.b.ctl("primary", pair.resource, "--force")
        write_blocks(pair.a, pair, range(10, 20), b"A")
        write_blocks(pair.b, pair, range(15, 25), b"B")
        pair.a.ctl("secondary", pair.resource)                  # the operator stops the old side
        pair.link.set(down=False)
        pair.wait(lambda: standalone(pair), timeout=30, what="both StandAlone after the split brain")
        for node in (pair.a, pair.b):
            assert "strategy=split-brain" in node.log.read_text()
            why = node.status(pair.resource)["standalone"]
            assert why["kind"] == "split-brain" and "manual recovery needed" in why["reason"], why
        # Nothing moved: each side still has its own writes.
        assert read_block(pair.a, pair, 12) == b"A" * BLOCK
        assert read_block(pair.b, pair, 22) == b"B" * BLOCK

        bad = pair.a.ctl("resolve", pair.resource, "--discard", "nobody", check=False)
        assert not bad["ok"] and "must name one of its nodes" in bad["error"]
        primary = pair.b.ctl("resolve", pair.resource, "--discard", "b", check=False)
        assert not primary["ok"] and "demote it" in primary["error"]

        resynced = pair.b.status(pair.resource)["stats"]["resync_bytes"]
        for node in (pair.a, pair.b):                           # the same command on both nodes
            node.ctl("resolve", pair.resource, "--discard", "a")
        pair.wait(pair.in_sync, timeout=60, what="resync after the resolution")
        assert all(n.status(pair.resource)["standalone"] is None for n in (pair.a, pair.b))
        assert "split-brain-resolved" in pair.b.log.read_text()
        assert sha(pair.data_file(pair.a)) == sha(pair.data_file(pair.b))
        assert read_block(pair.a, pair, 12) == bytes(BLOCK)     # a's change since the split is gone
        assert read_block(pair.b, pair, 22) == b"B" * BLOCK
        assert read_block(pair.b, pair, 2) == b"0" * BLOCK      # the shared past is kept
        # A bitmap resync of both sides' changes (15 + 10 blocks at most), not a full one.
        moved = pair.b.status(pair.resource)["stats"]["resync_bytes"] - resynced
        assert 0 < moved <= 25 * BLOCK, moved
    finally:
        pair.stop()
