"""center_run_step and center_run_state: the run state of run_plan.yml saved as run steps in
tandem-center (the changes per VM since the last save) and read back by merging them."""

from __future__ import annotations

import copy

from ansible_collections.tandem.dr.plugins.filter.center import center_run_state, center_run_step


def _run(steps, state="running", result=None):
    return {"key": "drill-p-1", "kind": "drill", "state": state, "result": result,
            "parameters": {"plan": "p", "started_at": 100.0},
            "steps": [{"seq": n, **s} for n, s in enumerate(steps, 1)]}


def test_saves_as_changes_read_back_as_the_same_state():
    state = {"id": "drill-p-1", "operation": "drill", "plan": "p", "started_at": 100.0, "result": "running",
             "vms": {}}
    recorded, steps = {}, []
    rp = {"id": "rp1", "age_seconds": 3}
    for change in ({"db": {"batch": "a", "started_at": 101.0, "recovery_point": rp}},
                   {"db": {"healthy": True, "healthy_at": 104.5, "result": "healthy"}},
                   {"app": {"batch": "b", "started_at": 105.0}},
                   {"app": {"healthy": False, "health_error": "refused", "result": "failed"}}):
        for name, values in change.items():
            state["vms"].setdefault(name, {}).update(values)
        step = center_run_step(state, recorded)
        assert step["detail"] == {"vms": change}                # only what changed
        steps.append(step)
        recorded = copy.deepcopy(state["vms"])
    assert center_run_step(state, recorded) is None            # nothing new: no step
    assert [s["name"] for s in steps] == ["db: started", "db: healthy", "app: started", "app: failed"]
    assert [s["status"] for s in steps] == ["changed", "changed", "changed", "failed"]
    assert len({s["key"] for s in steps}) == 4
    back = center_run_state(_run(steps))
    assert back == state


def test_the_step_key_is_a_digest_of_the_changes():
    state = {"vms": {"db": {"started_at": 1.0}}}
    assert center_run_step(state, {})["key"] == center_run_step(copy.deepcopy(state), {})["key"]
    later = {"vms": {"db": {"started_at": 2.0}}}
    assert center_run_step(state, {})["key"] != center_run_step(later, {})["key"]


def test_finished_runs_and_no_run():
    assert center_run_state(None) == {}
    assert center_run_state(_run([], "aborted"))["result"] == "failed"
    done = center_run_state(_run([], "succeeded", {"finished_at": 200.0}))
    assert (done["result"], done["finished_at"], done["vms"]) == ("succeeded", 200.0, {})
