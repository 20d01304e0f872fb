"""A real NBD client that writes random blocks and keeps a journal of what was acknowledged.

Shared by the kill tests and the link-fault tests: 'acknowledged' is what the
server promised, so it is what every durability check compares against.
"""

from __future__ import annotations

import random
import threading
import time

from .nbdclient import Client

BLOCK = 4096


class Writer(threading.Thread):
    """Sequential writes (QD1), so 'acknowledged' is a clean prefix of what was sent.

    Records each write's latency as (start, seconds), for the stall checks.
    """

    def __init__(self, sock: str, export: str, size: int, rng: random.Random, *, pause: float = 0.0,
                 base: int = 0, history: bool = False):
        super().__init__(daemon=True)
        self.sock, self.export, self.size, self.rng = sock, export, size, rng
        self.pause = pause
        self.base = base // BLOCK             # first block of this writer's region (size bytes long)
        self.acked: dict[int, bytes] = {}              # block -> contents
        self.inflight: tuple[int, bytes] | None = None
        self.count = 0
        self.latencies: list[tuple[float, float]] = []
        self.extents: list[tuple[int, int]] = []       # (first block, blocks), parallel to latencies
        #: With history=True, every acknowledged write in order: (first block, data).
        self.history: list[tuple[int, bytes]] | None = [] if history else None
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            c = Client(self.sock, self.export, timeout=30)
        except OSError as e:
            self.error = e
            return
        try:
            while not self.stop.is_set():
                blocks = self.rng.choice((1, 1, 1, 4, 16))
                first = self.base + self.rng.randrange(0, self.size // BLOCK - blocks)
                data = self.rng.randbytes(blocks * BLOCK)
                fua = self.rng.random() < 0.1
                self.inflight = (first, data)
                t0 = time.monotonic()
                c.write(first * BLOCK, data, fua=fua)
                self.latencies.append((t0, time.monotonic() - t0))
                self.extents.append((first, blocks))
                if self.history is not None:
                    self.history.append((first, data))
                for i in range(blocks):
                    self.acked[first + i] = data[i * BLOCK:(i + 1) * BLOCK]
                self.inflight = None
                self.count += 1
                if self.pause:
                    time.sleep(self.pause)
        except (OSError, ConnectionError) as e:
            self.error = e
        finally:
            c.sock.close()

    def finish(self) -> None:
        self.stop.set()
        self.join(60)
        assert not self.is_alive(), "the writer is stuck"


def verify(sock: str, export: str, writer: Writer) -> int:
    """Every acknowledged block reads back as written (or as the one write in flight)."""
    c = Client(sock, export)
    inflight = {}
    if writer.inflight is not None:
        first, data = writer.inflight
        inflight = {first + i: data[i * BLOCK:(i + 1) * BLOCK] for i in range(len(data) // BLOCK)}
    bad = []
    try:
        for block, want in writer.acked.items():
            got = c.read(block * BLOCK, BLOCK)
            if got != want and got != inflight.get(block):
                bad.append(block)
    finally:
        c.close()
    assert not bad, f"{len(bad)} acknowledged blocks lost or wrong, e.g. {bad[:5]}"
    return len(writer.acked)
