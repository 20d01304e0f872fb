#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_center_run_info
short_description: Read a run (failover, failback, drill) and its steps from tandem-center
version_added: 0.1.0
description:
  - Returns the run with key O(key), or the newest run of the series O(series), with its steps
    in order. The plan runner (playbooks/tasks/run_plan.yml) reads the newest run of its series
    to resume an interrupted run without starting any VM twice.
extends_documentation_fragment:
  - tandem.dr._attributes.INFO_MODULE
  - tandem.dr._center
options:
  key:
    description: The run's key (as given to M(tandem.dr.tandem_center_run)).
    type: str
  series:
    description: The newest run of this series.
    type: str
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: The last failover of plan web
  tandem.dr.tandem_center_run_info:
    url: https://cp-vip.example:8480
    token: "{{ tandem_center_token }}"
    ca_path: /etc/tandem/pki/ca.crt
    series: failover-web
  register: last_failover
"""

RETURN = r"""
found:
  description: Whether there is such a run.
  returned: always
  type: bool
run:
  description: The run (id, key, series, kind, plan_id, state, parameters, result, started_by,
    started_at, finished_at) and its C(steps) (seq, key, name, status, started_at, finished_at,
    detail), or null.
  returned: always
  type: dict
  sample: {"id": 7, "key": "drill-web-1", "series": "drill-web", "kind": "drill", "state": "running",
           "parameters": {"plan": "web"}, "steps": [{"seq": 1, "key": "s1", "name": "started db",
           "status": "changed", "detail": {}}]}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._center import (
    Center,
    CenterError,
    center_argument_spec,
)


def read_run(center, key=None, series=None):
    """The run with its steps, or None."""
    runs = center.get("/runs", key=key, series=series, newest_first="true" if series else None, limit=1)
    return center.get(f"/runs/{runs[0]['id']}") if runs else None


def main():
    spec = center_argument_spec()
    spec.update(key={"type": "str", "no_log": False}, series={"type": "str"})
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           mutually_exclusive=[("key", "series")], required_one_of=[("key", "series")])
    try:
        run = read_run(Center(module), module.params["key"], module.params["series"])
    except CenterError as e:
        module.fail_json(msg=e.message, **e.details())
    module.exit_json(changed=False, found=run is not None, run=run)


if __name__ == "__main__":
    main()
