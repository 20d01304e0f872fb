# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this module util is PRIVATE to the tandem.dr collection. It can change at any time.

"""Pure helpers: sizes and tunables in canonical form, status normalisation, the TOML renderer.

The managed node runs these with Ansible's Python, not the engine's, so the few engine
rules needed here (docs/engine-config.md "Sizes", the tunable units) are restated;
tests/unit/test_module_utils_parse.py checks them against tandem.engine.config.
"""

from __future__ import annotations

import contextlib
import json
import math
import re

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_SIZE_UNITS = {"": 1, "K": KiB, "KiB": KiB, "M": MiB, "MiB": MiB, "G": GiB, "GiB": GiB,
               "T": TiB, "TiB": TiB}
_SIZE_TEXT = re.compile(r"([0-9]+)\s*([A-Za-z]*)$")

# Tunable name -> unit, as in tandem.engine.config.Tunables.
SECONDS, BYTES, RATE, COUNT = "seconds", "bytes", "bytes/s", "count"
TUNABLE_UNITS = {
    "sync_timeout": SECONDS, "congestion_fill": BYTES, "resume_after": SECONDS,
    "connect_interval": SECONDS, "connect_interval_max": SECONDS, "ping_interval": SECONDS,
    "ping_timeout": SECONDS, "max_epoch_writes": COUNT, "al_extents": COUNT,
    "bitmap_block_size": BYTES, "resync_rate_max": RATE, "resync_rate_min": RATE,
    "rp_interval": SECONDS, "rp_keep": COUNT, "rp_max_age": SECONDS,
}

# Engine state names (tandem.engine.resource).
CONNECTED, STANDALONE, CONNECTING = "Connected", "StandAlone", "Connecting"
UPTODATE, ESTABLISHED = "UpToDate", "Established"


def parse_size(value):
    """Bytes from an int or a size string ("2GiB", "512 M", "4096"); binary suffixes only.

    Raises ValueError for anything docs/engine-config.md "Sizes" refuses ("1.5G", "2GB", True).
    """
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_TEXT.match(value.strip())
        if m and m.group(2) in _SIZE_UNITS:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError("expected an integer number of bytes with an optional suffix "
                     f"K/KiB/M/MiB/G/GiB/T/TiB, got {value!r}")


def format_size(n):
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def normalize_tunable(name, value):
    """Canonical value of a tunable (sizes -> int bytes, seconds -> float, counts -> int).

    Values that do not convert are returned unchanged: the loader (tandemctl validate)
    then reports them with its own message.
    """
    unit = TUNABLE_UNITS.get(name)
    if isinstance(value, bool) or unit is None:
        return value
    try:
        if unit in (BYTES, RATE):
            return parse_size(value)
        if unit == SECONDS:
            if isinstance(value, str):
                value = value.strip()
            return float(value)
        if unit == COUNT and (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
            return int(value)
    except (TypeError, ValueError):
        pass
    return value


def in_sync(status):
    """Connected, and every volume Established, UpToDate on both sides, nothing out of sync."""
    if not status or status.get("connection") != CONNECTED:
        return False
    return all(v.get("replication") == ESTABLISHED and v.get("disk") == UPTODATE
               and v.get("peer_disk") == UPTODATE and not v.get("out_of_sync_bytes")
               for v in status.get("volumes") or [])


def normalize_status(status):
    """A resource's `tandemctl status --json` entry plus `in_sync` and `out_of_sync_bytes` (sum)."""
    if status is None:
        return None
    out = dict(status)
    out["in_sync"] = in_sync(status)
    out["out_of_sync_bytes"] = sum(v.get("out_of_sync_bytes") or 0 for v in status.get("volumes") or [])
    return out


def describe_status(status):
    """One line for wait/assert messages."""
    if not status:
        return "no status"
    vols = ", ".join("volume {} {}/{} {} out-of-sync {}".format(
        v.get("volume"), v.get("disk"), v.get("peer_disk"), v.get("replication"),
        v.get("out_of_sync_bytes")) for v in status.get("volumes") or [])
    return "role {}, connection {}, peer role {}; {}".format(
        status.get("role"), status.get("connection"), status.get("peer_role"), vols or "no volumes")


# -- TOML ---------------------------------------------------------------------------------

HEADER = ("# managed by Ansible tandem.dr.tandem_resource; edits here are overwritten\n"
          "# (see docs/engine-config.md for the keys)\n")


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a TOML number")
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML also forbids DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise ValueError(f"cannot write {value!r} ({type(value).__name__}) to a resource file")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+$")


def _line(key, value, comment=None):
    key = key if _BARE_KEY.match(key) else toml_value(key)
    return "{} = {}{}\n".format(key, toml_value(value), "  # " + comment if comment else "")


def render_resource(desired):
    """The resource file for `desired` (see tandem_resource), as deterministic text.

    desired: name, protocol, local_node, nodes [{name, address}], volumes [{path, size,
    export?, metadata?}], tunables {}, nbd {socket?, tcp?, group?}, security {...}, rp_storage.
    Sizes come out as integer bytes (with the human size as a comment), tunables
    sorted by name in canonical form, optional tables only when set.
    """
    text = HEADER
    text += _line("resource", desired["name"])
    text += _line("protocol", desired["protocol"])
    text += _line("local_node", desired["local_node"])
    if desired.get("rp_storage") is not None:
        text += _line("rp_storage", desired["rp_storage"])
    for node in desired["nodes"]:
        text += "\n[[nodes]]\n" + _line("name", node["name"]) + _line("address", node["address"])
    for number, vol in enumerate(desired["volumes"]):
        size = vol["size"]
        with contextlib.suppress(ValueError):
            size = parse_size(size)
        text += "\n[[volumes]]\n" + _line("number", number) + _line("path", vol["path"])
        text += _line("size", size, format_size(size) if isinstance(size, int) and size > 0 else None)
        for key in ("export", "metadata"):
            if vol.get(key) is not None:
                text += _line(key, vol[key])
    for table, keys in (("tunables", None), ("nbd", ("socket", "tcp", "group")),
                        ("security", ("tls_cert", "tls_key", "tls_ca", "secret_file", "plaintext"))):
        values = desired.get(table) or {}
        names = sorted(values) if keys is None else [k for k in keys if k in values] + \
            sorted(k for k in values if k not in keys)
        names = [k for k in names if values[k] is not None]
        if not names:
            continue
        text += f"\n[{table}]\n"
        for key in names:
            value = normalize_tunable(key, values[key]) if table == "tunables" else values[key]
            unit = TUNABLE_UNITS.get(key) if table == "tunables" else None
            comment = None
            if unit in (BYTES, RATE) and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                comment = format_size(value) + ("/s" if unit == RATE else "")
            text += _line(key, value, comment)
    return text
