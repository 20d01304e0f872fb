# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this doc fragment is PRIVATE to the tandem.dr collection. It can change at any time.

from __future__ import annotations


class ModuleDocFragment:
    # The libvirt connection of tandem_vm and tandem_vm_info (module_utils/_libvirt.py).
    DOCUMENTATION = r"""
options:
  uri:
    description: libvirt connection URI. Shared by the action group C(tandem.dr.libvirt).
    type: str
    default: qemu:///system
requirements:
  - libvirt Python bindings (Debian C(python3-libvirt)) on the hypervisor
"""
