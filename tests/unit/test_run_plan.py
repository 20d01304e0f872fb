"""playbooks/tasks/run_plan.yml, the recovery-plan executor, through ansible-playbook.

The "VMs" here are HTTP servers on loopback that the start task file launches, so the
executor's own logic is what is tested: batch and stage order, start delays, health gates,
on_failure stop/continue, the run state file, resuming an interrupted run without starting
anything twice, check mode, and the reports. VMs proper (libvirt, guests) are in tests/lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.harness import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

START_TASKS = """
- name: Test | start {{ __vm.name }} (an HTTP server on loopback)
  ansible.builtin.shell: |
    echo "{{ __vm.name }} $(date +%s.%N)" >> {{ __spec.log }}
    {% if not __spec.broken %}
    nohup {{ python }} -m http.server {{ __spec.port }} --bind 127.0.0.1 --directory {{ __spec.dir }} \
      >/dev/null 2>&1 &
    {% endif %}
  changed_when: true
"""

PLAYBOOK = """
- name: Run a plan
  hosts: localhost
  gather_facts: false
  vars:
    __run_plan: "{{ plan | tandem.dr.recovery_plan(specs | list) }}"
    __run_specs: "{{ specs }}"
    __run_start_tasks: "{{ start_tasks }}"
    __run: {id: test-run, operation: drill, file: "{{ state_file }}", report_dir: "{{ report_dir }}"}
  tasks:
    - name: Run the plan
      ansible.builtin.include_tasks: "{{ repo }}/playbooks/tasks/run_plan.yml"
    - name: Fail the play when the run failed
      ansible.builtin.assert:
        that: __run_state.result == 'succeeded'
