"""Concurrent large writes (over 64 KiB) end up byte for byte on both nodes.

Both daemons handle payloads over 64 KiB apart from small ones: the NBD
server receives each into a buffer of its own and hands that buffer on
without a copy, and the secondary receives each replicated one into a buffer
that it reuses for a later message of the same size once the write is done.
A buffer reused too early would leave the secondary (or the primary) with
another write's data while both report in sync; so several clients write
random data of a few repeating sizes at once, several in flight on each
connection, and both backing files must equal what the clients wrote.
"""

from __future__ import annotations

import random
import struct
import threading

import pytest

from .harness import MiB, Pair
from .nbdclient import CMD_WRITE, FLAG_FUA, Client

WRITERS = 4
BATCHES = 6
DEPTH = 8                                    # writes in flight per connection
SIZES = (80 << 10, 256 << 10, 1 << 20)       # over the 64 KiB big-payload limit, repeated
REQUEST = struct.Struct(">IHHQQI")           # NBD request: magic, flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")                # simple reply: magic, error, handle


def writer(sock: str, export: str, base: int, region: int, seed: int, model: bytearray,
           errors: list) -> None:
    """DEPTH pipelined writes at a time, to distinct 1 MiB slots of this writer's region."""
    rng = random.Random(seed)
    try:
        c = Client(sock, export)
        try:
            for batch in range(BATCHES):
                writes = []
                for slot in rng.sample(range(region // MiB), DEPTH):
                    size = rng.choice(SIZES)
                    offset = base + slot * MiB + rng.randrange(0, (MiB - size) // 4096 + 1) * 4096
                    writes.append((offset, rng.randbytes(size), rng.random() < 0.1))
                c.sock.sendall(b"".join(
                    REQUEST.pack(0x25609513, FLAG_FUA if fua else 0, CMD_WRITE, batch * DEPTH + i, offset,
                                 len(data)) + data
                    for i, (offset, data, fua) in enumerate(writes)))
                handles = set()
                for _ in writes:
                    magic, error, handle = REPLY.unpack(c._recv(REPLY.size))
                    assert magic == 0x67446698 and not error, (magic, error)
                    handles.add(handle)
                assert handles == {batch * DEPTH + i for i in range(DEPTH)}
                for offset, data, _ in writes:
                    model[offset:offset + len(data)] = data     # acknowledged: what must be there
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
