# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A recovery-plan run's state (playbooks/tasks/run_plan.yml) kept in tandem-center instead of a
local file: each save is a run step whose detail holds what changed per VM since the last one,
and the state is those changes merged in step order."""

from __future__ import annotations

import hashlib
import json

_MISSING = object()


def _merge(into, change):
    """Recursive merge, as Ansible's combine(recursive=true) in run_plan.yml."""
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def center_run_state(run):
    """A run of tandem_center_run_info (with its steps) -> the run state of run_plan.yml;
    {} for no run. `result` is the center's state, with aborted counted as failed."""
    if not run:
        return {}
    params = run.get("parameters") or {}
    vms = {}
    for step in sorted(run.get("steps") or [], key=lambda s: s["seq"]):
        _merge(vms, (step.get("detail") or {}).get("vms") or {})
    state = {"id": run["key"], "operation": run["kind"], "plan": params.get("plan"),
             "started_at": params.get("started_at"),
             "result": run["state"] if run["state"] in ("running", "succeeded") else "failed", "vms": vms}
    finished_at = (run.get("result") or {}).get("finished_at")
    if finished_at is not None:
        state["finished_at"] = finished_at
    return state


def _what(change, vm):
    """A word for a VM's change: its new result, started, or (checked again) its result."""
    if change.get("result"):
        return change["result"]
    if "started_at" in change:
        return "started"
    return vm.get("result") or "updated"


def center_run_step(state, recorded):
    """The step that records what changed in state.vms since `recorded` (the vms the center
    has): {key, name, status, detail: {vms: changes}}, or None when nothing changed. The key is
    a digest of the changes, so recording the same step again is a no-op."""
    changes = {}
    for name, vm in (state.get("vms") or {}).items():
        before = (recorded or {}).get(name) or {}
        diff = {k: v for k, v in vm.items() if before.get(k, _MISSING) != v}
        if diff:
            changes[name] = diff
    if not changes:
        return None
    digest = hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:24]
    name = "; ".join(f"{vm}: {_what(d, state['vms'][vm])}" for vm, d in changes.items())
    return {"key": f"vms-{digest}", "name": name if len(name) <= 200 else name[:197] + "...",
            "status": "failed" if any(d.get("result") == "failed" for d in changes.values()) else "changed",
            "detail": {"vms": changes}}


class FilterModule:
    def filters(self):
        return {"center_run_state": center_run_state, "center_run_step": center_run_step}
