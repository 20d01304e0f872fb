"""Control-plane trio under real faults (issue 6).

1. crash of the active node;            2. isolation of the active node, processes alive;
3. crash of the witness;                4. crash of the passive node;
5. the old primary returns after a crash and a failover.

The module deploys the trio with playbooks/control_plane.yml (tandem.dr.control_plane) on
cp-a, cp-b and witness, with the alert webhook pointing at a receiver the witness test runs
on cp-b (the lab's egress guard lets no lab host open a connection to the lab machine), and
removes the trio again at the end (molecule/control_plane/cleanup.yml) so the lab is left as
the other lab tests expect it. Every test starts from a healthy trio and leaves one.

A writer on the lab machine inserts ids through the VIP (psycopg, autocommit, libpq
keepalives and tcp_user_timeout; never statement_timeout or a cancel: a cancelled synchronous
commit returns a false acknowledgement). It logs every acknowledged id with its time and the
timeline of the primary that acknowledged it (the promoted standby writes on a new
timeline, so the timeline tells the old primary's acknowledgements from the new one's); an
id whose commit raised is "in doubt" and never reused. The isolation test also runs the same
writer inside the isolated node, over its local socket: a client on the wrong side of the
partition. Every acknowledged id must be on the new primary.

Figures go to tests/output/control_plane_faults.json (one object per run and fault, times in
seconds after the fault). Each fault runs once by default; TANDEM_FAULT_RUNS=3 repeats each
one three times for the figures.
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
RUNS = int(os.environ.get("TANDEM_FAULT_RUNS", "1"))
DATA = ("cp-a", "cp-b")
TRIO = (*DATA, "witness")
VIP = "10.202.40.100"
SECRETS = {
    "tandem_control_plane_monitor_password": "molecule-monitor-secret",
    "tandem_control_plane_replication_password": "molecule-replication-secret",
    "tandem_control_plane_app_password": "molecule-app-secret",
}
APP_PASSWORD = SECRETS["tandem_control_plane_app_password"]
# The alert receiver runs on cp-b, reached over the VIP segment.
WEBHOOK_HOST, WEBHOOK_PORT = "cp-b", 8787
WEBHOOK_URL = f"http://10.202.40.12:{WEBHOOK_PORT}/tandem-alert"
DSN = (f"host={VIP} port=5432 dbname=tandem user=tandem password={APP_PASSWORD} "
       "sslmode=require target_session_attrs=read-write connect_timeout=2 keepalives=1 "
       "keepalives_idle=1 keepalives_interval=1 keepalives_count=2 tcp_user_timeout=2000")
PSQL = ["runuser", "-u", "postgres", "--", "psql", "-h", "/var/run/postgresql", "-XAtc"]
AUTOCTL_STATE = ["runuser", "-u", "postgres", "--", "env", "-i", "HOME=/var/lib/postgresql",
                 "XDG_RUNTIME_DIR=/var/run/postgresql", "PATH=/usr/lib/postgresql/15/bin:/usr/bin:/bin",
                 "pg_autoctl", "show", "state", "--pgdata", "/var/lib/postgresql/15/tandem-monitor", "--json"]
# The insert returns the timeline of the primary that committed it.
INSERT = ("insert into cp_fault_probe (id) values (%s) "
          "returning substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
RTO_TARGET = 20.0
RTO_REQUIRED = 300.0

# The writer run inside a data node (python3-psycopg, in the lab image), over the local socket as
# postgres. Prints its pid, then "ack ID MONOTONIC TIMELINE" or "doubt ID MONOTONIC"; the
# container shares the lab machine's monotonic clock. SIGALRM ends it even if a commit hangs
# forever and nobody stops it.
LOCAL_WRITER = """
import os, signal, sys, time
import psycopg
first, seconds = int(sys.argv[1]), float(sys.argv[2])
signal.alarm(int(seconds) + 60)
print("pid", os.getpid(), flush=True)
end = time.monotonic() + seconds
n, conn = first, None
while time.monotonic() < end:
    try:
        if conn is None:
            conn = psycopg.connect("host=/var/run/postgresql dbname=tandem connect_timeout=2",
                                   autocommit=True)
        n += 1
        try:
            tl = int(conn.execute(sys.argv[3], (n,)).fetchone()[0], 16)
        except psycopg.Error:
            print("doubt", n, time.monotonic(), flush=True)
            raise
        print("ack", n, time.monotonic(), tl, flush=True)
        time.sleep(0.02)
    except psycopg.Error:
        try:
            conn.close()
        except Exception:
            pass
        conn = None
        time.sleep(0.1)
