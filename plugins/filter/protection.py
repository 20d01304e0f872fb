# Copyright: Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that turn a protection-group file into a per-VM plan, and per-VM status into a table.

The playbooks (protect, failover, failback, status) validate their input with
`protection_plan` before they touch any host, so a typo in the group file fails
the run with every problem listed and nothing changed.
"""

from __future__ import annotations

import re

from ansible.errors import AnsibleFilterError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
SIZE_RE = re.compile(r"^\s*(\d+)\s*(K|M|G|T|KiB|MiB|GiB|TiB)?\s*$")
SIZE_UNITS = {None: 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
              "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
# nics: the VM's network interfaces at production, checked by network_plan (filter/network.py).
# domain: a VM that Tandem DR defines in libvirt (roles/vm's template input: memory_mib, vcpus,
# kernel, initrd, cmdline); convert: an existing libvirt domain whose disks are moved onto tandemd;
# seed_target: the target dev of a converted VM's NoCloud seed drive, rewritten on each start.
VM_KEYS = {"name", "production", "dr", "port", "protocol", "disks", "tunables", "nics", "domain", "convert",
           "seed_target"}
DISK_KEYS = {"size", "path", "export"}
DEFAULT_VOLUME_DIR = "/srv/tandem"
# A libvirt disk target dev: virtio, SCSI/SATA/USB, IDE or Xen names (vda, sdb, hdc, xvdaa ...).
TARGET_RE = re.compile(r"^(?:vd|sd|hd|xvd)[a-z]{1,3}$")
# The targets a converted VM's replicated disks keep, in volume order (filter/vms.py's vm_nbd_disks).
NBD_TARGETS = [f"vd{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


def _size(value, where, errors):
    """Bytes from an int or a size string, the engine's rules (binary units, 4 KiB multiple)."""
    if isinstance(value, bool):
        errors.append(f"{where}: size must be a number of bytes or a size string, got {value!r}")
        return None
    if isinstance(value, int):
        n = value
    else:
        m = SIZE_RE.match(str(value))
        if not m:
            errors.append(f"{where}: size {value!r} is not a size (e.g. 2GiB, 512M, 4096)")
            return None
        n = int(m.group(1)) * SIZE_UNITS[m.group(2)]
    if n <= 0 or n % 4096:
        errors.append(f"{where}: size must be a positive multiple of 4096 bytes, got {n}")
        return None
    return n


def _select(names, selection, errors):
    """The VMs a run acts on: all of them, or the named ones (a list or a comma string)."""
    if selection in (None, "", "all", []):
        return list(names)
    wanted = [s.strip() for s in selection.split(",")] if isinstance(selection, str) else list(selection)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        errors.append(f"vms: not in the protection group: {', '.join(map(str, unknown))}")
    return [n for n in names if n in wanted]


def _address(hostvars, host, port):
    hv = hostvars[host]
    addr = hv.get("tandem_replication_address") or hv.get("ansible_host") or host
    addr = str(addr)
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _check_seed_target(target, vm, n_volumes, where, errors):
    """seed_target names a converted VM's own seed drive: not one of its replicated disks."""
    if not vm.get("convert"):
        errors.append(f"{where}: seed_target is for a converted VM (convert: true); a VM with domain "
                      "gets its seed drive from Tandem DR")
    if not isinstance(target, str) or not TARGET_RE.match(target):
        errors.append(f"{where}: seed_target must be a disk target dev like sdb, hdc or vdc "
                      f"(matching {TARGET_RE.pattern}), got {target!r}")
    elif target in NBD_TARGETS[:n_volumes]:
        errors.append(f"{where}: seed_target {target} is the target of replicated disk "
                      f"{NBD_TARGETS.index(target)} (disks are vda, vdb, ... in order)")


