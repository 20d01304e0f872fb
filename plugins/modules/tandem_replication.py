#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_replication
short_description: Pause, resume, wait for or verify the replication of a tandemd resource
version_added: 0.1.0
description:
  - V(in_sync) changes nothing (never C(changed)). With O(wait=true) it waits until the resource is
    in sync (connected, every volume Established and UpToDate on both nodes, nothing out of sync);
    with O(wait=false) it only asserts that and fails otherwise.
  - V(paused) runs C(tandemctl disconnect) unless the resource is already StandAlone; the primary
    then tracks its writes in the bitmap.
  - V(resumed) runs C(tandemctl connect) unless the resource is already Connecting or Connected.
    It does not wait for the peer.
  - V(connected) is V(resumed), then (O(wait=true)) waits until the connection is Connected.
  - V(verified) runs C(tandemctl verify) (online block comparison with the peer; it takes as long as
    reading the volumes) and returns the out-of-sync bytes. With O(resync_on_mismatch=true) it runs
    C(tandemctl verify --resync), and with O(wait=true) then waits until in sync again.
    C(changed) only when a resync was started.
extends_documentation_fragment:
  - tandem.dr._attributes
  - tandem.dr._tandemctl
  - tandem.dr._wait
attributes:
  check_mode:
    support: full
    details:
      - V(verified) runs the read-only C(tandemctl verify) (without C(--resync)) in check mode too,
        and predicts a change when blocks differ and O(resync_on_mismatch=true).
  diff_mode:
    support: full
    details:
      - Before and after are the C(connection) state.
options:
  name:
    description: Resource name.
    type: str
    required: true
  state:
    description: See the description.
    type: str
    required: true
    choices: [in_sync, connected, paused, resumed, verified]
  resync_on_mismatch:
    description: With V(verified), resync the blocks that differ.
    type: bool
    default: false
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Wait until web01 is in sync (at most 10 minutes)
  tandem.dr.tandem_replication:
    name: web01
    state: in_sync
    wait_timeout: 600

- name: Assert it is in sync right now
  tandem.dr.tandem_replication:
    name: web01
    state: in_sync
    wait: false

- name: Pause replication for a drill
  tandem.dr.tandem_replication:
    name: web01
    state: paused

- name: Verify both copies and repair differences
  tandem.dr.tandem_replication:
    name: web01
    state: verified
    resync_on_mismatch: true
  register: verify
"""

RETURN = r"""
commands:
  description: The tandemctl write calls that ran (or would run, in check mode).
  returned: always
  type: list
  elements: list
  sample: [["tandemctl", "--socket", "/run/tandem/tandemd.sock", "disconnect", "web01", "--json"]]
resource:
  description: Status of the resource at the end (plus C(in_sync), C(out_of_sync_bytes)).
  returned: always
  type: dict
  sample: {"name": "web01", "connection": "Connected", "in_sync": true, "out_of_sync_bytes": 0}
waited_seconds:
  description: How long the module waited.
  returned: always
  type: float
  sample: 1.25
out_of_sync_bytes:
  description: With V(verified), the bytes verify found different on the two nodes.
  returned: when state is verified
  type: int
  sample: 0
resync_started:
  description: With V(verified), whether the differing blocks are being resynced.
  returned: when state is verified
  type: bool
  sample: false
verify:
  description:
    - With V(verified), the engine's verify report (checked and out-of-sync bytes per volume, ranges).
  returned: when state is verified
  type: dict
  sample: {"out_of_sync_bytes": 0, "resync_started": false,
           "volumes": [{"volume": 0, "checked_bytes": 16777216, "out_of_sync_bytes": 0, "ranges": [],
                        "seconds": 0.2}]}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils import _wait
from ansible_collections.tandem.dr.plugins.module_utils._errors import TandemctlError, WaitTimeout, fail
from ansible_collections.tandem.dr.plugins.module_utils._parse import (
    CONNECTED,
    CONNECTING,
    STANDALONE,
    describe_status,
    in_sync,
    normalize_status,
)
from ansible_collections.tandem.dr.plugins.module_utils._tandemctl import Tandemctl, argument_spec


def main():
    spec = argument_spec()
    spec.update(_wait.argument_spec())
    spec.update(name={"type": "str", "required": True},
                state={"type": "str", "required": True,
                       "choices": ["in_sync", "connected", "paused", "resumed", "verified"]},
                resync_on_mismatch={"type": "bool", "default": False})
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    p = module.params
    name, state = p["name"], p["state"]
    ctl = Tandemctl(module)
    result = {"changed": False, "commands": ctl.commands, "waited_seconds": 0.0}
    step = "status"

    def read():
        return normalize_status(ctl.read("status", name)["resources"][0])

    def wait(predicate, what):
        result["resource"], result["waited_seconds"] = _wait.wait_for(
            read, predicate, what, p["wait_timeout"], p["wait_interval"], describe=describe_status)

    try:
        status = result["resource"] = read()
        before = status["connection"]
        if state == "in_sync":
            step = "wait for in sync"
            if p["wait"]:
                wait(in_sync, f"resource {name} in sync")
            elif not status["in_sync"]:
                module.fail_json(msg=f"resource {name} is not in sync: {describe_status(status)}",
                                 **result)
        elif state == "paused":
            if before != STANDALONE:
                step = "disconnect"
                reply = ctl.write("disconnect", name)
                if reply is not None:
                    result["resource"] = normalize_status(reply["resource"])
        elif state in ("resumed", "connected"):
            if before == STANDALONE:
                step = "connect"
                reply = ctl.write("connect", name)
                if reply is not None:
                    result["resource"] = normalize_status(reply["resource"])
            if state == "connected" and p["wait"] and not module.check_mode:
                step = "wait for connected"
                wait(lambda s: s["connection"] == CONNECTED, f"resource {name} Connected")
        elif state == "verified":
            step = "verify"
            if module.check_mode:
                reply = ctl.read("verify", name)
                resync = bool(p["resync_on_mismatch"] and reply.get("out_of_sync_bytes"))
                if resync:
                    ctl.commands.append(ctl.argv("verify", name, resync=True))
            else:
                if p["resync_on_mismatch"]:
                    reply = ctl.write("verify", name, resync=True)
                else:
                    reply = ctl.read("verify", name)
                resync = bool(reply.get("resync_started"))
            result.update(verify={k: v for k, v in reply.items() if k != "ok"},
                          out_of_sync_bytes=reply.get("out_of_sync_bytes", 0), resync_started=resync)
            result["changed"] = resync
            if resync and p["wait"] and not module.check_mode:
                step = "wait for in sync after the resync"
                wait(in_sync, f"resource {name} in sync")
        if state in ("paused", "resumed", "connected"):
            result["changed"] = bool(ctl.commands)
            after = {"paused": STANDALONE}.get(state, CONNECTING if before == STANDALONE else before)
            if state == "connected" and result["resource"]["connection"] == CONNECTED:
                after = CONNECTED
            if module._diff:
                result["diff"] = {"before": {"connection": before}, "after": {"connection": after}}
    except TandemctlError as e:
        fail(module, step, name, e, **result)
    except WaitTimeout as e:
        result["resource"], result["waited_seconds"] = e.last, e.waited
        module.fail_json(msg=f"{step} of resource {name} failed: {e}", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
