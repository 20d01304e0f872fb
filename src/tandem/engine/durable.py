"""Making directory changes durable: a created, renamed or removed file is only
there for sure after an fsync of its directory (POSIX; ext4 and xfs rely on it)."""

from __future__ import annotations

import contextlib
import os


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_durably(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
