"""Failback after a disaster failover moves only what differs: the new Primary's changes plus
the old Primary's own unreplicated hot area (its activity log), never a full sync."""

from __future__ import annotations

import hashlib
import random
import re
import time

from .harness import Pair
from .workload import Writer


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_failback_moves_the_changed_blocks_and_the_old_primarys_hot_area(tmp_path):
    size = 256 << 20
    pair = Pair(tmp_path, size=size)
    try:
        pair.start_in_sync(timeout=180)
        export = f"{pair.resource}/disk0"
        # The VM writes to a 16 MiB hot region on site A, then site A crashes.
        w = Writer(pair.a.nbd_socket(pair.resource), export, 16 << 20, random.Random(1))
        w.start()
        time.sleep(1.0)
        pair.a.kill()
        w.finish()
        # Disaster failover to B; the VM runs there and changes another region.
        pair.b.ctl("primary", pair.resource, "--force")
        w = Writer(pair.b.nbd_socket(pair.resource), export, 8 << 20, random.Random(2), base=128 << 20)
        w.start()
        time.sleep(1.0)
        w.finish()
        changed = pair.b.status(pair.resource)["volumes"][0]["out_of_sync_bytes"]
        before = pair.b.status(pair.resource)["stats"]["resync_bytes"]
        # Site A returns: it comes back Secondary and is resynced from B.
        pair.a.start()
        pair.wait(pair.in_sync, timeout=120, what="failback resync")
        moved = pair.b.status(pair.resource)["stats"]["resync_bytes"] - before
        # A's activity log at the crash, turned into bitmap bits when it restarted.
        hot = int(re.findall(r"volume-attached .* al_bits=(\d+)", pair.a.log.read_text())[-1]) * 4096
        assert sha(pair.data_file(pair.a)) == sha(pair.data_file(pair.b))
        print(f"\nfailback: changed on B {changed} B, A's hot area {hot} B, moved {moved} B "
              f"of a {size} B volume")
        assert changed > 0 and hot > 0
        assert changed <= moved <= changed + hot, (changed, hot, moved)
        assert moved < size // 4                 # far from a full sync
    finally:
        pair.stop()
