#!/usr/bin/python
# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
module: tandem_resource
short_description: Manage a tandemd resource file and apply it with tandemctl adjust
version_added: 0.1.0
description:
  - Renders the resource file C(<config_dir>/<name>.toml) of one tandemd resource from the
    options, as deterministic text with a C(managed by Ansible tandem.dr.tandem_resource) header.
  - Before writing, the candidate is checked with the engine's own loader
    (C(tandemctl validate) on a temporary copy of O(config_dir) with the candidate in it),
    so an invalid file is never written and the loader's error is the module's message.
  - The file is written atomically, mode 0644, only when its text differs. Then
    C(tandemctl adjust NAME) runs when the file changed, or when C(tandemctl adjust --dry-run NAME)
    reports pending actions (a resource that was not started, for example).
  - Optionally writes the resource's shared secret (O(secret)).
  - The file on each node of a pair differs only in O(local_node) and the per-node paths;
    run the module on both nodes.
extends_documentation_fragment:
  - tandem.dr._attributes
  - tandem.dr._tandemctl
attributes:
  check_mode:
    support: full
    details:
      - Nothing is written and C(adjust) does not run. O(config_dir) is still copied to a
        temporary directory for C(tandemctl validate), and C(adjust --dry-run) runs when the
        file would not change.
  diff_mode:
    support: full
    details:
      - Before and after are the file texts; after is built from the options, also in check mode.
        The secret never appears in the diff.
options:
  name:
    description: Resource name (file name without C(.toml)).
    type: str
    required: true
  state:
    description:
      - V(present) writes the file and adjusts; V(absent) removes the file and adjusts,
        which stops the resource (tandemd refuses while it is Primary; backing files and
        metadata are kept).
    type: str
    choices: [present, absent]
    default: present
  local_node:
    description: The node this file is for; one of the O(nodes) names. Required with O(state=present).
    type: str
  nodes:
    description: The two nodes of the resource. Required with O(state=present).
    type: list
    elements: dict
    suboptions:
      name:
        description: Node name.
        type: str
        required: true
      address:
        description: C(host:port) of the node's replication listener.
        type: str
        required: true
  protocol:
    description: V(C) synchronous, V(A) asynchronous.
    type: str
    choices: [C, A]
    default: C
  volumes:
    description:
      - The VM's disks; the volume number is the list index. Required with O(state=present).
    type: list
    elements: dict
    suboptions:
      path:
        description: Backing file or block device.
        type: path
        required: true
      size:
        description:
          - Size in bytes, or a size string with binary suffixes (V(2GiB), V(2048M)).
            Written as bytes; V(2GiB) and V(2048M) are the same file.
        type: raw
        required: true
      export:
        description: NBD export name (default C(<name>/<number>)).
        type: str
      metadata:
        description: Metadata file of the volume (default chosen by the engine).
        type: path
  tunables:
    description:
      - Tunables (docs/engine-config.md), passed through. Sizes, rates and seconds are written
        in canonical form, so V(64MiB) and V(67108864) are the same file. Unknown names are
        rejected by the loader with its own message.
    type: dict
  nbd:
    description: The C([nbd]) table.
    type: dict
    suboptions:
      socket:
        description: Unix socket of the exports.
        type: path
      tcp:
        description: C(host:port) of an extra NBD TCP listener.
        type: str
      group:
        description:
          - Group owning the Unix socket (mode 0660). V(kvm) on Debian lets QEMU run by libvirt open the disk.
        type: str
  security:
    description: The C([security]) table; unset keys take the engine's defaults.
    type: dict
    suboptions:
      tls_cert:
        description: This node's certificate.
        type: path
      tls_key:
        description: Its private key.
        type: path
      tls_ca:
        description: CA bundle the peer's certificate must chain to.
        type: path
      secret_file:
        description: File holding the shared secret (default C(/etc/tandem/secrets/<name>.key)).
        type: path
      plaintext:
        description: Turn TLS and the secret off (benchmarks and debugging only).
        type: bool
  rp_storage:
    description: How recovery points are stored.
    type: str
    choices: [delta, reflink, auto]
  secret:
    description:
      - The resource's shared secret (at least 16 characters). Written to O(security.secret_file)
        or C(/etc/tandem/secrets/<name>.key), mode 0600, its directory created with mode 0700.
        Compared by content; never shown in the diff or the result.
      - tandemd reads the secret when the resource starts or its C([security]) paths change;
        C(adjust) compares paths, so a new secret under the same path takes effect at the next
        start of the resource.
    type: str
  purge_secret:
    description:
      - With O(state=absent), also remove the secret file (O(security.secret_file) or the default
        path). By default it is kept, as it may be shared with other tooling.
    type: bool
    default: false
  config_dir:
    description: The resource directory of the node.
    type: path
    default: /etc/tandem/resources.d
  apply:
    description:
      - Run C(tandemctl adjust) (and read the resulting status). V(false) only writes the files,
        for example before tandemd is started (it loads the directory when it starts).
    type: bool
    default: true
