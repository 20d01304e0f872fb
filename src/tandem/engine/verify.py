"""Online verify: compare both nodes' data block by block while the VM runs, as
DRBD's `drbdadm verify` does, and optionally resync what differs.

The initiator (the Primary; either node when neither is Primary) walks each
volume in requests of up to wire.VERIFY_MAX bytes, at most WINDOW in flight,
paced like a resync (ResyncPacer: resync_rate_max, backing off to
resync_rate_min while application writes suffer). Per request, under a
hold of the range, it reads the range, hashes each bitmap block
(blake2b, 16 bytes, in the I/O pool) and sends VERIFY_REQ with the digests.
The peer handles VERIFY_REQ in its apply order, like FLUSH and STATE: behind
every write received before it. It reads the same range, hashes it and
answers VERIFY_REPLY, a bitmask of the blocks whose digests differ.

No false positives under application writes: a write holds its range shared
from before its DATA is sent until its local write is done. So a write to
the range either finished before the hold (its DATA left before the
VERIFY_REQ, and the peer applies in arrival order, so it reads the new data
too) or starts after the read (its DATA follows the request, so the peer
reads before applying it). Both sides hash the same version of the range.

With resync, the mismatching blocks go into the initiator's bitmap (persisted)
and the connection is dropped: the reconnect handshake then resyncs exactly
those blocks, as after any reconnect (same generation with bits: the Primary
is the source, rule primary-self; with neither Primary the tie-break rule
picks the source; if the Primary wrote meanwhile, rule bitmap-self).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from hashlib import blake2b

from . import wire
from .bitmap import Bitmap
from .pacer import TICK as PACER_TICK
from .pacer import ResyncPacer
from .resource import CONNECTED, ESTABLISHED, UNLIMITED_RATE, PeerGone, RoleError
from .volume import run_io
from .waiters import wait, wake_all

log = logging.getLogger("tandem.engine.verify")

#: Requests in flight at once (the peer treats more as a protocol error).
WINDOW = 4
#: Out-of-sync ranges listed per volume in a result (all are counted).
MAX_RANGES = 1000
#: An unanswered request ends the verify after this long (the link itself is
#: watched by the keep-alive; this catches a peer that answers pings only).
REPLY_TIMEOUT = 120.0


class VerifyError(Exception):
    """A verify that could not finish (the link went away, ...); carries what it checked."""

    def __init__(self, msg: str, volumes: list[dict]):
        super().__init__(msg)
        self.volumes = volumes


class _Stopped(Exception):
    pass


def _read(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:                    # sparse tail of a file: zeros, as Volume.pread
            return data + bytes(length - len(data))
        data += more
    return data


def block_digests(fd: int, offset: int, length: int, block: int) -> bytes:
    """Read a range and hash each block (the last may be partial). Runs in the I/O pool."""
    view = memoryview(_read(fd, offset, length))
    return b"".join(blake2b(view[i:i + block], digest_size=wire.VERIFY_DIGEST).digest()
                    for i in range(0, length, block))


def mismatch_mask(fd: int, offset: int, length: int, block: int, theirs: bytes) -> bytes:
    """Bit i set: block i of the range differs from the digest the peer sent."""
    mine = block_digests(fd, offset, length, block)
    n = wire.verify_blocks(length, block)
    mask = 0
    if mine != theirs:
        d = wire.VERIFY_DIGEST
        for i in range(n):
            if mine[i * d:(i + 1) * d] != theirs[i * d:(i + 1) * d]:
                mask |= 1 << i
    return mask.to_bytes((n + 7) // 8, "little")


class _VolumeRun:
    """One volume's progress and findings during a verify."""

    def __init__(self, number: int, size: int, block: int):
        self.number, self.size, self.block = number, size, block
        self.checked = 0
        self.found: Bitmap | None = None       # mismatching blocks; allocated at the first one
        self.started: float | None = None
        self.seconds = 0.0

    def record(self, offset: int, mask: int) -> None:
        if self.found is None:
            self.found = Bitmap(self.size, self.block)
        while mask:                              # one set_range per run of set bits
            first = (mask & -mask).bit_length() - 1
            rest = mask >> first
            n = ((rest + 1) & ~rest).bit_length() - 1          # trailing ones
            self.found.set_range(offset + first * self.block, n * self.block)
            mask &= ~(((1 << n) - 1) << first)

    @property
    def out_of_sync_bytes(self) -> int:
        return self.found.out_of_sync_bytes if self.found is not None else 0

    def result(self) -> dict:
        ranges = list(itertools.islice(self.found.ranges(), MAX_RANGES + 1)) if self.found else []
        seconds = self.seconds if self.seconds or self.started is None else time.monotonic() - self.started
        return {"volume": self.number, "checked_bytes": self.checked,
                "out_of_sync_bytes": self.out_of_sync_bytes,
                "ranges": [list(r) for r in ranges[:MAX_RANGES]],
                "ranges_truncated": len(ranges) > MAX_RANGES, "seconds": round(seconds, 3)}


