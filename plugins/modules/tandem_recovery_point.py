#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_recovery_point
short_description: Create, delete, export, clone or restore recovery points of a tandemd resource
version_added: 0.1.0
description:
  - A recovery point (RP) is a crash-consistent image of every volume of a resource, kept on the node
    that takes it (see docs/engine.md, Recovery points). RPs are identified by O(id), or by the
    label C(name) (O(name) with V(present) and V(absent)).
  - V(present) takes an RP (C(tandemctl rp create)) with O(labels). With O(name) (or a C(name) key
    in O(labels))
    nothing is done when an RP with that C(name) label exists already; without a name every run
    creates a new RP.
  - V(absent) deletes the RP O(id) (or the one labelled O(name)); a missing RP is no change.
  - V(exported) serves the RP read-only over NBD (C(<export>@<id>) per volume); already exported is no
    change. V(unexported) stops that; not exported is no change.
  - V(cloned) makes a writable copy for a drill, named O(clone), served as C(<export>@clone-<clone>);
    an existing clone of that name is no change. V(uncloned) deletes the clone O(clone); a missing clone
    is no change.
  - V(labelled) sets O(labels) on the RP (an empty value removes a label), e.g. C(tested) after a
    drill; labels it has already are no change. The image never changes.
  - V(restored) rolls this node back to the RP (C(tandemctl rp restore); only on a StandAlone
    Secondary, the engine refuses otherwise). It is always a change, since the volumes are
    rewritten to the RP whatever they hold (except in check mode, where nothing runs).
  - To list RPs use M(tandem.dr.tandem_recovery_point_info).
extends_documentation_fragment:
  - tandem.dr._attributes
  - tandem.dr._tandemctl
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
options:
  resource:
    description: Resource name.
    type: str
    required: true
  state:
    description: See the description.
    type: str
    choices: [present, absent, exported, unexported, cloned, uncloned, restored, labelled]
    default: present
  id:
    description:
      - The RP. V(latest) means the newest consistent RP. Required with V(exported), V(unexported),
        V(cloned) and V(restored) unless O(name) names it; with V(absent) O(id) or O(name).
    type: str
  name:
    description:
      - The RP whose C(name) label is this. With V(present) it is added to the labels.
    type: str
  labels:
    description: Labels of a new RP (V(present)), or to set (V(labelled)); strings.
    type: dict
  clone:
    description: Clone name, with V(cloned) and V(uncloned).
    type: str
  nbd_socket:
    description:
      - NBD socket of the resource, for the C(exports) URIs when the engine does not report it
        (an RP that was exported before). Default C(<directory of socket>/<resource>.nbd), the
        engine's default.
    type: path
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Take a named RP before the drill (once)
  tandem.dr.tandem_recovery_point:
    resource: web01
    name: before-drill-2026-11
    labels:
      ticket: CHG-1234

- name: Writable clone of the newest consistent RP for the drill VM
  tandem.dr.tandem_recovery_point:
    resource: web01
    state: cloned
    id: latest
    clone: drill
  register: clone

- name: Drop the clone afterwards
  tandem.dr.tandem_recovery_point:
    resource: web01
    state: uncloned
    clone: drill
"""

RETURN = r"""
commands:
  description: The tandemctl write calls that ran (or would run, in check mode).
  returned: always
  type: list
  elements: list
  sample: [["tandemctl", "--socket", "/run/tandem/tandemd.sock", "rp", "create", "web01",
            "--label", "name=x", "--json"]]
recovery_point:
  description: The RP acted on, as in C(tandemctl rp list --json); null when it does not exist (any more).
  returned: always
  type: dict
  sample: {"id": "rp-20261129-101500-1", "reason": "manual", "consistent": true, "labels": {"name": "x"},
           "exported": [], "clones": []}
exports:
  description: NBD URIs of the exported RP or the clone, one per volume.
  returned: when state is exported or cloned
  type: list
  elements: str
  sample: ["nbd+unix:///web01/disk0@clone-drill?socket=/run/tandem/web01.nbd"]
restored_bytes:
  description: With V(restored), the bytes rewritten.
  returned: when state is restored and not in check mode
  type: int
  sample: 1048576
resource_status:
  description: With V(restored), the resource status afterwards (plus C(in_sync), C(out_of_sync_bytes)).
  returned: when state is restored and not in check mode
  type: dict
  sample: {"name": "web01", "role": "Secondary", "connection": "StandAlone"}
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._errors import TandemctlError, fail
from ansible_collections.tandem.dr.plugins.module_utils._parse import normalize_status
from ansible_collections.tandem.dr.plugins.module_utils._tandemctl import Tandemctl, argument_spec

NEEDS_RP = ("exported", "unexported", "cloned", "restored", "labelled")


def uris(names, socket):
    return [f"nbd+unix:///{n}?socket={socket}" for n in names]


def find(rps, rp_id=None, name=None):
    if rp_id == "latest":
        consistent = [m for m in rps if m.get("consistent")]
        return consistent[-1] if consistent else None
    for m in rps:
        if (rp_id is not None and m.get("id") == rp_id) or \
                (rp_id is None and name is not None and (m.get("labels") or {}).get("name") == name):
            return m
    return None