notes:
  - Idempotent; a second run with the same options reports no change. The comparison is on the
    rendered text, so a hand-edited file with the same meaning is rewritten once.
seealso:
  - module: tandem.dr.tandem_resource_info
author:
  - Tandem DR maintainers (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Protect web01 (run on both nodes, each with its own local_node)
  tandem.dr.tandem_resource:
    name: web01
    local_node: "{{ inventory_hostname }}"
    nodes:
      - name: hv-a1
        address: 10.202.110.11:7788
      - name: hv-b1
        address: 10.202.120.11:7788
    volumes:
      - path: /srv/tandem/web01/disk0.img
        size: 2GiB
        export: web01/disk0
    tunables:
      rp_interval: 3600
    secret: "{{ vault_tandem_secrets.web01 }}"

- name: Remove it (demote it first)
  tandem.dr.tandem_resource:
    name: web01
    state: absent
"""

RETURN = r"""
path:
  description: The resource file.
  returned: always
  type: str
  sample: /etc/tandem/resources.d/web01.toml
commands:
  description: The tandemctl write calls that ran (or would run, in check mode).
  returned: always
  type: list
  elements: list
  sample: [["tandemctl", "--socket", "/run/tandem/tandemd.sock", "adjust", "web01", "--json"]]
actions:
  description: The adjust plan (C(kind), C(resource), C(detail)) that was applied or is pending.
  returned: always
  type: list
  elements: dict
  sample: [{"kind": "add-resource", "resource": "web01", "detail": {}}]
file_changed:
  description: Whether the resource file was (or would be) written or removed.
  returned: always
  type: bool
  sample: true
secret_changed:
  description: Whether the secret file was (or would be) written or removed.
  returned: always
  type: bool
  sample: false
resource:
  description:
    - The resource's status after the run (C(tandemctl status NAME --json) plus C(in_sync) and the
      total C(out_of_sync_bytes)); null when it does not run (absent, O(apply=false), check mode
      before it was added).
  returned: always
  type: dict
  sample: {"name": "web01", "role": "Secondary", "connection": "Connected", "in_sync": true,
           "out_of_sync_bytes": 0, "volumes": []}
"""

import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.tandem.dr.plugins.module_utils._errors import TandemctlError, fail
from ansible_collections.tandem.dr.plugins.module_utils._parse import normalize_status, render_resource
from ansible_collections.tandem.dr.plugins.module_utils._tandemctl import (
    Tandemctl,
    argument_spec,
    is_missing_resource,
)

DEFAULT_SECRET_DIR = "/etc/tandem/secrets"


def _spec():
    spec = argument_spec()
    spec.update(
        name={"type": "str", "required": True},
        state={"type": "str", "choices": ["present", "absent"], "default": "present"},
        local_node={"type": "str"},
        nodes={"type": "list", "elements": "dict", "options": {
            "name": {"type": "str", "required": True},
            "address": {"type": "str", "required": True}}},
        protocol={"type": "str", "choices": ["C", "A"], "default": "C"},
        volumes={"type": "list", "elements": "dict", "options": {
            "path": {"type": "path", "required": True},
            "size": {"type": "raw", "required": True},
            "export": {"type": "str"},
            "metadata": {"type": "path"}}},
        tunables={"type": "dict"},
        nbd={"type": "dict", "options": {"socket": {"type": "path"}, "tcp": {"type": "str"},
                                         "group": {"type": "str"}}},
        security={"type": "dict", "options": {
            "tls_cert": {"type": "path"}, "tls_key": {"type": "path"}, "tls_ca": {"type": "path"},
            "secret_file": {"type": "path"}, "plaintext": {"type": "bool"}}},
        rp_storage={"type": "str", "choices": ["delta", "reflink", "auto"]},
        secret={"type": "str", "no_log": True},
        purge_secret={"type": "bool", "default": False},
        config_dir={"type": "path", "default": "/etc/tandem/resources.d"},
        apply={"type": "bool", "default": True},
    )
    return spec


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def secret_path(params):
    security = params.get("security") or {}
    return security.get("secret_file") or "{}/{}.key".format(DEFAULT_SECRET_DIR, params["name"])


def secret_bytes(secret):
    return (secret if secret.endswith("\n") else secret + "\n").encode("utf-8")


def check_input(module, params):
    """What the loader cannot say in the module's terms; the rest is left to `tandemctl validate`."""
    if params["state"] != "present":
        return
    missing = [k for k in ("local_node", "nodes", "volumes") if not params.get(k)]
    if missing:
        module.fail_json(msg="state=present needs {}".format(", ".join(missing)))
    if len(params["nodes"]) != 2:
        module.fail_json(msg=f"nodes: exactly two nodes are needed, got {len(params['nodes'])}")
    if params["local_node"] not in [n["name"] for n in params["nodes"]]:
        module.fail_json(msg="local_node {!r} is not one of the nodes ({})".format(
            params["local_node"], ", ".join(n["name"] for n in params["nodes"])))
    for i, vol in enumerate(params["volumes"]):
        if isinstance(vol["size"], bool) or not isinstance(vol["size"], (int, str)):
            module.fail_json(msg=f"volumes[{i}].size: expected bytes or a size string like '2GiB', "
                                 f"got {vol['size']!r}")
    if params.get("secret") is not None and len(params["secret"].strip()) < 16:
        module.fail_json(msg="secret: at least 16 characters are needed (after stripping whitespace)")