class Verifier:
    """Online verify for one Resource: the initiator's run and the peer's answers."""

    def __init__(self, res):
        self.res = res
        self._runs: list[_VolumeRun] | None = None     # set while this node runs a verify
        self._inflight: dict[int, tuple[int, int, int, int]] = {}   # id -> (volume, offset, length, block)
        self._abandoned: dict[int, tuple[int, int, int, int]] = {}  # sent by a verify that stopped early
        self._next_id = 0
        self._stop: str | None = None
        self._waiters: list[asyncio.Future] = []
        self._serving = 0          # the peer's requests received and not yet answered

    # -- initiator ---------------------------------------------------------------------

    async def run(self, resync: bool = False) -> dict:
        res = self.res
        self._check_start()
        runs = [_VolumeRun(vs.vol.number, vs.vol.size, vs.vol.bitmap.block_size) for vs in res.vols]
        self._runs, self._stop = runs, None
        res._event("verify-started", volumes=[r.number for r in runs], resync=resync)
        t0 = time.monotonic()
        try:
            for run in runs:
                await self._verify_volume(run)
        except Exception as e:  # noqa: BLE001 - every way out ends in a result
            if isinstance(e, (_Stopped, PeerGone)):
                reason = self._stop or "the link went away"
            else:                         # a read error, or a bug: report it, never hang
                log.exception("verify failed resource=%s", res.name)
                reason = f"failed: {e!r}"
            volumes = [r.result() for r in runs]
            res._event("verify-finished", error=reason, seconds=round(time.monotonic() - t0, 3),
                       **_counts(volumes))
            raise VerifyError(f"{res.name}: verify stopped: {reason}", volumes) from None
        finally:
            self._abandoned.update(self._inflight)      # their answers are moot now
            self._inflight.clear()
            self._runs = None
        volumes = [r.result() for r in runs]
        oos = sum(v["out_of_sync_bytes"] for v in volumes)
        resynced = False
        if resync and oos:
            resynced = await self._resync(runs, oos)
        res._event("verify-finished", seconds=round(time.monotonic() - t0, 3), resync=resynced,
                   **_counts(volumes))
        return {"volumes": volumes, "out_of_sync_bytes": oos, "resync_requested": resync,
                "resync_started": resynced, "seconds": round(time.monotonic() - t0, 3)}

    def _check_start(self) -> None:
        res = self.res
        if self._runs is not None:
            raise RoleError(f"{res.name}: a verify is already running")
        if res.conn != CONNECTED or res._link is None:
            raise RoleError(f"{res.name}: the peer is not connected (verify compares with the peer)")
        if res.role != "Primary" and res.peer_role == "Primary":
            raise RoleError(f"{res.name}: the peer is Primary; run verify there")
        for vs in res.vols:
            if vs.repl != ESTABLISHED:
                raise RoleError(f"{res.name}: volume {vs.vol.number} is {vs.repl}; verify needs every "
                                "volume Established (wait for the resync to finish)")

    def _check(self, vs) -> None:
        """Still fine to go on? Raises _Stopped otherwise."""
        res = self.res
        if self._stop is None:
            if res.conn != CONNECTED or res._link is None:
                self._stop = "the link went away"
            elif res.role != "Primary" and res.peer_role == "Primary":
                self._stop = "the peer became Primary"
            elif vs.repl != ESTABLISHED:
                self._stop = f"volume {vs.vol.number} is {vs.repl}"
        if self._stop is not None:
            raise _Stopped(self._stop)

    async def _verify_volume(self, run: _VolumeRun) -> None:
        res = self.res
        vs = res.vols[run.number]
        vol, lock, block = vs.vol, res.locks[run.number], run.block
        t = res.cfg.tunables
        pacer = ResyncPacer(t.resync_rate_min, t.resync_rate_max or UNLIMITED_RATE, vs.latency_ewma_us)
        rate = pacer.rate
        seen = (res._fg_latency_us, res._fg_writes)
        run.started = next_tick = next_send = time.monotonic()
        offset = 0
        while offset < vol.size:
            # Every request but the last is a whole number of blocks (a block is at most 1 MiB).
            length = min(wire.VERIFY_MAX, vol.size - offset)
            self._check(vs)
            while len(self._inflight) >= WINDOW:
                await self._wait_reply(vs)
            async with lock.hold(offset, length):
                self._check(vs)
                digests = await run_io(block_digests, vol.fd, offset, length, block)
                self._check(vs)
                self._next_id += 1
                self._inflight[self._next_id] = (run.number, offset, length, block)
                res._send(wire.encode_verify_req(self._next_id, run.number, offset, length, block, digests))
            offset += length
            now = time.monotonic()
            if now >= next_tick:
                now_seen = (res._fg_latency_us, res._fg_writes)
                rate = pacer.tick(now_seen[0] - seen[0], now_seen[1] - seen[1])
                seen, next_tick = now_seen, now + PACER_TICK
            next_send = max(next_send, now - PACER_TICK) + length / rate
            if next_send > now:
                await asyncio.sleep(next_send - now)
        while self._inflight:
            await self._wait_reply(vs)
        run.seconds = time.monotonic() - run.started

    async def _wait_reply(self, vs) -> None:
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                await wait(self._waiters)
        except TimeoutError:
            self._stop = self._stop or f"the peer did not answer a verify request within {REPLY_TIMEOUT:g}s"
        self._check(vs)

    def on_reply(self, msg: wire.Message) -> None:
        """VERIFY_REPLY, handled on arrival (from Resource._on_messages)."""
        key = (msg.volume, msg.offset, msg.length, msg.block_size)
        req = self._inflight.get(msg.seq)
        if req is None:
            if self._abandoned.get(msg.seq) == key:
                del self._abandoned[msg.seq]
                return
            raise wire.ProtocolError(f"VERIFY_REPLY {msg.seq} for a request not in flight")
        if req != key:
            raise wire.ProtocolError(f"VERIFY_REPLY {msg.seq} does not match its request")
        del self._inflight[msg.seq]
        run = self._runs[msg.volume]
        mask = int.from_bytes(msg.data, "little")
        if mask:
            run.record(msg.offset, mask)
        run.checked += msg.length
        wake_all(self._waiters)

    async def _resync(self, runs: list[_VolumeRun], oos: int) -> bool:
        """Put the mismatching blocks in the bitmap (persisted), then reconnect so the
        handshake resyncs them. False if the link is already gone (the bits stay set,
        so the next connection resyncs them anyway)."""
        res = self.res
        for run in runs:
            if run.found is not None and run.found.count:
                vol = res.vols[run.number].vol
                vol.bitmap.merge(run.found)
                await asyncio.to_thread(vol.md.write_bitmap_pages)
        if res.role == "Primary" and res._exposed_since is None:
            res._exposed_since = time.time()
        if res.conn != CONNECTED or res._link is None:
            return False
        res._drop_connection(f"verify found {oos} out-of-sync bytes; reconnecting to resync them",
                             kind="verify-resync")
        return True

    # -- peer side ---------------------------------------------------------------------

    def check_request(self, msg: wire.Message) -> None:
        """VERIFY_REQ on arrival: validate it; the applier answers it in order (serve)."""
        res = self.res
        if res.role == "Primary":
            raise wire.ProtocolError("VERIFY_REQ sent to a Primary")
        wire.check_range(msg, res._sizes)
        if msg.length % msg.block_size and msg.offset + msg.length != res._sizes[msg.volume]:
            raise wire.ProtocolError(f"VERIFY_REQ: length {msg.length} is not a multiple of the "
                                     f"block size {msg.block_size} and does not end the volume")
        self._serving += 1
        if self._serving > WINDOW:
            raise wire.ProtocolError(f"more than {WINDOW} VERIFY_REQ in flight")

    async def serve(self, msg: wire.Message) -> None:
        """Answer a VERIFY_REQ, in apply order: every write received before it is applied."""
        res = self.res
        vs = res.vols[msg.volume]
        if res.role == "Primary":           # promoted while it waited in the queue
            raise wire.ProtocolError("VERIFY_REQ sent to a Primary")
        if vs.repl != ESTABLISHED:
            raise wire.ProtocolError(f"VERIFY_REQ while volume {msg.volume} is {vs.repl}")
        mask = await run_io(mismatch_mask, vs.vol.fd, msg.offset, msg.length, msg.block_size,
                            bytes(msg.data))
        self._serving = max(0, self._serving - 1)
        res._send(wire.encode_verify_reply(msg.seq, msg.volume, msg.offset, msg.length,
                                           msg.block_size, mask))

    # -- hooks -------------------------------------------------------------------------

    def connection_lost(self, reason: str) -> None:
        """From Resource._drop_connection: a running verify stops with an error."""
        if self._runs is not None and self._stop is None:
            self._stop = f"the connection was dropped: {reason}"
        self._inflight.clear()
        self._abandoned.clear()
        self._serving = 0
        wake_all(self._waiters)

    def progress(self, number: int) -> dict:
        """For status: how far a running verify got on this volume."""
        if self._runs is None:
            return {}
        run = self._runs[number]
        return {"verify_percent": round(100.0 * run.checked / run.size, 1)}


def _counts(volumes: list[dict]) -> dict:
    return {"checked_bytes": sum(v["checked_bytes"] for v in volumes),
            "out_of_sync_bytes": sum(v["out_of_sync_bytes"] for v in volumes),
            "volumes": [{k: v[k] for k in ("volume", "checked_bytes", "out_of_sync_bytes")}
                        for v in volumes]}
