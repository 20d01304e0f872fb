"""Recovery points on real daemons: consistent at one instant, kept through a resync, used for
failover from an interrupted resync, exported, cloned for drills, restored, kept across restarts."""

from __future__ import annotations

import hashlib
import random
import time

import pytest

from .harness import Pair
from .nbdclient import Client, NBDError
from .workload import BLOCK, Writer


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rp(node, pair: Pair, op: str, *args: str, check: bool = True) -> dict:
    return node.ctl("rp", op, pair.resource, *args, check=check)


def read_export(node, pair: Pair, name: str) -> bytes:
    c = Client(node.nbd_socket(pair.resource), name)
    try:
        return b"".join(c.read(off, 1 << 20) for off in range(0, pair.size, 1 << 20))
    finally:
        c.close()


def image_after(history, k: int, size: int) -> bytearray:
    img = bytearray(size)
    for first, data in history[:k]:
        img[first * BLOCK:first * BLOCK + len(data)] = data
    return img


def prefix_length(image: bytes, history, lo: int, hi: int, size: int) -> int | None:
    """The k in [lo, hi] for which image == the volume after the first k acknowledged writes."""
    img = image_after(history, lo, size)
    for k in range(lo, hi + 1):
        if img == image:
            return k
        if k < len(history):
            first, data = history[k]
            img[first * BLOCK:first * BLOCK + len(data)] = data
    return None


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path, proxy=True, tunables={"sync_timeout": 0.5})
    p.start_in_sync()
    yield p
    p.stop()


def test_rp_on_the_secondary_is_a_prefix_of_the_acknowledged_writes(pair):
    writer = Writer(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", pair.size,
                    random.Random(1), history=True)
    writer.start()
    time.sleep(1.0)
    lo = writer.count
    m = rp(pair.b, pair, "create", "--label", "test=prefix")["recovery_point"]
    hi = writer.count + 1
    time.sleep(0.5)
    writer.finish()
    assert writer.error is None
    assert m["consistent"] and m["reason"] == "manual" and m["labels"] == {"test": "prefix"}
    (name,) = rp(pair.b, pair, "export", m["id"])["exports"]
    image = read_export(pair.b, pair, name)
    k = prefix_length(image, writer.history, lo, hi, pair.size)
    assert k is not None, f"the RP is not the image after any of writes {lo}..{hi}"
    # Writes after the RP landed on the live volume, not in the RP.
    assert sha(pair.data_file(pair.b)) != hashlib.sha256(image).hexdigest()


