"""The dashboard: server-rendered HTML (jinja2, autoescaped), no front-end build, a meta refresh.

Access: a login form takes an API token (any role; the dashboard only reads) and keeps it in
a cookie that scripts cannot read (HttpOnly), sent only to this site (SameSite=Strict) and,
over HTTPS, only encrypted (Secure). Every page load checks the token again, so a revoked
token ends the session at the next refresh. Without a valid cookie, / redirects to /login.

Colours (tandem.center.status; worst reason wins, every reason is shown):
- VM: its replication as the monitor last recorded it (green in sync; amber resyncing,
  degraded within policy, stale status...; red degraded past policy, split brain, engine
  unreachable...), its open alerts (warning amber, critical red; the engine's own alerts are
  shown live through the replication state instead), its last recovery point (none or older
  than 1.25 x the RP interval: amber; older than 2 x: red);
- site: the worst of its production VMs, of its engines (unreachable: red; stale: amber) and
  of the open alerts naming it; the page header is the worst of everything, global alerts
  included. Alerts name their VM or site in details ("vm": name, "site": name).
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import jinja2
import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from psycopg import AsyncConnection
from psycopg_pool import PoolTimeout

from . import tokens
from .config import MonitorConfig
from .status import ALERT_COLOUR, Status, age, named, open_alerts, size, stale_after, vm_statuses, worst

COOKIE = "tandem_center_session"
COOKIE_MAX_AGE_S = 12 * 3600
REFRESH_S = 15
MAX_LOGIN_BODY = 4096
# Content only from this page itself: inline CSS, no script at all, forms post back here.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined)

router = APIRouter(include_in_schema=False)


RUNS = """
SELECT r.id, r.kind, r.state, r.started_by, r.started_at, r.finished_at, r.result, pl.name AS plan,
       (SELECT count(*) FROM run_steps s WHERE s.run_id = r.id) AS steps,
       (SELECT count(*) FROM run_steps s WHERE s.run_id = r.id AND s.status = 'failed') AS failed_steps
  FROM runs r LEFT JOIN recovery_plans pl ON pl.id = r.plan_id"""
ENGINES = """
SELECT h.name, s.name AS site, max(st.seen_at) AS seen_at,
       extract(epoch FROM now() - max(st.seen_at))::float8 AS seen_age_s, count(st.resource) AS resources,
       EXISTS (SELECT 1 FROM alerts a WHERE a.state <> 'cleared'
                  AND a.dedup_key = 'engine-unreachable:' || h.name) AS unreachable
  FROM hypervisors h JOIN sites s ON s.id = h.site_id
  LEFT JOIN engine_resource_state st ON st.hypervisor_id = h.id
 WHERE h.engine_url IS NOT NULL
 GROUP BY h.id, h.name, s.name ORDER BY h.name"""
EVENTS = """
SELECT e.recorded_at, h.name AS hypervisor, e.resource, e.event, e.source, e.detail
  FROM engine_events e JOIN hypervisors h ON h.id = e.hypervisor_id
 ORDER BY e.id DESC LIMIT %s"""
EVENT_ROWS = 25
RUN_COLOUR = {"succeeded": "green", "failed": "red", "aborted": "amber", "running": "amber"}


async def _rows(conn: AsyncConnection, query: str, params=()) -> list[dict]:
    return await (await conn.execute(query, params)).fetchall()


async def snapshot(conn: AsyncConnection, stale_s: float = 30.0) -> dict:
    """Everything the page shows, with the colours worked out (status older than stale_s
    seconds is stale)."""
    sites = await _rows(conn, "SELECT id, name, description FROM sites ORDER BY name")
    hypervisors = await _rows(conn, "SELECT h.name, h.address, s.name AS site FROM hypervisors h "
                                    "JOIN sites s ON s.id = h.site_id ORDER BY h.name")
    engines = await _rows(conn, ENGINES)
    alerts = await open_alerts(conn)
    vms = await vm_statuses(conn, alerts, stale_s)
    runs = await _rows(conn, RUNS + " ORDER BY r.started_at DESC, r.id DESC LIMIT 20")
    drill = await _rows(conn, RUNS + " WHERE r.kind = 'drill' AND r.state <> 'running' "
                                     "ORDER BY r.started_at DESC, r.id DESC LIMIT 1")
    drill_steps = await _rows(conn, "SELECT seq, name, status, started_at, finished_at, detail "
                                    "FROM run_steps WHERE run_id = %s ORDER BY seq",
                              (drill[0]["id"],)) if drill else []
    events = await _rows(conn, EVENTS, (EVENT_ROWS,))

    for engine in engines:
        if engine["unreachable"]:
            engine["colour"], engine["text"] = "red", "unreachable"
        elif engine["seen_at"] is None:
            engine["colour"], engine["text"] = "amber", "no status recorded yet"
        elif engine["seen_age_s"] > stale_s:
            engine["colour"], engine["text"] = "amber", f"stale: last status {age(engine['seen_age_s'])} ago"
        else:
            engine["colour"], engine["text"] = "green", f"last status {age(engine['seen_age_s'])} ago"
    by_site = []
    for site in sites:
        status = Status()
        site_vms = [vm for vm in vms if vm["production_site"] == site["name"]]
        for alert in alerts:
            if named(alert, "site") == site["name"] and alert["severity"] in ALERT_COLOUR:
                status.add(ALERT_COLOUR[alert["severity"]], f"{alert['severity']} alert: {alert['subject']}")
        site_engines = [e for e in engines if e["site"] == site["name"]]
        for engine in site_engines:
            if engine["colour"] != "green":
                status.add(engine["colour"], f"engine on {engine['name']}: {engine['text']}")
        for vm in site_vms:
            if vm["status"].colour != "green":
                status.add(vm["status"].colour, f"VM {vm['name']}: {vm['status'].colour}")
        if not status.reasons:
            status.reasons.append(f"{len(site_vms)} protected VM(s), all green" if site_vms
                                  else "no protected VM")
        by_site.append({**site, "status": status, "vms": site_vms, "engines": site_engines,
                        "hypervisors": [h for h in hypervisors if h["site"] == site["name"]]})
    for vm in vms:
        r = vm["replication"]
        vm["rpo_text"] = f"{age(r.rpo_seconds)} / {size(r.rpo_bytes)}"
        vm["oos_text"] = size(r.out_of_sync_bytes) + (f", ETA {age(r.resync_eta_s)}"
                                                       if r.resync_eta_s is not None else "")
    for run in runs + drill:
        run["colour"] = RUN_COLOUR[run["state"]]
        run["result_json"] = json.dumps(run["result"], indent=2, sort_keys=True) if run["result"] else ""
    for step in drill_steps:
        step["detail_json"] = json.dumps(step["detail"], sort_keys=True) if step["detail"] else ""
    for event in events:
        event["detail_json"] = json.dumps(event["detail"], sort_keys=True) if event["detail"] else ""
    overall = worst([s["status"].colour for s in by_site]
                    + [ALERT_COLOUR.get(a["severity"], "green") for a in alerts])
    return {"sites": by_site, "alerts": alerts, "runs": runs, "drill": drill[0] if drill else None,
            "drill_steps": drill_steps, "overall": overall, "vm_count": len(vms), "events": events}


async def _token_name(conn: AsyncConnection, token: str | None) -> str | None:
    """The name of a valid (known, not revoked) token, else None."""
    if not token or not token.startswith(tokens.PREFIX) or len(token) > 100:
        return None
    row = await (await conn.execute(
        "SELECT name FROM api_tokens WHERE token_sha256 = %s AND revoked_at IS NULL",
        (tokens.digest(token),))).fetchone()
    return row["name"] if row else None


def _html(name: str, status: int = 200, **context) -> HTMLResponse:
    return HTMLResponse(_env.get_template(name).render(**context), status_code=status, headers=HEADERS)


def _stale_s(request: Request) -> float:
    """When the monitor's records count as stale: from this instance's [monitor] settings."""
    cfg = getattr(request.app.state, "monitor_config", None) or MonitorConfig()
    return stale_after(cfg.interval, cfg.connect_timeout)


def _unavailable() -> HTMLResponse:
    return _html("unavailable.html", 503, refresh=REFRESH_S)


@router.get("/", response_class=HTMLResponse)
@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(request: Request) -> Response:
    try:
        async with request.app.state.pool.connection(timeout=5) as conn:
            who = await _token_name(conn, request.cookies.get(COOKIE))
            if who is None:
                return RedirectResponse("/login", status_code=303, headers=HEADERS)
            data = await snapshot(conn, _stale_s(request))
    except (psycopg.OperationalError, PoolTimeout):
        return _unavailable()
    return _html("dashboard.html", refresh=REFRESH_S, who=who, **data)


@router.get("/login", response_class=HTMLResponse)
async def login_form() -> Response:
    return _html("login.html", error="")


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            return _html("login.html", 413, error="request too large")
    try:
        form = urllib.parse.parse_qs(body.decode(), max_num_fields=5)
    except (UnicodeDecodeError, ValueError):     # not UTF-8, too many fields
        form = {}
    token = (form.get("token") or [""])[0].strip()
    try:
        async with request.app.state.pool.connection(timeout=5) as conn:
            who = await _token_name(conn, token)
    except (psycopg.OperationalError, PoolTimeout):
        return _unavailable()
    if who is None:
        return _html("login.html", 401, error="invalid or revoked token")
    response = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    response.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/login", status_code=303, headers=HEADERS)
    response.delete_cookie(COOKIE, path="/")
    return response