def validate(module, ctl, config_dir, name, text):
    """tandemctl validate on a temporary copy of config_dir with the candidate file in it."""
    tmp = tempfile.mkdtemp(prefix="tandem-validate-")
    try:
        if os.path.isdir(config_dir):
            for entry in sorted(os.listdir(config_dir)):
                if entry.endswith(".toml") and not entry.startswith(".") and entry != name + ".toml":
                    # A link keeps what the loader sees (also a dangling link or a directory).
                    os.symlink(os.path.join(config_dir, entry), os.path.join(tmp, entry))
        with open(os.path.join(tmp, name + ".toml"), "w", encoding="utf-8") as f:
            f.write(text)
        try:
            ctl.read("validate", tmp)
        except TandemctlError as e:
            # The loader names the files it read: name the real directory, not the copy.
            e.message = str(e).replace(tmp, config_dir)
            e.args = (e.message,)
            e.stdout = e.stdout and e.stdout.replace(tmp, config_dir)
            e.stderr = e.stderr and e.stderr.replace(tmp, config_dir)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(module, path, data, mode):
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)        # the rename survives a crash
    finally:
        os.close(dir_fd)


def status_of(ctl, name):
    try:
        return normalize_status(ctl.read("status", name)["resources"][0])
    except TandemctlError as e:
        if is_missing_resource(e):
            return None
        raise


def run(module):
    p = module.params
    name, config_dir = p["name"], p["config_dir"]
    path = os.path.join(config_dir, name + ".toml")
    ctl = Tandemctl(module)
    result = {"changed": False, "path": path, "commands": ctl.commands, "actions": [],
              "file_changed": False, "secret_changed": False, "resource": None}
    check_input(module, p)
    step = "read"
    try:
        before = _read(path)
        before_text = None if before is None else before.decode("utf-8", "replace")
        spath = secret_path(p)
        if p["state"] == "present":
            desired = dict(p)
            try:
                after_text = render_resource(desired)
            except ValueError as e:
                module.fail_json(msg=f"resource {name}: {e}")
            file_changed = after_text != before_text
            secret_changed = False
            if p.get("secret") is not None:
                current = _read(spath)
                secret_changed = current != secret_bytes(p["secret"]) or (
                    _mode(spath) != 0o600)
            if file_changed:
                step = "validate"
                validate(module, ctl, config_dir, name, after_text)
        else:
            after_text = None
            file_changed = before is not None
            secret_changed = p["purge_secret"] and os.path.lexists(spath)
        result.update(file_changed=file_changed, secret_changed=bool(secret_changed))
        if module._diff:
            result["diff"] = {"before": before_text or "", "after": after_text or "",
                              "before_header": path, "after_header": path}

        if not module.check_mode:
            step = "write"
            if p["state"] == "present":
                if secret_changed:
                    _ensure_dir(os.path.dirname(spath), 0o700)
                    write_atomic(module, spath, secret_bytes(p["secret"]), 0o600)
                if file_changed:
                    _ensure_dir(config_dir, 0o755)
                    write_atomic(module, path, after_text.encode("utf-8"), 0o644)
            else:
                if file_changed:
                    os.unlink(path)
                if secret_changed:
                    os.unlink(spath)

        if p["apply"]:
            if file_changed:
                step = "adjust"
                reply = ctl.write("adjust", name)
                result["actions"] = reply["actions"] if reply else []
            else:
                step = "adjust --dry-run"
                plan = ctl.read("adjust", name, dry_run=True)
                result["actions"] = plan.get("actions") or []
                if result["actions"]:
                    step = "adjust"
                    reply = ctl.write("adjust", name)
                    if reply:
                        result["actions"] = reply["actions"]
            if p["state"] == "present":
                step = "status"
                result["resource"] = status_of(ctl, name)
        result["changed"] = bool(file_changed or secret_changed or ctl.commands)
    except TandemctlError as e:
        fail(module, step, name, e, **_partial(result))
    except (OSError, UnicodeError) as e:
        module.fail_json(msg=f"{step} of resource {name} failed: {e}", **_partial(result))
    module.exit_json(**result)


def _partial(result):
    return {k: result[k] for k in ("commands", "path", "file_changed") if k in result}


def _mode(path):
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return None


def _ensure_dir(path, mode):
    if not os.path.isdir(path):
        os.makedirs(path, mode)
        os.chmod(path, mode)


def main():
    module = AnsibleModule(argument_spec=_spec(), supports_check_mode=True)
    run(module)


if __name__ == "__main__":
    main()