def protection_plan(group, hostvars, hypervisors, selection=None):
    """Validate a protection group and return one normalised plan entry per selected VM.

    Each entry: name, production, dr, hosts, port, protocol, tunables, volumes
    (path, size in bytes, export), nodes ({name, address} for both hosts) and nics
    (as given, for network_plan).
    Raises AnsibleFilterError listing every problem found.
    """
    errors = []
    if not isinstance(group, dict):
        raise AnsibleFilterError("protection group: expected a mapping with 'name' and 'vms'")
    vms = group.get("vms")
    if not isinstance(vms, list) or not vms:
        raise AnsibleFilterError("protection group: 'vms' must be a non-empty list")
    hypervisors = list(hypervisors or [])
    plan, seen, ports = [], set(), {}
    for i, vm in enumerate(vms):
        where = f"vms[{i}]"
        if not isinstance(vm, dict):
            errors.append(f"{where}: expected a mapping")
            continue
        name = vm.get("name")
        where = f"vms[{i}] ({name})" if name else where
        unknown = sorted(set(vm) - VM_KEYS)
        if unknown:
            allowed = ", ".join(sorted(VM_KEYS))
            errors.append(f"{where}: unknown keys {', '.join(unknown)} (allowed: {allowed})")
        if not isinstance(name, str) or not NAME_RE.match(name):
            errors.append(f"{where}: name must match {NAME_RE.pattern}")
        elif name in seen:
            errors.append(f"{where}: VM {name} is listed twice")
        seen.add(name)
        hosts = []
        for key in ("production", "dr"):
            host = vm.get(key)
            if host not in hypervisors:
                errors.append(f"{where}: {key} host {host!r} is not in the hypervisors group")
            hosts.append(host)
        if hosts[0] == hosts[1] and hosts[0] is not None:
            errors.append(f"{where}: production and dr must be different hosts")
        port = vm.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            errors.append(f"{where}: port must be an integer 1-65535, got {port!r}")
        else:
            for host in hosts:
                other = ports.setdefault((host, port), name)
                if other != name:
                    errors.append(f"{where}: port {port} on {host} is already used by {other}")
        protocol = vm.get("protocol", "C")
        if protocol not in ("A", "C"):
            errors.append(f"{where}: protocol must be A or C, got {protocol!r}")
        tunables = vm.get("tunables") or {}
        if not isinstance(tunables, dict):
            errors.append(f"{where}: tunables must be a mapping")
            tunables = {}
        disks = vm.get("disks")
        volumes = []
        if not isinstance(disks, list) or not disks:
            errors.append(f"{where}: disks must be a non-empty list")
            disks = []
        for d, disk in enumerate(disks):
            dwhere = f"{where} disks[{d}]"
            if not isinstance(disk, dict):
                errors.append(f"{dwhere}: expected a mapping with 'size'")
                continue
            unknown = sorted(set(disk) - DISK_KEYS)
            if unknown:
                errors.append(f"{dwhere}: unknown keys {', '.join(unknown)}")
            size = _size(disk.get("size"), dwhere, errors)
            path = disk.get("path") or f"{DEFAULT_VOLUME_DIR}/{name}/disk{d}.img"
            if not str(path).startswith("/"):
                errors.append(f"{dwhere}: path must be absolute, got {path!r}")
            volumes.append({"path": str(path), "size": size,
                            "export": str(disk.get("export") or f"{name}/disk{d}")})
        if vm.get("domain") is not None and not isinstance(vm.get("domain"), dict):
            errors.append(f"{where}: domain must be a mapping (memory_mib, vcpus, kernel, initrd, cmdline)")
        if vm.get("domain") is not None and vm.get("convert"):
            errors.append(f"{where}: domain (a VM Tandem DR defines) and convert (an existing domain) "
                          "exclude each other")
        seed_target = vm.get("seed_target")
        if seed_target is not None:
            _check_seed_target(seed_target, vm, len(volumes), where, errors)
        if errors:
            continue
        plan.append({
            "name": name, "production": hosts[0], "dr": hosts[1], "hosts": hosts, "port": port,
            "protocol": protocol, "tunables": dict(tunables), "volumes": volumes,
            "nodes": [{"name": h, "address": _address(hostvars, h, port)} for h in hosts],
            # As given: network_plan (filter/network.py) checks them against the mapping.
            "nics": list(vm.get("nics") or []),
            **({"domain": dict(vm["domain"])} if isinstance(vm.get("domain"), dict) else {}),
            "convert": bool(vm.get("convert")),
            **({"seed_target": seed_target} if seed_target is not None else {}),
        })
    selected = _select([vm.get("name") for vm in vms if isinstance(vm, dict)], selection, errors)
    if errors:
        listing = "\n  ".join(errors)
        raise AnsibleFilterError(f"protection group: {len(errors)} problem(s):\n  {listing}")
    return [vm for vm in plan if vm["name"] in selected]


def _human(n):
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def replication_state(status):
    """One word for a resource's replication, from the normalised status of one node."""
    if not status:
        return "unknown"
    if status.get("degraded"):
        return "degraded"
    if status.get("in_sync"):
        return "in-sync"
    vols = status.get("volumes") or []
    syncing = [v for v in vols if v.get("replication") in ("SyncSource", "SyncTarget")]
    if syncing:
        pct = min(v.get("sync_percent", 0.0) for v in syncing)
        return f"syncing {pct}%"
    return str(status.get("connection", "unknown")).lower()


def _node_cell(status):
    if not status:
        return "unreachable"
    disks = sorted({v.get("disk", "?") for v in status.get("volumes") or []})
    return f"{status.get('role', '?')}/{','.join(disks) or '?'}"


def vm_table(rows):
    """A fixed-width text table (list of lines) from per-VM rows.

    A row: vm, production, dr, production_status, dr_status (normalised status dicts
    or None when the host did not answer), and optional note.
    """
    header = ("VM", "PRODUCTION", "DR", "STATE", "RPO EXPOSURE", "LAST RP", "NOTE")
    lines = []
    for row in rows:
        prod, dr = row.get("production_status"), row.get("dr_status")
        primary = next((s for s in (prod, dr) if s and s.get("role") == "Primary"), None)
        ref = primary or prod or dr
        rpo = (primary or {}).get("rpo") or {"bytes": 0, "seconds": 0}
        rps = [s.get("recovery_points") for s in (prod, dr) if s and s.get("recovery_points")]
        last = [r["last"] for r in rps if r.get("last")]
        last_rp = f"{min(rp['age_seconds'] for rp in last):.0f}s ago" if last else "none"
        lines.append((
            row["vm"], f"{row['production']} {_node_cell(prod)}", f"{row['dr']} {_node_cell(dr)}",
            replication_state(ref),
            f"{_human(rpo['bytes'])} / {rpo['seconds']}s" if primary else "-",
            last_rp, row.get("note", "")))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
            for line in [header, *lines]]


def status_rows(plan, hostvars, var="tandem_status", notes=None):
    """Rows for vm_table: each planned VM with the status its two hosts recorded in `var`
    (None for a host that did not answer or does not run the resource yet)."""
    notes = notes or {}
    rows = []
    for vm in plan:
        def status(host, vm=vm):
            recorded = hostvars[host].get(var) if host in hostvars else None
            return (recorded or {}).get(vm["name"])
        rows.append({"vm": vm["name"], "production": vm["production"], "dr": vm["dr"],
                     "production_status": status(vm["production"]), "dr_status": status(vm["dr"]),
                     "note": notes.get(vm["name"], "")})
    return rows


class FilterModule:
    def filters(self):
        return {"protection_plan": protection_plan, "vm_table": vm_table,
                "replication_state": replication_state, "status_rows": status_rows}
