#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_center_vm_info
short_description: The protected-VM inventory of tandem-center
version_added: 0.1.0
description:
  - Returns the protected VMs of the center's catalogue, each with its sites, hypervisor,
    protection policy, replicated volumes and the recovery plans that start it.
extends_documentation_fragment:
  - tandem.dr._attributes.INFO_MODULE
  - tandem.dr._center
options:
  names:
    description: Only these VMs; all when empty. Names the catalogue does not have are listed in RV(missing).
    type: list
    elements: str
    default: []
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: The protected VMs
  tandem.dr.tandem_center_vm_info:
    url: https://cp-vip.example:8480
    token: "{{ tandem_center_token }}"
  register: protected

- name: Their names by production site
  ansible.builtin.debug:
    msg: "{{ protected.vms | groupby('production_site') }}"
"""

RETURN = r"""
vms:
  description: The protected VMs, by name.
  returned: always
  type: list
  elements: dict
  sample:
    - id: 3
      name: web01
      production_site: site-a
      dr_site: site-b
      hypervisor: {name: hv-a1, address: 10.0.0.11, site: site-a}
      policy: {name: gold, rp_interval_s: 300, rp_retention: 24, sync_timeout_s: 60, priority: 100}
      volumes: [{resource: web01, volume: 0, target_dev: vda, size_bytes: 1073741824}]
      plans: [web]
missing:
  description: Names asked for in O(names) that the catalogue does not have.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._center import (
    Center,
    CenterError,
    center_argument_spec,
)

POLICY_FIELDS = ("name", "rp_interval_s", "rp_retention", "sync_timeout_s", "priority")
VOLUME_FIELDS = ("resource", "volume", "target_dev", "size_bytes")


def inventory(center, names):
    """(vms, missing): the catalogue's VMs joined with their sites, hypervisor, policy, volumes, plans."""
    vms = [v for v in center.list_all("/vms") if not names or v["name"] in names]
    sites = {s["id"]: s["name"] for s in center.list_all("/sites")}
    hypervisors = {h["id"]: h for h in center.list_all("/hypervisors")}
    policies = {p["id"]: p for p in center.list_all("/policies")}
    volumes = {}
    for vol in center.list_all("/volumes"):
        volumes.setdefault(vol["vm_id"], []).append({k: vol[k] for k in VOLUME_FIELDS})
    plans = {}
    for plan in center.list_all("/plans"):
        for group in plan["document"]["groups"]:
            for vm in group["vms"]:
                plans.setdefault(vm, []).append(plan["name"])
    out = []
    for vm in sorted(vms, key=lambda v: v["name"]):
        hv = hypervisors.get(vm["hypervisor_id"])
        out.append({
            "id": vm["id"], "name": vm["name"],
            "production_site": sites.get(vm["production_site_id"]), "dr_site": sites.get(vm["dr_site_id"]),
            "hypervisor": {"name": hv["name"], "address": hv["address"], "site": sites.get(hv["site_id"])}
            if hv else None,
            "policy": {k: policies[vm["policy_id"]][k] for k in POLICY_FIELDS},
            "volumes": sorted(volumes.get(vm["id"], []), key=lambda v: (v["resource"], v["volume"])),
            "plans": sorted(plans.get(vm["name"], [])),
        })
    missing = sorted(set(names) - {v["name"] for v in vms})
    return out, missing


def main():
    spec = center_argument_spec()
    spec["names"] = {"type": "list", "elements": "str", "default": []}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    try:
        vms, missing = inventory(Center(module), module.params["names"])
    except CenterError as e:
        module.fail_json(msg=e.message, **e.details())
    module.exit_json(changed=False, vms=vms, missing=missing)


if __name__ == "__main__":
    main()
