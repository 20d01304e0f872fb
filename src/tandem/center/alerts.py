"""Alerts with de-duplication: one open alert per dedup key. Raising an open key again only
refreshes last_seen_at; clearing closes it (the next raise opens a new one). The monitoring
(to come) calls raise_alert/clear_alert; the API lists and acknowledges."""

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb


async def raise_alert(conn: AsyncConnection, dedup_key: str, kind: str, severity: str, subject: str,
                      details: dict | None = None) -> tuple[int, bool]:
    """(alert id, True if newly raised) -- False when the key was already open."""
    row = await (await conn.execute(
        """INSERT INTO alerts (dedup_key, kind, severity, subject, details) VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (dedup_key) WHERE state <> 'cleared'
           DO UPDATE SET last_seen_at = now(), severity = EXCLUDED.severity, details = EXCLUDED.details
           RETURNING id, (xmax = 0) AS inserted""",
        (dedup_key, kind, severity, subject, Jsonb(details or {})))).fetchone()
    return row["id"], row["inserted"]


async def clear_alert(conn: AsyncConnection, dedup_key: str) -> int | None:
    """Clear the open alert of this key; its id, or None if none was open."""
    row = await (await conn.execute(
        "UPDATE alerts SET state = 'cleared', cleared_at = now() WHERE dedup_key = %s AND state <> 'cleared' "
        "RETURNING id", (dedup_key,))).fetchone()
    return row["id"] if row else None
