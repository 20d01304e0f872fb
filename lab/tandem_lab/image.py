"""The shared lab rootfs: built once by debootstrap, cached by content.

The cache key is a hash of the package list and the build script, so editing
either one makes the next `lab up` build a new image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

from .paths import IMAGE_DIR, Paths
from .system import step

PACKAGES = IMAGE_DIR / "packages.txt"
BUILD_SCRIPT = IMAGE_DIR / "build-rootfs.sh"


def image_key() -> str:
    h = hashlib.sha256()
    for f in (PACKAGES, BUILD_SCRIPT):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ensure_rootfs(paths: Paths) -> str:
    """Return the path of the rootfs for the current key, building it if needed."""
    key = image_key()
    rootfs = paths.rootfs_cache / key
    if (rootfs / "etc" / "tandem-lab-image.packages").exists():
        step(f"rootfs {key} is cached")
        return str(rootfs)
    step(f"building rootfs {key} (debootstrap; about 2 minutes on a fresh machine)")
    paths.rootfs_cache.mkdir(parents=True, exist_ok=True)
    env_cache = {"TANDEM_LAB_CACHE": str(paths.cache)}
    # Stream the build's own progress lines straight to the terminal.
    subprocess.run(["bash", str(BUILD_SCRIPT), str(rootfs), str(PACKAGES)],
                   check=True, env={**os.environ, **env_cache})
    return str(rootfs)


def prune(paths: Paths, keep: set[str]) -> None:
    """Drop cached images no container uses any more (they are ~900 MB each)."""
    if not paths.rootfs_cache.is_dir():
        return
    for d in paths.rootfs_cache.iterdir():
        if d.is_dir() and str(d) not in keep and ".building." not in d.name:
            step(f"pruning old rootfs {d.name}")
            shutil.rmtree(d, ignore_errors=True)