"""

# Alert webhook receiver: prints its pid, then each POSTed body on one line, for `seconds`.
RECEIVER = """
import http.server, os, signal, sys
signal.alarm(int(sys.argv[2]))
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        print(body.decode(errors="replace").replace("\\n", " "), flush=True)
        self.send_response(204)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), Hook)
print("pid", os.getpid(), flush=True)
server.serve_forever()
"""


def _playbook(lab, playbook: str, extra: dict | None = None, timeout: int = 900) -> None:
    venv_bin = Path(sys.executable).parent
    proc = subprocess.run(
        [str(venv_bin / "ansible-playbook"), "-i", str(lab.inventory),
         "-e", json.dumps({**SECRETS, **(extra or {})}), playbook],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
             "ANSIBLE_COLLECTIONS_PATH": str(REPO / ".cache" / "collections")})
    assert proc.returncode == 0, f"{playbook} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"


def _sql(lab, host: str, query: str, db: str = "postgres") -> str | None:
    proc = lab.attach(host, *PSQL, query, "-d", db, timeout=20)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _up(lab, host: str) -> bool:
    return lab.attach(host, "true", timeout=10).returncode == 0


def _writable(lab, host: str) -> bool:
    return _sql(lab, host, "select (not pg_is_in_recovery()) and "
                           "current_setting('transaction_read_only') = 'off'") == "t"


def _holds_vip(lab, host: str) -> bool:
    proc = lab.attach(host, "ip", "-o", "-4", "addr", "show", timeout=10)
    return proc.returncode == 0 and f" {VIP}/" in proc.stdout


def _vip_holders(lab) -> list[str]:
    return [h for h in DATA if _holds_vip(lab, h)]


def _formation(lab) -> list[dict]:
    proc = lab.attach("witness", *AUTOCTL_STATE, timeout=20)
    return json.loads(proc.stdout) if proc.returncode == 0 else []


def _healthy(lab) -> bool:
    nodes = _formation(lab)
    states = sorted((n["current_group_state"], n["assigned_group_state"]) for n in nodes)
    return (states == [("primary", "primary"), ("secondary", "secondary")]
            and all(n["health"] == 1 for n in nodes))


def _state_of(lab, host: str) -> str | None:
    return next((n["current_group_state"] for n in _formation(lab) if n["nodename"] == host), None)


def _primary(lab) -> str:
    writable = [h for h in DATA if _writable(lab, h)]
    assert len(writable) == 1, f"writable data nodes: {writable}"
    return writable[0]


def _ids_on(lab, host: str) -> set[int]:
    out = _sql(lab, host, "select id from cp_fault_probe", db="tandem")
    assert out is not None, f"cannot read cp_fault_probe on {host}"
    return {int(line) for line in out.split()}


def _replication(lab, primary: str) -> str | None:
    return _sql(lab, primary, "select state || '|' || sync_state from pg_stat_replication")


def _spawn(lab, host: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["lxc-attach", "-P", str(lab.state / "lxc"), "-n", host, "--clear-env", "--", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


class Lines(threading.Thread):
    """Collect (monotonic time, line) from a process started in a lab host."""

    def __init__(self, proc: subprocess.Popen):
        super().__init__(daemon=True)
        self.proc = proc
        self.lines: list[tuple[float, str]] = []

    def run(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.strip()))

    def stop(self, lab, host: str) -> None:
        """End the process in `host` by the pid it printed first (killing lxc-attach would
        leave it running), then wait for it."""
        first = self.lines[0][1].split() if self.lines else []
        if first[:1] == ["pid"]:
            lab.attach(host, "kill", first[1], timeout=10)
        self.close(timeout=10)

    def close(self, timeout: float = 90) -> None:
        """Wait for the process to end by itself (its own alarm); kill the attach otherwise."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.join(timeout=10)


