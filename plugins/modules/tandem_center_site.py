#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_center_site
short_description: A site in the tandem-center catalogue
version_added: 0.1.0
description:
  - Makes the catalogue's site O(name) exist with O(description), or removes it (O(state=absent)).
  - Reads the site, plans, stops in check mode, changes only what differs, then reads it again.
    Needs a token with the admin role (catalogue changes are audited by the center).
extends_documentation_fragment:
  - tandem.dr._attributes.CATALOGUE
  - tandem.dr._center
options:
  name:
    description: The site's name (the inventory's C(tandem_site)).
    type: str
    required: true
  description:
    description: Free text shown with the site.
    type: str
    default: ""
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Site a in the catalogue
  tandem.dr.tandem_center_site:
    url: https://cp-vip.example:8443
    token: "{{ tandem_center_admin_token }}"
    name: a
    description: Primary data centre
"""

RETURN = r"""
site:
  description: The site as the catalogue has it afterwards (in check mode, before); null when absent.
  returned: always
  type: dict
  sample: {"id": 1, "name": "a", "description": "Primary data centre"}
actions:
  description: What was (or, in check mode, would be) done.
  returned: always
  type: list
  elements: str
  sample: ["create site a"]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._center import center_argument_spec, ensure_named


def main():
    spec = center_argument_spec()
    spec.update(
        name={"type": "str", "required": True},
        description={"type": "str", "default": ""},
        state={"type": "str", "choices": ["present", "absent"], "default": "present"},
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    p = module.params
    ensure_named(module, "/sites", "site",
                 lambda center: {"name": p["name"], "description": p["description"]})


if __name__ == "__main__":
    main()
