"""Fixtures for tests that need real NBD clients against ``python -m tandem.engine.nbd``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class NBDRunner:
    """One ``python -m tandem.engine.nbd`` process serving one file on a unix socket."""

    def __init__(self, file: Path, sockdir: str, name: str, read_only: bool, log: Path) -> None:
        self.file = file
        self.sockdir = sockdir
        self.socket = os.path.join(sockdir, "nbd.sock")
        self.name = name
        self.log = log
        cmd = [sys.executable, "-m", "tandem.engine.nbd", "--file", str(file), "--socket", self.socket]
        cmd += ["--name", name] + (["--read-only"] if read_only else [])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._wait_listening()

    def uri(self, name: str | None = None) -> str:
        return f"nbd+unix:///{self.name if name is None else name}?socket={self.socket}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_listening(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nbd runner exited with {self.proc.returncode}:\n{self.log_text()}")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(self.socket)
                except OSError:
                    time.sleep(0.05)
                    continue
            return
        self.stop()
        raise AssertionError(f"nbd runner did not listen within {timeout}s:\n{self.log_text()}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not go; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@pytest.fixture
def nbd_serve(tmp_path: Path) -> Iterator[Callable[..., NBDRunner]]:
    """Start runners: ``nbd_serve(file, name="disk", read_only=False)``; all stop at teardown."""
    runners: list[NBDRunner] = []

    def start(file: Path, *, name: str = "", read_only: bool = False) -> NBDRunner:
        # short socket path (unix socket paths are limited to 107 bytes)
        sockdir = tempfile.mkdtemp(prefix="nbdi-", dir="/tmp")
        runner = NBDRunner(file, sockdir, name, read_only, tmp_path / f"runner{len(runners)}.log")
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.stop()
        shutil.rmtree(runner.sockdir, ignore_errors=True)
