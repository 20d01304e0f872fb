"""The lab guest (docs/lab-guest.md) on tandemd: a tiny VM booted by libvirt on hv-a1 whose
disk is the NBD export of a resource protected to hv-b1.

The guest is booted three times on the same disk (destroyed in between, like a crash): each
time its HTTP status must answer with the address from its NoCloud seed, its app must go on
from the last durable record of the boot before, and every record it reports durable must be
in the replica's backing file on hv-b1, intact and in order. The time from `virsh start` to
the first HTTP answer goes to tests/output/guest_boot.json, for the PVH vmlinux and, for
comparison, the bzImage.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
import yaml
from dr_helpers import HYPERVISORS, ctl_status, forget_resources, playbook, remove_engine, start_crashed
from guestlib import VM_DIR, build_image, define, http, read_volume, records, status, undefine, write_seed

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "tests" / "output" / "guest_boot.json"
PROD, DR = "hv-a1", "hv-b1"
VM = "guest01"
IP = "192.168.10.10"               # on hv-a1's guest bridge tdr-guest (192.168.10.0/24)
MAC = "52:54:00:0a:00:0a"
GROUP = {"tandem_protection_group": {"name": "guestlab", "vms": [
    {"name": VM, "production": PROD, "dr": DR, "port": 7821, "disks": [{"size": "16MiB"}]},
]}}
SOCKET = f"/run/tandem/{VM}.nbd"
REPLICA = f"/srv/tandem/{VM}/disk0.img"
HEALTHY_TIMEOUT = 180              # TCG on a shared 2-core machine

# Five boots for the boot-time figures: `make test-guest`. tests/lab/test_vm_dr.py boots the
# guests on tandemd and checks their records in `make test`.
pytestmark = pytest.mark.opt_in("TANDEM_GUEST_FIGURES")


@pytest.fixture(scope="module")
def guest(lab, tmp_path_factory):
    lab.labctl("heal")
    start_crashed(lab)
    group = tmp_path_factory.mktemp("guest") / "protection_group.yml"
    group.write_text(yaml.safe_dump(GROUP))
    image = build_image(lab, PROD)
    playbook(lab, "engine")
    for host in HYPERVISORS:
        undefine(lab, host, VM)
        forget_resources(lab, host, VM)
    playbook(lab, "protect", group=group)
    st = ctl_status(lab, PROD, VM)
    assert st["role"] == "Primary" and st["connection"] == "Connected", st
    # tandemd makes its NBD sockets root:root 0660; QEMU runs as libvirt-qemu.
    proc = lab.attach(PROD, "chgrp", "libvirt-qemu", SOCKET)
    assert proc.returncode == 0, proc.stderr
    seed = {"instance_id": f"{VM}-1", "hostname": VM,
            "nics": [{"name": "eth0", "mac": MAC, "addresses": [f"{IP}/24"], "gateway": "192.168.10.1",
                      "dns": ["192.168.10.1"]}]}
    paths = image["hosts"][PROD]
    domain = {"name": VM, "memory_mib": 128, "vcpus": 1, "initrd": paths["initrd"],
              "cmdline": "console=ttyS0 quiet panic=-1 tdr.interval=0.5",
              "disks": [{"socket": SOCKET, "export": f"{VM}/disk0"}],
              "seed": write_seed(lab, PROD, VM, seed),
              "nics": [{"bridge": "tdr-guest", "mac": MAC}],
              "console_log": f"{VM_DIR}/{VM}/console.log"}
    yield {"image": image, "paths": paths, "domain": domain}
    for host in HYPERVISORS:
        undefine(lab, host, VM)
        lab.attach(host, "rm", "-rf", f"{VM_DIR}/{VM}", "/var/lib/libvirt/images/tandem-guest")
        lab.attach(host, "rmdir", "--ignore-fail-on-non-empty", VM_DIR)
    remove_engine(lab)
    for host in HYPERVISORS:
        lab.attach(host, "rm", "-rf", f"/srv/tandem/{VM}")


def boot(lab, domain: dict) -> dict:
    """Define and start the domain; wait for its HTTP status. Returns the figures."""
    define(lab, PROD, domain)
    t0 = time.monotonic()
    proc = lab.attach(PROD, "virsh", "-q", "start", domain["name"], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started = time.monotonic() - t0
    st = None
    while time.monotonic() - t0 < HEALTHY_TIMEOUT:
        st = status(lab, PROD, IP)
        if st:
            break
        time.sleep(0.3)
    healthy = time.monotonic() - t0
    console = lab.attach(PROD, "cat", domain["console_log"]).stdout
    assert st, f"no HTTP status from {IP} within {HEALTHY_TIMEOUT}s; console:\n{console[-3000:]}"
    return {"status": st, "virsh_start_s": round(started, 2), "start_to_http_s": round(healthy, 2),
            "guest_uptime_at_http_s": float(st["uptime"])}


def wait_seq(lab, at_least: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(lab, PROD, IP)
        if st and st["last_durable_seq"] is not None and st["last_durable_seq"] >= at_least:
            return st
        time.sleep(0.5)
    raise AssertionError(f"the guest did not reach record {at_least}: {st}")


def replica_records(lab, upto: int):
    return records(read_volume(lab, DR, REPLICA, upto + 8))


def test_guest_boots_from_tandemd_and_its_durable_records_are_at_site_b(lab, guest):
    figures = {"kernel": guest["image"]["kernel"], "image": guest["image"]["key"], "runs": []}
    last_seen = 0
    kernels = [("vmlinux", guest["paths"]["kernel"])] * 3 + [("vmlinuz", guest["paths"]["vmlinuz"])] * 2
    for i, (kind, kernel) in enumerate(kernels):
        run = boot(lab, {**guest["domain"], "kernel": kernel})
        st = run.pop("status")
        assert (st["hostname"], st["ip"], st["instance_id"]) == (VM, IP, f"{VM}-1"), st
        figures["runs"].append({"kernel": kind, **run})
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps(figures, indent=2) + "\n")

        # The app went on from the records of the boots before (none lost, none rewritten).
        first = wait_seq(lab, last_seen + 1)
        assert first["boot"] == st["boot"]
        st = wait_seq(lab, first["last_durable_seq"] + 5)
        last = http(lab, PROD, IP, "/cgi-bin/last").strip()
        seq = int(last.split()[1].removeprefix("seq="))
        assert seq >= st["last_durable_seq"], (last, st)

        # Everything it called durable is at site B, intact, chained, in order.
        held = replica_records(lab, seq)
        assert len(held) >= seq, f"site B holds {len(held)} valid records, the guest reported {seq} durable"
        assert held[seq - 1].line == last
        boots = [r.boot for r in held]
        assert len(set(boots)) == i + 1 and boots[-1] == st["boot"], sorted(set(boots))
        last_seen = seq
        proc = lab.attach(PROD, "virsh", "-q", "destroy", VM)
        assert proc.returncode == 0, proc.stderr
    vols = ctl_status(lab, PROD, VM)["volumes"]
    assert vols[0]["replication"] == "Established", vols
    figures["median_start_to_http_s"] = {
        kind: statistics.median(r["start_to_http_s"] for r in figures["runs"] if r["kernel"] == kind)
        for kind in ("vmlinux", "vmlinuz")}
    FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
