"""Periodic recovery points, exactly once across the cluster (issue 7, Schedules).

Every instance runs a Scheduler; only the leader (tandem.center.schedules_leader: writable
primary + advisory lock) acts. Each tick the leader:

1. resolves the slots left `claimed` (by a leader that died, or by itself after a failed
   engine call): inside the slot's window it asks the engine again for the RP of that slot's
   name (idempotent), after it asks the engine whether that RP exists (done) or not (missed);
2. for each protected VM whose policy has an RP interval, claims the current slot in the
   catalogue (INSERT .. ON CONFLICT DO NOTHING on (vm, slot), fenced by the lock), then asks
   the VM's engine for the RP (tandemd's monitor endpoint, control permission, mutual TLS)
   with the slot's window end as not_after, then marks the slot done and records the RP in
   recovery_points, in one transaction; an engine that reached not_after before stamping the
   RP refuses it ("late") and the slot is missed;
3. applies the policy's retention: the done slots beyond rp_retention per VM are deleted on the
   engine (which refuses labelled ones: those become `kept`), then marked expired.

Exactly once: a slot is claimed by one INSERT under a unique key, so it has at most one
owner ever; the RP's name is a function of the slot (schedules_slots.rp_name) and tandemd
creates an RP of a given name at most once, so a retry (after a crash between the engine
call and the update, or a lost reply) finds the RP instead of making another. See
docs/center.md, Schedules.

Which engine: the one the monitor last saw as Primary for all of the VM's resources (fresh
within [schedules] primary_fresh_s), else the VM's catalogue hypervisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge

from .config import MonitorConfig, SchedulesConfig
from .monitor import Engine, EngineError, client_context
from .schedules_leader import FENCE, Leadership
from .schedules_slots import in_window, next_slot, rp_name, slot_start, to_expire

log = logging.getLogger("tandem.center.schedules")

ENGINE_ERRORS = (OSError, ssl.SSLError, TimeoutError, ValueError, EngineError)


class SlotPassed(EngineError):
    """The engine refused the RP: by its clock, which stamps RPs, the slot's window had ended."""


class EngineControl(Engine):
    """The control requests of tandemd's monitor endpoint (rp-create, rp-delete, rp-list)."""

    async def call(self, req: dict) -> dict:
        reader, writer = await self._open(req)
        try:
            async with asyncio.timeout(self.timeout):
                return self._decode(await reader.readline())
        finally:
            writer.close()


@dataclass(frozen=True)
class Target:
    hypervisor_id: int
    name: str
    url: str
    site_id: int


@dataclass(frozen=True)
class VmSchedule:
    vm_id: int
    vm: str
    policy_id: int
    interval_s: int
    retention: int
    resources: tuple[str, ...]
    target: Target | None


class ScheduleMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.leader = Gauge("tandem_schedule_leader", "1 if this instance leads the RP schedules",
                            registry=registry)
        self.slots = Counter("tandem_schedule_slots", "slots this instance finished, by result",
                             ("result",), registry=registry)
        self.last_rp = Gauge("tandem_schedule_last_rp_timestamp_seconds",
                             "when the VM's last scheduled RP was taken (Unix time)", ("vm",),
                             registry=registry)
        self.leader.set(0)


