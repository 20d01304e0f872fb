"""The trio's database on this machine: a REAL primary and a streaming standby (pg_basebackup),
synchronous_standby_names naming the standby, as pg_auto_failover sets it up.

- db-sync-lost: the standby is stopped and, as pg_auto_failover's wait_primary does, the
  primary drops synchronous_standby_names (else every commit, the alert's too, would wait);
  the center raises db-sync-lost; the standby comes back in sync: cleared.
- an instance whose database is that standby (read-only, pg_is_in_recovery) serves /health,
  /metrics and GET endpoints, and refuses changes with 503 (not 500), writing nothing.
"""

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# pytest puts tests/center on sys.path
from cp_harness import PG_BIN, Center, PgNode, cleanup_dir, run, scratch  # noqa: E402
from test_cp_witness import metrics, record  # noqa: E402
from test_monitor import Receiver, sample, wait_for  # noqa: E402

from tandem.center import migrate as mig  # noqa: E402

# By its package path: a bare `conftest` is whichever test directory's conftest was imported
# first (tests/unit's when the whole suite runs).
from tests.center.conftest import Cluster, make_db  # noqa: E402

STANDBY = "standby1"
SYNC_NAMES = f"'ANY 1 ({STANDBY})'"
API = "/api/v1"


@pytest.fixture(scope="module")
def trio_db():
    """(primary, standby, db): a migrated database with tokens, replicated synchronously."""
    base = scratch("tandem-cp-sync-")
    primary, standby = PgNode(base, "primary"), PgNode(base, "standby")
    try:
        primary.init(wal_level="replica", max_wal_senders=5, wal_sender_timeout="'2s'", max_connections=50)
        primary.start()
        cluster = Cluster(str(primary.sock))
        db = make_db(cluster, _migrated(cluster))
        run(PG_BIN / "pg_basebackup", "-D", standby.data, "-h", primary.sock, "-p", "5432", "-U", "postgres",
            "-c", "fast", "-X", "stream", "--no-sync")
        standby.configure(unix_socket_directories=f"'{standby.sock}'", hot_standby="on",
                          primary_conninfo=f"'host={primary.sock} port=5432 user=postgres "
                                           f"application_name={STANDBY}'",
                          wal_receiver_status_interval="'1s'")
        run("touch", standby.data / "standby.signal")
        standby.start()
        # Synchronous only now: with no standby yet, every commit would wait.
        primary.sql(f"ALTER SYSTEM SET synchronous_standby_names = {SYNC_NAMES}")
        primary.sql("SELECT pg_reload_conf()")
        wait_for(lambda: primary.sql("SELECT sync_state FROM pg_stat_replication") in ("sync", "quorum"),
                 what="the standby in sync")
        yield primary, standby, db
    finally:
        standby.stop("immediate")
        primary.stop("immediate")
        cleanup_dir(base)


def _migrated(cluster: Cluster) -> str:
    name = cluster.create_db()
    with cluster.connect(name) as conn:
        mig.migrate(conn)
    return name


def updated_by(db) -> str | None:
    with db.connect() as conn:
        return conn.execute("SELECT updated_by FROM cp_state").fetchone()[0]


def alert_states(db, key: str) -> list[str]:
    with db.connect() as conn:
        return [r[0] for r in conn.execute("SELECT state FROM alerts WHERE dedup_key = %s ORDER BY id",
                                           (key,))]


def test_db_sync_lost_when_the_standby_stops_and_cleared_when_it_is_back(tmp_path, trio_db):
    primary, standby, db = trio_db
    key = "cp:db-sync-lost"
    receiver = Receiver()
    center = Center(tmp_path / "center", db.dsn, {
        "control_plane": {"enabled": True, "node_name": "cp-a", "interval": 0.5, "timeout": 2.0},
        "alerts": {"webhook_url": receiver.url, "webhook_timeout": 2.0}})
    try:
        center.start()
        wait_for(lambda: updated_by(db) == "cp-a", what="a first check recorded")
        time.sleep(1.5)                              # several checks with the standby in sync
        assert receiver.of(key) == [] and alert_states(db, key) == []

        standby.stop("immediate")
        t_stop = time.monotonic()
        # pg_auto_failover's wait_primary: synchronous replication off, writes go on.
        primary.sql("ALTER SYSTEM SET synchronous_standby_names = ''")
        primary.sql("SELECT pg_reload_conf()")
        wait_for(lambda: receiver.of(key) == ["raised"], timeout=30, what="db-sync-lost webhook")
        lost_s = time.monotonic() - t_stop
        notice = next(n for n in receiver.notices if n["alert"]["dedup_key"] == key)["alert"]
        assert notice["severity"] == "critical" and notice["details"]["sync_standbys"] == 0

        standby.start()
        primary.sql(f"ALTER SYSTEM SET synchronous_standby_names = {SYNC_NAMES}")
        primary.sql("SELECT pg_reload_conf()")
        wait_for(lambda: receiver.of(key) == ["raised", "cleared"], timeout=60, what="sync recovered")
        assert alert_states(db, key) == ["cleared"]
        record("db_sync_lost_standby_stop_to_alert_s", round(lost_s, 2))
    finally:
        center.stop()
        receiver.close()


def test_an_instance_on_the_standby_serves_reads_health_and_metrics_and_refuses_writes(tmp_path, trio_db):
    primary, standby, db = trio_db
    if standby.sql("SELECT pg_is_in_recovery()") != "t":
        pytest.fail("the standby is not in recovery")
    wait_for(lambda: primary.sql("SELECT sync_state FROM pg_stat_replication") in ("sync", "quorum"),
             what="the standby streaming")
    with db.connect() as conn:                       # something to read, replicated
        conn.execute("INSERT INTO sites (name) VALUES ('site-a')")
    wait_for(lambda: standby.sql("SELECT count(*) FROM sites", dbname=db.name) == "1", what="replayed")
    before = primary.sql("SELECT (SELECT count(*) FROM audit_log) || ',' || (SELECT count(*) FROM sites)",
                         dbname=db.name)

    center = Center(tmp_path / "reader", standby.dsn(db.name), {
        "control_plane": {"enabled": True, "node_name": "cp-b", "interval": 0.5, "timeout": 2.0}})
    try:
        center.start()
        http = center.http
        reader = {"Authorization": f"Bearer {db.tokens['reader']}"}
        admin = {"Authorization": f"Bearer {db.tokens['admin']}"}
        assert (http.get("/health").status_code, http.get("/health").json()) == (200, {"status": "ok"})
        r = http.get(API + "/sites", headers=reader)
        assert r.status_code == 200 and [s["name"] for s in r.json()] == ["site-a"]
        assert http.get(API + "/alerts", headers=reader).status_code == 200
        wait_for(lambda: sample(metrics(center), "tandem_control_plane_role", role="standby") == 1,
                 what="role standby on /metrics")
        for method, path, body in (("POST", "/sites", {"name": "site-b"}), ("DELETE", "/sites/1", None),
                                   ("POST", "/runs", {"kind": "drill"})):
            r = http.request(method, API + path, json=body, headers=admin)
            assert r.status_code == 503, (method, path, r.status_code, r.text)
            assert "read-only" in r.json()["detail"]
        time.sleep(1.5)                              # several control-plane checks: a reader writes nothing
        assert "Traceback" not in center.log.read_text()
    finally:
        center.stop()
    after = primary.sql("SELECT (SELECT count(*) FROM audit_log) || ',' || (SELECT count(*) FROM sites)",
                        dbname=db.name)
    assert after == before
    assert updated_by(db) != "cp-b"

