"""Reflink recovery points share the volume file's blocks, so on a full filesystem an
overwrite of a shared block fails with ENOSPC. The VM must not see that: the engine drops
the recovery points (loudly: an rp-dropped event and an error in the log) and the write
goes on. A real tandemd, its volume on a real XFS with reflink=1, filled to the last block.
"""

from __future__ import annotations

import errno
import os
import random

from .harness import MiB, Pair
from .nbdclient import Client

SIZE = 64 * MiB


def fill(directory: str) -> str:
    """Take every free block of the filesystem with one file; returns its path."""
    path = os.path.join(directory, "filler")
    chunk = bytes(1 * MiB)
    with open(path, "wb") as f:
        while True:
            try:
                f.write(chunk)
                f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
        for small in (64 * 1024, 4096):
            try:
                while True:
                    f.write(bytes(small))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        os.fsync(f.fileno())
    return path


def test_full_filesystem_drops_reflink_rps_and_the_write_goes_on(tmp_path, reflink_dir):
    pair = Pair(tmp_path, size=SIZE, rp_storage="reflink")
    data = pair.a.root / "data"
    data.rmdir()
    data.symlink_to(reflink_dir)          # only the volume (and its RP images) on the XFS
    filler = None
    try:
        pair.a.start()                    # no peer: a StandAlone Primary is enough here
        pair.a.ctl("primary", pair.resource, "--force")
        rng = random.Random(7)
        c = Client(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0")
        for off in range(0, SIZE, 4 * MiB):
            c.write(off, rng.randbytes(4 * MiB))
        c.flush()
        rp = pair.a.ctl("rp", "create", pair.resource)["recovery_point"]
        listed = pair.a.ctl("rp", "list", pair.resource)["recovery_points"]
        assert [m["id"] for m in listed] == [rp["id"]] and listed[0]["storage"] == ["reflink"]

        filler = fill(reflink_dir)
        new = rng.randbytes(8 * MiB)
        for off in range(0, len(new), 1 * MiB):
            c.write(16 * MiB + off, new[off:off + MiB], fua=True)     # would be ENOSPC
        c.flush()
        assert c.read(16 * MiB, len(new)) == new
        c.close()
        assert pair.a.ctl("rp", "list", pair.resource)["recovery_points"] == []
        assert "volume filesystem full" in pair.a.log.read_text()
    finally:
        pair.stop()
        if filler:
            os.unlink(filler)
