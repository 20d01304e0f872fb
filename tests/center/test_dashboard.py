"""The dashboard against a real PostgreSQL: login by token cookie, colours with their reasons,
last runs and the last drill report, HTML escaping of catalogue contents."""

import asyncio
import json
import re
import time

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.rows import dict_row

from tandem.center import dashboard, status
from tandem.center.app import API_PREFIX, create_app
from tandem.center.config import Config, DatabaseConfig

API = API_PREFIX


@pytest.fixture
def client(db):
    app = create_app(Config(database=DatabaseConfig(dsn=db.dsn, pool_min=1, pool_max=4)))
    with TestClient(app) as c:
        c.db = db
        yield c


def post(client, path, body, who="admin"):
    r = client.post(API + path, json=body, headers={"Authorization": f"Bearer {client.db.tokens[who]}"})
    assert r.status_code in (200, 201), r.text
    return r.json()


def login(client, who="reader"):
    r = client.post("/login", data={"token": client.db.tokens[who]}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/dashboard"
    return r


def vm_row(html: str, name: str) -> str:
    m = re.search(rf'<tr class="vm" id="vm-{re.escape(name)}" data-status="(\w+)">(.*?)</tr>', html, re.S)
    assert m, f"no row for {name}"
    return m.group(1), m.group(2)


def catalogue(client) -> dict:
    ids = {s: post(client, "/sites", {"name": s})["id"] for s in ("site-a", "site-b")}
    ids["hv"] = post(client, "/hypervisors", {"name": "hv-a1", "site_id": ids["site-a"],
                                              "address": "10.0.0.11"})["id"]
    ids["policy"] = post(client, "/policies", {"name": "gold", "rp_interval_s": 300, "rp_retention": 24,
                                               "sync_timeout_s": 60})["id"]
    for vm in ("web01", "db01"):
        ids[vm] = post(client, "/vms", {"name": vm, "production_site_id": ids["site-a"],
                                        "dr_site_id": ids["site-b"], "hypervisor_id": ids["hv"],
                                        "policy_id": ids["policy"]})["id"]
    return ids


def test_needs_a_valid_token(client):
    for path in ("/", "/dashboard"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
    for bad in ("", "nonsense", "tdc_" + "x" * 43, client.db.tokens["revoked"]):
        r = client.post("/login", data={"token": bad}, follow_redirects=False)
        assert r.status_code == 401, bad
        assert dashboard.COOKIE not in r.cookies
    client.cookies.set(dashboard.COOKIE, client.db.tokens["revoked"])
    assert client.get("/", follow_redirects=False).status_code == 303
    # Malformed bodies are refused without a crash.
    for body in (b"\xff\xfe", b"a=1&" * 10, b"token=" + b"x" * 5000):
        r = client.post("/login", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code in (401, 413)


def test_login_cookie_and_logout(client):
    r = login(client)
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert "test-reader" in page.text
    assert '<meta http-equiv="refresh" content="15">' in page.text
    assert "script-src" not in page.headers["content-security-policy"]
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert client.get("/").status_code == 200
    out = client.post("/logout", follow_redirects=False)
    assert out.status_code == 303
    client.cookies.clear()
    assert client.get("/", follow_redirects=False).status_code == 303


def test_colours_and_reasons(client):
    ids = catalogue(client)
    login(client)
    html = client.get("/dashboard").text
    # No recovery point and no replicated volume: amber, with both reasons.
    colour, row = vm_row(html, "web01")
    assert colour == "amber"
    assert "no recovery point yet" in row and "no replicated volume in the catalogue" in row

    # A fresh recovery point leaves only the unknown replication state.
    with client.db.connect() as conn:
        conn.execute("INSERT INTO recovery_points (vm_id, site_id, name, taken_at, consistency, reported_by) "
                     "VALUES (%s, %s, 'rp-1', now() - interval '10 s', 'crash', 'test'), "
                     "(%s, %s, 'rp-old', now() - interval '2 h', 'crash', 'test')",
                     (ids["web01"], ids["site-b"], ids["db01"], ids["site-b"]))
        conn.execute("INSERT INTO alerts (dedup_key, kind, severity, subject, details) VALUES "
                     "('split:web01', 'split-brain', 'critical', 'split brain on web01', "
                     "'{\"vm\": \"web01\"}'), "
                     "('witness', 'witness-down', 'warning', 'witness unreachable', '{}')")
    html = client.get("/dashboard").text
    colour, row = vm_row(html, "web01")
    assert colour == "red" and "critical alert: split brain on web01" in row
    assert "no recovery point yet" not in row
    colour, row = vm_row(html, "db01")
    # 2 h old with a 5 min interval: red.
    assert colour == "red" and "last recovery point 2 h old (policy: every 5 min)" in row
    assert "witness unreachable" in html
    site_a = html.split('id="site-site-a"')[1].split("</section>")[0]
    assert 'badge red">red</span> Site site-a' in site_a
    assert "VM web01: red" in site_a
    assert "no protected VM" in html.split('id="site-site-b"')[1].split("</section>")[0]
    assert "<title>tandem-center: red</title>" in html


def test_vm_status_rules():
    vm = {"rp_interval_s": 300, "last_rp_age_s": 100.0}
    green = status.ReplicationState("in-sync", "green", detail="vm1 in sync")
    assert status.vm_status(vm, [], green).colour == "green"
    assert status.vm_status(vm, [], green).reasons == ["vm1 in sync; last recovery point 1 min old"]
    assert status.vm_status({**vm, "last_rp_age_s": 400.0}, [], green).colour == "amber"
    assert status.vm_status({**vm, "last_rp_age_s": 700.0}, [], green).colour == "red"
    warn = [{"severity": "warning", "subject": "slow"}]
    assert status.vm_status(vm, warn, green).colour == "amber"
    info = [{"severity": "info", "subject": "fyi"}]
    assert status.vm_status(vm, info, green).colour == "green"
    # The engine's own alerts are shown live by the replication state, not again.
    engine = [{"severity": "critical", "subject": "degraded 3s", "dedup_key": "engine:a:vm1:degraded"}]
    assert status.vm_status(vm, engine, green).colour == "green"
    red = status.ReplicationState("split-brain", "red", ("split brain",))
    assert status.vm_status(vm, [], red).reasons == ["split brain"]


def test_runs_and_last_drill(client):
    with client.db.connect() as conn:
        plan = conn.execute("INSERT INTO recovery_plans (name, document) VALUES ('plan-a', '{}') "
                            "RETURNING id").fetchone()
    plan = {"id": plan[0]}
    run = post(client, "/runs", {"kind": "drill", "plan_id": plan["id"]}, who="operator")
    post(client, f"/runs/{run['id']}/steps", {"name": "boot web01", "status": "ok",
                                              "detail": {"rto_s": 42}}, who="operator")
    post(client, f"/runs/{run['id']}/steps", {"name": "probe http", "status": "failed"},
         who="operator")
    r = client.post(f"{API}/runs/{run['id']}/finish", json={"state": "failed", "result": {"rto_s": 42}},
                    headers={"Authorization": f"Bearer {client.db.tokens['operator']}"})
    assert r.status_code == 200, r.text
    post(client, "/runs", {"kind": "failover"}, who="operator")
    login(client)
    html = client.get("/dashboard").text
    drill = html.split("<h2>Last drill</h2>")[1].split("<h2>")[0]
    assert f"Run {run['id']} of plan plan-a: failed" in drill
    assert "1 of 2 step(s) failed" in drill
    assert "probe http" in drill and "&#34;rto_s&#34;: 42" in drill
    runs = html.split("<h2>Last runs</h2>")[1]
    assert runs.count("<tr>") == 3        # header + 2 runs
    assert "failover" in runs and "running" in runs


def test_catalogue_contents_are_escaped(client):
    hostile = "<script>alert(1)</script>"
    site = post(client, "/sites", {"name": "site-x", "description": hostile})
    with client.db.connect() as conn:
        conn.execute("INSERT INTO alerts (dedup_key, kind, severity, subject, details) VALUES "
                     "('x', '<b>k</b>', 'warning', %s, %s)",
                     (hostile, f'{{"site": "site-x", "vm": "{hostile}"}}'))
    login(client)
    html = client.get("/dashboard").text
    assert "<script>" not in html and "<b>k</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert site["id"]


# -- replication state rules, on rows shaped as the monitor records them -------------------------

def engine_status(role: str, connection: str = "Connected", disk: str = "UpToDate", oos: int = 0,
                  repl: str = "Established", **extra) -> dict:
    """A tandemd status (the fields status.py reads), as the monitor stores it."""
    vol = {"volume": 0, "disk": disk, "peer_disk": "UpToDate", "replication": repl, "out_of_sync_bytes": oos}
    if "eta" in extra:
        vol["sync_eta_seconds"] = extra.pop("eta")
    return {"name": "vm1", "role": role, "connection": connection, "peer": "b" if role == "Primary" else "a",
            "degraded": None, "standalone": None, "volumes": [vol], **extra}


@pytest.fixture
def states_db(db):
    with db.connect() as conn:
        site = [conn.execute("INSERT INTO sites (name) VALUES (%s) RETURNING id", (s,)).fetchone()[0]
                for s in ("site-a", "site-b")]
        hv = {n: conn.execute("INSERT INTO hypervisors (name, site_id, address, engine_url) VALUES "
                              "(%s, %s, '127.0.0.1', 'tls://127.0.0.1:1') RETURNING id", (n, s)).fetchone()[0]
              for n, s in (("a", site[0]), ("b", site[1]))}
        policy = conn.execute("INSERT INTO protection_policies (name, rp_interval_s, rp_retention, "
                              "sync_timeout_s) VALUES ('gold', 300, 24, 60) RETURNING id").fetchone()[0]
        for name in ("web1", "bare"):
            vm = conn.execute("INSERT INTO protected_vms (name, production_site_id, dr_site_id, policy_id) "
                              "VALUES (%s, %s, %s, %s) RETURNING id",
                              (name, site[0], site[1], policy)).fetchone()[0]
            if name == "web1":
                conn.execute("INSERT INTO vm_volumes (vm_id, resource, volume, target_dev, size_bytes) "
                             "VALUES (%s, 'vm1', 0, 'vda', 1048576)", (vm,))
    db.hv = hv
    return db


def put_state(db, hv: str, st: dict, mode: str, seen_ago_s: float = 0, rpo=(0, 0.0)) -> None:
    with db.connect() as conn:
        conn.execute(
            "INSERT INTO engine_resource_state (hypervisor_id, resource, role, connection, mode, rpo_bytes, "
            "rpo_seconds, status, seen_at) VALUES (%s, 'vm1', %s, %s, %s, %s, %s, %s, "
            "now() - make_interval(secs => %s)) ON CONFLICT (hypervisor_id, resource) DO UPDATE SET "
            "role = EXCLUDED.role, connection = EXCLUDED.connection, mode = EXCLUDED.mode, "
            "rpo_bytes = EXCLUDED.rpo_bytes, rpo_seconds = EXCLUDED.rpo_seconds, status = EXCLUDED.status, "
            "seen_at = EXCLUDED.seen_at",
            (db.hv[hv], st["role"], st["connection"], mode, rpo[0], rpo[1], json.dumps(st), seen_ago_s))


def replication(db, stale_s: float = 30.0) -> dict:
    async def read():
        async with await psycopg.AsyncConnection.connect(db.dsn, row_factory=dict_row) as conn:
            return await status.replication_states(conn, ["web1", "bare"], stale_s)
    return asyncio.run(read())


def test_replication_states_from_the_monitor_records(states_db):
    db = states_db
    r = replication(db)
    assert r["bare"].colour == "amber" and r["bare"].reasons == ("no replicated volume in the catalogue",)
    assert r["web1"].colour == "amber" and "no engine has reported it yet" in r["web1"].reasons[0]

    put_state(db, "a", engine_status("Primary"), "in-sync")
    assert "no status from the peer" in replication(db)["web1"].reasons[0]
    put_state(db, "b", engine_status("Secondary"), "in-sync")
    r = replication(db)["web1"]
    assert (r.state, r.colour, r.reasons) == ("in-sync", "green", ())
    assert r.detail == "vm1 in sync, Primary on a, peer b connected"

    # Degraded: amber within the policy's 60 s, red past it; the engine's own words in the reason.
    now = time.time()
    for since, colour, words in ((now - 10, "amber", "within the policy (1 min)"),
                                 (now - 90, "red", "longer than the policy allows (1 min)")):
        put_state(db, "a", engine_status("Primary", "Connecting", repl="Off", oos=8192, degraded={
            "since": since, "kind": "link-lost", "reason": "link lost: LinkClosed"}), "degraded",
            rpo=(8192, 12.5))
        r = replication(db)["web1"]
        assert (r.state, r.colour) == ("degraded", colour), r
        assert words in r.reasons[0] and "link-lost: link lost: LinkClosed" in r.reasons[0]
        assert (r.rpo_bytes, r.rpo_seconds, r.out_of_sync_bytes) == (8192, 12.5, 8192)

    # RPO exposure older than the RP interval (300 s) is its own reason.
    put_state(db, "a", engine_status("Primary", "Connecting", repl="Off", oos=8192, degraded={
        "since": now - 10, "kind": "link-lost", "reason": "x"}), "degraded", rpo=(8192, 400.0))
    assert any("RPO exposure 6 min (8.0 KiB), over the RP interval (5 min)" in x
               for x in replication(db)["web1"].reasons)

    put_state(db, "a", engine_status("Primary", repl="SyncSource", oos=3 << 20, eta=42.0), "syncing")
    r = replication(db)["web1"]
    assert r.colour == "amber" and r.reasons == ("vm1: resyncing, 3.0 MiB out of sync, about 42 s to go",)
    assert r.resync_eta_s == 42.0

    put_state(db, "a", engine_status("Primary", disk="Inconsistent"), "in-sync")
    assert replication(db)["web1"].reasons == ("vm1: the Primary on a has Inconsistent data (volume 0)",)

    put_state(db, "a", engine_status("Primary", "StandAlone", standalone={
        "kind": "split-brain", "reason": "both sides changed"}), "split-brain")
    r = replication(db)["web1"]
    assert (r.state, r.colour) == ("split-brain", "red")
    assert r.reasons == ("vm1: split brain on a (both sides changed)",)

    put_state(db, "a", engine_status("Primary"), "in-sync")
    put_state(db, "b", engine_status("Primary"), "in-sync")
    assert replication(db)["web1"].reasons == ("vm1: Primary on both a and b",)
    put_state(db, "a", engine_status("Secondary"), "in-sync")
    put_state(db, "b", engine_status("Secondary"), "in-sync")
    r = replication(db)["web1"]
    assert r.colour == "amber" and "no Primary" in r.reasons[0]

    # A status of an unexpected shape is said so, without failing.
    put_state(db, "a", engine_status("Primary", "Connecting", degraded={"since": "yesterday"}), "degraded")
    assert replication(db)["web1"].reasons == ("vm1: unreadable engine status (ValueError)",)

    # Stale status: amber, saying how old; an open engine-unreachable alert: red.
    put_state(db, "a", engine_status("Primary"), "in-sync", seen_ago_s=125)
    r = replication(db)["web1"]
    assert (r.state, r.colour) == ("stale", "amber")
    assert r.reasons == ("vm1: status from a is stale (2 min old)",)
    with db.connect() as conn:
        conn.execute("INSERT INTO alerts (dedup_key, kind, severity, subject) VALUES "
                     "('engine-unreachable:a', 'engine-unreachable', 'critical', 'engine on a unreachable')")
    r = replication(db)["web1"]
    assert (r.state, r.colour) == ("unreachable", "red")
    assert r.reasons == ("vm1: engine on a unreachable (last status 2 min ago)",)


def test_dashboard_shows_engines_events_and_figures(client, states_db):
    db = states_db
    put_state(db, "a", engine_status("Primary", "Connecting", repl="Off", oos=40960, degraded={
        "since": time.time() - 5, "kind": "link-lost", "reason": "link lost"}), "degraded", rpo=(40960, 5.0))
    put_state(db, "b", engine_status("Secondary"), "in-sync", seen_ago_s=100)
    with db.connect() as conn:
        conn.execute("INSERT INTO engine_events (hypervisor_id, resource, event, detail) VALUES "
                     "(%s, 'vm1', 'disconnected', '{\"kind\": \"link-lost\"}')", (db.hv["a"],))
    login(client)
    html = client.get("/dashboard").text
    colour, row = vm_row(html, "web1")
    assert colour == "amber" and "within the policy" in row
    assert '<td class="rpo">5 s / 40.0 KiB</td>' in row and '<td class="oos">40.0 KiB</td>' in row
    assert 'id="engine-a" data-status="green"' in html
    assert 'id="engine-b" data-status="amber"' in html and "stale: last status 1 min ago" in html
    site_b = html.split('id="site-site-b"')[1].split("</section>")[0]
    assert "engine on b: stale" in site_b and 'badge amber">amber</span> Site site-b' in site_b
    events = html.split("<h2>Recent engine events</h2>")[1].split("<h2>")[0]
    assert "disconnected" in events and "link-lost" in events