class Scheduler:
    def __init__(self, conninfo: str, cfg: SchedulesConfig, engines: MonitorConfig,
                 registry: CollectorRegistry | None = None, instance: str | None = None):
        self.cfg = cfg
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.leadership = Leadership(conninfo, self.instance, cfg.connect_timeout)
        self.ctx = client_context(engines)
        self.metrics = ScheduleMetrics(registry or CollectorRegistry())
        self._retry_at: dict[int, float] = {}       # slot id -> monotonic time of the next try
        self._no_engine: set[int] = set()           # VMs already logged as having no engine

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: lead when possible, do the due work, sleep to the next slot or tick."""
        try:
            while True:
                wake = time.time() + self.cfg.tick
                leading = await self.leadership.ensure()
                self.metrics.leader.set(1 if leading else 0)
                if leading:
                    try:
                        wake = min(wake, await self.tick())
                    except (psycopg.Error, OSError) as e:
                        await self.leadership.drop(f"database error: {e}")
                        self.metrics.leader.set(0)
                    except Exception:
                        # A bug must not end the schedules for good: log it, hand the lead
                        # over (another instance may not have it) and try again next tick.
                        log.exception("schedules: tick failed")
                        await self.leadership.drop("tick failed")
                        self.metrics.leader.set(0)
                await asyncio.sleep(max(0.05, wake - time.time()))
        finally:
            await self.leadership.drop("stopping")
            self.metrics.leader.set(0)

    async def tick(self) -> float:
        """One round as leader; returns the wall-clock time of the next slot start."""
        vms = await self._schedules()
        by_vm = {v.vm_id: v for v in vms}
        await self._resolve_claimed(by_vm)
        now = await self._now()
        for v in vms:
            await self._take(v, slot_start(now, v.interval_s))
        for v in vms:
            await self._retention(v)
        # The next slot by the database's clock, as a time on this instance's clock.
        skew = time.time() - await self._now()
        return min((next_slot(now, v.interval_s) + skew for v in vms), default=time.time() + self.cfg.tick)

    # -- catalogue -----------------------------------------------------------------------------

    @property
    def conn(self) -> psycopg.AsyncConnection:
        if self.leadership.conn is None:
            raise psycopg.OperationalError("no leader connection")
        return self.leadership.conn

    async def _now(self) -> float:
        """The database's clock: the one clock all instances share, so that every instance puts
        an instant in the same slot whatever its own clock's skew."""
        row = await (await self.conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8 AS t")
                     ).fetchone()
        return row["t"]

    async def _schedules(self) -> list[VmSchedule]:
        rows = await (await self.conn.execute(
            """SELECT v.id AS vm_id, v.name AS vm, p.id AS policy_id, p.rp_interval_s, p.rp_retention,
                      array_agg(DISTINCT vv.resource::text ORDER BY vv.resource::text) AS resources,
                      h.id AS hv_id, h.name AS hv, h.engine_url, h.site_id
               FROM protected_vms v
               JOIN protection_policies p ON p.id = v.policy_id
               JOIN vm_volumes vv ON vv.vm_id = v.id
               LEFT JOIN hypervisors h ON h.id = v.hypervisor_id
               GROUP BY v.id, p.id, h.id ORDER BY v.id""")).fetchall()
        fresh = await (await self.conn.execute(
            """SELECT s.resource, h.id, h.name, h.engine_url, h.site_id FROM engine_resource_state s
               JOIN hypervisors h ON h.id = s.hypervisor_id
               WHERE s.role = 'Primary' AND s.seen_at > now() - make_interval(secs => %s)""",
            (self.cfg.primary_fresh_s,))).fetchall()
        primary: dict[str, set[Target]] = {}
        for r in fresh:
            if r["engine_url"]:
                primary.setdefault(r["resource"], set()).add(Target(r["id"], r["name"], r["engine_url"],
                                                                    r["site_id"]))
        out = []
        for r in rows:
            seen = [primary.get(res, set()) for res in r["resources"]]
            common = set.intersection(*seen) if seen else set()
            if len(common) == 1:                       # the engine Primary for all its resources
                target = common.pop()
            elif r["hv_id"] is not None and r["engine_url"]:
                target = Target(r["hv_id"], r["hv"], r["engine_url"], r["site_id"])
            else:
                target = None
            out.append(VmSchedule(r["vm_id"], r["vm"], r["policy_id"], r["rp_interval_s"], r["rp_retention"],
                                  tuple(r["resources"]), target))
        return out

    async def _claim(self, v: VmSchedule, slot_at: float) -> int | None:
        row = await (await self.conn.execute(
            f"""INSERT INTO schedule_slots (vm_id, policy_id, slot_at, interval_s, rp_name, hypervisor_id,
                                            claimed_by)
                SELECT %s, %s, to_timestamp(%s), %s, %s, %s, %s WHERE {FENCE}
                ON CONFLICT DO NOTHING RETURNING id""",
            (v.vm_id, v.policy_id, slot_at, v.interval_s, rp_name(v.vm_id, slot_at),
             v.target.hypervisor_id if v.target else None, self.instance))).fetchone()
        return row["id"] if row else None

    async def _done(self, slot_id: int, v: VmSchedule, target: Target, name: str, taken_at: float) -> None:
        async with self.conn.transaction():
            cur = await self.conn.execute(
                f"""UPDATE schedule_slots SET state = 'done', taken_at = to_timestamp(%s), done_at = now(),
                           hypervisor_id = %s, attempts = attempts + 1, error = NULL
                    WHERE id = %s AND state = 'claimed' AND {FENCE}""",
                (taken_at, target.hypervisor_id, slot_id))
            if cur.rowcount != 1:
                return          # lost the lock meanwhile, or another path finished it
            await self.conn.execute(
                "INSERT INTO recovery_points (vm_id, site_id, name, taken_at, consistency, reported_by) "
                "VALUES (%s, %s, %s, to_timestamp(%s), 'crash', %s) ON CONFLICT DO NOTHING",
                (v.vm_id, target.site_id, name, taken_at, f"schedule:{self.instance}"))
        self.metrics.slots.labels(result="done").inc()
        self.metrics.last_rp.labels(vm=v.vm).set(taken_at)
        log.info("schedules: %s: RP %s on %s", v.vm, name, target.name)

    async def _failed(self, slot_id: int, error: str, final: str | None = None) -> None:
        state = f", state = '{final}', finished_at = now()" if final else ""
        await self.conn.execute(
            f"UPDATE schedule_slots SET attempts = attempts + 1, error = %s{state} "
            f"WHERE id = %s AND state = 'claimed' AND {FENCE}", (error[:500], slot_id))
        if final:
            self.metrics.slots.labels(result=final).inc()

    # -- engines -------------------------------------------------------------------------------

    def _engine(self, target: Target) -> EngineControl:
        return EngineControl(target.name, target.url, self.ctx, self.cfg.request_timeout)

    async def _create(self, target: Target, resources: tuple[str, ...], name: str, not_after: float) -> float:
        """The RP of `name` on every resource of the VM; its creation time (of the first).
        not_after: the slot's window end; SlotPassed if the engine's clock reached it first."""
        taken = []
        for res in resources:
            reply = await self._engine(target).call({"cmd": "rp-create", "resource": res, "id": name,
                                                     "not_after": not_after})
            if not reply.get("ok"):
                error = SlotPassed if reply.get("late") is True else EngineError
                raise error(f"rp-create {res} {name}: {reply.get('error')}")
            taken.append(_created(reply.get("recovery_point"), name))
        return min(taken)

    async def _exists(self, target: Target, resources: tuple[str, ...], name: str) -> float | None:
        """The creation time of `name` if every resource has it, else None."""
        taken = []
        for res in resources:
            reply = await self._engine(target).call({"cmd": "rp-list", "resource": res})
            if not reply.get("ok"):
                raise EngineError(f"rp-list {res}: {reply.get('error')}")
            rps = reply.get("recovery_points")
            if not isinstance(rps, list):
                raise EngineError(f"rp-list {res}: no list of recovery points in the reply")
            found = [m for m in rps if isinstance(m, dict) and m.get("id") == name]
            if not found:
                return None
            taken.append(_created(found[0], name))
        return min(taken)

    # -- the work ------------------------------------------------------------------------------

    async def _take(self, v: VmSchedule, slot_at: float) -> None:
        if v.target is None:
            if v.vm_id not in self._no_engine:
                self._no_engine.add(v.vm_id)
                log.warning("schedules: %s has no engine to ask (no Primary seen by the monitor, no "
                            "hypervisor with an engine_url): no recovery points", v.vm)
            return
        self._no_engine.discard(v.vm_id)
        slot_id = await self._claim(v, slot_at)
        if slot_id is None:
            return                      # already claimed: by us before, or by an earlier leader
        await self._attempt(slot_id, v, v.target, rp_name(v.vm_id, slot_at), slot_at + v.interval_s)

    async def _attempt(self, slot_id: int, v: VmSchedule, target: Target, name: str,
                       not_after: float) -> None:
        try:
            taken_at = await self._create(target, v.resources, name, not_after)
        except SlotPassed as e:
            log.warning("schedules: %s: RP %s on %s missed: %s", v.vm, name, target.name, e)
            self._retry_at.pop(slot_id, None)
            await self._failed(slot_id, f"late: {e}", final="missed")
            return
        except ENGINE_ERRORS as e:
            log.warning("schedules: %s: RP %s on %s failed: %s", v.vm, name, target.name, e)
            await self._failed(slot_id, f"{type(e).__name__}: {e}")
            self._retry_at[slot_id] = time.monotonic() + min(self.cfg.retry_s, v.interval_s / 4)
            return
        self._retry_at.pop(slot_id, None)
        await self._done(slot_id, v, target, name, taken_at)

    async def _resolve_claimed(self, by_vm: dict[int, VmSchedule]) -> None:
        rows = await (await self.conn.execute(
            """SELECT s.id, s.vm_id, extract(epoch FROM s.slot_at)::float8 AS slot_at, s.interval_s,
                      s.rp_name, h.id AS hv_id, h.name AS hv, h.engine_url, h.site_id
               FROM schedule_slots s LEFT JOIN hypervisors h ON h.id = s.hypervisor_id
               WHERE s.state = 'claimed' ORDER BY s.slot_at""")).fetchall()
        now_mono = time.monotonic()
        for r in rows:
            v = by_vm.get(r["vm_id"])
            if v is None or now_mono < self._retry_at.get(r["id"], 0):
                continue
            target = (Target(r["hv_id"], r["hv"], r["engine_url"], r["site_id"])
                      if r["hv_id"] is not None and r["engine_url"] else v.target)
            if target is None:
                continue
            if in_window(r["slot_at"], r["interval_s"], await self._now()):
                await self._attempt(r["id"], v, target, r["rp_name"], r["slot_at"] + r["interval_s"])
                continue
            try:                        # too late to take it: did the engine make it?
                taken_at = await self._exists(target, v.resources, r["rp_name"])
            except ENGINE_ERRORS as e:
                self._retry_at[r["id"]] = time.monotonic() + self.cfg.retry_s
                log.warning("schedules: %s: cannot check RP %s on %s: %s", v.vm, r["rp_name"], target.name, e)
                continue
            if taken_at is not None:
                await self._done(r["id"], v, target, r["rp_name"], taken_at)
            else:
                await self._failed(r["id"], "the slot's window passed without an RP", final="missed")

    async def _retention(self, v: VmSchedule) -> None:
        rows = await (await self.conn.execute(
            """SELECT s.id, extract(epoch FROM s.slot_at)::float8 AS slot_at, s.rp_name,
                      h.id AS hv_id, h.name AS hv, h.engine_url, h.site_id
               FROM schedule_slots s LEFT JOIN hypervisors h ON h.id = s.hypervisor_id
               WHERE s.vm_id = %s AND s.state = 'done'""", (v.vm_id,))).fetchall()
        doomed = set(to_expire([(r["slot_at"], r["rp_name"]) for r in rows], v.retention))
        for r in rows:
            if r["rp_name"] not in doomed or r["hv_id"] is None or not r["engine_url"]:
                continue
            target = Target(r["hv_id"], r["hv"], r["engine_url"], r["site_id"])
            refused = None
            try:
                for res in v.resources:
                    reply = await self._engine(target).call({"cmd": "rp-delete", "resource": res,
                                                             "id": r["rp_name"]})
                    if not reply.get("ok"):
                        refused = str(reply.get("error"))
            except ENGINE_ERRORS as e:
                log.warning("schedules: %s: retention of %s on %s: %s", v.vm, r["rp_name"], target.name, e)
                continue                # next tick
            async with self.conn.transaction():
                await self.conn.execute(
                    f"UPDATE schedule_slots SET state = %s, finished_at = now(), error = %s "
                    f"WHERE id = %s AND state = 'done' AND {FENCE}",
                    ("kept" if refused else "expired", refused and refused[:500], r["id"]))
                if not refused:
                    await self.conn.execute("DELETE FROM recovery_points WHERE vm_id = %s AND name = %s",
                                            (v.vm_id, r["rp_name"]))
            self.metrics.slots.labels(result="kept" if refused else "expired").inc()
            log.info("schedules: %s: RP %s %s", v.vm, r["rp_name"],
                     f"kept: {refused}" if refused else "expired")


def _created(manifest, name: str) -> float:
    """An engine RP's creation time, from a reply that must name that RP."""
    if not isinstance(manifest, dict) or manifest.get("id") != name:
        raise EngineError(f"the engine's reply does not describe RP {name}")
    created = manifest.get("created")
    if not isinstance(created, int | float) or isinstance(created, bool):
        raise EngineError(f"the engine's reply has no creation time for RP {name}")
    return float(created)