class Writer(threading.Thread):
    """Insert ids through the VIP; record acknowledged ids (with time and timeline) and ids in doubt."""

    def __init__(self):
        super().__init__(daemon=True)
        self.acked: list[tuple[int, float, int]] = []
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
                    timeline = int(conn.execute(INSERT, (n,)).fetchone()[0], 16)
                except psycopg.Error as exc:
                    self.doubt.append((n, time.monotonic()))
                    raise exc
                self.acked.append((n, time.monotonic(), timeline))
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

    def acks_after(self, t: float) -> list[float]:
        return [at for _, at, _ in self.acked if at > t]

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=30)


class LocalWriter:
    """The writer run inside a data node over its local socket (ids from `first` + 1)."""

    def __init__(self, lab, host: str, first: int, seconds: float):
        self.lines = Lines(_spawn(lab, host, "runuser", "-u", "postgres", "--", "python3", "-c",
                                  LOCAL_WRITER, str(first), str(seconds), INSERT))
        self.lines.start()

    def acked(self) -> list[tuple[int, float, int]]:
        rows = [line.split() for _, line in self.lines.lines]
        return [(int(r[1]), float(r[2]), int(r[3])) for r in rows if r[0] == "ack"]

    def doubt(self) -> list[int]:
        return [int(line.split()[1]) for _, line in self.lines.lines if line.startswith("doubt")]


def _largest_gap(times: list[float], since: float) -> tuple[float, float | None]:
    """Longest pause between consecutive acknowledgements around `since`, and when it ended."""
    times = sorted(times)
    before = [t for t in times if t <= since]
    series = ([before[-1]] if before else [since]) + [t for t in times if t > since]
    gaps = [(b - a, b) for a, b in zip(series, series[1:], strict=False)]
    return max(gaps) if gaps else (0.0, None)


def _since(times: dict[str, float | None], t0: float) -> dict[str, float | None]:
    return {k: None if t is None else round(t - t0, 2) for k, t in times.items()}


@pytest.fixture(scope="module")
def trio(lab):
    """A deployed, healthy trio; removed again at the end of the module."""
    for host in TRIO:
        if not lab.wait_for(lambda h=host: _up(lab, h), timeout=5):
            lab.labctl("start", host)
    _playbook(lab, "playbooks/control_plane.yml", {"tandem_control_plane_alert_webhook": WEBHOOK_URL})
    assert lab.wait_for(lambda: _healthy(lab), timeout=120), _formation(lab)
    yield lab
    _restore(lab)
    _playbook(lab, "molecule/control_plane/cleanup.yml")


def _restore(lab) -> None:
    """Lift this module's faults: the trio's isolation, and crashed hosts."""
    for host in TRIO:
        lab.labctl("heal", host)
        if not _up(lab, host):
            lab.labctl("start", host)


def _settle(lab) -> tuple[str, str]:
    """Heal and start whatever a failed test left behind; wait for a healthy trio.

    Returns (primary, standby).
    """
    _restore(lab)
    assert lab.wait_for(lambda: _healthy(lab), timeout=240, interval=2), _formation(lab)
    primary = _primary(lab)
    assert lab.wait_for(lambda: _vip_holders(lab) == [primary], timeout=30), _vip_holders(lab)
    return primary, next(h for h in DATA if h != primary)


def _new_table() -> None:
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("drop table if exists cp_fault_probe")
        conn.execute("create table cp_fault_probe (id bigint primary key, at timestamptz default now())")


def _start_writer() -> Writer:
    _new_table()
    writer = Writer()
    writer.start()
    return writer


def _wait_acks(lab, writer: Writer, count: int = 100) -> None:
    assert lab.wait_for(lambda: len(writer.acked) >= count, timeout=60), writer.errors[-3:]


