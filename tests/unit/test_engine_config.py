"""Resource files (tandem.engine.config): parsing, error messages, directory loading, diff."""

from __future__ import annotations

import ast
import copy
import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.engine import config
from tandem.engine.config import (
    ACTION_KINDS,
    TUNABLES,
    Action,
    Address,
    ConfigError,
    ResourceConfig,
    Tunables,
    UnsafeChange,
    diff,
    load_directory,
    load_files,
    load_resource,
    parse_address,
    parse_resource,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30
MiB = 1 << 20

EXAMPLE = """\
# /etc/tandem/resources.d/web01.toml
resource = "web01"
protocol = "C"
local_node = "hv-a1"

[[nodes]]
name = "hv-a1"
address = "10.202.110.11:7788"

[[nodes]]
name = "hv-b1"
address = "10.202.120.11:7788"

[[volumes]]
number = 0
path = "/srv/tandem/web01/disk0.img"
size = "2GiB"
export = "web01/disk0"

[tunables]
sync_timeout = 1.0
"""

# The base document for the table of bad inputs: the example plus a second volume.
BASE = {
    "resource": "web01",
    "protocol": "C",
    "local_node": "hv-a1",
    "nodes": [
        {"name": "hv-a1", "address": "10.202.110.11:7788"},
        {"name": "hv-b1", "address": "10.202.120.11:7788"},
    ],
    "volumes": [
        {"number": 0, "path": "/srv/tandem/web01/disk0.img", "size": "2GiB", "export": "web01/disk0"},
        {"number": 1, "path": "/dev/vg0/web01-data", "size": "10GiB"},
    ],
    "tunables": {"sync_timeout": 1.0},
}


# --------------------------------------------------------------------------- helpers


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(doc: dict) -> str:
    """A small TOML writer for the tests (None = key left out, as in a real file)."""
    def is_aot(v):
        return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)

    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items()
             if v is not None and not isinstance(v, dict) and not is_aot(v)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines += ["", f"[{_toml_key(k)}]"]
            lines += [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None]
        elif is_aot(v):
            for item in v:
                lines += ["", f"[[{_toml_key(k)}]]"]
                lines += [f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in item.items() if vv is not None]
    return "\n".join(lines) + "\n"


DELETE = object()


def edited(doc: dict, edits: dict) -> dict:
    """Copy of doc with edits {"volumes.1.size": value or DELETE} applied."""
    doc = copy.deepcopy(doc)
    for path, value in edits.items():
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        elif value is DELETE:
            del node[last]
        else:
            node[last] = value
    return doc


def write(directory: Path, name: str, content: str | bytes | dict) -> Path:
    path = directory / name
    if isinstance(content, dict):
        content = to_toml(content)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def problem(exc: ConfigError, key: str, fragment: str) -> config.Problem:
    found = [p for p in exc.problems if p.key == key and fragment in p.message]
    assert found, f"no problem at {key!r} containing {fragment!r} in:\n{exc}"
    assert str(found[0]) in str(exc)
    return found[0]


# --------------------------------------------------------------------------- good files


def test_example_file_loads(tmp_path):
    path = write(tmp_path, "web01.toml", EXAMPLE)
    r = load_resource(path)
    assert r.name == "web01"
    assert r.protocol == "C"
    assert r.source == str(path)
    assert r.local.name == "hv-a1" and r.peer.name == "hv-b1"
    assert r.local.address == Address("10.202.110.11", 7788)
    assert (r.peer.host, r.peer.port) == ("10.202.120.11", 7788)
    host, port = r.peer.address
    assert (host, port) == ("10.202.120.11", 7788)
    assert str(r.peer.address) == "10.202.120.11:7788"
    (vol,) = r.volumes
    assert vol == config.VolumeConfig(0, "/srv/tandem/web01/disk0.img", 2 * GiB, "web01/disk0", None)
    assert r.volume(0) is vol
    assert r.tunables == Tunables()
    assert r.nbd == config.NbdConfig(None, None)
    assert r.security == config.SecurityConfig(
        "/etc/tandem/tls/node.crt", "/etc/tandem/tls/node.key", "/etc/tandem/tls/ca.crt",
        "/etc/tandem/secrets/web01.key", plaintext=False)


def test_to_dict_is_normalised_and_json_able(tmp_path):
    r = load_resource(write(tmp_path, "web01.toml", BASE))
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["volumes"] == [
        {"number": 0, "path": "/srv/tandem/web01/disk0.img", "size": 2 * GiB, "export": "web01/disk0",
         "metadata": None},
        {"number": 1, "path": "/dev/vg0/web01-data", "size": 10 * GiB, "export": "web01/1", "metadata": None},
    ]
    assert d["tunables"] == {
        "sync_timeout": 1.0, "congestion_fill": 64 * MiB, "resume_after": 5.0, "connect_interval": 1.0,
        "connect_interval_max": 10.0,
        "ping_interval": 1.0, "ping_timeout": 0.5, "max_epoch_writes": 2048, "al_extents": 1237,
        "bitmap_block_size": 4096, "resync_rate_max": 100 * MiB, "resync_rate_min": 4 * MiB,
        "rp_interval": 0.0, "rp_keep": 24, "rp_max_age": 0.0,
    }
    assert d["nodes"] == [{"name": "hv-a1", "address": "10.202.110.11:7788"},
                          {"name": "hv-b1", "address": "10.202.120.11:7788"}]
    assert d["nbd"] == {"socket": None, "tcp": None, "group": None}
    assert d["security"] == {
        "tls_cert": "/etc/tandem/tls/node.crt", "tls_key": "/etc/tandem/tls/node.key",
        "tls_ca": "/etc/tandem/tls/ca.crt", "secret_file": "/etc/tandem/secrets/web01.key",
        "plaintext": False}
    assert list(d) == ["resource", "protocol", "local_node", "nodes", "volumes", "tunables", "nbd",
                       "security", "rp_storage"]


GOOD = {
    "example": {},
    "protocol-a-ipv6": {
        "protocol": "A", "local_node": "hv-b1",
        "nodes.0.address": "[fd00:202:110::11]:7788", "nodes.1.address": "[FD00:202:120:0:0::11]:7789",
    },
    "host-names": {"nodes.0.address": "HV-A1.dr.example:7788", "nodes.1.address": "hv-b1.dr.example:7788"},
    "explicit-everything": {
        "volumes.1.export": "web01-data", "volumes.1.metadata": "/var/lib/tandem/web01-1.md",
        "volumes.1.size": 10 * GiB,
        "tunables": {"sync_timeout": 0.25, "congestion_fill": "0", "resume_after": 30, "connect_interval": 2,
                     "ping_interval": 2.5, "ping_timeout": 1, "max_epoch_writes": 100, "al_extents": 6433,
                     "bitmap_block_size": "64KiB", "resync_rate_max": 0, "rp_interval": 3600,
                     "rp_keep": 48},
        "nbd": {"socket": "/run/tandem/web01.sock", "tcp": "[::]:10809"},
    },
    "three-volumes": {"volumes": [
        {"number": 0, "path": "/a", "size": "4K"},
        {"number": 1, "path": "/b", "size": "1 M", "metadata": "/b.md"},
        {"number": 2, "path": "/c", "size": 4096 * 3},
    ]},
    "nbd-tcp-only": {"nbd": {"tcp": "0.0.0.0:10809"}},
    "nbd-group": {"nbd": {"group": "kvm"}},
    "security-explicit": {"security": {
        "tls_cert": "/etc/pki/tandem/hv-a1.pem", "tls_key": "/etc/pki/tandem/hv-a1.key",
        "tls_ca": "/etc/pki/tandem/site-b-ca.pem", "secret_file": "/etc/tandem/secrets/shared.key",
        "plaintext": False}},
    "security-partial": {"security": {"tls_ca": "/etc/tandem/tls/bundle.pem"}},
    "plaintext": {"security": {"plaintext": True}},
    "no-tunables": {"tunables": DELETE},
}


