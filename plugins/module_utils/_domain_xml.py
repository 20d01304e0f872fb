# Copyright (c) Tandem DR maintainers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# Note: this module_utils is PRIVATE to the tandem.dr collection. It can change at any time.
"""libvirt domain XML, the parts tandem.dr manages: disks served by tandemd over NBD,
file-backed drives (a converted VM's NoCloud seed), interface sources and MACs, and a marker
of the definition we wrote.

Pure functions over ElementTree, so they are tested without libvirt. libvirt rewrites the
XML it is given (defaults, PCI addresses, ...), so idempotence never compares whole XML
documents: a domain we defined carries the sha256 of our input in its <metadata>, and
everything else is compared through `summary()`, the projection the module manages.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET

NS = "https://tandem-dr.example/xmlns/domain/1"
MARKER = f"{{{NS}}}definition"
ET.register_namespace("tandem", NS)


class DomainXMLError(ValueError):
    """The XML is not a domain we can work with; the message says why."""


def parse(xml: str) -> ET.Element:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DomainXMLError(f"not well-formed XML: {e}") from None
    if root.tag != "domain":
        raise DomainXMLError(f"the root element is <{root.tag}>, not <domain>")
    if not (root.findtext("name") or "").strip():
        raise DomainXMLError("the domain has no <name>")
    return root


def render(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def _disks(root):
    return [d for d in root.iterfind("devices/disk") if d.get("device", "disk") == "disk"]


def _drives(root):
    """Every <disk>, also a cdrom or floppy (a NoCloud seed is often one)."""
    return list(root.iterfind("devices/disk"))


def _target(disk) -> str:
    t = disk.find("target")
    return t.get("dev", "") if t is not None else ""


def disk_summary(disk) -> dict:
    src = disk.find("source")
    out = {"target": _target(disk), "type": disk.get("type", "file")}
    if disk.get("device", "disk") != "disk":
        out["device"] = disk.get("device")
    if src is None:
        return out
    if out["type"] == "network":
        host = src.find("host")
        out.update(protocol=src.get("protocol"), export=src.get("name"),
                   socket=host.get("socket") if host is not None else None)
    elif out["type"] == "volume":
        out["path"] = f"{src.get('pool')}/{src.get('volume')}"
    else:
        out["path"] = src.get("file") or src.get("dev") or src.get("dir")
    return out


def interface_summary(iface) -> dict:
    src, mac = iface.find("source"), iface.find("mac")
    kind = iface.get("type", "")
    out = {"type": kind, "mac": mac.get("address") if mac is not None else None}
    if src is not None:
        if kind == "network":
            out["network"] = src.get("network")
        elif kind == "bridge":
            out["bridge"] = src.get("bridge")
        vlan = iface.find("vlan/tag")
        if vlan is not None:
            out["vlan"] = int(vlan.get("id"))
    return out


def summary(root: ET.Element) -> dict:
    """What tandem.dr manages in a domain, as plain data (also what the modules return)."""
    return {
        "name": root.findtext("name"),
        "uuid": root.findtext("uuid"),
        "disks": [disk_summary(d) for d in _drives(root)],
        "interfaces": [interface_summary(i) for i in root.iterfind("devices/interface")],
        "definition_sha256": definition_marker(root),
    }


def _replace_source(by_target: dict, target: str, kind: str, source: ET.Element, fmt: str) -> ET.Element:
    """Give the drive with this target dev a new <source> (and type and driver format); its
    <source> goes right after <driver>, as libvirt writes it. Returns its <driver>."""
    disk = by_target.get(target)
    if disk is None:
        raise DomainXMLError(f"the domain has no disk with target {target!r} "
                             f"(it has {sorted(by_target) or 'none'})")
    disk.set("type", kind)
    for old in disk.findall("source"):
        disk.remove(old)
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", fmt)
    disk.insert(list(disk).index(driver) + 1, source)
    return driver


def serve_disks_over_nbd(root: ET.Element, nbd_disks: list[dict]) -> None:
    """Point each listed disk (by target dev) at a tandemd export on a Unix socket.

    The disk becomes <disk type='network'> with <source protocol='nbd' name=EXPORT> and a
    unix <host>; its raw format and cache=none are kept or set (tandemd is the cache).
    """
    by_target = {_target(d): d for d in _disks(root)}
    for want in nbd_disks:
        src = ET.Element("source", {"protocol": "nbd", "name": want["export"]})
        ET.SubElement(src, "host", {"transport": "unix", "socket": want["socket"]})
        _replace_source(by_target, want["target"], "network", src, "raw").set("cache", "none")


def set_file_disks(root: ET.Element, file_disks: list[dict]) -> None:
    """Point each listed drive (by target dev; a disk, cdrom or floppy) at a file of the given
    format (raw by default): a converted VM's NoCloud seed, written anew at each site."""
    by_target = {_target(d): d for d in _drives(root)}
    for want in file_disks:
        _replace_source(by_target, want["target"], "file", ET.Element("source", {"file": want["path"]}),
                        want.get("format") or "raw")


def _describe(summary: dict) -> str:
    if summary["type"] == "network":
        return f"{summary.get('protocol')} {summary.get('export')} on {summary.get('socket')}"
    return f"{summary['type']} {summary.get('path')}"


