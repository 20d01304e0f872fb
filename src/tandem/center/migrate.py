"""Versioned schema migrations: plain SQL files migrations/NNNN_name.sql, applied in order.

All pending files are applied in ONE transaction that first takes a transaction-level
advisory lock, so concurrent appliers (both control nodes starting at once) serialise: the
second waits, then finds everything applied and does nothing. Each applied file is recorded
in schema_migrations with its SHA-256; a recorded file whose content changed since, or a
database at a version this code does not know, is refused rather than guessed at.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

# pg_advisory_xact_lock key: "tandem-center migrations" (any constant shared by all nodes).
MIGRATION_LOCK = 0x7A4D_C0DE_0001
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped with this package, by version (gaps and duplicates refused)."""
    found = []
    for entry in resources.files("tandem.center").joinpath("migrations").iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        versions = [m.version for m in found]
        raise MigrationError(f"migration files must be numbered 1..N without gaps: {versions}")
    return found


def _applied(conn: psycopg.Connection) -> dict[int, str]:
    rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    return dict(rows)


def _check(known: list[Migration], applied: dict[int, str]) -> list[Migration]:
    """The pending migrations; raises on a changed or unknown applied one."""
    by_version = {m.version: m for m in known}
    unknown = sorted(set(applied) - set(by_version))
    if unknown:
        raise MigrationError(f"the database has migration(s) {unknown} that this tandem-center does not know "
                             "(it is older than the schema): upgrade it")
    for version, checksum in sorted(applied.items()):
        if by_version[version].checksum != checksum:
            raise MigrationError(f"migration {version:04d}_{by_version[version].name} was changed after it "
                                 "was applied (checksum mismatch): never edit an applied migration, add one")
    return [m for m in known if m.version not in applied]


def migrate(conn: psycopg.Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply the pending migrations; returns those applied (empty: nothing to do)."""
    known = available() if migrations is None else migrations
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                            version    integer PRIMARY KEY,
                            name       text NOT NULL,
                            checksum   text NOT NULL,
                            applied_at timestamptz NOT NULL DEFAULT now())""")
        pending = _check(known, _applied(conn))
        for m in pending:
            conn.execute(m.sql.encode())          # bytes: several statements, no parameters
            conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                         (m.version, m.name, m.checksum))
    return pending


def pending(conn: psycopg.Connection) -> list[Migration]:
    """What `migrate` would apply; raises like it on a changed or unknown migration."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
    return _check(available(), _applied(conn) if exists else {})
