#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_center_plan_info
short_description: Recovery plans and network mappings from tandem-center
version_added: 0.1.0
description:
  - Returns the recovery plans of the center's catalogue (groups of VMs started in order),
    each with its network mapping, and the network mappings.
extends_documentation_fragment:
  - tandem.dr._attributes.INFO_MODULE
  - tandem.dr._center
options:
  names:
    description: Only these plans (and the mappings they use); all when empty.
      Names the catalogue does not have are listed in RV(missing).
    type: list
    elements: str
    default: []
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Plan web and its network mapping
  tandem.dr.tandem_center_plan_info:
    url: https://cp-vip.example:8480
    token: "{{ tandem_center_token }}"
    names: [web]
  register: center_plans
"""

RETURN = r"""
plans:
  description: The recovery plans by name; C(network_mapping) is the mapping's name or null.
  returned: always
  type: list
  elements: dict
  sample:
    - id: 1
      name: web
      network_mapping: dr-nets
      document:
        description: ""
        groups: [{name: data, vms: [db01], start_delay_s: 0, wait_for: running},
                 {name: front, vms: [web01], start_delay_s: 10, wait_for: running}]
network_mappings:
  description: The network mappings by name (with O(names), those the plans use).
  returned: always
  type: list
  elements: dict
  sample:
    - id: 1
      name: dr-nets
      document: {networks: [{source: br-a, target: br-b, target_cidr: 10.9.0.0/24}]}
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


def plans_and_mappings(center, names):
    plans = [p for p in center.list_all("/plans") if not names or p["name"] in names]
    mappings = {m["id"]: m for m in center.list_all("/network-mappings")}
    used = {p["network_mapping_id"] for p in plans}
    out = [{"id": p["id"], "name": p["name"], "document": p["document"],
            "network_mapping": mappings[p["network_mapping_id"]]["name"] if p["network_mapping_id"] else None}
           for p in sorted(plans, key=lambda p: p["name"])]
    maps = [{"id": m["id"], "name": m["name"], "document": m["document"]}
            for m in sorted(mappings.values(), key=lambda m: m["name"]) if not names or m["id"] in used]
    return out, maps, sorted(set(names) - {p["name"] for p in plans})


def main():
    spec = center_argument_spec()
    spec["names"] = {"type": "list", "elements": "str", "default": []}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    try:
        plans, mappings, missing = plans_and_mappings(Center(module), module.params["names"])
    except CenterError as e:
        module.fail_json(msg=e.message, **e.details())
    module.exit_json(changed=False, plans=plans, network_mappings=mappings, missing=missing)


if __name__ == "__main__":
    main()
