"""The lab guest (docs/lab-guest.md) on tandemd: a tiny VM booted by libvirt on hv-a1 whose
disk is the NBD export of a resource protected to hv-b1. And its clean shutdown on ACPI.

The guest is booted three times on the same disk (destroyed in between, like a crash): each
time its HTTP status must answer with the address from its NoCloud seed, its app must go on
from the last durable record of the boot before, and every record it reports durable must be
in the replica's backing file on hv-b1, intact and in order. The time from `virsh start` to
the first HTTP answer goes to tests/output/guest_boot.json, for the PVH vmlinux and, for
comparison, the bzImage.

The clean shutdown (hv-a1 only, no tandemd: qemu-nbd serves a raw file as the disk, so the
file can be read after the guest is off): `virsh shutdown` must take the domain to "shut off
(shutdown)" on its own, the app's last durable record must be the last one on the disk, and
the tandem_vm module must report a graceful stop too. The test never falls back to destroy:
a guest that ignores ACPI fails it. Shutdown times go to tests/output/guest_acpi_shutdown_lab.json.
"""

from __future__ import annotations

import json
import re
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
figures_opt_in = pytest.mark.opt_in("TANDEM_GUEST_FIGURES")

ACPI_VM = "acpi01"
ACPI_IP = "192.168.10.20"
ACPI_MAC = "52:54:00:0a:00:14"
ACPI_FIGURES = REPO / "tests" / "output" / "guest_acpi_shutdown_lab.json"
SHUTDOWN_TIMEOUT = 120             # TCG on a shared 2-core machine; on the host's QEMU it is < 1 s


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


