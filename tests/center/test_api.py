"""The REST API in-process (Starlette's TestClient runs the app and its lifespan) against a real
PostgreSQL: auth and roles, audit of every mutating call, input validation, lifecycles."""

import asyncio
import json

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.rows import dict_row

from tandem.center import alerts
from tandem.center.app import API_PREFIX, create_app
from tandem.center.config import ApiConfig, Config, DatabaseConfig

API = API_PREFIX
MAX_BODY = 64 * 1024


@pytest.fixture
def client(db):
    cfg = Config(
        database=DatabaseConfig(dsn=db.dsn, pool_min=1, pool_max=4), api=ApiConfig(max_body_bytes=MAX_BODY)
    )
    app = create_app(cfg)
    with TestClient(app) as c:
        c.db, c.fastapi = db, app
        yield c


def auth(db, who: str = "admin") -> dict:
    return {"Authorization": f"Bearer {db.tokens[who]}"}


def post(client, path, body, who="admin"):
    return client.post(API + path, json=body, headers=auth(client.db, who))


def catalogue(client) -> dict:
    """Two sites, a hypervisor, a policy, a VM with a volume: the ids."""
    ids = {}
    for site in ("site-a", "site-b"):
        ids[site] = post(client, "/sites", {"name": site}).json()["id"]
    ids["hv"] = post(
        client, "/hypervisors", {"name": "hv-a1", "site_id": ids["site-a"], "address": "10.0.0.11"}
    ).json()["id"]
    ids["policy"] = post(
        client, "/policies", {"name": "gold", "rp_interval_s": 300, "rp_retention": 24, "sync_timeout_s": 60}
    ).json()["id"]
    r = post(
        client,
        "/vms",
        {
            "name": "web01",
            "production_site_id": ids["site-a"],
            "dr_site_id": ids["site-b"],
            "hypervisor_id": ids["hv"],
            "policy_id": ids["policy"],
        },
    )
    assert r.status_code == 201, r.text
    ids["vm"] = r.json()["id"]
    ids["volume"] = post(
        client,
        "/volumes",
        {"vm_id": ids["vm"], "resource": "web01", "volume": 0, "target_dev": "vda", "size_bytes": 1 << 30},
    ).json()["id"]
    return ids


