"""changelogs/: antsibull-changelog accepts every fragment (what `make changelog` and the
ansible-test changelog sanity test run first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_antsibull_changelog_lint_passes():
    tool = Path(sys.executable).parent / "antsibull-changelog"
    proc = subprocess.run(
        [str(tool), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
