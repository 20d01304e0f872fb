"""Declarative resource configuration: the files in /etc/tandem/resources.d.

One TOML file describes one resource (one protected VM): its volumes (one per
VM disk), its two nodes (one per site), the replication protocol, the
tunables and how the replication link is secured. The file format is
documented in docs/engine-config.md; this module is its single implementation:

* ``load_resource(path)`` reads and validates one file;
* ``load_directory(dir)`` reads every ``*.toml`` of a directory, checks what
  must be unique across the node (export names, backing and metadata paths)
  and returns every resource or raises one ConfigError listing every problem
  of every file -- it never returns a partial set;
* ``ResourceConfig.to_dict()`` is the normalised, JSON-able form (sizes in
  bytes, every tunable filled in) that ``tandemctl adjust --dry-run`` prints;
* ``diff(running, desired)`` is the plan ``adjust`` executes, as a list of
  ``Action`` in a fixed order; it is empty when nothing changed, so adjust is
  idempotent. Changes that would lose data raise ``UnsafeChange``.

Loading is pure: it reads the resource files and nothing else (it does not
check that backing files, certificates or secret files exist), so a
controller can validate a node's files.
The dataclasses do not validate themselves; build them with the loaders or
``parse_resource``.

Standard library only (Python 3.11: tomllib).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import posixpath
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "ACTION_KINDS",
    "DEFAULT_DIRECTORY",
    "TUNABLES",
    "Action",
    "Address",
    "ConfigError",
    "NbdConfig",
    "NodeConfig",
    "Problem",
    "ResourceConfig",
    "SecurityConfig",
    "TunableSpec",
    "Tunables",
    "UnsafeChange",
    "VolumeConfig",
    "default_secret_file",
    "diff",
    "format_size",
    "load_directory",
    "load_files",
    "load_resource",
    "parse_address",
    "parse_resource",
    "parse_size",
]

DEFAULT_DIRECTORY = Path("/etc/tandem/resources.d")
DEFAULT_TLS_CERT = "/etc/tandem/tls/node.crt"
DEFAULT_TLS_KEY = "/etc/tandem/tls/node.key"
DEFAULT_TLS_CA = "/etc/tandem/tls/ca.crt"
DEFAULT_SECRET_DIR = "/etc/tandem/secrets"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
DAY = 86400.0

#: Volume sizes are whole multiples of this (the engine's I/O and bitmap granule).
SIZE_ALIGN = 4096
#: Largest volume size (off_t is signed 64-bit).
MAX_SIZE = (1 << 63) - SIZE_ALIGN
PROTOCOLS = {"A": "asynchronous", "C": "synchronous"}
#: AF_UNIX sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107

RESOURCE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,254}")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")

_SIZE_UNITS = {"": 1, "K": KiB, "KiB": KiB, "M": MiB, "MiB": MiB, "G": GiB, "GiB": GiB, "T": TiB, "TiB": TiB}
_SIZE_TEXT = re.compile(r"([0-9]+)\s*([A-Za-z]*)")


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file: where (file, key path) and what."""

    source: str
    #: Dotted key path ("volumes[1].size", "tunables.sync_timeout"), a location
    #: ("line 3, column 7") for syntax errors, or "" for the file as a whole.
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}" if self.key else f"{self.source}: {self.message}"


class ConfigError(Exception):
    """A resource file (or a set of them) is invalid.

    Every line of the message names the file and the key path. ``problems``
    holds the same information structured, e.g. for an Ansible module.
    """

    def __init__(self, problems: Iterable[Problem], summary: str | None = None):
        self.problems: tuple[Problem, ...] = tuple(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        if len(self.problems) == 1:
            message = str(self.problems[0])
        else:
            head = summary or f"{self.problems[0].source}: {_plural(len(self.problems), 'error')}"
            message = head + ":\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


class UnsafeChange(ConfigError):
    """``diff`` was asked for a change that adjust refuses to make (it would lose data)."""


# --------------------------------------------------------------------------- values


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a string like "2GiB", "512 M", "4096".

    K/M/G/T and KiB/MiB/GiB/TiB are all binary (powers of 1024). Raises
    ValueError (no range checks here).
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected bytes as an integer or a string like '2GiB', got {_describe(value)}")
    if isinstance(value, int):
        return value
    m = _SIZE_TEXT.fullmatch(value.strip())
    if not m or m[2] not in _SIZE_UNITS:
        units = "/".join(u for u in _SIZE_UNITS if u)
        raise ValueError(f"expected an integer number of bytes with an optional suffix {units}, "
                         f"got {value!r}")
    return int(m[1]) * _SIZE_UNITS[m[2]]


def format_size(n: int) -> str:
    """2147483648 -> "2 GiB"; sizes that are not a whole number of KiB stay in bytes."""
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


class Address(NamedTuple):
    """A TCP endpoint; unpacks as ``host, port = address``. str() gives "host:port"."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str, *, allow_unspecified: bool = False) -> Address:
    """Parse "host:port", "[ipv6]:port" into an Address; raises ValueError.

    The host is an IPv4 address, an IPv6 address in brackets or a DNS name.
    IP addresses are normalised ("[0:0::1]" -> "::1") and names lower-cased,
    so two spellings of the same endpoint compare equal. 0.0.0.0 and :: are
    refused unless ``allow_unspecified`` (a listener may bind them, a peer
    cannot connect to them).
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string 'host:port', got {_describe(text)}")
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected '[ipv6-address]:port', got {text!r}")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address (in {text!r})") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected 'host:port' (IPv6 as '[address]:port'), got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address must be in brackets, e.g. '[{host}]:{port}', got {text!r}")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ip = ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not a valid IPv4 address (in {text!r})") from None
        elif len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
            raise ValueError(f"{host!r} is not a valid IP address or host name (in {text!r})")
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535, got {port!r} (in {text!r})")
    if ip is None:
        return Address(host.lower(), int(port))
    if ip.is_unspecified and not allow_unspecified:
        raise ValueError(f"{text!r} is the unspecified address; give an address the peer can connect to")
    return Address(str(ip), int(port))


