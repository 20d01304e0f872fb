#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_vm
short_description: Define, start, stop or remove a libvirt domain whose disks tandemd serves
version_added: 0.1.0
description:
  - Manages one libvirt domain on this hypervisor for Tandem DR.
  - With O(definition), defines the domain from that XML; without it, works on the domain's
    current persistent definition (to convert an existing VM).
  - O(nbd_disks) points disks at tandemd exports over its Unix socket (a disk becomes an NBD
    network disk); O(file_disks) points drives at files (a converted VM's NoCloud seed, written
    at each site); O(interfaces) sets interface sources and MACs (network mapping at the DR site).
  - Idempotent although libvirt rewrites the XML it is given - a domain this module defined
    carries the sha256 of the definition in its C(<metadata>), and changes are detected on that
    and on the disks and interfaces it manages, never on libvirt's own additions.
  - Redefining a running domain changes its next boot only; changing its disks needs a
    shutdown, which the module does only with O(restart=true).
  - Stopping a running domain is always graceful first - an ACPI shutdown (the guest flushes
    and powers off), waiting up to O(shutdown_timeout) seconds - and only then a power off
    (C(virsh destroy)). RV(stopped_by) says which one stopped it.
extends_documentation_fragment:
  - tandem.dr._attributes
  - tandem.dr._libvirt
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - Before and after are the domain's state, definition fingerprint, drives (disks, cdroms,
        floppies) and interfaces.
