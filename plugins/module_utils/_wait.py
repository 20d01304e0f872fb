# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this module util is PRIVATE to the tandem.dr collection. It can change at any time.

"""Poll a state until a predicate holds."""

from __future__ import annotations

import time

from ansible_collections.tandem.dr.plugins.module_utils._errors import WaitTimeout


def argument_spec():
    """Options of the wait doc fragment (tandem.dr._wait)."""
    return {"wait": {"type": "bool", "default": True},
            "wait_timeout": {"type": "int", "default": 120, "aliases": ["timeout"]},
            "wait_interval": {"type": "float", "default": 1.0}}


def wait_for(read, predicate, what, timeout, interval=1.0, describe=repr, clock=time.monotonic,
             sleep=time.sleep):
    """Call read() until predicate(state) is true; returns (state, seconds waited).

    The state is read at least once. On timeout raises WaitTimeout whose message names
    `what` and the last state seen (through describe()).
    """
    start = clock()
    while True:
        state = read()
        if predicate(state):
            return state, round(clock() - start, 3)
        waited = clock() - start
        if waited >= timeout:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}; last seen: {describe(state)}",
                              last=state, waited=round(waited, 3))
        sleep(max(0.0, min(interval, timeout - waited)))
