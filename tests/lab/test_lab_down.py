"""`make lab-down` leaves nothing behind (runs last: it takes the lab down)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

HOSTS = ("hv-a1", "cp-a", "hv-b1", "cp-b", "witness")
BRIDGES = ("tdr-a", "tdr-b", "tdr-c", "tdr-ra", "tdr-rb", "tdr-vip")


def make(target: str) -> None:
    proc = subprocess.run(["make", "-C", str(REPO), target], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def leftovers(lab, ip_forward_before: str) -> list[str]:
    found = []
    state = str(lab.state)
    if lab.state.exists():
        found.append(f"state directory {state}")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for name in BRIDGES + tuple(f"{h}-{i}" for h in HOSTS for i in range(3)):
        if f" {name}:" in links or f" {name}@" in links:
            found.append(f"interface {name}")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    found += [f"nft {line}" for line in tables.splitlines() if "tandem-lab" in line]
    found += [f"mount {line}" for line in Path("/proc/mounts").read_text().splitlines()
              if state in line]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {line}" for line in loops.splitlines() if state in line]
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, stat, args = line.split(None, 2) if len(line.split(None, 2)) == 3 else (0, "", line)
        if state in args and not stat.startswith("Z") and "ps -eo" not in args:
            found.append(f"process {pid} {args}")
    if lab.inventory.exists():
        found.append(f"inventory {lab.inventory}")
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    if forward != ip_forward_before:
        found.append(f"net.ipv4.ip_forward={forward} (was {ip_forward_before})")
    return found


@pytest.mark.lab_teardown
def test_lab_down_leaves_nothing_behind(lab):
    machine = json.loads((lab.state / "machine.json").read_text())
    make("lab-down")
    assert leftovers(lab, machine["ip_forward_before"]) == []
    make("lab-down")   # a second down is harmless


@pytest.mark.lab_teardown
def test_xfs_data_option_gives_reflink_and_cleans_up(lab):
    lab.labctl("up", "--data-fs", "xfs")
    machine = json.loads((lab.state / "machine.json").read_text())
    fstype = lab.attach("hv-a1", "findmnt", "-n", "-o", "FSTYPE", "/srv/tandem").stdout.strip()
    assert fstype == "xfs"
    script = ("set -e; cd /srv/tandem; head -c 4194304 /dev/urandom > disk.img;"
              " cp --reflink=always disk.img rp.img; cmp disk.img rp.img; rm disk.img rp.img")
    proc = lab.attach("hv-a1", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    make("lab-down")
    assert leftovers(lab, machine["ip_forward_before"]) == []
