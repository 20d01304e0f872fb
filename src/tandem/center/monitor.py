"""Follow every engine in the catalogue over mutual TLS (tandemd's monitor endpoint).

For each hypervisor with an `engine_url` (tls://HOST:PORT) two tasks run:

- a status poll every [monitor] interval (sooner after an event): the status feeds /metrics,
  the state table (engine_resource_state, a 'state' row in engine_events on each change of
  mode, role or connection) and the alerts (tandem.center.evaluate);
- the events stream: every engine event is recorded in engine_events, and wakes the poll.

Failures back off exponentially up to [monitor] backoff_max; an engine that has not answered
for unreachable_after seconds raises engine-unreachable. The engine's certificate must chain
to engine_ca and name the hypervisor (its catalogue name is tandemd's node name).

Every center instance polls and serves /metrics; only the one whose database connection is
on the writable primary writes (state, events, alerts) and sends notices (tandem.center.sinks).
A read-only or unreachable database makes this instance a reader: "standby" or "unknown" on
/metrics. Alerts are de-duplicated in the database (one open alert per key), so a notice goes
out when an alert is raised and when it clears (the recovery notice), not at every poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from urllib.parse import urlsplit

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from . import alerts, evaluate, status
from .config import MonitorConfig
from .metrics import Metrics
from .sinks import Notifier

log = logging.getLogger("tandem.center.monitor")

MAX_LINE = 16 << 20       # a status of many resources; more is a broken or hostile engine


class EngineError(Exception):
    pass


def parse_url(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    if u.scheme != "tls" or not u.hostname or not u.port:
        raise EngineError(f"engine_url {url!r}: expected tls://HOST:PORT")
    return u.hostname, u.port


def client_context(cfg: MonitorConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=cfg.engine_ca)
    ctx.load_cert_chain(cfg.client_cert, cfg.client_key)
    return ctx


class Engine:
    """One engine's monitor endpoint."""

    def __init__(self, name: str, url: str, ctx: ssl.SSLContext, timeout: float):
        self.name, self.url, self.ctx, self.timeout = name, url, ctx, timeout
        self.host, self.port = parse_url(url)

    async def _open(self, request: dict):
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ctx, server_hostname=self.name, limit=MAX_LINE)
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
        return reader, writer

    @staticmethod
    def _decode(line: bytes) -> dict:
        if not line:
            raise EngineError("the engine closed the connection")
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise EngineError("the engine sent something else than a JSON object")
        return obj

    async def status(self) -> list[dict]:
        reader, writer = await self._open({"cmd": "status"})
        try:
            async with asyncio.timeout(self.timeout):
                reply = self._decode(await reader.readline())
        finally:
            writer.close()
        if not reply.get("ok") or not isinstance(reply.get("resources"), list):
            raise EngineError(f"status refused: {reply.get('error')}")
        return reply["resources"]

    async def events(self):
        reader, writer = await self._open({"cmd": "events"})
        try:
            while True:
                yield self._decode(await reader.readline())
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def database(pool: AsyncConnectionPool, timeout: float, metrics: Metrics, read: bool = False):
    """A connection if this instance writes (its database is the writable primary), else None;
    with read=True also a read-only one (as (conn, writable)). Sets the control-plane role on
    /metrics."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            conn = await stack.enter_async_context(pool.connection(timeout=timeout))
            # A standby, or a database made read-only (the API's 503 case): read, do not write.
            row = await (await conn.execute(
                "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::bool AS ro"
            )).fetchone()
        except (psycopg.OperationalError, PoolTimeout) as e:
            log.warning("monitor: database unavailable: %s", e)
            metrics.set_role("unknown")
            yield (None, False) if read else None
            return
        metrics.set_role("standby" if row["ro"] else "primary")
        if read:
            yield conn, not row["ro"]
        else:
            yield None if row["ro"] else conn


class Monitor:
    def __init__(self, pool: AsyncConnectionPool, cfg: MonitorConfig, notifier: Notifier,
                 metrics: Metrics | None = None):
        self.pool, self.cfg, self.notifier = pool, cfg, notifier
        self.metrics = metrics or Metrics()
        self.ctx = client_context(cfg)
        self.followers: dict[str, tuple[str, list[asyncio.Task]]] = {}    # hv -> (url, tasks)
        self._wake: dict[str, asyncio.Event] = {}
        self._unreachable: dict[str, tuple[float, str]] = {}             # hv -> (since, error)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the catalogue until cancelled."""
        self.notifier.start()
        try:
            while True:
                try:
                    await self._refresh()
                    await self._catalogue_metrics()
                except (psycopg.Error, OSError, PoolTimeout) as e:
                    log.warning("monitor: cannot read the catalogue: %s", e)
                    self.metrics.set_role("unknown")
                await asyncio.sleep(max(self.cfg.interval, 1.0))
        finally:
            for _, tasks in self.followers.values():
                for t in tasks:
                    t.cancel()
            for _, tasks in self.followers.values():
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
            await self.notifier.close()

    async def _refresh(self) -> None:
        async with self.pool.connection(timeout=self.cfg.connect_timeout) as conn:
            rows = await (await conn.execute(
                "SELECT name, engine_url FROM hypervisors WHERE engine_url LIKE 'tls://%%'")).fetchall()
        wanted = {r["name"]: r["engine_url"] for r in rows}
        for hv in list(self.followers):
            if wanted.get(hv) != self.followers[hv][0]:
                for t in self.followers.pop(hv)[1]:
                    t.cancel()
        for hv, url in wanted.items():
            if hv not in self.followers:
                try:
                    engine = Engine(hv, url, self.ctx, self.cfg.connect_timeout)
                except EngineError as e:
                    log.error("monitor: hypervisor %s: %s", hv, e)
                    continue
                self._wake[hv] = asyncio.Event()
                self.followers[hv] = (url, [asyncio.create_task(self._poll(engine), name=f"poll-{hv}"),
                                            asyncio.create_task(self._follow(engine), name=f"events-{hv}")])
        self.metrics.set_engines(set(wanted))

    async def _catalogue_metrics(self) -> None:
        """VM status, plan readiness and last drills on /metrics, as the dashboard sees them
        (any instance: only reads)."""
        async with self._writer(read=True) as (conn, _writable):
            if conn is None:
                return
            stale_s = status.stale_after(self.cfg.interval, self.cfg.connect_timeout)
            try:
                vms = await status.vm_statuses(conn, await status.open_alerts(conn), stale_s)
                plans = await status.plan_readiness(conn, vms)
                drills = await status.last_drills(conn)
            except (AttributeError, KeyError, TypeError, ValueError) as e:     # never stop following
                log.error("monitor: catalogue metrics: unexpected catalogue content: %r", e)
                return
        self.metrics.update_catalogue({vm["name"]: vm["status"].colour for vm in vms}, plans, drills)

    def _backoff(self, failures: int) -> float:
        return min(self.cfg.interval * (2 ** min(failures, 16)), self.cfg.backoff_max)

    # -- per engine --------------------------------------------------------------------------

    async def _poll(self, engine: Engine) -> None:
        failures = 0
        while True:
            try:
                resources = await engine.status()
            except (OSError, ssl.SSLError, TimeoutError, ValueError, EngineError) as e:
                failures += 1
                error = f"{type(e).__name__}: {e}"
                await self._guarded(engine.name, self._on_unreachable(engine.name, error))
                delay = self._backoff(failures)
            else:
                failures = 0
                await self._guarded(engine.name, self._on_status(engine.name, resources))
                delay = self.cfg.interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake[engine.name].wait()
            self._wake[engine.name].clear()

    async def _follow(self, engine: Engine) -> None:
        failures = 0
        while True:
            try:
                async for event in engine.events():
                    failures = 0
                    if event.get("event") != "exists":       # the stream's opening snapshot
                        await self._guarded(engine.name, self._record_event(engine.name, event))
                    self._wake[engine.name].set()
            except (OSError, ssl.SSLError, TimeoutError, ValueError, EngineError) as e:
                log.info("monitor: events of %s: %s", engine.name, e)
            failures += 1
            await asyncio.sleep(self._backoff(failures))

    # -- database ----------------------------------------------------------------------------

    def _writer(self, read: bool = False):
        return database(self.pool, self.cfg.connect_timeout, self.metrics, read)

    @staticmethod
    async def _guarded(what: str, coro) -> None:
        """A database failure (or a malformed status from an engine) while recording is logged;
        the follower goes on."""
        try:
            await coro
        except psycopg.Error as e:
            log.warning("monitor: %s: database error: %s", what, e)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.error("monitor: %s: unexpected status or event from the engine: %r", what, e)

    async def _record_event(self, hv: str, event: dict) -> None:
        detail = {k: v for k, v in event.items() if k not in ("ts", "resource", "event")}
        async with self._writer() as conn:
            if conn is None:
                return
            await conn.execute(
                "INSERT INTO engine_events (hypervisor_id, resource, event, engine_ts, detail) "
                "SELECT id, %s, %s, to_timestamp(%s), %s FROM hypervisors WHERE name = %s",
                (str(event.get("resource"))[:200], str(event.get("event"))[:100] or "?",
                 event.get("ts") if isinstance(event.get("ts"), int | float) else None,
                 Jsonb(detail), hv))

    async def _policies(self, conn) -> dict[str, evaluate.Policy]:
        rows = await (await conn.execute(
            "SELECT DISTINCT vv.resource, v.name AS vm, p.rp_interval_s, p.sync_timeout_s "
            "FROM vm_volumes vv JOIN protected_vms v ON v.id = vv.vm_id "
            "JOIN protection_policies p ON p.id = v.policy_id")).fetchall()
        return {r["resource"]: evaluate.Policy(r["vm"], r["rp_interval_s"], r["sync_timeout_s"])
                for r in rows}

    async def _on_status(self, hv: str, resources: list[dict]) -> None:
        self.metrics.set_reachable(hv, True)
        was_unreachable = self._unreachable.pop(hv, None)
        notices: list[tuple[str, dict]] = []
        async with self._writer(read=True) as (conn, writable):
            policies = {}
            if conn is not None:
                policies = await self._policies(conn)
            self.metrics.update(hv, resources, {n: p.vm for n, p in policies.items()})
            if not writable:
                return
            now = time.time()
            async with conn.transaction():
                hv_id = (await (await conn.execute("SELECT id FROM hypervisors WHERE name = %s",
                                                   (hv,))).fetchone() or {}).get("id")
                if hv_id is None:
                    return
                if was_unreachable:
                    await self._center_event(conn, hv_id, None, "reachable",
                                             {"unreachable_s": round(now - was_unreachable[0], 1)})
                desired = []
                for res in resources:
                    await self._record_state(conn, hv_id, res)
                    desired += evaluate.resource_conditions(hv, res, policies.get(res["name"]), now,
                                                            self.cfg.rpo_max_bytes)
                notices += await self._sync_alerts(conn, f"engine:{hv}:", desired)
                notices += await self._sync_alerts(conn, f"engine-unreachable:{hv}", [])
        for event, alert in notices:
            self.notifier.notify(event, alert)

    async def _on_unreachable(self, hv: str, error: str) -> None:
        self.metrics.set_reachable(hv, False)
        first = hv not in self._unreachable
        since = self._unreachable.setdefault(hv, (time.time(), error))[0]
        notices = []
        async with self._writer() as conn:
            if conn is None:
                return
            async with conn.transaction():
                if first:
                    hv_id = (await (await conn.execute("SELECT id FROM hypervisors WHERE name = %s",
                                                       (hv,))).fetchone() or {}).get("id")
                    if hv_id is not None:
                        await self._center_event(conn, hv_id, None, "unreachable", {"error": error[:500]})
                notices = await self._sync_alerts(
                    conn, f"engine-unreachable:{hv}",
                    evaluate.unreachable_condition(hv, since, time.time(), self.cfg.unreachable_after, error))
        for event, alert in notices:
            self.notifier.notify(event, alert)

    @staticmethod
    async def _center_event(conn, hv_id: int, resource: str | None, event: str, detail: dict) -> None:
        await conn.execute("INSERT INTO engine_events (hypervisor_id, resource, event, source, detail) "
                           "VALUES (%s, %s, %s, 'center', %s)", (hv_id, resource, event, Jsonb(detail)))

    async def _record_state(self, conn, hv_id: int, res: dict) -> None:
        m = evaluate.mode(res)
        f = evaluate.figures(res)
        status = {k: v for k, v in res.items() if k != "stats"}
        old = await (await conn.execute(
            "SELECT role, connection, mode FROM engine_resource_state "
            "WHERE hypervisor_id = %s AND resource = %s",
            (hv_id, res["name"]))).fetchone()
        new = {"role": res.get("role"), "connection": res.get("connection"), "mode": m}
        changed = old is None or any(old[k] != v for k, v in new.items())
        await conn.execute(
            """INSERT INTO engine_resource_state AS s (hypervisor_id, resource, role, connection, mode,
                   rpo_bytes, rpo_seconds, last_rp_age_s, status)
               VALUES (%(hv)s, %(res)s, %(role)s, %(connection)s, %(mode)s, %(rb)s, %(rs)s, %(age)s, %(st)s)
               ON CONFLICT (hypervisor_id, resource) DO UPDATE SET role = EXCLUDED.role,
                   connection = EXCLUDED.connection, mode = EXCLUDED.mode, rpo_bytes = EXCLUDED.rpo_bytes,
                   rpo_seconds = EXCLUDED.rpo_seconds, last_rp_age_s = EXCLUDED.last_rp_age_s,
                   status = EXCLUDED.status, seen_at = now(),
                   changed_at = CASE WHEN (s.role, s.connection, s.mode)
                                        IS DISTINCT FROM (EXCLUDED.role, EXCLUDED.connection, EXCLUDED.mode)
                                     THEN now() ELSE s.changed_at END""",
            {"hv": hv_id, "res": res["name"], **new, "rb": f["rpo_bytes"], "rs": f["rpo_seconds"],
             "age": f["last_rp_age_s"], "st": Jsonb(status)})
        if changed:
            await self._center_event(conn, hv_id, res["name"], "state",
                                     {"from": dict(old) if old else None, "to": new})

    @staticmethod
    async def _sync_alerts(conn, prefix: str, desired: list[tuple]) -> list[tuple[str, dict]]:
        return await sync_alerts(conn, prefix, desired)


async def sync_alerts(conn, prefix: str, desired: list[tuple]) -> list[tuple[str, dict]]:
    """Keep exactly `desired` open among the alerts whose key starts with prefix; the notices
    to send ("raised" | "cleared", alert)."""
    notices = []
    keys = set()
    for key, kind, severity, subject, details in desired:
        keys.add(key)
        alert_id, new = await alerts.raise_alert(conn, key, kind, severity, subject, details)
        if new:
            notices.append(("raised", {"id": alert_id, "dedup_key": key, "kind": kind,
                                       "severity": severity, "subject": subject, "details": details}))
    open_rows = await (await conn.execute(
        "SELECT id, dedup_key, kind, severity, subject, details FROM alerts "
        "WHERE state <> 'cleared' AND starts_with(dedup_key, %s)", (prefix,))).fetchall()
    for row in open_rows:
        if row["dedup_key"] not in keys:
            await alerts.clear_alert(conn, row["dedup_key"])
            notices.append(("cleared", dict(row)))
    return notices
