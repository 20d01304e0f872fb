"""The collection's playbooks under ansible-runner, the way AWX runs them (issue 9).

Each test lays out a private data directory as AWX does: project/ (a copy of awx/project/, the
repository AWX syncs), inventory/ (the example inventory), env/extravars and env/envvars, and
runs a real playbook with `ansible_runner.run()`. The assertions are on what AWX reads back:
the status and rc, and the artifacts (artifacts/<ident>/stdout, rc, status, job_events/*.json).

No host of the example inventory answers: they all point at a closed port on 127.0.0.1 (a
site that is down), so only the controller-side plays do work. That is enough for status.yml
(both sites show as unreachable and the job succeeds), for the no_log secrets of protect.yml's
planning play, and for validate.yml's failure on a bad mapping file.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import ansible_runner
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / ".cache" / "collections"
EXAMPLE = ROOT / "inventories" / "example"
#: Passed as an extravar, as an AWX credential would inject it; must never reach an event.
EXTRAVAR_SECRET = "extravar-secret-7c1e0b9a4d2f"

BAD_MAPPING = """
tandem_network_mapping:
  networks:
    - name: prod
      production: {bridge: br0, vlan: 5000}
      dr: {network: x, bridge: y}
"""


@pytest.fixture
def closed_port():
    """A local TCP port that refuses connections for the test's duration (bound, not listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def private_data_dir(tmp_path, closed_port, monkeypatch) -> Path:
    if not (COLLECTIONS / "ansible_collections" / "tandem" / "dr").exists():
        pytest.fail("run `make collections` first (tandem.dr must resolve to this checkout)")
    # ansible-runner looks ansible-playbook up in its own PATH (the venv's, as in an EE).
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{Path('/usr/bin')}:{Path('/bin')}")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    pdd = tmp_path / "job"
    shutil.copytree(ROOT / "awx" / "project", pdd / "project")
    inventory = yaml.safe_load((EXAMPLE / "hosts.yml").read_text(encoding="utf-8"))
    for site in inventory["all"]["children"].values():
        for host in (site.get("hosts") or {}).values():
            if host:
                host.update(ansible_host="127.0.0.1", ansible_port=closed_port, ansible_ssh_timeout=5)
    (pdd / "inventory").mkdir()
    (pdd / "inventory" / "hosts.yml").write_text(yaml.safe_dump(inventory), encoding="utf-8")
    (pdd / "env").mkdir()
    envvars = {"ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")}
    (pdd / "env" / "envvars").write_text(yaml.safe_dump(envvars), encoding="utf-8")
    return pdd


def run(pdd: Path, playbook: str, ident: str, extravars: dict | None = None, **kwargs):
    if extravars is not None:
        (pdd / "env" / "extravars").write_text(yaml.safe_dump(extravars), encoding="utf-8")
    result = ansible_runner.run(
        private_data_dir=str(pdd), playbook=playbook, ident=ident, quiet=True, timeout=600, **kwargs
    )
    return result, pdd / "artifacts" / ident


def job_events(artifacts: Path) -> list[dict]:
    """artifacts/<ident>/job_events/*.json in emission order (the file names start with the counter)."""
    files = sorted((artifacts / "job_events").glob("*.json"), key=lambda p: int(p.name.split("-")[0]))
    return [json.loads(p.read_text(encoding="utf-8")) for p in files]


def assert_artifacts(artifacts: Path, status: str, rc: int) -> list[dict]:
    for name in ("stdout", "rc", "status", "command"):
        assert (artifacts / name).is_file(), f"no artifacts/{artifacts.name}/{name}"
    assert (artifacts / "status").read_text().strip() == status
    assert (artifacts / "rc").read_text().strip() == str(rc)
    assert "PLAY RECAP" in (artifacts / "stdout").read_text(encoding="utf-8")
    events = job_events(artifacts)
    assert events, "no job_events/*.json"
    assert events[0]["event"] == "playbook_on_start" and events[-1]["event"] == "playbook_on_stats"
    return events


def task_names(events: list[dict]) -> list[str]:
    return [e["event_data"]["task"] for e in events if e["event"] == "playbook_on_task_start"]


