# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this doc fragment is PRIVATE to the tandem.dr collection. It can change at any time.

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  wait:
    description:
      - Wait until the engine reports the state the module is asked for.
    type: bool
    default: true
  wait_timeout:
    description:
      - How long to wait, in seconds. On timeout the module fails; the message names
        what it waited for and the last state it saw.
    type: int
    default: 120
    aliases: [timeout]
  wait_interval:
    description:
      - Seconds between two status reads while waiting.
    type: float
    default: 1.0
"""