# --------------------------------------------------------------------------- tunables

SECONDS, BYTES, RATE, COUNT = "seconds", "bytes", "bytes/s", "count"


@dataclass(frozen=True)
class TunableSpec:
    """Type, default and valid range of one tunable (see ``TUNABLES``)."""

    unit: str  # SECONDS (float), BYTES / RATE (int, size strings allowed), COUNT (int)
    default: float | int
    minimum: float | int
    maximum: float | int
    #: If set, 0 is also accepted and means this ("off", "unlimited").
    zero: str | None = None
    power_of_two: bool = False
    #: False: stored in the volume metadata, adjust applies it only to a resource that is down.
    online: bool = True

    def show(self, value: float | int) -> str:
        if self.unit == SECONDS:
            return f"{value:g}"
        if self.unit == BYTES:
            return format_size(int(value))
        if self.unit == RATE:
            return format_size(int(value)) + "/s"
        return str(value)


def _tunable(unit: str, default: float | int, minimum: float | int, maximum: float | int, **kw: Any) -> Any:
    return field(default=default, metadata={"spec": TunableSpec(unit, default, minimum, maximum, **kw)})


@dataclass(frozen=True)
class Tunables:
    """Per-resource tunables. One line per tunable: name, type, unit, default, range.

    Meanings are in docs/engine-config.md (a test checks every one is there).
    Cross-checks between tunables live in ``_check_tunables``.
    """

    sync_timeout: float = _tunable(SECONDS, 1.0, 0.05, 60.0)
    congestion_fill: int = _tunable(BYTES, 64 * MiB, 4 * KiB, 16 * GiB, zero="off")
    resume_after: float = _tunable(SECONDS, 5.0, 0.0, 3600.0)
    connect_interval: float = _tunable(SECONDS, 1.0, 0.1, 120.0)
    connect_interval_max: float = _tunable(SECONDS, 10.0, 0.1, 3600.0)
    ping_interval: float = _tunable(SECONDS, 1.0, 0.1, 120.0)
    ping_timeout: float = _tunable(SECONDS, 0.5, 0.05, 60.0)
    max_epoch_writes: int = _tunable(COUNT, 2048, 1, 20000)
    al_extents: int = _tunable(COUNT, 1237, 67, 65534, online=False)
    bitmap_block_size: int = _tunable(BYTES, 4 * KiB, 4 * KiB, 1 * MiB, power_of_two=True, online=False)
    resync_rate_max: int = _tunable(RATE, 100 * MiB, 64 * KiB, 64 * GiB, zero="unlimited")
    resync_rate_min: int = _tunable(RATE, 4 * MiB, 64 * KiB, 64 * GiB)
    rp_interval: float = _tunable(SECONDS, 0.0, 1.0, 31 * DAY, zero="off")
    rp_keep: int = _tunable(COUNT, 24, 1, 10000)
    rp_max_age: float = _tunable(SECONDS, 0.0, 60.0, 366 * DAY, zero="off")

    def to_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: name -> TunableSpec, in declaration order.
TUNABLES: dict[str, TunableSpec] = {f.name: f.metadata["spec"] for f in dataclasses.fields(Tunables)}


# --------------------------------------------------------------------------- configuration objects


@dataclass(frozen=True)
class NodeConfig:
    """One of the two nodes: its name and the address of its replication listener."""

    name: str
    address: Address

    @property
    def host(self) -> str:
        return self.address.host

    @property
    def port(self) -> int:
        return self.address.port

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": str(self.address)}


@dataclass(frozen=True)
class VolumeConfig:
    """One volume (VM disk). ``metadata`` None = the engine derives the path."""

    number: int
    path: str
    size: int
    export: str
    metadata: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "path": self.path, "size": self.size, "export": self.export,
                "metadata": self.metadata}


@dataclass(frozen=True)
class NbdConfig:
    """The resource's NBD front end. ``socket`` None = derived by the engine; ``tcp`` None = no TCP."""

    socket: str | None = None
    tcp: Address | None = None
    #: Group that owns the Unix socket (mode 0660), e.g. "kvm" so that QEMU run by libvirt
    #: (user libvirt-qemu, group kvm) can connect; None = root's group.
    group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"socket": self.socket, "tcp": None if self.tcp is None else str(self.tcp),
                "group": self.group}


