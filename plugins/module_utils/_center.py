# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this module util is PRIVATE to the tandem.dr collection. It can change at any time.

"""The tandem-center REST API client of the tandem_center_* modules: ansible's open_url (no
third-party HTTP library on the controller), JSON in and out, errors as CenterError with the
center's own message. The token is only ever put in the Authorization header."""

from __future__ import annotations

import json
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode

from ansible.module_utils.basic import env_fallback
from ansible.module_utils.common.text.converters import to_text
from ansible.module_utils.urls import open_url

API = "/api/v1"
PAGE = 1000          # the API's largest page


def center_argument_spec():
    """The connection options (doc fragment tandem.dr._center)."""
    return {
        "url": {"type": "str", "required": True, "fallback": (env_fallback, ["TANDEM_CENTER_URL"])},
        "token": {"type": "str", "required": True, "no_log": True,
                  "fallback": (env_fallback, ["TANDEM_CENTER_TOKEN"])},
        "ca_path": {"type": "path"},
        "client_cert": {"type": "path"},
        "client_key": {"type": "path", "no_log": False},
        "validate_certs": {"type": "bool", "default": True},
        "timeout": {"type": "int", "default": 30},
    }


class CenterError(Exception):
    """An API call failed: `status` is the HTTP status (None: the center was not reached)."""

    def __init__(self, message, status=None, method=None, path=None):
        super().__init__(message)
        self.message, self.status, self.method, self.path = message, status, method, path

    def details(self):
        return {"status": self.status, "request": f"{self.method} {self.path}"}


def _detail(body):
    """The center's error message from its JSON answer ({"detail": "..."} or a 422's list)."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return to_text(body)[:300]
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}" for d in detail)
    return to_text(detail)


class Center:
    def __init__(self, module):
        p = module.params
        self.base = p["url"].rstrip("/") + API
        self._token = p["token"]
        self._tls = {"validate_certs": p["validate_certs"], "ca_path": p["ca_path"],
                     "client_cert": p["client_cert"], "client_key": p["client_key"]}
        self.timeout = p["timeout"]

    def call(self, method, path, body=None, query=None):
        """(status, decoded JSON or None); raises CenterError on a 4xx/5xx or no answer."""
        url = self.base + path + ("?" + urlencode(query) if query else "")
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body), "application/json"
        try:
            resp = open_url(url, data=data, headers=headers, method=method, timeout=self.timeout,
                            follow_redirects="none", use_proxy=False, **self._tls)
            status, raw = resp.getcode(), resp.read()
        except HTTPError as e:
            why = _detail(e.read() or b"")
            if e.code == 401:
                why += " (the token is missing, unknown or revoked)"
            raise CenterError(f"tandem-center refused {method} {path}: {e.code} {why}", e.code, method,
                              path) from None
        except (URLError, OSError, ValueError) as e:      # connection refused, TLS, timeout, bad URL
            reason = getattr(e, "reason", e)
            raise CenterError(f"cannot reach tandem-center at {self.base}: {reason}", None, method,
                              path) from None
        return status, (json.loads(raw) if raw else None)

    def get(self, path, **query):
        return self.call("GET", path, query={k: v for k, v in query.items() if v is not None})[1]

    def post(self, path, body=None):
        return self.call("POST", path, body=body if body is not None else {})[1]

    def list_all(self, path, **query):
        """Every item of a list endpoint that pages by id (after_id, limit)."""
        items, after = [], 0
        while True:
            page = self.get(path, limit=PAGE, after_id=after, **query)
            items.extend(page)
            if len(page) < PAGE:
                return items
            after = page[-1]["id"]


def _named(items, name):
    """The item called `name` among catalogue `items` of one kind, or None."""
    return next((i for i in items if i["name"] == name), None)


def find_named(center, path, name):
    """The catalogue item called `name` at list endpoint `path`, or None."""
    return _named(center.list_all(path), name)


def id_of(items, kind, name):
    """The id of the item called `name` among catalogue `items` of one kind; ValueError when
    there is none."""
    item = _named(items, name)
    if item is None:
        raise ValueError(f"the catalogue has no {kind} {name!r}")
    return item["id"]


def ensure_named(module, path, kind, want_fn):
    """Make the catalogue item called module.params['name'] at `path` match `want_fn(center)`
    (the fields to PUT/POST, name included) or, with state=absent, remove it. Read, plan, stop in
    check mode, apply, read again; exits the module with changed, actions, diff and `kind`."""
    p = module.params
    center = Center(module)
    try:
        have = find_named(center, path, p["name"])
        want = want_fn(center) if p["state"] == "present" else None
    except CenterError as e:
        module.fail_json(msg=e.message, **e.details())
    except ValueError as e:
        module.fail_json(msg=str(e))
    if want is None:
        steps = [(f"delete {kind} {p['name']}", "DELETE", f"{path}/{have['id']}", None)] if have else []
    elif have is None:
        steps = [(f"create {kind} {p['name']}", "POST", path, want)]
    elif any(have.get(k) != v for k, v in want.items()):
        steps = [(f"update {kind} {p['name']}", "PUT", f"{path}/{have['id']}", want)]
    else:
        steps = []
    before = {k: have[k] for k in (want or have)} if have else {}
    result = {"changed": bool(steps), "actions": [s[0] for s in steps], kind: have,
              "diff": {"before": before, "after": (want or {}) if steps else before}}
    if module.check_mode or not steps:
        module.exit_json(**result)
    try:
        for _label, method, step_path, body in steps:
            center.call(method, step_path, body=body)
        result[kind] = find_named(center, path, p["name"])
    except CenterError as e:
        module.fail_json(msg=e.message, **e.details(), actions=result["actions"])
    module.exit_json(**result)
