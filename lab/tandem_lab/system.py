"""Running commands on the lab machine, with progress output."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

_START = time.monotonic()


class CommandError(RuntimeError):
    def __init__(self, argv, rc, stdout, stderr):
        self.argv, self.rc, self.stdout, self.stderr = argv, rc, stdout, stderr
        detail = (stderr or stdout or "").strip().splitlines()[-5:]
        super().__init__(f"`{shlex.join(argv)}` failed (rc={rc})"
                         + (":\n  " + "\n  ".join(detail) if detail else ""))


def step(msg: str) -> None:
    """One line of progress, with the time since the command started."""
    print(f"[lab {time.monotonic() - _START:6.1f}s] {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"[lab] WARNING: {msg}", file=sys.stderr, flush=True)


def run(argv, *, check=True, input=None, timeout=120) -> subprocess.CompletedProcess:
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise CommandError(argv, 127, "", f"{argv[0]}: command not found") from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def out(argv, **kw) -> str:
    return run(argv, **kw).stdout


def ok(argv, **kw) -> bool:
    return run(argv, check=False, **kw).returncode == 0