def convert_problems(root: ET.Element, replicated: list[dict], seed_target: str | None = None) -> list[str]:
    """Why this domain cannot be converted in place, one line per problem (none: it can).

    replicated: per volume, the target its disk has (vda, vdb, ...) with the volume's `path`
    and the `socket`/`export` tandemd serves it on. Each must be a disk of the domain on that
    path (or, once converted, on that export); every other drive with a source must be the
    `seed_target`: anything else exists only at this site, and the replica could not start.
    """
    drives = {_target(d): d for d in _drives(root)}
    problems = []
    for n, vol in enumerate(replicated):
        disk = drives.get(vol["target"])
        if disk is None or disk.get("device", "disk") != "disk":
            problems.append(f"{vol['target']}: replicated disk {n} ({vol['path']}) is not a disk "
                            "of the domain")
            continue
        got = disk_summary(disk)
        on_volume = got["type"] in ("file", "block") and got.get("path") == vol["path"]
        on_export = got["type"] == "network" and got.get("protocol") == "nbd" and \
            (got.get("socket"), got.get("export")) == (vol["socket"], vol["export"])
        if not (on_volume or on_export):
            problems.append(f"{vol['target']}: its source is {_describe(got)}, not replicated disk {n}'s "
                            f"path {vol['path']}")
    if seed_target and seed_target not in drives:
        problems.append(f"{seed_target}: seed_target is not a drive of the domain (it has {sorted(drives)})")
    wanted = {vol["target"] for vol in replicated} | {seed_target}
    for target, disk in drives.items():
        got = disk_summary(disk)
        if target not in wanted and disk.find("source") is not None:
            problems.append(f"{target} ({disk.get('device', 'disk')}): {_describe(got)} is not replicated")
    return problems


def set_interfaces(root: ET.Element, interfaces: list[dict]) -> None:
    """Set the source (libvirt network, or bridge with an optional VLAN) and the MAC of
    interfaces, matched by their current MAC (`match_mac`) or else by position."""
    current = list(root.iterfind("devices/interface"))
    for n, want in enumerate(interfaces):
        iface = _find_interface(current, want, n)
        for old in iface.findall("source") + iface.findall("vlan"):
            iface.remove(old)
        if want.get("network"):
            iface.set("type", "network")
            src = ET.Element("source", {"network": want["network"]})
        elif want.get("bridge"):
            iface.set("type", "bridge")
            src = ET.Element("source", {"bridge": want["bridge"]})
        else:
            raise DomainXMLError(f"interface {n}: give network or bridge")
        mac = iface.find("mac")
        iface.insert(list(iface).index(mac) + 1 if mac is not None else 0, src)
        if want.get("vlan") is not None:
            vlan = ET.SubElement(iface, "vlan")
            ET.SubElement(vlan, "tag", {"id": str(int(want["vlan"]))})
        if want.get("mac"):
            if mac is None:
                mac = ET.Element("mac")
                iface.insert(0, mac)
            mac.set("address", want["mac"].lower())


def _find_interface(current, want, n):
    if want.get("match_mac"):
        for iface in current:
            mac = iface.find("mac")
            if mac is not None and mac.get("address", "").lower() == want["match_mac"].lower():
                return iface
        raise DomainXMLError(f"interface {n}: no interface with MAC {want['match_mac']}")
    if n >= len(current):
        raise DomainXMLError(f"interface {n}: the domain has only {len(current)} interface(s)")
    return current[n]


def set_identity(root: ET.Element, name: str | None = None, uuid: str | None = None) -> None:
    """Rename, and set or drop (uuid="") the UUID: libvirt refuses to redefine an existing
    domain from XML without its UUID, and a drill copy must not share production's."""
    if name:
        root.find("name").text = name
    if uuid is not None:
        el = root.find("uuid")
        if uuid == "":
            if el is not None:
                root.remove(el)
            return
        if el is None:
            el = ET.Element("uuid")
            root.insert(list(root).index(root.find("name")) + 1, el)
        el.text = uuid


def _strip_marker(root: ET.Element) -> None:
    meta = root.find("metadata")
    if meta is None:
        return
    for m in meta.findall(MARKER):
        meta.remove(m)
    if len(meta) == 0:
        root.remove(meta)


def definition_marker(root: ET.Element) -> str | None:
    m = root.find(f"metadata/{MARKER}")
    return m.get("sha256") if m is not None else None


def fingerprint(root: ET.Element) -> str:
    """sha256 of a definition as we would write it, without its UUID and marker (the UUID is
    the existing domain's business, and the marker holds this very value)."""
    copy = ET.fromstring(render(root))
    _strip_marker(copy)
    set_identity(copy, uuid="")
    canonical = ET.canonicalize(render(copy), strip_text=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def mark(root: ET.Element) -> str:
    """Record the definition's fingerprint in <metadata>; returns it."""
    digest = fingerprint(root)
    _strip_marker(root)
    meta = root.find("metadata")
    if meta is None:
        meta = ET.Element("metadata")
        after = root.find("uuid") if root.find("uuid") is not None else root.find("name")
        root.insert(list(root).index(after) + 1, meta)
    ET.SubElement(meta, MARKER, {"sha256": digest})
    return digest
