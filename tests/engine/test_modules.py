"""The tandem.dr modules against two real tandemd on loopback, through ansible-playbook.

Both "nodes" are localhost; each task points the module at one node's control socket and
resource directory. Run 1 builds the pair with the modules (resource files on both nodes,
adjust, promote with force, wait for the initial sync, pause/resume, verify, a named
recovery point), run 2 repeats the desired state and must change nothing, run 3 does the
same in check mode and must report nothing to change.

Needs ansible-playbook next to the test's Python and the collections of `make collections`
(.cache/collections with tandem/dr linked to this checkout).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import REPO, Pair

COLLECTIONS = REPO / ".cache" / "collections"
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

PLAYBOOK = """
- name: tandem.dr modules against two real tandemd
  hosts: localhost
  gather_facts: false
  vars:
    nodes: {nodes}
    resource_nodes:
      - {{name: a, address: "127.0.0.1:{port_a}"}}
      - {{name: b, address: "127.0.0.1:{port_b}"}}
  module_defaults:
    group/tandem.dr.tandem:
      tandemctl: {tandemctl}
  tasks:
    - name: Resource file on each node
      tandem.dr.tandem_resource:
        name: vm1
        local_node: "{{{{ item.key }}}}"
        nodes: "{{{{ resource_nodes }}}}"
        protocol: C
        volumes:
          - {{path: "{{{{ item.value.data }}}}/disk0.img", size: 16MiB, export: vm1/disk0}}
        tunables: {tunables}
        security: "{{{{ item.value.security }}}}"
        secret: {secret}
        config_dir: "{{{{ item.value.config_dir }}}}"
        socket: "{{{{ item.value.socket }}}}"
      loop: "{{{{ nodes | dict2items }}}}"
      register: resource

    - name: Both files are written once
      ansible.builtin.assert:
        that:
          - resource.results | map(attribute='changed') | list == [first_run, first_run]
          - resource.results | map(attribute='commands') | map('length') | list
            == ([1, 1] if first_run else [0, 0])

    - name: Wait for the connection on a (not in check mode, where nothing was started)
      tandem.dr.tandem_replication:
        name: vm1
        state: connected
        socket: "{{{{ nodes.a.socket }}}}"
        wait_timeout: 30
        wait_interval: 0.2
      when: not ansible_check_mode
      register: connected

    - name: Promote a (the initial full sync starts)
      tandem.dr.tandem_role:
        name: vm1
        role: primary
        force: true
        socket: "{{{{ nodes.a.socket }}}}"
      register: promote

    - name: Wait until in sync
      tandem.dr.tandem_replication:
        name: vm1
        state: in_sync
        socket: "{{{{ nodes.a.socket }}}}"
        wait_timeout: 60
        wait_interval: 0.2
      register: sync

    - name: A named recovery point on b
      tandem.dr.tandem_recovery_point:
        resource: vm1
        name: baseline
        socket: "{{{{ nodes.b.socket }}}}"
      register: rp

    - name: Pause, resume and verify (first run only)
      when: first_run
      block:
        - name: Pause
          tandem.dr.tandem_replication:
            name: vm1
            state: paused
            socket: "{{{{ nodes.a.socket }}}}"
          register: paused
        - name: Resume and wait for the sync
          tandem.dr.tandem_replication:
            name: vm1
            state: connected
            socket: "{{{{ nodes.a.socket }}}}"
            wait_timeout: 30
            wait_interval: 0.2
          register: resumed
        - name: Verify
          tandem.dr.tandem_replication:
            name: vm1
            state: verified
            resync_on_mismatch: true
            socket: "{{{{ nodes.a.socket }}}}"
            wait_timeout: 30
          register: verified
        - name: Pause, resume and verify did what they should
          ansible.builtin.assert:
            that:
              - paused.changed and paused.resource.connection == 'StandAlone'
              - resumed.changed and resumed.resource.connection == 'Connected'
              - not verified.changed and verified.out_of_sync_bytes == 0

    - name: Back in sync
      tandem.dr.tandem_replication:
        name: vm1
        state: in_sync
        socket: "{{{{ nodes.a.socket }}}}"
        wait_timeout: 60
        wait_interval: 0.2

    - name: Status of b
      tandem.dr.tandem_resource_info:
        socket: "{{{{ nodes.b.socket }}}}"
      register: info_b

    - name: Recovery points of b
      tandem.dr.tandem_recovery_point_info:
        resource: vm1
        labels: {{name: baseline}}
        socket: "{{{{ nodes.b.socket }}}}"
      register: rps_b

    - name: Results
      ansible.builtin.assert:
        that:
          - promote.changed == first_run
          - promote.resource.role == 'Primary'
          - not sync.changed and sync.resource.in_sync
          - rp.changed == first_run
          - rp.recovery_point.labels.name == 'baseline'
          - info_b.resources | length == 1
          - info_b.resources[0].role == 'Secondary'
          - info_b.resources[0].in_sync
          - rps_b.recovery_points | length == 1

    - name: Write what the modules returned
      ansible.builtin.copy:
        content: "{{{{ {{'resource': resource, 'promote': promote, 'rp': rp}} | to_nice_json }}}}"
        dest: "{{{{ result_file }}}}"
        mode: "0644"
      check_mode: false
