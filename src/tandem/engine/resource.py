"""A resource: one VM's volumes on this node, and the link to the peer node.

State follows DRBD's model (role, connection, disk, replication; see
drbd-semantics.md §1). The write path on a Primary, per application write:

  1. hold the range (resync must not interleave) and the AL extent;
  2. if the peer is replicating, queue DATA to it; otherwise make sure the
     data generation has moved on (new current GI, persisted) and set the
     bits for the range;
  3. write locally (with fdatasync when FUA) while the peer does the same;
  4. complete to the client when the local write is done and, in protocol
     C, the peer acknowledged; in protocol A when the data is queued;
  5. settle: release the AL extent when the peer acknowledged, or when the
     block was recorded in the bitmap because the link went away.

The secondary applies DATA strictly in arrival order, so it never holds a
later write without every earlier one (write-order fidelity by construction;
see docs/engine.md for why this replaces DRBD's epochs for now).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import random
import secrets
import time
from dataclasses import dataclass, field

from . import auth, handshake, security, wire
from .link import BIG as BIG_PAYLOAD
from .link import Link, connect, listen
from .metadata import (
    CONSISTENT,
    CRASHED_PRIMARY,
    GI_JUST_CREATED,
    HISTORY,
    PRIMARY,
    WAS_UP_TO_DATE,
)
from .pacer import TICK as PACER_TICK
from .pacer import ResyncPacer
from .rangelock import RangeLock
from .recovery import (
    CENTER,
    DEGRADED,
    MANUAL,
    PRE_RESYNC,
    SCHEDULED,
    SPLIT_BRAIN,
    RecoveryPointError,
    RecoveryPoints,
)
from .rpstore import RPStoreError
from .volume import APPLY_INLINE_MAX, INLINE, Volume, run_io, write_batch
from .waiters import wait, wake_all
from .wire import T

log = logging.getLogger("tandem.engine.resource")

# Connection states (DRBD names).
STANDALONE, CONNECTING, CONNECTED = "StandAlone", "Connecting", "Connected"
# Disk states.
INCONSISTENT, OUTDATED, CONSISTENT_S, UPTODATE, DUNKNOWN = (
    "Inconsistent", "Outdated", "Consistent", "UpToDate", "DUnknown")
# Replication states.
OFF, ESTABLISHED, SYNC_SOURCE, SYNC_TARGET = "Off", "Established", "SyncSource", "SyncTarget"

RESYNC_BLOCK = 1 << 20          # bytes per resync request
RESYNC_WINDOW = 8               # resync blocks in flight
APPLY_QUEUE_BYTES = 64 << 20    # received but not yet applied, on the secondary
APPLY_BATCH = 256               # messages applied per thread hop at most
UNLIMITED_RATE = 64 << 30       # resync_rate_max = 0: the pacer still needs a ceiling


class RoleError(Exception):
    """A role change the engine refuses; the message says why (shown to operators)."""


class StartError(Exception):
    """A resource could not start; the message names the resource and the cause."""


class PeerGone(Exception):
    """The write could not be replicated: the link went away."""


@dataclass
class VolumeState:
    vol: Volume
    disk: str = INCONSISTENT
    peer_disk: str = DUNKNOWN
    repl: str = OFF
    sync_total: int = 0          # bits to sync when the sync started
    sync_started: float = 0.0
    rs_inflight: set = field(default_factory=set)
    latency_ewma_us: float = 0.0
    resync_rate: float = 0.0     # bytes/s the pacer allows right now (sync source)


class Resource:
    def __init__(self, cfg, *, state_dir: str, emit=None):
        self.cfg = cfg
        self.name = cfg.name
        self.state_dir = state_dir
        self.role = "Secondary"
        self.conn = STANDALONE
        #: Why the resource went StandAlone ({"kind", "reason", "since"}), for status; None otherwise.
        self.standalone: dict | None = None
        self.peer_role = "Unknown"
        self.vols: list[VolumeState] = []
        self.locks: list[RangeLock] = []
        self._emit = emit or (lambda event: None)
        self._link: Link | None = None         # set while connected
        self._session_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None
        self._seq = 0
        # Replicated writes not yet acknowledged, in seq order: (seq, fut, vol, off, len, sent).
        self._pending: collections.deque[tuple[int, asyncio.Future, int, int, int, float]] = \
            collections.deque()
        self._inflight_bytes = 0
        self._flushes: dict[int, tuple[asyncio.Future, float]] = {}   # seq -> (fut, sent), in seq order
        # One timer for the oldest unacknowledged write or flush (see _watchdog).
        self._watchdog_handle: asyncio.TimerHandle | None = None
        #: Why and since when (wall clock) the primary runs without its peer; None when replicating.
        self.degraded: dict | None = None
        self._lost_link = False        # a connection was lost since start: probe the next one
        # Wall-clock time of the oldest acknowledged write the peer does not have.
        self._exposed_since: float | None = None
        self._fg_latency_us = 0.0          # cumulative application write latency ...
        self._fg_writes = 0                # ... and count (the pacer takes differences)
        self.rps: RecoveryPoints | None = None
        self._dirty_since_rp = True        # a write landed since the newest RP (skip identical RPs)
        self._connect_task: asyncio.Task | None = None
        self._applier: asyncio.Task | None = None  # the Secondary's ordered apply task, while connected
        #: After a split brain: the node whose changes the operator chose to discard.
        self._discard: str | None = None
        self._pings: dict[int, asyncio.Future] = {}
        self._gi_lock = asyncio.Lock()
        self._stopping = False
        self._al_settled = 0.0
        # Writes pause while a connection is being negotiated: a write must
        # either be replicated or be in the bitmap the handshake looks at.
        self._io_open = asyncio.Event()
        self._io_open.set()
        self._io_pauses = 0               # handshake and RP creation may pause writes at once
        self._writes_deciding = 0
        self._writes_idle: list[asyncio.Future] = []
        self._accepted: asyncio.Queue = asyncio.Queue(maxsize=4)
        self._rp_drop_lock = asyncio.Lock()
        self.stats = {"writes": 0, "reads": 0, "flushes": 0, "resync_bytes": 0,
                      "connects": 0, "protocol_errors": 0, "auth_errors": 0}
        from .verify import Verifier  # here: verify.py imports this module
        self._verifier = Verifier(self)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the volumes, the RP store and the link. SecurityError (bad TLS files or
        secret) before anything is opened; StartError for anything else (a missing
        backing directory, bad metadata, a port in use), after closing what was opened."""
        self.security = security.load(self.cfg)     # SecurityError: the resource does not start
        try:
            await self._start()
        except Exception as e:
            with contextlib.suppress(Exception):
                await self.stop()
            raise StartError(f"resource {self.name!r} did not start: {e}") from e

    async def _start(self) -> None:
        t = self.cfg.tunables
        for vcfg in self.cfg.volumes:
            md_path = vcfg.metadata or os.path.join(self.state_dir, self.name, f"vol{vcfg.number}.md")
            vol, recovery = Volume.open(vcfg.number, vcfg.path, vcfg.size, md_path,
                                        bitmap_block_size=t.bitmap_block_size,
                                        al_extents=t.al_extents)
            vs = VolumeState(vol)
            vs.disk = UPTODATE if vol.md.sb.has(CONSISTENT) and vol.md.sb.has(WAS_UP_TO_DATE) \
                else (CONSISTENT_S if vol.md.sb.has(CONSISTENT) else INCONSISTENT)
            self.vols.append(vs)
            self.locks.append(RangeLock())
            self._event("volume-attached", volume=vcfg.number, disk=vs.disk, **recovery)
        # A restarted node always comes back as Secondary, as DRBD does.
        for vs in self.vols:
            vs.vol.md.set_flags(clear=PRIMARY)
        if any(vs.vol.bitmap.count for vs in self.vols):
            self._exposed_since = time.time()     # the true age died with the last process
        self.rps = await asyncio.to_thread(
            RecoveryPoints.open, os.path.join(self.state_dir, self.name, "rp"), self.cfg.local.name,
            [vs.vol for vs in self.vols], storage=self.cfg.rp_storage)
        self.rps.name_clone_exports([v.export for v in self.cfg.volumes])
        self.conn = CONNECTING
        if not self._dialer:
            # Only the side that waits for the peer listens.
            local = self.cfg.local
            self._server = await listen(local.host, local.port, self._on_accept, self._link_failed,
                                        lambda: self.security.server_tls)
        self._connect_task = self._spawn(self._connect_loop(), "connect")
        self._spawn(self._rp_schedule_loop(), "rp-schedule")
        self._event("started", conn=self.conn, recovery_points=len(self.rps.manifests))

    async def stop(self) -> None:
        self._stopping = True
        if self._server:
            self._server.close()
        self._drop_connection("resource stopping")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.rps is not None:
            self.rps.close()
        for vs in self.vols:
            if self.role == "Primary":
                vs.vol.md.set_flags(clear=PRIMARY)
            await vs.vol.close(clean=True)
        self.conn = STANDALONE
        self._event("stopped")

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _event(self, event: str, **detail) -> None:
        record = {"ts": round(time.time(), 6), "resource": self.name, "event": event, **detail}
        log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in record.items()
                                          if k not in ("ts", "event")))
        self._emit(record)

    # -- roles -----------------------------------------------------------------

    async def promote(self, force: bool = False) -> None:
        if self.role == "Primary":
            return
        if self.conn == CONNECTED and self.peer_role == "Primary":
            raise RoleError(f"{self.name}: the peer is Primary; demote it first "
                            "(two primaries are never allowed while connected)")
        rp = None if self._consistent() or self.conn == CONNECTED else self.rps.last_consistent()
        if rp is not None and not force:
            age = time.time() - rp.created
            raise RoleError(f"{self.name}: a volume is Inconsistent (a resync was interrupted); the last "
                            f"consistent recovery point is {rp.id}, taken {age:.0f}s ago ({rp.reason}). "
                            "Use --force to fail over to it")
        for vs in self.vols:
            if vs.disk == INCONSISTENT and not force:
                raise RoleError(f"{self.name}: volume {vs.vol.number} is Inconsistent; "
                                "refusing to promote (use --force only if you accept its data)")
            if vs.repl == SYNC_TARGET:
                raise RoleError(f"{self.name}: volume {vs.vol.number} is being resynced from the peer")
            if self.conn != CONNECTED and vs.disk != UPTODATE and not force:
                raise RoleError(f"{self.name}: volume {vs.vol.number} is {vs.disk} and the peer is "
                                "not connected; use --force for a disaster failover")
        if self.conn != CONNECTED and not force:
            raise RoleError(f"{self.name}: the peer is not connected, so its role is unknown; "
                            "use --force for a disaster failover")
        if rp is not None:
            # Failover from an interrupted resync: roll back to the last consistent image.
            await self._restore(rp)
            self._event("failover-from-rp", id=rp.id, age_seconds=round(time.time() - rp.created, 1))
        for vs in self.vols:
            sb = vs.vol.md.sb
            if force and (sb.current_gi == GI_JUST_CREATED or vs.disk != UPTODATE):
                # Forced: this node's data becomes the reference from now on.
                await self._new_generation(vs, forced=True)
            vs.vol.md.set_flags(set_=PRIMARY | CONSISTENT | WAS_UP_TO_DATE, clear=CRASHED_PRIMARY)
            vs.disk = UPTODATE
        self.role = "Primary"
        self._event("role-changed", role=self.role, force=force)
        if self.conn != CONNECTED:
            self._set_degraded("peer-not-connected", "promoted while the peer is not connected")
        if self.conn == CONNECTED:
            self._send(wire.encode_json(T.STATE, {"role": self.role}))
            if force:
                # Our data is the reference now: reconnect so the handshake resyncs the peer.
                self._drop_connection("forced promotion")

    async def demote(self) -> None:
        if self.role == "Secondary":
            return
        inflight = len(self._pending)
        if inflight:
            raise RoleError(f"{self.name}: {inflight} writes are still in flight")
        for vs in self.vols:
            await vs.vol.flush()
            vs.vol.md.set_flags(clear=PRIMARY)
        self.role = "Secondary"
        self._event("role-changed", role=self.role)
        if self.conn == CONNECTED:
            self._send(wire.encode_json(T.STATE, {"role": self.role}))

    async def resolve(self, discard: str) -> None:
        """After a split brain: throw away `discard`'s changes and reconnect.

        Run on either node; the choice travels in the handshake, and only a
        real split brain uses it. The discarded node must not be Primary.
        """
        nodes = (self.cfg.local.name, self.cfg.peer.name)
        if discard not in nodes:
            raise RoleError(f"{self.name}: --discard must name one of its nodes: {', '.join(nodes)}")
        if discard == self.cfg.local.name and self.role == "Primary":
            raise RoleError(f"{self.name}: this node is Primary; demote it before discarding its data")
        self._discard = discard
        self._event("resolve-requested", discard=discard)
        self.connect()

    async def verify(self, resync: bool = False) -> dict:
        """Online verify against the peer (verify.py); resync=True resyncs what differs."""
        return await self._verifier.run(resync)

    # -- application I/O (the NBD exports call these) --------------------------------

    def replicating(self, vs: VolumeState) -> bool:
        return (self.conn == CONNECTED and self._link is not None
                and vs.repl in (ESTABLISHED, SYNC_SOURCE))

    async def read(self, number: int, offset: int, length: int) -> bytes:
        self.stats["reads"] += 1
        return await self.vols[number].vol.pread(offset, length)

    async def write(self, number: int, offset: int, data: bytes, fua: bool) -> None:
        # Every step has a synchronous fast path: a write that waits for nothing
        # but the disk (and, in protocol C, the peer) never yields elsewhere.
        if self.role != "Primary":
            raise PermissionError("not Primary")
        vs = self.vols[number]
        t0 = time.monotonic()
        length = len(data)
        al = vs.vol.al
        if not al.try_acquire(offset, length):
            await al.acquire(offset, length)
        fut = None
        try:
            while not self._io_open.is_set():
                await self._io_open.wait()
            # No await between the check above and this: the handshake waits for it.
            self._writes_deciding += 1
            try:
                lock = self.locks[number]
                # Overlapping writes exclude each other until written locally, so
                # both nodes apply them in the same (send) order; see rangelock.py.
                hold = lock.try_acquire(offset, length) or await lock.acquire(offset, length)
                try:
                    if self.replicating(vs):
                        self._seq += 1
                        fut = asyncio.get_running_loop().create_future()
                        self._pending.append((self._seq, fut, number, offset, length, time.monotonic()))
                        self._inflight_bytes += length
                        # A lone write goes on the wire now, before the local write, not after it.
                        self._send(wire.encode_data(number, self._seq, offset, data, fua),
                                   now=len(self._pending) == 1)
                        if self._watchdog_handle is None:
                            self._arm_watchdog()
                        fill = self.cfg.tunables.congestion_fill
                        if fill and self._inflight_bytes > fill:
                            # Completes this write and the pending ones locally (see _drop_connection).
                            self._degrade("congestion", f"{self._inflight_bytes} bytes in flight "
                                                        f"exceed congestion_fill ({fill})")
                    else:
                        # A write the peer will not see: record it, new generation once.
                        if vs.vol.md.sb.bitmap_gi == 0:
                            await self._new_generation(vs)
                        vs.vol.bitmap.set_range(offset, length)
                        if self._exposed_since is None:
                            self._exposed_since = time.time()
                    if self.rps.manifests and self.rps.needs_preserve(number, offset, length):
                        await self._preserve([(number, offset, length)])
                    self._dirty_since_rp = True
                    try:
                        if not vs.vol.write_inline(offset, data, fua):
                            await vs.vol.pwrite(offset, data, durable=fua)
                    except OSError as e:
                        if not await self._free_rp_space(e):
                            raise
                        await vs.vol.pwrite(offset, data, durable=fua)
                finally:
                    lock.release(hold)
            finally:
                self._writes_deciding -= 1
                if not self._writes_deciding and self._writes_idle:
                    wake_all(self._writes_idle)
        except BaseException:
            self._settle(vs, fut, offset, length)
            raise
        self.stats["writes"] += 1
        if fut is not None and self.cfg.protocol == "C":
            try:                         # noqa: SIM105 - not a suppress() object per write
                await fut
            except PeerGone:
                pass                     # already recorded in the bitmap
            fut = None
        elif fut is not None:
            await self._drain()          # protocol A: bound what waits in the send buffer
        self._settle(vs, fut, offset, length)
        us = (time.monotonic() - t0) * 1e6
        vs.latency_ewma_us = us if not vs.latency_ewma_us else 0.9 * vs.latency_ewma_us + 0.1 * us
        self._fg_latency_us += us          # read by the resync pacer
        self._fg_writes += 1

    @staticmethod
    def _settle(vs: VolumeState, fut, offset: int, length: int) -> None:
        """Release the AL extent now, or once the peer acked (or the link dropped)."""
        al = vs.vol.al
        if fut is None or fut.done():
            al.release(offset, length)
        else:
            fut.add_done_callback(lambda f: al.release(offset, length))

    async def flush(self, number: int) -> None:
        self.stats["flushes"] += 1
        vs = self.vols[number]
        fut = None
        if self.replicating(vs):
            self._seq += 1
            fut = asyncio.get_running_loop().create_future()
            self._flushes[self._seq] = (fut, time.monotonic())
            self._send(wire.encode_u64(T.FLUSH, self._seq))
            if self._watchdog_handle is None:
                self._arm_watchdog()
        await vs.vol.flush()
        if fut is not None and self.cfg.protocol == "C":
            with contextlib.suppress(PeerGone):
                await fut

    async def _new_generation(self, vs: VolumeState, forced: bool = False) -> None:
        async with self._gi_lock:
            sb = vs.vol.md.sb
            if not forced and sb.bitmap_gi != 0:
                return
            new = secrets.randbits(63) << 1 | 1
            bitmap_gi = sb.bitmap_gi
            if sb.current_gi != GI_JUST_CREATED and bitmap_gi == 0:
                bitmap_gi = sb.current_gi
            # Persisted before the write that needed it proceeds.
            await asyncio.to_thread(vs.vol.md.write_superblock, current_gi=new, bitmap_gi=bitmap_gi)
            self._event("new-generation", volume=vs.vol.number, current=_gi(new),
                        bitmap=_gi(bitmap_gi), forced=forced)

    # -- connection management ---------------------------------------------------------

    @property
    def _dialer(self) -> bool:
        # Exactly one side dials, so there is never a race of two connections.
        return self.cfg.local.name < self.cfg.peer.name

    async def _connect_loop(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                if self._dialer:
                    link = await connect(self.cfg.peer.host, self.cfg.peer.port, 5, self._link_failed,
                                         self.security.client_tls)
                else:
                    link = await self._accepted.get()
            except (TimeoutError, OSError):
                failures += 1
                await asyncio.sleep(self._backoff(failures))
                continue
            self.stats["connects"] += 1
            self._connected_at = None
            try:
                await self._session(link)
            except wire.ProtocolError as e:
                link.fail(e)             # counted and logged once, by _link_failed
                self._drop_connection(f"protocol error: {link.error}", kind="protocol-error")
            except TimeoutError as e:
                self._drop_connection(str(e) or "timed out", kind="timeout")
            except (OSError, ConnectionError) as e:
                self._drop_connection(f"link lost: {e.__class__.__name__}", kind="link-lost")
            except _Refused as e:
                link.finish()            # the peer must get our HELLO to reach the same verdict
                self._drop_connection(str(e), standalone=e.standalone,
                                      kind="split-brain" if e.split_brain else "refused")
                if e.standalone:
                    return
            finally:
                link.close()
            if self._connected_at is not None and self.role == "Secondary" and self._consistent() \
                    and not self._stopping:
                # The link is gone: this is the peer's last consistent point as far as we know.
                try:
                    await self._take_rp(DEGRADED)
                except (OSError, RecoveryPointError, RPStoreError) as e:
                    log.error("recovery point on link loss failed resource=%s error=%s", self.name, e)
                    self._event("rp-failed", reason=DEGRADED, error=str(e))
            # A connection that held for a minute resets the backoff; one that
            # failed early (refused, unhealthy, flapping) makes the next wait longer.
            held = self._connected_at is not None and time.monotonic() - self._connected_at >= 60
            failures = 0 if held else failures + 1
            if not self._stopping:
                await asyncio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        """Capped exponential backoff with jitter, so a long outage causes no reconnect storm.

        Only the dialing side backs off; the listener just takes the next connection.
        """
        t = self.cfg.tunables
        if not self._dialer or failures <= 0:
            return t.connect_interval if self._dialer else 0.05
        base = min(t.connect_interval * 2 ** min(failures - 1, 30), t.connect_interval_max)
        return base * random.uniform(0.8, 1.2)

    # -- degradation: a slow or dead peer never stalls the VM for longer than sync_timeout --------

    def _oldest_unacked(self) -> float | None:
        oldest = self._pending[0][5] if self._pending else None
        if self._flushes:
            flush_sent = next(iter(self._flushes.values()))[1]
            oldest = flush_sent if oldest is None else min(oldest, flush_sent)
        return oldest

    def _arm_watchdog(self) -> None:
        """One timer at the deadline of the oldest unacknowledged write or flush."""
        oldest = self._oldest_unacked()
        if oldest is not None:
            self._watchdog_handle = asyncio.get_running_loop().call_at(
                oldest + self.cfg.tunables.sync_timeout, self._watchdog)

    def _watchdog(self) -> None:
        self._watchdog_handle = None
        oldest = self._oldest_unacked()
        if oldest is None:
            return
        late = time.monotonic() - oldest
        if late >= self.cfg.tunables.sync_timeout - 0.001:
            self._degrade("peer-timeout", f"no acknowledgement from the peer for {late:.3f}s "
                                          f"(sync_timeout {self.cfg.tunables.sync_timeout:g}s)")
        else:
            self._arm_watchdog()

    def _degrade(self, kind: str, reason: str) -> None:
        """Stop waiting for the peer: what it did not acknowledge goes to the bitmap.

        The connection is dropped rather than kept idle, so the peer keeps
        exactly the prefix of the write stream it applied (a consistent image),
        and coming back goes through the same handshake and resync as any
        reconnect. The next connection is probed for resume_after first.
        """
        if self._link is None:
            return
        self._drop_connection(reason, kind=kind)

    def _set_degraded(self, kind: str, reason: str) -> None:
        if self.role != "Primary" or self.degraded is not None:
            return
        self.degraded = {"since": time.time(), "kind": kind, "reason": reason}
        self._event("degraded", kind=kind, reason=reason)

    def _check_in_sync(self) -> None:
        """Back to synchronous dual write with nothing missing on the peer: clear the exposure."""
        if self.conn != CONNECTED or any(vs.repl != ESTABLISHED or vs.vol.bitmap.count for vs in self.vols):
            return
        was, self.degraded = self.degraded, None
        had_exposure, self._exposed_since = self._exposed_since is not None, None
        if was is not None or had_exposure:
            detail = {"degraded_seconds": round(time.time() - was["since"], 3), "was": was["kind"]} \
                if was else {}
            self._event("in-sync", **detail)

    def _link_failed(self, link: Link, exc: BaseException) -> None:
        """A connection ended on bad input: count and log it, whichever side noticed."""
        if isinstance(exc, wire.ProtocolError):
            self.stats["protocol_errors"] += 1
            if isinstance(exc, auth.AuthError):
                self.stats["auth_errors"] += 1
            log.warning("protocol error resource=%s peer=%s from=%s reason=%s", self.name,
                        self.cfg.peer.name, link.peer, exc)
        elif not isinstance(exc, ConnectionError):
            log.error("link handler failed resource=%s from=%s error=%r", self.name, link.peer, exc)

    def _on_accept(self, link: Link) -> None:
        if self._dialer or self.conn in (CONNECTED, STANDALONE) or self._accepted.full():
            link.close()            # only one link per resource, and we are the dialer
            return
        self._accepted.put_nowait(link)

    async def change_security(self, cfg) -> None:
        """adjust: new [security] settings. Loaded first (SecurityError: nothing changes),
        then the link reconnects with them."""
        new = security.load(cfg)
        old, self.security, self.cfg = self.security, new, cfg
        old.revoke()            # also a link still in its handshake, not only self._link
        self._drop_connection("security settings changed", kind="security-changed")

    # -- pausing writes (the handshake, recovery points) ---------------------------------------

    async def _pause_io(self) -> None:
        """Hold new writes and wait until none is between its checks and its local write."""
        self._io_pauses += 1
        self._io_open.clear()
        try:
            while self._writes_deciding:
                await wait(self._writes_idle)
        except BaseException:
            self._resume_io()       # cancelled (disconnect, stop): never leave writes held
            raise

    def _resume_io(self) -> None:
        self._io_pauses -= 1
        if not self._io_pauses:
            self._io_open.set()

    # -- recovery points -------------------------------------------------------------------------

    def _consistent(self) -> bool:
        return all(vs.disk != INCONSISTENT for vs in self.vols)

    async def _take_rp(self, reason: str, *, quiesced: bool = False, labels: dict | None = None,
                       rp_id: str | None = None, not_after: float | None = None):
        """Create an RP of every volume at one instant; returns its manifest.

        quiesced: the caller already holds writes and the apply path still
        (the handshake's paused phase). Otherwise a Primary pauses its writes
        and a connected Secondary takes it between two applied batches, in
        the order the peer sent them.
        """
        if reason in (PRE_RESYNC, DEGRADED) and not self._dirty_since_rp and self.rps.manifests:
            last = next(reversed(self.rps.manifests.values()))
            if last.consistent:
                self._event("rp-skipped", reason=reason, same_as=last.id)
                return last
        if quiesced:
            return await self._create_rp(reason, labels, rp_id, not_after)
        if self._apply_running():
            marker = _ApplyPause(asyncio.get_running_loop())
            self._apply_backlog += 1
            self._apply_q.put_nowait([marker])
            await marker.reached
            try:
                return await self._create_rp(reason, labels, rp_id, not_after)
            finally:
                marker.done.set_result(None)
        await self._pause_io()
        try:
            return await self._create_rp(reason, labels, rp_id, not_after)
        finally:
            self._resume_io()

    async def _preserve(self, ranges) -> None:
        """Save pre-images before a write. If that fails (the RP disk is full or broken),
        the VM's write still goes on: the recovery points are dropped, loudly."""
        try:
            await run_io(_preserve_all, self.rps, ranges)
        except (OSError, RPStoreError) as e:
            log.error("cannot preserve data for the recovery points resource=%s error=%s; "
                      "dropping them so that writes go on", self.name, e)
            async with self._rp_drop_lock:
                dropped = await asyncio.to_thread(self.rps.drop_all)
            self._event("rp-dropped", reason=str(e), ids=",".join(dropped))

    async def _free_rp_space(self, e: OSError) -> bool:
        """A local write failed. Reflink RPs share the volume file's blocks, so on a full
        filesystem overwriting a shared block fails with ENOSPC: drop the RPs, loudly (as
        when the delta store cannot preserve), so that the caller retries the write once.
        False: not that case, the caller re-raises."""
        if e.errno != errno.ENOSPC or "reflink" not in self.rps.storage():
            return False
        async with self._rp_drop_lock:          # concurrent writes: one drop, all retry
            if not self.rps.manifests:
                return True
            log.error("volume filesystem full resource=%s error=%s; dropping the reflink recovery "
                      "points so that writes go on", self.name, e)
            dropped = await asyncio.to_thread(self.rps.drop_all)
        self._event("rp-dropped", reason=f"volume filesystem full: {e}", ids=",".join(dropped))
        return True

    async def _try_rp(self, reason: str) -> None:
        """An automatic RP inside the handshake's paused phase. If it cannot be taken
        (the RP disk is full), say so loudly and go on: replication comes first."""
        try:
            await self._take_rp(reason, quiesced=True)
        except (OSError, RecoveryPointError, RPStoreError) as e:
            log.error("automatic recovery point failed resource=%s reason=%s error=%s", self.name, reason, e)
            self._event("rp-failed", reason=reason, error=str(e))

    def _release_apply_pauses(self) -> None:
        """The applier is gone: an RP waiting for its turn in the stream takes it now."""
        while not self._apply_q.empty():
            for item in self._apply_q.get_nowait():
                if isinstance(item, _ApplyPause) and not item.reached.done():
                    item.reached.set_result(None)

    async def _create_rp(self, reason: str, labels: dict | None, rp_id: str | None = None,
                         not_after: float | None = None):
        t0 = time.monotonic()
        m = await asyncio.to_thread(
            self.rps.create, reason, role=self.role, consistent=self._consistent(),
            generations=[_gi(vs.vol.md.sb.current_gi) for vs in self.vols], labels=labels, rp_id=rp_id,
            not_after=not_after)
        self._dirty_since_rp = False
        self._event("rp-created", id=m.id, reason=reason, consistent=m.consistent,
                    seconds=round(time.monotonic() - t0, 4))
        return m

    def _apply_running(self) -> bool:
        return self._applier is not None and not self._applier.done()

    def _rp_protected(self):
        """While a volume is Inconsistent, its last consistent RP must survive."""
        return None if self._consistent() else self.rps.last_consistent()

    async def _rp_schedule_loop(self) -> None:
        """Periodic RPs (rp_interval) on the Secondary while in sync; retention in any role.

        Retention also runs on a Primary (once a minute), so the scheduled RPs a
        node took as Secondary age out after a switchover instead of taxing the
        new Primary's first writes for ever.
        """
        last = max((m.created for m in self.rps.manifests.values() if m.reason == SCHEDULED), default=0.0)
        expired_at = 0.0
        while not self._stopping:
            await asyncio.sleep(1.0)
            t = self.cfg.tunables
            in_sync = self.role == "Secondary" and self.conn == CONNECTED and all(
                vs.repl == ESTABLISHED and not vs.vol.bitmap.count for vs in self.vols)
            due = t.rp_interval and in_sync and time.time() - last >= t.rp_interval
            try:
                if due:
                    last = (await self._take_rp(SCHEDULED)).created
                if due or (self.rps.manifests and time.monotonic() - expired_at >= 60):
                    expired_at = time.monotonic()
                    gone = await asyncio.to_thread(self.rps.expire, keep=t.rp_keep, max_age=t.rp_max_age,
                                                   protect=self._rp_protected())
                    if gone:
                        self._event("rp-expired", ids=",".join(gone))
            except (OSError, RecoveryPointError, RPStoreError) as e:
                log.error("scheduled recovery point failed resource=%s error=%s", self.name, e)

    async def rp_create(self, labels: dict | None = None) -> dict:
        return (await self._take_rp(MANUAL, labels=labels)).to_dict()

    async def rp_create_center(self, rp_id: str, not_after: float | None = None) -> tuple[dict, bool]:
        """tandem-center's scheduled RP with the id it chose: (manifest, created). Idempotent: an
        RP of that id that the center made is returned as is (a retry after a lost reply or a
        leader change), so one slot never makes two RPs. The caller serialises calls.
        not_after (the end of the schedule slot's window): a new RP whose stamp would not be
        before it is refused (RecoveryPointTooLate), so a slot's RP is inside the slot or not
        taken, however long the request waited for this node (pausing I/O, a busy loop)."""
        m = self.rps.manifests.get(rp_id)
        if m is not None:
            if m.reason != CENTER:
                raise RecoveryPointError(f"recovery point {rp_id!r} exists and was not made by the center")
            return m.to_dict(), False
        return (await self._take_rp(CENTER, rp_id=rp_id, not_after=not_after)).to_dict(), True

    async def rp_delete_center(self, rp_id: str) -> bool:
        """Retention of tandem-center's schedule: delete an RP the center made (False: no such
        RP, already gone). Refuses any other RP, and one with a label (e.g. tested=... after a
        drill: a person chose to keep it); the usual checks (exported, cloned, the last
        consistent image of an Inconsistent volume) apply too."""
        m = self.rps.manifests.get(rp_id)
        if m is None:
            return False
        if m.reason != CENTER:
            raise RecoveryPointError(f"recovery point {rp_id!r} was not made by the center")
        if m.labels:
            raise RecoveryPointError(f"recovery point {rp_id!r} is labelled "
                                     f"({', '.join(sorted(m.labels))}): it is kept")
        await self.rp_delete(rp_id)
        return True

    def rp_list(self) -> list[dict]:
        return self.rps.list()

    async def rp_label(self, rp_id: str, labels: dict) -> dict:
        m = await asyncio.to_thread(self.rps.label, rp_id, labels)
        self._event("rp-labelled", id=rp_id, labels=",".join(f"{k}={v}" for k, v in sorted(labels.items())))
        return m.to_dict()

    async def rp_delete(self, rp_id: str) -> None:
        await asyncio.to_thread(self.rps.delete, rp_id, protect=self._rp_protected())
        self._event("rp-deleted", id=rp_id)

    def rp_export(self, rp_id: str) -> list[str]:
        names = self.rps.export(rp_id, [v.export for v in self.cfg.volumes])
        self._event("rp-exported", id=rp_id, exports=",".join(names))
        return names

    def rp_unexport(self, rp_id: str) -> list[str]:
        return self.rps.unexport(rp_id)

    async def rp_clone(self, rp_id: str, name: str) -> list[str]:
        names = await asyncio.to_thread(self.rps.clone, rp_id, name, [v.export for v in self.cfg.volumes])
        self._event("rp-cloned", id=rp_id, clone=name, exports=",".join(names))
        return names

    async def rp_clone_delete(self, name: str) -> None:
        await asyncio.to_thread(self.rps.delete_clone, name)
        self._event("rp-clone-deleted", clone=name)

    async def rp_restore(self, rp_id: str) -> dict:
        """Roll this node's volumes back to an RP. Only on a Secondary that is StandAlone."""
        m = self.rps.get(rp_id)
        if self.role == "Primary":
            raise RoleError(f"{self.name}: is Primary; demote it before restoring a recovery point")
        if self.conn != STANDALONE:
            raise RoleError(f"{self.name}: is {self.conn}; run `tandemctl disconnect {self.name}` first, "
                            "so the peer does not resync over the restore")
        return await self._restore(m)

    async def _restore(self, m) -> dict:
        t0 = time.monotonic()
        # Mark first: a crash half way leaves the blocks out of sync, not silently old.
        changed = await asyncio.to_thread(self.rps.changed_since, m.id)   # reflink: reads both files
        for vs, ranges in zip(self.vols, changed, strict=True):
            for offset, length in ranges:
                vs.vol.bitmap.set_range(offset, length)
            await asyncio.to_thread(vs.vol.md.write_bitmap_pages)
        restored = await asyncio.to_thread(self.rps.restore, m.id)
        nbytes = sum(length for ranges in restored for _, length in ranges)
        for vs in self.vols:
            if m.consistent:
                vs.vol.md.set_flags(set_=CONSISTENT, clear=WAS_UP_TO_DATE)
                vs.disk = OUTDATED
            else:
                vs.vol.md.set_flags(clear=CONSISTENT | WAS_UP_TO_DATE)
                vs.disk = INCONSISTENT
        self._dirty_since_rp = True
        self._event("rp-restored", id=m.id, bytes=nbytes, seconds=round(time.monotonic() - t0, 3))
        return {"id": m.id, "restored_bytes": nbytes}

    # -- explicit connection control ---------------------------------------------------------------

    async def disconnect(self) -> None:
        """Go StandAlone and stay there (until connect or resolve)."""
        if self._connect_task is not None:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connect_task
            self._connect_task = None
        self._drop_connection("operator disconnect", standalone=True, kind="operator")
        self.conn = STANDALONE

    def connect(self) -> None:
        if self.conn == STANDALONE and not self._stopping:
            self.conn = CONNECTING
            self.standalone = None
            self._connect_task = self._spawn(self._connect_loop(), "connect")

    def _drop_connection(self, reason: str, standalone: bool = False, kind: str = "disconnected") -> None:
        """Leave the connected state. Synchronous, so a timer can call it."""
        was = self.conn
        link, self._link = self._link, None
        if link is not None:
            link.close()
        if self._watchdog_handle is not None:
            self._watchdog_handle.cancel()
            self._watchdog_handle = None
        self.conn = STANDALONE if (standalone or self._stopping) else CONNECTING
        if self.conn == STANDALONE and not self._stopping:
            self.standalone = {"kind": kind, "reason": reason, "since": time.time()}
        self.peer_role = "Unknown"
        # Whatever the peer did not acknowledge may be missing there. The
        # waiting writes complete now, on local durability.
        now_mono, now = time.monotonic(), time.time()
        for _seq, fut, number, offset, length, sent in self._pending:
            self.vols[number].vol.bitmap.set_range(offset, length)
            if self.cfg.protocol == "A":        # acknowledged when it was sent
                since = now - (now_mono - sent)
                self._exposed_since = min(self._exposed_since or since, since)
            if not fut.done():
                fut.set_exception(PeerGone())
                fut.exception()        # mark retrieved for protocol A callers
        if self._pending and self._exposed_since is None:
            self._exposed_since = now
        self._pending.clear()
        self._inflight_bytes = 0
        for fut in [f for f, _sent in self._flushes.values()] + list(self._pings.values()):
            if not fut.done():
                fut.set_exception(PeerGone())
                fut.exception()
        self._flushes.clear()
        self._pings.clear()
        for vs in self.vols:
            if vs.repl == SYNC_TARGET:
                vs.disk = INCONSISTENT
            vs.repl, vs.peer_disk = OFF, DUNKNOWN
            vs.rs_inflight.clear()
        self._verifier.connection_lost(reason)
        if was == CONNECTED:
            if not self._stopping:
                self._lost_link = True
                self._set_degraded(kind, reason)
            self._event("disconnected", kind=kind, reason=reason, conn=self.conn)

    def _send(self, buffers: list[bytes], now: bool = False) -> None:
        if self._link is None:
            raise PeerGone()
        self._link.send(buffers, now)

    def _flush_link(self) -> None:
        if self._link is not None:
            self._link.flush_now()

    async def _drain(self) -> None:
        """Wait while the link's send buffer is over its high-water mark.

        A link that breaks meanwhile is not this caller's error: what it sent
        and the peer did not acknowledge is in the bitmap (see _drop_connection).
        """
        if self._link is not None:
            await self._link.drain()

    # -- the session: handshake, then the receive loop -------------------------------------

    def _hello(self) -> dict:
        vols = []
        for vs in self.vols:
            sb = vs.vol.md.sb
            vols.append({"number": vs.vol.number, "size": vs.vol.size, "current": sb.current_gi,
                         "bitmap": sb.bitmap_gi, "history": list(sb.history),
                         "consistent": vs.disk != INCONSISTENT, "disk": vs.disk,
                         "crashed_primary": sb.has(CRASHED_PRIMARY), "bits": vs.vol.bitmap.count})
        return {"proto": wire.VERSION, "resource": self.name, "node": self.cfg.local.name,
                "peer": self.cfg.peer.name, "role": self.role, "protocol": self.cfg.protocol,
                "discard": self._discard, "volumes": vols}

    async def _session(self, link: Link) -> None:
        # 1. Identify both ends first, while writes go on: a stray or hostile
        #    connection must not be able to pause the Primary's I/O.
        t = self.cfg.tunables
        ident = {"proto": wire.VERSION, "resource": self.name, "node": self.cfg.local.name,
                 "peer": self.cfg.peer.name, "probe": t.resume_after if self._lost_link else 0}
        ident["nonce"] = nonce = auth.new_nonce()
        link.send(wire.encode_json(T.HELLO, ident))
        msg = await link.read_message(5)
        if msg.type != T.HELLO:
            raise wire.ProtocolError(f"expected HELLO, got {msg.type.name}")
        _validate_ident(msg.body, self)
        await self.security.authenticate(link, nonce, msg.body)    # the shared secret (auth.py)
        peer_probe = msg.body.get("probe")
        if isinstance(peer_probe, bool) or not isinstance(peer_probe, (int, float)) \
                or not 0 <= peer_probe <= 3600:
            raise wire.ProtocolError(f"malformed HELLO: bad probe {peer_probe!r}")
        # 2. After a lost connection, the link must prove healthy for
        #    resume_after before replication resumes (hysteresis against a
        #    flapping link). The dialer drives the probe; the other side
        #    answers and waits for the dialer's state HELLO.
        probe = max(ident["probe"], peer_probe)
        if self._dialer:
            if probe:
                await self._probe(link, probe)
            peer_hello = None
        else:
            peer_hello = await self._await_state_hello(link, probe)
        # 3. Pause writes so that each one is either replicated or in the bitmap
        #    that the state exchange describes, then exchange state. Writes
        #    wait meanwhile, so the network part is bounded by sync_timeout.
        await self._pause_io()
        try:
            async with asyncio.timeout(t.sync_timeout):
                hello = self._hello()
                link.send(wire.encode_json(T.HELLO, hello))
                msg = peer_hello or await link.read_message(3600)
                if msg.type != T.HELLO:
                    raise wire.ProtocolError(f"expected HELLO, got {msg.type.name}")
                peer = _validate_hello(msg.body, self)
                self._link = link
                self.conn = CONNECTED
                self._connected_at = time.monotonic()
                self.peer_role = peer["role"]
                if self.role == "Primary" and self.peer_role == "Primary":
                    raise _Refused("both nodes are Primary: refusing the connection (split brain)", True)
                plans = self._plan(hello, peer)
                received = await self._exchange_bitmaps(link, plans)
            if any(s in handshake.TARGETS for _, s, _ in plans) and self._consistent():
                # The resync makes this node Inconsistent: keep its last consistent image.
                await self._try_rp(PRE_RESYNC)
            for vs, strategy, pv in plans:
                await self._begin(vs, strategy, pv, received.get(vs.vol.number))
        except TimeoutError:
            raise TimeoutError(f"state exchange took longer than sync_timeout "
                               f"({t.sync_timeout:g}s) while writes were paused") from None
        except _Refused as e:
            if e.split_brain:
                await self._try_rp(SPLIT_BRAIN)
            raise
        finally:
            self._resume_io()
        self._check_in_sync()
        self._spawn(self._ping_loop(), "ping")
        # Received messages are handled as they arrive (_on_messages): acks and
        # pings at once, writes applied right there when nothing is queued ahead
        # of them, else by the applier task in arrival order.
        self._apply_q = asyncio.Queue()
        self._queued = 0
        self._apply_backlog = 0
        self._sizes = [vs.vol.size for vs in self.vols]
        applier = self._applier = asyncio.ensure_future(self._apply_loop())
        link.start_dispatch(self._on_messages)
        try:
            done, _ = await asyncio.wait({link.done, applier}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()            # re-raise what ended the session
        finally:
            applier.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await applier
            self._applier = None
            self._release_apply_pauses()

    async def _probe(self, link: Link, seconds: float) -> None:
        """Ping the peer for `seconds`; every answer must come within sync_timeout."""
        t = self.cfg.tunables
        self._event("probing", seconds=seconds)
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        n = 0
        while loop.time() < end:
            n += 1
            link.send(wire.encode_u64(T.PING, n))
            try:
                msg = await link.read_message(t.sync_timeout)
            except TimeoutError:
                reason = f"no answer to probe {n} within sync_timeout ({t.sync_timeout:g}s)"
                self._event("probe-failed", reason=reason)
                raise TimeoutError(f"peer unhealthy: {reason}") from None
            if msg.type != T.PING_ACK or msg.seq != n:
                raise wire.ProtocolError(f"expected PING_ACK {n} while probing, got {msg.type.name}")
            await asyncio.sleep(min(0.2, t.ping_interval))
        self._event("probe-passed", seconds=seconds, pings=n)

    async def _await_state_hello(self, link: Link, probe: float) -> wire.Message:
        """Answer the dialer's probe until its state HELLO arrives."""
        while True:
            msg = await link.read_message(probe + 10)
            if msg.type == T.PING:
                link.send(wire.encode_u64(T.PING_ACK, msg.seq))
            elif msg.type == T.HELLO:
                return msg
            else:
                raise wire.ProtocolError(f"expected PING or HELLO, got {msg.type.name}")

    def _plan(self, hello: dict, peer: dict) -> list:
        """Decide, per volume, what the connection does (mirror images on the two sides)."""
        discard = hello["discard"] or peer["discard"]
        if hello["discard"] and peer["discard"] and hello["discard"] != peer["discard"]:
            raise _Refused(f"the nodes disagree on whose data to discard ({hello['discard']!r} here, "
                           f"{peer['discard']!r} on the peer)", True)
        plans = []
        for vs, pv in zip(self.vols, peer["volumes"], strict=True):
            me = handshake.Side.from_hello(self.cfg.local.name, self.role, hello["volumes"][vs.vol.number])
            them = handshake.Side.from_hello(self.cfg.peer.name, self.peer_role, pv)
            strategy, rule = handshake.decide(me, them, discard)
            self._event("handshake", volume=vs.vol.number, strategy=strategy, rule=rule,
                        self_gi=_gi(me.current), peer_gi=_gi(them.current))
            if strategy in (handshake.SPLIT_BRAIN, handshake.UNRELATED):
                raise _Refused(f"volume {vs.vol.number}: {strategy} (rule {rule}); "
                               "manual recovery needed", True, split_brain=strategy == handshake.SPLIT_BRAIN)
            if strategy in handshake.TARGETS and self.role == "Primary":
                raise _Refused(f"volume {vs.vol.number}: the Primary would become sync target "
                               f"(rule {rule}); refusing", True)
            plans.append((vs, strategy, pv))
        if discard:
            self._event("split-brain-resolved", discard=discard)
            self._discard = None
        self._event("connected", peer=self.cfg.peer.name, peer_role=self.peer_role)
        return plans

    async def _exchange_bitmaps(self, link: Link, plans: list) -> dict[int, bytearray]:
        """Swap bitmaps where their union decides what moves (compressed: they are mostly zeros)."""
        wanted = [vs for vs, strategy, _ in plans
                  if strategy in (handshake.SOURCE_BITMAP, handshake.TARGET_BITMAP)]
        for vs in wanted:
            for offset, packed in wire.pack_bitmap(vs.vol.bitmap.to_bytes()):
                self._send(wire.encode_bitmap(vs.vol.number, offset, packed))
        received = {vs.vol.number: bytearray(vs.vol.bitmap.nbytes) for vs in wanted}
        filled = dict.fromkeys(received, 0)
        while any(filled[n] < len(received[n]) for n in received):
            msg = await link.read_message(3600)     # bounded by the caller's deadline
            if msg.type != T.BITMAP or msg.volume not in received:
                raise wire.ProtocolError(f"expected BITMAP, got {msg.type.name}")
            buf = received[msg.volume]
            if msg.offset != filled[msg.volume]:
                raise wire.ProtocolError("BITMAP chunk out of order")
            chunk = wire.unpack_bitmap(msg.data, min(wire.BITMAP_CHUNK, len(buf) - msg.offset))
            buf[msg.offset:msg.offset + len(chunk)] = chunk
            filled[msg.volume] += len(chunk)
        return received

    async def _begin(self, vs: VolumeState, strategy: str, pv: dict, peer_bitmap) -> None:
        from .bitmap import Bitmap
        if peer_bitmap is not None:
            vs.vol.bitmap.merge(Bitmap(vs.vol.size, vs.vol.bitmap.block_size, bytes(peer_bitmap)))
        if strategy in (handshake.SOURCE_FULL, handshake.TARGET_FULL):
            vs.vol.bitmap.set_all()
        if strategy == handshake.NO_SYNC:
            vs.repl = ESTABLISHED
            vs.peer_disk = pv["disk"]
            return
        vs.sync_total = vs.vol.bitmap.count
        vs.sync_started = time.monotonic()
        if strategy in handshake.SOURCES:
            vs.repl, vs.peer_disk = SYNC_SOURCE, INCONSISTENT
            if self._exposed_since is None and self.role == "Primary":
                self._exposed_since = time.time()
            sb = vs.vol.md.sb
            if sb.bitmap_gi == 0 and pv["current"] != sb.current_gi:
                # Remember which generation the target had, so an interrupted
                # sync resumes from the bitmap instead of starting over.
                await asyncio.to_thread(vs.vol.md.write_superblock, bitmap_gi=pv["current"])
            self._spawn(self._resync_source(vs), f"resync-{vs.vol.number}")
        else:
            vs.repl, vs.disk, vs.peer_disk = SYNC_TARGET, INCONSISTENT, UPTODATE
            vs.vol.md.set_flags(clear=CONSISTENT)
        await asyncio.to_thread(vs.vol.md.write_bitmap_pages)
        self._event("sync-started", volume=vs.vol.number, role=vs.repl,
                    bytes=vs.vol.bitmap.out_of_sync_bytes)

    def _on_messages(self, msgs: list) -> None:
        sizes = self._sizes
        batch, nbytes = [], 0
        for msg in msgs:
            t = msg.type
            if t in (T.DATA, T.RS_DATA):
                wire.check_range(msg, sizes)
                if self.role == "Primary":
                    raise wire.ProtocolError(f"{t.name} sent to a Primary")
                batch.append(msg)
                nbytes += msg.length
            elif t in (T.FLUSH, T.STATE):
                batch.append(msg)             # ordered after the writes before it
            elif t == T.WRITE_ACK:
                self._acked(msg.seq)
            elif t == T.RS_ACK:
                wire.check_range(msg, sizes)
                vs = self.vols[msg.volume]
                key = (msg.offset, msg.length)
                if key not in vs.rs_inflight:
                    raise wire.ProtocolError("RS_ACK for a block that was not sent")
                vs.rs_inflight.discard(key)
                vs.vol.bitmap.clear_range(msg.offset, msg.length)
                self.stats["resync_bytes"] += msg.length
            elif t == T.FLUSH_ACK:
                entry = self._flushes.pop(msg.seq, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(None)
            elif t == T.PING_ACK:
                fut = self._pings.pop(msg.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif t == T.PING:
                self._send(wire.encode_u64(T.PING_ACK, msg.seq))
            elif t == T.VERIFY_REQ:
                self._verifier.check_request(msg)
                batch.append(msg)             # answered in apply order, after the writes before it
            elif t == T.VERIFY_REPLY:
                self._verifier.on_reply(msg)
            else:
                raise wire.ProtocolError(f"unexpected {t.name} after the handshake")
        if not batch:
            self._flush_link()                # PING_ACKs
            return
        if not self._apply_backlog and self._apply_now(batch):
            return                          # acknowledged and sent
        self._apply_backlog += 1
        self._queued += nbytes
        self._apply_q.put_nowait(batch)
        if self._queued >= APPLY_QUEUE_BYTES and self._link is not None:
            self._link.pause_reading()      # back-pressure: the peer's sends block

    def _apply_now(self, msgs: list) -> bool:
        """Apply a batch of writes right away if that needs no waiting; False if not.

        Only plain writes qualify (no FUA, no flush or state change), small
        enough to write inline, whose AL extents are all active already.
        """
        vols = self.vols
        total = 0
        for m in msgs:
            if m.type == T.DATA:
                if m.flags & wire.FLAG_FUA:
                    return False
            elif m.type != T.RS_DATA:
                return False
            elif vols[m.volume].repl != SYNC_TARGET:
                raise wire.ProtocolError("RS_DATA outside a resync")
            total += m.length
        if not INLINE.allowed(total, APPLY_INLINE_MAX):
            return False
        rps = self.rps
        if rps.manifests and any(rps.needs_preserve(m.volume, m.offset, m.length) for m in msgs):
            return False                    # the pre-image must be saved first: not inline
        held = []
        for m in msgs:
            if not vols[m.volume].vol.al.try_acquire(m.offset, m.length):
                for h in held:
                    vols[h.volume].vol.al.release(h.offset, h.length)
                return False
            held.append(m)
        try:
            INLINE.run([(vols[m.volume].vol.fd, m.offset, m.data) for m in msgs])
        finally:
            for m in msgs:
                vols[m.volume].vol.al.release(m.offset, m.length)
        # The acks of everything this receive brought: nothing else can join them.
        self._applied(msgs, now=True)
        return True

    def _acked(self, seq: int) -> None:
        """A cumulative WRITE_ACK: every replicated write up to seq is on the peer."""
        pending = self._pending
        if not pending or seq < pending[0][0] or seq > self._seq:
            raise wire.ProtocolError(f"WRITE_ACK for unknown write {seq}")
        while pending and pending[0][0] <= seq:
            entry = pending.popleft()
            self._inflight_bytes -= entry[4]
            fut = entry[1]
            if not fut.done():
                fut.set_result(None)

    async def _apply_loop(self) -> None:
        """Apply queued messages strictly in arrival order (write-order fidelity)."""
        q = self._apply_q
        while True:
            batch = await q.get()
            batches = 1
            while len(batch) < APPLY_BATCH and not q.empty():
                batch += q.get_nowait()
                batches += 1
            i = 0
            while i < len(batch):
                if batch[i].type in (T.DATA, T.RS_DATA):
                    j = i
                    while j < len(batch) and batch[j].type in (T.DATA, T.RS_DATA):
                        j += 1
                    await self._apply_writes(batch[i:j])
                    i = j
                    continue
                msg = batch[i]
                if isinstance(msg, _ApplyPause):       # an RP is taken at this point of the stream
                    msg.reached.set_result(None)
                    await msg.done
                elif msg.type == T.FLUSH:
                    for vs in self.vols:
                        await vs.vol.flush()
                    self._send(wire.encode_u64(T.FLUSH_ACK, msg.seq))
                    await self._settle_al()
                elif msg.type == T.VERIFY_REQ:
                    await self._verifier.serve(msg)
                else:
                    await self._on_state(msg.body)
                i += 1
            self._apply_backlog -= batches
            self._queued -= sum(m.length for m in batch if m.type in (T.DATA, T.RS_DATA))
            if self._queued < APPLY_QUEUE_BYTES and self._link is not None:
                self._link.resume_reading()

    async def _apply_writes(self, msgs) -> None:
        vols = self.vols
        for m in msgs:
            if m.type == T.RS_DATA and vols[m.volume].repl != SYNC_TARGET:
                raise wire.ProtocolError("RS_DATA outside a resync")
        held = []
        try:
            for m in msgs:
                al = vols[m.volume].vol.al
                if not al.try_acquire(m.offset, m.length):
                    await al.acquire(m.offset, m.length)
                held.append(m)
            rps = self.rps
            if rps.manifests:
                todo = [(m.volume, m.offset, m.length) for m in msgs
                        if rps.needs_preserve(m.volume, m.offset, m.length)]
                if todo:
                    await self._preserve(todo)
            writes = [(vols[m.volume].vol.fd, m.offset, m.data) for m in msgs]
            sync = {vols[m.volume].vol.fd for m in msgs if m.type == T.DATA and m.flags & wire.FLAG_FUA}
            try:
                if not sync and INLINE.allowed(sum(m.length for m in msgs), APPLY_INLINE_MAX):
                    INLINE.run(writes)
                else:
                    await run_io(write_batch, writes, sorted(sync))
            except OSError as e:
                if not await self._free_rp_space(e):
                    raise
                await run_io(write_batch, writes, sorted(sync))     # writes are idempotent
        finally:
            for m in held:
                vols[m.volume].vol.al.release(m.offset, m.length)
        self._applied(msgs)

    def _applied(self, msgs, now: bool = False) -> None:
        """Account for applied writes and acknowledge them (now: send at once, see Link.send)."""
        vols = self.vols
        self._dirty_since_rp = True
        acks = []
        last_seq = 0
        link = self._link
        for m in msgs:
            vol = vols[m.volume].vol
            vol.bytes_written += m.length
            if link is not None and m.length > BIG_PAYLOAD:
                # Written: its receive buffer can take a later message (no copy kept).
                payload, m.data = m.data.obj, b""
                link.recycle(payload)
            if m.type == T.DATA:
                last_seq = m.seq
            else:
                vol.bitmap.clear_range(m.offset, m.length)
                acks += wire.encode_rs_ack(m.volume, m.offset, m.length)
        if last_seq:
            acks += wire.encode_u64(T.WRITE_ACK, last_seq)   # cumulative: covers the batch
        self._send(acks, now)

    async def _settle_al(self) -> None:
        """After a flush on the secondary, shrink its AL (at most once a second).

        Everything received so far is durable, so a crash of this node from
        now on needs to resync only what arrives after it.
        """
        now = time.monotonic()
        if now - self._al_settled < 1.0:
            return
        self._al_settled = now
        for vs in self.vols:
            await vs.vol.al.settle()

    async def _on_state(self, body: dict) -> None:
        if "role" in body:
            if body["role"] not in ("Primary", "Secondary"):
                raise wire.ProtocolError("bad role in STATE")
            if body["role"] == "Primary" and self.role == "Primary":
                raise _Refused("the peer became Primary while we are Primary", True)
            self.peer_role = body["role"]
            self._event("peer-role-changed", peer_role=self.peer_role)
        if "sync_done" in body:
            number = body["sync_done"]
            if not isinstance(number, int) or not 0 <= number < len(self.vols):
                raise wire.ProtocolError("bad volume in sync_done")
            vs = self.vols[number]
            if vs.repl != SYNC_TARGET:
                raise wire.ProtocolError("sync_done outside a resync")
            await vs.vol.flush()
            sb = vs.vol.md.sb
            history = list(sb.history)
            if sb.current_gi not in (GI_JUST_CREATED, int(body["current"])):
                history = [sb.current_gi] + history
            history = tuple((history + [0] * HISTORY)[:HISTORY])
            vs.vol.bitmap.clear_all()
            await asyncio.to_thread(vs.vol.md.write_bitmap_pages)
            await asyncio.to_thread(vs.vol.md.write_superblock, current_gi=int(body["current"]),
                                    bitmap_gi=0, history=history,
                                    flags=vs.vol.md.sb.flags | CONSISTENT | WAS_UP_TO_DATE)
            vs.disk, vs.repl = UPTODATE, ESTABLISHED
            await vs.vol.al.settle()     # all synced data is durable (flushed above)
            self._event("sync-finished", volume=number, role="SyncTarget")
            self._check_in_sync()

    # -- resync (source side pushes; see docs/engine.md) ----------------------------------

    async def _resync_source(self, vs: VolumeState) -> None:
        try:
            await self._resync_source_loop(vs)
        except (PeerGone, ConnectionError, OSError) as e:
            log.info("resync stopped resource=%s volume=%s reason=%r", self.name, vs.vol.number, e)
        except Exception:  # noqa: BLE001 - a bug must not leave the volume stuck in SyncSource
            log.exception("resync failed resource=%s volume=%s", self.name, vs.vol.number)
            self._drop_connection("resync failed (see the log)", kind="internal-error")

    async def _resync_source_loop(self, vs: VolumeState) -> None:
        number, lock = vs.vol.number, self.locks[vs.vol.number]
        t = self.cfg.tunables
        pacer = ResyncPacer(t.resync_rate_min, t.resync_rate_max or UNLIMITED_RATE, vs.latency_ewma_us)
        vs.resync_rate = pacer.rate
        seen = (self._fg_latency_us, self._fg_writes)
        next_tick = next_send = time.monotonic()
        while vs.repl == SYNC_SOURCE:
            ranges = list(_blocks(vs.vol.bitmap.ranges(), RESYNC_BLOCK))
            if not ranges and not vs.rs_inflight:
                await self._finish_sync(vs)
                return
            for offset, length in ranges:
                if vs.repl != SYNC_SOURCE:
                    return
                while len(vs.rs_inflight) >= RESYNC_WINDOW or (offset, length) in vs.rs_inflight:
                    await asyncio.sleep(0.001)
                    if vs.repl != SYNC_SOURCE:
                        return
                async with lock.hold(offset, length):
                    data = await vs.vol.pread(offset, length)
                    vs.rs_inflight.add((offset, length))
                    self._send(wire.encode_rs_data(number, offset, data))
                now = time.monotonic()
                if now >= next_tick:
                    now_seen = (self._fg_latency_us, self._fg_writes)
                    vs.resync_rate = pacer.tick(now_seen[0] - seen[0], now_seen[1] - seen[1])
                    seen, next_tick = now_seen, now + PACER_TICK
                next_send = max(next_send, now - PACER_TICK) + length / vs.resync_rate
                if next_send > now:
                    await asyncio.sleep(next_send - now)
                await self._drain()
            while vs.rs_inflight and vs.repl == SYNC_SOURCE:
                await asyncio.sleep(0.005)

    async def _finish_sync(self, vs: VolumeState) -> None:
        sb = vs.vol.md.sb
        history = sb.history
        if sb.bitmap_gi not in (0, GI_JUST_CREATED) and sb.bitmap_gi not in history:
            history = tuple(([sb.bitmap_gi] + list(history))[:HISTORY])
        await asyncio.to_thread(vs.vol.md.write_bitmap_pages)
        await asyncio.to_thread(vs.vol.md.write_superblock, bitmap_gi=0, history=history)
        self._send(wire.encode_json(T.STATE, {"sync_done": vs.vol.number, "current": sb.current_gi}))
        vs.repl, vs.peer_disk = ESTABLISHED, UPTODATE
        self._event("sync-finished", volume=vs.vol.number, role="SyncSource",
                    seconds=round(time.monotonic() - vs.sync_started, 3))
        self._check_in_sync()

    async def _ping_loop(self) -> None:
        t = self.cfg.tunables
        n = 0
        while self.conn == CONNECTED and self._link is not None:
            await asyncio.sleep(t.ping_interval)
            if self._link is None:
                return
            n += 1
            fut = asyncio.get_running_loop().create_future()
            self._pings[n] = fut
            try:
                self._send(wire.encode_u64(T.PING, n))
                await asyncio.wait_for(fut, max(t.ping_timeout, 5 * t.ping_interval))
            except (TimeoutError, PeerGone):
                # The session then ends on the closed link.
                self._degrade("ping-timeout", "no answer to a keep-alive")
                return

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict:
        vols = []
        for vs in self.vols:
            sb = vs.vol.md.sb
            oos = vs.vol.bitmap.out_of_sync_bytes
            entry = {
                "volume": vs.vol.number, "disk": vs.disk, "peer_disk": vs.peer_disk,
                "replication": vs.repl, "out_of_sync_bytes": oos,
                "in_flight_bytes": sum(p[4] for p in self._pending if p[2] == vs.vol.number),
                "write_latency_us": round(vs.latency_ewma_us, 1),
                "generation": {"current": _gi(sb.current_gi), "bitmap": _gi(sb.bitmap_gi),
                               "history": [_gi(h) for h in sb.history]},
                "flags": sb.flag_names(), "size": vs.vol.size,
                "written_bytes": vs.vol.bytes_written, "read_bytes": vs.vol.bytes_read,
            }
            if vs.repl in (SYNC_SOURCE, SYNC_TARGET) and vs.sync_total:
                done = max(0, vs.sync_total - vs.vol.bitmap.count)
                pct = 100.0 * done / vs.sync_total
                elapsed = time.monotonic() - vs.sync_started
                eta = (elapsed / done * (vs.sync_total - done)) if done else None
                entry.update(sync_percent=round(pct, 1),
                             sync_eta_seconds=None if eta is None else round(eta, 1))
                if vs.repl == SYNC_SOURCE:
                    entry["resync_rate"] = int(vs.resync_rate)
            entry.update(self._verifier.progress(vs.vol.number))
            vols.append(entry)
        return {"name": self.name, "role": self.role, "connection": self.conn,
                "standalone": self.standalone if self.conn == STANDALONE else None,
                "peer": self.cfg.peer.name, "peer_role": self.peer_role,
                "protocol": self.cfg.protocol, "degraded": self.degraded, "rpo": self.rpo_exposure(),
                "recovery_points": self.rps.summary() if self.rps else None,
                "volumes": vols, "stats": dict(self.stats)}

    def rpo_exposure(self) -> dict:
        """What a disaster now would lose: acknowledged bytes the peer may not have, and
        the age of the oldest of them. Both 0 while in sync. An upper bound: a block
        resynced already still counts its first write's age until the resync ends;
        after a restart the age counts from the restart."""
        if self.role != "Primary":
            return {"bytes": 0, "seconds": 0.0}
        nbytes = sum(vs.vol.bitmap.out_of_sync_bytes for vs in self.vols)
        since = self._exposed_since if nbytes else None
        if self.cfg.protocol == "A" and self._pending:     # acknowledged when queued
            nbytes += self._inflight_bytes
            sent = time.time() - (time.monotonic() - self._pending[0][5])
            since = sent if since is None else min(since, sent)
        age = max(0.0, time.time() - since) if since is not None and nbytes else 0.0
        return {"bytes": nbytes, "seconds": round(age, 3)}


class _ApplyPause:
    """Queued on the Secondary's apply path: the applier stops there until `done`."""
    type = None
    length = 0

    def __init__(self, loop):
        self.reached = loop.create_future()
        self.done = loop.create_future()


class _Refused(Exception):
    def __init__(self, msg: str, standalone: bool, split_brain: bool = False):
        super().__init__(msg)
        self.standalone = standalone
        self.split_brain = split_brain


def _preserve_all(rps: RecoveryPoints, ranges) -> None:
    for volume, offset, length in ranges:
        rps.preserve(volume, offset, length)


def _gi(value: int) -> str:
    return f"{value:016X}"


def _blocks(ranges, size: int):
    for offset, length in ranges:
        end = offset + length
        while offset < end:
            n = min(size, end - offset)
            yield offset, n
            offset += n


def _validate_ident(body: dict, res: Resource) -> None:
    try:
        if body["proto"] != wire.VERSION:
            raise wire.ProtocolError(f"protocol version {body['proto']} is not {wire.VERSION}")
        if body["resource"] != res.name:
            raise wire.ProtocolError(f"peer offers resource {body['resource']!r}, not {res.name!r}")
        if body["node"] != res.cfg.peer.name or body["peer"] != res.cfg.local.name:
            raise wire.ProtocolError(f"peer is {body['node']!r} expecting {body['peer']!r}; "
                                     f"we expect {res.cfg.peer.name!r}")
    except (KeyError, TypeError) as e:
        raise wire.ProtocolError(f"malformed HELLO: {e!r}") from None


def _validate_hello(body: dict, res: Resource) -> dict:
    _validate_ident(body, res)
    try:
        if body["role"] not in ("Primary", "Secondary"):
            raise wire.ProtocolError("bad role")
        if body["discard"] not in (None, res.cfg.local.name, res.cfg.peer.name):
            raise wire.ProtocolError("bad discard")
        if body["protocol"] != res.cfg.protocol:
            raise wire.ProtocolError(f"peer uses protocol {body['protocol']}, we use {res.cfg.protocol}")
        vols = body["volumes"]
        if not isinstance(vols, list) or len(vols) != len(res.vols):
            raise wire.ProtocolError("volume count differs")
        for vs, pv in zip(res.vols, vols, strict=True):
            if pv["number"] != vs.vol.number or pv["size"] != vs.vol.size:
                raise wire.ProtocolError(f"volume {vs.vol.number}: peer has size {pv['size']}, "
                                         f"we have {vs.vol.size}")
            for key in ("current", "bitmap", "bits"):
                if not isinstance(pv[key], int) or not 0 <= pv[key] < 2**64:
                    raise wire.ProtocolError(f"volume {vs.vol.number}: bad {key}")
            if not isinstance(pv["history"], list) or len(pv["history"]) > 64:
                raise wire.ProtocolError("bad history")
            if pv["disk"] not in (INCONSISTENT, OUTDATED, CONSISTENT_S, UPTODATE):
                raise wire.ProtocolError("bad disk state")
    except (KeyError, TypeError) as e:
        raise wire.ProtocolError(f"malformed HELLO: {e!r}") from None
    return body
