"""Unit tests import the lab tooling (lab/tandem_lab) straight from the tree.

(`reflink_fs` and `reflink_dir` are in tests/conftest.py, shared with the engine tests.)"""

import sys
from pathlib import Path

LAB = Path(__file__).resolve().parents[2] / "lab"
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))


