"""The monitor endpoint's opt-in control permission (--control-clients) on a real pair: the
allowed client (by certificate CN) creates and deletes its own "center-" recovery points,
idempotently; any other client, any other RP, a labelled RP and hostile input are refused
without a crash and without a write."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import pytest

from .harness import Pair

CENTER = "center1"        # the allowed CN (pair.monitor_client's default name)


def ctx_for(pair: Pair, name: str = CENTER) -> ssl.SSLContext:
    pem, server_ca = pair.monitor_client(name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(server_ca))
    ctx.load_cert_chain(str(pem.cert), str(pem.key))
    return ctx


def request(node, obj, ctx: ssl.SSLContext, raw: bytes | None = None) -> dict:
    with socket.create_connection(node.monitor, timeout=30) as s0, \
            ctx.wrap_socket(s0, server_hostname=node.name) as s:
        s.sendall(raw if raw is not None else json.dumps(obj).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


def rp_ids(node) -> dict[str, dict]:
    return {m["id"]: m for m in node.ctl("rp", "list", "vm1")["recovery_points"]}


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path, monitor=False)
    p.enable_monitor(control_clients=(CENTER,))
    try:
        p.start_in_sync()
        yield p
    finally:
        p.stop()


def test_create_is_idempotent_and_delete_only_takes_unlabelled_center_rps(pair):
    ctx = ctx_for(pair)
    rid = "center-20261130T041500Z"
    first = request(pair.a, {"cmd": "rp-create", "resource": "vm1", "id": rid}, ctx)
    assert first["ok"] and first["created"] is True
    assert first["recovery_point"]["id"] == rid and first["recovery_point"]["reason"] == "center"
    assert first["recovery_point"]["consistent"] is True
    again = request(pair.a, {"cmd": "rp-create", "resource": "vm1", "id": rid}, ctx)
    assert again["ok"] and again["created"] is False and again["recovery_point"]["created"] == \
        first["recovery_point"]["created"]
    assert list(rp_ids(pair.a)) == [rid]
    # rp-list is a read: any monitor client
    listed = request(pair.a, {"cmd": "rp-list", "resource": "vm1"}, ctx_for(pair, "reader"))
    assert listed["ok"] and [m["id"] for m in listed["recovery_points"]] == [rid]

    # a labelled one (tested=... after a drill) is kept
    labelled = "center-20261130T041600Z"
    assert request(pair.a, {"cmd": "rp-create", "resource": "vm1", "id": labelled}, ctx)["created"]
    pair.a.ctl("rp", "label", "vm1", labelled, "--label", "tested=2026-11-30")
    reply = request(pair.a, {"cmd": "rp-delete", "resource": "vm1", "id": labelled}, ctx)
    assert reply["ok"] is False and "labelled" in reply["error"]
    assert labelled in rp_ids(pair.a)

    deleted = request(pair.a, {"cmd": "rp-delete", "resource": "vm1", "id": rid}, ctx)
    assert deleted == {"ok": True, "deleted": True, "id": rid}
    assert request(pair.a, {"cmd": "rp-delete", "resource": "vm1", "id": rid}, ctx)["deleted"] is False
    assert list(rp_ids(pair.a)) == [labelled]


def test_not_after_refuses_a_late_rp_without_a_write_but_returns_an_existing_one(pair):
    """The end of a schedule slot's window: a new RP is stamped before it or not taken at all
    ("late": the center marks the slot missed); an RP that exists is still returned, so a retry
    after a lost reply finds it whatever the time."""
    ctx = ctx_for(pair)
    late = request(pair.a, {"cmd": "rp-create", "resource": "vm1", "id": "center-late",
                            "not_after": time.time() - 0.001}, ctx)
    assert late["ok"] is False and late["late"] is True and "past not_after" in late["error"], late
    assert rp_ids(pair.a) == {}

    deadline = time.time() + 60
    made = request(pair.a, {"cmd": "rp-create", "resource": "vm1", "id": "center-ok",
                            "not_after": deadline}, ctx)
    assert made["ok"] and made["created"] is True and made["recovery_point"]["created"] < deadline
    again = request(pair.a, {"cmd": "rp-create", "resource": "vm1", "id": "center-ok", "not_after": 1}, ctx)
    assert again["ok"] and again["created"] is False
    assert again["recovery_point"]["created"] == made["recovery_point"]["created"]
    assert list(rp_ids(pair.a)) == ["center-ok"]
    assert "Traceback" not in pair.a.log.read_text()


def test_other_rps_cannot_be_touched(pair):
    """A manual RP has an engine-chosen id outside the center- namespace: neither deletable nor
    shadowed; the engine's own retention never touches center RPs (reason "center")."""
    manual = pair.a.ctl("rp", "create", "vm1")["recovery_point"]["id"]
    ctx = ctx_for(pair)
    reply = request(pair.a, {"cmd": "rp-delete", "resource": "vm1", "id": manual}, ctx)
    assert reply["ok"] is False and "id must match" in reply["error"]
    assert manual in rp_ids(pair.a)


