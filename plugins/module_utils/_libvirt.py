# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this module_utils is PRIVATE to the tandem.dr collection. It can change at any time.
"""The libvirt connection of the tandem_vm modules: import guard, connect, run states."""

from __future__ import annotations

from ansible.module_utils.basic import missing_required_lib

try:
    import libvirt
except ImportError:
    libvirt = None
else:
    # libvirt prints every error to stderr by default; the modules report them in msg.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff",
          6: "crashed", 7: "pmsuspended"}


def connect(module, **result):
    """An open libvirt connection to module.params['uri'], or fail_json with why not."""
    if libvirt is None:
        module.fail_json(msg=missing_required_lib("libvirt (Debian: python3-libvirt)"), **result)
    try:
        return libvirt.open(module.params["uri"])
    except libvirt.libvirtError as e:
        module.fail_json(msg=f"cannot connect to libvirt at {module.params['uri']}: {e}", **result)


def state_name(dom) -> str:
    return STATES.get(dom.state()[0], "unknown") if dom is not None else "absent"
