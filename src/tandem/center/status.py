"""Green, amber or red, with the reasons: per VM, per site, per recovery plan. Read from the
catalogue and from what the monitor records (engine_resource_state, open alerts); used by the
dashboard and by /metrics (plan readiness, VM status).

Per VM, its replication (every resource of its vm_volumes, as each engine last reported it):
- green: every resource in sync on its Primary, the peer connected, fresh status from both;
- amber: resyncing (out-of-sync bytes, ETA); degraded within the policy's sync_timeout_s;
  RPO exposure older than the policy's RP interval; not connected to the peer without being
  degraded (standalone, connecting); no Primary; stale status (the monitor has not written it
  for a while: how old); no status at all yet; no replicated volume in the catalogue;
- red: degraded longer than sync_timeout_s; split brain; Primary on both nodes; a Primary
  whose own data is not UpToDate; the engine unreachable (its open engine-unreachable alert).
Then the VM adds its alerts and its last recovery point (see vm_status).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from psycopg import AsyncConnection

RANK = {"green": 0, "amber": 1, "red": 2}
ALERT_COLOUR = {"critical": "red", "warning": "amber"}
# Engine alerts (key engine:HV:RES:...) are what replication_states shows live, with current
# figures; the alert's subject is frozen at raise time, so it is not repeated per VM.
LIVE_ALERT_PREFIXES = ("engine:", "engine-unreachable:")


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
    state: str                      # e.g. "in-sync", "degraded", "split-brain", "unknown", "stale"
    colour: str                     # green | amber | red
    reasons: tuple[str, ...] = ()   # why it is not green (empty when green)
    detail: str = ""                # what it is, when green (e.g. "in sync on a and b")
    rpo_seconds: float = 0.0        # worst over the VM's resources
    rpo_bytes: int = 0              # summed over the VM's resources
    out_of_sync_bytes: int = 0
    resync_eta_s: float | None = None


def worst(colours) -> str:
    return max(colours, key=RANK.__getitem__, default="green")


def age(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def stale_after(interval: float, connect_timeout: float) -> float:
    """Status older than this is stale: the writing monitor has missed about three polls."""
    return max(10.0, 3 * interval + connect_timeout)


RESOURCES = """
SELECT v.name AS vm, vv.resource, p.rp_interval_s, p.sync_timeout_s
  FROM vm_volumes vv JOIN protected_vms v ON v.id = vv.vm_id
  JOIN protection_policies p ON p.id = v.policy_id
 WHERE v.name = ANY(%s)
 GROUP BY v.name, vv.resource, p.rp_interval_s, p.sync_timeout_s
 ORDER BY v.name, vv.resource"""
ENGINE_ROWS = """
SELECT h.name AS hypervisor, s.resource, s.role, s.connection, s.mode, s.rpo_bytes, s.rpo_seconds,
       s.status, extract(epoch FROM now() - s.seen_at)::float8 AS seen_age_s,
       extract(epoch FROM now())::float8 AS now,
       EXISTS (SELECT 1 FROM alerts a WHERE a.state <> 'cleared'
                  AND a.dedup_key = 'engine-unreachable:' || h.name) AS unreachable
  FROM engine_resource_state s JOIN hypervisors h ON h.id = s.hypervisor_id
 WHERE s.resource = ANY(%s)
 ORDER BY h.name"""


async def replication_states(conn: AsyncConnection, vm_names: list[str],
                             stale_s: float = 30.0) -> dict[str, ReplicationState]:
    """Per-VM replication state from the monitor's records (see the module docstring)."""
    resources = await (await conn.execute(RESOURCES, (vm_names,))).fetchall()
    rows = await (await conn.execute(ENGINE_ROWS, ([r["resource"] for r in resources],))).fetchall()
    by_resource: dict[str, list[dict]] = {}
    for row in rows:
        by_resource.setdefault(row["resource"], []).append(row)
    per_vm: dict[str, list[dict]] = {}
    for r in resources:
        per_vm.setdefault(r["vm"], []).append(r)
    out = {}
    for name in vm_names:
        if name not in per_vm:
            out[name] = ReplicationState("unknown", "amber", ("no replicated volume in the catalogue",))
            continue
        out[name] = _vm_replication([(r, by_resource.get(r["resource"], [])) for r in per_vm[name]],
                                    stale_s)
    return out


