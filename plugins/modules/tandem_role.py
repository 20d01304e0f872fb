#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_role
short_description: Promote or demote a tandemd resource on this node
version_added: 0.1.0
description:
  - Runs C(tandemctl primary) or C(tandemctl secondary) unless the resource already has the role.
  - With O(wait=true) waits until the status shows the role and, for V(primary), every local
    volume UpToDate.
  - The engine's refusals (the peer is Primary, Inconsistent data without O(force), writes in
    flight, ...) are passed through verbatim in C(msg).
extends_documentation_fragment:
  - tandem.dr._attributes
  - tandem.dr._tandemctl
  - tandem.dr._wait
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - Before and after are C(role) values.
options:
  name:
    description: Resource name.
    type: str
    required: true
  role:
    description: The role this node should have.
    type: str
    required: true
    choices: [primary, secondary]
  force:
    description:
      - Promote even without the peer (disaster failover) or with Inconsistent data
        (tandemctl C(primary --force)). Ignored for V(secondary) and when already Primary.
    type: bool
    default: false
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Fail over web01 to this site (the peer is gone)
  tandem.dr.tandem_role:
    name: web01
    role: primary
    force: true

- name: Demote before failback
  tandem.dr.tandem_role:
    name: web01
    role: secondary
"""

RETURN = r"""
commands:
  description: The tandemctl write calls that ran (or would run, in check mode).
  returned: always
  type: list
  elements: list
  sample: [["tandemctl", "--socket", "/run/tandem/tandemd.sock", "primary", "web01", "--json"]]
resource:
  description: Status of the resource after the change (plus C(in_sync), C(out_of_sync_bytes)).
  returned: always
  type: dict
  sample: {"name": "web01", "role": "Primary", "connection": "Connected", "in_sync": true}
waited_seconds:
  description: How long the module waited for the role.
  returned: always
  type: float
  sample: 0.0
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils import _wait
from ansible_collections.tandem.dr.plugins.module_utils._errors import TandemctlError, WaitTimeout, fail
from ansible_collections.tandem.dr.plugins.module_utils._parse import (
    UPTODATE,
    describe_status,
    normalize_status,
)
from ansible_collections.tandem.dr.plugins.module_utils._tandemctl import Tandemctl, argument_spec

ROLES = {"primary": "Primary", "secondary": "Secondary"}


def reached(role):
    def predicate(status):
        if status.get("role") != role:
            return False
        return role != "Primary" or all(v.get("disk") == UPTODATE for v in status.get("volumes") or [])
    return predicate


def main():
    spec = argument_spec()
    spec.update(_wait.argument_spec())
    spec.update(name={"type": "str", "required": True},
                role={"type": "str", "required": True, "choices": ["primary", "secondary"]},
                force={"type": "bool", "default": False})
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    p = module.params
    name, want = p["name"], ROLES[p["role"]]
    ctl = Tandemctl(module)
    result = {"changed": False, "commands": ctl.commands, "waited_seconds": 0.0}
    step = "status"

    def read():
        return normalize_status(ctl.read("status", name)["resources"][0])

    try:
        status = read()
        result["resource"] = status
        if module._diff:
            result["diff"] = {"before": {"role": status["role"]}, "after": {"role": want}}
        if status["role"] == want:
            module.exit_json(**result)
        step = p["role"]
        if want == "Primary":
            reply = ctl.write("primary", name, force=p["force"])
        else:
            reply = ctl.write("secondary", name)
        result["changed"] = True
        if reply is not None:
            result["resource"] = normalize_status(reply.get("resource")) or status
            if p["wait"]:
                step = f"wait for {p['role']}"
                what = f"role {want}" + (" with every volume UpToDate" if want == "Primary" else "")
                result["resource"], result["waited_seconds"] = _wait.wait_for(
                    read, reached(want), what, p["wait_timeout"], p["wait_interval"],
                    describe=describe_status)
    except TandemctlError as e:
        fail(module, step, name, e, **result)
    except WaitTimeout as e:
        result["resource"], result["waited_seconds"] = e.last, e.waited
        module.fail_json(msg=f"{step} of resource {name} failed: {e}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
