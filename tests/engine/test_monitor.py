"""tandemd's read-only monitor endpoint (src/tandem/engine/monitor.py) on a real pair:
mutual TLS with a client certificate from the configured CA, status and live events,
everything else refused, hostile input harmless."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time

import pytest

from .harness import Pair

MAX_CLIENTS = 64      # tandem.engine.monitor.MAX_CLIENTS (the daemon runs this checkout's src)


def client_context(pair: Pair, cert=None) -> ssl.SSLContext:
    pem, server_ca = pair.monitor_client()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(server_ca))
    if cert is None:
        cert = pem
    if cert:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def connect(pair: Pair, node, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(node.monitor, timeout=10)
    return ctx.wrap_socket(raw, server_hostname=node.name)


def request(pair: Pair, node, obj, ctx=None) -> dict:
    with connect(pair, node, ctx or client_context(pair)) as s:
        s.sendall(json.dumps(obj).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


def refused(pair: Pair, node, ctx) -> bool:
    """The server ends the connection without an answer (TLS alert or close)."""
    try:
        with connect(pair, node, ctx) as s:
            s.sendall(b'{"cmd": "status"}\n')
            return s.makefile("rb").readline() == b""
    except (ssl.SSLError, ConnectionError):
        return True


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path, monitor=True)
    try:
        p.start_in_sync()
        yield p
    finally:
        p.stop()


def test_status_and_live_events(pair):
    st = request(pair, pair.a, {"cmd": "status"})
    assert st["ok"] and [r["name"] for r in st["resources"]] == ["vm1"]
    res = st["resources"][0]
    assert res["role"] == "Primary" and res["rpo"] == {"bytes": 0, "seconds": 0.0}
    assert request(pair, pair.b, {"cmd": "status", "resource": "vm1"})["resources"][0]["role"] == "Secondary"
    assert request(pair, pair.a, {"cmd": "status", "resource": "nope"})["ok"] is False

    with connect(pair, pair.a, client_context(pair)) as s:
        s.sendall(b'{"cmd": "events"}\n')
        lines = s.makefile("rb")
        first = json.loads(lines.readline())
        assert first["event"] == "exists" and first["resource"] == "vm1" and first["role"] == "Primary"
        pair.a.ctl("rp", "create", "vm1")              # a live event, through the control socket
        seen = []
        while "rp-created" not in seen:      # a socket timeout (10 s) fails the test
            seen.append(json.loads(lines.readline())["event"])


def test_refuses_without_the_right_certificate(pair):
    assert refused(pair, pair.a, client_context(pair, cert=False))          # no client certificate
    other = pair.pki.issue("other-ca", "intruder")
    assert refused(pair, pair.a, client_context(pair, cert=other))          # another CA's certificate
    # a site CA's node certificate is not a monitor client either: the CA is the monitor one
    assert refused(pair, pair.a, client_context(pair, cert=pair.pki.issue("site-b", "b")))
    with socket.create_connection(pair.a.monitor, timeout=10) as s:          # plain TCP
        s.sendall(b'{"cmd": "status"}\n')
        s.settimeout(10)
        try:
            data = s.recv(4096)
        except ConnectionError:
            data = b""
        assert b'"ok"' not in data


@pytest.mark.parametrize("cmd", [{"cmd": "primary", "resource": "vm1", "force": True},
                                 {"cmd": "secondary", "resource": "vm1"},
                                 {"cmd": "rp", "resource": "vm1", "op": "create"},
                                 {"cmd": "adjust"}, {"cmd": "disconnect", "resource": "vm1"}])
def test_write_commands_are_refused(pair, cmd):
    reply = request(pair, pair.b, cmd)
    assert reply["ok"] is False and "refused" in reply["error"]
    st = pair.b.status("vm1")
    assert st["role"] == "Secondary" and st["connection"] == "Connected"
    assert st["recovery_points"]["count"] == 0


def test_hostile_input_does_not_hurt_the_daemon(pair):
    ctx = client_context(pair)
    with connect(pair, pair.a, ctx) as s:                      # garbage
        s.sendall(b"\x00\xff garbage {{{\n")
        assert json.loads(s.makefile("rb").readline())["ok"] is False
    with connect(pair, pair.a, ctx) as s:                      # an endless line
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            s.sendall(b"x" * (1 << 20))
        reply = s.makefile("rb").readline()
        assert reply == b"" or "longer than" in json.loads(reply)["error"]
    slow = [connect(pair, pair.a, ctx) for _ in range(5)]      # slowloris: never finish a line
    for s in slow:
        s.sendall(b'{"cmd": ')
    half_open = [socket.create_connection(pair.a.monitor, timeout=10) for _ in range(5)]   # no TLS hello
    try:
        # meanwhile the daemon serves and replicates
        assert request(pair, pair.a, {"cmd": "status"})["ok"]
        pair.a.ctl("rp", "create", "vm1")
        assert pair.in_sync()
        t0 = time.monotonic()
        for s in slow:                       # the request timeout answers and closes them
            s.settimeout(15)                 # socket.timeout here would fail the test
            line = s.makefile("rb").readline()
            assert b"no request" in line
        assert time.monotonic() - t0 < 15
    finally:
        for s in slow + half_open:
            s.close()
    assert pair.a.proc.poll() is None
    with pair.a.root.joinpath("tandemd.log").open() as log:
        assert "Traceback" not in log.read()
    assert request(pair, pair.a, {"cmd": "status"})["resources"][0]["connection"] == "Connected"


def test_unusable_monitor_files_stop_tandemd_with_a_clear_error(tmp_path):
    p = Pair(tmp_path, monitor=True)
    key_index = p.a.extra_args.index("--monitor-key") + 1
    p.a.extra_args[key_index] = str(tmp_path / "missing.key")
    try:
        with pytest.raises(RuntimeError, match="exited"):
            p.a.start()
        assert p.a.proc.wait(10) == 2
        assert "monitor endpoint: monitor TLS files" in p.a.log.read_text()
    finally:
        p.stop()


def test_closed_event_streams_free_their_slots(pair):
    """Clients that open the events stream and go away while nothing happens do not use up the
    client cap: more than MAX_CLIENTS of them in turn, then a status still answers."""
    ctx = client_context(pair)
    for _ in range(MAX_CLIENTS + 8):
        with connect(pair, pair.a, ctx) as s:
            s.sendall(b'{"cmd": "events"}\n')
            assert json.loads(s.makefile("rb").readline())["event"] == "exists"
    time.sleep(0.5)
    assert request(pair, pair.a, {"cmd": "status"})["ok"]
