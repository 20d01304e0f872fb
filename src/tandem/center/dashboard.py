"""The dashboard: server-rendered HTML (jinja2, autoescaped), no front-end build, a meta refresh.

Access: a login form takes an API token (any role; the dashboard only reads) and keeps it in
a cookie that scripts cannot read (HttpOnly), sent only to this site (SameSite=Strict) and,
over HTTPS, only encrypted (Secure). Every page load checks the token again, so a revoked
token ends the session at the next refresh. Without a valid cookie, / redirects to /login.

Colours, per VM (worst reason wins; every reason is shown):
- red: an open critical alert for the VM; a red replication state; the last recovery point
  older than 2 x the policy's RP interval;
- amber: an open warning alert; the replication state unknown or degraded; no recovery point
  yet; the last one older than 1.25 x the interval;
- green otherwise.
A site is the worst of its production VMs and of the open alerts naming it; the page header is
the worst of everything, global alerts included. Alerts name their VM or site in details
("vm": name, "site": name); alerts naming neither are global.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from psycopg import AsyncConnection
from psycopg_pool import PoolTimeout

from . import tokens

COOKIE = "tandem_center_session"
COOKIE_MAX_AGE_S = 12 * 3600
REFRESH_S = 15
MAX_LOGIN_BODY = 4096
RANK = {"green": 0, "amber": 1, "red": 2}
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


@dataclass
class Status:
    colour: str = "green"
    reasons: list[str] = field(default_factory=list)

    def add(self, colour: str, reason: str) -> None:
        if RANK[colour] > RANK[self.colour]:
            self.colour = colour
        self.reasons.append(reason)


@dataclass(frozen=True)
class ReplicationState:
    state: str      # e.g. "unknown", "uptodate", "degraded", "split-brain"
    colour: str     # green | amber | red
    reason: str


async def replication_states(conn: AsyncConnection, vm_names: list[str]) -> dict[str, ReplicationState]:
    """Per-VM replication state, for the dashboard.

    Today nothing follows the engines, so every VM is 'unknown' (amber). The engine monitoring
    fills this in from what it records (state transitions of each VM's resources)."""
    del conn
    return {name: ReplicationState("unknown", "amber",
                                   "replication state unknown (engine monitoring not available)")
            for name in vm_names}


def _age(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def vm_status(vm: dict, alerts: list[dict], replication: ReplicationState) -> Status:
    """The colour of a VM and why (see the module docstring)."""
    status = Status()
    for alert in alerts:
        colour = {"critical": "red", "warning": "amber"}.get(alert["severity"])
        if colour:
            status.add(colour, f"{alert['severity']} alert: {alert['subject']}")
    if replication.colour != "green":
        status.add(replication.colour, replication.reason)
    interval = vm["rp_interval_s"]
    if vm["last_rp_age_s"] is None:
        status.add("amber", "no recovery point yet")
    else:
        age = float(vm["last_rp_age_s"])
        if age > 2 * interval:
            status.add("red", f"last recovery point {_age(age)} old (policy: every {_age(interval)})")
        elif age > 1.25 * interval:
            status.add("amber", f"last recovery point {_age(age)} old (policy: every {_age(interval)})")
    if not status.reasons:
        status.reasons.append("replicating; last recovery point "
                              f"{_age(float(vm['last_rp_age_s']))} old")
    return status


def worst(colours) -> str:
    return max(colours, key=RANK.__getitem__, default="green")


VMS = """
SELECT v.id, v.name, ps.name AS production_site, ds.name AS dr_site, h.name AS hypervisor,
       p.name AS policy, p.rp_interval_s, p.rp_retention, p.sync_timeout_s, p.priority,
       rp.taken_at AS last_rp_at, extract(epoch FROM now() - rp.taken_at)::float8 AS last_rp_age_s,
       (SELECT count(*) FROM recovery_points r WHERE r.vm_id = v.id) AS rp_count
  FROM protected_vms v
  JOIN sites ps ON ps.id = v.production_site_id
  JOIN sites ds ON ds.id = v.dr_site_id
  JOIN protection_policies p ON p.id = v.policy_id
  LEFT JOIN hypervisors h ON h.id = v.hypervisor_id
  LEFT JOIN LATERAL (SELECT taken_at FROM recovery_points r WHERE r.vm_id = v.id
                      ORDER BY taken_at DESC LIMIT 1) rp ON true
 ORDER BY ps.name, p.priority, v.name"""
RUNS = """
SELECT r.id, r.kind, r.state, r.started_by, r.started_at, r.finished_at, r.result, pl.name AS plan,
       (SELECT count(*) FROM run_steps s WHERE s.run_id = r.id) AS steps,
       (SELECT count(*) FROM run_steps s WHERE s.run_id = r.id AND s.status = 'failed') AS failed_steps
  FROM runs r LEFT JOIN recovery_plans pl ON pl.id = r.plan_id"""
ALERTS = """
SELECT id, kind, severity, state, subject, details, raised_at, last_seen_at FROM alerts
 WHERE state <> 'cleared'
 ORDER BY CASE severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END, raised_at DESC
 LIMIT 200"""
RUN_COLOUR = {"succeeded": "green", "failed": "red", "aborted": "amber", "running": "amber"}


async def _rows(conn: AsyncConnection, query: str, params=()) -> list[dict]:
    return await (await conn.execute(query, params)).fetchall()


async def snapshot(conn: AsyncConnection) -> dict:
    """Everything the page shows, with the colours worked out."""
    sites = await _rows(conn, "SELECT id, name, description FROM sites ORDER BY name")
    hypervisors = await _rows(conn, "SELECT h.name, h.address, s.name AS site FROM hypervisors h "
                                    "JOIN sites s ON s.id = h.site_id ORDER BY h.name")
    vms = await _rows(conn, VMS)
    alerts = await _rows(conn, ALERTS)
    runs = await _rows(conn, RUNS + " ORDER BY r.started_at DESC, r.id DESC LIMIT 20")
    drill = await _rows(conn, RUNS + " WHERE r.kind = 'drill' AND r.state <> 'running' "
                                     "ORDER BY r.started_at DESC, r.id DESC LIMIT 1")
    drill_steps = await _rows(conn, "SELECT seq, name, status, started_at, finished_at, detail "
                                    "FROM run_steps WHERE run_id = %s ORDER BY seq",
                              (drill[0]["id"],)) if drill else []
    replication = await replication_states(conn, [vm["name"] for vm in vms])

    def named(alert: dict, key: str) -> str | None:
        value = alert["details"].get(key) if isinstance(alert["details"], dict) else None
        return value if isinstance(value, str) else None

    for vm in vms:
        vm["replication"] = replication[vm["name"]]
        vm["status"] = vm_status(vm, [a for a in alerts if named(a, "vm") == vm["name"]], vm["replication"])
    by_site = []
    for site in sites:
        status = Status()
        site_vms = [vm for vm in vms if vm["production_site"] == site["name"]]
        for alert in alerts:
            if named(alert, "site") == site["name"] and alert["severity"] in ("critical", "warning"):
                status.add("red" if alert["severity"] == "critical" else "amber",
                           f"{alert['severity']} alert: {alert['subject']}")
        bad = [vm for vm in site_vms if vm["status"].colour != "green"]
        for vm in bad:
            status.add(vm["status"].colour, f"VM {vm['name']}: {vm['status'].colour}")
        if not status.reasons:
            status.reasons.append(f"{len(site_vms)} protected VM(s), all green" if site_vms
                                  else "no protected VM")
        by_site.append({**site, "status": status, "vms": site_vms,
                        "hypervisors": [h for h in hypervisors if h["site"] == site["name"]]})
    for run in runs + drill:
        run["colour"] = RUN_COLOUR[run["state"]]
        run["result_json"] = json.dumps(run["result"], indent=2, sort_keys=True) if run["result"] else ""
    for step in drill_steps:
        step["detail_json"] = json.dumps(step["detail"], sort_keys=True) if step["detail"] else ""
    overall = worst([s["status"].colour for s in by_site]
                    + [{"critical": "red", "warning": "amber"}.get(a["severity"], "green") for a in alerts])
    return {"sites": by_site, "alerts": alerts, "runs": runs, "drill": drill[0] if drill else None,
            "drill_steps": drill_steps, "overall": overall, "vm_count": len(vms)}


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
            data = await snapshot(conn)
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
