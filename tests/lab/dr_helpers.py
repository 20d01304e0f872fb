"""What the lab tests that run tandemd on the hypervisors share: running a playbook over a
protection-group file, reading a resource's status, and putting the hypervisors back the
way the other lab tests expect them (no tandemd, no firewall).

Used by test_dr_playbooks.py and test_guest.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(os.sys.executable).parent / "ansible-playbook"
HYPERVISORS = ("hv-a1", "hv-b1")
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


class Run:
    """One ansible-playbook run: its process, wall time and the recap per host."""

    def __init__(self, proc: subprocess.CompletedProcess, seconds: float):
        self.proc, self.seconds, self.output = proc, seconds, proc.stdout + proc.stderr
        self.recap = {m[1]: {"changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
                      for m in RECAP.finditer(proc.stdout)}

    @property
    def changed(self) -> int:
        return sum(h["changed"] for h in self.recap.values())


def playbook(lab, name: str, *extra: str, group: Path | None = None, check: bool = False,
             expect_ok: bool = True, timeout: float = 900) -> Run:
    """Run playbooks/NAME.yml on the lab, over the protection-group file `group` if given."""
    cmd = [str(ANSIBLE_PLAYBOOK), "-i", str(lab.inventory), f"playbooks/{name}.yml"]
    if group is not None:
        cmd += ["-e", f"tandem_protection_group_file={group}"]
    cmd += list(extra)
    if check:
        cmd += ["--check", "--diff"]
    env = {**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    run = Run(proc, time.monotonic() - t0)
    if expect_ok:
        assert proc.returncode == 0, (f"{' '.join(cmd[2:])} failed (rc {proc.returncode}):\n"
                                      f"{run.output[-6000:]}")
    return run


def ctl_status(lab, host: str, resource: str) -> dict:
    proc = lab.attach(host, "tandemctl", "status", resource, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)["resources"][0]


def start_crashed(lab) -> None:
    for fault in lab.status()["faults"]:
        if fault["fault"] == "crashed":
            lab.labctl("start", fault["host"])


def forget_resources(lab, host: str, pattern: str) -> None:
    """Remove every trace of the resources matching a shell glob from a host's tandemd, so
    that protect.yml starts from a blank host."""
    script = ("systemctl stop tandemd; "
              f"rm -f /etc/tandem/resources.d/{pattern}.toml /etc/tandem/secrets/{pattern}.key; "
              f"rm -rf /var/lib/tandem/{pattern} /srv/tandem/{pattern}; "
              "systemctl start tandemd")
    proc = lab.attach(host, "sh", "-c", script, timeout=120)
    assert proc.returncode == 0, proc.stderr


def remove_engine(lab) -> None:
    """Leave the hypervisors as the other lab tests expect them: no tandemd, no firewall
    (molecule/engine/cleanup.yml)."""
    cleanup = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(lab.inventory), "molecule/engine/cleanup.yml"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert cleanup.returncode == 0, cleanup.stdout[-3000:] + cleanup.stderr[-2000:]
