#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_vm_info
short_description: Read libvirt domains as Tandem DR sees them
version_added: 0.1.0
description:
  - Returns each domain's run state and the parts Tandem DR manages - disks (file, block or
    tandemd NBD export), interfaces (network or bridge, VLAN, MAC) and the fingerprint of the
    definition M(tandem.dr.tandem_vm) wrote - plus, on request, the persistent XML.
extends_documentation_fragment:
  - tandem.dr._attributes.INFO_MODULE
  - tandem.dr._libvirt
options:
  names:
    description: Domains to read; all when empty. A missing name is returned with state V(absent).
    type: list
    elements: str
    default: []
  xml:
    description: Also return each domain's persistent definition (C(xml)), e.g. to keep a copy at the DR site.
    type: bool
    default: false
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Read app01's definition at production, to keep it at the DR site
  tandem.dr.tandem_vm_info:
    names: [app01]
    xml: true
  register: app01_vm
"""

RETURN = r"""
domains:
  description: Per domain name - state, uuid, disks, interfaces, definition_sha256 (and xml).
  returned: always
  type: dict
  sample:
    app01:
      state: running
      disks: [{target: vda, type: network, protocol: nbd, export: app01/0, socket: /run/tandem/app01.nbd}]
      interfaces: [{type: bridge, bridge: br-app, mac: "52:54:00:12:34:56"}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils import _domain_xml as dx
from ansible_collections.tandem.dr.plugins.module_utils._libvirt import connect, libvirt, state_name


def main():
    module = AnsibleModule(
        argument_spec={"names": {"type": "list", "elements": "str", "default": []},
                       "xml": {"type": "bool", "default": False},
                       "uri": {"type": "str", "default": "qemu:///system"}},
        supports_check_mode=True,
    )
    p = module.params
    conn = connect(module)
    domains = {}
    try:
        found = {d.name(): d for d in conn.listAllDomains()}
        for name in p["names"] or sorted(found):
            dom = found.get(name)
            if dom is None:
                domains[name] = {"state": "absent"}
                continue
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            domains[name] = {**dx.summary(dx.parse(xml)), "state": state_name(dom)}
            if p["xml"]:
                domains[name]["xml"] = xml
    except libvirt.libvirtError as e:
        module.fail_json(msg=f"reading domains from {p['uri']}: {e}")
    finally:
        conn.close()
    module.exit_json(changed=False, domains=domains)


if __name__ == "__main__":
    main()
