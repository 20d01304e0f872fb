"""playbooks/validate.yml through ansible-playbook, on the controller only: the example files
pass (also under --check) and show the old -> new table; bad files fail with every problem
of every file listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / ".cache" / "collections"
EXAMPLE = ROOT / "inventories" / "example"


def run(
    tmp_path,
    *extra,
    group=EXAMPLE / "protection_group.yml",
    mapping=EXAMPLE / "network_mapping.yml",
    plan=EXAMPLE / "recovery_plan.yml",
    inventory=EXAMPLE / "hosts.yml",
):
    if not (COLLECTIONS / "ansible_collections" / "tandem" / "dr").exists():
        pytest.fail("run `make collections` first (tandem.dr must resolve to this checkout)")
    env = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_STDOUT_CALLBACK": "json",
        "ANSIBLE_LOCAL_TEMP": str(tmp_path),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    cmd = [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        str(inventory),
        str(ROOT / "playbooks" / "validate.yml"),
        "-e",
        f"tandem_protection_group_file={group}",
        "-e",
        f"tandem_network_mapping_file={mapping}",
        "-e",
        f"tandem_recovery_plan_file={plan}",
        *extra,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path
    )
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON from ansible-playbook (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    tasks = {
        t["task"]["name"]: t["hosts"].get("localhost", {}) for play in out["plays"] for t in play["tasks"]
    }
    return proc.returncode, tasks, out["stats"]["localhost"]


@pytest.mark.parametrize("check", [False, True], ids=["run", "check"])
def test_example_files_pass_and_show_the_failover_table(tmp_path, check):
    rc, tasks, stats = run(tmp_path, *(["--check"] if check else []))
    assert rc == 0, tasks
    assert stats["changed"] == 0 and stats["failures"] == 0
    table = tasks["Validate | network changes on failover"]["msg"]
    assert table[0].split()[:3] == ["VM", "NIC", "NETWORK"]
    rows = {(line.split()[0], line.split()[1]): line for line in table[1:]}
    assert "10.10.0.50/24" in rows[("web01", "0")] and "10.20.0.50/24" in rows[("web01", "0")]
    assert "keep 172.16.5.50" in rows[("web01", "1")]
    assert "pool 198.51.100.45 -> 203.0.113." in rows[("web01", "2")]
    assert "override 10.10.0.20 -> 10.20.0.120" in rows[("db01", "0")]
    assert tasks["Validate | recovery order"]["msg"] == ["databases: db01", "applications: web01"]


def test_failback_table_goes_back_to_the_production_addresses(tmp_path):
    rc, tasks, _stats = run(tmp_path, "-e", "direction=failback")
    assert rc == 0, tasks
    rows = tasks["Validate | network changes on failback"]["msg"][1:]
    assert any("same_offset 10.20.0.50 -> 10.10.0.50" in r for r in rows)
    assert any("override 10.20.0.120 -> 10.10.0.20" in r for r in rows)
    assert any("-> 198.51.100.45 (its production address)" in r for r in rows)


BAD_MAPPING = """
tandem_network_mapping:
  networks:
    - name: prod
      production: {bridge: br0, vlan: 5000}
      dr: {network: x, bridge: y}
      subnets:
        - production: {cidr: 10.10.0.0/24, gateway: 10.10.1.1}
          dr: {cidr: 10.20.0.0/23}
          ip_policy: pool
"""
BAD_PLAN = """
tandem_recovery_plan:
  batches:
    - vms: [{name: web01, depends_on: db01}]
    - vms: [{name: db01, on_failure: retry}]
"""


def test_bad_files_fail_with_every_problem_listed(tmp_path):
    (tmp_path / "map.yml").write_text(BAD_MAPPING)
    (tmp_path / "plan.yml").write_text(BAD_PLAN)
    group = (EXAMPLE / "protection_group.yml").read_text().replace("port: 7802", "port: 7801")
    (tmp_path / "group.yml").write_text(group)
    rc, tasks, _stats = run(
        tmp_path,
        "--check",
        group=tmp_path / "group.yml",
        mapping=tmp_path / "map.yml",
        plan=tmp_path / "plan.yml",
    )
    assert rc == 2
    failure = tasks["Validate | every problem found"]
    assert failure["failed"] is True
    assert failure["msg"] == [
        f"{tmp_path / 'group.yml'}: protection group: 2 problem(s):",
        "vms[1] (db01): port 7801 on kvm-a1 is already used by web01",
        "vms[1] (db01): port 7801 on kvm-b1 is already used by web01",
        f"{tmp_path / 'map.yml'}: network mapping: 4 problem(s):",
        "networks[0] (prod).production.vlan: must be an integer 1-4094, got 5000",
        "networks[0] (prod).dr: give exactly one of 'network' (libvirt network) or 'bridge'",
        "networks[0] (prod).subnets[0].production.gateway: 10.10.1.1 is not a host address of 10.10.0.0/24",
        "networks[0] (prod).subnets[0].pool: ip_policy pool needs a pool for each side "
        "({production: FIRST-LAST, dr: FIRST-LAST}), so both directions work",
        f"{tmp_path / 'plan.yml'}: recovery plan: 2 problem(s):",
        "batches[1].vms[0] (db01).on_failure: must be stop or continue, got 'retry'",
        "batches[0].vms[0] (web01).depends_on: db01 starts later, in batches[1]; "
        "move it to this batch or an earlier one",
    ]
    assert "Validate | network changes on failover" not in tasks


def test_relative_paths_are_taken_from_the_current_directory(tmp_path):
    (tmp_path / "plan.yml").write_text(BAD_PLAN)
    rc, tasks, _stats = run(tmp_path, plan=Path("plan.yml"))
    assert (
        rc == 2 and "plan.yml: recovery plan: 2 problem(s):" in tasks["Validate | every problem found"]["msg"]
    )


def test_lab_files_pass(tmp_path):
    """The lab's files, with an inventory of the lab's hosts and groups (the real one is
    generated by `labctl up`; this test does not need the lab)."""
    topology = tomllib.loads((ROOT / "lab" / "topology.toml").read_text())
    groups = {}
    for host, spec in topology["hosts"].items():
        for group in spec.get("groups", []):
            groups.setdefault(group, {"hosts": {}})["hosts"][host] = None
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"all": {"hosts": dict.fromkeys(topology["hosts"]), "children": groups}}))
    lab = ROOT / "inventories" / "lab"
    rc, tasks, _stats = run(
        tmp_path,
        "--check",
        group=lab / "protection_group.yml",
        mapping=lab / "network_mapping.yml",
        plan=lab / "recovery_plan.yml",
        inventory=inventory,
    )
    assert rc == 0, tasks
    rows = tasks["Validate | network changes on failover"]["msg"][1:]
    assert any(r.startswith("app01") and "same_offset 192.168.10.11 -> 192.168.20.11" in r for r in rows)
    assert tasks["Validate | recovery order"]["msg"] == ["database: app01", "application: app02"]
