"""witness-down against a REAL pg_auto_failover monitor (pg_autoctl create monitor + run, on a
Unix socket here), checked by `tandem-center serve` with a least-privilege monitor user: the
witness is killed (SIGKILL to pg_autoctl and its PostgreSQL), the webhook gets witness-down;
it is restarted, the webhook gets the recovery notice. The time from the kill to the alert is
recorded in tests/output/cp_alerts.json (not asserted)."""

import json
import sys
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# pytest puts tests/center on sys.path
from cp_harness import PG_AUTOCTL, AutoctlMonitor, Center, cleanup_dir, scratch  # noqa: E402
from test_monitor import Receiver, parse_metrics, sample, wait_for  # noqa: E402

from tests.engine.harness import free_port  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "output"
READER = "tandem_center_ro"
# The password the center's monitor DSN carries: trust auth here ignores it, but it must never
# show up in a log, an alert or a notice.
SECRET = "witness-Pa55-never-logged"
WITNESS_DOWN_AFTER = 1.0


def record(name: str, value) -> None:
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / "cp_alerts.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def witness():
    if not PG_AUTOCTL.exists():
        pytest.fail("pg_auto_failover is not installed: `make engine-deps` installs "
                    "postgresql-15-auto-failover and pg-auto-failover-cli")
    base = scratch("tandem-cp-witness-")
    mon = AutoctlMonitor(base, free_port())
    try:
        mon.create()
        mon.start()
        # The center's user on the monitor: log in, read pgautofailover.node, nothing else.
        mon.sql(f"CREATE ROLE {READER} LOGIN; GRANT CONNECT ON DATABASE pg_auto_failover TO {READER}; "
                f"GRANT USAGE ON SCHEMA pgautofailover TO {READER}; "
                f"GRANT SELECT ON pgautofailover.node TO {READER}")
        yield mon
    finally:
        mon.kill()
        cleanup_dir(base)


@pytest.fixture
def center(tmp_path, db, witness):
    receiver = Receiver()
    dsn_file = tmp_path / "monitor.dsn"
    dsn_file.write_text(witness.dsn(user=READER) + f" password={SECRET} connect_timeout=2\n")
    dsn_file.chmod(0o600)
    c = Center(tmp_path / "center", db.dsn, {
        "control_plane": {"enabled": True, "node_name": "cp-a", "monitor_dsn_file": str(dsn_file),
                          "interval": 0.5, "timeout": 2.0, "witness_down_after": WITNESS_DOWN_AFTER},
        "alerts": {"webhook_url": receiver.url, "webhook_timeout": 2.0}})
    try:
        yield c.start(), receiver
    finally:
        c.stop()
        receiver.close()


