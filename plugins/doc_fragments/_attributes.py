# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this doc fragment is PRIVATE to the tandem.dr collection. It can change at any time.

from __future__ import annotations


class ModuleDocFragment:
    # Modules that change the engine: check mode and diff (support set per module).
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
  diff_mode:
    description:
      - Will return details on what has changed (or possibly needs changing in check_mode),
        when in diff mode.
"""

    # Read-only modules.
    INFO_MODULE = r"""
options: {}
attributes:
  check_mode:
    support: full
    details:
      - This action does not modify state.
    description: Can run in check_mode and return changed status prediction without modifying target.
  diff_mode:
    support: N/A
    details:
      - This action does not modify state.
    description:
      - Will return details on what has changed (or possibly needs changing in check_mode),
        when in diff mode.
"""

    # Modules that keep one tandem-center catalogue object: read, plan, check, apply, re-read.
    CATALOGUE = r"""
options:
  state:
    description:
      - V(absent) removes the object; the center refuses while other catalogue objects use it.
    type: str
    choices: [present, absent]
    default: present
attributes:
  check_mode:
    support: full
    details:
      - The catalogue is read; nothing is changed.
    description: Can run in check_mode and return changed status prediction without modifying target.
  diff_mode:
    support: full
    description:
      - Will return details on what has changed (or possibly needs changing in check_mode),
        when in diff mode.
"""
