"""Run every molecule scenario (molecule/<scenario>/molecule.yml) against the lab.

Each scenario is one `molecule test` run: syntax, converge, idempotence, verify (testinfra)
and cleanup, with the shared base config molecule/config.yml. See molecule/README.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every scenario converges twice on the lab: about 12 minutes, which `make test`'s 45-minute
# budget cannot hold next to the lab tests; `make molecule` runs them.
pytestmark = pytest.mark.opt_in("TANDEM_MOLECULE")

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SCENARIOS = sorted(p.parent.name for p in (REPO / "molecule").glob("*/molecule.yml"))
TAIL = 4000


def molecule_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_COLLECTIONS_PATH=str(REPO / ".cache" / "collections"),
        # Scenarios live in molecule/, not in extensions/molecule/ (molecule's default for a
        # collection); saying so explicitly also silences molecule's migration warning.
        MOLECULE_GLOB="molecule/*/molecule.yml",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_NOCOLOR="1",
        NO_COLOR="1",
        PY_COLORS="0",
    )
    env.pop("MOLECULE_PROJECT_DIRECTORY", None)
    return env


def test_there_is_at_least_one_scenario():
    assert SCENARIOS, "no molecule/<scenario>/molecule.yml found"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_molecule_scenario(lab, scenario):
    cmd = [str(VENV_BIN / "molecule"), "-c", "molecule/config.yml", "test", "-s", scenario]
    proc = subprocess.run(cmd, cwd=REPO, env=molecule_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1800)
    output = proc.stdout
    assert proc.returncode == 0, (
        f"`{' '.join(cmd[1:])}` failed with rc {proc.returncode}; last {TAIL} characters:\n"
        f"{output[-TAIL:]}")