"""


@pytest.fixture
def pair(tmp_path):
    if not ANSIBLE_PLAYBOOK.exists():
        pytest.skip(f"no ansible-playbook next to {sys.executable}")
    if not (COLLECTIONS / "ansible_collections" / "tandem" / "dr").exists():
        pytest.skip("run `make collections` first (.cache/collections)")
    p = Pair(tmp_path)
    for node in (p.a, p.b):
        (node.config_dir / "vm1.toml").unlink()      # the modules write them
    p.start()
    yield p
    p.stop()


def test_modules_build_a_pair_idempotently(pair, tmp_path):
    tandemctl = tmp_path / "tandemctl"
    tandemctl.write_text(f'#!/bin/sh\nPYTHONPATH={REPO / "src"} exec {sys.executable} '
                         '-m tandem.engine.ctl "$@"\n')
    tandemctl.chmod(0o755)
    nodes = {n.name: {"socket": n.control, "config_dir": str(n.config_dir), "data": str(n.root / "data"),
                      "security": {**{k: v for k, v in pair.security[n.name].items() if k != "secret_file"},
                                   "secret_file": str(n.root / "secrets" / "vm1.key")}}
             for n in (pair.a, pair.b)}
    playbook = tmp_path / "modules.yml"
    playbook.write_text(PLAYBOOK.format(
        nodes=json.dumps(nodes), port_a=pair.ports["a"], port_b=pair.ports["b"], tandemctl=tandemctl,
        tunables=json.dumps(pair.tunables), secret=secrets.token_hex(16)))
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
           "ANSIBLE_HOME": str(tmp_path / "ansible"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_STDOUT_CALLBACK": "default",
           "ANSIBLE_PYTHON_INTERPRETER": sys.executable}

    def play(*extra: str, first_run: bool) -> dict:
        out = tmp_path / "result.json"
        proc = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "-c", "local", str(playbook),
             "-e", json.dumps({"first_run": first_run, "result_file": str(out)}), *extra],
            capture_output=True, text=True, env=env, timeout=180, check=False)
        assert proc.returncode == 0, f"{' '.join(extra)}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        return json.loads(out.read_text())

    first = play(first_run=True)
    for r in first["resource"]["results"]:
        assert r["file_changed"] and r["secret_changed"]
        assert [a["kind"] for a in r["actions"]] == ["add-resource"]
    for node in (pair.a, pair.b):
        text = (node.config_dir / "vm1.toml").read_text()
        assert text.startswith("# managed by Ansible tandem.dr.tandem_resource")
        assert f'local_node = "{node.name}"' in text
        key = node.root / "secrets" / "vm1.key"
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        assert oct(key.parent.stat().st_mode & 0o777) == "0o700"
    assert pair.in_sync()

    before = {n.name: (n.config_dir / "vm1.toml").stat().st_mtime_ns for n in (pair.a, pair.b)}
    second = play(first_run=False)
    assert all(not r["changed"] and r["actions"] == [] for r in second["resource"]["results"])
    third = play("--check", "--diff", first_run=False)
    assert all(not r["changed"] and r["commands"] == [] for r in third["resource"]["results"])
    assert before == {n.name: (n.config_dir / "vm1.toml").stat().st_mtime_ns for n in (pair.a, pair.b)}
    assert pair.a.status("vm1")["role"] == "Primary" and pair.in_sync()