options:
  name:
    description: Domain name.
    type: str
    required: true
  state:
    description:
      - V(defined) - defined, whatever its run state.
      - V(running) - defined and running (started if needed).
      - V(shutoff) - defined and not running (ACPI shutdown, then O(force_off)).
      - V(absent) - not defined; a running domain is stopped first (ACPI shutdown, then a power
        off after O(shutdown_timeout) whatever O(force_off) says).
    type: str
    default: defined
    choices: [defined, running, shutoff, absent]
  definition:
    description:
      - Domain XML to define. Its C(<name>) is replaced by O(name). The UUID of an existing
        domain is kept, or O(uuid) is used.
    type: str
  uuid:
    description:
      - UUID for a new domain. Give the production domain's UUID to the DR copy so the guest
        keeps its identity; leave it unset for a drill copy (libvirt makes a new one).
    type: str
  nbd_disks:
    description: Disks to serve from tandemd exports.
    type: list
    elements: dict
    default: []
    suboptions:
      target:
        description: The disk's target device (V(vda), ...).
        type: str
        required: true
      socket:
        description: tandemd's NBD Unix socket of the resource.
        type: path
        required: true
      export:
        description: NBD export name (tandemd's default is C(<resource>/<volume number>)).
        type: str
        required: true
  file_disks:
    description:
      - Drives to point at a file, by target dev - a disk, cdrom or floppy. Fails if the
        definition has no drive with that target. A target may not be in O(nbd_disks) too.
    type: list
    elements: dict
    default: []
    suboptions:
      target:
        description: The drive's target device (V(sdb), V(hdc), V(vdc), ...).
        type: str
        required: true
      path:
        description: The file the drive is to read (an image on this hypervisor).
        type: path
        required: true
      format:
        description: The file's format (the driver type).
        type: str
        default: raw
  interfaces:
    description:
      - Interface sources and MACs to set, by position or by current MAC (O(interfaces[].match_mac)).
    type: list
    elements: dict
    default: []
    suboptions:
      network:
        description: libvirt network to attach to.
        type: str
      bridge:
        description: Host bridge to attach to.
        type: str
      vlan:
        description: VLAN tag on the bridge (real hosts; the lab has no 802.1q).
        type: int
      mac:
        description: MAC address to set.
        type: str
      match_mac:
        description: Pick the interface that has this MAC now, instead of by position.
        type: str
  restart:
    description: Allow a shutdown and start of a running domain to apply disk changes.
    type: bool
    default: false
  shutdown_timeout:
    description: Seconds to wait for an ACPI shutdown before giving up (or powering off).
    type: int
    default: 120
  force_off:
    description: Power the domain off (virsh destroy) when the ACPI shutdown times out.
    type: bool
    default: false
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Define app01 with its disk on tandemd and start it
  tandem.dr.tandem_vm:
    name: app01
    definition: "{{ lookup('ansible.builtin.template', 'app01.xml.j2') }}"
    nbd_disks:
      - target: vda
        socket: /run/tandem/app01.nbd
        export: app01/0
    state: running

- name: Convert an existing VM (its disk file is now the tandemd volume) - short shutdown
  tandem.dr.tandem_vm:
    name: legacy01
    nbd_disks:
      - {target: vda, socket: /run/tandem/legacy01.nbd, export: legacy01/0}
    restart: true
    state: running

- name: Start the DR copy on the mapped network, with its seed drive (sdb) on this site's seed
  tandem.dr.tandem_vm:
    name: app01
    definition: "{{ saved_definition }}"
    file_disks:
      - {target: sdb, path: /var/lib/tandem-vms/app01/seed.img}
    interfaces:
      - {bridge: br-dr-app, mac: "52:54:00:12:34:56"}
    state: running
"""

RETURN = r"""
domain:
  description: The domain after the change (in check mode - as it would be).
  returned: always
  type: dict
  sample:
    name: app01
    state: running
    uuid: 0b7c...
    definition_sha256: 3f1e...
    disks: [{target: vda, type: network, protocol: nbd, export: app01/0, socket: /run/tandem/app01.nbd}]
    interfaces: [{type: bridge, bridge: br-app, mac: "52:54:00:12:34:56"}]
restart_required:
  description: The definition changed while the domain kept running; it applies at the next boot.
  returned: when the domain was defined
  type: bool
  sample: false
actions:
  description: What the module did (or would do in check mode), in order.
  returned: always
  type: list
  elements: str
  sample: [define, start]
stopped_by:
  description:
    - How a running domain was stopped - V(shutdown) (the guest shut down on the ACPI request)
      or V(destroy) (it did not within O(shutdown_timeout) and was powered off).
  returned: when the module stopped a running domain, not in check mode
  type: str
  sample: shutdown
shutdown_seconds:
  description: Seconds from the ACPI shutdown request until the domain was off (by either way).
  returned: when the module stopped a running domain, not in check mode
  type: float
  sample: 2.4
"""

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils import _domain_xml as dx
from ansible_collections.tandem.dr.plugins.module_utils._libvirt import connect, libvirt, state_name


def _persistent(dom) -> str:
    return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)


def _lookup(conn, name):
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _view(root, state):
    if root is None:
        return {"state": "absent"}
    return {**dx.summary(root), "state": state}


def desired_definition(p, current_root):
    """(define, root): the definition wanted, and whether it differs from the current one."""
    if p["definition"] is not None:
        root = dx.parse(p["definition"])
        dx.set_identity(root, name=p["name"])
        uuid = current_root.findtext("uuid") if current_root is not None else p["uuid"]
        dx.set_identity(root, uuid=uuid or "")
    elif current_root is not None:
        root = dx.parse(dx.render(current_root))
    else:
        raise dx.DomainXMLError(f"domain {p['name']} does not exist: give its definition")
    dx.serve_disks_over_nbd(root, p["nbd_disks"])
    dx.set_file_disks(root, p["file_disks"])
    dx.set_interfaces(root, p["interfaces"])
    if p["definition"] is not None:
        digest = dx.mark(root)
        return current_root is None or dx.definition_marker(current_root) != digest, root
    # No definition given: compare what we manage, and keep the existing marker (if any).
    return dx.summary(root) != dx.summary(current_root), root


def shutdown(module, dom, result, force_off=None):
    """Stop a running domain: ACPI shutdown, and a power off only if the guest has not shut
    down within shutdown_timeout (and force_off). Records which one stopped it."""
    p = module.params
    force_off = p["force_off"] if force_off is None else force_off
    result["actions"].append("shutdown")
    if module.check_mode:
        return
    started = time.monotonic()
    try:
        dom.shutdown()
    except libvirt.libvirtError as e:
        # Already off (it stopped on its own since we looked) is what we want.
        if e.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or state_name(dom) != "shutoff":
            raise
    deadline = started + p["shutdown_timeout"]
    while True:
        if state_name(dom) == "shutoff":
            result.update(stopped_by="shutdown", shutdown_seconds=round(time.monotonic() - started, 1))
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not force_off:
        module.fail_json(msg=f"domain {p['name']} did not shut down within {p['shutdown_timeout']} s "
                             "(set force_off to power it off)", **result)
    module.warn(f"domain {p['name']} did not shut down within {p['shutdown_timeout']} s of the ACPI "
                "request: powered off (virsh destroy)")
    result["actions"].append("destroy")
    dom.destroy()
    result.update(stopped_by="destroy", shutdown_seconds=round(time.monotonic() - started, 1))


def run(module, conn, result):
    p = module.params
    both = sorted({d["target"] for d in p["nbd_disks"]} & {d["target"] for d in p["file_disks"]})
    if both:
        raise dx.DomainXMLError(f"targets {', '.join(both)} are in both nbd_disks and file_disks")
    name, want = p["name"], p["state"]
    dom = _lookup(conn, name)
    state = state_name(dom)
    current_root = dx.parse(_persistent(dom)) if dom is not None else None
    before = _view(current_root, state)

    if want == "absent":
        after = {"state": "absent"}
        if dom is not None:
            if state != "shutoff":
                shutdown(module, dom, result, force_off=True)
            result["actions"].append("undefine")
            if not module.check_mode:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                                  if p["uri"].startswith("qemu") else 0)
        return before, after

    define, desired_root = desired_definition(p, current_root)
    running = state in ("running", "blocked", "paused", "pmsuspended", "shutdown")
    disks_change = current_root is not None and \
        dx.summary(desired_root)["disks"] != dx.summary(current_root)["disks"]
    if define and running and disks_change and not p["restart"]:
        module.fail_json(msg=f"domain {name} is running and its disks would change: shut it down "
                             "first (state: shutoff) or allow it with restart: true", **result)
    if define and running and disks_change:
        shutdown(module, dom, result)
        running = False
        if want == "defined":
            want = "running"                # put it back as it was
    if define:
        result["actions"].append("define")
        # A running domain's new definition applies at its next boot.
        result["restart_required"] = running and want != "shutoff"
        if not module.check_mode:
            dom = conn.defineXML(dx.render(desired_root))
            desired_root = dx.parse(_persistent(dom))
    after_state = "running" if running else "shutoff"
    if want == "running" and not running:
        result["actions"].append("start")
        if not module.check_mode:
            dom.create()
        after_state = "running"
    elif want == "shutoff" and running:
        shutdown(module, dom, result)
        after_state = "shutoff"
    return before, _view(desired_root, after_state if module.check_mode else state_name(dom))


def main():
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "state": {"type": "str", "default": "defined",
                      "choices": ["defined", "running", "shutoff", "absent"]},
            "definition": {"type": "str"},
            "uuid": {"type": "str"},
            "nbd_disks": {"type": "list", "elements": "dict", "default": [], "options": {
                "target": {"type": "str", "required": True},
                "socket": {"type": "path", "required": True},
                "export": {"type": "str", "required": True}}},
            "file_disks": {"type": "list", "elements": "dict", "default": [], "options": {
                "target": {"type": "str", "required": True},
                "path": {"type": "path", "required": True},
                "format": {"type": "str", "default": "raw"}}},
            "interfaces": {"type": "list", "elements": "dict", "default": [], "options": {
                "network": {"type": "str"}, "bridge": {"type": "str"}, "vlan": {"type": "int"},
                "mac": {"type": "str"}, "match_mac": {"type": "str"}},
                "mutually_exclusive": [["network", "bridge"]]},
            "restart": {"type": "bool", "default": False},
            "shutdown_timeout": {"type": "int", "default": 120},
            "force_off": {"type": "bool", "default": False},
            "uri": {"type": "str", "default": "qemu:///system"},
        },
        supports_check_mode=True,
    )
    result = {"changed": False, "actions": []}
    conn = connect(module, **result)
    try:
        before, after = run(module, conn, result)
    except dx.DomainXMLError as e:
        module.fail_json(msg=f"domain {module.params['name']}: {e}", **result)
    except libvirt.libvirtError as e:
        module.fail_json(msg=f"domain {module.params['name']}: libvirt: {e} "
                             f"(after: {', '.join(result['actions']) or 'nothing done'})", **result)
    finally:
        conn.close()
    result["changed"] = bool(result["actions"])
    result["domain"] = after
    if module._diff:
        result["diff"] = {"before": before, "after": after}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
