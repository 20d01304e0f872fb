"""The audit log: every mutating call records who, what, when, inputs and result.

`audited()` runs the change in a transaction and inserts the audit row in that same
transaction, so a change is never committed without its record. When the change fails, it
rolls back and the refusal is recorded on its own (who tried what, and why it was refused).
The table itself refuses UPDATE, DELETE and TRUNCATE (a trigger, migration 0001).
"""

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from .errors import http_error

if TYPE_CHECKING:            # auth records denials here: no import cycle at run time
    from .auth import Principal

log = logging.getLogger("tandem.center.audit")

REDACTED = "<redacted>"
_SECRET_WORDS = ("password", "passwd", "secret", "token", "private_key", "passphrase", "credential")


def redact(value: Any) -> Any:
    """A copy of `value` with the values of secret-looking keys replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


@dataclass
class Entry:
    """What the audited block reports: the target it changed and its result."""
    target: str | None = None
    result: dict = field(default_factory=dict)


async def write(conn: AsyncConnection, actor: str, action: str, target: str | None, inputs: dict,
                ok: bool, result: dict) -> None:
    await conn.execute("INSERT INTO audit_log (actor, action, target, inputs, ok, result) "
                       "VALUES (%s, %s, %s, %s, %s, %s)",
                       (actor, action, target, Jsonb(redact(inputs)), ok, Jsonb(redact(result))))


@asynccontextmanager
async def audited(conn: AsyncConnection, who: "Principal", action: str, inputs: dict,
                  target: str | None = None):
    entry = Entry(target=target)
    try:
        async with conn.transaction():
            yield entry
            await write(conn, who.name, action, entry.target, inputs, True, entry.result)
    except Exception as exc:
        status, message = http_error(exc)
        try:
            await write(conn, who.name, action, entry.target, inputs, False,
                        {"status": status, "error": message})
        except psycopg.errors.ReadOnlySqlTransaction:      # a standby: the client gets its 503
            log.info("not recording the refused %s by %s: the database is read-only here", action, who.name)
        except Exception:       # the database itself is failing: the request fails anyway
            log.exception("cannot record the refused %s by %s", action, who.name)
        raise
