"""Migrations against a real PostgreSQL: apply, re-apply, tamper, unknown version, concurrency."""

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from tandem.center import migrate as mig

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _versions(conn):
    return conn.execute("SELECT version, checksum FROM schema_migrations ORDER BY version").fetchall()


def test_files_are_numbered_without_gaps():
    found = mig.available()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].name == "catalogue"


def test_apply_then_reapply_is_a_noop(pg):
    name = pg.create_db()
    with pg.connect(name) as conn:
        applied = mig.migrate(conn)
        assert [m.version for m in applied] == [m.version for m in mig.available()]
        first = _versions(conn)
        assert [c for _v, c in first] == [m.checksum for m in mig.available()]
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"sites", "hypervisors", "protected_vms", "vm_volumes", "protection_policies",
                "recovery_plans", "network_mappings", "recovery_points", "runs", "run_steps", "alerts",
                "audit_log", "api_tokens", "schema_migrations"} <= tables
        assert mig.migrate(conn) == []
        assert _versions(conn) == first
        assert mig.pending(conn) == []


def test_pending_on_an_empty_database(pg):
    with pg.connect(pg.create_db()) as conn:
        assert [m.version for m in mig.pending(conn)] == [m.version for m in mig.available()]


def test_a_changed_applied_migration_is_refused(pg):
    with pg.connect(pg.create_db()) as conn:
        mig.migrate(conn)
        tampered = [replace(m, sql=m.sql + "\n-- edited") if m.version == 1 else m for m in mig.available()]
        with pytest.raises(mig.MigrationError, match="checksum mismatch"):
            mig.migrate(conn, tampered)
        # and when the stored checksum is what changed
        conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(mig.MigrationError, match="0001_catalogue was changed"):
            mig.pending(conn)


def test_a_new_migration_is_applied_after_the_others_in_order(pg):
    with pg.connect(pg.create_db()) as conn:
        mig.migrate(conn)
        extra = mig.Migration(len(mig.available()) + 1, "extra", "ALTER TABLE sites ADD COLUMN note text;")
        assert mig.migrate(conn, [*mig.available(), extra]) == [extra]
        conn.execute("INSERT INTO sites (name, note) VALUES ('a', 'n')")
        # this code does not know the new version: refuse rather than run on a newer schema
        with pytest.raises(mig.MigrationError, match="does not know"):
            mig.migrate(conn)


def test_a_failing_migration_leaves_nothing_behind(pg):
    with pg.connect(pg.create_db()) as conn:
        broken = mig.Migration(len(mig.available()) + 1, "broken", "CREATE TABLE half (x int); SELECT 1/0;")
        with pytest.raises(psycopg.errors.DivisionByZero):
            mig.migrate(conn, [*mig.available(), broken])
        assert conn.execute("SELECT to_regclass('schema_migrations'), to_regclass('sites'), "
                            "to_regclass('half')").fetchone() == (None, None, None)


def _cli(dsn: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TANDEM_CENTER_DSN": dsn, "PYTHONPATH": SRC, "TANDEM_CENTER_CONFIG": "/dev/null"}
    return subprocess.Popen([sys.executable, "-m", "tandem.center.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_concurrent_migrate_processes_serialise(pg):
    """Hold the migration lock, start two `tandem-center migrate`, check both wait on it, release:
    one applies everything, the other then finds nothing to do."""
    name = pg.create_db()
    with pg.connect(name) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (mig.MIGRATION_LOCK,))
        procs = [_cli(pg.dsn(name), "migrate") for _ in range(2)]
        deadline = time.monotonic() + 60
        waiting = 0
        while time.monotonic() < deadline and waiting < 2:
            waiting = blocker.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                      "AND NOT granted").fetchone()[0]
            time.sleep(0.1)
        assert waiting == 2, "both migrate processes should be waiting on the advisory lock"
        blocker.execute("COMMIT")
        outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    changed = sorted('"changed": true' in out for out, _err in outs)
    assert changed == [False, True], outs
    with pg.connect(name) as conn:
        assert [v for v, _c in _versions(conn)] == [m.version for m in mig.available()]


def test_cli_migrate_check(pg):
    name = pg.create_db()
    p = _cli(pg.dsn(name), "migrate", "--check")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 1 and "0001_catalogue" in out
    assert _cli(pg.dsn(name), "migrate").wait(timeout=60) == 0
    p = _cli(pg.dsn(name), "migrate", "--check")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and '"pending": []' in out