def main():
    spec = argument_spec()
    spec.update(resource={"type": "str", "required": True},
                state={"type": "str", "default": "present",
                       "choices": ["present", "absent", "exported", "unexported", "cloned", "uncloned",
                                   "restored", "labelled"]},
                id={"type": "str"}, name={"type": "str"}, labels={"type": "dict"},
                clone={"type": "str"}, nbd_socket={"type": "path"})
    module = AnsibleModule(
        argument_spec=spec, supports_check_mode=True,
        required_if=[("state", "cloned", ("clone",)), ("state", "uncloned", ("clone",)),
                     ("state", "labelled", ("labels",)),
                     ("state", "absent", ("id", "name"), True)]
        + [("state", s, ("id", "name"), True) for s in NEEDS_RP])
    p = module.params
    res, state = p["resource"], p["state"]
    labels = dict((k, str(v)) for k, v in (p["labels"] or {}).items())
    name = p["name"] or labels.get("name")
    if p["name"]:
        if labels.get("name", p["name"]) != p["name"]:
            module.fail_json(msg="name {!r} and labels.name {!r} differ".format(p["name"], labels["name"]))
        labels["name"] = p["name"]
    ctl = Tandemctl(module)
    socket = p["nbd_socket"] or os.path.join(os.path.dirname(p["socket"]), res + ".nbd")
    result = {"changed": False, "commands": ctl.commands, "recovery_point": None}
    step = "rp list"
    try:
        rps = ctl.read("rp_list", res)["recovery_points"]
        rp = find(rps, p["id"], name)
        result["recovery_point"] = rp
        if state == "present":
            if rp is None or (p["id"] is None and name is None):
                step = "rp create"
                reply = ctl.write("rp_create", res, labels)
                result["recovery_point"] = reply["recovery_point"] if reply else None
        elif state == "absent":
            if rp is not None:
                step = "rp delete"
                ctl.write("rp_delete", res, rp["id"])
        elif state == "uncloned":
            clones = set()
            for m in rps:
                clones.update(m.get("clones") or [])
            if p["clone"] in clones:
                step = "rp clone-delete"
                ctl.write("rp_clone_delete", res, p["clone"])
        else:
            if rp is None:
                what = "consistent recovery point" if p["id"] == "latest" else \
                    "recovery point " + (p["id"] if p["id"] else f"named {name!r}")
                module.fail_json(msg=f"{state} of resource {res} failed: no {what}", **result)
            rp_id = rp["id"]
            if state == "exported":
                if rp.get("exported"):
                    result["exports"] = uris(rp["exported"], socket)
                else:
                    step = "rp export"
                    reply = ctl.write("rp_export", res, rp_id)
                    result["exports"] = uris(reply["exports"], reply["socket"]) if reply else []
            elif state == "unexported":
                if rp.get("exported"):
                    step = "rp unexport"
                    ctl.write("rp_unexport", res, rp_id)
            elif state == "cloned":
                existing = [m for m in rps if p["clone"] in (m.get("clones") or [])]
                if existing:
                    if existing[0]["id"] != rp_id and p["id"] != "latest":
                        module.fail_json(msg=f"cloned of resource {res} failed: clone {p['clone']!r} exists "
                                             f"already, made from {existing[0]['id']}", **result)
                    result["recovery_point"] = existing[0]
                    # Clone exports are named <volume export>@clone-<name>; the status lists them.
                    status = ctl.read("status", res)["resources"][0]
                    suffix = "@clone-" + p["clone"]
                    names = [n for n in (status.get("recovery_points") or {}).get("exports") or []
                             if n.endswith(suffix)]
                    result["exports"] = uris(names, socket)
                else:
                    step = "rp clone"
                    reply = ctl.write("rp_clone", res, rp_id, p["clone"])
                    result["exports"] = uris(reply["exports"], reply["socket"]) if reply else []
            elif state == "labelled":
                have = rp.get("labels") or {}
                wanted = {k: v for k, v in labels.items() if (k in have if v == "" else have.get(k) != v)}
                if wanted:
                    step = "rp label"
                    reply = ctl.write("rp_label", res, rp_id, wanted)
                    if reply is not None:
                        result["recovery_point"] = {**rp, **reply["recovery_point"]}
            elif state == "restored":
                step = "rp restore"
                reply = ctl.write("rp_restore", res, rp_id)
                if reply is not None:
                    result["restored_bytes"] = reply.get("restored_bytes")
                    result["resource_status"] = normalize_status(reply.get("resource"))
        result["changed"] = bool(ctl.commands)
        no_reread = ("present", "restored", "uncloned", "labelled")
        if ctl.commands and not module.check_mode and state not in no_reread:
            step = "rp list"
            after = ctl.read("rp_list", res)["recovery_points"]
            result["recovery_point"] = find(after, rp["id"]) if rp is not None else None
    except TandemctlError as e:
        fail(module, step, res, e, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