def count(db, table: str) -> int:
    with db.connect() as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# -- the database side ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement", ["UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log", "TRUNCATE audit_log"]
)
def test_audit_log_is_append_only(db, statement):
    with db.connect() as conn:
        conn.execute("INSERT INTO audit_log (actor, action, ok) VALUES ('t', 'x', true)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(statement)
        assert conn.execute("SELECT actor FROM audit_log").fetchall() == [("t",)]


def test_a_change_and_its_audit_row_commit_together(client):
    """Make the audit insert fail for one action: the change it records must roll back too."""
    with client.db.connect() as conn:
        conn.execute("ALTER TABLE audit_log ADD CONSTRAINT no_site_create CHECK (action <> 'site.create')")
    r = post(client, "/sites", {"name": "site-a"})
    assert r.status_code == 422, r.text
    assert count(client.db, "sites") == 0
    assert (
        post(
            client, "/policies", {"name": "p", "rp_interval_s": 1, "rp_retention": 1, "sync_timeout_s": 0}
        ).status_code
        == 201
    )


# -- health and auth ------------------------------------------------------------------------------


def test_health_needs_no_token_and_says_little(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Bearer tdc_" + "A" * 43,
        "Bearer not-a-token",
        "Basic dXNlcjpwdw==",
        "Bearer " + "x" * 5000,
        "revoked",
    ],
)
def test_missing_bad_or_revoked_token_is_401(client, header):
    if header == "revoked":
        header = f"Bearer {client.db.tokens['revoked']}"
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", "/sites"), ("POST", "/sites"), ("GET", "/audit")):
        r = client.request(method, API + path, headers=headers, json={"name": "x"})
        assert r.status_code == 401, (header, path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    assert count(client.db, "sites") == 0


@pytest.mark.parametrize(
    "who,method,path,body,expected",
    [
        ("reader", "GET", "/sites", None, 200),
        ("reader", "POST", "/sites", {"name": "s"}, 403),
        ("reader", "POST", "/runs", {"kind": "drill"}, 403),
        ("reader", "GET", "/audit", None, 403),
        ("reader", "GET", "/tokens", None, 403),
        ("operator", "POST", "/runs", {"kind": "drill"}, 201),
        ("operator", "POST", "/sites", {"name": "s"}, 403),
        ("operator", "POST", "/tokens", {"name": "t", "role": "admin"}, 403),
        ("operator", "GET", "/audit", None, 403),
        ("admin", "GET", "/audit", None, 200),
        ("admin", "POST", "/sites", {"name": "s"}, 201),
    ],
)
def test_roles(client, who, method, path, body, expected):
    r = client.request(method, API + path, headers=auth(client.db, who), json=body)
    assert r.status_code == expected, r.text


def test_token_last_used_is_recorded(client):
    client.get(API + "/sites", headers=auth(client.db, "reader"))
    with client.db.connect() as conn:
        assert conn.execute(
            "SELECT last_used_at IS NOT NULL FROM api_tokens WHERE name = 'test-reader'"
        ).fetchone()[0]


def test_tokens_made_by_the_api_work_once_shown_and_can_be_revoked(client):
    r = post(client, "/tokens", {"name": "awx", "role": "operator"})
    assert r.status_code == 201
    made = r.json()
    assert made["token"].startswith("tdc_") and made["role"] == "operator"
    headers = {"Authorization": f"Bearer {made['token']}"}
    assert client.post(API + "/runs", json={"kind": "drill"}, headers=headers).status_code == 201
    listed = client.get(API + "/tokens", headers=auth(client.db)).json()
    assert listed and all(not {"token", "token_sha256"} & set(t) for t in listed)
    assert post(client, f"/tokens/{made['id']}/revoke", {}).status_code == 200
    assert client.get(API + "/sites", headers=headers).status_code == 401
    # the clear token is nowhere in the audit log
    with client.db.connect() as conn:
        text = json.dumps(conn.execute("SELECT inputs, result FROM audit_log").fetchall())
        assert made["token"] not in text


def test_a_token_cannot_revoke_itself(client):
    me = next(
        t for t in client.get(API + "/tokens", headers=auth(client.db)).json() if t["name"] == "test-admin"
    )
    r = post(client, f"/tokens/{me['id']}/revoke", {})
    assert r.status_code == 409
    assert client.get(API + "/sites", headers=auth(client.db)).status_code == 200


# -- every mutating call is audited ---------------------------------------------------------------


def _mutations(ids: dict, run_id: int, alert_id: int, token_id: int) -> dict:
    """(method, route path) -> (path, body, role) for every mutating route of the API."""
    plan = {"name": "plan1", "document": {"groups": [{"name": "g1", "vms": ["web01"]}]}}
    mapping = {"name": "map1", "document": {"networks": [{"source": "br-a", "target": "br-b"}]}}
    return {
        ("POST", "/sites"): ("/sites", {"name": "site-c"}, "admin"),
        ("PUT", "/sites/{item_id}"): (
            f"/sites/{ids['site-a']}",
            {"name": "site-a", "description": "A"},
            "admin",
        ),
        ("POST", "/hypervisors"): (
            "/hypervisors",
            {"name": "hv-b1", "site_id": ids["site-b"], "address": "hv-b1.example"},
            "admin",
        ),
        ("PUT", "/hypervisors/{item_id}"): (
            f"/hypervisors/{ids['hv']}",
            {
                "name": "hv-a1",
                "site_id": ids["site-a"],
                "address": "10.0.0.12",
                "engine_url": "https://10.0.0.12:7789",
            },
            "admin",
        ),
        ("POST", "/policies"): (
            "/policies",
            {
                "name": "silver",
                "rp_interval_s": 3600,
                "rp_retention": 4,
                "sync_timeout_s": 600,
                "priority": 5,
            },
            "admin",
        ),
        ("PUT", "/policies/{item_id}"): (
            f"/policies/{ids['policy']}",
            {"name": "gold", "rp_interval_s": 60, "rp_retention": 24, "sync_timeout_s": 60},
            "admin",
        ),
        ("POST", "/vms"): (
            "/vms",
            {
                "name": "db01",
                "production_site_id": ids["site-b"],
                "dr_site_id": ids["site-a"],
                "policy_id": ids["policy"],
            },
            "admin",
        ),
        ("PUT", "/vms/{item_id}"): (
            f"/vms/{ids['vm']}",
            {
                "name": "web01",
                "production_site_id": ids["site-a"],
                "dr_site_id": ids["site-b"],
                "policy_id": ids["policy"],
            },
            "admin",
        ),
        ("POST", "/volumes"): (
            "/volumes",
            {"vm_id": ids["vm"], "resource": "web01", "volume": 1, "target_dev": "vdb", "size_bytes": 4096},
            "admin",
        ),
        ("PUT", "/volumes/{item_id}"): (
            f"/volumes/{ids['volume']}",
            {"vm_id": ids["vm"], "resource": "web01", "volume": 0, "target_dev": "vda", "size_bytes": 8192},
            "admin",
        ),
        ("POST", "/network-mappings"): ("/network-mappings", mapping, "admin"),
        ("PUT", "/network-mappings/{item_id}"): (
            "/network-mappings/{mapping}",
            {
                **mapping,
                "document": {
                    "networks": [{"source": "br-a", "target": "br-c", "target_cidr": "10.9.0.0/24"}]
                },
            },
            "admin",
        ),
        ("POST", "/plans"): ("/plans", plan, "admin"),
        ("PUT", "/plans/{item_id}"): ("/plans/{plan}", {**plan, "network_mapping_id": "{mapping}"}, "admin"),
        ("DELETE", "/plans/{item_id}"): ("/plans/{plan}", None, "admin"),
        ("DELETE", "/network-mappings/{item_id}"): ("/network-mappings/{mapping}", None, "admin"),
        ("POST", "/runs"): ("/runs", {"kind": "failover", "parameters": {"mode": "planned"}}, "operator"),
        ("POST", "/runs/{run_id}/steps"): (
            f"/runs/{run_id}/steps",
            {"name": "demote", "status": "changed"},
            "operator",
        ),
        ("POST", "/runs/{run_id}/finish"): (f"/runs/{run_id}/finish", {"state": "succeeded"}, "operator"),
        ("POST", "/recovery-points"): (
            "/recovery-points",
            {
                "vm_id": ids["vm"],
                "site_id": ids["site-b"],
                "name": "rp-1",
                "taken_at": "2026-11-30T01:00:00Z",
                "consistency": "crash",
            },
            "operator",
        ),
        ("POST", "/alerts/{alert_id}/ack"): (f"/alerts/{alert_id}/ack", None, "operator"),
        ("POST", "/tokens"): (
            "/tokens",
            {
                "name": "ansible",
                "role": "operator",
            },
            "admin",
        ),
        ("POST", "/tokens/{token_id}/revoke"): (f"/tokens/{token_id}/revoke", None, "admin"),
        ("DELETE", "/volumes/{item_id}"): (f"/volumes/{ids['volume']}", None, "admin"),
        ("DELETE", "/vms/{item_id}"): (f"/vms/{ids['vm']}", None, "admin"),
        ("DELETE", "/hypervisors/{item_id}"): (f"/hypervisors/{ids['hv']}", None, "admin"),
        ("DELETE", "/policies/{item_id}"): ("/policies/{silver}", None, "admin"),
        ("DELETE", "/sites/{item_id}"): ("/sites/{site-c}", None, "admin"),
    }


def _raise_alert(dsn: str, key: str) -> int:
    async def go():
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
            return await alerts.raise_alert(conn, key, "engine_unreachable", "critical", "hv-a1 unreachable")

    return asyncio.run(go())


def _contains(big, small) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _contains(big[k], v) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(big) == len(small) and all(map(_contains, big, small))
    return big == small


def test_every_mutating_endpoint_writes_an_audit_row(client):
    db = client.db
    ids = catalogue(client)
    run_id = post(client, "/runs", {"kind": "drill"}, "operator").json()["id"]
    alert_id, _new = _raise_alert(db.dsn, "engine:hv-a1")
    token_id = next(
        t["id"] for t in client.get(API + "/tokens", headers=auth(db)).json() if t["name"] == "test-reader"
    )
    table = _mutations(ids, run_id, alert_id, token_id)
    routes = {
        (method.upper(), path.removeprefix(API))
        for path, ops in client.fastapi.openapi()["paths"].items()
        for method in ops
        if method != "get"
    }
    assert routes == set(table), "every mutating route needs a case here"
    created = {}
    for (method, _route), (path, body, role) in table.items():
        path = path.format(**created)
        if body and isinstance(body.get("network_mapping_id"), str):
            body = {**body, "network_mapping_id": created["mapping"]}
        before = len(db.audit_rows())
        r = client.request(method, API + path, json=body, headers=auth(db, role))
        assert r.status_code in (200, 201, 204), (method, path, r.text)
        if path == "/sites" and method == "POST":
            created["site-c"] = r.json()["id"]
        if path == "/network-mappings" and method == "POST":
            created["mapping"] = r.json()["id"]
        if path == "/policies" and method == "POST":
            created["silver"] = r.json()["id"]
        if path == "/plans" and method == "POST":
            created["plan"] = r.json()["id"]
        rows = db.audit_rows()
        assert len(rows) == before + 1, (method, path)
        _id, actor, action, target, inputs, ok, result = rows[-1]
        assert actor == f"test-{role}" and ok is True, rows[-1]
        noun = action.split(".")[0].replace("_", "-")
        assert path.startswith(f"/{noun}") or path.startswith(f"/{noun}s") or noun == "policy", (action, path)
        assert _contains(inputs, body or {}), (inputs, body)  # the body, plus defaults
        assert target and target.split("/")[1].isdigit() and result, rows[-1]


def test_a_refused_change_is_audited_as_refused_and_changes_nothing(client):
    r = client.delete(API + "/sites/999", headers=auth(client.db))
    assert r.status_code == 404
    _id, actor, action, target, _inputs, ok, result = client.db.audit_rows()[-1]
    assert (actor, action, target, ok, result["status"]) == (
        "test-admin",
        "site.delete",
        "site/999",
        False,
        404,
    )
    # a change refused for the role is recorded as denied; a refused read is not
    assert client.delete(API + "/sites/1", headers=auth(client.db, "reader")).status_code == 403
    _id, actor, action, target, _inputs, ok, result = client.db.audit_rows()[-1]
    assert (actor, action, target, ok, result) == (
        "test-reader", "denied", "DELETE /api/v1/sites/1", False, {"status": 403, "needs": "admin"})
    before = len(client.db.audit_rows())
    assert client.get(API + "/audit", headers=auth(client.db, "operator")).status_code == 403
    assert len(client.db.audit_rows()) == before


def test_secrets_in_inputs_are_redacted(client):
    run = post(
        client,
        "/runs",
        {
            "kind": "drill",
            "parameters": {"vault_password": "hunter2", "mode": "x", "nested": [{"api_token": "abc"}]},
        },
        "operator",
    )
    assert run.status_code == 201
    inputs = client.db.audit_rows()[-1][4]
    assert inputs["parameters"]["vault_password"] == "<redacted>"
    assert inputs["parameters"]["nested"][0]["api_token"] == "<redacted>"
    assert inputs["parameters"]["mode"] == "x"


# -- malformed input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"{",
        b"[]",
        b"null",
        b'{"name": 5}',
        b'{"name": "UPPER"}',
        b'{"name": "a", "extra": 1}',
        b'{"name": "a", "description": "nul\\u0000"}',
        b'{"name": "' + b"a" * 100 + b'"}',
        b"\xff\xfe",
        b"name=a",
    ],
)
def test_malformed_bodies_are_4xx_and_change_nothing(client, content):
    r = client.post(
        API + "/sites", content=content, headers={**auth(client.db), "Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500 and "detail" in r.json(), r.text
    assert count(client.db, "sites") == 0


def test_wrong_types_and_bounds(client):
    ids = catalogue(client)
    deep = {"x": 1}
    for _level in range(9):
        deep = {"x": deep}
    bad = [
        ("/policies", {"name": "p", "rp_interval_s": "300", "rp_retention": 1, "sync_timeout_s": 0}),
        ("/policies", {"name": "p", "rp_interval_s": 0, "rp_retention": 1, "sync_timeout_s": 0}),
        ("/policies", {"name": "p", "rp_interval_s": 2**40, "rp_retention": 1, "sync_timeout_s": 0}),
        (
            "/vms",
            {
                "name": "v",
                "production_site_id": ids["site-a"],
                "dr_site_id": ids["site-a"],
                "policy_id": ids["policy"],
            },
        ),
        ("/vms", {"name": "v", "production_site_id": 2**63, "dr_site_id": 1, "policy_id": 1}),
        ("/runs", {"kind": "panic"}),
        ("/runs", {"kind": "drill", "parameters": [1]}),
        ("/runs", {"kind": "drill", "parameters": deep}),
        (
            "/recovery-points",
            {
                "vm_id": ids["vm"],
                "site_id": ids["site-b"],
                "name": "rp",
                "taken_at": "2026-11-30T01:00:00",
                "consistency": "crash",
            },
        ),  # naive time
        (
            "/network-mappings",
            {
                "name": "m",
                "document": {"networks": [{"source": "a", "target": "b"}, {"source": "a", "target": "c"}]},
            },
        ),
        (
            "/network-mappings",
            {
                "name": "m",
                "document": {"networks": [{"source": "a", "target": "b", "target_cidr": "10.0.0.1/33"}]},
            },
        ),
        (
            "/plans",
            {
                "name": "p",
                "document": {"groups": [{"name": "g", "vms": ["web01"]}, {"name": "h", "vms": ["web01"]}]},
            },
        ),
        ("/plans", {"name": "p", "document": {"groups": [{"name": "g", "vms": ["ghost"]}]}}),
        ("/plans", {"name": "p", "document": {"groups": []}}),
    ]
    role = {"/runs": "operator", "/recovery-points": "operator"}
    for path, body in bad:
        r = post(client, path, body, role.get(path, "admin"))
        assert r.status_code == 422, (path, body, r.text)
    for path in ("/sites/0", "/sites/-1", "/sites/abc", f"/sites/{2**63}"):
        assert client.get(API + path, headers=auth(client.db)).status_code == 422, path
    assert client.get(API + "/sites?limit=0", headers=auth(client.db)).status_code == 422
    assert client.get(API + "/recovery-points", headers=auth(client.db)).status_code == 422  # vm_id required


def test_references_and_duplicates(client):
    ids = catalogue(client)
    r = post(client, "/hypervisors", {"name": "hv-x", "site_id": 4242, "address": "h"})
    assert r.status_code == 422 and "missing" in r.json()["detail"]
    assert post(client, "/sites", {"name": "site-a"}).status_code == 409
    r = client.delete(API + f"/sites/{ids['site-a']}", headers=auth(client.db))
    assert r.status_code == 409 and "referenced" in r.json()["detail"]
    assert client.get(API + f"/sites/{ids['site-a']}", headers=auth(client.db, "reader")).status_code == 200


def test_oversize_bodies_are_413(client):
    big = {"name": "s", "description": "x" * (MAX_BODY + 1)}
    r = post(client, "/sites", big)
    assert r.status_code == 413
    # without a Content-Length (chunked): counted while read
    r = client.post(
        API + "/sites",
        content=iter([b'{"name": "s", "description": "', b"x" * MAX_BODY, b'"}']),
        headers={**auth(client.db), "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    r = client.post(API + "/sites", content=b"{}", headers={**auth(client.db), "Content-Length": "x1"})
    assert r.status_code == 400
    assert count(client.db, "sites") == 0


# -- lifecycles ---------------------------------------------------------------------------------------


def test_run_lifecycle(client):
    r = post(client, "/runs", {"kind": "failover", "parameters": {"mode": "unplanned"}}, "operator")
    run = r.json()
    assert r.status_code == 201 and run["state"] == "running" and run["started_by"] == "test-operator"
    for name, status in (("fence", "ok"), ("promote", "changed"), ("start vms", "failed")):
        r = post(
            client,
            f"/runs/{run['id']}/steps",
            {
                "name": name,
                "status": status,
                "detail": {"vm": "web01"},
                "started_at": "2026-11-30T01:00:00+01:00",
            },
            "operator",
        )
        assert r.status_code == 201, r.text
    r = post(
        client, f"/runs/{run['id']}/finish", {"state": "failed", "result": {"failed_step": 3}}, "operator"
    )
    done = r.json()
    assert r.status_code == 200 and done["state"] == "failed" and done["finished_at"]
    assert [(s["seq"], s["name"]) for s in done["steps"]] == [(1, "fence"), (2, "promote"), (3, "start vms")]
    assert (
        post(client, f"/runs/{run['id']}/steps", {"name": "late", "status": "ok"}, "operator").status_code
        == 409
    )
    assert post(client, f"/runs/{run['id']}/finish", {"state": "succeeded"}, "operator").status_code == 409
    assert post(client, "/runs/999/finish", {"state": "succeeded"}, "operator").status_code == 404
    got = client.get(API + f"/runs/{run['id']}", headers=auth(client.db, "reader")).json()
    assert got["result"] == {"failed_step": 3} and len(got["steps"]) == 3


def test_recovery_points_are_reported_once_and_listed_newest_first(client):
    ids = catalogue(client)
    rp = {
        "vm_id": ids["vm"],
        "site_id": ids["site-b"],
        "name": "rp-1",
        "taken_at": "2026-11-30T01:00:00Z",
        "consistency": "filesystem",
    }
    first = post(client, "/recovery-points", rp, "operator")
    assert first.status_code == 201 and first.json()["reported_by"] == "test-operator"
    again = post(client, "/recovery-points", {**rp, "taken_at": "2026-11-30T02:00:00+01:00"}, "operator")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]  # same instant
    assert post(client, "/recovery-points", {**rp, "consistency": "crash"}, "operator").status_code == 409
    assert (
        post(
            client, "/recovery-points", {**rp, "name": "rp-2", "taken_at": "2026-11-30T03:00:00Z"}, "operator"
        ).status_code
        == 201
    )
    listed = client.get(
        API + "/recovery-points", params={"vm_id": ids["vm"]}, headers=auth(client.db, "reader")
    )
    assert [p["name"] for p in listed.json()] == ["rp-2", "rp-1"]
    assert count(client.db, "recovery_points") == 2


def test_alerts_dedup_ack_and_clear(client):
    first, new = _raise_alert(client.db.dsn, "degraded:web01")
    again, new2 = _raise_alert(client.db.dsn, "degraded:web01")
    assert (first, new, new2) == (again, True, False)
    listed = client.get(API + "/alerts", headers=auth(client.db, "reader")).json()
    assert [a["id"] for a in listed] == [first] and listed[0]["state"] == "raised"
    assert client.post(API + f"/alerts/{first}/ack", headers=auth(client.db, "reader")).status_code == 403
    r = client.post(API + f"/alerts/{first}/ack", headers=auth(client.db, "operator"))
    assert r.status_code == 200 and r.json()["acked_by"] == "test-operator"
    assert client.post(API + f"/alerts/{first}/ack", headers=auth(client.db, "operator")).status_code == 409

    async def clear():
        async with await psycopg.AsyncConnection.connect(
            client.db.dsn, autocommit=True, row_factory=dict_row
        ) as conn:
            return await alerts.clear_alert(conn, "degraded:web01")

    assert asyncio.run(clear()) == first
    third, new3 = _raise_alert(client.db.dsn, "degraded:web01")
    assert new3 and third != first
    states = {
        a["id"]: a["state"]
        for a in client.get(API + "/alerts?state=all", headers=auth(client.db, "reader")).json()
    }
    assert states == {first: "cleared", third: "raised"}


def test_a_read_only_database_serves_reads_and_refuses_changes_with_503(db):
    """What an instance sees when its database is a standby: reads work, changes are 503
    (retry through the VIP), a role refusal is still 403, and nothing is written."""
    with db.connect() as conn:
        conn.execute(f'ALTER DATABASE "{db.name}" SET default_transaction_read_only = on')
    cfg = Config(database=DatabaseConfig(dsn=db.dsn, pool_min=1, pool_max=2))
    with TestClient(create_app(cfg)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get(API + "/sites", headers=auth(db, "reader")).status_code == 200
        r = client.post(API + "/sites", json={"name": "s"}, headers=auth(db))
        assert r.status_code == 503 and "read-only" in r.json()["detail"]
        assert client.post(API + "/sites", json={"name": "s"}, headers=auth(db, "reader")).status_code == 403
    assert count(db, "sites") == 0 and db.audit_rows() == []


def test_runs_and_steps_are_idempotent_by_key(client):
    """tandem.dr.tandem_center_run records a run and its steps under keys it chooses (migration
    0004): recording again is a no-op (200), another value under a known key a 409."""
    body = {"kind": "drill", "key": "drill-web-1", "series": "drill-web", "parameters": {"plan": "web"}}
    first = post(client, "/runs", body, "operator")
    assert first.status_code == 201 and first.json()["key"] == "drill-web-1", first.text
    run_id = first.json()["id"]
    again = post(client, "/runs", body, "operator")
    assert again.status_code == 200 and again.json()["id"] == run_id
    assert post(client, "/runs", {**body, "kind": "failover"}, "operator").status_code == 409
    assert post(client, "/runs", {**body, "parameters": {"plan": "db"}}, "operator").status_code == 409
    assert count(client.db, "runs") == 1
    step = {"key": "start-web01", "name": "start web01", "status": "changed",
            "detail": {"vms": {"web01": {}}}, "started_at": "2026-11-30T01:00:00Z"}
    r = post(client, f"/runs/{run_id}/steps", step, "operator")
    assert r.status_code == 201 and r.json()["seq"] == 1 and r.json()["key"] == "start-web01"
    same_instant = {**step, "started_at": "2026-11-30T02:00:00+01:00"}
    assert post(client, f"/runs/{run_id}/steps", same_instant, "operator").status_code == 200
    assert post(client, f"/runs/{run_id}/steps", {**step, "status": "failed"}, "operator").status_code == 409
    assert post(client, f"/runs/{run_id}/steps", {**step, "key": "health"}, "operator").json()["seq"] == 2
    assert count(client.db, "run_steps") == 2
    # The newest run of a series, and a run by key, without paging through all runs.
    post(client, "/runs", {"kind": "drill", "key": "other", "series": "drill-db"}, "operator")
    newer = post(client, "/runs", {**body, "key": "drill-web-2"}, "operator").json()
    hdr = auth(client.db, "reader")
    newest = client.get(API + "/runs", params={"series": "drill-web", "newest_first": "true", "limit": 1},
                        headers=hdr).json()
    assert [r["key"] for r in newest] == ["drill-web-2"]
    by_key = client.get(API + "/runs", params={"key": "drill-web-1"}, headers=hdr).json()
    assert [r["id"] for r in by_key] == [run_id]
    assert client.get(API + "/runs", params={"key": "bad key!"}, headers=hdr).status_code == 422
    # Finishing is once; the same finish again is answered unchanged, another one refused.
    fin = {"state": "succeeded", "result": {"vms": 1}}
    done = post(client, f"/runs/{run_id}/finish", fin, "operator")
    assert done.status_code == 200 and [s["seq"] for s in done.json()["steps"]] == [1, 2]
    assert post(client, f"/runs/{run_id}/finish", fin, "operator").json()["finished_at"] == \
        done.json()["finished_at"]
    assert post(client, f"/runs/{run_id}/finish", {**fin, "result": {}}, "operator").status_code == 409
    # A known step of a finished run is still a no-op; a new one is refused.
    assert post(client, f"/runs/{run_id}/steps", step, "operator").status_code == 200
    assert post(client, f"/runs/{run_id}/steps", {**step, "key": "late"}, "operator").status_code == 409
    assert post(client, f"/runs/{newer['id']}/steps", step, "reader").status_code == 403
    audit = client.db.audit_rows()
    actions = [(a[2], a[5], (a[6] or {}).get("new")) for a in audit if a[2].startswith("run.")]
    assert ("run.create", True, False) in actions and ("run.step", True, False) in actions
    assert ("run.create", False, None) in actions          # the 409s are audited as refused
