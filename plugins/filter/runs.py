# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Figures of a recovery-plan run (playbooks/tasks/run_plan.yml) for its reports: per VM
and per batch, when it started and when it was healthy, counted from the run's start (the
achieved RTO), the recovery point used and its age (the achieved RPO), the addresses before
and after."""

from __future__ import annotations


def _since(t, start):
    return None if t is None or start is None else round(float(t) - float(start), 1)


def run_summary(state):
    """A run state -> {id, operation, plan, result, started_at, finished_at, duration_seconds,
    rto_seconds, vms: [...], batches: [...]}; VMs in start order, never-started ones last."""
    start = state.get("started_at")
    vms = []
    for name, vm in (state.get("vms") or {}).items():
        rp = vm.get("recovery_point") or {}
        vms.append({
            "name": name, "batch": vm.get("batch"), "host": vm.get("host"),
            "result": vm.get("result") or ("started" if vm.get("started_at") else "not started"),
            "started_seconds": _since(vm.get("started_at"), start),
            "healthy_seconds": _since(vm.get("healthy_at"), start) if vm.get("healthy") else None,
            "start_to_healthy_seconds": vm.get("healthy_after") if vm.get("healthy") else None,
            "health_target": vm.get("health_target"), "error": vm.get("health_error"),
            "ip_before": vm.get("ip_before"), "ip_after": vm.get("ip_after"),
            "recovery_point": rp.get("id"), "rpo_seconds": rp.get("age_seconds"),
        })
    vms.sort(key=lambda v: (v["started_seconds"] is None, v["started_seconds"] or 0, v["name"]))
    batches = {}
    for vm in vms:
        b = batches.setdefault(vm["batch"], {"name": vm["batch"], "vms": [], "rto_seconds": None,
                                             "result": "healthy"})
        b["vms"].append(vm["name"])
        if vm["healthy_seconds"] is not None:
            b["rto_seconds"] = max(b["rto_seconds"] or 0, vm["healthy_seconds"])
        if vm["result"] != "healthy":
            b["result"] = "failed"
    healthy = [v["healthy_seconds"] for v in vms if v["healthy_seconds"] is not None]
    all_healthy = bool(vms) and len(healthy) == len(vms)
    return {
        "id": state.get("id"), "operation": state.get("operation"), "plan": state.get("plan"),
        "result": state.get("result"), "started_at": start, "finished_at": state.get("finished_at"),
        "duration_seconds": _since(state.get("finished_at"), start),
        # The plan's RTO: until its last VM was healthy; only when all of them were.
        "rto_seconds": max(healthy) if all_healthy else None,
        "vms": vms, "batches": list(batches.values()),
    }


def _fmt(v):
    return "-" if v is None else f"{v:.1f}s"


def run_table(state):
    """Lines for a debug message: the run, then one row per VM."""
    r = run_summary(state)
    lines = [f"{r['operation']} {r['id']} of plan {r['plan']}: {r['result']}, "
             f"plan RTO {_fmt(r['rto_seconds'])}, took {_fmt(r['duration_seconds'])}",
             f"{'VM':<16} {'batch':<12} {'host':<10} {'started':>8} {'healthy':>8} {'IP before':<16} "
             f"{'IP after':<16} result"]
    for v in r["vms"]:
        result = v["result"] + (f" ({v['error']})" if v["error"] else "")
        lines.append(f"{v['name']:<16} {str(v['batch']):<12} {str(v['host']):<10} "
                     f"{_fmt(v['started_seconds']):>8} {_fmt(v['healthy_seconds']):>8} "
                     f"{str(v['ip_before'] or '-'):<16} {str(v['ip_after'] or '-'):<16} {result}")
    return lines


class FilterModule:
    def filters(self):
        return {"run_summary": run_summary, "run_table": run_table}
