"""The dashboard against a real PostgreSQL: login by token cookie, colours with their reasons,
last runs and the last drill report, HTML escaping of catalogue contents."""

import re

import pytest
from fastapi.testclient import TestClient

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
