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
