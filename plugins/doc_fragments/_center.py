# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this doc fragment is PRIVATE to the tandem.dr collection. It can change at any time.

from __future__ import annotations


class ModuleDocFragment:
    # The tandem-center API connection of the tandem_center_* modules (module_utils/_center.py).
    DOCUMENTATION = r"""
options:
  url:
    description:
      - Base URL of tandem-center, for example V(https://cp-vip.example:8480) (the API is under C(/api/v1)).
      - Defaults to the E(TANDEM_CENTER_URL) environment variable.
      - Shared by the action group C(tandem.dr.center).
    type: str
    required: true
  token:
    description:
      - "An API token made by C(tandem-center token create) (C(tdc_...)); sent as C(Authorization: Bearer)."
      - Reading needs the read-only role, recording runs the operator role, changing the catalogue admin.
      - Defaults to the E(TANDEM_CENTER_TOKEN) environment variable (an AWX credential can inject it).
    type: str
    required: true
  ca_path:
    description: PEM file of the CA that signed the center's certificate (default - the system's CAs).
    type: path
  client_cert:
    description: PEM client certificate, when the center requires mutual TLS.
    type: path
  client_key:
    description: PEM private key of O(client_cert), unless it is in that file.
    type: path
  validate_certs:
    description: Verify the center's TLS certificate. Only for tests; never turn it off in production.
    type: bool
    default: true
  timeout:
    description: Seconds to wait for each API answer.
    type: int
    default: 30
requirements:
  - tandem-center reachable from the host the module runs on (usually the controller, C(localhost))
"""
