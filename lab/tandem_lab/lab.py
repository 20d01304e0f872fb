"""Bring the lab up, take it down, and report what is there.

`up` is idempotent: it creates what is missing, recreates what is out of
date and leaves everything else (including active faults) alone. `down`
removes every container, bridge, nft table, mount and process `up` made,
and restores the sysctl it changed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

from . import faults, guest, image, network, render
from .containers import Containers, lxc_monitor_pids
from .paths import Paths
from .system import out, run, step, warn
from .topology import Topology

REQUIRED_COMMANDS = ("lxc-start", "debootstrap", "nft", "ip", "tc", "ssh-keygen")
DEFAULT_XFS_SIZE = "20G"


def preflight() -> None:
    if os.geteuid() != 0:
        raise SystemExit("the lab needs root (it creates bridges, nft tables and containers)")
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    if missing:
        raise SystemExit(
            f"missing commands: {', '.join(missing)}. Install them with\n"
            "  apt-get install -y -o DPkg::Lock::Timeout=600 lxc debootstrap nftables iproute2 "
            "openssh-client xfsprogs\n(`make lab-up` does this for you)")


def _load_machine_state(paths: Paths) -> dict:
    try:
        return json.loads(paths.machine_state.read_text())
    except FileNotFoundError:
        return {}


def _save_machine_state(paths: Paths, data: dict) -> None:
    paths.machine_state.parent.mkdir(parents=True, exist_ok=True)
    paths.machine_state.write_text(json.dumps(data, indent=2) + "\n")


def up(topo: Topology, paths: Paths, data_fs: str = "dir") -> dict:
    preflight()
    t0 = time.monotonic()
    paths.state.mkdir(parents=True, exist_ok=True)
    machine = _load_machine_state(paths)
    machine.setdefault("ip_forward_before", network.ip_forward())
    _save_machine_state(paths, machine)

    rootfs = image.ensure_rootfs(paths)
    authorized_key = _ensure_ssh_key(paths)
    data_root = _ensure_data(paths, machine, data_fs)
    _save_machine_state(paths, machine)

    network.ensure_bridges(topo)
    network.set_ip_forward("1")
    network.ensure_tables(topo)

    lxc = Containers(paths)
    for name in set(lxc.names()) - set(topo.hosts):
        step(f"{name}: no longer in the topology, removing")
        lxc.destroy(name)
    created = []
    for host in topo.hosts.values():
        data_dir = None
        if host.hypervisor:
            data_dir = str(data_root / host.name)
            os.makedirs(data_dir, exist_ok=True)
        if lxc.ensure(topo, host, rootfs, data_dir, authorized_key):
            created.append(host.name)
    if created:
        step(f"created containers: {', '.join(created)}")
    t_start = time.monotonic()
    for host in topo.hosts.values():
        lxc.start(host.name)
    boot = lxc.wait_booted(list(topo.hosts))
    step(f"all {len(boot)} hosts running (slowest {max(boot.values()):.1f}s after start)")
    boot_s = time.monotonic() - t_start

    _write_known_hosts(topo, paths, lxc)
    _wait_ssh(topo)
    guest.ensure_networks(topo, paths)
    _write_inventory(topo, paths)
    image.prune(paths, keep={rootfs})
    total = time.monotonic() - t0
    step(f"lab is up in {total:.1f}s; inventory: {paths.inventory}")
    return {"seconds": round(total, 1), "boot_seconds": round(boot_s, 1), "created": created}


def down(topo: Topology, paths: Paths) -> None:
    preflight()
    lxc = Containers(paths)
    names = sorted(set(lxc.names()) | {h for h in topo.hosts if paths.container(h).exists()})
    for name in names:
        lxc.destroy(name)
        step(f"{name}: destroyed")
    faults.clear_tc(topo)
    network.remove_tables()
    network.remove_bridges(topo)
    machine = _load_machine_state(paths)
    if "ip_forward_before" in machine:
        network.set_ip_forward(machine["ip_forward_before"])
    _remove_data(paths, machine)
    leftovers = lxc_monitor_pids(str(paths.lxcpath))
    if leftovers:
        warn(f"killing leftover LXC processes: {leftovers}")
        for pid in leftovers:
            run(["kill", "-9", str(pid)], check=False)
    if paths.state.exists():
        shutil.rmtree(paths.state)
    if paths.inventory.exists():
        paths.inventory.unlink()
    step("lab is down")


def status(topo: Topology, paths: Paths) -> dict:
    lxc = Containers(paths)
    hosts = {}
    for h in topo.hosts.values():
        hosts[h.name] = {
            "state": lxc.state(h.name),
            "site": h.site,
            "address": str(h.address),
            "groups": list(h.groups),
            "memory": lxc.memory(h.name) if lxc.state(h.name) != "ABSENT" else None,
        }
    return {
        "hosts": hosts,
        "bridges": {b: network.bridge_exists(b) for b in topo.bridges()},
        "nft_tables": {f"{f} {n}": network.table_exists(f, n) for f, n in network.TABLES},
        "image": image.image_key(),
        "data_fs": _load_machine_state(paths).get("data_fs"),
        "faults": faults.active(topo, paths),
        "inventory": str(paths.inventory) if paths.inventory.exists() else None,
    }


# -- helpers ---------------------------------------------------------------

def _ensure_ssh_key(paths: Paths) -> str:
    key = paths.ssh_key
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tandem-lab", "-f", key])
        step(f"lab ssh key created: {key}")
    return key.with_suffix(".pub").read_text()


def _ensure_data(paths: Paths, machine: dict, data_fs: str):
    """Per-hypervisor data directories, on the host, bind-mounted into the hosts.

    With data_fs="xfs" they live on an XFS filesystem (reflink=1) on a loop
    device, so recovery points can use reflink copies.
    """
    current = machine.get("data_fs")
    if current and current != data_fs:
        warn(f"the lab's data filesystem is {current}; keeping it (run `lab down` to change)")
        data_fs = current
    machine["data_fs"] = data_fs
    paths.data.mkdir(parents=True, exist_ok=True)
    if data_fs == "xfs" and not os.path.ismount(paths.data):
        if not paths.data_image.exists():
            run(["truncate", "-s", DEFAULT_XFS_SIZE, paths.data_image])
            run(["mkfs.xfs", "-q", "-m", "reflink=1", paths.data_image])
        run(["mount", "-o", "loop", paths.data_image, paths.data])
        step(f"data directories on XFS (reflink) at {paths.data}")
    return paths.data


def _remove_data(paths: Paths, machine: dict) -> None:
    if os.path.ismount(paths.data):
        src = out(["findmnt", "-n", "-o", "SOURCE", paths.data]).strip()
        run(["umount", paths.data])
        if src.startswith("/dev/loop"):
            run(["losetup", "-d", src], check=False)
        step("data filesystem unmounted")


def _write_known_hosts(topo: Topology, paths: Paths, lxc: Containers) -> None:
    # Host keys are read through lxc-attach (a trusted channel), so ssh can
    # check them strictly instead of trusting on first use.
    lines = []
    for h in topo.hosts.values():
        names = ",".join([h.name] + [str(n.address) for n in h.nics])
        lines.append(f"{names} {lxc.host_key(h.name)}")
    paths.known_hosts.write_text("\n".join(lines) + "\n")


def _wait_ssh(topo: Topology, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for h in topo.hosts.values():
        while True:
            try:
                with socket.create_connection((str(h.address), 22), timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{h.name}: sshd not reachable at {h.address}:22") from None
                time.sleep(0.3)


def _write_inventory(topo: Topology, paths: Paths) -> None:
    inv = render.inventory(topo, str(paths.ssh_key), str(paths.known_hosts))
    paths.inventory.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {render.GENERATED}\n"
              "# Regenerated by `make lab-up`; removed by `make lab-down`.\n")
    paths.inventory.write_text(header + render.to_yaml(inv) + "\n")
