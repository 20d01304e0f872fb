"""Control-plane trio under real faults (issue 6): fault 1, crash of the active node.

The module deploys the trio with playbooks/control_plane.yml (tandem.dr.control_plane) on
cp-a, cp-b and witness, and removes it again at the end (molecule/control_plane/cleanup.yml)
so the lab is left as the other lab tests expect it.

A writer on the lab machine inserts ids through the VIP (psycopg, autocommit, libpq
keepalives and tcp_user_timeout; never statement_timeout or a cancel: a cancelled synchronous
commit returns a false acknowledgement). It logs every acknowledged id with its time; an id
whose commit raised is "in doubt" and never reused. After the fault every acknowledged id
must be on the new primary.

Figures (seconds after the fault) go to tests/output/control_plane_faults.json:
failure -> first acknowledged write through the VIP, failure -> VIP on the new primary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "tests" / "output" / "control_plane_faults.json"
DATA = ("cp-a", "cp-b")
VIP = "10.202.40.100"
SECRETS = {
    "tandem_control_plane_monitor_password": "molecule-monitor-secret",
    "tandem_control_plane_replication_password": "molecule-replication-secret",
    "tandem_control_plane_app_password": "molecule-app-secret",
}
APP_PASSWORD = SECRETS["tandem_control_plane_app_password"]
DSN = (f"host={VIP} port=5432 dbname=tandem user=tandem password={APP_PASSWORD} "
       "sslmode=require target_session_attrs=read-write connect_timeout=2 keepalives=1 "
       "keepalives_idle=1 keepalives_interval=1 keepalives_count=2 tcp_user_timeout=2000")
PSQL = ["runuser", "-u", "postgres", "--", "psql", "-h", "/var/run/postgresql", "-d", "postgres", "-XAtc"]
AUTOCTL_STATE = ["runuser", "-u", "postgres", "--", "env", "-i", "HOME=/var/lib/postgresql",
                 "XDG_RUNTIME_DIR=/var/run/postgresql", "PATH=/usr/lib/postgresql/15/bin:/usr/bin:/bin",
                 "pg_autoctl", "show", "state", "--pgdata", "/var/lib/postgresql/15/tandem-monitor", "--json"]
RTO_TARGET = 20.0
RTO_REQUIRED = 300.0


def _playbook(lab, playbook: str, timeout: int = 900) -> None:
    extra = json.dumps(SECRETS)
    venv_bin = Path(sys.executable).parent
    proc = subprocess.run(
        [str(venv_bin / "ansible-playbook"), "-i", str(lab.inventory), "-e", extra, playbook],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
             "ANSIBLE_COLLECTIONS_PATH": str(REPO / ".cache" / "collections")})
    assert proc.returncode == 0, f"{playbook} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"


def _sql(lab, host: str, query: str) -> str | None:
    proc = lab.attach(host, *PSQL, query, timeout=20)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _writable(lab, host: str) -> bool:
    return _sql(lab, host, "select (not pg_is_in_recovery()) and "
                           "current_setting('transaction_read_only') = 'off'") == "t"


def _holds_vip(lab, host: str) -> bool:
    proc = lab.attach(host, "ip", "-o", "-4", "addr", "show", timeout=10)
    return proc.returncode == 0 and f" {VIP}/" in proc.stdout


def _formation(lab) -> list[dict]:
    proc = lab.attach("witness", *AUTOCTL_STATE, timeout=20)
    return json.loads(proc.stdout) if proc.returncode == 0 else []


def _healthy(lab) -> bool:
    nodes = _formation(lab)
    states = sorted((n["current_group_state"], n["assigned_group_state"]) for n in nodes)
    return (states == [("primary", "primary"), ("secondary", "secondary")]
            and all(n["health"] == 1 for n in nodes))


def _primary(lab) -> str:
    writable = [h for h in DATA if _writable(lab, h)]
    assert len(writable) == 1, f"writable data nodes: {writable}"
    return writable[0]


class Writer(threading.Thread):
    """Insert ids through the VIP; record acknowledged ids and ids in doubt, with times."""

    def __init__(self):
        super().__init__(daemon=True)
        self.acked: list[tuple[int, float]] = []
        self.doubt: list[tuple[int, float]] = []
        self.errors: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self):
        next_id = 1
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(DSN, autocommit=True)
                n, next_id = next_id, next_id + 1
                try:
                    conn.execute("insert into cp_fault_probe (id) values (%s)", (n,))
                except psycopg.Error as exc:
                    self.doubt.append((n, time.monotonic()))
                    raise exc
                self.acked.append((n, time.monotonic()))
                time.sleep(0.02)
            except psycopg.Error as exc:
                self.errors.append((time.monotonic(), str(exc).strip().splitlines()[0] if str(exc) else ""))
                try:
                    if conn is not None:
                        conn.close()
                except psycopg.Error:
                    pass
                conn = None
                time.sleep(0.1)
        if conn is not None:
            conn.close()


@pytest.fixture(scope="module")
def trio(lab):
    """A deployed, healthy trio; removed again at the end of the module."""
    for host in (*DATA, "witness"):
        if not lab.wait_for(lambda h=host: lab.attach(h, "true").returncode == 0, timeout=5):
            lab.labctl("start", host)
    _playbook(lab, "playbooks/control_plane.yml")
    assert lab.wait_for(lambda: _healthy(lab), timeout=120), _formation(lab)
    yield lab
    for host in (*DATA, "witness"):
        if lab.attach(host, "true").returncode != 0:
            lab.labctl("start", host)
    _playbook(lab, "molecule/control_plane/cleanup.yml")


def _record(result: dict) -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else []
    runs.append(result)
    OUTPUT.write_text(json.dumps(runs, indent=2) + "\n")


def test_crash_of_the_active_node(trio):
    lab = trio
    old = _primary(lab)
    new = next(h for h in DATA if h != old)
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("drop table if exists cp_fault_probe")
        conn.execute("create table cp_fault_probe (id bigint primary key, at timestamptz default now())")

    writer = Writer()
    writer.start()
    try:
        assert lab.wait_for(lambda: len(writer.acked) >= 100, timeout=30), writer.errors[-3:]
        t0 = time.monotonic()
        lab.labctl("crash", old)
        t_crashed = time.monotonic()

        vip_moved = None
        deadline = t0 + RTO_REQUIRED
        while time.monotonic() < deadline:
            if vip_moved is None and _holds_vip(lab, new):
                vip_moved = time.monotonic() - t0
            after = [t for _, t in writer.acked if t > t_crashed]
            if vip_moved is not None and len(after) >= 50:
                break
            time.sleep(0.2)
        first_ack = next((t - t0 for _, t in writer.acked if t > t_crashed), None)
    finally:
        writer.stop.set()
        writer.join(timeout=30)

    assert first_ack is not None, f"no write acknowledged within {RTO_REQUIRED} s: {writer.errors[-3:]}"
    assert vip_moved is not None, "the VIP never moved to the new primary"

    # Every acknowledged id is on the new primary (RPO 0); read through the VIP.
    with psycopg.connect(DSN, autocommit=True) as conn:
        present = {row[0] for row in conn.execute("select id from cp_fault_probe")}
    acked = {n for n, _ in writer.acked}
    lost = sorted(acked - present)

    # Exactly one writable node (the old one is down), and the VIP only there.
    assert _writable(lab, new)
    assert _holds_vip(lab, new)

    result = {
        "fault": "crash-active",
        "crashed": old,
        "new_primary": new,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "failure_to_writes_accepted_s": round(first_ack, 2),
        "failure_to_vip_moved_s": round(vip_moved, 2),
        "acknowledged": len(acked),
        "in_doubt": len(writer.doubt),
        "acknowledged_lost": len(lost),
    }

    # The old primary comes back and rejoins as a secondary; no split brain.
    lab.labctl("start", old)
    healthy = lab.wait_for(lambda: _healthy(lab), timeout=180, interval=2)
    nodes = _formation(lab)
    result["rejoined_as"] = next((n["current_group_state"] for n in nodes if n["nodename"] == old), None)
    _record(result)

    assert not lost, f"acknowledged ids missing on {new}: {lost[:20]} ({len(lost)} in all)"
    assert first_ack <= RTO_REQUIRED
    assert healthy, f"the formation did not settle after {old} came back: {nodes}"
    assert result["rejoined_as"] == "secondary", nodes
    assert [h for h in DATA if _writable(lab, h)] == [new]
    assert lab.wait_for(lambda: _holds_vip(lab, new) and not _holds_vip(lab, old), timeout=10)
    sync = _sql(lab, new, "select state || '|' || sync_state from pg_stat_replication")
    assert sync in ("streaming|quorum", "streaming|sync"), sync
