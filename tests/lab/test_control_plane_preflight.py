"""The control_plane role's preflight rejects the two split-brain timeout traps.

Runs playbooks/control_plane.yml in check mode on the lab trio with an unsafe combination:
the preflight must stop the play before any task that would change a host, with a message
that names the trap. (Check mode as a second safety net: nothing is changed either way.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "tandem_control_plane_monitor_password": "molecule-monitor-secret",
    "tandem_control_plane_replication_password": "molecule-replication-secret",
    "tandem_control_plane_app_password": "molecule-app-secret",
}


@pytest.mark.parametrize(("extra", "message"), [
    # Trap 2: a walsender that dies before the keeper notices the lost monitor.
    ({"tandem_control_plane_wal_sender_timeout_ms": 2000,
      "tandem_control_plane_network_partition_timeout_s": 2},
     "tandem_control_plane_wal_sender_timeout_ms is 2000"),
    # Trap 1: pg_autoctl's own 30 s walsender: the old primary fences itself too late.
    ({"tandem_control_plane_wal_sender_timeout_ms": 30000},
     "two writable primaries"),
    # Trap 1 the other way round: a demote timeout shorter than the self-fencing.
    ({"tandem_control_plane_primary_demote_timeout_ms": 6000},
     "two writable primaries"),
], ids=["wal-sender-2s", "wal-sender-30s", "demote-6s"])
def test_preflight_rejects_unsafe_timeouts(lab, extra, message):
    venv_bin = Path(sys.executable).parent
    proc = subprocess.run(
        [str(venv_bin / "ansible-playbook"), "-i", str(lab.inventory), "--check",
         "-e", json.dumps({**SECRETS, **extra}), "playbooks/control_plane.yml"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
             "ANSIBLE_COLLECTIONS_PATH": str(REPO / ".cache" / "collections")})
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Unsafe" in out and message in out, proc.stdout[-3000:]
    # Stopped in the preflight: no later task ran.
    assert "Ensure the packages are installed" not in proc.stdout
