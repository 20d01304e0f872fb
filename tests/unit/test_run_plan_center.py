"""playbooks/tasks/run_plan.yml with its run state in tandem-center (tandem_center_url set):
the run and a step per save recorded through tandem.dr.tandem_center_run in a live center
(tests/unit/center_live.py: the real app, real PostgreSQL), read back on resume so that no VM
is started twice. The "VMs" are the HTTP servers of test_run_plan.py's PlanRun."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from test_run_plan import PlanRun

API = "/api/v1"


@pytest.fixture
def runner(tmp_path, center, monkeypatch):
    monkeypatch.setenv("TANDEM_CENTER_TOKEN", center.tokens["operator"])     # the modules' env fallback
    r = PlanRun(tmp_path)
    yield r
    r.stop_servers()


def runs(center, series: str) -> list[dict]:
    """The runs of a series, oldest first, each with its steps (read as the reader role)."""
    hdr = {"Authorization": f"Bearer {center.tokens['reader']}"}
    listed = httpx.get(center.url + API + "/runs", params={"series": series}, headers=hdr, timeout=30).json()
    return [httpx.get(center.url + API + f"/runs/{r['id']}", headers=hdr, timeout=30).json() for r in listed]


def vm_state(run: dict) -> dict:
    """The per-VM state the steps of a run recorded, merged in order (one level deep is enough here)."""
    vms: dict = {}
    for step in run["steps"]:
        for name, change in step["detail"].get("vms", {}).items():
            vms.setdefault(name, {}).update(change)
    return vms


def one_vm_plan(plan: str, vm: str, port: int) -> dict:
    check = {"tcp": {"port": port}}
    return {"name": plan, "batches": [{"name": "a", "vms": [{"name": vm, "health_check": check}]}]}


def with_center(center) -> list[str]:
    return ["-e", f"tandem_center_url={center.url}"]


def test_an_interrupted_run_resumes_from_the_center_without_starting_a_vm_twice(runner, center):
    first, second = runner.vm("first"), runner.vm("second")
    plan = {"name": "p1", "batches": [
        {"name": "a", "vms": [{"name": "first", "health_check": {"tcp": {"port": first["port"]}}}]},
        {"name": "b", "vms": [{"name": "second", "start_delay": 30,
                               "health_check": {"tcp": {"port": second["port"]}}}]},
    ]}
    proc = runner.run(plan, *with_center(center), background=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:                    # interrupted during second's start delay
        recorded = runs(center, "drill-p1")
        if recorded and vm_state(recorded[-1]).get("first", {}).get("healthy"):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(1)
    else:
        pytest.fail("first never became healthy in the center")
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [start[0] for start in runner.starts()] == ["first"]
    assert not runner.state_file.exists()                 # the center holds the state, not the file
    [interrupted] = runs(center, "drill-p1")
    assert interrupted["state"] == "running" and interrupted["kind"] == "drill"
    assert interrupted["parameters"]["plan"] == "p1" and interrupted["key"].startswith("test-run-")
    assert [s["name"] for s in interrupted["steps"]] == ["first: started", "first: healthy"]

    plan["batches"][1]["vms"][0]["start_delay"] = 0
    done = runner.run(plan, *with_center(center))
    assert done.returncode == 0, done.stdout[-4000:]
    assert f"Resuming run {interrupted['key']}: first already started" in done.stdout
    assert [start[0] for start in runner.starts()] == ["first", "second"]     # first not started again
    [finished] = runs(center, "drill-p1")                  # the same run, resumed
    assert finished["key"] == interrupted["key"] and finished["state"] == "succeeded"
    assert finished["result"]["result"] == "succeeded" and finished["result"]["rto_seconds"] is not None
    assert [s["name"] for s in finished["steps"]] == ["first: started", "first: healthy", "first: healthy",
                                                      "second: started", "second: healthy"]
    report = json.loads((runner.report_dir / f"{finished['key']}.json").read_text())
    assert report["result"] == "succeeded" and [v["name"] for v in report["vms"]] == ["first", "second"]

    # After a successful run, the next one is a new run in the series.
    again = runner.run(plan, *with_center(center))
    assert again.returncode == 0, again.stdout[-3000:]
    assert [r["state"] for r in runs(center, "drill-p1")] == ["succeeded", "succeeded"]


def test_a_failed_run_is_resumed_as_a_new_run_carrying_its_vms(runner, center):
    flaky = runner.vm("flaky", broken=True)              # "starts", but nothing answers on its port
    plan = one_vm_plan("p2", "flaky", flaky["port"])
    plan["defaults"] = {"timeout": 4}
    failed = runner.run(plan, *with_center(center))
    assert failed.returncode != 0
    [first_run] = runs(center, "drill-p2")
    assert first_run["state"] == "failed" and first_run["steps"][-1]["status"] == "failed"
    # The VM's service comes up later; resuming checks it again without starting it again.
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(flaky["port"]), "--bind",
                               "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        resumed = runner.run(plan, *with_center(center))
    finally:
        server.terminate()
        server.wait()
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert [start[0] for start in runner.starts()] == ["flaky"]
    old, new = runs(center, "drill-p2")
    assert old["state"] == "failed" and new["state"] == "succeeded"
    assert new["parameters"]["resumes"] == old["key"] and new["steps"][0]["key"] == "resume"
    assert vm_state(new)["flaky"]["started_at"] == vm_state(old)["flaky"]["started_at"]
    assert vm_state(new)["flaky"]["result"] == "healthy"


def test_check_mode_records_nothing_in_the_center(runner, center):
    only = runner.vm("only")
    plan = one_vm_plan("p3", "only", only["port"])
    before = center.count("runs"), len(center.db.audit_rows())
    proc = runner.run(plan, *with_center(center), "--check")
    assert "Run | read the last run of this operation and plan from tandem-center" in proc.stdout
    assert runner.starts() == [] and runs(center, "drill-p3") == []
    assert (center.count("runs"), len(center.db.audit_rows())) == before


def test_a_bad_token_stops_the_run_before_any_vm_starts(runner, center, monkeypatch):
    monkeypatch.setenv("TANDEM_CENTER_TOKEN", "tdc_not_a_real_token")
    only = runner.vm("only")
    plan = one_vm_plan("p4", "only", only["port"])
    proc = runner.run(plan, *with_center(center))
    assert proc.returncode != 0 and "invalid or revoked token" in proc.stdout
    assert "tdc_not_a_real_token" not in proc.stdout
    assert runner.starts() == []
    with contextlib.suppress(FileNotFoundError):
        assert not list(runner.report_dir.iterdir())
