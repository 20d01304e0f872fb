# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this module util is PRIVATE to the tandem.dr collection. It can change at any time.

"""Errors of tandemctl calls and how a module reports them."""

from __future__ import annotations


class TandemctlError(Exception):
    """A tandemctl call failed; carries what fail_json shows (cmd, rc, stdout, stderr)."""

    def __init__(self, message, cmd=None, rc=None, stdout=None, stderr=None, reply=None):
        super().__init__(message)
        self.message = message
        self.cmd, self.rc, self.stdout, self.stderr, self.reply = cmd, rc, stdout, stderr, reply

    def details(self):
        out = {"cmd": self.cmd, "rc": self.rc, "stdout": self.stdout, "stderr": self.stderr}
        return {k: v for k, v in out.items() if v is not None}


class EngineRefused(TandemctlError):
    """tandemctl exit code 1: the engine refused; the message is the engine's reason, verbatim."""


class EngineUnavailable(TandemctlError):
    """tandemctl exit code 2 (or it cannot be run): no daemon, a bad socket, a usage error."""


class WaitTimeout(Exception):
    """A wait ended without the condition; `last` is the last state seen."""

    def __init__(self, message, last=None, waited=0.0):
        super().__init__(message)
        self.last, self.waited = last, waited


def fail(module, step, name, error, /, **result):
    """fail_json: '<step> of resource <name> failed: <the engine's text, verbatim>'."""
    extra = error.details() if isinstance(error, TandemctlError) else {}
    extra.update(result)
    module.fail_json(msg=f"{step} of resource {name} failed: {error}", **extra)