@pytest.mark.parametrize("edits", GOOD.values(), ids=GOOD.keys())
def test_good_files_round_trip_through_to_dict(tmp_path, edits):
    doc = edited(BASE, edits)
    r = load_resource(write(tmp_path, "web01.toml", doc))
    d = r.to_dict()
    # to_dict() is accepted as input and gives the same resource ...
    assert parse_resource(d) == r
    assert parse_resource(json.loads(json.dumps(d))).to_dict() == d
    # ... and so is to_dict() written back as a TOML file.
    (tmp_path / "again").mkdir()
    again = load_resource(write(tmp_path / "again", "web01.toml", d))
    assert again == r and again.to_dict() == d


def test_values_are_normalised(tmp_path):
    doc = edited(BASE, {
        "local_node": "hv-b1",
        "nodes.0.address": "HV-A1.Example:7788", "nodes.1.address": "[0:0::1]:7788",
        "volumes.0.path": "//srv//tandem/./web01/disk0.img/", "volumes.1.size": "3 GiB",
        "tunables": {"sync_timeout": 2, "congestion_fill": "1M", "bitmap_block_size": 8192},
        "nbd": {"socket": "/run//tandem/web01.sock", "tcp": "[::]:10809"},
        "security": {"tls_cert": "/etc//tandem/./tls/a.crt", "secret_file": "/etc/tandem/secrets//web01.key"},
    })
    r = load_resource(write(tmp_path, "web01.toml", doc))
    assert r.nodes[0].address == Address("hv-a1.example", 7788)
    assert r.local.address == Address("::1", 7788) and str(r.local.address) == "[::1]:7788"
    assert r.peer.name == "hv-a1"
    assert r.volumes[0].path == "/srv/tandem/web01/disk0.img"
    assert r.volumes[1].size == 3 * GiB
    assert r.tunables.sync_timeout == 2.0 and isinstance(r.tunables.sync_timeout, float)
    assert r.tunables.congestion_fill == MiB
    assert r.tunables.bitmap_block_size == 8192
    assert r.nbd == config.NbdConfig("/run/tandem/web01.sock", Address("::", 10809))
    assert r.security.tls_cert == "/etc/tandem/tls/a.crt"
    # The default secret file, written out, is the same configuration as leaving it out.
    assert r.security == dataclasses.replace(config.SecurityConfig(), tls_cert="/etc/tandem/tls/a.crt",
                                             secret_file="/etc/tandem/secrets/web01.key")
    assert r.to_dict()["nbd"] == {"socket": "/run/tandem/web01.sock", "tcp": "[::]:10809", "group": None}


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), (8192, 8192), ("4K", 4096), ("4KiB", 4096), ("2M", 2 * MiB), ("2 MiB", 2 * MiB),
    ("2G", 2 * GiB), ("2GiB", 2 * GiB), ("1T", 1 << 40), ("1TiB", 1 << 40),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["2GB", "1.5G", "G", "", "-4K", "2 g", "0x1000"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="optional suffix K/KiB/M/MiB/G/GiB/T/TiB"):
        parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1:7788", ("10.0.0.1", 7788)),
    ("[::1]:7788", ("::1", 7788)),
    ("[fd00:0:0::1]:1", ("fd00::1", 1)),
    ("node-b.example.net:65535", ("node-b.example.net", 65535)),
    ("localhost:7788", ("localhost", 7788)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


def test_unspecified_address_only_for_listeners():
    assert parse_address("0.0.0.0:10809", allow_unspecified=True) == ("0.0.0.0", 10809)
    with pytest.raises(ValueError, match="unspecified address"):
        parse_address("[::]:7788")


# --------------------------------------------------------------------------- bad files

BAD = [
    # (edits to BASE, key path, message fragment)
    pytest.param({"resource": DELETE}, "resource", "missing required key", id="missing-resource"),
    pytest.param({"protocol": DELETE}, "protocol", "missing required key", id="missing-protocol"),
    pytest.param({"local_node": DELETE}, "local_node", "missing required key", id="missing-local-node"),
    pytest.param({"nodes": DELETE}, "nodes", "missing required key", id="missing-nodes"),
    pytest.param({"volumes": DELETE}, "volumes", "missing required key", id="missing-volumes"),
    pytest.param({"resource": 1}, "resource", "expected a string, got integer 1", id="resource-int"),
    pytest.param({"resource": "Web01"}, "resource",
                 "must match ^[a-z0-9][a-z0-9_.-]{0,62}$ (lower-case letters, digits, '_', '.', '-'; "
                 "at most 63 characters), got 'Web01'", id="resource-upper-case"),
    pytest.param({"resource": "web01\n"}, "resource", "must match", id="resource-trailing-newline"),
    pytest.param({"resource": "-web01"}, "resource", "must match", id="resource-leading-dash"),
    pytest.param({"resource": "a" * 64}, "resource", "must match", id="resource-too-long"),
    pytest.param({"resource": "web02", "volumes.1.export": "x"}, "resource",
                 "'web02' does not match the file name: resource 'web02' must be in web02.toml, "
                 "this file is web01.toml", id="resource-not-file-stem"),
    pytest.param({"protocol": "B"}, "protocol", "must be 'C' (synchronous) or 'A' (asynchronous), got 'B'",
                 id="protocol-b"),
    pytest.param({"protocol": "c"}, "protocol", "got 'c'", id="protocol-lower-case"),
    pytest.param({"protocol": True}, "protocol", "expected a string, got boolean true", id="protocol-bool"),
    pytest.param({"protocol": datetime.date(2026, 11, 29)}, "protocol",
                 "expected a string, got date 2026-11-29", id="protocol-date"),
    pytest.param({"protocl": "C"}, "protocl", "unknown key 'protocl' (did you mean 'protocol'?)",
                 id="typo-top"),
    pytest.param({"sync_timeout": 2.0}, "sync_timeout",
                 "unknown key 'sync_timeout' (tunables go in the [tunables] table: tunables.sync_timeout)",
                 id="tunable-at-top-level"),
    pytest.param({"tcp": "[::1]:10809"}, "tcp", "(it belongs in the [nbd] table: nbd.tcp)",
                 id="nbd-key-at-top-level"),
    pytest.param({"tls_cert": "/etc/a.crt"}, "tls_cert",
                 "(it belongs in the [security] table: security.tls_cert)", id="security-key-at-top-level"),
    pytest.param({"tunables.sync_timout": 2.0}, "tunables.sync_timout",
                 "unknown key 'sync_timout' (did you mean 'sync_timeout'?)", id="typo-tunable"),
    pytest.param({"tunables.foo bar": 1}, 'tunables."foo bar"', "unknown key 'foo bar'", id="quoted-key"),
    pytest.param({"volumes.0.colour": "red"}, "volumes[0].colour",
                 "unknown key 'colour' (expected one of: number, path, size, export, metadata)",
                 id="unknown-volume-key"),
    pytest.param({"nodes.1.adress": "x"}, "nodes[1].adress", "(did you mean 'address'?)", id="typo-node"),
    pytest.param({"nbd": {"sokcet": "/run/x.sock"}}, "nbd.sokcet", "(did you mean 'socket'?)", id="typo-nbd"),
    # nodes
    pytest.param({"local_node": "hv-c1"}, "local_node", "'hv-c1' is not one of the nodes ('hv-a1', 'hv-b1')",
                 id="local-node-unknown"),
    pytest.param({"nodes": [BASE["nodes"][0]]}, "nodes",
                 "a resource has exactly 2 nodes (one per site), got 1", id="one-node"),
    pytest.param({"nodes": [*BASE["nodes"], {"name": "hv-c1", "address": "10.0.0.3:7788"}]}, "nodes",
                 "exactly 2 nodes (one per site), got 3", id="three-nodes"),
    pytest.param({"nodes": {"name": "hv-a1", "address": "10.0.0.1:7788"}}, "nodes",
                 "expected an array of tables (write each entry as [[nodes]]), got a table",
                 id="nodes-table-not-array"),
    pytest.param({"nodes": "hv-a1"}, "nodes", "expected an array of tables ([[nodes]]), got string 'hv-a1'",
                 id="nodes-string"),
    pytest.param({"nodes.1.name": "hv-a1"}, "nodes[1].name", "both nodes are named 'hv-a1' (nodes[0] too)",
                 id="same-node-name"),
    pytest.param({"nodes.0.address": "[::1]:7788", "nodes.1.address": "[0:0::1]:7788"}, "nodes[1].address",
                 "both nodes have the address [::1]:7788 (nodes[0] too)", id="same-address"),
    pytest.param({"nodes.0.name": "hv a1", "local_node": "hv-b1"}, "nodes[0].name",
                 "must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$, got 'hv a1'", id="node-name-space"),
    pytest.param({"nodes.0.address": DELETE}, "nodes[0].address", "missing required key",
                 id="node-no-address"),
    pytest.param({"nodes.0.address": "10.0.0.1"}, "nodes[0].address",
                 "expected 'host:port' (IPv6 as '[address]:port'), got '10.0.0.1'", id="address-no-port"),
    pytest.param({"nodes.0.address": "10.0.0.1:0"}, "nodes[0].address",
                 "the port must be a number from 1 to 65535, got '0'", id="port-0"),
    pytest.param({"nodes.0.address": "10.0.0.1:65536"}, "nodes[0].address", "got '65536'", id="port-65536"),
    pytest.param({"nodes.0.address": "10.0.0.1:http"}, "nodes[0].address", "got 'http'", id="port-name"),
    pytest.param({"nodes.0.address": "fd00::1:7788"}, "nodes[0].address",
                 "an IPv6 address must be in brackets, e.g. '[fd00::1]:7788'", id="ipv6-no-brackets"),
    pytest.param({"nodes.0.address": "[fd00::zz]:7788"}, "nodes[0].address",
                 "'fd00::zz' is not a valid IPv6 address", id="ipv6-invalid"),
    pytest.param({"nodes.0.address": "[fd00::1]7788"}, "nodes[0].address",
                 "expected '[ipv6-address]:port'", id="ipv6-no-colon"),
    pytest.param({"nodes.0.address": "10.202.110.256:7788"}, "nodes[0].address",
                 "'10.202.110.256' is not a valid IPv4 address", id="ipv4-invalid"),
    pytest.param({"nodes.0.address": "-hv-.example:7788"}, "nodes[0].address",
                 "'-hv-.example' is not a valid IP address or host name", id="host-name-invalid"),
    pytest.param({"nodes.0.address": "0.0.0.0:7788"}, "nodes[0].address",
                 "'0.0.0.0:7788' is the unspecified address", id="address-unspecified"),
    pytest.param({"nodes.0.address": 7788}, "nodes[0].address", "expected a string, got integer 7788",
                 id="address-int"),
    # volumes
    pytest.param({"volumes": []}, "volumes", "at least one volume is required (a [[volumes]] table)",
                 id="no-volumes"),
    pytest.param({"volumes": {"number": 0}}, "volumes",
                 "expected an array of tables (write each entry as [[volumes]]), got a table",
                 id="volumes-table-not-array"),
    pytest.param({"volumes.0.number": 1}, "volumes[0].number",
                 "volumes are numbered 0..1 in the order they are listed: expected 0, got 1",
                 id="volume-number-wrong"),
    pytest.param({"volumes.1.number": 0}, "volumes[1].number", "expected 1, got 0", id="volume-number-dup"),
    pytest.param({"volumes.1.number": 5}, "volumes[1].number", "expected 1, got 5", id="volume-number-gap"),
    pytest.param({"volumes.0.number": True}, "volumes[0].number", "expected an integer, got boolean true",
                 id="volume-number-bool"),
    pytest.param({"volumes.0.number": DELETE}, "volumes[0].number", "missing required key",
                 id="volume-number-missing"),
    pytest.param({"volumes.0.path": "srv/disk0.img"}, "volumes[0].path",
                 "must be an absolute path, got 'srv/disk0.img'", id="path-relative"),
    pytest.param({"volumes.0.path": "/srv/../etc/shadow"}, "volumes[0].path", "must not contain '..'",
                 id="path-dotdot"),
    pytest.param({"volumes.0.path": "/"}, "volumes[0].path", "must name a file, got '/'", id="path-root"),
    pytest.param({"volumes.0.path": ["/a"]}, "volumes[0].path", "expected a string, got an array",
                 id="path-array"),
    pytest.param({"volumes.0.path": DELETE}, "volumes[0].path", "missing required key", id="path-missing"),
    pytest.param({"volumes.1.size": 1000}, "volumes[1].size", "must be a multiple of 4096, got 1000",
                 id="size-not-aligned"),
    pytest.param({"volumes.1.size": "3K"}, "volumes[1].size",
                 "must be a multiple of 4096, got '3K' (3072 bytes)", id="size-suffix-not-aligned"),
    pytest.param({"volumes.1.size": 0}, "volumes[1].size", "must be greater than 0, got 0", id="size-0"),
    pytest.param({"volumes.1.size": -4096}, "volumes[1].size", "must be greater than 0, got -4096",
                 id="size-negative"),
    pytest.param({"volumes.1.size": "10 GB"}, "volumes[1].size",
                 "expected an integer number of bytes with an optional suffix K/KiB/M/MiB/G/GiB/T/TiB, "
                 "got '10 GB'", id="size-unknown-suffix"),
    pytest.param({"volumes.1.size": "1.5GiB"}, "volumes[1].size", "got '1.5GiB'", id="size-fraction"),
    pytest.param({"volumes.1.size": True}, "volumes[1].size",
                 "expected bytes as an integer or a string like '2GiB', got boolean true", id="size-bool"),
    pytest.param({"volumes.1.size": 4096.0}, "volumes[1].size", "got float 4096.0", id="size-float"),
    pytest.param({"volumes.1.size": "9000000TiB"}, "volumes[1].size", "must be at most 9223372036854771712",
                 id="size-too-big"),
    pytest.param({"volumes.1.size": DELETE}, "volumes[1].size", "missing required key", id="size-missing"),
    pytest.param({"volumes.1.export": "web01/disk0"}, "volumes[1].export",
                 "export name 'web01/disk0' is already used by volumes[0]", id="export-dup"),
    pytest.param({"volumes.0.export": "web01/1"}, "volumes[1].export",
                 "export name 'web01/1' is already used by volumes[0]", id="export-dup-with-default"),
    pytest.param({"volumes.0.export": "web 01"}, "volumes[0].export",
                 "must match ^[A-Za-z0-9][A-Za-z0-9_./-]{0,254}$, got 'web 01'", id="export-space"),
    pytest.param({"volumes.1.path": "/srv/tandem/web01/disk0.img"}, "volumes[1].path",
                 "'/srv/tandem/web01/disk0.img' is already used as volumes[0].path", id="path-dup"),
    pytest.param({"volumes.1.metadata": "/srv/tandem/web01/disk0.img"}, "volumes[1].metadata",
                 "is already used as volumes[0].path", id="metadata-is-other-backing"),
    pytest.param({"volumes.1.metadata": "/dev/vg0/web01-data"}, "volumes[1].metadata",
                 "'/dev/vg0/web01-data' is already used as volumes[1].path", id="metadata-is-own-backing"),
    pytest.param({"volumes.1.metadata": "md/web01-1"}, "volumes[1].metadata", "must be an absolute path",
                 id="metadata-relative"),
    pytest.param({"volumes": [1]}, "volumes[0]", "expected a table, got integer 1", id="volume-not-table"),
    # tunables
    pytest.param({"tunables": [1]}, "tunables", "expected a table, got an array", id="tunables-array"),
    pytest.param({"tunables.sync_timeout": "1s"}, "tunables.sync_timeout",
                 "expected a number of seconds, got string '1s'", id="seconds-string"),
    pytest.param({"tunables.sync_timeout": True}, "tunables.sync_timeout",
                 "expected a number of seconds, got boolean true", id="seconds-bool"),
    pytest.param({"tunables.sync_timeout": float("nan")}, "tunables.sync_timeout",
                 "expected a finite number, got nan", id="seconds-nan"),
    pytest.param({"tunables.sync_timeout": float("inf")}, "tunables.sync_timeout",
                 "expected a finite number, got inf", id="seconds-inf"),
    pytest.param({"tunables.sync_timeout": 10 ** 400}, "tunables.sync_timeout",
                 "expected a finite number, got 1" + "0" * 39, id="seconds-huge-int"),
    pytest.param({"tunables.sync_timeout": 0.01}, "tunables.sync_timeout",
                 "must be between 0.05 and 60 seconds, got 0.01", id="sync-timeout-low"),
    pytest.param({"tunables.sync_timeout": 61}, "tunables.sync_timeout",
                 "must be between 0.05 and 60 seconds, got 61", id="sync-timeout-high"),
    pytest.param({"tunables.al_extents": 66}, "tunables.al_extents", "must be between 67 and 65534, got 66",
                 id="al-extents-low"),
    pytest.param({"tunables.al_extents": 65535}, "tunables.al_extents", "got 65535", id="al-extents-high"),
    pytest.param({"tunables.al_extents": True}, "tunables.al_extents",
                 "expected an integer, got boolean true", id="count-bool"),
    pytest.param({"tunables.al_extents": 1237.0}, "tunables.al_extents",
                 "expected an integer, got float 1237.0", id="count-float"),
    pytest.param({"tunables.max_epoch_writes": 0}, "tunables.max_epoch_writes",
                 "must be between 1 and 20000, got 0", id="max-epoch-writes-0"),
    pytest.param({"tunables.rp_keep": 0}, "tunables.rp_keep", "must be between 1 and 10000, got 0",
                 id="rp-keep-0"),
    pytest.param({"tunables.bitmap_block_size": 6144}, "tunables.bitmap_block_size",
                 "must be a power of two, got 6144 (6 KiB)", id="bitmap-block-not-power-of-two"),
    pytest.param({"tunables.bitmap_block_size": "2MiB"}, "tunables.bitmap_block_size",
                 "must be between 4 KiB and 1 MiB, got '2MiB' (2097152 bytes)", id="bitmap-block-too-big"),
    pytest.param({"tunables.bitmap_block_size": 0}, "tunables.bitmap_block_size",
                 "must be between 4 KiB and 1 MiB, got 0", id="bitmap-block-0"),
    pytest.param({"tunables.congestion_fill": 1024}, "tunables.congestion_fill",
                 "must be 0 (off) or between 4 KiB and 16 GiB, got 1024 (1 KiB)", id="congestion-fill-low"),
    pytest.param({"tunables.congestion_fill": "64 MB"}, "tunables.congestion_fill", "optional suffix",
                 id="congestion-fill-bad-suffix"),
    pytest.param({"tunables.resync_rate_max": -1}, "tunables.resync_rate_max",
                 "must be 0 (unlimited) or between 64 KiB/s and 64 GiB/s, got -1", id="resync-rate-negative"),
    pytest.param({"tunables.rp_interval": 0.5}, "tunables.rp_interval",
                 "must be 0 (off) or between 1 and 2.6784e+06 seconds, got 0.5", id="rp-interval-low"),
    pytest.param({"tunables.ping_timeout": 1.0}, "tunables.ping_timeout",
                 "must be less than tunables.ping_interval (1), got 1", id="ping-timeout-not-below-interval"),
    pytest.param({"tunables.ping_interval": 0.4}, "tunables.ping_timeout",
                 "must be less than tunables.ping_interval (0.4), got 0.5 (the default)",
                 id="ping-interval-below-default-timeout"),
    pytest.param({"tunables.resync_rate_max": "1MiB"}, "tunables.resync_rate_min",
                 "must not exceed tunables.resync_rate_max (1 MiB/s), got 4 MiB/s (the default)",
                 id="rate-min-above-max"),
    pytest.param({"tunables.connect_interval_max": 0.5}, "tunables.connect_interval_max",
                 "must be at least tunables.connect_interval (1), got 0.5", id="backoff-cap-below-interval"),
    pytest.param({"tunables.connect_interval": 20}, "tunables.connect_interval_max",
                 "must be at least tunables.connect_interval (20), got 10 (the default)",
                 id="interval-above-default-backoff-cap"),
    # nbd
    pytest.param({"nbd": "/run/x.sock"}, "nbd", "expected a table, got string '/run/x.sock'",
                 id="nbd-string"),
    pytest.param({"nbd": {"socket": "web01.sock"}}, "nbd.socket", "must be an absolute path",
                 id="socket-rel"),
    pytest.param({"nbd": {"socket": "/run/" + "s" * 103}}, "nbd.socket",
                 "must be at most 107 bytes long (AF_UNIX limit), got 108", id="socket-too-long"),
    pytest.param({"nbd": {"tcp": "10809"}}, "nbd.tcp", "expected 'host:port'", id="tcp-no-host"),
    pytest.param({"nbd": {"tcp": True}}, "nbd.tcp", "expected a string, got boolean true", id="tcp-bool"),
    pytest.param({"nbd": {"group": "Kvm Users"}}, "nbd.group", "must be a group name", id="group-bad-name"),
    pytest.param({"nbd": {"group": 36}}, "nbd.group", "must be a group name", id="group-number"),
    # security
    pytest.param({"security": True}, "security", "expected a table, got boolean true", id="security-bool"),
    pytest.param({"rp_storage": "lvm"}, "rp_storage", "must be 'delta', 'reflink' or 'auto', got 'lvm'",
                 id="rp-storage-unknown"),
    pytest.param({"security": {"tls_crt": "/a"}}, "security.tls_crt", "(did you mean 'tls_cert'?)",
                 id="typo-security"),
    pytest.param({"security": {"ca": "/a"}}, "security.ca",
                 "unknown key 'ca' (expected one of: tls_cert, tls_key, tls_ca, secret_file, plaintext)",
                 id="unknown-security-key"),
    pytest.param({"security": {"tls_cert": "node.crt"}}, "security.tls_cert",
                 "must be an absolute path, got 'node.crt'", id="tls-cert-relative"),
    pytest.param({"security": {"tls_key": "/etc/../root/key"}}, "security.tls_key", "must not contain '..'",
                 id="tls-key-dotdot"),
    pytest.param({"security": {"tls_ca": 1}}, "security.tls_ca", "expected a string, got integer 1",
                 id="tls-ca-int"),
    pytest.param({"security": {"secret_file": "/"}}, "security.secret_file", "must name a file, got '/'",
                 id="secret-file-root"),
    pytest.param({"security": {"plaintext": "yes"}}, "security.plaintext",
                 "expected true or false, got string 'yes'", id="plaintext-string"),
    pytest.param({"security": {"plaintext": 1}}, "security.plaintext",
                 "expected true or false, got integer 1", id="plaintext-int"),
]


@pytest.mark.parametrize(("edits", "key", "fragment"), BAD)
def test_bad_file_is_reported_with_file_and_key_path(tmp_path, edits, key, fragment):
    path = write(tmp_path, "web01.toml", edited(BASE, edits))
    with pytest.raises(ConfigError) as info:
        load_resource(path)
    p = problem(info.value, key, fragment)
    assert str(p) == f"{path}: {key}: {p.message}"
    # exactly one problem: a mistake is reported once, without follow-on noise
    assert len(info.value.problems) == 1, str(info.value)
    assert str(info.value) == str(p)


def test_swapped_volume_blocks_are_caught(tmp_path):
    # Moving a [[volumes]] block would swap the VM's disks: both blocks are reported.
    doc = edited(BASE, {"volumes": list(reversed(BASE["volumes"]))})
    with pytest.raises(ConfigError) as info:
        load_resource(write(tmp_path, "web01.toml", doc))
    assert [(p.key, p.message) for p in info.value.problems] == [
        ("volumes[0].number", "volumes are numbered 0..1 in the order they are listed: expected 0, got 1"),
        ("volumes[1].number", "volumes are numbered 0..1 in the order they are listed: expected 1, got 0"),
    ]


def test_brief_example_message(tmp_path):
    path = write(tmp_path, "web01.toml", edited(BASE, {"volumes.1.size": 1000}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: volumes[1].size: must be a multiple of 4096, "
                                                    "got 1000")):
        load_resource(path)


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    doc = edited(BASE, {"protocol": "B", "volumes.1.size": 1000, "tunables.sync_timout": 1,
                        "nodes.1.address": "10.0.0.1"})
    path = write(tmp_path, "web01.toml", doc)
    with pytest.raises(ConfigError) as info:
        load_resource(path)
    text = str(info.value)
    assert text.splitlines()[0] == f"{path}: 4 errors:"
    assert [p.key for p in info.value.problems] == [
        "protocol", "nodes[1].address", "volumes[1].size", "tunables.sync_timout"]
    for line in text.splitlines()[1:]:
        assert line.startswith(f"  {path}: ")


@pytest.mark.parametrize(("content", "location", "fragment"), [
    ('resource = "web01"\nprotocol = \n', "line 2, column 12", "TOML syntax error: Invalid value"),
    ('resource = "web01"\nresource = "web02"\n', "line 2, column 19",
     "TOML syntax error: Cannot overwrite a value"),
    ('[tunables]\n[tunables]\n', "line 2, column 10",
     "TOML syntax error: Cannot declare ('tunables',) twice"),
    ('resource = "web01', "end of file", "TOML syntax error: Unterminated string"),
    (b'resource = "web\xff01"\n', "", "not valid UTF-8 (byte 15)"),
])
def test_syntax_errors_name_file_line_and_column(tmp_path, content, location, fragment):
    path = write(tmp_path, "web01.toml", content)
    with pytest.raises(ConfigError) as info:
        load_resource(path)
    (p,) = info.value.problems
    assert (p.source, p.key) == (str(path), location)
    assert fragment in p.message
    assert str(info.value).startswith(f"{path}: {location + ': ' if location else ''}{fragment}")


def test_unreadable_files(tmp_path):
    missing = re.escape(f"{tmp_path}/nope.toml: cannot read the file: No such file")
    with pytest.raises(ConfigError, match=missing):
        load_resource(tmp_path / "nope.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ConfigError, match="cannot read the file: Is a directory"):
        load_resource(tmp_path / "dir.toml")


def test_parse_resource_without_a_file():
    r = parse_resource(edited(BASE, {}))
    assert r.name == "web01" and r.source == "<resource>"
    with pytest.raises(ConfigError, match=r"^<resource>: expected a table, got an array$"):
        parse_resource([])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^mem: resource: missing required key$"):
        parse_resource(edited(BASE, {"resource": None}), source="mem")


# --------------------------------------------------------------------------- directories


def resource_doc(name: str, n: int, **edits) -> dict:
    """A valid resource named name whose paths and exports do not clash with another n."""
    return edited(BASE, {
        "resource": name,
        "volumes": [{"number": 0, "path": f"/srv/tandem/{name}/disk0.img", "size": "1GiB"},
                    {"number": 1, "path": f"/dev/vg0/{name}-data", "size": f"{n + 1}GiB",
                     "export": f"{name}-data"}],
        **edits,
    })


def test_load_directory(tmp_path):
    for i, name in enumerate(["web01", "db01", "app.frontend_2"]):
        write(tmp_path, f"{name}.toml", resource_doc(name, i))
    write(tmp_path, "README", "not a resource")
    write(tmp_path, "web01.toml~", "editor backup")
    write(tmp_path, "web01.toml.dpkg-old", "package manager leftover")
    write(tmp_path, ".#web01.toml", "emacs lock")
    resources = load_directory(tmp_path)
    assert list(resources) == ["app.frontend_2", "db01", "web01"]
    assert all(isinstance(r, ResourceConfig) for r in resources.values())
    assert resources["db01"].volumes[1].size == 2 * GiB
    assert resources["db01"].source == str(tmp_path / "db01.toml")
    assert load_directory(str(tmp_path)) == resources


def test_empty_directory_has_no_resources(tmp_path):
    assert load_directory(tmp_path) == {}


def test_missing_directory_is_an_error(tmp_path):
    missing = re.escape(f"{tmp_path}/nope: cannot read the directory: No such file")
    with pytest.raises(ConfigError, match=missing):
        load_directory(tmp_path / "nope")


def test_directory_errors_from_every_file_are_reported_together(tmp_path):
    write(tmp_path, "good.toml", resource_doc("good", 0))
    bad1 = write(tmp_path, "bad1.toml", resource_doc("bad1", 1, **{"tunables.sync_timout": 1,
                                                                     "volumes.1.size": 1000}))
    bad2 = write(tmp_path, "bad2.toml", resource_doc("wrong", 2))
    bad3 = write(tmp_path, "bad3.toml", 'resource = "bad3"\nprotocol = \n')
    with pytest.raises(ConfigError) as info:
        load_directory(tmp_path)
    text = str(info.value)
    assert text.splitlines()[0] == f"{tmp_path}: 4 errors in 3 files:"
    assert f"  {bad1}: volumes[1].size: must be a multiple of 4096, got 1000" in text
    assert f"  {bad1}: tunables.sync_timout: unknown key 'sync_timout' (did you mean 'sync_timeout'?)" in text
    assert f"  {bad2}: resource: 'wrong' does not match the file name" in text
    assert f"  {bad3}: line 2, column 12: TOML syntax error: Invalid value" in text
    assert {p.source for p in info.value.problems} == {str(bad1), str(bad2), str(bad3)}


def test_directory_with_one_error_gives_one_line(tmp_path):
    write(tmp_path, "good.toml", resource_doc("good", 0))
    bad = write(tmp_path, "bad.toml", resource_doc("bad", 1, **{"volumes.1.size": 1000}))
    with pytest.raises(ConfigError) as info:
        load_directory(tmp_path)
    assert str(info.value) == f"{bad}: volumes[1].size: must be a multiple of 4096, got 1000"


def test_exports_and_paths_are_unique_across_files(tmp_path):
    a = write(tmp_path, "a.toml", resource_doc("a", 0, **{"volumes.1.metadata": "/var/lib/tandem/shared.md"}))
    b = write(tmp_path, "b.toml", resource_doc("b", 1, **{
        "volumes.0.export": "a-data",                                # a's volume 1 export
        "volumes.1.path": "/srv/tandem/a/disk0.img",                 # a's volume 0 backing
        "volumes.1.metadata": "/var/lib/tandem/shared.md",           # a's volume 1 metadata
    }))
    c = write(tmp_path, "c.toml", resource_doc("c", 2, **{"volumes.0.metadata": "/dev/vg0/a-data"}))
    with pytest.raises(ConfigError) as info:
        load_directory(tmp_path)
    assert str(info.value).splitlines()[0] == f"{tmp_path}: 4 errors in 2 files:"
    problem(info.value, "volumes[0].export", f"export name 'a-data' is already used by {a} "
                                             "(volumes[1].export)")
    problem(info.value, "volumes[1].path",
            f"'/srv/tandem/a/disk0.img' is already used by {a} (volumes[0].path)")
    problem(info.value, "volumes[1].metadata", f"'/var/lib/tandem/shared.md' is already used by {a} "
                                               "(volumes[1].metadata)")
    p = problem(info.value, "volumes[0].metadata",
                f"'/dev/vg0/a-data' is already used by {a} (volumes[1].path)")
    assert p.source == str(c)
    assert {p.source for p in info.value.problems} == {str(b), str(c)}


def test_nbd_listeners_are_unique_across_files(tmp_path):
    a = write(tmp_path, "a.toml", resource_doc("a", 0, nbd={"socket": "/run/tandem/nbd.sock",
                                                             "tcp": "0.0.0.0:10809"}))
    write(tmp_path, "b.toml", resource_doc("b", 1, nbd={"socket": "/run/tandem/nbd.sock",
                                                        "tcp": "10.0.0.1:10809"}))
    write(tmp_path, "c.toml", resource_doc("c", 2, nbd={"socket": "/run/tandem/c.sock",
                                                        "tcp": "10.0.0.1:10810"}))
    write(tmp_path, "d.toml", resource_doc("d", 3, nbd={"tcp": "[::1]:10809"}))  # IPv6: not in 0.0.0.0
    with pytest.raises(ConfigError) as info:
        load_directory(tmp_path)
    assert [str(p) for p in info.value.problems] == [
        f"{tmp_path}/b.toml: nbd.socket: '/run/tandem/nbd.sock' is already used by {a} (nbd.socket)",
        f"{tmp_path}/b.toml: nbd.tcp: 10.0.0.1:10809 overlaps 0.0.0.0:10809 of {a} (nbd.tcp)",
    ]


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("10.0.0.1:1", "10.0.0.1:1", True),
    ("10.0.0.1:1", "10.0.0.1:2", False),
    ("10.0.0.1:1", "10.0.0.2:1", False),
    ("0.0.0.0:1", "10.0.0.1:1", True),
    ("0.0.0.0:1", "[::1]:1", False),
    ("[::]:1", "10.0.0.1:1", True),
    ("[::]:1", "[::1]:1", True),
    ("[fd00::1]:1", "[fd00::2]:1", False),
])
def test_tcp_listener_overlap(a, b, overlap):
    addresses = parse_address(a, allow_unspecified=True), parse_address(b, allow_unspecified=True)
    assert config._overlap(*addresses) is overlap
    assert config._overlap(*reversed(addresses)) is overlap