def _record(result: dict) -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(OUTPUT.read_text()) if OUTPUT.exists() else []
    runs.append({**result, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    OUTPUT.write_text(json.dumps(runs, indent=2) + "\n")


def _fail_over(lab, writer: Writer, t0: float, t_fault: float, old: str, new: str,
               watch_old: bool = False) -> dict:
    """Follow a failover from `old` to `new` until the VIP is on `new` and writes flow again.

    With watch_old (the old primary is alive), also wait until the old primary is no longer
    writable and no longer holds the VIP. Times are seconds after t0, taken after the probe
    that saw the change (an upper bound).
    """
    seen: dict[str, float] = {}
    deadline = t0 + RTO_REQUIRED
    while time.monotonic() < deadline:
        if "vip_moved" not in seen and _holds_vip(lab, new):
            seen["vip_moved"] = time.monotonic() - t0
        if watch_old and "old_read_only" not in seen and not _writable(lab, old):
            seen["old_read_only"] = time.monotonic() - t0
        if watch_old and "vip_left_old" not in seen and not _holds_vip(lab, old):
            seen["vip_left_old"] = time.monotonic() - t0
        wanted = {"vip_moved", "old_read_only", "vip_left_old"} if watch_old else {"vip_moved"}
        if wanted <= set(seen) and len(writer.acks_after(t_fault)) >= 50:
            break
        time.sleep(0.2)
    first = writer.acks_after(t_fault)
    seen["first_ack"] = first[0] - t0 if first else None
    return seen


def _crash_active(lab, writer: Writer, old: str, new: str) -> dict:
    """Crash the primary `old` under the writer; return the failover figures (asserted)."""
    t0 = time.monotonic()
    lab.labctl("crash", old)
    seen = _fail_over(lab, writer, t0, time.monotonic(), old, new)
    assert seen["first_ack"] is not None, f"no write acknowledged in {RTO_REQUIRED} s: {writer.errors[-3:]}"
    assert "vip_moved" in seen, "the VIP never moved to the new primary"
    # Exactly one writable node (the old one is down), and the VIP only there.
    assert _writable(lab, new)
    assert _vip_holders(lab) == [new]
    return {"failure_to_writes_accepted_s": round(seen["first_ack"], 2),
            "failure_to_vip_moved_s": round(seen["vip_moved"], 2)}


def _lost_on(lab, host: str, acked: set[int]) -> list[int]:
    return sorted(acked - _ids_on(lab, host))


@pytest.mark.parametrize("run", range(RUNS))
def test_crash_of_the_active_node(trio, run):
    lab = trio
    old, new = _settle(lab)
    writer = _start_writer()
    try:
        _wait_acks(lab, writer)
        result = {"fault": "crash-active", "run": run, "crashed": old, "new_primary": new,
                  **_crash_active(lab, writer, old, new)}
    finally:
        writer.finish()
    acked = {n for n, _, _ in writer.acked}
    lost = _lost_on(lab, new, acked)
    result.update(acknowledged=len(acked), in_doubt=len(writer.doubt), acknowledged_lost=len(lost))

    # The old primary comes back and rejoins as a secondary (test 5 checks this in depth).
    lab.labctl("start", old)
    healthy = lab.wait_for(lambda: _healthy(lab), timeout=180, interval=2)
    result["rejoined_as"] = _state_of(lab, old)
    _record(result)

    assert not lost, f"acknowledged ids missing on {new}: {lost[:20]} ({len(lost)} in all)"
    assert healthy, f"the formation did not settle after {old} came back: {_formation(lab)}"
    assert result["rejoined_as"] == "secondary"
    assert [h for h in DATA if _writable(lab, h)] == [new]
    assert lab.wait_for(lambda: _vip_holders(lab) == [new], timeout=10)
    assert _replication(lab, new) in ("streaming|quorum", "streaming|sync")


@pytest.mark.parametrize("run", range(RUNS))
def test_isolation_of_the_active_node(trio, run):
    """An nft drop of all the active node's traffic (labctl isolate: its veths, both ways,
    ARP included); its processes stay alive and lxc-attach still reaches it. The old primary
    must stop acknowledging writes, and be read-only, before the new one takes any."""
    lab = trio
    old, new = _settle(lab)
    writer = _start_writer()
    local = None
    try:
        _wait_acks(lab, writer)
        # A client inside the old primary, on the far side of the partition (stopped below).
        local = LocalWriter(lab, old, first=10_000_000, seconds=120)
        assert lab.wait_for(lambda: len(local.acked()) >= 50, timeout=30), local.lines.lines[-3:]
        timeline = writer.acked[-1][2]
        t0 = time.monotonic()
        lab.labctl("isolate", old)
        t_fault = time.monotonic()
        seen = _fail_over(lab, writer, t0, t_fault, old, new, watch_old=True)
        # The lab is shared: a global `labctl heal` of another test would void the figures.
        still_isolated = {"fault": "isolate", "host": old} in lab.status()["faults"]
    finally:
        writer.finish()
        if local is not None:
            local.lines.stop(lab, old)

    acks = [(at, tl) for _, at, tl in writer.acked + local.acked()]
    by_old = [at for at, tl in acks if tl == timeline]
    by_new = [at for at, tl in acks if tl > timeline]
    acked = {n for n, _, _ in writer.acked} | {n for n, _, _ in local.acked()}
    lost = _lost_on(lab, new, acked)
    result = {
        "fault": "isolate-active", "run": run, "isolated": old, "new_primary": new,
        "failure_to_writes_accepted_s": seen["first_ack"] and round(seen["first_ack"], 2),
        "failure_to_vip_moved_s": seen.get("vip_moved") and round(seen["vip_moved"], 2),
        "failure_to_old_primary_read_only_s": seen.get("old_read_only") and round(seen["old_read_only"], 2),
        "failure_to_vip_left_old_s": seen.get("vip_left_old") and round(seen["vip_left_old"], 2),
        "old_last_ack_s": round(max(by_old) - t0, 2) if by_old else None,
        "new_first_ack_s": round(min(by_new) - t0, 2) if by_new else None,
        "old_acks_after_fault": len([at for at in by_old if at > t_fault]),
        "acknowledged": len(acked), "in_doubt": len(writer.doubt) + len(local.doubt()),
        "acknowledged_lost": len(lost),
    }

    # Heal: the old primary rejoins as a secondary (pg_rewind if needed).
    t_heal = time.monotonic()
    lab.labctl("heal", old)
    healthy = lab.wait_for(lambda: _healthy(lab), timeout=180, interval=1)
    result["heal_to_rejoined_s"] = round(time.monotonic() - t_heal, 2) if healthy else None
    result["rejoined_as"] = _state_of(lab, old)
    _record(result)

    assert still_isolated, f"the isolation of {old} was lifted during the test, not by it"
    assert seen["first_ack"] is not None, f"no write acknowledged in {RTO_REQUIRED} s: {writer.errors[-3:]}"
    assert by_new, "no write acknowledged on the new timeline"
    assert "old_read_only" in seen, f"{old} stayed writable while isolated"
    assert "vip_left_old" in seen, f"the VIP stayed on the isolated {old}"
    # No dual-primary window: the old primary acknowledged its last write, and was read-only,
    # before the new primary acknowledged its first.
    assert max(by_old) < min(by_new), result
    assert seen["old_read_only"] < seen["first_ack"], result
    assert not lost, f"acknowledged ids missing on {new}: {lost[:20]} ({len(lost)} in all)"
    assert healthy, f"the formation did not settle after healing {old}: {_formation(lab)}"
    assert result["rejoined_as"] == "secondary"
    assert [h for h in DATA if _writable(lab, h)] == [new]
    assert lab.wait_for(lambda: _vip_holders(lab) == [new], timeout=10), _vip_holders(lab)


@pytest.mark.parametrize("run", range(RUNS))
def test_crash_of_the_witness(trio, run):
    """Writes through the VIP go on without an error; both data nodes alert (webhook, journal),
    and again when the witness is back."""
    lab = trio
    primary, _ = _settle(lab)
    hook = Lines(_spawn(lab, WEBHOOK_HOST, "python3", "-c", RECEIVER, str(WEBHOOK_PORT), "300"))
    hook.start()

    def alerted(host: str, monitor: str, since: float) -> float | None:
        """When `host`'s webhook alert reporting monitor=<monitor> arrived (after `since`)."""
        for at, line in hook.lines:
            alert = json.loads(line) if line.startswith("{") else {}
            if (at > since and alert.get("host") == host and alert.get("kind") == "monitor"
                    and f"monitor={monitor}" in alert.get("message", "")):
                return at
        return None

    try:
        assert lab.wait_for(lambda: hook.lines, timeout=10), "the webhook receiver did not start"
        writer = _start_writer()
        try:
            _wait_acks(lab, writer)
            since = int(time.time())
            t0 = time.monotonic()
            lab.labctl("crash", "witness")
            lab.wait_for(lambda: all(alerted(h, "unreachable", t0) for h in DATA), timeout=60)
            # Keep writing for a while with the witness gone.
            lab.wait_for(lambda: time.monotonic() > t0 + 20, timeout=30)
            vip = _vip_holders(lab)
            writable = [h for h in DATA if _writable(lab, h)]
        finally:
            writer.finish()
        down_alerts = {h: alerted(h, "unreachable", t0) for h in DATA}

        # The witness comes back: the monitor answers and both data nodes say so.
        t_start = time.monotonic()
        lab.labctl("start", "witness")
        healthy = lab.wait_for(lambda: _healthy(lab), timeout=180, interval=1)
        lab.wait_for(lambda: all(alerted(h, "up", t_start) for h in DATA), timeout=60)
        up_alerts = {h: alerted(h, "up", t_start) for h in DATA}
    finally:
        hook.stop(lab, WEBHOOK_HOST)

    journal = lab.attach(primary, "journalctl", "-t", "tandem-cp-watch", "--since", f"@{since}",
                         "-o", "cat", "--no-pager").stdout
    acked = {n for n, _, _ in writer.acked}
    lost = _lost_on(lab, primary, acked)
    gap, _ = _largest_gap(writer.acks_after(t0 - 5), t0)
    errors = [e for e in writer.errors if e[0] > t0]
    _record({
        "fault": "crash-witness", "run": run, "primary": primary,
        "write_errors": len(errors), "in_doubt": len(writer.doubt),
        "largest_write_gap_s": round(gap, 2),
        "vip_moved": vip != [primary],
        "failure_to_alert_s": _since(down_alerts, t0),
        "acknowledged": len(acked), "acknowledged_lost": len(lost),
        "witness_start_to_monitor_up_alert_s": _since(up_alerts, t_start),
    })

    assert not errors, f"write errors through the VIP while the witness was down: {errors[:3]}"
    assert not writer.doubt
    assert not lost
    assert vip == [primary] and writable == [primary]
    assert all(down_alerts.values()), f"missing webhook alerts: {hook.lines[-5:]}"
    assert "monitor=unreachable" in journal, journal[-2000:]
    assert healthy, f"the formation did not settle after the witness came back: {_formation(lab)}"
    assert all(up_alerts.values()), f"no monitor=up alert after the witness came back: {hook.lines[-5:]}"
    assert [h for h in DATA if _writable(lab, h)] == [primary]


@pytest.mark.parametrize("run", range(RUNS))
def test_crash_of_the_passive_node(trio, run):
    """Writes continue after a stall (the primary drops synchronous replication: the
    documented trade-off); the node comes back as a synchronous standby."""
    lab = trio
    primary, standby = _settle(lab)
    writer = _start_writer()
    try:
        _wait_acks(lab, writer)
        t0 = time.monotonic()
        lab.labctl("crash", standby)
        t_fault = time.monotonic()
        async_at = None
        while time.monotonic() < t0 + 120:
            if async_at is None and _sql(lab, primary, "show synchronous_standby_names") == "":
                async_at = time.monotonic() - t0
            if async_at is not None and len(writer.acks_after(t_fault)) >= 50:
                break
            time.sleep(0.2)
    finally:
        writer.finish()
    gap, resumed = _largest_gap(writer.acks_after(t0 - 5), t0)
    errors = [e for e in writer.errors if e[0] > t0]
    acked = {n for n, _, _ in writer.acked}
    lost = _lost_on(lab, primary, acked)
    result = {
        "fault": "crash-passive", "run": run, "crashed": standby, "primary": primary,
        "failure_to_writes_accepted_s": resumed and round(resumed - t0, 2),
        "largest_write_gap_s": round(gap, 2),
        "failure_to_async_s": async_at and round(async_at, 2),
        "vip_moved": _vip_holders(lab) != [primary],
        "write_errors": len(errors), "in_doubt": len(writer.doubt),
        "acknowledged": len(acked), "acknowledged_lost": len(lost),
    }

    t_start = time.monotonic()
    lab.labctl("start", standby)
    healthy = lab.wait_for(lambda: _healthy(lab), timeout=180, interval=1)
    result["start_to_sync_standby_s"] = round(time.monotonic() - t_start, 2) if healthy else None
    result["rejoined_as"] = _state_of(lab, standby)
    sync_names = _sql(lab, primary, "show synchronous_standby_names")
    replication = _replication(lab, primary)
    result["replication"] = replication
    _record(result)

    assert len(writer.acks_after(t_fault)) >= 50, f"writes did not continue: {errors[:3]}"
    assert not errors, f"write errors through the VIP: {errors[:3]}"
    assert not lost
    assert not result["vip_moved"]
    assert async_at is not None, "the primary never dropped synchronous replication"
    assert healthy, f"the formation did not settle after {standby} came back: {_formation(lab)}"
    assert result["rejoined_as"] == "secondary"
    assert sync_names.startswith("ANY 1 ("), sync_names
    assert replication in ("streaming|quorum", "streaming|sync"), replication
    assert lab.wait_for(lambda: not _lost_on(lab, standby, acked), timeout=30), "rows missing on the standby"


@pytest.mark.parametrize("run", range(RUNS))
def test_old_primary_returns(trio, run):
    """Crash the active node, fail over, then start it under the writer: it rejoins as a
    secondary, the VIP never goes back to it, and every acknowledged row is on both nodes."""
    lab = trio
    old, new = _settle(lab)
    writer = _start_writer()
    try:
        _wait_acks(lab, writer)
        result = {"fault": "old-primary-returns", "run": run, "crashed": old, "new_primary": new,
                  **_crash_active(lab, writer, old, new)}
        t_start = time.monotonic()
        lab.labctl("start", old)
        booted = time.monotonic()
        vip_on_old = writable_old = False
        rejoined = None
        while time.monotonic() < t_start + 180:
            vip_on_old = vip_on_old or _holds_vip(lab, old)
            writable_old = writable_old or _writable(lab, old)
            if rejoined is None and _healthy(lab):
                rejoined = time.monotonic() - t_start
            if rejoined is not None and time.monotonic() > t_start + rejoined + 5:
                break
            time.sleep(0.2)
    finally:
        writer.finish()
    errors = [e for e in writer.errors if e[0] > t_start]
    gap, _ = _largest_gap(writer.acks_after(t_start - 5), t_start)
    acked = {n for n, _, _ in writer.acked}
    lost_new = _lost_on(lab, new, acked)
    consistent = lab.wait_for(lambda: not _lost_on(lab, old, acked), timeout=30)
    lost_old = _lost_on(lab, old, acked)
    result.update({
        "start_to_booted_s": round(booted - t_start, 2),
        "start_to_rejoined_s": rejoined and round(rejoined, 2),
        "rejoined_as": _state_of(lab, old),
        "write_errors_during_return": len(errors),
        "largest_write_gap_during_return_s": round(gap, 2),
        "vip_on_old_during_return": vip_on_old, "old_writable_during_return": writable_old,
        "acknowledged": len(acked), "in_doubt": len(writer.doubt),
        "acknowledged_lost": len(lost_new), "acknowledged_missing_on_old": len(lost_old),
    })
    _record(result)

    assert rejoined is not None, f"the formation did not settle after {old} came back: {_formation(lab)}"
    assert result["rejoined_as"] == "secondary"
    assert not vip_on_old and not writable_old, "split brain: the returning node held the VIP or took writes"
    assert [h for h in DATA if _writable(lab, h)] == [new]
    assert _vip_holders(lab) == [new]
    assert not lost_new, f"acknowledged ids missing on {new}: {lost_new[:20]}"
    assert consistent, f"acknowledged ids missing on the rejoined {old}: {lost_old[:20]}"
    assert not errors, f"write errors through the VIP while {old} rejoined: {errors[:3]}"
    assert _replication(lab, new) in ("streaming|quorum", "streaming|sync")
