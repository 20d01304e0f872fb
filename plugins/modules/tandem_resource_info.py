#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_resource_info
short_description: Status of tandemd resources
version_added: 0.1.0
description:
  - Returns C(tandemctl status --json) for one or all resources of the node, each with C(in_sync)
    added (connected, every volume Established and UpToDate on both nodes, nothing out of sync).
extends_documentation_fragment:
  - tandem.dr._attributes.INFO_MODULE
  - tandem.dr._tandemctl
options:
  name:
    description: Only this resource. A resource that does not run on the node gives an empty list.
    type: str
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Status of every resource
  tandem.dr.tandem_resource_info:
  register: tandem

- name: Is web01 in sync?
  tandem.dr.tandem_resource_info:
    name: web01
  register: web01
  failed_when: not web01.resources[0].in_sync
"""

RETURN = r"""
resources:
  description:
    - One entry per resource, as C(tandemctl status --json) plus C(in_sync) and
      C(out_of_sync_bytes) (all volumes).
  returned: always
  type: list
  elements: dict
  sample: [{"name": "web01", "role": "Primary", "connection": "Connected", "peer": "hv-b1",
            "peer_role": "Secondary", "protocol": "C", "in_sync": true, "out_of_sync_bytes": 0,
            "volumes": [{"volume": 0, "disk": "UpToDate", "peer_disk": "UpToDate",
                         "replication": "Established", "out_of_sync_bytes": 0}]}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._errors import TandemctlError, fail
from ansible_collections.tandem.dr.plugins.module_utils._parse import normalize_status
from ansible_collections.tandem.dr.plugins.module_utils._tandemctl import (
    Tandemctl,
    argument_spec,
    is_missing_resource,
)


def main():
    spec = argument_spec()
    spec["name"] = {"type": "str"}
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    ctl = Tandemctl(module)
    name = module.params["name"]
    try:
        reply = ctl.read("status", name)
    except TandemctlError as e:
        if name and is_missing_resource(e):
            module.exit_json(changed=False, resources=[])
        fail(module, "status", name or "(all)", e)
    module.exit_json(changed=False, resources=[normalize_status(r) for r in reply.get("resources") or []])


if __name__ == "__main__":
    main()