def test_duplicate_resource_names_across_files(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    first = write(tmp_path / "x", "web01.toml", resource_doc("web01", 0))
    second = write(tmp_path / "y", "web01.toml", resource_doc("web01", 0))
    with pytest.raises(ConfigError) as info:
        load_files([first, second])
    assert str(info.value) == f"{second}: resource: resource 'web01' is also defined in {first}"


def test_an_unreadable_entry_fails_the_load_rather_than_being_skipped(tmp_path):
    # Skipping it would make adjust remove a running resource.
    write(tmp_path, "good.toml", resource_doc("good", 0))
    os.symlink(tmp_path / "gone.toml.orig", tmp_path / "gone.toml")
    (tmp_path / "sub.toml").mkdir()
    with pytest.raises(ConfigError) as info:
        load_directory(tmp_path)
    assert [(p.source, p.message) for p in info.value.problems] == [
        (str(tmp_path / "gone.toml"), "cannot read the file: No such file or directory"),
        (str(tmp_path / "sub.toml"), "cannot read the file: Is a directory"),
    ]


# --------------------------------------------------------------------------- diff


def res(name="web01", n=0, **edits) -> ResourceConfig:
    return parse_resource(resource_doc(name, n, **edits), source=f"/etc/tandem/resources.d/{name}.toml")


def test_diff_of_equal_sets_is_empty():
    running = {"web01": res("web01"), "db01": res("db01", 1)}
    desired = {"db01": res("db01", 1), "web01": res("web01")}
    assert diff(running, desired) == []
    assert diff({}, {}) == []


def test_diff_is_idempotent_after_applying_it():
    running = {"web01": res("web01"), "old": res("old", 1)}
    desired = {"web01": res("web01", 3, protocol="A", **{"tunables.sync_timeout": 2}), "new": res("new", 2)}
    assert diff(running, desired)
    assert diff(desired, desired) == []
    # and the same plan every time
    assert diff(running, desired) == diff(dict(reversed(running.items())), dict(reversed(desired.items())))


def test_add_and_remove_resources():
    a, b, c = res("a"), res("b", 1), res("c", 2)
    actions = diff({"a": a, "c": c}, {"a": a, "b": b})
    assert actions == [
        Action("remove-resource", "c", {}),
        Action("add-resource", "b", {"config": b.to_dict()}),
    ]
    assert [x.needs_down for x in actions] == [True, False]


def test_add_and_remove_volumes():
    two = res()
    three = res(**{"volumes": [*resource_doc("web01", 0)["volumes"],
                               {"number": 2, "path": "/srv/v2", "size": "1G"}]})
    added = diff({"web01": two}, {"web01": three})
    assert added == [Action("add-volume", "web01", {
        "volume": 2, "path": "/srv/v2", "size": GiB, "export": "web01/2", "metadata": None})]
    assert not added[0].needs_down
    removed = diff({"web01": three}, {"web01": two})
    assert removed == [Action("remove-volume", "web01", {
        "volume": 2, "reason": "removed", "path": "/srv/v2", "size": GiB, "export": "web01/2",
        "metadata": None})]
    assert removed[0].needs_down


def test_changing_a_backing_path_replaces_the_volume():
    old = res()
    new = res(**{"volumes.0.path": "/srv/new/disk0.img", "volumes.0.size": "2GiB"})
    assert diff({"web01": old}, {"web01": new}) == [
        Action("remove-volume", "web01", {"volume": 0, "reason": "path changed",
                                          "path": "/srv/tandem/web01/disk0.img",
                                          "size": GiB, "export": "web01/0", "metadata": None}),
        Action("add-volume", "web01", {"volume": 0, "reason": "path changed", "path": "/srv/new/disk0.img",
                                       "size": 2 * GiB, "export": "web01/0", "metadata": None}),
    ]
    moved_md = res(**{"volumes.1.metadata": "/var/lib/tandem/web01-1.md"})
    kinds = [(a.kind, a.detail["reason"]) for a in diff({"web01": old}, {"web01": moved_md})]
    assert kinds == [("remove-volume", "metadata changed"), ("add-volume", "metadata changed")]


def test_growing_a_volume_is_an_online_resize():
    actions = diff({"web01": res()}, {"web01": res(**{"volumes.1.size": "8GiB"})})
    assert actions == [Action("resize-volume", "web01", {"volume": 1, "old_size": GiB, "new_size": 8 * GiB})]
    assert not actions[0].needs_down


def test_shrinking_a_volume_is_refused():
    with pytest.raises(UnsafeChange) as info:
        diff({"web01": res(**{"volumes.1.size": "8GiB"})}, {"web01": res()})
    assert isinstance(info.value, ConfigError)
    assert str(info.value).startswith("/etc/tandem/resources.d/web01.toml: volumes[1].size: "
                                      "refusing to shrink volume 1 from 8 GiB to 1 GiB")
    assert "Volumes only grow online" in str(info.value)


def test_every_refused_change_is_reported():
    running = {"a": res("a", 0, **{"volumes.0.size": "2G"}), "b": res("b", 1)}
    desired = {"a": res("a", 0), "b": res("b", 1, local_node="hv-b1")}
    with pytest.raises(UnsafeChange) as info:
        diff(running, desired)
    assert str(info.value).splitlines()[0] == "adjust refuses 2 changes:"
    problem(info.value, "volumes[0].size", "refusing to shrink volume 0 from 2 GiB to 1 GiB")
    problem(info.value, "local_node",
            "the running resource is on node 'hv-a1', the file says this is 'hv-b1'")


def test_tunables_protocol_and_nbd_changes():
    old = res()
    new = res(protocol="A", **{
        "tunables": {"sync_timeout": 2.5, "resync_rate_max": "1G"},
        "nbd": {"socket": "/run/tandem/web01.sock", "tcp": "[::1]:10809"},
        "volumes.1.export": "web01/data",
    })
    actions = diff({"web01": old}, {"web01": new})
    assert actions == [
        Action("change-protocol", "web01", {"old": "C", "new": "A"}),
        Action("change-tunables", "web01", {"sync_timeout": {"old": 1.0, "new": 2.5},
                                            "resync_rate_max": {"old": 100 * MiB, "new": GiB}}),
        Action("change-nbd", "web01", {"socket": {"old": None, "new": "/run/tandem/web01.sock"},
                                       "tcp": {"old": None, "new": "[::1]:10809"},
                                       "exports": [{"volume": 1, "old": "web01-data", "new": "web01/data"}]}),
    ]
    assert not any(a.needs_down for a in actions)


def test_security_changes_are_online_and_make_the_link_reconnect():
    old = res()
    new = res(**{"security": {"tls_cert": "/etc/tandem/tls/node-2027.crt",
                              "secret_file": "/etc/tandem/s.key"}})
    (action,) = diff({"web01": old}, {"web01": new})
    assert action == Action("change-security", "web01", {
        "tls_cert": {"old": "/etc/tandem/tls/node.crt", "new": "/etc/tandem/tls/node-2027.crt"},
        "secret_file": {"old": "/etc/tandem/secrets/web01.key", "new": "/etc/tandem/s.key"}})
    assert not action.needs_down
    (action,) = diff({"web01": old}, {"web01": res(**{"security.plaintext": True})})
    assert action.detail == {"plaintext": {"old": False, "new": True}}
    # Spelling out a default is not a change.
    spelled = res(**{"security": {"tls_ca": "/etc/tandem/tls/ca.crt",
                                  "secret_file": "/etc/tandem/secrets/web01.key", "plaintext": False}})
    assert diff({"web01": old}, {"web01": spelled}) == []


@pytest.mark.parametrize("name", ["al_extents", "bitmap_block_size"])
def test_metadata_tunables_need_the_resource_down(name):
    value = {"al_extents": 6433, "bitmap_block_size": 65536}[name]
    (action,) = diff({"web01": res()}, {"web01": res(**{f"tunables.{name}": value})})
    assert action.kind == "change-tunables" and action.needs_down
    assert action.to_dict()["needs_down"] is True


def test_peer_changes():
    old = res()
    moved = res(**{"nodes.1.address": "10.202.120.12:7788"})
    assert diff({"web01": old}, {"web01": moved}) == [
        Action("change-peer", "web01",
               {"peer_address": {"old": "10.202.120.11:7788", "new": "10.202.120.12:7788"}})]
    replaced = res(**{"nodes.1.name": "hv-b2"})
    assert diff({"web01": old}, {"web01": replaced}) == [
        Action("change-peer", "web01", {"peer_name": {"old": "hv-b1", "new": "hv-b2"}})]
    local = res(**{"nodes.0.address": "[fd00::11]:7788"})
    assert diff({"web01": old}, {"web01": local}) == [
        Action("change-peer", "web01",
               {"local_address": {"old": "10.202.110.11:7788", "new": "[fd00::11]:7788"}})]


def test_node_order_is_not_a_change():
    old = res()
    swapped = res(nodes=list(reversed(resource_doc("web01", 0)["nodes"])))
    assert swapped.nodes != old.nodes
    assert diff({"web01": old}, {"web01": swapped}) == []


def test_source_is_not_part_of_the_comparison():
    a = res()
    assert dataclasses.replace(a, source="/elsewhere.toml") == a
    assert diff({"web01": a}, {"web01": dataclasses.replace(a, source=None)}) == []


def test_actions_come_in_a_fixed_order():
    running = {
        "gone": res("gone", 0),
        "web01": res("web01", 1),
        "db01": res("db01", 2),
    }
    desired = {
        "web01": res("web01", 1, protocol="A", **{
            "nodes.1.address": "10.202.120.99:7788", "tunables.rp_keep": 7, "nbd.tcp": "127.0.0.1:10809",
            "security.tls_ca": "/etc/tandem/tls/bundle.crt",
            "volumes": [{"number": 0, "path": "/srv/tandem/web01/new0.img", "size": "1GiB"},
                        {"number": 1, "path": "/dev/vg0/web01-data", "size": "3GiB", "export": "web01-data"},
                        {"number": 2, "path": "/srv/tandem/web01/disk2.img", "size": "1GiB"}],
        }),
        "db01": res("db01", 2, **{"volumes.1.size": "9GiB"}),
        "new": res("new", 3),
    }
    plan = [(a.kind, a.resource, a.detail.get("volume")) for a in diff(running, desired)]
    assert plan == [
        ("remove-resource", "gone", None),
        ("remove-volume", "web01", 0),
        ("change-protocol", "web01", None),
        ("change-peer", "web01", None),
        ("change-security", "web01", None),
        ("change-tunables", "web01", None),
        ("change-nbd", "web01", None),
        ("resize-volume", "db01", 1),
        ("resize-volume", "web01", 1),
        ("add-volume", "web01", 0),
        ("add-volume", "web01", 2),
        ("add-resource", "new", None),
    ]
    assert [k for k, *_ in plan] == sorted((k for k, *_ in plan), key=ACTION_KINDS.index)


def test_action_helpers():
    a = Action("resize-volume", "web01", {"volume": 0, "old_size": 1, "new_size": 2})
    assert a.to_dict() == {"kind": "resize-volume", "resource": "web01",
                           "detail": {"volume": 0, "old_size": 1, "new_size": 2}, "needs_down": False}
    assert json.loads(json.dumps(a.to_dict())) == a.to_dict()
    assert str(a) == 'web01: resize-volume {"new_size": 2, "old_size": 1, "volume": 0}'
    assert hash(a) == hash(Action("resize-volume", "web01", {"volume": 0, "old_size": 1, "new_size": 2}))
    with pytest.raises(ValueError, match="unknown action kind 'resize'"):
        Action("resize", "web01")


# --------------------------------------------------------------------------- docs and portability


DOC = ROOT / "docs" / "engine-config.md"


def test_docs_describe_every_tunable_and_action_kind():
    text = DOC.read_text(encoding="utf-8")
    for name in TUNABLES:
        assert re.search(rf"^\| `{name}` \|", text, re.M), f"tunable {name} is not in the table of {DOC}"
    for kind in ACTION_KINDS:
        assert f"`{kind}`" in text, f"action kind {kind} is not documented in {DOC}"


def test_docs_describe_every_key_of_every_table():
    text = DOC.read_text(encoding="utf-8")
    tables = {"top level": config._TOP_KEYS, "[[nodes]]": config._NODE_KEYS,
              "[[volumes]]": config._VOLUME_KEYS, "[nbd]": config._NBD_KEYS,
              "[security]": config._SECURITY_KEYS}
    for table, keys in tables.items():
        for key in keys:
            assert re.search(rf"^\| `{key}` \|", text, re.M), f"{table} key {key} has no row in {DOC}"


def test_docs_examples_load(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(# /etc/tandem/resources\.d/([a-z0-9_.-]+)\.toml\n.*?)```", text, re.S)
    assert blocks
    paths = [write(tmp_path, f"{name}.toml", body) for body, name in blocks]
    assert set(load_files(paths)) == {name for _, name in blocks}


def test_tunable_defaults_are_valid():
    for name, spec in TUNABLES.items():
        assert spec.minimum <= spec.default <= spec.maximum or (spec.zero and spec.default == 0), name
        assert getattr(Tunables(), name) == spec.default
    assert Tunables().ping_timeout < Tunables().ping_interval


def test_config_module_uses_the_standard_library_only():
    tree = ast.parse(Path(config.__file__).read_text(encoding="utf-8"))
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert modules <= set(sys.stdlib_module_names) | {"__future__"}, modules


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no /usr/bin/python3")
def test_runs_on_the_system_python(tmp_path):
    path = write(tmp_path, "web01.toml", EXAMPLE)
    code = ("import json, sys; from tandem.engine.config import load_resource; "
            "print(sys.version_info >= (3, 11), json.dumps(load_resource(sys.argv[1]).to_dict()))")
    prelude = f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); "
    out = subprocess.run([SYSTEM_PYTHON, "-I", "-c", prelude + code, str(path)],
                         capture_output=True, text=True, check=True).stdout
    ok, dumped = out.split(" ", 1)
    assert ok == "True"
    assert json.loads(dumped) == load_resource(path).to_dict()



def test_rp_storage_defaults_to_delta_and_a_change_is_an_action(tmp_path):
    r = load_resource(write(tmp_path, "web01.toml", BASE))
    assert r.rp_storage == "delta" and r.to_dict()["rp_storage"] == "delta"
    r2 = load_resource(write(tmp_path, "web01.toml", {**BASE, "rp_storage": "reflink"}))
    assert r2.rp_storage == "reflink"
    (action,) = config.diff({"web01": r}, {"web01": r2})
    assert action.kind == "change-rp-storage" and action.detail == {"old": "delta", "new": "reflink"}