def cp_state(db) -> dict:
    with db.connect(row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM cp_state").fetchone()


def metrics(center) -> dict:
    return parse_metrics(center.http.get("/metrics").text)


def test_witness_down_raised_when_the_monitor_dies_and_cleared_when_it_is_back(db, witness, center):
    center, receiver = center
    key = "cp:witness-down"
    wait_for(lambda: (cp_state(db)["witness"].get("cp-a") or {}).get("reachable") is True,
             what="the witness seen reachable")
    assert sample(metrics(center), "tandem_control_plane_witness_reachable") == 1
    # The reader could read the formation: an empty one (no data node registered here) gives
    # nothing to cross-check, and no warning about privileges.
    assert "cannot read the formation" not in center.log.read_text()
    time.sleep(1.5)
    assert receiver.of(key) == []

    t_kill = time.monotonic()
    witness.kill()
    wait_for(lambda: receiver.of(key) == ["raised"], timeout=30, what="witness-down webhook")
    to_alert = time.monotonic() - t_kill
    assert sample(metrics(center), "tandem_control_plane_witness_reachable") == 0
    notice = next(n for n in receiver.notices if n["alert"]["dedup_key"] == key)["alert"]
    assert notice["kind"] == "witness-down" and notice["severity"] == "critical"
    assert "cp-a" in notice["details"]["error"]            # which node cannot reach it, and why
    assert cp_state(db)["witness"]["cp-a"]["reachable"] is False
    time.sleep(1.5)                                         # more checks: still one alert, one notice
    assert receiver.of(key) == ["raised"]

    t_back = time.monotonic()
    witness.start()
    wait_for(lambda: receiver.of(key) == ["raised", "cleared"], timeout=30, what="witness recovery notice")
    to_clear = time.monotonic() - t_back
    record("witness_kill_to_alert_s", round(to_alert, 2))
    record("witness_restart_to_clear_s", round(to_clear, 2))
    record("witness_settings", {"interval_s": 0.5, "timeout_s": 2.0,
                                "witness_down_after_s": WITNESS_DOWN_AFTER})

    # The monitor's password is in the DSN file only: not in the log, the alerts or the notices.
    assert SECRET not in center.log.read_text()
    assert SECRET not in json.dumps(receiver.notices)
    with db.connect() as conn:
        assert SECRET not in json.dumps(conn.execute("SELECT json_agg(a) FROM alerts a").fetchone()[0])
        assert SECRET not in json.dumps(conn.execute("SELECT row_to_json(c) FROM cp_state c").fetchone()[0])


def test_a_monitor_user_without_read_access_still_gives_reachability(tmp_path, db, witness):
    """A user that may only log in: reachability is checked, the formation is not (one warning)."""
    witness.sql("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tandem_login_only') "
                "THEN CREATE ROLE tandem_login_only LOGIN; END IF; END$$")
    dsn_file = tmp_path / "monitor.dsn"
    dsn_file.write_text(witness.dsn(user="tandem_login_only") + "\n")
    dsn_file.chmod(0o600)
    c = Center(tmp_path / "center", db.dsn, {"control_plane": {
        "enabled": True, "node_name": "cp-b", "monitor_dsn_file": str(dsn_file), "interval": 0.5}})
    try:
        c.start()
        wait_for(lambda: (cp_state(db)["witness"].get("cp-b") or {}).get("reachable") is True,
                 what="the witness seen reachable")
        assert cp_state(db)["formation"] is None
        time.sleep(1.2)
        assert c.log.read_text().count("cannot read the formation") == 1
    finally:
        c.stop()
    with db.connect() as conn:          # (db-sync-lost is raised: this PostgreSQL has no standby)
        assert conn.execute("SELECT count(*) FROM alerts WHERE kind = 'witness-down'").fetchone()[0] == 0




def test_db_sync_lost_from_the_monitors_formation_when_pg_monitor_is_missing(tmp_path, db, witness):
    """A real data node registered with the monitor (`pg_autoctl create postgres`): alone, it
    reports `single` (no synchronous standby). The center's database user lacks pg_monitor, so
    the monitor's view decides: db-sync-lost, with the formation in the details."""
    node = witness.data_node("node1", free_port())
    try:
        wait_for(lambda: witness.sql("SELECT reportedstate FROM pgautofailover.node WHERE nodename = 'node1'")
                 == "single", timeout=90, what="node1 registered as single")
        with db.connect() as conn:                # a center user without pg_monitor
            conn.execute("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tandem_app') "
                         "THEN CREATE ROLE tandem_app LOGIN; END IF; END$$")
            conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO tandem_app; "
                         "GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO tandem_app")
        dsn_file = tmp_path / "monitor.dsn"
        dsn_file.write_text(witness.dsn(user=READER) + "\n")
        dsn_file.chmod(0o600)
        c = Center(tmp_path / "center", db.dsn.replace("user=postgres", "user=tandem_app"), {
            "control_plane": {"enabled": True, "node_name": "cp-a", "monitor_dsn_file": str(dsn_file),
                              "interval": 0.5}})
        try:
            c.start()
            with db.connect(row_factory=psycopg.rows.dict_row) as conn:
                alert = wait_for(lambda: conn.execute(
                    "SELECT details FROM alerts WHERE dedup_key = 'cp:db-sync-lost' AND state = 'raised'"
                ).fetchone(), what="db-sync-lost from the formation")
            assert alert["details"]["sync_standbys"] is None
            got = [(n["name"], n["reported"]) for n in alert["details"]["formation"]]
            assert got == [("node1", "single")]
            assert cp_state(db)["formation"][0]["name"] == "node1"
        finally:
            c.stop()
    finally:
        node.stop()