@pytest.mark.parametrize("cn", ["center2", "reader"])
def test_clients_outside_the_allowlist_are_refused(pair, cn):
    ctx = ctx_for(pair, cn)
    for cmd in ("rp-create", "rp-delete"):
        reply = request(pair.a, {"cmd": cmd, "resource": "vm1", "id": "center-x"}, ctx)
        assert reply["ok"] is False and "control client" in reply["error"]
    # still read-only for them: status answers, nothing was written
    assert request(pair.a, {"cmd": "status"}, ctx)["ok"]
    assert rp_ids(pair.a) == {}


def test_an_endpoint_without_control_clients_stays_read_only(tmp_path):
    p = Pair(tmp_path, monitor=True)
    try:
        p.start_in_sync()
        reply = request(p.a, {"cmd": "rp-create", "resource": "vm1", "id": "center-x"}, ctx_for(p))
        assert reply["ok"] is False and "control client" in reply["error"]
        assert rp_ids(p.a) == {}
    finally:
        p.stop()


HOSTILE = [
    {"cmd": "rp-create", "resource": "vm1"},                                   # no id
    {"cmd": "rp-create", "resource": "vm1", "id": 7},
    {"cmd": "rp-create", "resource": "vm1", "id": None},
    {"cmd": "rp-create", "resource": "vm1", "id": ["center-a"]},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-../../etc/passwd"},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-" + "x" * 200},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-a\nb"},
    {"cmd": "rp-create", "resource": "vm1", "id": "20261130T000000.000000Z-manual"},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-"},
    {"cmd": "rp-create", "resource": "nope", "id": "center-a"},
    {"cmd": "rp-create", "resource": {"x": 1}, "id": "center-a"},
    {"cmd": "rp-create", "id": "center-a"},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-a", "labels": {"a": "b"}},   # unknown key
    {"cmd": "rp-create", "resource": "vm1", "id": "center-a", "not_after": "9999999999"},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-a", "not_after": True},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-a", "not_after": [1]},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-a", "not_after": float("nan")},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-a", "not_after": float("inf")},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-a", "not_after": 10 ** 400},
    {"cmd": "rp-delete", "resource": "vm1", "id": "center-a", "not_after": 9999999999},
    {"cmd": "rp-create", "resource": "vm1", "id": "center-a", "op": "restore"},
    {"cmd": "rp-delete", "resource": "vm1", "id": "center-does-not-matter", "force": True},
    {"cmd": "rp-list"},
    {"cmd": "rp-list", "resource": 3},
]


def test_hostile_control_input_is_refused_without_a_write(pair):
    ctx = ctx_for(pair)
    for obj in HOSTILE:
        reply = request(pair.a, obj, ctx)
        assert reply["ok"] is False, (obj, reply)
    for raw in (b'{"cmd": "rp-create", "resource": "vm1", "id": "center-a"', b"[1,2]\n", b"\xff\xfe\n"):
        assert request(pair.a, None, ctx, raw=raw + b"\n")["ok"] is False
    assert rp_ids(pair.a) == {}
    assert pair.a.proc.poll() is None and pair.in_sync()
    assert "Traceback" not in pair.a.log.read_text()


def test_concurrent_creates_of_one_id_make_one_rp(pair):
    """Two leaders (the old one's retry and the new one) asking at once: one RP."""
    ctx = ctx_for(pair)
    replies = []

    def create():
        replies.append(request(pair.a, {"cmd": "rp-create", "resource": "vm1", "id": "center-slot1"}, ctx))

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["ok"] for r in replies), replies
    assert sorted(r["created"] for r in replies) == [False] * 5 + [True]
    assert list(rp_ids(pair.a)) == ["center-slot1"]
