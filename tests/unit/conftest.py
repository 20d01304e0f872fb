"""Unit tests import the lab tooling (lab/tandem_lab) and the engine (src/tandem) straight from the tree.

(`reflink_fs` and `reflink_dir` are in tests/conftest.py, shared with the engine tests.)"""

import sys
from pathlib import Path

LAB = Path(__file__).resolve().parents[2] / "lab"
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))
# The engine of this checkout, also when the venv's editable install points at another
# checkout (git worktrees sharing one venv).
SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

# A live tandem-center (tests/unit/center_live.py) for the tandem_center_* module and run_plan tests.
# (fixtures, found by name)
from center_live import center, pg, template_db  # noqa: E402,F401  # pylint: disable=unused-import