def test_interrupted_resync_fails_over_to_the_last_consistent_rp(tmp_path):
    pair = Pair(tmp_path, proxy=True, tunables={"sync_timeout": 0.5, "resync_rate_max": "512KiB",
                                                "resync_rate_min": "256KiB"})
    try:
        pair.start_in_sync()
        w = Writer(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", pair.size, random.Random(2))
        w.start()
        time.sleep(0.5)
        w.finish()
        pair.wait(pair.in_sync, what="in sync")
        consistent_image = pair.data_file(pair.b).read_bytes()
        pair.link.set(down=True)
        pair.wait(lambda: pair.a.status(pair.resource)["degraded"], what="degradation")
        w2 = Writer(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", pair.size, random.Random(3))
        w2.start()
        time.sleep(1.0)
        w2.finish()
        pair.link.set(down=False)
        pair.wait(lambda: any(v["replication"] == "SyncTarget"
                              for v in pair.b.status(pair.resource)["volumes"]), what="resync started")
        time.sleep(0.5)
        pair.a.kill()                                           # the primary site dies mid-resync
        pair.wait(lambda: pair.b.status(pair.resource)["connection"] != "Connected", what="link loss")
        st = pair.b.status(pair.resource)
        assert st["volumes"][0]["disk"] == "Inconsistent"
        last = rp(pair.b, pair, "list")["recovery_points"][-1]
        assert last["consistent"] and last["reason"] in ("degraded", "pre-resync")
        refused = pair.b.ctl("primary", pair.resource, check=False)
        assert not refused["ok"] and last["id"] in refused["error"] and "--force" in refused["error"]
        pair.b.ctl("primary", pair.resource, "--force")
        assert read_export(pair.b, pair, f"{pair.resource}/disk0") == consistent_image
    finally:
        pair.stop()


def test_clone_export_restore_and_restart(pair):
    w = Writer(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", pair.size, random.Random(4))
    w.start()
    time.sleep(0.5)
    w.finish()
    pair.wait(pair.in_sync, what="in sync")
    at_rp = pair.data_file(pair.b).read_bytes()
    m = rp(pair.b, pair, "create")["recovery_point"]
    w = Writer(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", pair.size, random.Random(5))
    w.start()
    time.sleep(0.5)
    w.finish()
    pair.wait(pair.in_sync, what="in sync")
    live = sha(pair.data_file(pair.b))
    assert live == sha(pair.data_file(pair.a)) and live != hashlib.sha256(at_rp).hexdigest()

    # A drill clone: reads the RP, takes writes, never touches the replica.
    (clone,) = rp(pair.b, pair, "clone", m["id"], "drill")["exports"]
    assert read_export(pair.b, pair, clone) == at_rp
    c = Client(pair.b.nbd_socket(pair.resource), clone)
    try:
        c.write(0, b"drill" * 1000)
        c.flush()
        assert c.read(0, 5000) == b"drill" * 1000
    finally:
        c.close()
    assert sha(pair.data_file(pair.b)) == live
    # The RP itself is read-only and in use while cloned.
    (ro,) = rp(pair.b, pair, "export", m["id"])["exports"]
    c = Client(pair.b.nbd_socket(pair.resource), ro)
    try:
        with pytest.raises(NBDError):
            c.write(0, b"x" * 4096)
    finally:
        c.close()
    busy = rp(pair.b, pair, "delete", m["id"], check=False)
    assert not busy["ok"] and "in use" in busy["error"]
    # A drill tags the RP it used; labels change, the image does not.
    tagged = rp(pair.b, pair, "label", m["id"], "--label", "tested=2026-11-30T01:50Z", "--label", "drill=d1")
    assert tagged["recovery_point"]["labels"] == {"tested": "2026-11-30T01:50Z", "drill": "d1"}
    untagged = rp(pair.b, pair, "label", m["id"], "--label", "drill=")
    assert untagged["recovery_point"]["labels"] == {"tested": "2026-11-30T01:50Z"}
    bad = rp(pair.b, pair, "label", m["id"], "--label", "Bad Key=x", check=False)
    assert not bad["ok"] and "labels must map names" in bad["error"]

    # Survives a restart of the daemon, clone included.
    pair.b.stop()
    pair.b.start()
    (kept,) = rp(pair.b, pair, "list")["recovery_points"]
    assert kept["id"] == m["id"] and kept["labels"] == {"tested": "2026-11-30T01:50Z"}
    pair.wait(pair.in_sync, what="in sync after the restart")
    rp(pair.b, pair, "export", m["id"])
    assert read_export(pair.b, pair, f"{pair.resource}/disk0@{m['id']}") == at_rp
    c = Client(pair.b.nbd_socket(pair.resource), clone)
    try:
        assert c.read(0, 5000) == b"drill" * 1000
    finally:
        c.close()

    # Restore needs the node out of the replication first.
    refused = rp(pair.b, pair, "restore", m["id"], check=False)
    assert not refused["ok"] and "disconnect" in refused["error"]
    pair.b.ctl("disconnect", pair.resource)
    restored = rp(pair.b, pair, "restore", m["id"])
    assert restored["restored_bytes"] > 0
    assert pair.data_file(pair.b).read_bytes() == at_rp
    # Reconnected, the Primary resyncs the rolled-back blocks: identical again.
    pair.b.ctl("connect", pair.resource)
    pair.wait(pair.in_sync, timeout=60, what="resync after the restore")
    assert sha(pair.data_file(pair.b)) == sha(pair.data_file(pair.a)) == live

    rp(pair.b, pair, "clone-delete", "drill")
    rp(pair.b, pair, "unexport", m["id"])
    rp(pair.b, pair, "delete", m["id"])
    # Left: the automatic RP b took before the resync that undid the restore.
    assert [r["reason"] for r in rp(pair.b, pair, "list")["recovery_points"]] == ["pre-resync"]


def test_scheduled_rps_on_the_secondary_follow_rp_interval_and_rp_keep(tmp_path):
    pair = Pair(tmp_path, tunables={"rp_interval": 1.0, "rp_keep": 2})
    try:
        pair.start_in_sync()

        def scheduled(node) -> list[dict]:
            return [r for r in rp(node, pair, "list")["recovery_points"] if r["reason"] == "scheduled"]

        pair.wait(lambda: len(scheduled(pair.b)) == 2, timeout=30, what="two scheduled RPs")
        first = scheduled(pair.b)
        pair.wait(lambda: scheduled(pair.b)[0]["id"] != first[0]["id"], timeout=30, what="retention")
        assert len(scheduled(pair.b)) == 2                  # rp_keep: the oldest went
        assert all(r["consistent"] and r["role"] == "Secondary" for r in scheduled(pair.b))
        # a took some too while both were Secondary (before its promotion), none since.
        assert all(r["role"] == "Secondary" for r in scheduled(pair.a))
    finally:
        pair.stop()


@pytest.mark.parametrize("seed", range(3))
def test_kill9_of_the_secondary_leaves_its_rp_exact(tmp_path, seed):
    """kill -9 while the Secondary saves pre-images for an RP: after the restart the RP
    still reads exactly as the prefix of acknowledged writes it was taken at."""
    rng = random.Random(seed)
    pair = Pair(tmp_path)
    try:
        pair.start_in_sync()
        writer = Writer(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", pair.size,
                        random.Random(seed + 10), history=True)
        writer.start()
        time.sleep(rng.uniform(0.2, 0.8))
        lo = writer.count
        m = rp(pair.b, pair, "create")["recovery_point"]
        hi = writer.count + 1
        time.sleep(rng.uniform(0.05, 1.0))                  # writes after the RP: pre-images saved
        pair.b.kill()
        time.sleep(0.3)
        writer.finish()
        assert writer.error is None
        pair.b.start()
        (name,) = rp(pair.b, pair, "export", m["id"])["exports"]
        image = read_export(pair.b, pair, name)
        assert prefix_length(image, writer.history, lo, hi, pair.size) is not None, \
            f"after kill -9 the RP is not the image after any of writes {lo}..{hi}"
        pair.wait(pair.in_sync, timeout=60, what="resync of the restarted Secondary")
        assert sha(pair.data_file(pair.a)) == sha(pair.data_file(pair.b))
    finally:
        pair.stop()
