# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this doc fragment is PRIVATE to the tandem.dr collection. It can change at any time.

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  tandemctl:
    description:
      - The tandemctl command, a name looked up in E(PATH) or an absolute path.
    type: str
    default: tandemctl
  socket:
    description:
      - The control socket of tandemd (tandemctl C(--socket)).
    type: path
    default: /run/tandem/tandemd.sock
notes:
  - The module runs C(tandemctl) on the managed node. Its exit codes are mapped to
    errors; when the engine refuses a request, its reason is passed through in C(msg).
"""
