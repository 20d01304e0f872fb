#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_center_policy
short_description: A protection policy in the tandem-center catalogue
version_added: 0.1.0
description:
  - Makes the catalogue's protection policy O(name) match the options, or removes it (O(state=absent)).
  - The center's alerts and RP schedules read the VMs' policy; see docs/center.md.
  - Reads the policy, plans, stops in check mode, changes only what differs, then reads it again.
    Needs a token with the admin role (catalogue changes are audited by the center).
extends_documentation_fragment:
  - tandem.dr._attributes.CATALOGUE
  - tandem.dr._center
options:
  name:
    description: The policy's name.
    type: str
    required: true
  rp_interval:
    description: Seconds between scheduled recovery points. Required with O(state=present).
    type: int
  rp_retention:
    description: Scheduled recovery points kept per VM.
    type: int
    default: 24
  sync_timeout:
    description: Seconds replication may stay degraded before the center raises an alert.
    type: int
    default: 300
  priority:
    description: Lower starts first where the center orders VMs (0-1000).
    type: int
    default: 100
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: A recovery point every 5 minutes, a day of them kept
  tandem.dr.tandem_center_policy:
    url: https://cp-vip.example:8443
    token: "{{ tandem_center_admin_token }}"
    name: gold
    rp_interval: 300
    rp_retention: 288
    sync_timeout: 120
"""

RETURN = r"""
policy:
  description: The policy as the catalogue has it afterwards (in check mode, before); null when absent.
  returned: always
  type: dict
  sample: {"id": 1, "name": "gold", "rp_interval_s": 300, "rp_retention": 288, "sync_timeout_s": 120,
           "priority": 100}
actions:
  description: What was (or, in check mode, would be) done.
  returned: always
  type: list
  elements: str
  sample: ["update policy gold"]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._center import center_argument_spec, ensure_named


def main():
    spec = center_argument_spec()
    spec.update(
        name={"type": "str", "required": True},
        rp_interval={"type": "int"},
        rp_retention={"type": "int", "default": 24},
        sync_timeout={"type": "int", "default": 300},
        priority={"type": "int", "default": 100},
        state={"type": "str", "choices": ["present", "absent"], "default": "present"},
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           required_if=[("state", "present", ("rp_interval",))])
    p = module.params
    ensure_named(module, "/policies", "policy", lambda center: {
        "name": p["name"], "rp_interval_s": p["rp_interval"], "rp_retention": p["rp_retention"],
        "sync_timeout_s": p["sync_timeout"], "priority": p["priority"]})


if __name__ == "__main__":
    main()
