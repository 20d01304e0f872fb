"""The center's monitor against a REAL tandemd pair (tests/engine/harness.py, monitor endpoint on,
the link through the fault proxy), the real PostgreSQL fixture, and `tandem-center serve` with
[monitor] on: state transitions recorded, alerts raised after the policy's threshold and
cleared with a recovery notice at a real HTTP webhook receiver, /metrics scraped and parsed."""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.engine.harness import Pair  # noqa: E402
from tests.engine.nbdclient import Client  # noqa: E402

SYNC_TIMEOUT_S = 2        # the policy's tolerated degraded time


class Receiver:
    """A webhook endpoint: records each JSON body POSTed to it."""

    def __init__(self):
        self.notices: list[dict] = []
        received = self.notices

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, key: str) -> list[str]:
        return [n["event"] for n in self.notices if n["alert"]["dedup_key"] == key]

    def close(self):
        self.server.shutdown()


def wait_for(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}; last: {last}")


def parse_metrics(text: str) -> dict:
    """{(name, sorted labels): value} of a /metrics text, parsed by prometheus-client."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> dict:
    return parse_metrics(httpx.get(url + "/metrics", timeout=10).text)


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def setup(request, tmp_path, db, server_class):
    """(pair, db, server, receiver); parametrize with read_only=True for a center whose database
    is read-only (as on a standby)."""
    param = getattr(request, "param", {})
    read_only = param.get("read_only", False)
    pair = Pair(tmp_path / "pair", proxy=True, monitor=True)
    receiver = Receiver()
    server = None
    try:
        pair.start_in_sync()
        with db.connect() as conn:
            site = {s: conn.execute("INSERT INTO sites (name) VALUES (%s) RETURNING id", (s,)).fetchone()[0]
                    for s in ("site-a", "site-b")}
            for node, s in ((pair.a, "site-a"), (pair.b, "site-b")):
                conn.execute("INSERT INTO hypervisors (name, site_id, address, engine_url) "
                             "VALUES (%s, %s, '127.0.0.1', %s)",
                             (node.name, site[s], f"tls://{node.monitor[0]}:{node.monitor[1]}"))
            policy = conn.execute("INSERT INTO protection_policies (name, rp_interval_s, rp_retention, "
                                  "sync_timeout_s) VALUES ('gold', 3600, 24, %s) RETURNING id",
                                  (SYNC_TIMEOUT_S,)).fetchone()[0]
            vm = conn.execute("INSERT INTO protected_vms (name, production_site_id, dr_site_id, policy_id) "
                              "VALUES ('web1', %s, %s, %s) RETURNING id",
                              (site["site-a"], site["site-b"], policy)).fetchone()[0]
            conn.execute("INSERT INTO vm_volumes (vm_id, resource, volume, target_dev, size_bytes) "
                         "VALUES (%s, 'vm1', 0, 'vda', %s)", (vm, pair.size))
        client, engine_ca = pair.monitor_client()
        server = server_class(tmp_path / "center", db.dsn)
        with server.config.open("a") as f:
            f.write("[monitor]\nenabled = true\n"
                    f'client_cert = "{client.cert}"\nclient_key = "{client.key}"\nengine_ca = "{engine_ca}"\n'
                    "interval = 0.5\nunreachable_after = 2\nbackoff_max = 1\nconnect_timeout = 2\n"
                    f"rpo_max_bytes = {param.get('rpo_max_bytes', 0)}\n"
                    f"[control_plane]\nenabled = {json.dumps(param.get('control_plane', False))}\n"
                    "interval = 0.5\n"
                    f'[alerts]\nwebhook_url = "{receiver.url}"\nwebhook_timeout = 2.0\n')
        if read_only:
            with db.connect() as conn:
                conn.execute(f'ALTER DATABASE "{db.name}" SET default_transaction_read_only = on')
        server.start()
        yield pair, db, server, receiver
    finally:
        if server is not None:
            server.stop()
        receiver.close()
        pair.stop()


def states(db) -> dict:
    with db.connect() as conn:
        return {(hv, res): mode for hv, res, mode in conn.execute(
            "SELECT h.name, s.resource, s.mode FROM engine_resource_state s "
            "JOIN hypervisors h ON h.id = s.hypervisor_id")}


def open_alerts(db) -> list[str]:
    with db.connect() as conn:
        return sorted(r[0] for r in conn.execute("SELECT dedup_key FROM alerts WHERE state <> 'cleared'"))


def test_degraded_alert_raised_after_policy_and_cleared_with_recovery_notice(setup):
    pair, db, server, receiver = setup
    wait_for(lambda: states(db) == {("a", "vm1"): "in-sync", ("b", "vm1"): "in-sync"}, what="in-sync states")
    m = scrape(server.url)
    labels = {"hypervisor": "a", "resource": "vm1", "vm": "web1"}
    assert sample(m, "tandem_replication_mode", **labels, mode="in-sync") == 1
    assert sample(m, "tandem_rpo_exposure_bytes", **labels) == 0
    assert sample(m, "tandem_engines_reachable") == 2
    assert sample(m, "tandem_control_plane_role", role="primary") == 1
    assert open_alerts(db) == []

    pair.link.set(down=True)
    t_down = time.monotonic()
    wait_for(lambda: states(db).get(("a", "vm1")) == "degraded", what="degraded state recorded")
    key = "engine:a:vm1:degraded"
    wait_for(lambda: receiver.of(key) == ["raised"], timeout=SYNC_TIMEOUT_S + 20, what="degraded webhook")
    assert time.monotonic() - t_down >= SYNC_TIMEOUT_S
    with db.connect() as conn:            # not before the policy allows: raised_at - degraded since
        waited = conn.execute("SELECT extract(epoch FROM raised_at) - (details->>'since')::float8 "
                              "FROM alerts WHERE dedup_key = %s", (key,)).fetchone()[0]
    assert waited >= SYNC_TIMEOUT_S, waited
    m = scrape(server.url)
    assert sample(m, "tandem_replication_mode", **labels, mode="degraded") == 1
    time.sleep(2)                                  # several more polls: still one alert, one notice
    assert receiver.of(key) == ["raised"] and open_alerts(db) == [key]

    pair.link.set(down=False)
    wait_for(lambda: receiver.of(key) == ["raised", "cleared"], timeout=60, what="recovery notice")
    assert open_alerts(db) == []
    wait_for(lambda: states(db).get(("a", "vm1")) == "in-sync", what="in-sync again")
    with db.connect() as conn:
        transitions = [r[0]["mode"] for r in conn.execute(
            "SELECT detail->'to' FROM engine_events e JOIN hypervisors h ON h.id = e.hypervisor_id "
            "WHERE h.name = 'a' AND e.event = 'state' ORDER BY e.id")]
        engine_events = {r[0] for r in conn.execute(
            "SELECT event FROM engine_events WHERE source = 'engine'")}
    assert transitions[0] == "in-sync" and "degraded" in transitions and transitions[-1] == "in-sync"
    assert {"disconnected", "degraded", "connected", "in-sync"} <= engine_events
    notice = next(n for n in receiver.notices if n["event"] == "raised")
    assert notice["alert"]["kind"] == "degraded" and notice["alert"]["severity"] == "critical"
    assert "web1" in notice["alert"]["subject"]


def test_engine_unreachable_alert_and_recovery(setup):
    pair, db, server, receiver = setup
    wait_for(lambda: len(states(db)) == 2, what="both engines seen")
    key = "engine-unreachable:b"
    pair.b.stop()
    wait_for(lambda: receiver.of(key) == ["raised"], timeout=30, what="unreachable webhook")
    assert sample(scrape(server.url), "tandem_engine_reachable", hypervisor="b") == 0
    pair.b.start()
    wait_for(lambda: receiver.of(key) == ["raised", "cleared"], timeout=30, what="reachable again")
    assert sample(scrape(server.url), "tandem_engine_reachable", hypervisor="b") == 1
    with db.connect() as conn:
        seen = [r[0] for r in conn.execute(
            "SELECT event FROM engine_events e JOIN hypervisors h ON h.id = e.hypervisor_id "
            "WHERE h.name = 'b' AND source = 'center' AND event IN ('unreachable', 'reachable') "
            "ORDER BY e.id")]
    assert seen == ["unreachable", "reachable"]


@pytest.mark.parametrize("setup", [{"read_only": True}], indirect=True)
def test_a_read_only_instance_reads_and_serves_metrics_but_writes_nothing(setup):
    pair, db, server, receiver = setup
    labels = {"hypervisor": "a", "resource": "vm1", "vm": "web1"}
    m = wait_for(lambda: (lambda m: m if ("tandem_replication_mode", tuple(sorted(
        {**labels, "mode": "in-sync"}.items()))) in m else None)(scrape(server.url)), what="metrics")
    assert sample(m, "tandem_replication_mode", **labels, mode="in-sync") == 1
    assert sample(m, "tandem_control_plane_role", role="standby") == 1
    pair.b.stop()                                  # would raise engine-unreachable on a writer
    wait_for(lambda: sample(scrape(server.url), "tandem_engine_reachable", hypervisor="b") == 0,
             what="b unreachable on /metrics")
    time.sleep(3)                                  # past unreachable_after
    assert states(db) == {} and open_alerts(db) == [] and receiver.notices == []
    with db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM engine_events").fetchone()[0] == 0


def write_blocks(node, blocks: range, fill: bytes) -> None:
    c = Client(node.nbd_socket("vm1"), "vm1/disk0")
    try:
        for b in blocks:
            c.write(b * 4096, fill * 4096, fua=True)
    finally:
        c.close()


@pytest.mark.parametrize("setup", [{"rpo_max_bytes": 8192}], indirect=True)
def test_rpo_exposure_and_split_brain_alerts(setup):
    pair, db, server, receiver = setup
    wait_for(lambda: states(db) == {("a", "vm1"): "in-sync", ("b", "vm1"): "in-sync"}, what="in-sync states")
    pair.link.set(down=True)
    pair.wait(lambda: pair.a.status("vm1")["connection"] != "Connected", what="link loss")
    write_blocks(pair.a, range(10, 20), b"A")        # 40 KiB the peer does not have
    wait_for(lambda: receiver.of("engine:a:vm1:rpo") == ["raised"], what="RPO exposure webhook")
    rpo = next(n for n in receiver.notices if n["alert"]["dedup_key"] == "engine:a:vm1:rpo")["alert"]
    # raised as soon as a poll saw more than 8 KiB (the writes may still have been going on)
    assert 8192 < rpo["details"]["bytes"] <= 10 * 4096 and rpo["details"]["allowed_bytes"] == 8192
    wait_for(lambda: sample(scrape(server.url), "tandem_rpo_exposure_bytes", hypervisor="a", resource="vm1",
                            vm="web1") == 10 * 4096, what="all 40 KiB exposed on /metrics")

    # Both sides write as Primary, then the link comes back: split brain on both engines.
    pair.b.ctl("primary", "vm1", "--force")
    write_blocks(pair.b, range(15, 25), b"B")
    pair.a.ctl("secondary", "vm1")
    pair.link.set(down=False)
    keys = ["engine:a:vm1:split-brain", "engine:b:vm1:split-brain"]
    wait_for(lambda: all(receiver.of(k) == ["raised"] for k in keys), what="split-brain webhooks")
    assert set(keys) <= set(open_alerts(db))
    assert {states(db)[("a", "vm1")], states(db)[("b", "vm1")]} == {"split-brain"}

    for node in (pair.a, pair.b):                   # the operator resolves: a's changes go
        node.ctl("resolve", "vm1", "--discard", "a")
    wait_for(lambda: all(receiver.of(k) == ["raised", "cleared"] for k in keys), timeout=60,
             what="split-brain recovery notices")
    assert receiver.of("engine:a:vm1:rpo") == ["raised", "cleared"]     # a is Secondary now


@pytest.mark.parametrize("setup", [{"control_plane": True}], indirect=True)
def test_db_sync_lost_from_the_real_database(setup):
    """The fixture's PostgreSQL has no standby at all: no synchronous standby, so db-sync-lost."""
    pair, db, server, receiver = setup
    wait_for(lambda: receiver.of("cp:db-sync-lost") == ["raised"], what="db-sync-lost webhook")
    time.sleep(2)
    assert receiver.of("cp:db-sync-lost") == ["raised"] and "cp:db-sync-lost" in open_alerts(db)
    assert not [k for k in open_alerts(db) if k in ("cp:witness-down", "cp:vip-moved")]
