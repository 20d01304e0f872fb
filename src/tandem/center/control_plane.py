"""Control-plane alerts: witness-down, db-sync-lost and vip-moved ([control_plane] in the config).

Every instance checks, each [control_plane] interval:

- the witness: a connection to the pg_auto_failover monitor (monitor_dsn_file: a read-only
  user; the file holds its password and is never logged) within `timeout`; if the user may
  read pgautofailover.node, the formation's nodes with their reported and goal states;
- the VIP: whether [control_plane] vip is on one of this node's interfaces, from the kernel's
  address list (`ip -j addr`, i.e. netlink). Not a bind() test: with net.ipv4.ip_nonlocal_bind=1,
  common beside keepalived, bind() succeeds for an address the node does not hold;
- its database: the synchronous standbys of the primary (pg_stat_replication; needs pg_monitor).

The instances whose database is the writable primary (both, when their DSNs name the primary
with target_session_attrs=read-write) record what they saw in cp_state (migration 0005) and
keep the alerts, in one transaction that locks the row:

- witness-down: some node's fresh report says the monitor has not answered for
  witness_down_after seconds; cleared when every fresh report says it answers. Reports are per
  node, so two instances that disagree do not flap the alert;
- db-sync-lost: no standby in sync/quorum state; when pg_monitor is missing, the monitor's view
  decides instead (no node reports `primary` with another one `secondary`: pg_auto_failover's
  wait_primary or single run without a synchronous standby). Both views go in the details;
- vip-moved: the VIP holder differs from the expected one. The instance that sees the VIP
  records its node as holder; one that no longer sees it clears the holder only if it was itself
  (the new holder may have written already). The expected holder is the first holder seen, then
  the one an operator accepted: acknowledging the vip-moved alert (POST /api/v1/alerts/ID/ack)
  makes its "to" the expected holder, and the next check clears the alert.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time

import psycopg
from psycopg import errors as pgerr
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from . import evaluate
from .config import ControlPlaneConfig
from .metrics import Metrics
from .monitor import database, sync_alerts
from .sinks import Notifier

log = logging.getLogger("tandem.center.control_plane")

IP = "ip"       # iproute2, found on PATH


async def local_addresses(timeout: float) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address on this node's interfaces (`ip -j addr show`); raises OSError on failure."""
    proc = await asyncio.create_subprocess_exec(IP, "-j", "addr", "show", stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OSError(f"{IP} addr did not answer within {timeout}s") from None
    if proc.returncode:
        raise OSError(f"{IP} addr: {err.decode(errors='replace').strip()[:200]}")
    found = set()
    for link in json.loads(out):
        for a in link.get("addr_info") or []:
            try:
                found.add(ipaddress.ip_address(a["local"]))
            except (KeyError, ValueError):
                continue
    return found


def witness_verdict(reports: dict, now: float, fresh_s: float) -> tuple[bool | None, dict]:
    """From the nodes' reports ({node: {"reachable", "error", "at"}}): down if a fresh one says
    so, up if fresh ones say it answers, else undecided (None); with the failing nodes' errors."""
    fresh = {n: r for n, r in reports.items()
             if isinstance(r, dict) and isinstance(r.get("at"), int | float) and now - r["at"] <= fresh_s}
    down = {n: r.get("error") for n, r in fresh.items() if r.get("reachable") is False}
    if down:
        return False, down
    if any(r.get("reachable") is True for r in fresh.values()):
        return True, {}
    return None, {}


class ControlPlaneWatch:
    def __init__(self, pool: AsyncConnectionPool, cfg: ControlPlaneConfig, notifier: Notifier,
                 metrics: Metrics | None = None):
        self.pool, self.cfg, self.notifier = pool, cfg, notifier
        self.metrics = metrics or Metrics()
        self.node = cfg.node_name or socket.gethostname()
        self.monitor_dsn = cfg.monitor_conninfo()       # read once; never logged
        self.vip = ipaddress.ip_address(cfg.vip) if cfg.vip else None
        self._witness_failing_since: float | None = None
        self._formation_refused = False

    async def run(self) -> None:
        """Check until cancelled."""
        self.notifier.start()
        try:
            while True:
                try:
                    await self.check()
                except (psycopg.Error, OSError, PoolTimeout) as e:
                    log.warning("control plane: check failed: %s", e)
                except Exception:           # never stop checking (and never take the server down)
                    log.exception("control plane: check failed")
                await asyncio.sleep(self.cfg.interval)
        finally:
            await self.notifier.close()

    # -- probes --------------------------------------------------------------------------------

    async def witness(self) -> dict:
        """{"reachable": True | False | None (failing, not yet for witness_down_after),
        "error", "formation"}, or {} without a monitor DSN."""
        if not self.monitor_dsn:
            return {}
        try:
            async with asyncio.timeout(self.cfg.timeout):
                # client_encoding: pg_autoctl creates the monitor's database SQL_ASCII, where
                # psycopg would give text as bytes.
                conn = await psycopg.AsyncConnection.connect(
                    self.monitor_dsn, autocommit=True, row_factory=dict_row, client_encoding="utf8",
                    connect_timeout=max(2, round(self.cfg.timeout)), application_name="tandem-center")
                async with conn:
                    formation = await self._formation(conn)
        except (psycopg.Error, OSError, TimeoutError) as e:
            # psycopg's messages name the host and port, never the password.
            error = str(e).strip() or type(e).__name__
            now = time.monotonic()
            since = self._witness_failing_since = self._witness_failing_since or now
            self.metrics.witness.set(0)
            down = now - since >= self.cfg.witness_down_after
            if down:
                log.warning("control plane: the witness does not answer: %s", error)
            return {"reachable": False if down else None, "error": error[:500], "formation": None}
        self._witness_failing_since = None
        self.metrics.witness.set(1)
        return {"reachable": True, "error": None, "formation": formation}

    async def _formation(self, conn) -> list[dict] | None:
        try:
            rows = await (await conn.execute(
                "SELECT nodename AS name, reportedstate::text AS reported, goalstate::text AS goal, health "
                "FROM pgautofailover.node WHERE formationid = %s ORDER BY nodeid",
                (self.cfg.formation,))).fetchall()
        except (pgerr.InsufficientPrivilege, pgerr.UndefinedTable, pgerr.InvalidSchemaName) as e:
            if not self._formation_refused:
                log.warning("control plane: cannot read the formation from the monitor (%s): only its "
                            "reachability is checked", e.diag.message_primary or type(e).__name__)
                self._formation_refused = True
            return None
        return [{k: v if isinstance(v, int | None) else str(v) for k, v in r.items()} for r in rows] or None

    async def vip_held(self) -> bool | None:
        if self.vip is None:
            return None
        try:
            held = self.vip in await local_addresses(self.cfg.timeout)
        except (OSError, ValueError) as e:
            log.warning("control plane: cannot list this node's addresses: %s", e)
            return None
        self.metrics.vip_held.set(1 if held else 0)
        return held

    # -- one check -------------------------------------------------------------------------

    async def check(self) -> dict:
        """Probe, record and keep the alerts; returns the snapshot evaluated ({} as a reader)."""
        witness = await self.witness()
        held = await self.vip_held()
        notices: list[tuple[str, dict]] = []
        async with database(self.pool, self.cfg.timeout, self.metrics) as conn:
            if conn is None:
                return {}
            async with conn.transaction():
                snapshot = await self._record(conn, witness, held)
                snapshot["sync_standbys"] = await self._sync_standbys(conn)
                conds = evaluate.control_plane_conditions(snapshot)
                for key in evaluate.control_plane_evaluated(snapshot):
                    notices += await sync_alerts(conn, key, [c for c in conds if c[0] == key])
        for event, alert in notices:
            self.notifier.notify(event, alert)
        return snapshot

    async def _sync_standbys(self, conn) -> int | None:
        row = await (await conn.execute(
            "SELECT pg_has_role(current_user, 'pg_monitor', 'USAGE') AS allowed, "
            "(SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')) AS n"
        )).fetchone()
        if row["allowed"]:
            return row["n"]
        log.debug("control plane: the database user lacks pg_monitor; pg_stat_replication is not read")
        return None

    async def _record(self, conn, witness: dict, held: bool | None) -> dict:
        """Write this node's observations into cp_state (row locked) and return the snapshot of
        the whole control plane they give."""
        row = await (await conn.execute(
            "SELECT *, extract(epoch FROM now())::float8 AS now FROM cp_state FOR UPDATE")).fetchone()
        now = row["now"]
        # Without a VIP configured here, leave the VIP columns to the instances that have one.
        vip = str(self.vip) if self.vip else row["vip"]
        holder, expected = row["vip_holder"], row["vip_expected"]
        if vip != row["vip"]:                       # a new VIP: start over
            holder = expected = None
        if held is True and holder != self.node:
            log.info("control plane: the VIP %s is on this node (%s); it was on %s", vip, self.node, holder)
            holder = self.node
        elif held is False and holder == self.node:
            holder = None
        acked = await (await conn.execute(
            "SELECT details->>'to' AS holder FROM alerts WHERE dedup_key = 'cp:vip-moved' "
            "AND state = 'acknowledged'")).fetchone()
        if acked and acked["holder"]:
            expected = acked["holder"]              # the operator accepted the new holder
        if expected is None and holder is not None:
            expected = holder                       # the first holder seen: nothing has moved
        reports = dict(row["witness"])
        if witness:
            reports[self.node] = {"reachable": witness["reachable"], "error": witness["error"], "at": now}
        formation = witness.get("formation") if witness else None
        await conn.execute(
            """UPDATE cp_state SET vip = %(vip)s, vip_holder = %(holder)s, vip_expected = %(expected)s,
                   vip_holder_since = CASE WHEN vip_holder IS DISTINCT FROM %(holder)s THEN now()
                                           ELSE vip_holder_since END,
                   witness = %(witness)s, formation = coalesce(%(formation)s, formation),
                   updated_at = now(), updated_by = %(node)s""",
            {"vip": vip, "holder": holder, "expected": expected, "witness": Jsonb(reports),
             "formation": Jsonb(formation) if formation is not None else None, "node": self.node})
        # Fresh: reported within a few checks (an instance that stopped checking stops counting).
        reachable, errors = witness_verdict(reports, now, 3 * self.cfg.interval + self.cfg.timeout
                                            + self.cfg.witness_down_after)
        return {"witness_reachable": reachable, "witness_error": errors or None, "formation": formation,
                "vip_holder": holder, "vip_expected": expected}