def _vm_replication(resources: list[tuple[dict, list[dict]]], stale_s: float) -> ReplicationState:
    status, states, details = Status(), [], []
    rpo_s, rpo_b, oos, etas = 0.0, 0, 0, []
    for policy, rows in resources:
        try:
            state, detail = resource_state(policy, rows, stale_s, status)
            for row in rows:
                if row["role"] == "Primary" and not row["unreachable"]:
                    rpo_s, rpo_b = max(rpo_s, float(row["rpo_seconds"])), rpo_b + int(row["rpo_bytes"])
                vols = (row["status"].get("volumes") or []) if isinstance(row["status"], dict) else []
                if row["role"] == "Primary":
                    oos += sum(int(v.get("out_of_sync_bytes") or 0) for v in vols)
                etas += [float(v["sync_eta_seconds"]) for v in vols
                         if isinstance(v.get("sync_eta_seconds"), int | float)]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            # A recorded status of an unexpected shape (an engine of another version, a broken
            # one): say so rather than fail the page or the monitor's metrics.
            status.add("amber", f"{policy['resource']}: unreadable engine status ({type(e).__name__})")
            state, detail = "unknown", ""
        states.append(state)
        if detail:
            details.append(detail)
    # The VM's state word: the first not-in-sync resource's, else in-sync.
    state = next((s for s in states if s != "in-sync"), "in-sync")
    return ReplicationState(state, status.colour, tuple(status.reasons), "; ".join(details),
                            rpo_s, rpo_b, oos, max(etas) if etas else None)


def resource_state(policy: dict, rows: list[dict], stale_s: float, status: Status) -> tuple[str, str]:
    """Add one resource's reasons to status; return (its state word, its green detail)."""
    res = policy["resource"]
    if not rows:
        status.add("amber", f"{res}: no engine has reported it yet (not monitored?)")
        return "unknown", ""
    state = None
    for row in rows:
        if row["unreachable"]:
            status.add("red", f"{res}: engine on {row['hypervisor']} unreachable "
                              f"(last status {age(row['seen_age_s'])} ago)")
            state = state or "unreachable"
        elif row["seen_age_s"] > stale_s:
            status.add("amber", f"{res}: status from {row['hypervisor']} is stale "
                                f"({age(row['seen_age_s'])} old)")
            state = state or "stale"
    split = [r for r in rows if r["mode"] == "split-brain"]
    if split:
        for r in split:
            why = ((r["status"].get("standalone") or {}).get("reason") or "") if r["status"] else ""
            status.add("red", f"{res}: split brain on {r['hypervisor']}" + (f" ({why})" if why else ""))
        return "split-brain", ""
    primaries = [r for r in rows if r["role"] == "Primary"]
    if len(primaries) > 1:
        status.add("red", f"{res}: Primary on both {' and '.join(r['hypervisor'] for r in primaries)}")
        return "dual-primary", ""
    if not primaries:
        status.add("amber", f"{res}: no Primary (the VM's disks are not in use on any node)")
        return state or "secondary", ""
    p = primaries[0]
    st = p["status"] if isinstance(p["status"], dict) else {}
    bad = [v for v in st.get("volumes") or [] if v.get("disk") != "UpToDate"]
    for v in bad:
        status.add("red", f"{res}: the Primary on {p['hypervisor']} has {v.get('disk')} data "
                          f"(volume {v.get('volume')})")
    mode = p["mode"]
    if mode == "degraded":
        d = st.get("degraded") or {}
        since = float(d.get("since") or p["now"])
        # Rounded up, so that "degraded for 20 s, longer than the policy allows (20 s)" cannot be.
        lasted, allowed = math.ceil(max(0.0, p["now"] - since)), policy["sync_timeout_s"]
        what = f"{d.get('kind', '?')}: {d.get('reason', '')}".rstrip(": ")
        if lasted > allowed:
            status.add("red", f"{res}: replication degraded for {age(lasted)}, longer than the policy "
                              f"allows ({age(allowed)}) — {what}")
        else:
            status.add("amber", f"{res}: replication degraded for {age(lasted)}, within the policy "
                                f"({age(allowed)}) — {what}")
    elif mode == "syncing":
        vols = st.get("volumes") or []
        oos = sum(int(v.get("out_of_sync_bytes") or 0) for v in vols)
        etas = [v["sync_eta_seconds"] for v in vols if isinstance(v.get("sync_eta_seconds"), int | float)]
        status.add("amber", f"{res}: resyncing, {size(oos)} out of sync"
                            + (f", about {age(max(etas))} to go" if etas else ""))
    elif mode in ("standalone", "connecting"):
        why = (st.get("standalone") or {}).get("reason")
        status.add("amber", f"{res}: not replicating: {p['hypervisor']} is {mode}"
                            + (f" ({why})" if why else ""))
    if float(p["rpo_seconds"]) > policy["rp_interval_s"]:
        status.add("amber", f"{res}: RPO exposure {age(float(p['rpo_seconds']))} "
                            f"({size(int(p['rpo_bytes']))}), over the RP interval "
                            f"({age(policy['rp_interval_s'])})")
    if mode != "in-sync" or bad:
        return mode, ""
    peers = [r for r in rows if r is not p]
    if not peers:
        status.add("amber", f"{res}: no status from the peer {st.get('peer') or ''}".rstrip())
        return "in-sync", ""
    return state or "in-sync", f"{res} in sync, Primary on {p['hypervisor']}, peer " \
                                f"{', '.join(r['hypervisor'] for r in peers)} connected"


