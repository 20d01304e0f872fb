"""kill -9 at random moments loses no acknowledged write (protocol C, RPO = 0).

A real NBD client writes random data to the Primary and remembers every
write the server acknowledged. We kill the Primary, the Secondary or both
at a random moment, promote the survivor, and read every block back: each
must hold its last acknowledged contents (or the contents of the one write
that was in flight when the kill came, which nobody was promised either way).

`make test` runs a few dozen iterations; `make soak` runs 500
(TANDEM_KILL_ITERATIONS).
"""

from __future__ import annotations

import hashlib
import os
import random
import time

import pytest

from .harness import Pair
from .workload import Writer, verify

ITERATIONS = int(os.environ.get("TANDEM_KILL_ITERATIONS", "24"))
SEED = int(os.environ.get("TANDEM_KILL_SEED", str(int(time.time()))))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("iteration", range(ITERATIONS))
def test_kill9_loses_no_acknowledged_write(tmp_path, iteration):
    rng = random.Random(SEED * 1000 + iteration)
    victim = ("primary", "secondary", "both")[iteration % 3]
    pair = Pair(tmp_path, size=16 << 20)
    try:
        pair.start_in_sync()
        export = f"{pair.resource}/disk0"
        writer = Writer(pair.a.nbd_socket(pair.resource), export, pair.size, rng)
        writer.start()
        time.sleep(rng.uniform(0.05, 1.5))
        if victim == "primary":
            pair.a.kill()
        elif victim == "secondary":
            pair.b.kill()
            time.sleep(rng.uniform(0.0, 0.5))       # the Primary keeps serving alone
        else:
            pair.a.kill()
            pair.b.kill()
        writer.stop.set()
        writer.join(30)
        assert not writer.is_alive()
        assert writer.count > 0, f"no write was acknowledged before the kill ({writer.error})"
        if victim == "secondary":
            assert writer.error is None, f"the Primary failed a write when its peer died: {writer.error}"
            checked = verify(pair.a.nbd_socket(pair.resource), export, writer)
            pair.b.start()
            pair.wait(pair.in_sync, timeout=60, what="resync of the restarted secondary")
            pair.a.ctl("secondary", pair.resource)
            pair.b.ctl("primary", pair.resource)
            verify(pair.b.nbd_socket(pair.resource), export, writer)
        else:
            if victim == "both":
                pair.b.start()                       # only the secondary's site comes back
            survivor = pair.b
            survivor.ctl("primary", pair.resource, "--force")
            checked = verify(survivor.nbd_socket(pair.resource), export, writer)
            # The old Primary comes back as a Secondary and is resynced from the survivor.
            pair.a.start()
            pair.wait(pair.in_sync, timeout=60, what="failback resync")
            assert sha(pair.data_file(pair.a)) == sha(pair.data_file(pair.b))
        assert checked == len(writer.acked)
    finally:
        pair.stop()
