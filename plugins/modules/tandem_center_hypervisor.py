#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_center_hypervisor
short_description: A hypervisor in the tandem-center catalogue, and how the center reaches its engine
version_added: 0.1.0
description:
  - Makes the catalogue's hypervisor O(name) match the options, or removes it (O(state=absent)).
  - With O(engine_url) the center's monitor follows that tandemd over mutual TLS (its monitor
    endpoint, C(tandem_engine_monitor_listen)) and its RP schedules ask it for recovery points.
  - Reads the hypervisor, plans, stops in check mode, changes only what differs, then reads it
    again. Needs a token with the admin role (catalogue changes are audited by the center).
extends_documentation_fragment:
  - tandem.dr._attributes.CATALOGUE
  - tandem.dr._center
options:
  name:
    description:
      - The hypervisor's name. It must be the tandemd node name, which its certificate carries;
        the center checks the engine's certificate against it.
    type: str
    required: true
  site:
    description: Name of its site in the catalogue. Required with O(state=present).
    type: str
  address:
    description: Its host name or IP address. Required with O(state=present).
    type: str
  engine_url:
    description:
      - V(tls://HOST:PORT) of tandemd's monitor endpoint; omitted or empty, the engine is not
        followed.
    type: str
    default: ""
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Enrol hv-a1 and its engine
  tandem.dr.tandem_center_hypervisor:
    url: https://cp-vip.example:8443
    token: "{{ tandem_center_admin_token }}"
    name: hv-a1
    site: a
    address: 10.0.10.11
    engine_url: tls://10.0.10.11:7789
"""

RETURN = r"""
hypervisor:
  description: The hypervisor as the catalogue has it afterwards (in check mode, before); null when absent.
  returned: always
  type: dict
  sample: {"id": 1, "name": "hv-a1", "site_id": 1, "address": "10.0.10.11",
           "engine_url": "tls://10.0.10.11:7789"}
actions:
  description: What was (or, in check mode, would be) done.
  returned: always
  type: list
  elements: str
  sample: ["create hypervisor hv-a1"]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._center import (
    center_argument_spec,
    ensure_named,
    id_of,
)


def main():
    spec = center_argument_spec()
    spec.update(
        name={"type": "str", "required": True},
        site={"type": "str"},
        address={"type": "str"},
        engine_url={"type": "str", "default": ""},
        state={"type": "str", "choices": ["present", "absent"], "default": "present"},
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           required_if=[("state", "present", ("site", "address"))])
    p = module.params

    def want(center):
        return {"name": p["name"], "site_id": id_of(center.list_all("/sites"), "site", p["site"]),
                "address": p["address"], "engine_url": p["engine_url"] or None}

    ensure_named(module, "/hypervisors", "hypervisor", want)


if __name__ == "__main__":
    main()