def boot(lab, domain: dict, ip: str = IP) -> dict:
    """Define and start the domain; wait for its HTTP status. Returns the figures."""
    define(lab, PROD, domain)
    t0 = time.monotonic()
    proc = lab.attach(PROD, "virsh", "-q", "start", domain["name"], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started = time.monotonic() - t0
    st = None
    while time.monotonic() - t0 < HEALTHY_TIMEOUT:
        st = status(lab, PROD, ip)
        if st:
            break
        time.sleep(0.3)
    healthy = time.monotonic() - t0
    console = lab.attach(PROD, "cat", domain["console_log"]).stdout
    assert st, f"no HTTP status from {ip} within {HEALTHY_TIMEOUT}s; console:\n{console[-3000:]}"
    return {"status": st, "virsh_start_s": round(started, 2), "start_to_http_s": round(healthy, 2),
            "guest_uptime_at_http_s": float(st["uptime"])}


def wait_seq(lab, at_least: int, timeout: float = 120, ip: str = IP) -> dict:
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        st = status(lab, PROD, ip)
        if st and st["last_durable_seq"] is not None and st["last_durable_seq"] >= at_least:
            return st
        time.sleep(0.5)
    raise AssertionError(f"the guest did not reach record {at_least}: {st}")


def replica_records(lab, upto: int):
    return records(read_volume(lab, DR, REPLICA, upto + 8))


@figures_opt_in
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


@pytest.fixture
def acpi_guest(lab):
    """A lab guest on hv-a1 whose disk is a raw file served by qemu-nbd (over a Unix socket,
    as tandemd serves disks), without tandemd or site B."""
    image = build_image(lab, PROD)
    vmdir = f"{VM_DIR}/{ACPI_VM}"
    disk, sock, pid = f"{vmdir}/disk.raw", f"{vmdir}/nbd.sock", f"{vmdir}/nbd.pid"

    def start_nbd():
        proc = lab.attach(PROD, "sh", "-ec",
                          f"rm -f {sock}; qemu-nbd --fork --pid-file={pid} -f raw -x {ACPI_VM}/disk0 "
                          f"-t -k {sock} {disk}; chgrp libvirt-qemu {sock}; chmod 0660 {sock}")
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def stop_nbd():
        lab.attach(PROD, "sh", "-c", f"[ -s {pid} ] && kill $(cat {pid}) && sleep 1; rm -f {pid}")

    undefine(lab, PROD, ACPI_VM)
    stop_nbd()
    seed = {"instance_id": f"{ACPI_VM}-1", "hostname": ACPI_VM,
            "nics": [{"name": "eth0", "mac": ACPI_MAC, "addresses": [f"{ACPI_IP}/24"],
                      "gateway": "192.168.10.1", "dns": ["192.168.10.1"]}]}
    seed_img = write_seed(lab, PROD, ACPI_VM, seed)
    assert lab.attach(PROD, "sh", "-c", f"rm -f {disk} && truncate -s 16M {disk}").returncode == 0
    start_nbd()
    paths = image["hosts"][PROD]
    domain = {"name": ACPI_VM, "memory_mib": 128, "vcpus": 1, "kernel": paths["kernel"],
              "initrd": paths["initrd"], "cmdline": "console=ttyS0 quiet panic=-1 tdr.interval=0.5",
              "disks": [{"socket": sock, "export": f"{ACPI_VM}/disk0"}], "seed": seed_img,
              "nics": [{"bridge": "tdr-guest", "mac": ACPI_MAC}], "console_log": f"{vmdir}/console.log"}

    yield {"domain": domain, "disk": disk, "start_nbd": start_nbd, "stop_nbd": stop_nbd,
           "console": domain["console_log"]}
    undefine(lab, PROD, ACPI_VM)          # destroys it only if a failed test left it running
    stop_nbd()
    lab.attach(PROD, "rm", "-rf", vmdir)


def domstate(lab, name: str) -> str:
    return lab.attach(PROD, "virsh", "-q", "domstate", "--reason", name).stdout.strip()


def test_guest_shuts_down_cleanly_on_acpi_and_its_last_record_is_on_disk(lab, acpi_guest):
    domain = acpi_guest["domain"]
    boot(lab, domain, ip=ACPI_IP)
    acked = wait_seq(lab, 3, ip=ACPI_IP)["last_durable_seq"]

    # virsh shutdown = the ACPI power button. Wait for the guest to power off by itself.
    t0 = time.monotonic()
    proc = lab.attach(PROD, "virsh", "-q", "shutdown", ACPI_VM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    off = lab.wait_for(lambda: domstate(lab, ACPI_VM).startswith("shut off"), timeout=SHUTDOWN_TIMEOUT,
                       interval=0.5)
    seconds = round(time.monotonic() - t0, 2)
    console = lab.attach(PROD, "cat", acpi_guest["console"]).stdout
    assert off, (f"the guest ignored `virsh shutdown` for {SHUTDOWN_TIMEOUT} s "
                 f"({domstate(lab, ACPI_VM)}); console:\n{console[-3000:]}")
    assert domstate(lab, ACPI_VM) == "shut off (shutdown)"

    # The app stopped after a whole record; that record is the last one on the disk.
    assert "power button: shutting down" in console, console[-3000:]
    stopped = re.findall(r"tdr-app: stopped, last durable record (\d+)", console)
    assert stopped, console[-3000:]
    last = int(stopped[-1])
    assert last >= acked
    acpi_guest["stop_nbd"]()
    held = records(read_volume(lab, PROD, acpi_guest["disk"], last + 8))
    assert len(held) == last, f"the disk holds {len(held)} valid records, the app's last durable was {last}"
    figures = {"virsh_shutdown_to_shut_off_s": seconds, "records": last}

    # The same through the tandem_vm module (what the vm role's stop runs): graceful, no
    # destroy. force_off=false, so a guest that ignores ACPI fails here instead of being
    # powered off.
    acpi_guest["start_nbd"]()
    boot(lab, domain, ip=ACPI_IP)
    wait_seq(lab, last + 2, ip=ACPI_IP)
    proc = lab.ansible(PROD, "-m", "tandem.dr.tandem_vm", "-o", "-a",
                       f"name={ACPI_VM} state=shutoff shutdown_timeout={SHUTDOWN_TIMEOUT} force_off=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.split("=> ", 1)[1])
    assert result["actions"] == ["shutdown"] and result["stopped_by"] == "shutdown", result
    assert domstate(lab, ACPI_VM) == "shut off (shutdown)"
    figures["tandem_vm_shutdown_seconds"] = result["shutdown_seconds"]
    ACPI_FIGURES.parent.mkdir(parents=True, exist_ok=True)
    ACPI_FIGURES.write_text(json.dumps(figures, indent=2) + "\n")