def default_secret_file(resource: str) -> str:
    """Where a resource's shared secret is unless ``security.secret_file`` says otherwise."""
    return f"{DEFAULT_SECRET_DIR}/{resource}.key"


@dataclass(frozen=True)
class SecurityConfig:
    """How the replication link is protected: mutual TLS plus the resource's shared secret.

    Only paths: the files are read when the resource starts (engine/security.py).
    ``secret_file`` is filled in by the parser (its default depends on the
    resource name); None, in a hand-built object, means that default.
    ``plaintext`` turns TLS and the secret off (benchmarks, debugging).
    """

    tls_cert: str = DEFAULT_TLS_CERT
    tls_key: str = DEFAULT_TLS_KEY
    tls_ca: str = DEFAULT_TLS_CA
    secret_file: str | None = None
    plaintext: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ResourceConfig:
    """One resource file, validated. ``volumes[i].number == i``."""

    name: str
    protocol: str
    local_node: str
    nodes: tuple[NodeConfig, NodeConfig]
    volumes: tuple[VolumeConfig, ...]
    tunables: Tunables = field(default_factory=Tunables)
    nbd: NbdConfig = field(default_factory=NbdConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: How recovery points are stored: "delta" (copy-before-write, any volume),
    #: "reflink" (FICLONE copies; file volumes on XFS/btrfs only) or "auto".
    rp_storage: str = "delta"
    #: The file it was loaded from (not part of equality or to_dict()).
    source: str | None = field(default=None, compare=False, repr=False)

    @property
    def local(self) -> NodeConfig:
        """This node."""
        return next(n for n in self.nodes if n.name == self.local_node)

    @property
    def peer(self) -> NodeConfig:
        """The other node."""
        return next(n for n in self.nodes if n.name != self.local_node)

    def volume(self, number: int) -> VolumeConfig:
        return self.volumes[number]

    def to_dict(self) -> dict[str, Any]:
        """Normalised, JSON-able form. ``parse_resource(cfg.to_dict()) == cfg``."""
        return {
            "resource": self.name,
            "protocol": self.protocol,
            "local_node": self.local_node,
            "nodes": [n.to_dict() for n in self.nodes],
            "volumes": [v.to_dict() for v in self.volumes],
            "tunables": self.tunables.to_dict(),
            "nbd": self.nbd.to_dict(),
            "security": self.security.to_dict(),
            "rp_storage": self.rp_storage,
        }


# --------------------------------------------------------------------------- parsing

_TOP_KEYS = ("resource", "protocol", "local_node", "nodes", "volumes", "tunables", "nbd", "security",
             "rp_storage")
RP_STORAGES = ("delta", "reflink", "auto")
_NODE_KEYS = ("name", "address")
_VOLUME_KEYS = ("number", "path", "size", "export", "metadata")
_NBD_KEYS = ("socket", "tcp", "group")
GROUP_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_SECURITY_PATHS = ("tls_cert", "tls_key", "tls_ca", "secret_file")
_SECURITY_KEYS = (*_SECURITY_PATHS, "plaintext")
_TOP_HINTS = {
    **{name: f"tunables go in the [tunables] table: tunables.{name}" for name in TUNABLES},
    **{k: f"it belongs in the [nbd] table: nbd.{k}" for k in _NBD_KEYS},
    **{k: f"it belongs in the [security] table: security.{k}" for k in _SECURITY_KEYS},
    **{k: "it belongs in a [[volumes]] table" for k in ("number", "path", "size", "export", "metadata")},
    "address": "it belongs in a [[nodes]] table",
    "name": "did you mean 'resource'?",
}


def finite_number(value: Any) -> bool:
    """A TOML or JSON number usable as a float: not a bool, not NaN or infinite, and not an
    integer too large for a float (TOML and JSON integers have no bound in Python)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _describe(value: Any) -> str:
    """How a TOML value is named in messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value}"  # datetime, date, time


def _got_bytes(raw: Any, n: int) -> str:
    """How a byte count the user wrote is echoed: 1000, 2097152 (2 MiB), '3K' (3072 bytes)."""
    if isinstance(raw, str):
        return f"{raw!r} ({n} bytes)"
    human = format_size(n)
    return str(n) if human == f"{n} bytes" else f"{n} ({human})"


def _join(parent: str, key: str) -> str:
    part = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
    return f"{parent}.{part}" if parent else part


