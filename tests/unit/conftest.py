"""Unit tests import the lab tooling (lab/tandem_lab) and the engine (src/tandem) straight from the tree.

Also: `reflink_fs`, a real reflink filesystem (XFS on a loop device) for the
reflink recovery point tests."""

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[2] / "lab"
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))
# The engine of this checkout, also when the venv's editable install points at another
# checkout (git worktrees sharing one venv).
SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


# -- a real reflink filesystem (XFS, reflink=1) on a loop device ------------------------------

XFS_IMAGE_BYTES = 1 << 30


SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _run(*cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "PATH": SBIN_PATH}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)


def _ensure_xfsprogs() -> str | None:
    """mkfs.xfs on PATH (installs xfsprogs with apt if missing); None or why not."""
    if shutil.which("mkfs.xfs", path=SBIN_PATH):
        return None
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    install = ("apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "--no-install-recommends",
               "xfsprogs")
    r = _run(*install, env=env)
    if r.returncode:
        _run("apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-q", env=env)
        r = _run(*install, env=env)
    if r.returncode or not shutil.which("mkfs.xfs", path=SBIN_PATH):
        return f"cannot install xfsprogs: {r.stderr.strip()[-300:]}"
    return None


def _unmount(mnt: str, image: str) -> None:
    for _attempt in range(20):
        if not os.path.ismount(mnt):
            break
        if _run("umount", mnt).returncode == 0:
            break
        time.sleep(0.25)                       # something still has a file open: retry
    else:
        _run("umount", "-l", mnt)              # last resort: detach lazily
    # mount -o loop sets autoclear; detach whatever is still bound to the image anyway.
    r = _run("losetup", "-j", image)
    for line in r.stdout.splitlines():
        dev = line.split(":", 1)[0]
        if dev.startswith("/dev/loop"):
            _run("losetup", "-d", dev)


@pytest.fixture(scope="session")
def reflink_fs(tmp_path_factory):
    """A directory on a freshly made XFS with reflink=1 (1 GiB sparse image, loop-mounted).

    Needs root. As root (make test, CI) a setup failure is a test failure, so the
    reflink tests can never silently not run; TANDEM_SKIP_REFLINK=1 turns that into
    a skip on a machine without loop devices. Without root they skip."""
    must = os.geteuid() == 0 and not os.environ.get("TANDEM_SKIP_REFLINK")

    def unavailable(why: str):
        if must:
            pytest.fail(f"reflink filesystem unavailable (TANDEM_SKIP_REFLINK=1 to skip): {why}")
        pytest.skip(f"reflink filesystem unavailable: {why}")

    if os.geteuid() != 0:
        unavailable("needs root (mkfs.xfs and mount -o loop)")
    why = _ensure_xfsprogs()
    if why:
        unavailable(why)
    base = tmp_path_factory.mktemp("reflinkfs")
    image, mnt = str(base / "xfs.img"), str(base / "mnt")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(XFS_IMAGE_BYTES)
    r = _run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", image)
    if r.returncode:
        os.unlink(image)
        unavailable(f"mkfs.xfs failed: {r.stderr.strip()[-300:]}")
    r = _run("mount", "-o", "loop", image, mnt)
    if r.returncode:
        os.unlink(image)
        unavailable(f"mount -o loop failed: {r.stderr.strip()[-300:]}")
    try:
        yield mnt
    finally:
        _unmount(mnt, image)
        if not os.path.ismount(mnt):
            with contextlib.suppress(OSError):
                os.unlink(image)


@pytest.fixture
def reflink_dir(reflink_fs, request):
    """A fresh directory per test on the reflink filesystem, removed afterwards."""
    name = "".join(ch if ch.isalnum() else "_" for ch in request.node.name)[:80]
    path = os.path.join(reflink_fs, name)
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)
