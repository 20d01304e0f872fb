"""Real NBD clients against ``python -m tandem.engine.nbd`` serving a temporary file.

libnbd (nbdinfo, nbdcopy), qemu (qemu-img, qemu-io) and fio's nbd engine are the
reference clients; each test skips if its tool is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

MiB = 1 << 20

#: tool -> the Debian package that ships it
PACKAGES = {
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
}


def nbd_require_tool(name: str) -> str:
    """The tool's path, or skip the test naming the package to install."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES.get(name, name)
        pytest.skip(f"{name} is not installed (Debian package {package}: apt-get install {package})")
    return path


def run(
    cmd: list[str], *, ok: bool = True, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if ok:
        assert proc.returncode == 0, (
            f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def make_file(path: Path, size: int, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            chunk = fill * (MiB // len(fill))
            for _ in range(size // MiB):
                f.write(chunk)
    return path


def final_stats(runner: Any) -> dict[str, Any]:
    """Stop the runner and return the counters it logs on the way out."""
    assert runner.stop() == 0, runner.log_text()
    match = re.search(r"nbd stopping stats=(\{.*\})", runner.log_text())
    assert match, runner.log_text()
    return json.loads(match.group(1))


def test_nbdinfo_reports_size_block_sizes_and_flags(nbd_serve: Any, tmp_path: Path) -> None:
    nbd_require_tool("nbdinfo")
    runner = nbd_serve(make_file(tmp_path / "disk.img", 64 * MiB), name="vol0")
    info = json.loads(run(["nbdinfo", "--json", runner.uri()]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is False  # refused: the client falls back to simple replies
    (export,) = info["exports"]
    assert export["export-name"] == "vol0"
    assert export["export-size"] == 64 * MiB
    assert (export["block_size_minimum"], export["block_size_preferred"], export["block_size_maximum"]) == (
        1,
        4096,
        32 * MiB,
    )
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    # the default export "" is the same volume
    info = json.loads(run(["nbdinfo", "--json", runner.uri("")]).stdout)
    assert info["exports"][0]["export-size"] == 64 * MiB
    # NBD_OPT_LIST
    listing = json.loads(run(["nbdinfo", "--list", "--json", runner.uri("")]).stdout)
    assert [e["export-name"] for e in listing["exports"]] == ["vol0"]
    stats = final_stats(runner)
    assert stats["protocol_errors"] == 0


def test_nbdinfo_read_only_export(nbd_serve: Any, tmp_path: Path) -> None:
    nbd_require_tool("nbdinfo")
    runner = nbd_serve(make_file(tmp_path / "disk.img", 8 * MiB), name="ro", read_only=True)
    (export,) = json.loads(run(["nbdinfo", "--json", runner.uri()]).stdout)["exports"]
    assert export["is_read_only"] is True
    assert export["can_trim"] is False and export["can_zero"] is False


def test_nbdinfo_unknown_export(nbd_serve: Any, tmp_path: Path) -> None:
    nbd_require_tool("nbdinfo")
    runner = nbd_serve(make_file(tmp_path / "disk.img", MiB), name="vol0")
    proc = run(["nbdinfo", "--json", runner.uri("nope")], ok=False)
    assert proc.returncode != 0
    assert "nope" in proc.stderr


def test_nbdcopy_random_64mib_in_and_out(nbd_serve: Any, tmp_path: Path) -> None:
    nbd_require_tool("nbdcopy")
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(64 * MiB))
    disk = make_file(tmp_path / "disk.img", 64 * MiB, fill=b"\x5a")
    runner = nbd_serve(disk, name="disk")
    run(["nbdcopy", str(source), runner.uri()])
    assert disk.read_bytes() == source.read_bytes()
    copy = tmp_path / "copy.img"
    run(["nbdcopy", runner.uri(), str(copy)])
    assert copy.read_bytes() == source.read_bytes()
    stats = final_stats(runner)
    assert stats["bytes_written"] >= 64 * MiB and stats["bytes_read"] >= 64 * MiB
    assert stats["errors"] == 0 and stats["protocol_errors"] == 0


def test_nbdcopy_sparse_source_zeroes_the_holes(nbd_serve: Any, tmp_path: Path) -> None:
    nbd_require_tool("nbdcopy")
    source = make_file(tmp_path / "sparse.img", 64 * MiB)
    with open(source, "r+b") as f:
        for offset in (0, 10 * MiB, 40 * MiB + 4096):
            f.seek(offset)
            f.write(os.urandom(MiB))
    disk = make_file(tmp_path / "disk.img", 64 * MiB, fill=b"\xa5")
    runner = nbd_serve(disk)
    run(["nbdcopy", str(source), runner.uri()])
    assert disk.read_bytes() == source.read_bytes()
    stats = final_stats(runner)
    assert stats["requests"]["write_zeroes"] > 0  # holes travel as NBD_CMD_WRITE_ZEROES
    assert stats["errors"] == 0


def test_nbdcopy_into_a_read_only_export_fails_and_changes_nothing(nbd_serve: Any, tmp_path: Path) -> None:
    nbd_require_tool("nbdcopy")
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(4 * MiB))
    disk = make_file(tmp_path / "disk.img", 4 * MiB, fill=b"\x01")
    runner = nbd_serve(disk, read_only=True)
    assert run(["nbdcopy", str(source), runner.uri()], ok=False).returncode != 0
    assert disk.read_bytes() == b"\x01" * (4 * MiB)


def test_qemu_img_info_and_qemu_io_with_fua(nbd_serve: Any, tmp_path: Path) -> None:
    nbd_require_tool("qemu-img")
    nbd_require_tool("qemu-io")
    disk = make_file(tmp_path / "disk.img", 16 * MiB, fill=b"\x11")
    runner = nbd_serve(disk, name="disk")
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", runner.uri()]).stdout)
    assert info["virtual-size"] == 16 * MiB
    commands = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -f -P 0xcd 1M 1M",  # FUA
        "read -P 0xcd 1M 1M",
        "flush",
        "write -z 2M 1M",  # NBD_CMD_WRITE_ZEROES with NO_HOLE
        "write -z -u 3M 1M",  # ... and allowed to punch a hole
        "read -P 0 2M 2M",
        "discard 8M 1M",  # NBD_CMD_TRIM (the image is opened with discard=unmap)
        "write -P 0xef 5M 100k",
        "read -P 0xef 5M 100k",
    ]
    argv = ["qemu-io", "-f", "raw", "--discard=unmap"]
    for command in commands:
        argv += ["-c", command]
    proc = run([*argv, runner.uri()])
    assert "Pattern verification failed" not in proc.stdout + proc.stderr
    data = disk.read_bytes()
    assert data[:MiB] == b"\xab" * MiB
    assert data[MiB : 2 * MiB] == b"\xcd" * MiB
    assert data[2 * MiB : 4 * MiB] == bytes(2 * MiB)
    assert data[5 * MiB : 5 * MiB + 100 * 1024] == b"\xef" * (100 * 1024)
    assert data[4 * MiB : 5 * MiB] == b"\x11" * MiB
    stats = final_stats(runner)
    requests = stats["requests"]
    assert requests["write"] >= 3 and requests["flush"] >= 1
    assert requests["write_zeroes"] >= 2 and requests["trim"] >= 1
    assert stats["errors"] == 0 and stats["protocol_errors"] == 0


def _fio_nbd_available() -> bool:
    nbd_require_tool("fio")
    proc = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True, timeout=60)
    return proc.returncode == 0 and "uri" in proc.stdout


@pytest.mark.parametrize(
    "job",
    [
        ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
        ["--rw=write", "--bs=1M", "--iodepth=8"],
        ["--rw=randrw", "--bsrange=512-128k", "--iodepth=4"],
    ],
    ids=["randwrite-4k-qd16", "write-1M-qd8", "randrw-mixed-qd4"],
)
def test_fio_nbd_engine_with_crc32c_verify(nbd_serve: Any, tmp_path: Path, job: list[str]) -> None:
    if not _fio_nbd_available():
        pytest.skip("this fio has no nbd ioengine")
    disk = make_file(tmp_path / "disk.img", 32 * MiB)
    runner = nbd_serve(disk)
    out = tmp_path / "fio.json"
    argv = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={runner.uri()}", "--size=32M", *job]
    argv += [
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",  # (else fio leaves a verify state file in its cwd)
        "--output-format=json",
        f"--output={out}",
    ]
    run(argv, cwd=tmp_path)
    (result,) = json.loads(out.read_text())["jobs"]
    assert result["error"] == 0
    assert result["write"]["io_bytes"] > 0
    assert result["read"]["io_bytes"] > 0  # the verify pass
    stats = final_stats(runner)
    assert stats["errors"] == 0 and stats["protocol_errors"] == 0


def test_runner_stops_cleanly_on_sigterm(nbd_serve: Any, tmp_path: Path) -> None:
    runner = nbd_serve(make_file(tmp_path / "disk.img", MiB), name="x")
    assert os.path.exists(runner.socket)
    final_stats(runner)  # exit status 0, counters logged
    assert not os.path.exists(runner.socket)
    assert "nbd listening socket=" in runner.log_text()