def test_status_job_succeeds_and_records_its_events(private_data_dir):
    result, artifacts = run(private_data_dir, "status.yml", "status")
    assert (result.status, result.rc) == ("successful", 0), (artifacts / "stdout").read_text()
    events = assert_artifacts(artifacts, "successful", 0)

    names = task_names(events)
    for task in (
        "Plan | validate the protection group and select the VMs",
        "Status | read this host's resources",
        "Status | per-VM table",
    ):
        assert task in names
    # Per host and task: the down sites are reported, and the job goes on to its report.
    unreachable = {e["event_data"]["host"] for e in events if e["event"] == "runner_on_unreachable"}
    assert unreachable == {"kvm-a1", "kvm-b1"}
    (table,) = [
        e["event_data"]["res"]["msg"]
        for e in events
        if e["event"] == "runner_on_ok" and e["event_data"]["task"] == "Status | per-VM table"
    ]
    assert table[0].split()[:3] == ["VM", "PRODUCTION", "DR"]
    assert table[1].split()[:5] == ["web01", "kvm-a1", "unreachable", "kvm-b1", "unreachable"]
    stats = events[-1]["event_data"]
    assert stats["failures"] == {} and stats["ok"]["localhost"] > 0


def test_protect_job_keeps_secrets_out_of_events_and_artifacts(private_data_dir):
    # protect.yml the way the project's other playbooks import theirs; only its controller-side
    # plays run (limit), which make the per-VM replication secrets (no_log).
    (private_data_dir / "project" / "protect.yml").write_text(
        "---\n- name: Tandem DR | protect\n  ansible.builtin.import_playbook: tandem.dr.protect\n"
        "  vars:\n    tandem_protection_group_file: protection_group.yml\n"
        "    tandem_network_mapping_file: network_mapping.yml\n"
        "    tandem_recovery_plan_file: recovery_plan.yml\n",
        encoding="utf-8",
    )
    inventory_file = private_data_dir / "inventory" / "hosts.yml"
    inventory = yaml.safe_load(inventory_file.read_text(encoding="utf-8"))
    inventory["all"]["hosts"] = {
        "localhost": {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        }
    }
    inventory_file.write_text(yaml.safe_dump(inventory), encoding="utf-8")

    result, artifacts = run(
        private_data_dir,
        "protect.yml",
        "protect",
        extravars={"tandem_secrets": {"web01": EXTRAVAR_SECRET}},
        limit="localhost",
    )
    assert (result.status, result.rc) == ("successful", 0), (artifacts / "stdout").read_text()
    events = assert_artifacts(artifacts, "successful", 0)

    # The secret the playbook generated (next to the inventory: the data dir, under AWX).
    generated = (private_data_dir / "tandem-secrets" / "web01.key").read_text().strip()
    assert len(generated) == 64
    task = "Protect | one replication secret per VM, kept in tandem_secrets_dir"
    results = [e for e in events if e["event"] == "runner_on_ok" and e["event_data"]["task"] == task]
    assert len(results) == 1 and "censored" in results[0]["event_data"]["res"]
    for path in artifacts.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            for secret in (generated, EXTRAVAR_SECRET):
                assert secret not in text, f"a secret is in {path.relative_to(artifacts)}"


def test_invalid_mapping_fails_with_the_problem_in_the_events(private_data_dir):
    (private_data_dir / "project" / "bad_mapping.yml").write_text(BAD_MAPPING, encoding="utf-8")
    result, artifacts = run(
        private_data_dir,
        "tandem.dr.validate",
        "validate",
        extravars={
            "tandem_protection_group_file": "protection_group.yml",
            "tandem_network_mapping_file": "bad_mapping.yml",
        },
    )
    assert (result.status, result.rc) == ("failed", 2), (artifacts / "stdout").read_text()
    events = assert_artifacts(artifacts, "failed", 2)

    failed = [
        e["event_data"]
        for e in events
        if e["event"] == "runner_on_failed" and not e["event_data"].get("ignore_errors")
    ]
    final = failed[-1]
    assert final["task"] == "Validate | every problem found"
    problems = "\n".join(final["res"]["msg"])
    assert "bad_mapping.yml: network mapping: 2 problem(s)" in problems
    assert "networks[0] (prod).production.vlan: must be an integer 1-4094, got 5000" in problems
    assert "networks[0] (prod).dr: give exactly one of 'network' (libvirt network) or 'bridge'" in problems
    assert events[-1]["event_data"]["failures"] == {"localhost": 1}
