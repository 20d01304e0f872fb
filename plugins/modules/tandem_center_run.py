#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_center_run
short_description: Record a run (failover, failback, drill), its steps and its end in tandem-center
version_added: 0.1.0
description:
  - Creates the run O(key) if the center does not have it, appends the O(steps) whose keys it
    does not have yet, and finishes the run when O(state) is not V(running).
  - Idempotent by the keys the caller gives - recording the same run, step or end again changes
    nothing. A known key with other values (another kind, a step with another status, a run
    already finished otherwise) is an error, and nothing is recorded.
  - Reads the run first, plans, stops there in check mode, records, then reads the run again.
extends_documentation_fragment:
  - tandem.dr._attributes
  - tandem.dr._center
attributes:
  check_mode:
    support: full
    details:
      - The run is read; nothing is recorded. The result says what would be.
  diff_mode:
    support: full
options:
  key:
    description: The run's unique key, chosen by the caller (letters, digits, C(_.:-), at most 128).
    type: str
    required: true
  kind:
    description: What the run does. Required to create the run; checked against it otherwise.
    type: str
    choices: [failover, failback, drill]
  series:
    description:
      - Groups the runs of one operation of one plan, so that the newest can be found
        (M(tandem.dr.tandem_center_run_info) O(tandem.dr.tandem_center_run_info#module:series=)).
      - Only used when creating the run; checked against it otherwise, when given.
    type: str
  plan_id:
    description: The recovery plan's id in the center's catalogue, if it has it.
    type: int
  parameters:
    description: What the run was started with (free-form JSON object). Checked against the run when given.
    type: dict
  steps:
    description: Steps to record, in order; those whose O(steps[].key) the run has already are skipped.
    type: list
    elements: dict
    default: []
    suboptions:
      key:
        description: The step's key, unique in the run.
        type: str
        required: true
      name:
        description: What the step did.
        type: str
        required: true
      status:
        description: Its outcome.
        type: str
        choices: [ok, changed, skipped, failed]
        default: changed
      started_at:
        description: ISO 8601 time with a time zone.
        type: str
      finished_at:
        description: ISO 8601 time with a time zone.
        type: str
      detail:
        description: Free-form JSON object (at most 8 levels deep).
        type: dict
        default: {}
  state:
    description: V(running) records the run and steps only; the others also finish the run with that state.
    type: str
    choices: [running, succeeded, failed, aborted]
    default: running
  result:
    description: The run's result (JSON object), recorded when it is finished.
    type: dict
    default: {}
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Record the start of a failover
  tandem.dr.tandem_center_run:
    url: https://cp-vip.example:8480
    token: "{{ tandem_center_token }}"
    key: failover-web-20261130T0400
    series: failover-web
    kind: failover
    parameters: {plan: web}

- name: Record that db started
  tandem.dr.tandem_center_run:
    url: https://cp-vip.example:8480
    token: "{{ tandem_center_token }}"
    key: failover-web-20261130T0400
    steps:
      - key: start-db
        name: started db
        detail: {vm: db, host: hv-b1}

- name: Finish it
  tandem.dr.tandem_center_run:
    url: https://cp-vip.example:8480
    token: "{{ tandem_center_token }}"
    key: failover-web-20261130T0400
    state: succeeded
    result: {rto_seconds: 42.5}
"""

RETURN = r"""
run:
  description: The run and its steps as the center has them after the module (in check mode, before).
  returned: always
  type: dict
  sample: {"id": 7, "key": "drill-web-1", "kind": "drill", "state": "running", "steps": []}
created:
  description: Whether the run was (or, in check mode, would be) created.
  returned: always
  type: bool
appended:
  description: Keys of the steps recorded (or that would be).
  returned: always
  type: list
  elements: str
finished:
  description: Whether the run was (or would be) finished by this call.
  returned: always
  type: bool
"""

from datetime import datetime

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._center import (
    Center,
    CenterError,
    center_argument_spec,
)

STEP_SPEC = {
    "key": {"type": "str", "required": True, "no_log": False},
    "name": {"type": "str", "required": True},
    "status": {"type": "str", "choices": ["ok", "changed", "skipped", "failed"], "default": "changed"},
    "started_at": {"type": "str"},
    "finished_at": {"type": "str"},
    "detail": {"type": "dict", "default": {}},
}


def _instant(value):
    """An ISO 8601 time as an aware datetime (None stays None); compares across time zones."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"{value}: a time needs a time zone")
    return parsed


def _step_values(step):
    return (step["name"], step["status"], _instant(step.get("started_at")), _instant(step.get("finished_at")),
            step.get("detail") or {})


def plan(p, run):
    """(create, steps to append, finish, conflicts) for the wanted run against the stored one."""
    conflicts = []
    if run is None:
        if not p["kind"]:
            conflicts.append(f"run {p['key']} does not exist: kind is needed to create it")
        stored_steps = {}
    else:
        for field in ("kind", "series", "plan_id", "parameters"):
            if p[field] is not None and p[field] != run[field]:
                conflicts.append(f"run {p['key']} has {field} {run[field]!r}, not {p[field]!r}")
        stored_steps = {s["key"]: s for s in run["steps"] if s["key"]}
    append, seen = [], set()
    for step in p["steps"]:
        if step["key"] in seen:
            conflicts.append(f"step key {step['key']} is given twice")
        seen.add(step["key"])
        wanted = _step_values(step)            # also refuses a time without a zone, before any write
        stored = stored_steps.get(step["key"])
        if stored is None:
            append.append(step)
        elif _step_values(stored) != wanted:
            conflicts.append(f"step {step['key']} of run {p['key']} was recorded with other values")
    state = run["state"] if run else "running"
    finish = p["state"] != "running" and state == "running"
    if state != "running":
        if p["state"] != "running" and (state, run["result"]) != (p["state"], p["result"]):
            conflicts.append(f"run {p['key']} is already {state} (result {run['result']})")
        if append:
            conflicts.append(f"run {p['key']} is {state}: no more steps")
    return run is None, append, finish, conflicts


def _body(step):
    return {k: v for k, v in step.items() if v is not None}


def _summary(run):
    return {"state": run["state"], "result": run["result"],
            "steps": [f"{s['key'] or s['seq']}: {s['name']} ({s['status']})" for s in run["steps"]]}


def main():
    spec = center_argument_spec()
    spec.update(
        key={"type": "str", "required": True, "no_log": False},
        kind={"type": "str", "choices": ["failover", "failback", "drill"]},
        series={"type": "str"},
        plan_id={"type": "int"},
        parameters={"type": "dict"},
        steps={"type": "list", "elements": "dict", "default": [], "options": STEP_SPEC},
        state={"type": "str", "choices": ["running", "succeeded", "failed", "aborted"], "default": "running"},
        result={"type": "dict", "default": {}},
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    p = module.params
    center = Center(module)
    try:
        runs = center.get("/runs", key=p["key"], limit=1)
        run = center.get(f"/runs/{runs[0]['id']}") if runs else None
        create, append, finish, conflicts = plan(p, run)
    except CenterError as e:
        module.fail_json(msg=e.message, **e.details())
    except ValueError as e:
        module.fail_json(msg=f"invalid step time: {e}")
    if conflicts:
        module.fail_json(msg="; ".join(conflicts), run=run)
    changed = bool(create or append or finish)
    before = _summary(run) if run else {}
    new_steps = [f"{s['key']}: {s['name']} ({s['status']})" for s in append]
    after = {"state": p["state"] if finish else (run["state"] if run else "running"),
             "result": p["result"] if finish else (run["result"] if run else None),
             "steps": (before.get("steps") or []) + new_steps}
    result = {"changed": changed, "created": create, "appended": [s["key"] for s in append],
              "finished": finish, "run": run, "diff": {"before": before, "after": after}}
    if module.check_mode or not changed:
        module.exit_json(**result)
    try:
        if create:
            run = center.post("/runs", {k: v for k, v in (("key", p["key"]), ("kind", p["kind"]),
                                                          ("series", p["series"]), ("plan_id", p["plan_id"]),
                                                          ("parameters", p["parameters"])) if v is not None})
        for step in append:
            center.post(f"/runs/{run['id']}/steps", _body(step))
        if finish:
            center.post(f"/runs/{run['id']}/finish", {"state": p["state"], "result": p["result"]})
        result["run"] = center.get(f"/runs/{run['id']}")
    except CenterError as e:
        module.fail_json(msg=e.message, **e.details(), **{k: v for k, v in result.items() if k != "diff"})
    module.exit_json(**result)


if __name__ == "__main__":
    main()
