"""awx/: the AWX project, job templates and surveys agree with the collection's playbooks.

No controller runs in CI, so this checks what a controller would trip over at launch time:
a template naming a playbook the project lacks, a survey variable no playbook reads, or a
multiple-choice answer the playbook rejects. The failover choices are run through the
playbook's own first assert, so a renamed mode fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
AWX = ROOT / "awx"
CONFIG = yaml.safe_load((AWX / "controller_config.yml").read_text(encoding="utf-8"))
TEMPLATES = CONFIG["controller_templates"]
BIN = Path(sys.executable).parent


def _collection_text(playbook: str) -> str:
    """The collection playbook and the task files it can include."""
    parts = [(ROOT / "playbooks" / playbook).read_text(encoding="utf-8")]
    parts += [p.read_text(encoding="utf-8") for p in sorted((ROOT / "playbooks" / "tasks").glob("*.yml"))]
    return "\n".join(parts)


@pytest.mark.parametrize("template", TEMPLATES, ids=[t["name"] for t in TEMPLATES])
def test_each_template_runs_a_project_playbook_that_imports_the_collection(template):
    project_playbook = AWX / "project" / template["playbook"]
    plays = yaml.safe_load(project_playbook.read_text(encoding="utf-8"))
    imported = [p["ansible.builtin.import_playbook"] for p in plays]
    assert imported == [f"tandem.dr.{Path(template['playbook']).stem}"]
    assert template["project"] in {p["name"] for p in CONFIG["controller_projects"]}
    environments = {e["name"] for e in CONFIG["controller_execution_environments"]}
    assert template["execution_environment"] in environments


@pytest.mark.parametrize("template", TEMPLATES, ids=[t["name"] for t in TEMPLATES])
def test_each_survey_variable_is_read_by_the_playbook(template):
    text = _collection_text(template["playbook"])
    assert template["survey_enabled"]
    for question in template["survey_spec"]["spec"]:
        assert re.search(rf"\b{re.escape(question['variable'])}\b", text), question["variable"]
        assert question["type"] in {"text", "textarea", "password", "integer", "float",
                                    "multiplechoice", "multiselect"}
        if question["type"] == "multiplechoice":
            assert question["default"] in question["choices"]


def _failover_mode_check(extra: dict) -> subprocess.CompletedProcess:
    """failover.yml's input check (its first assert), run ad hoc with these survey answers."""
    that = json.dumps({"that": _failover_input_check(), "quiet": True})
    return subprocess.run(
        [str(BIN / "ansible"), "localhost", "-c", "local", "-m", "ansible.builtin.assert", "-a", that,
         "-e", json.dumps(extra)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})


def _failover_input_check() -> list[str]:
    plays = yaml.safe_load((ROOT / "playbooks" / "failover.yml").read_text(encoding="utf-8"))
    name = "Failover | check the mode and the recovery point"
    task = next(t for t in plays[0]["tasks"] if t["name"] == name)
    return task["ansible.builtin.assert"]["that"]


def test_failover_survey_answers_pass_the_playbooks_input_check():
    (failover,) = [t for t in TEMPLATES if t["playbook"] == "failover.yml"]
    spec = {q["variable"]: q for q in failover["survey_spec"]["spec"]}
    for mode in spec["mode"]["choices"]:
        # AWX sends a blank optional answer as "", which must mean "no recovery point".
        proc = _failover_mode_check({"mode": mode, "recovery_point": spec["recovery_point"]["default"]})
        assert proc.returncode == 0, f"mode={mode}: {proc.stdout}{proc.stderr}"
    proc = _failover_mode_check({"mode": "sideways", "recovery_point": ""})
    assert proc.returncode != 0
    proc = _failover_mode_check({"mode": "planned", "recovery_point": "rp-1"})
    assert proc.returncode != 0
