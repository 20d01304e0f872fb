"""What an engine's status means: replication mode, RPO exposure, last-RP age, and the alert
conditions that hold now. Pure functions (no I/O), used by tandem.center.monitor.

A condition is (dedup_key, kind, severity, subject, details). The monitor keeps exactly the
conditions that hold open as alerts: a new key is raised, a key that stops holding is cleared
(the recovery notice). Policy thresholds (protection_policies):

- degraded longer than `sync_timeout_s` (the policy's tolerated degraded time);
- RPO exposure older than `rp_interval_s` (beyond it, a disaster loses more than the RP
  schedule promises), or larger than [monitor] rpo_max_bytes when that is set;
- last recovery point older than twice `rp_interval_s` (one missed RP is tolerated).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    vm: str
    rp_interval_s: int
    sync_timeout_s: int


def mode(res: dict) -> str:
    """in-sync | syncing | degraded | standalone | split-brain | connecting."""
    standalone = res.get("standalone") or {}
    if standalone.get("kind") == "split-brain":
        return "split-brain"
    if res.get("degraded"):
        return "degraded"
    if res.get("connection") != "Connected":
        return "standalone" if res.get("connection") == "StandAlone" else "connecting"
    vols = res.get("volumes") or []
    if all(v.get("replication") == "Established" and not v.get("out_of_sync_bytes") for v in vols):
        return "in-sync"
    return "syncing"


MODES = ("in-sync", "syncing", "degraded", "standalone", "split-brain", "connecting")


def figures(res: dict) -> dict:
    """The numbers /metrics and the state table carry for one resource."""
    rpo = res.get("rpo") or {}
    rps = res.get("recovery_points") or {}
    last = rps.get("last") or None
    vols = res.get("volumes") or []
    etas = [v["sync_eta_seconds"] for v in vols if v.get("sync_eta_seconds") is not None]
    return {"rpo_bytes": int(rpo.get("bytes") or 0), "rpo_seconds": float(rpo.get("seconds") or 0.0),
            "out_of_sync_bytes": sum(int(v.get("out_of_sync_bytes") or 0) for v in vols),
            "sync_eta_seconds": max(etas) if etas else None,
            "last_rp_age_s": None if last is None else float(last["age_seconds"])}


def resource_conditions(hv: str, res: dict, policy: Policy | None, now: float,
                        rpo_max_bytes: int = 0) -> list[tuple]:
    """The alert conditions that hold for one resource of engine `hv`."""
    name = res["name"]
    key = f"engine:{hv}:{name}"
    subject_of = f"{policy.vm} ({name} on {hv})" if policy else f"{name} on {hv}"
    out = []
    standalone = res.get("standalone") or {}
    if standalone.get("kind") == "split-brain":
        out.append((f"{key}:split-brain", "split-brain", "critical",
                    f"split brain: {subject_of}", {"reason": standalone.get("reason")}))
    if policy is None:
        return out
    degraded = res.get("degraded")
    if degraded:
        seconds = now - float(degraded["since"])
        if seconds > policy.sync_timeout_s:
            out.append((f"{key}:degraded", "degraded", "critical",
                        f"replication degraded for {seconds:.0f}s: {subject_of}",
                        {"kind": degraded.get("kind"), "reason": degraded.get("reason"),
                         "since": degraded["since"], "allowed_s": policy.sync_timeout_s}))
    f = figures(res)
    if f["rpo_seconds"] > policy.rp_interval_s or (rpo_max_bytes and f["rpo_bytes"] > rpo_max_bytes):
        out.append((f"{key}:rpo", "rpo-exposure", "warning",
                    f"RPO exposure {f['rpo_seconds']:.0f}s / {f['rpo_bytes']} bytes: {subject_of}",
                    {"seconds": f["rpo_seconds"], "bytes": f["rpo_bytes"],
                     "allowed_s": policy.rp_interval_s, "allowed_bytes": rpo_max_bytes or None}))
    if f["last_rp_age_s"] is not None and f["last_rp_age_s"] > 2 * policy.rp_interval_s:
        out.append((f"{key}:rp-age", "rp-age", "warning",
                    f"last recovery point {f['last_rp_age_s']:.0f}s old: {subject_of}",
                    {"age_s": f["last_rp_age_s"], "allowed_s": 2 * policy.rp_interval_s}))
    return out


def unreachable_condition(hv: str, since: float, now: float, after: float, error: str) -> list[tuple]:
    if now - since < after:
        return []
    return [(f"engine-unreachable:{hv}", "engine-unreachable", "critical",
             f"engine on {hv} unreachable for {now - since:.0f}s", {"error": error[:500]})]


# pg_auto_failover states in which the primary has a synchronous standby (docs: "primary: a
# healthy secondary node exists ... synchronous replication is enabled"; wait_primary and single
# run without one).
SYNC_PRIMARY_STATES = ("primary",)
CONTROL_PLANE_KEYS = ("cp:witness-down", "cp:db-sync-lost", "cp:vip-moved")


def formation_in_sync(formation: list[dict]) -> bool:
    """The monitor's view: a node reports `primary` and another one `secondary`."""
    states = [n.get("reported") for n in formation]
    return any(s in SYNC_PRIMARY_STATES for s in states) and "secondary" in states


def control_plane_evaluated(snapshot: dict) -> set[str]:
    """The control-plane keys a snapshot can decide (the others keep their open alerts)."""
    out = set()
    if snapshot.get("witness_reachable") is not None:
        out.add("cp:witness-down")
    if snapshot.get("sync_standbys") is not None or snapshot.get("formation") is not None:
        out.add("cp:db-sync-lost")
    if snapshot.get("vip_holder") and snapshot.get("vip_expected"):
        out.add("cp:vip-moved")
    return out


def control_plane_conditions(snapshot: dict) -> list[tuple]:
    """The control-plane seam: alert conditions from a snapshot of the trio.

    snapshot keys (each optional; a missing or None one is not evaluated):
    - "witness_reachable": bool -- the pg_auto_failover monitor answers ("witness_error": why not);
    - "sync_standbys": int -- standbys in sync/quorum state (pg_stat_replication on the primary);
    - "formation": [{"name", "reported", "goal"}] -- the monitor's nodes; decides db-sync-lost
      only when sync_standbys is unknown, and goes in the alert's details either way;
    - "vip_holder" and "vip_expected": node names -- who holds the VIP now, and who held it
      when it was last acknowledged.
    """
    out = []
    if snapshot.get("witness_reachable") is False:
        out.append(("cp:witness-down", "witness-down", "critical", "control-plane witness unreachable",
                    {"error": snapshot.get("witness_error")}))
    n, formation = snapshot.get("sync_standbys"), snapshot.get("formation")
    lost = n == 0 if n is not None else (formation is not None and not formation_in_sync(formation))
    if lost:
        out.append(("cp:db-sync-lost", "db-sync-lost", "critical",
                    "control-plane database: no synchronous standby",
                    {"sync_standbys": n, "formation": formation}))
    holder, expected = snapshot.get("vip_holder"), snapshot.get("vip_expected")
    if holder and expected and holder != expected:
        out.append(("cp:vip-moved", "vip-moved", "warning", f"VIP moved from {expected} to {holder}",
                    {"from": expected, "to": holder}))
    return out
