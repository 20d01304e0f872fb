#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_health
short_description: Wait until a recovered VM answers a health check
version_added: 0.1.0
description:
  - Runs one health check of a recovery plan (docs/recovery-plans.md) from this host, again
    every O(interval) seconds, until it passes or O(timeout) seconds have gone by.
  - Run it on a host at the site where the VM now runs (the VM's address may only be reachable
    there), typically with C(delegate_to), and with C(async) to check the VMs of a stage at once.
  - Changes nothing; the result says when the check first passed and what the last failure was.
extends_documentation_fragment:
  - tandem.dr._attributes.INFO_MODULE
options:
  health_check:
    description:
      - "A normalised health check from the M(tandem.dr.recovery_plan) filter -
        C({type: tcp, host, port}), C({type: http, url, expect_status}), C({type: ping}) or C({type: none})."
      - C({ip}) in C(host) and C(url) is replaced by O(address).
    type: dict
    required: true
  address:
    description: The VM's address after the network mapping.
    type: str
    required: true
  timeout:
    description: Seconds to keep trying.
    type: float
    default: 300
  interval:
    description: Seconds between attempts (default the health check's own C(interval), else 5).
    type: float
  netns:
    description:
      - Run the check inside this named network namespace (C(/run/netns/NAME)), e.g. a probe
        attached to a drill's isolated network, which the host itself has no address on.
    type: str
  started_at:
    description:
      - Epoch seconds when the VM was started. The result's C(healthy_after) counts from it, so
        it is the VM's start-to-healthy time even when the check began later.
    type: float
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Wait for db01 to answer on 5432, from the DR hypervisor
  tandem.dr.tandem_health:
    health_check: {type: tcp, host: "{ip}", port: 5432}
    address: 192.168.20.10
    timeout: 300
  delegate_to: hv-b1
"""

RETURN = r"""
healthy:
  description: The check passed before the timeout.
  returned: always
  type: bool
attempts:
  description: How many times the check ran.
  returned: always
  type: int
healthy_at:
  description: Epoch seconds of the first pass (null if it never passed).
  returned: always
  type: float
healthy_after:
  description: Seconds from O(started_at) (or from the first attempt) to the first pass.
  returned: always
  type: float
last_error:
  description: Why the last failed attempt failed.
  returned: always
  type: str
target:
  description: What was checked, with the address filled in.
  returned: always
  type: str
  sample: tcp 192.168.20.10:5432
"""

import socket
import time
from urllib.error import HTTPError

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url


def _fill(text, address):
    return str(text).replace("{ip}", address)


def probe(check, address, attempt_timeout, run_command):
    """(ok, target, error) for one attempt. run_command: AnsibleModule.run_command (ping)."""
    kind = check.get("type", "none")
    if kind == "none":
        return True, "none (running counts as healthy)", None
    if kind == "tcp":
        host, port = _fill(check.get("host") or "{ip}", address), int(check["port"])
        target = f"tcp {host}:{port}"
        try:
            socket.create_connection((host, port), timeout=attempt_timeout).close()
            return True, target, None
        except OSError as e:
            return False, target, f"{target}: {e.strerror or e}"
    if kind == "http":
        url = _fill(check["url"], address)
        expect = check.get("expect_status") or [200]
        expect = expect if isinstance(expect, list) else [expect]
        target = f"http {url}"
        try:
            resp = open_url(url, timeout=attempt_timeout, validate_certs=False, follow_redirects="none")
            status = resp.status
        except HTTPError as e:
            status = e.code
        except Exception as e:  # URLError, timeouts, connection resets: all "not yet"
            return False, target, f"{url}: {getattr(e, 'reason', None) or e}"
        if int(status) in [int(s) for s in expect]:
            return True, target, None
        return False, target, f"{url}: HTTP {status}, expected {expect}"
    if kind == "ping":
        target = f"ping {address}"
        ping = ["ping", "-n", "-c", "1", "-W", str(max(1, int(attempt_timeout))), address]
        rc, out, err = run_command(ping)
        if rc == 0:
            return True, target, None
        lines = (out + err).strip().splitlines()
        return False, target, f"{target}: {lines[-1] if lines else 'no reply'}"
    raise ValueError(f"unknown health check type {kind!r} (tcp, http, ping or none)")


CLONE_NEWNET = 0x40000000


def enter_netns(name):
    """Move this (single-threaded) process into a named network namespace: sockets opened and
    commands run afterwards live there. Python 3.11 has no os.setns, hence libc."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def main():
    module = AnsibleModule(
        argument_spec={"health_check": {"type": "dict", "required": True},
                       "address": {"type": "str", "required": True},
                       "timeout": {"type": "float", "default": 300},
                       "interval": {"type": "float"},
                       "netns": {"type": "str"},
                       "started_at": {"type": "float"}},
        supports_check_mode=True,
    )
    p = module.params
    if p["netns"]:
        try:
            enter_netns(p["netns"])
        except OSError as e:
            module.fail_json(msg=f"cannot enter network namespace {p['netns']}: {e.strerror or e}")
    if p["health_check"].get("type") == "ping" and not module.get_bin_path("ping"):
        module.fail_json(msg="ping is not installed on this host (Debian: iputils-ping)")
    interval = p["interval"] or float(p["health_check"].get("interval") or 5)
    first = time.time()
    started_at = p["started_at"] or first
    deadline = time.monotonic() + p["timeout"]
    result = {"changed": False, "healthy": False, "attempts": 0, "healthy_at": None,
              "healthy_after": None, "last_error": None, "target": None}
    try:
        while True:
            attempt_timeout = max(1.0, min(interval, deadline - time.monotonic()))
            ok, result["target"], error = probe(p["health_check"], p["address"], attempt_timeout,
                                                module.run_command)
            result["attempts"] += 1
            if ok:
                now = time.time()
                result.update(healthy=True, healthy_at=round(now, 3),
                              healthy_after=round(now - started_at, 3))
                module.exit_json(**result)
            result["last_error"] = error
            if time.monotonic() + interval > deadline:
                break
            time.sleep(interval)
    except (ValueError, KeyError) as e:
        module.fail_json(msg=f"bad health check {p['health_check']}: {e}", **result)
    module.fail_json(msg=f"not healthy after {p['timeout']:g} s ({result['attempts']} attempts): "
                         f"{result['last_error']}", **result)


if __name__ == "__main__":
    main()
