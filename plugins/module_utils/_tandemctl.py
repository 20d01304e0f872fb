# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this module util is PRIVATE to the tandem.dr collection. It can change at any time.

"""The one place that knows tandemctl's command line.

Every tandemctl call of the collection goes through `Tandemctl`: `argv()` holds the
vocabulary (one builder per subcommand), `read()` runs a call that changes nothing (also
in check mode), `write()` a call that changes the engine: it is recorded in `commands`
and skipped in check mode. Exit codes (tandemctl's contract): 0 ok, 1 the engine refused
(`EngineRefused`, the engine's reason verbatim), 2 usage or no daemon (`EngineUnavailable`).
"""

from __future__ import annotations

import json

from ansible_collections.tandem.dr.plugins.module_utils._errors import (
    EngineRefused,
    EngineUnavailable,
    TandemctlError,
)

DEFAULT_SOCKET = "/run/tandem/tandemd.sock"


def argument_spec():
    """Options of the tandemctl doc fragment (tandem.dr._tandemctl)."""
    return {"tandemctl": {"type": "str", "default": "tandemctl"},
            "socket": {"type": "path", "default": DEFAULT_SOCKET}}


def _flag(cond, flag):
    return [flag] if cond else []


def _labels(labels):
    out = []
    for key in sorted(labels or {}):
        out += ["--label", f"{key}={labels[key]}"]
    return out


# subcommand -> argv builder (after `tandemctl --socket S`). All ask for JSON.
VOCABULARY = {
    "status": lambda name=None: ["status"] + ([name] if name else []) + ["--json"],
    "primary": lambda name, force=False: ["primary", name] + _flag(force, "--force") + ["--json"],
    "secondary": lambda name: ["secondary", name, "--json"],
    "connect": lambda name: ["connect", name, "--json"],
    "disconnect": lambda name: ["disconnect", name, "--json"],
    "verify": lambda name, resync=False: ["verify", name] + _flag(resync, "--resync") + ["--json"],
    "adjust": lambda name, dry_run=False: ["adjust", name] + _flag(dry_run, "--dry-run") + ["--json"],
    "validate": lambda config_dir: ["validate", "--config-dir", config_dir, "--json"],
    "rp_list": lambda name: ["rp", "list", name, "--json"],
    "rp_create": lambda name, labels=None: ["rp", "create", name] + _labels(labels) + ["--json"],
    "rp_delete": lambda name, rp_id: ["rp", "delete", name, rp_id, "--json"],
    "rp_label": lambda name, rp_id, labels: ["rp", "label", name, rp_id] + _labels(labels) + ["--json"],
    "rp_export": lambda name, rp_id: ["rp", "export", name, rp_id, "--json"],
    "rp_unexport": lambda name, rp_id: ["rp", "unexport", name, rp_id, "--json"],
    "rp_restore": lambda name, rp_id: ["rp", "restore", name, rp_id, "--json"],
    "rp_clone": lambda name, rp_id, clone: ["rp", "clone", name, rp_id, clone, "--json"],
    "rp_clone_delete": lambda name, clone: ["rp", "clone-delete", name, clone, "--json"],
}


class Tandemctl:
    """tandemctl for one module run; `commands` lists the write calls (run or, in check mode, not)."""

    def __init__(self, module, tandemctl=None, socket=None):
        self.module = module
        self.tandemctl = tandemctl or module.params.get("tandemctl") or "tandemctl"
        self.socket = socket or module.params.get("socket") or DEFAULT_SOCKET
        self.commands = []

    def argv(self, verb, *args, **kwargs):
        return [self.tandemctl, "--socket", self.socket] + VOCABULARY[verb](*args, **kwargs)

    def read(self, verb, *args, **kwargs):
        """Run a call that changes nothing; the parsed JSON reply."""
        return self._run(self.argv(verb, *args, **kwargs))

    def write(self, verb, *args, **kwargs):
        """Run a call that changes the engine; None in check mode (only recorded then)."""
        cmd = self.argv(verb, *args, **kwargs)
        self.commands.append(cmd)
        if self.module.check_mode:
            return None
        return self._run(cmd)

    def _run(self, cmd):
        try:
            rc, out, err = self.module.run_command(cmd, check_rc=False, handle_exceptions=False,
                                                   expand_user_and_vars=False, environ_update={"LC_ALL": "C"})
        except OSError as e:
            raise EngineUnavailable(f"cannot run {cmd[0]}: {e}", cmd=cmd, rc=None) from e
        reply = None
        if out and out.strip():
            try:
                reply = json.loads(out)
            except ValueError:
                reply = None
        if rc == 0:
            if not isinstance(reply, dict):
                raise TandemctlError("{} printed no JSON object".format(" ".join(cmd[3:5])),
                                     cmd=cmd, rc=rc, stdout=out, stderr=err)
            return reply
        if rc == 1:
            text = None
            if isinstance(reply, dict):
                text = reply.get("error") or reply.get("errors")
            raise EngineRefused(text or _strip_prefix(err) or "tandemctl exited with 1",
                                cmd=cmd, rc=rc, stdout=out, stderr=err, reply=reply)
        if rc == 2:
            raise EngineUnavailable((err or out or "").strip() or "tandemctl exited with 2",
                                    cmd=cmd, rc=rc, stdout=out, stderr=err)
        raise TandemctlError("tandemctl exited with {}: {}".format(rc, (err or out or "").strip()),
                             cmd=cmd, rc=rc, stdout=out, stderr=err)


def _strip_prefix(err):
    """'tandemctl primary: <reason>' -> '<reason>' (the engine's text, verbatim)."""
    text = (err or "").strip()
    if text.startswith("tandemctl ") and ": " in text:
        return text.split(": ", 1)[1]
    return text


def is_missing_resource(error):
    """True if the engine refused because the resource does not run on this node."""
    return isinstance(error, EngineRefused) and str(error).startswith("no resource ")
