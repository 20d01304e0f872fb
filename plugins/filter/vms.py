# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""From a protected VM (the protection_plan filter) and its NICs on one side of the network
mapping (a NIC's `source` or `target` from the network_plan filter) to what the tandem.dr.vm
role gives libvirt and the guest: the domain template's input, the interfaces tandem_vm sets,
the NBD disks, and the NoCloud seed."""

from __future__ import annotations

from ansible.errors import AnsibleFilterError

from ansible_collections.tandem.dr.plugins.filter.network import generated_mac
from ansible_collections.tandem.dr.plugins.filter.protection import NBD_TARGETS as TARGETS
from ansible_collections.tandem.dr.plugins.module_utils import _domain_xml as dx


def _interface(nic, where):
    iface = (nic or {}).get("interface") or {}
    kind, source = iface.get("type"), iface.get("source")
    if kind not in ("network", "bridge") or not source:
        raise AnsibleFilterError(f"{where}: expected a NIC side of network_plan with interface "
                                 f"{{type: network|bridge, source}}, got {nic!r}")
    out = {kind: source}
    if iface.get("vlan") is not None:
        out["vlan"] = int(iface["vlan"])
    return out


def vm_interfaces(site_nics):
    """tandem_vm's `interfaces`: per NIC, in order, its network or bridge, VLAN and MAC."""
    out = []
    for i, nic in enumerate(site_nics or []):
        entry = _interface(nic, f"nic {i}")
        if nic.get("mac"):
            entry["mac"] = str(nic["mac"]).lower()
        out.append(entry)
    return out


def vm_nbd_disks(vm, socket_dir="/run/tandem", exports=None):
    """tandem_vm's `nbd_disks`: vda, vdb, ... on the VM's tandemd socket. `exports` replaces the
    volumes' export names (e.g. a drill clone's `<export>@clone-<name>`)."""
    names = exports or [v["export"] for v in vm["volumes"]]
    socket = f"{socket_dir}/{vm['name']}.nbd"
    return [{"target": TARGETS[i], "socket": socket, "export": e} for i, e in enumerate(names)]


def vm_seed_file_disks(vm, vm_dir="/var/lib/tandem-vms", name=None):
    """tandem_vm's `file_disks` for a converted VM with a `seed_target`: that drive on the seed
    image the role writes for the domain `name` (the VM's, or a drill copy's own); else []."""
    if not vm.get("seed_target"):
        return []
    return [{"target": vm["seed_target"], "path": f"{vm_dir}/{name or vm['name']}/seed.img"}]


def vm_convert_problems(vm, domain_xml, socket_dir="/run/tandem"):
    """Why an existing domain (its persistent XML, from tandem_vm_info) cannot be converted in
    place for `vm`, one line per problem; [] when it can. Each volume's disk (vda, vdb, ...) must
    be on the volume's path (or already on its tandemd export), and every other drive with a
    source must be the VM's `seed_target`: anything else would be missing at the DR site."""
    if not domain_xml:
        return [f"no libvirt domain {vm['name']} is defined on this host"]
    try:
        root = dx.parse(domain_xml)
    except dx.DomainXMLError as e:
        raise AnsibleFilterError(f"VM {vm['name']}: its definition: {e}") from None
    replicated = [{**disk, "path": vol["path"]}
                  for disk, vol in zip(vm_nbd_disks(vm, socket_dir), vm["volumes"], strict=True)]
    return dx.convert_problems(root, replicated, vm.get("seed_target"))


def vm_center_volumes(vm):
    """tandem_center_vm's `volumes`: the VM's tandemd resource (its name), volume by volume,
    with the guest target vm_nbd_disks gives it and its size in bytes."""
    return [{"resource": vm["name"], "volume": i, "target_dev": TARGETS[i], "size_bytes": int(v["size"])}
            for i, v in enumerate(vm["volumes"])]


def vm_domain(vm, site_nics, vm_dir="/var/lib/tandem-vms", socket_dir="/run/tandem", name=None,
              exports=None):
    """The input of the role's libvirt-domain.xml.j2 for a VM that Tandem DR defines (it has a
    `domain` in the protection group): hardware from there, disks on tandemd, the seed drive,
    NICs on this side of the mapping. `name`: the domain name (a drill copy's differs)."""
    spec = vm.get("domain")
    if not isinstance(spec, dict):
        raise AnsibleFilterError(f"VM {vm.get('name')}: no 'domain' in the protection group; "
                                 "an existing libvirt domain is converted instead")
    name = name or vm["name"]
    return {**spec, "name": name,
            "disks": [{"socket": d["socket"], "export": d["export"]}
                      for d in vm_nbd_disks(vm, socket_dir, exports)],
            "seed": f"{vm_dir}/{name}/seed.img", "console_log": f"{vm_dir}/{name}/console.log",
            "nics": vm_interfaces(site_nics)}


def vm_seed(vm, site_nics, name=None):
    """The NoCloud seed of the role's seed templates: instance id and hostname, and per NIC its
    static address, gateway and DNS on this side of the mapping (DHCP NICs are left out)."""
    name = name or vm["name"]
    nics = []
    for i, nic in enumerate(site_nics or []):
        if not nic.get("ip"):
            continue
        entry = {"name": f"eth{i}", "addresses": [f"{nic['ip']}/{nic['prefix']}"],
                 "gateway": str(nic["gateway"]) if nic.get("gateway") else None,
                 "dns": [str(d) for d in nic.get("dns") or []]}
        if nic.get("mac"):
            entry["mac"] = str(nic["mac"]).lower()
        nics.append(entry)
    return {"instance_id": name, "hostname": vm["name"], "nics": nics}


def vm_address(site_nics):
    """The VM's first static address on this side (what health checks use), or None."""
    for nic in site_nics or []:
        if nic.get("ip"):
            return str(nic["ip"])
    return None


def vm_drill_nics(vms, network_plan, bridge, drill="drill"):
    """Per VM name, its DR-side NICs moved onto a drill's isolated bridge: the DR addresses
    (the drill proves the failover would work), no VLAN, and a MAC of its own per drill, so the
    copy is never mistaken for the VM on any network (52:54:00 + sha256 of vm/nic/drill)."""
    out = {}
    for vm in vms:
        nics = (network_plan.get(vm["name"]) or {}).get("nics") or []
        out[vm["name"]] = [{**n["target"], "interface": {"type": "bridge", "source": bridge, "vlan": None},
                            "mac": generated_mac(vm["name"], i, drill)} for i, n in enumerate(nics)]
    return out


def vm_drill_probe_addresses(drill_nics, names):
    """The drill probe's addresses (GATEWAY/PREFIX, unique, in order) on the isolated network of
    the VMs `names`: each DR subnet's gateway, the address those VMs would route through."""
    out = []
    for name in names:
        for nic in drill_nics.get(name) or []:
            if nic.get("gateway"):
                address = f"{nic['gateway']}/{nic['prefix']}"
                if address not in out:
                    out.append(address)
    return out


def vm_drill_exports(vms, drill="drill"):
    """Per VM name, the export names of a drill clone of its volumes (tandemd serves a clone
    NAME of export E as E@clone-NAME)."""
    return {vm["name"]: [f"{v['export']}@clone-{drill}" for v in vm["volumes"]] for vm in vms}


def vm_run_specs(vms, network_plan, recovery_plan, to, name_suffix="", exports=None, nics_override=None,
                 health_netns=None, recovery_points=None):
    """Per VM of a recovery-plan run, what playbooks/tasks/run_plan.yml and vm_start.yml need:
    the host it starts on at site `to` (production or dr), the host its health check runs
    from, its address there (and before), and the vm role's inputs.

    network_plan: {name: network_plan entry for a failover}; `to`=dr takes each NIC's target,
    `to`=production its source. name_suffix: a drill copy's domain name suffix; exports:
    {name: [export names]} for a drill's clones; nics_override: {name: [site nics]} (a drill's
    isolated network); health_netns: the network namespace health checks run in (a drill's
    probe on its isolated network); recovery_points: {name: {id, age_seconds}}, the RP each VM
    starts from (a drill's clone; a failover that rolled back), for the report's achieved RPO."""
    if to not in ("production", "dr"):
        raise AnsibleFilterError(f"vm_run_specs: to must be production or dr, got {to!r}")
    back = "source" if to == "dr" else "target"
    here = "target" if to == "dr" else "source"
    specs = {}
    for vm in vms:
        name = vm["name"]
        nics = (network_plan.get(name) or {}).get("nics") or []
        site_nics = (nics_override or {}).get(name) or [n[here] for n in nics]
        check = (recovery_plan["vms"].get(name) or {}).get("health_check") or {"type": "none"}
        health_host = vm[to]
        if check.get("type") == "ping":
            health_host = check["from"][to]
        specs[name] = {"host": vm[to], "health_host": health_host, "vm": vm, "nics": site_nics,
                       "address": vm_address(site_nics), "ip_before": vm_address([n[back] for n in nics]),
                       "domain_name": name + name_suffix,
                       "exports": (exports or {}).get(name), "health_netns": health_netns,
                       "recovery_point": (recovery_points or {}).get(name)}
    return specs


class FilterModule:
    def filters(self):
        return {"vm_interfaces": vm_interfaces, "vm_nbd_disks": vm_nbd_disks,
                "vm_center_volumes": vm_center_volumes, "vm_domain": vm_domain,
                "vm_seed": vm_seed, "vm_address": vm_address, "vm_run_specs": vm_run_specs,
                "vm_drill_nics": vm_drill_nics, "vm_drill_exports": vm_drill_exports,
                "vm_drill_probe_addresses": vm_drill_probe_addresses,
                "vm_seed_file_disks": vm_seed_file_disks, "vm_convert_problems": vm_convert_problems}
