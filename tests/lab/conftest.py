"""Fixtures for the multi-host lab tests (tests/lab).

Every test here runs against the real LXC lab: real containers with systemd,
real bridges and nft rules, Ansible over ssh. The session brings the lab up
itself (idempotently), so `pytest -m lab` works on a fresh machine as root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LABCTL = REPO / "lab" / "labctl"
VENV_BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config, items):
    lab_items = [i for i in items if Path(str(i.fspath)).is_relative_to(REPO / "tests" / "lab")]
    for item in lab_items:
        item.add_marker(pytest.mark.lab)
    # Tests that take the lab down run last, so the others share one lab.
    last = [i for i in items if i.get_closest_marker("lab_teardown")]
    if last:
        items[:] = [i for i in items if i not in last] + last


def pytest_configure(config):
    config.addinivalue_line("markers", "lab_teardown: takes the lab down; runs after the other tests")
    config.addinivalue_line("markers", "opt_in(VAR): runs only when the environment variable VAR is 1 "
                            "(long runs kept out of `make test` to hold its time budget)")


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("opt_in")
    if marker and os.environ.get(marker.args[0]) != "1":
        pytest.skip(f"opt-in: set {marker.args[0]}=1 (see the Makefile's targets)")


class Lab:
    """Thin helpers over `labctl`, lxc-attach and Ansible, for assertions."""

    def __init__(self):
        self.state = Path(os.environ.get("TANDEM_LAB_STATE", "/var/lib/tandem-lab"))
        self.inventory = REPO / "inventories" / "lab" / "hosts.yml"

    def labctl(self, *args: str, check=True, timeout=900) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(LABCTL), *args], capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"labctl {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self) -> dict:
        return json.loads(self.labctl("status", "--json").stdout)

    def attach(self, host: str, *argv: str, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["lxc-attach", "-P", str(self.state / "lxc"), "-n", host, "--clear-env", "--", *argv],
            capture_output=True, text=True, timeout=timeout)

    def put(self, host: str, path: str, content: str, mode: str = "0644") -> None:
        """Write a file inside a lab host (lab hosts have no route to fetch anything)."""
        proc = subprocess.run(
            ["lxc-attach", "-P", str(self.state / "lxc"), "-n", host, "--clear-env", "--",
             "sh", "-c", f'cat > "$0" && chmod {mode} "$0"', path],
            input=content, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"writing {path} on {host} failed: {proc.stderr}")

    def pings(self, src: str, dst: str, count: int = 2) -> bool:
        """True if `src` gets an ICMP echo reply from address `dst`."""
        proc = self.attach(src, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", dst)
        return proc.returncode == 0

    def tcp(self, src: str, dst: str, port: int = 22) -> bool:
        """True if `src` can open a TCP connection to dst:port (sshd listens everywhere)."""
        code = (f"import socket; socket.create_connection(({dst!r}, {port}), timeout=2).close()")
        return self.attach(src, "python3", "-c", code).returncode == 0

    def ansible(self, *args: str, timeout=300) -> subprocess.CompletedProcess:
        env = {**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"}
        return subprocess.run([str(VENV_BIN / "ansible"), "-i", str(self.inventory), *args],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)

    def wait_for(self, predicate, timeout=30.0, interval=0.5):
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)


@pytest.fixture(scope="session")
def lab() -> Lab:
    if os.geteuid() != 0:
        pytest.skip("the lab tests need root (LXC containers, bridges, nft)")
    lab = Lab()
    lab.labctl("up")
    return lab


@pytest.fixture
def healed(lab):
    """Run a test with no faults in force before and after it."""
    lab.labctl("heal")
    yield lab
    lab.labctl("heal")
    for fault in lab.status()["faults"]:
        if fault["fault"] == "frozen":
            lab.labctl("thaw", fault["host"])
        elif fault["fault"] == "crashed":
            lab.labctl("start", fault["host"])