def vm_status(vm: dict, alerts: list[dict], replication: ReplicationState) -> Status:
    """A VM's colour and why: its open alerts (but the live engine ones), its replication, and
    its last recovery point in the catalogue (older than 2 x the RP interval: red; than
    1.25 x: amber; none: amber)."""
    status = Status()
    for alert in alerts:
        colour = ALERT_COLOUR.get(alert["severity"])
        if colour and not alert.get("dedup_key", "").startswith(LIVE_ALERT_PREFIXES):
            status.add(colour, f"{alert['severity']} alert: {alert['subject']}")
    for reason in replication.reasons:
        status.add(replication.colour, reason)
    interval = vm["rp_interval_s"]
    if vm["last_rp_age_s"] is None:
        status.add("amber", "no recovery point yet")
    else:
        rp_age = float(vm["last_rp_age_s"])
        if rp_age > 2 * interval:
            status.add("red", f"last recovery point {age(rp_age)} old (policy: every {age(interval)})")
        elif rp_age > 1.25 * interval:
            status.add("amber", f"last recovery point {age(rp_age)} old (policy: every {age(interval)})")
    if not status.reasons:
        status.reasons.append(f"{replication.detail or 'replicating'}; last recovery point "
                              f"{age(float(vm['last_rp_age_s']))} old")
    return status


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
OPEN_ALERTS = """
SELECT id, dedup_key, kind, severity, state, subject, details, raised_at, last_seen_at FROM alerts
 WHERE state <> 'cleared'
 ORDER BY CASE severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END, raised_at DESC
 LIMIT 200"""


def named(alert: dict, key: str) -> str | None:
    """The VM or site an alert names in its details ("vm": name, "site": name), if any."""
    value = alert["details"].get(key) if isinstance(alert["details"], dict) else None
    return value if isinstance(value, str) else None


async def vm_statuses(conn: AsyncConnection, alerts: list[dict], stale_s: float) -> list[dict]:
    """The protected VMs (VMS columns), each with "replication" and "status"."""
    vms = await (await conn.execute(VMS)).fetchall()
    replication = await replication_states(conn, [vm["name"] for vm in vms], stale_s)
    for vm in vms:
        vm["replication"] = replication[vm["name"]]
        vm["status"] = vm_status(vm, [a for a in alerts if named(a, "vm") == vm["name"]], vm["replication"])
    return vms


async def open_alerts(conn: AsyncConnection) -> list[dict]:
    return await (await conn.execute(OPEN_ALERTS)).fetchall()


async def plan_readiness(conn: AsyncConnection, vms: list[dict]) -> list[dict]:
    """Per recovery plan: ready when every VM it names is a protected VM that is not red."""
    colour = {vm["name"]: vm["status"].colour for vm in vms}
    plans = await (await conn.execute("SELECT name, document FROM recovery_plans ORDER BY name")).fetchall()
    out = []
    for plan in plans:
        groups = plan["document"].get("groups") if isinstance(plan["document"], dict) else None
        names = [v for g in groups or [] if isinstance(g, dict) for v in g.get("vms") or []]
        not_ready = [n for n in names if colour.get(n, "missing") in ("red", "missing")]
        out.append({"plan": plan["name"], "vms": len(names), "not_ready": not_ready,
                    "ready": bool(names) and not not_ready})
    return out


async def last_drills(conn: AsyncConnection) -> list[dict]:
    """The last finished drill of each plan ("" for drills without a plan)."""
    return await (await conn.execute(
        "SELECT DISTINCT ON (coalesce(pl.name, '')) coalesce(pl.name, '') AS plan, r.id, r.state, "
        "       extract(epoch FROM r.finished_at)::float8 AS finished_at "
        "  FROM runs r LEFT JOIN recovery_plans pl ON pl.id = r.plan_id "
        " WHERE r.kind = 'drill' AND r.state <> 'running' "
        " ORDER BY coalesce(pl.name, ''), r.finished_at DESC, r.id DESC")).fetchall()
