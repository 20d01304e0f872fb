"""Concurrent large writes (over 64 KiB) end up byte for byte on both nodes.

Both daemons handle payloads over 64 KiB apart from small ones: the NBD
server receives each into a buffer of its own and hands that buffer on
without a copy, and the secondary receives each replicated one into a buffer
that it reuses for a later message of the same size once the write is done.
A buffer reused too early would leave the secondary (or the primary) with
another write's data while both report in sync; so several clients write
random data of a few repeating sizes at once, and both backing files must
equal what the clients wrote.
"""

from __future__ import annotations

import random
import threading

import pytest

from .harness import MiB, Pair
from .nbdclient import Client

WRITERS = 4
WRITES = 40
SIZES = (80 << 10, 256 << 10, 1 << 20)       # over the 64 KiB big-payload limit, repeated


def writer(sock: str, export: str, base: int, region: int, seed: int, model: bytearray,
           errors: list) -> None:
    rng = random.Random(seed)
    try:
        c = Client(sock, export)
        try:
            for _ in range(WRITES):
                size = rng.choice(SIZES)
                offset = base + rng.randrange(0, (region - size) // 4096) * 4096
                data = rng.randbytes(size)
                c.write(offset, data, fua=rng.random() < 0.1)
                model[offset:offset + size] = data      # acknowledged: this is what must be there
        finally:
            c.close()
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


@pytest.mark.parametrize("protocol", ["C", "A"])
def test_concurrent_large_writes_land_on_both_nodes(tmp_path, protocol):
    pair = Pair(tmp_path, size=32 * MiB, protocol=protocol)
    try:
        pair.start_in_sync()
        sock, export = pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0"
        model = bytearray(pair.data_file(pair.a).read_bytes())
        region = pair.size // WRITERS
        errors: list = []
        threads = [threading.Thread(target=writer, args=(sock, export, i * region, region, i, model, errors))
                   for i in range(WRITERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        pair.wait(pair.in_sync, timeout=60, what="in sync")
        a, b = pair.data_file(pair.a).read_bytes(), pair.data_file(pair.b).read_bytes()
        for name, got in (("primary", a), ("secondary", b)):
            bad = [mib for mib in range(pair.size // MiB)
                   if got[mib * MiB:(mib + 1) * MiB] != model[mib * MiB:(mib + 1) * MiB]]
            assert not bad, f"the {name} differs from what was written in MiB {bad[:8]}"
    finally:
        pair.stop()
