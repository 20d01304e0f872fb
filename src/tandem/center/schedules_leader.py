"""Leadership of the schedules: one instance in the cluster at a time.

The leader is the instance whose dedicated database connection (not a pooled one) is on the
writable primary AND holds a session-level advisory lock. Session-level, on a connection of
its own, so the lock lives exactly as long as that session: a leader that crashes, is killed
or loses its network loses its connection, and PostgreSQL releases the lock with it (on a
kill, at once; on a silent network loss, after the TCP keepalive/user timeout set below). A
control-plane failover kills every session on the old primary: the new primary has no lock,
and the first instance that reconnects takes it.

Every statement the scheduler runs as leader goes through this same connection and checks the
lock in the statement itself (FENCE), so a claim cannot be written by an instance that has
lost the lock, even between two of its checks.
"""

from __future__ import annotations

import contextlib
import logging

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

log = logging.getLogger("tandem.center.schedules")

# pg_try_advisory_lock(int4, int4) key: "TaNd" and 2 (migrations use a bigint key of their own).
LOCK_CLASS, LOCK_OBJ = 0x54614E64, 2
# True while this session holds the lock; part of every leader write.
FENCE = ("EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
         f"AND pid = pg_backend_pid() AND classid = {LOCK_CLASS} AND objid = {LOCK_OBJ} AND objsubid = 2)")
# Server-side detection of a leader that vanished without closing its connection (host or
# network loss): its backend, and with it the lock, goes after about 10 + 3*3 s of silence.
SERVER_KEEPALIVE = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=3 -c tcp_keepalives_count=3"


class Leadership:
    """The dedicated connection and the lock. `ensure()` once per tick: True while leading."""

    def __init__(self, conninfo: str, instance: str, connect_timeout: float = 5.0):
        self.conninfo, self.instance, self.connect_timeout = conninfo, instance, connect_timeout
        self.conn: psycopg.AsyncConnection | None = None
        self.leading = False

    async def _connect(self) -> psycopg.AsyncConnection:
        extra = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
        if "options" not in conninfo_to_dict(self.conninfo):
            extra["options"] = SERVER_KEEPALIVE
        return await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, row_factory=dict_row, connect_timeout=int(self.connect_timeout),
            application_name="tandem-center-scheduler", **extra)

    async def ensure(self) -> bool:
        """Connect if needed; lead if the database is the writable primary and the lock is free
        (or already ours). Any database error drops the connection: not leading."""
        try:
            if self.conn is None or self.conn.closed:
                self.leading = False
                self.conn = await self._connect()
            row = await (await self.conn.execute(
                "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::bool AS ro, "
                f"{FENCE} AS held")).fetchone()
            if row["ro"]:
                # A standby (or a read-only database): never lead from here. A lock taken on it
                # would be local to the standby anyway; drop the session to release it.
                await self.drop("the database is read-only")
                return False
            if not row["held"]:
                row = await (await self.conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS got",
                                                     (LOCK_CLASS, LOCK_OBJ))).fetchone()
                if row["got"]:
                    await self.conn.execute(
                        "INSERT INTO schedule_leader (holder, since, seen_at) VALUES (%s, now(), now()) "
                        "ON CONFLICT (singleton) DO UPDATE SET holder = EXCLUDED.holder, since = now(), "
                        "seen_at = now()", (self.instance,))
                    log.info("schedules: %s is the leader", self.instance)
            else:
                await self.conn.execute(f"UPDATE schedule_leader SET seen_at = now() WHERE holder = %s "
                                        f"AND {FENCE}", (self.instance,))
                row = {"got": True}
            if self.leading and not row["got"]:
                log.warning("schedules: %s lost the lead", self.instance)
            self.leading = bool(row["got"])
        except (psycopg.Error, OSError) as e:
            await self.drop(f"database error: {e}")
        return self.leading

    async def drop(self, why: str) -> None:
        if self.leading:
            log.warning("schedules: %s no longer leads: %s", self.instance, why)
        self.leading = False
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()
