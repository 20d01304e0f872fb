#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_recovery_point_info
short_description: List the recovery points of a tandemd resource
version_added: 0.1.0
description:
  - Returns C(tandemctl rp list --json) of one resource, oldest first, optionally filtered by labels.
extends_documentation_fragment:
  - tandem.dr._attributes.INFO_MODULE
  - tandem.dr._tandemctl
options:
  resource:
    description: Resource name.
    type: str
    required: true
  labels:
    description: Only RPs that carry all these labels with these values.
    type: dict
  consistent:
    description: Only consistent (V(true)) or only inconsistent (V(false)) RPs.
    type: bool
seealso:
  - module: tandem.dr.tandem_recovery_point
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Consistent RPs of web01
  tandem.dr.tandem_recovery_point_info:
    resource: web01
    consistent: true
  register: rps

- name: The newest one
  ansible.builtin.debug:
    msg: "{{ rps.recovery_points | last }}"
"""

RETURN = r"""
recovery_points:
  description: The RPs, oldest first, as C(tandemctl rp list --json) prints them.
  returned: always
  type: list
  elements: dict
  sample: [{"id": "rp-20261129-101500-1", "reason": "manual", "created": 1795860900.1, "node": "hv-b1",
            "role": "Secondary", "consistent": true, "generations": ["0123456789ABCDEF"],
            "labels": {"name": "x"}, "age_seconds": 12.5, "bytes_used": 0, "storage": ["delta"],
            "exported": [], "clones": []}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._errors import TandemctlError, fail
from ansible_collections.tandem.dr.plugins.module_utils._tandemctl import Tandemctl, argument_spec


def main():
    spec = argument_spec()
    spec.update(resource={"type": "str", "required": True}, labels={"type": "dict"},
                consistent={"type": "bool"})
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    p = module.params
    ctl = Tandemctl(module)
    try:
        rps = ctl.read("rp_list", p["resource"])["recovery_points"]
    except TandemctlError as e:
        fail(module, "rp list", p["resource"], e)
    want = dict((k, str(v)) for k, v in (p["labels"] or {}).items())
    rps = [m for m in rps
           if all((m.get("labels") or {}).get(k) == v for k, v in want.items())
           and (p["consistent"] is None or bool(m.get("consistent")) == p["consistent"])]
    module.exit_json(changed=False, recovery_points=rps)


if __name__ == "__main__":
    main()
