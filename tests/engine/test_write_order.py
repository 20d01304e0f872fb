"""Concurrent overlapping writes end up identical on both nodes.

Two overlapping writes in flight at once (a FUA one through the thread pool,
a buffered one inline) could land locally in the opposite order from the one
in which they were sent to the peer, which applies them in send order: the
nodes would silently keep different data while reporting in sync.
"""

from __future__ import annotations

import hashlib
import threading

from .harness import Pair
from .nbdclient import Client

REGION = 32 << 10
REGIONS = 128
ROUNDS = 2


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def racer(sock: str, export: str, tag: int, fua: bool, start: threading.Barrier, errors: list) -> None:
    """Write every region in turn, ROUNDS times, in step with the other racers."""
    try:
        c = Client(sock, export)
        try:
            for rnd in range(ROUNDS):
                for r in range(REGIONS):
                    start.wait(10)
                    c.write(r * REGION, bytes([tag, rnd, r % 256, 0]) * (REGION // 4), fua=fua)
        finally:
            c.close()
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def test_racing_overlapping_writes_leave_identical_nodes(tmp_path):
    pair = Pair(tmp_path)
    try:
        pair.start_in_sync()
        sock, export = pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0"
        errors: list = []
        start = threading.Barrier(2)
        threads = [threading.Thread(target=racer, args=(sock, export, tag, fua, start, errors))
                   for tag, fua in ((1, True), (2, False))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        pair.wait(pair.in_sync, timeout=60, what="in sync")
        a, b = pair.data_file(pair.a).read_bytes(), pair.data_file(pair.b).read_bytes()
        differ = [r for r in range(REGIONS)
                  if a[r * REGION:(r + 1) * REGION] != b[r * REGION:(r + 1) * REGION]]
        assert not differ, f"{len(differ)} regions differ between the nodes, e.g. {differ[:5]}"
    finally:
        pair.stop()