"""


class PlanRun:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.state_file, self.report_dir, self.log = tmp / "state.json", tmp / "reports", tmp / "starts.log"
        self.report_dir.mkdir()
        (tmp / "start.yml").write_text(START_TASKS)
        (tmp / "play.yml").write_text(PLAYBOOK)
        self.specs: dict[str, dict] = {}

    def vm(self, name: str, broken: bool = False) -> dict:
        port = free_port()
        self.specs[name] = {"host": "localhost", "health_host": "localhost", "address": "127.0.0.1",
                            "port": port, "broken": broken, "log": str(self.log),
                            "dir": str(self.tmp), "ip_before": "10.0.0.1"}
        return self.specs[name]

    def run(self, plan: dict, *extra: str, background: bool = False):
        extra_vars = {"plan": plan, "specs": self.specs, "state_file": str(self.state_file),
                      "report_dir": str(self.report_dir), "start_tasks": str(self.tmp / "start.yml"),
                      "repo": str(REPO), "python": sys.executable}
        (self.tmp / "vars.json").write_text(json.dumps(extra_vars))
        cmd = [str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local",
               str(self.tmp / "play.yml"), "-e", f"@{self.tmp / 'vars.json'}", *extra]
        env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
               "ANSIBLE_COLLECTIONS_PATH": str(REPO / ".cache" / "collections")}
        if background:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=env, start_new_session=True)
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)

    def starts(self) -> list[tuple[str, float]]:
        if not self.log.exists():
            return []
        return [(line.split()[0], float(line.split()[1])) for line in self.log.read_text().splitlines()]

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def report(self) -> dict:
        return json.loads((self.report_dir / "test-run.json").read_text())

    def stop_servers(self) -> None:
        """Every HTTP server this test's runs started, found by the directory they serve (one
        pid file per VM, as before, left some running: about five per make test)."""
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"http.server" in argv and str(self.tmp).encode() in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGTERM)


@pytest.fixture
def runner(tmp_path):
    r = PlanRun(tmp_path)
    yield r
    r.stop_servers()


def http(port: int) -> dict:
    return {"http": {"port": port, "path": "/"}, "interval": 1}


def test_batches_stages_and_delays_run_in_order_and_report(runner):
    db, app, web = runner.vm("db"), runner.vm("app"), runner.vm("web")
    plan = {"name": "tier", "batches": [
        {"name": "data", "vms": [{"name": "db", "health_check": http(db["port"]), "timeout": 60}]},
        {"name": "front", "vms": [
            {"name": "web", "depends_on": ["app"], "health_check": {"tcp": {"port": web["port"]}},
             "timeout": 60},
            {"name": "app", "start_delay": 3, "health_check": http(app["port"]), "timeout": 60}]},
    ]}
    proc = runner.run(plan)
    assert proc.returncode == 0, proc.stdout[-5000:]
    starts = dict(runner.starts())
    assert list(starts) == ["db", "app", "web"]          # web waits for app (same batch, later stage)
    assert starts["app"] - starts["db"] >= 3              # app's start delay
    report = runner.report()
    assert report["result"] == "succeeded" and report["rto_seconds"] is not None
    assert [v["name"] for v in report["vms"]] == ["db", "app", "web"]
    assert all(v["result"] == "healthy" and v["ip_after"] == "127.0.0.1" for v in report["vms"])
    assert report["rto_seconds"] == max(v["healthy_seconds"] for v in report["vms"])
    assert [b["name"] for b in report["batches"]] == ["data", "front"]
    html = (runner.report_dir / "test-run.html").read_text()
    assert "plan RTO" in html and "<td>app</td>" in html
    # After a successful run, running the plan again is a new run (for VMs, tandem_vm then
    # finds them running and changes nothing); an unfinished one would be resumed instead.
    first_started = runner.state()["started_at"]
    again = runner.run(plan)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Run test-run starts" in again.stdout and runner.state()["started_at"] > first_started
    assert [start[0] for start in runner.starts()] == ["db", "app", "web"] * 2


def test_on_failure_stop_ends_the_run_and_continue_goes_on(runner):
    runner.vm("bad", broken=True)
    good, later = runner.vm("good"), runner.vm("later")
    plan = {"name": "p", "defaults": {"timeout": 4}, "batches": [
        {"name": "one", "vms": [
            {"name": "bad", "health_check": {"tcp": {"port": runner.specs["bad"]["port"]}},
             "on_failure": "continue"},
            {"name": "good", "health_check": {"tcp": {"port": good["port"]}}}]},
        {"name": "two", "vms": [{"name": "later", "health_check": {"tcp": {"port": later["port"]}}}]},
    ]}
    proc = runner.run(plan)
    assert proc.returncode != 0                          # the run failed (one VM failed) ...
    assert [start[0] for start in runner.starts()] == ["bad", "good", "later"]   # ... but went on
    state = runner.state()
    bad = state["vms"]["bad"]
    assert bad["result"] == "failed" and "Connection refused" in bad["health_error"]
    assert state["vms"]["later"]["result"] == "healthy"
    # With stop, the next batch never starts.
    runner.stop_servers()
    runner.log.unlink()
    plan["batches"][0]["vms"][0]["on_failure"] = "stop"
    proc = runner.run(plan, "-e", "tandem_run_restart=true")
    assert proc.returncode != 0
    assert [start[0] for start in runner.starts()] == ["bad", "good"]
    assert runner.report()["result"] == "failed" and runner.report()["rto_seconds"] is None


def test_an_interrupted_run_resumes_without_starting_a_vm_twice(runner):
    first, second = runner.vm("first"), runner.vm("second")
    plan = {"name": "p", "batches": [
        {"name": "a", "vms": [{"name": "first", "health_check": {"tcp": {"port": first["port"]}}}]},
        {"name": "b", "vms": [{"name": "second", "start_delay": 30,
                               "health_check": {"tcp": {"port": second["port"]}}}]},
    ]}
    proc = runner.run(plan, background=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:                    # interrupted during second's start delay
        if runner.state_file.exists() and runner.state()["vms"].get("first", {}).get("healthy"):
            break
        time.sleep(0.5)
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [start[0] for start in runner.starts()] == ["first"]
    plan["batches"][1]["vms"][0]["start_delay"] = 0
    done = runner.run(plan)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "Resuming run test-run: first already started" in done.stdout
    assert [start[0] for start in runner.starts()] == ["first", "second"]
    assert runner.report()["result"] == "succeeded"


def test_check_mode_starts_nothing_and_writes_nothing(runner):
    only = runner.vm("only")
    check = {"tcp": {"port": only["port"]}}
    plan = {"name": "p", "batches": [{"vms": [{"name": "only", "health_check": check}]}]}
    proc = runner.run(plan, "--check")
    assert runner.starts() == [] and not runner.state_file.exists()
    assert not list(runner.report_dir.iterdir())
    assert "Run | start on its host | only" in proc.stdout