class _Checker:
    """Collects the problems of one file, so the operator sees them all at once."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []

    def error(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.source, key, message))

    def table(self, value: Any, key: str, known: tuple[str, ...], required: tuple[str, ...],
              hints: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        """Check a table's keys (unknown, missing); returns it, or None if it is not a table."""
        if not isinstance(value, dict):
            self.error(key, f"expected a table, got {_describe(value)}")
            return None
        for k in value:
            if k not in known:
                close = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
                if close:
                    why = f"did you mean {close[0]!r}?"
                elif hints and k in hints:
                    why = hints[k]
                else:
                    why = "expected one of: " + ", ".join(known)
                self.error(_join(key, k), f"unknown key {k!r} ({why})")
        for k in required:
            if value.get(k) is None:
                self.error(_join(key, k), "missing required key")
        return value

    def array_of_tables(self, value: Any, key: str) -> list[Any] | None:
        if isinstance(value, dict):
            self.error(key, f"expected an array of tables (write each entry as [[{key}]]), got a table")
            return None
        if not isinstance(value, list):
            self.error(key, f"expected an array of tables ([[{key}]]), got {_describe(value)}")
            return None
        return value

    def string(self, key: str, value: Any) -> str | None:
        if not isinstance(value, str):
            self.error(key, f"expected a string, got {_describe(value)}")
            return None
        return value

    def integer(self, key: str, value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"expected an integer, got {_describe(value)}")
            return None
        return value

    def number(self, key: str, value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(key, f"expected a number of seconds, got {_describe(value)}")
            return None
        if not finite_number(value):
            self.error(key, f"expected a finite number, got {str(value)[:40]}")
            return None
        return float(value)

    def size(self, key: str, value: Any) -> int | None:
        try:
            return parse_size(value)
        except ValueError as e:
            self.error(key, str(e))
            return None

    def abspath(self, key: str, value: Any, *, max_bytes: int | None = None) -> str | None:
        text = self.string(key, value)
        if text is None:
            return None
        if not text.startswith("/"):
            self.error(key, f"must be an absolute path, got {text!r}")
        elif "\0" in text:
            self.error(key, "must not contain NUL characters")
        elif ".." in text.split("/"):
            self.error(key, f"must not contain '..', got {text!r}")
        else:
            norm = "/" + posixpath.normpath(text).lstrip("/")
            if norm == "/":
                self.error(key, "must name a file, got '/'")
            elif max_bytes is not None and len(os.fsencode(norm)) > max_bytes:
                self.error(key, f"must be at most {max_bytes} bytes long (AF_UNIX limit), got {len(norm)}")
            else:
                return norm
        return None

    def address(self, key: str, value: Any, *, allow_unspecified: bool = False) -> Address | None:
        text = self.string(key, value)
        if text is None:
            return None
        try:
            return parse_address(text, allow_unspecified=allow_unspecified)
        except ValueError as e:
            self.error(key, str(e))
            return None

    def tunable(self, key: str, spec: TunableSpec, value: Any) -> float | int | None:
        if spec.unit == SECONDS:
            v: float | int | None = self.number(key, value)
        elif spec.unit == COUNT:
            v = self.integer(key, value)
        else:
            v = self.size(key, value)
        if v is None:
            return None
        if v == 0 and spec.zero:
            return v
        got = _got_bytes(value, int(v)) if spec.unit in (BYTES, RATE) else spec.show(v)
        if not spec.minimum <= v <= spec.maximum:
            zero = f"0 ({spec.zero}) or " if spec.zero else ""
            self.error(key, f"must be {zero}between {spec.show(spec.minimum)} and {spec.show(spec.maximum)}"
                            f"{' seconds' if spec.unit == SECONDS else ''}, got {got}")
            return None
        if spec.power_of_two and int(v) & (int(v) - 1):
            self.error(key, f"must be a power of two, got {got}")
            return None
        return v


def parse_resource(data: Mapping[str, Any], *, source: str | os.PathLike[str] = "<resource>",
                   file_stem: str | None = None) -> ResourceConfig:
    """Validate a parsed resource document (a TOML table or a ``to_dict()`` result).

    ``source`` names the document in messages; with ``file_stem`` the resource
    name must equal it. None counts as absent. Raises ConfigError listing
    every problem found.
    """
    ck = _Checker(str(source))
    resource = _parse(ck, data, file_stem)
    if ck.problems or resource is None:
        raise ConfigError(ck.problems)
    return dataclasses.replace(resource, source=str(source))


def _parse(ck: _Checker, data: Any, file_stem: str | None) -> ResourceConfig | None:
    top = ck.table(data, "", _TOP_KEYS, ("resource", "protocol", "local_node", "nodes", "volumes"),
                   _TOP_HINTS)
    if top is None:
        return None

    name = None
    if top.get("resource") is not None and (raw := ck.string("resource", top["resource"])) is not None:
        if not RESOURCE_NAME.fullmatch(raw):
            ck.error("resource", f"must match ^{RESOURCE_NAME.pattern}$ (lower-case letters, digits, "
                                 f"'_', '.', '-'; at most 63 characters), got {raw!r}")
        else:
            name = raw
            if file_stem is not None and raw != file_stem:
                ck.error("resource", f"{raw!r} does not match the file name: resource {raw!r} must be in "
                                     f"{raw}.toml, this file is {file_stem}.toml")

    protocol = None
    if top.get("protocol") is not None and (raw := ck.string("protocol", top["protocol"])) is not None:
        if raw in PROTOCOLS:
            protocol = raw
        else:
            ck.error("protocol", f"must be 'C' (synchronous) or 'A' (asynchronous), got {raw!r}")

    rp_storage = "delta"
    if top.get("rp_storage") is not None and (raw := ck.string("rp_storage", top["rp_storage"])) is not None:
        if raw in RP_STORAGES:
            rp_storage = raw
        else:
            ck.error("rp_storage", f"must be 'delta', 'reflink' or 'auto', got {raw!r}")

    local_node = None
    if top.get("local_node") is not None:
        local_node = ck.string("local_node", top["local_node"])

    nodes, names = _parse_nodes(ck, top.get("nodes"))
    if names and local_node is not None and local_node not in names:
        ck.error("local_node", f"{local_node!r} is not one of the nodes ({', '.join(map(repr, names))})")

    volumes = _parse_volumes(ck, top.get("volumes"), name)

    tunables = Tunables()
    if top.get("tunables") is not None:
        tunables = _parse_tunables(ck, top["tunables"])

    nbd = NbdConfig()
    if top.get("nbd") is not None and (t := ck.table(top["nbd"], "nbd", _NBD_KEYS, ())) is not None:
        socket = None
        if t.get("socket") is not None:
            socket = ck.abspath("nbd.socket", t["socket"], max_bytes=UNIX_PATH_MAX)
        tcp = None
        if t.get("tcp") is not None:
            tcp = ck.address("nbd.tcp", t["tcp"], allow_unspecified=True)
        group = None
        if t.get("group") is not None:
            group = t["group"]
            if not isinstance(group, str) or not GROUP_NAME.fullmatch(group):
                ck.error("nbd.group", f"must be a group name ([a-z_][a-z0-9_-]*, at most 32), got {group!r}")
                group = None
        nbd = NbdConfig(socket, tcp, group)

    security = SecurityConfig()
    if top.get("security") is not None:
        security = _parse_security(ck, top["security"])

    if ck.problems or None in (name, protocol, local_node, nodes, volumes):
        return None
    assert name and protocol and local_node and nodes and volumes
    if security.secret_file is None:
        security = dataclasses.replace(security, secret_file=default_secret_file(name))
    return ResourceConfig(name, protocol, local_node, nodes, volumes, tunables, nbd, security, rp_storage)


def _parse_security(ck: _Checker, value: Any) -> SecurityConfig:
    t = ck.table(value, "security", _SECURITY_KEYS, ())
    if t is None:
        return SecurityConfig()
    values: dict[str, Any] = {}
    for key in _SECURITY_PATHS:
        if t.get(key) is not None and (path := ck.abspath(f"security.{key}", t[key])) is not None:
            values[key] = path
    if t.get("plaintext") is not None:
        if isinstance(t["plaintext"], bool):
            values["plaintext"] = t["plaintext"]
        else:
            ck.error("security.plaintext", f"expected true or false, got {_describe(t['plaintext'])}")
    return SecurityConfig(**values)


def _parse_nodes(ck: _Checker, value: Any) -> tuple[tuple[NodeConfig, NodeConfig] | None, list[str] | None]:
    """The two nodes (None if invalid) and their names (None unless every name is valid)."""
    if value is None or (items := ck.array_of_tables(value, "nodes")) is None:
        return None, None
    if len(items) != 2:
        ck.error("nodes", f"a resource has exactly 2 nodes (one per site), got {len(items)}")
    nodes: list[NodeConfig | None] = []
    names: list[str | None] = []
    addresses: list[Address | None] = []
    for i, item in enumerate(items):
        key = f"nodes[{i}]"
        name = address = None
        if (t := ck.table(item, key, _NODE_KEYS, _NODE_KEYS)) is not None:
            if t.get("name") is not None:
                name = ck.string(f"{key}.name", t["name"])
                if name is not None and not NODE_NAME.fullmatch(name):
                    ck.error(f"{key}.name", f"must match ^{NODE_NAME.pattern}$, got {name!r}")
                    name = None
            if t.get("address") is not None:
                address = ck.address(f"{key}.address", t["address"])
        if name is not None and name in names:
            ck.error(f"{key}.name", f"both nodes are named {name!r} (nodes[{names.index(name)}] too)")
        if address is not None and address in addresses:
            ck.error(f"{key}.address", f"both nodes have the address {address} "
                                       f"(nodes[{addresses.index(address)}] too)")
        names.append(name)
        addresses.append(address)
        nodes.append(NodeConfig(name, address) if name is not None and address is not None else None)
    valid_names = [n for n in names if n is not None]
    all_names = valid_names if len(valid_names) == len(names) else None
    if len(items) != 2 or nodes[0] is None or nodes[1] is None:
        return None, all_names
    return (nodes[0], nodes[1]), all_names


def _parse_volumes(ck: _Checker, value: Any, resource: str | None) -> tuple[VolumeConfig, ...] | None:
    if value is None or (items := ck.array_of_tables(value, "volumes")) is None:
        return None
    if not items:
        ck.error("volumes", "at least one volume is required (a [[volumes]] table)")
        return None
    volumes: list[VolumeConfig | None] = []
    exports: dict[str, str] = {}
    paths: dict[str, str] = {}
    for i, item in enumerate(items):
        key = f"volumes[{i}]"
        t = ck.table(item, key, _VOLUME_KEYS, ("number", "path", "size"))
        if t is None:
            volumes.append(None)
            continue
        number = path = size = export = metadata = None
        if t.get("number") is not None:
            number = ck.integer(f"{key}.number", t["number"])
            if number is not None and number != i:
                ck.error(f"{key}.number", f"volumes are numbered 0..{len(items) - 1} in the order they "
                                          f"are listed: expected {i}, got {number}")
                number = None
        if t.get("path") is not None:
            path = ck.abspath(f"{key}.path", t["path"])
        if t.get("size") is not None and (size := ck.size(f"{key}.size", t["size"])) is not None:
            got = f"{t['size']!r} ({size} bytes)" if isinstance(t["size"], str) else str(size)
            if size <= 0:
                ck.error(f"{key}.size", f"must be greater than 0, got {got}")
                size = None
            elif size % SIZE_ALIGN:
                ck.error(f"{key}.size", f"must be a multiple of {SIZE_ALIGN}, got {got}")
                size = None
            elif size > MAX_SIZE:
                ck.error(f"{key}.size", f"must be at most {MAX_SIZE}, got {got}")
                size = None
        if t.get("export") is not None:
            if (export := ck.string(f"{key}.export", t["export"])) is not None and \
                    not EXPORT_NAME.fullmatch(export):
                ck.error(f"{key}.export", f"must match ^{EXPORT_NAME.pattern}$, got {export!r}")
                export = None
        elif resource is not None and number is not None:
            export = f"{resource}/{number}"
        if t.get("metadata") is not None:
            metadata = ck.abspath(f"{key}.metadata", t["metadata"])

        if export is not None:
            if export in exports:
                ck.error(f"{key}.export", f"export name {export!r} is already used by {exports[export]}")
            exports.setdefault(export, key)
        for what, p in (("path", path), ("metadata", metadata)):
            if p is not None:
                if p in paths:
                    ck.error(f"{key}.{what}", f"{p!r} is already used as {paths[p]}")
                paths.setdefault(p, f"{key}.{what}")
        if number is not None and path is not None and size is not None and export is not None:
            volumes.append(VolumeConfig(number, path, size, export, metadata))
        else:
            volumes.append(None)
    if None in volumes:
        return None
    return tuple(v for v in volumes if v is not None)


def _parse_tunables(ck: _Checker, value: Any) -> Tunables:
    t = ck.table(value, "tunables", tuple(TUNABLES), ())
    if t is None:
        return Tunables()
    values: dict[str, float | int] = {}
    for name, spec in TUNABLES.items():
        if t.get(name) is not None and (v := ck.tunable(f"tunables.{name}", spec, t[name])) is not None:
            values[name] = v
    tunables = Tunables(**values)
    _check_tunables(ck, tunables, set(values))
    return tunables


def _check_tunables(ck: _Checker, t: Tunables, given: set[str]) -> None:
    """Rules that involve more than one tunable."""
    if t.resync_rate_max and t.resync_rate_min > t.resync_rate_max:
        default = "" if "resync_rate_min" in given else " (the default)"
        ck.error("tunables.resync_rate_min",
                 f"must not exceed tunables.resync_rate_max ({format_size(t.resync_rate_max)}/s), "
                 f"got {format_size(t.resync_rate_min)}/s{default}")
    if t.connect_interval_max < t.connect_interval:
        default = "" if "connect_interval_max" in given else " (the default)"
        ck.error("tunables.connect_interval_max",
                 f"must be at least tunables.connect_interval ({t.connect_interval:g}), "
                 f"got {t.connect_interval_max:g}{default}")
    if t.ping_timeout >= t.ping_interval:
        default = "" if "ping_timeout" in given else " (the default)"
        ck.error("tunables.ping_timeout", f"must be less than tunables.ping_interval ({t.ping_interval:g}), "
                                          f"got {t.ping_timeout:g}{default}")


# --------------------------------------------------------------------------- loading


def _read_toml(path: Path, source: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([Problem(source, "", f"cannot read the file: {e.strerror or e}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(source, "", f"not valid UTF-8 (byte {e.start})")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message, where = str(e), ""
        m = re.search(r" \(at line (\d+), column (\d+)\)$", message)
        if m:
            message, where = message[: m.start()], f"line {m[1]}, column {m[2]}"
        elif message.endswith(" (at end of document)"):
            message, where = message.removesuffix(" (at end of document)"), "end of file"
        raise ConfigError([Problem(source, where, f"TOML syntax error: {message}")]) from None


def load_resource(path: str | os.PathLike[str]) -> ResourceConfig:
    """Load one resource file; its name without .toml must be the resource name."""
    p = Path(path)
    return parse_resource(_read_toml(p, str(path)), source=str(path), file_stem=p.stem)


def load_files(paths: Iterable[str | os.PathLike[str]],
               summary: str | None = None) -> dict[str, ResourceConfig]:
    """Load resource files that run together on one node; all or nothing.

    Besides each file's own checks: resource names, export names, backing
    and metadata paths, NBD sockets and TCP listeners must be unique across
    the files (each resource has its own NBD listener). Returns the
    resources sorted by name, or raises one ConfigError listing every problem.
    """
    problems: list[Problem] = []
    loaded: list[ResourceConfig] = []
    for path in paths:
        try:
            loaded.append(load_resource(path))
        except ConfigError as e:
            problems.extend(e.problems)
    problems.extend(_conflicts(loaded))
    if problems:
        sources = {p.source for p in problems}
        raise ConfigError(problems, summary=summary or f"{_plural(len(problems), 'error')} in "
                                                       f"{_plural(len(sources), 'file')}")
    return {r.name: r for r in sorted(loaded, key=lambda r: r.name)}


def load_directory(directory: str | os.PathLike[str] = DEFAULT_DIRECTORY) -> dict[str, ResourceConfig]:
    """Load every ``*.toml`` in ``directory`` (hidden files skipped); see ``load_files``.

    An entry that cannot be read (a dangling symlink, a directory named
    x.toml) is an error, not skipped: skipping would make adjust remove it.
    An empty directory gives {}; a missing one is an error.
    """
    d = Path(directory)
    try:
        with os.scandir(d) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(".toml") and not e.name.startswith("."))
    except OSError as e:
        problem = Problem(str(directory), "", f"cannot read the directory: {e.strerror or e}")
        raise ConfigError([problem]) from None
    try:
        return load_files([d / n for n in names])
    except ConfigError as e:
        sources = {p.source for p in e.problems}
        raise ConfigError(e.problems, summary=f"{directory}: {_plural(len(e.problems), 'error')} in "
                                              f"{_plural(len(sources), 'file')}") from None


def _conflicts(resources: list[ResourceConfig]) -> list[Problem]:
    """What must be unique across the resources of one node."""
    problems: list[Problem] = []
    names: dict[str, ResourceConfig] = {}
    exports: dict[str, str] = {}
    paths: dict[str, str] = {}
    sockets: dict[str, str] = {}
    listeners: list[tuple[Address, str]] = []
    for r in resources:
        src = r.source or r.name
        if r.name in names:
            problems.append(Problem(src, "resource", f"resource {r.name!r} is also defined in "
                                                     f"{names[r.name].source or r.name}"))
            continue
        names[r.name] = r
        for v in r.volumes:
            key = f"volumes[{v.number}]"
            if v.export in exports:
                problems.append(Problem(src, f"{key}.export",
                                        f"export name {v.export!r} is already used by {exports[v.export]}"))
            for what, p in (("path", v.path), ("metadata", v.metadata)):
                if p is not None and p in paths:
                    problems.append(Problem(src, f"{key}.{what}", f"{p!r} is already used by {paths[p]}"))
        if r.nbd.socket is not None:
            if r.nbd.socket in sockets:
                problems.append(Problem(src, "nbd.socket",
                                        f"{r.nbd.socket!r} is already used by {sockets[r.nbd.socket]}"))
            sockets.setdefault(r.nbd.socket, f"{src} (nbd.socket)")
        if r.nbd.tcp is not None:
            for other, where in listeners:
                if _overlap(other, r.nbd.tcp):
                    problems.append(Problem(src, "nbd.tcp", f"{r.nbd.tcp} overlaps {other} of {where}"))
                    break
            listeners.append((r.nbd.tcp, f"{src} (nbd.tcp)"))
        for v in r.volumes:
            exports.setdefault(v.export, f"{src} (volumes[{v.number}].export)")
            paths.setdefault(v.path, f"{src} (volumes[{v.number}].path)")
            if v.metadata is not None:
                paths.setdefault(v.metadata, f"{src} (volumes[{v.number}].metadata)")
    return problems


def _overlap(a: Address, b: Address) -> bool:
    """Whether two TCP listeners would fight over a port ([::] is dual-stack on Linux)."""
    if a.port != b.port:
        return False
    if a.host == b.host or "::" in (a.host, b.host):
        return True
    return ("0.0.0.0" in (a.host, b.host)) and ":" not in a.host + b.host


# --------------------------------------------------------------------------- diff

#: Every kind of action, in the order adjust applies them: removals first (they
#: free export names and paths that additions may reuse), then in-place changes,
#: then additions.
ACTION_KINDS = (
    "remove-resource",
    "remove-volume",
    "change-protocol",
    "change-peer",
    "change-security",
    "change-tunables",
    "change-nbd",
    "change-rp-storage",
    "resize-volume",
    "add-volume",
    "add-resource",
)
_RANK = {kind: i for i, kind in enumerate(ACTION_KINDS)}


@dataclass(frozen=True)
class Action:
    """One step of an adjust plan. ``detail`` is JSON-able; see docs/engine-config.md."""

    kind: str
    resource: str
    detail: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in _RANK:
            raise ValueError(f"unknown action kind {self.kind!r}")

    @property
    def needs_down(self) -> bool:
        """True if the engine must not apply this while the resource (or volume) is in use."""
        if self.kind in ("remove-resource", "remove-volume"):
            return True
        return self.kind == "change-tunables" and any(not TUNABLES[k].online for k in self.detail)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "resource": self.resource, "detail": dict(self.detail),
                "needs_down": self.needs_down}

    def __str__(self) -> str:
        return f"{self.resource}: {self.kind} {json.dumps(self.detail, sort_keys=True)}"


def _change(old: Any, new: Any) -> dict[str, Any]:
    return {"old": old, "new": new}


def diff(running: Mapping[str, ResourceConfig], desired: Mapping[str, ResourceConfig]) -> list[Action]:
    """The actions that turn ``running`` into ``desired``; [] when they are equal.

    Raises UnsafeChange (listing every refused change) instead of returning a
    plan that would shrink a volume or change which node this is.
    """
    actions: list[Action] = []
    problems: list[Problem] = []
    for name in running.keys() - desired.keys():
        actions.append(Action("remove-resource", name, {}))
    for name in desired.keys() - running.keys():
        actions.append(Action("add-resource", name, {"config": desired[name].to_dict()}))
    for name in running.keys() & desired.keys():
        _diff_resource(running[name], desired[name], actions, problems)
    if problems:
        problems.sort(key=lambda p: (p.source, p.key))
        raise UnsafeChange(problems, summary=f"adjust refuses {_plural(len(problems), 'change')}")
    actions.sort(key=lambda a: (_RANK[a.kind], a.resource, a.detail.get("volume", -1)))
    return actions


def _diff_resource(old: ResourceConfig, new: ResourceConfig, actions: list[Action],
                   problems: list[Problem]) -> None:
    name, src = new.name, new.source or new.name

    if old.local_node != new.local_node:
        problems.append(Problem(src, "local_node", (
            f"the running resource is on node {old.local_node!r}, the file says this is "
            f"{new.local_node!r}: a node cannot change its identity online (check the file; to really "
            f"do it, remove the resource and add it back)")))
    else:
        peer: dict[str, Any] = {}
        if old.local.address != new.local.address:
            peer["local_address"] = _change(str(old.local.address), str(new.local.address))
        if old.peer.name != new.peer.name:
            peer["peer_name"] = _change(old.peer.name, new.peer.name)
        if old.peer.address != new.peer.address:
            peer["peer_address"] = _change(str(old.peer.address), str(new.peer.address))
        if peer:
            actions.append(Action("change-peer", name, peer))

    if old.protocol != new.protocol:
        actions.append(Action("change-protocol", name, _change(old.protocol, new.protocol)))
    if old.rp_storage != new.rp_storage:
        # Read when the resource starts, and only for volumes without RPs yet.
        actions.append(Action("change-rp-storage", name, _change(old.rp_storage, new.rp_storage)))

    old_s, new_s = old.security.to_dict(), new.security.to_dict()
    security = {k: _change(old_s[k], new_s[k]) for k in _SECURITY_KEYS if old_s[k] != new_s[k]}
    if security:
        actions.append(Action("change-security", name, security))

    old_t, new_t = old.tunables.to_dict(), new.tunables.to_dict()
    tunables = {k: _change(old_t[k], new_t[k]) for k in TUNABLES if old_t[k] != new_t[k]}
    if tunables:
        actions.append(Action("change-tunables", name, tunables))

    nbd: dict[str, Any] = {}
    if old.nbd.socket != new.nbd.socket:
        nbd["socket"] = _change(old.nbd.socket, new.nbd.socket)
    if old.nbd.tcp != new.nbd.tcp:
        nbd["tcp"] = _change(old.nbd.to_dict()["tcp"], new.nbd.to_dict()["tcp"])
    if old.nbd.group != new.nbd.group:
        nbd["group"] = _change(old.nbd.group, new.nbd.group)
    renamed = []

    for n in range(max(len(old.volumes), len(new.volumes))):
        was = old.volumes[n] if n < len(old.volumes) else None
        now = new.volumes[n] if n < len(new.volumes) else None
        if was is not None and now is None:
            actions.append(Action("remove-volume", name, {"volume": n, "reason": "removed", **_vol(was)}))
        elif was is None and now is not None:
            actions.append(Action("add-volume", name, {"volume": n, **_vol(now)}))
        elif was is not None and now is not None and was != now:
            replaced = [k for k in ("path", "metadata") if getattr(was, k) != getattr(now, k)]
            if replaced:
                reason = " and ".join(replaced) + " changed"
                actions.append(Action("remove-volume", name, {"volume": n, "reason": reason, **_vol(was)}))
                actions.append(Action("add-volume", name, {"volume": n, "reason": reason, **_vol(now)}))
                continue
            if now.size < was.size:
                problems.append(Problem(src, f"volumes[{n}].size", (
                    f"refusing to shrink volume {n} from {format_size(was.size)} to {format_size(now.size)}: "
                    f"the data beyond the new end would be lost. Volumes only grow online; shrink the "
                    f"file system inside the VM first and replace the volume offline")))
            elif now.size > was.size:
                actions.append(Action("resize-volume", name,
                                      {"volume": n, "old_size": was.size, "new_size": now.size}))
            if was.export != now.export:
                renamed.append({"volume": n, "old": was.export, "new": now.export})
    if renamed:
        nbd["exports"] = renamed
    if nbd:
        actions.append(Action("change-nbd", name, nbd))


def _vol(v: VolumeConfig) -> dict[str, Any]:
    d = v.to_dict()
    del d["number"]
    return d
