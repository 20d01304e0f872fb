#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_center_vm
short_description: Register a protected VM and its volumes in the tandem-center catalogue
version_added: 0.1.0
description:
  - Makes the catalogue's protected VM O(name) match the options - its sites, hypervisor and
    protection policy (all by name) and its replicated volumes - or removes it (O(state=absent)).
  - Reads the VM, plans, stops in check mode, changes only what differs, then reads it again.
    Needs a token with the admin role (catalogue changes are audited by the center).
extends_documentation_fragment:
  - tandem.dr._attributes
  - tandem.dr._center
attributes:
  check_mode:
    support: full
    details:
      - The catalogue is read; nothing is changed.
  diff_mode:
    support: full
options:
  name:
    description: The VM's name (its libvirt domain name).
    type: str
    required: true
  state:
    description: V(absent) removes the VM with its volumes and recovery points.
    type: str
    choices: [present, absent]
    default: present
  production_site:
    description: Name of the site it runs at. Required with O(state=present).
    type: str
  dr_site:
    description: Name of the site it fails over to. Required with O(state=present).
    type: str
  hypervisor:
    description: Name of its hypervisor in the catalogue, if any.
    type: str
  policy:
    description: Name of its protection policy. Required with O(state=present).
    type: str
  volumes:
    description: Its replicated disks, all of them - volumes the catalogue has beyond these are removed.
    type: list
    elements: dict
    default: []
    suboptions:
      resource:
        description: The tandemd resource.
        type: str
        required: true
      volume:
        description: The volume number in the resource.
        type: int
        default: 0
      target_dev:
        description: The guest's disk target (V(vda)).
        type: str
        required: true
      size_bytes:
        description: The volume's size.
        type: int
        required: true
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Protect web01 in the catalogue
  tandem.dr.tandem_center_vm:
    url: https://cp-vip.example:8480
    token: "{{ tandem_center_admin_token }}"
    name: web01
    production_site: site-a
    dr_site: site-b
    hypervisor: hv-a1
    policy: gold
    volumes:
      - {resource: web01, volume: 0, target_dev: vda, size_bytes: 10737418240}
"""

RETURN = r"""
vm:
  description:
    - The VM as the catalogue has it afterwards (in check mode, before), with its C(volumes).
    - Null when it is absent.
  returned: always
  type: dict
  sample: {"id": 3, "name": "web01", "production_site_id": 1, "dr_site_id": 2, "hypervisor_id": 1,
           "policy_id": 1, "volumes": [{"id": 5, "resource": "web01", "volume": 0, "target_dev": "vda",
           "size_bytes": 10737418240}]}
actions:
  description: What was (or, in check mode, would be) done, in order.
  returned: always
  type: list
  elements: str
  sample: ["create vm web01", "create volume web01/0 (vda)"]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._center import (
    Center,
    CenterError,
    center_argument_spec,
    find_named,
    id_of,
)

VOLUME_SPEC = {
    "resource": {"type": "str", "required": True},
    "volume": {"type": "int", "default": 0},
    "target_dev": {"type": "str", "required": True},
    "size_bytes": {"type": "int", "required": True},
}
VOLUME_FIELDS = ("resource", "volume", "target_dev", "size_bytes")


def read(center, name):
    """The VM (with its volumes) or None."""
    vm = find_named(center, "/vms", name)
    if vm is not None:
        vm["volumes"] = sorted((v for v in center.list_all("/volumes") if v["vm_id"] == vm["id"]),
                               key=lambda v: (v["resource"], v["volume"]))
    return vm


def wanted_vm(center, p):
    sites = center.list_all("/sites")
    return {"name": p["name"], "production_site_id": id_of(sites, "site", p["production_site"]),
            "dr_site_id": id_of(sites, "site", p["dr_site"]),
            "hypervisor_id": id_of(center.list_all("/hypervisors"), "hypervisor", p["hypervisor"])
            if p["hypervisor"] else None,
            "policy_id": id_of(center.list_all("/policies"), "policy", p["policy"])}


def plan(vm, want, volumes):
    """[(action text, method, path, body)] to make `vm` (or None) match; the VM id is filled later."""
    steps = []
    if vm is None:
        steps.append((f"create vm {want['name']}", "POST", "/vms", want))
    elif any(vm[k] != v for k, v in want.items()):
        steps.append((f"update vm {want['name']}", "PUT", f"/vms/{vm['id']}", want))
    have = {(v["resource"], v["volume"]): v for v in (vm or {}).get("volumes", [])}
    keep = {(v["resource"], v["volume"]) for v in volumes}
    for key in sorted(set(have) - keep):                  # first, so a target_dev can move between volumes
        steps.append((f"delete volume {key[0]}/{key[1]}", "DELETE", f"/volumes/{have[key]['id']}", None))
    for vol in volumes:
        body = {k: vol[k] for k in VOLUME_FIELDS}
        old = have.get((vol["resource"], vol["volume"]))
        label = f"{vol['resource']}/{vol['volume']} ({vol['target_dev']})"
        if old is None:
            steps.append((f"create volume {label}", "POST", "/volumes", body))
        elif any(old[k] != body[k] for k in VOLUME_FIELDS):
            steps.append((f"update volume {label}", "PUT", f"/volumes/{old['id']}", body))
    return steps


def _view(vm):
    if vm is None:
        return {}
    return {**{k: vm[k] for k in ("name", "production_site_id", "dr_site_id", "hypervisor_id", "policy_id")},
            "volumes": [{k: v[k] for k in VOLUME_FIELDS} for v in vm.get("volumes", [])]}


def main():
    spec = center_argument_spec()
    spec.update(
        name={"type": "str", "required": True},
        state={"type": "str", "choices": ["present", "absent"], "default": "present"},
        production_site={"type": "str"},
        dr_site={"type": "str"},
        hypervisor={"type": "str"},
        policy={"type": "str"},
        volumes={"type": "list", "elements": "dict", "default": [], "options": VOLUME_SPEC},
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           required_if=[("state", "present", ("production_site", "dr_site", "policy"))])
    p = module.params
    center = Center(module)
    try:
        vm = read(center, p["name"])
        if p["state"] == "absent":
            want = None
            steps = [(f"delete vm {p['name']}", "DELETE", f"/vms/{vm['id']}", None)] if vm else []
        else:
            want = wanted_vm(center, p)
            steps = plan(vm, want, p["volumes"])
    except CenterError as e:
        module.fail_json(msg=e.message, **e.details())
    except ValueError as e:
        module.fail_json(msg=str(e))
    volumes = sorted(({k: v[k] for k in VOLUME_FIELDS} for v in p["volumes"]),
                     key=lambda v: (v["resource"], v["volume"]))
    after = {} if want is None else {**want, "volumes": volumes}
    result = {"changed": bool(steps), "actions": [s[0] for s in steps], "vm": vm,
              "diff": {"before": _view(vm), "after": after if steps else _view(vm)}}
    if module.check_mode or not steps:
        module.exit_json(**result)
    try:
        vm_id = vm["id"] if vm else None
        for _label, method, path, body in steps:
            if body is not None and path.startswith("/volumes"):     # known once the VM exists
                body = {**body, "vm_id": vm_id}
            answer = center.call(method, path, body=body)[1]
            if path == "/vms" and method == "POST":
                vm_id = answer["id"]
        result["vm"] = read(center, p["name"])
    except CenterError as e:
        module.fail_json(msg=e.message, **e.details(), actions=result["actions"])
    module.exit_json(**result)


if __name__ == "__main__":
    main()
