"""Two real daemons over TCP: initial sync, dual write, peer loss and bitmap resync, roles."""

from __future__ import annotations

import hashlib
import os
import random
import threading

import pytest

from .harness import Pair
from .nbdclient import Client


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.stop()


def random_writes(sock: str, export: str, size: int, n: int, seed: int, stop: threading.Event | None = None):
    rng = random.Random(seed)
    c = Client(sock, export)
    try:
        for _ in range(n):
            if stop is not None and stop.is_set():
                break
            offset = rng.randrange(0, size // 4096) * 4096
            c.write(offset, rng.randbytes(4096))
        c.flush()
    finally:
        c.close()


@pytest.mark.parametrize("protocol", ["C", "A"])
def test_initial_full_sync_under_writes_ends_identical(tmp_path, protocol):
    pair = Pair(tmp_path, protocol=protocol)
    try:
        _full_sync_under_writes(pair)
    finally:
        pair.stop()


def _full_sync_under_writes(pair):
    # An existing VM disk on node a, an empty one on node b.
    pair.data_file(pair.a).parent.mkdir(parents=True, exist_ok=True)
    pair.data_file(pair.a).write_bytes(os.urandom(pair.size))
    pair.start()
    pair.wait(pair.connected, what="connection")
    pair.a.ctl("primary", pair.resource, "--force")
    stop = threading.Event()
    writer = threading.Thread(target=random_writes, args=(pair.a.nbd_socket(pair.resource),
                              f"{pair.resource}/disk0", pair.size, 2000, 1, stop))
    writer.start()
    pair.wait(pair.in_sync, timeout=120, what="initial sync")
    stop.set()
    writer.join()
    random_writes(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", pair.size, 200, 2)
    pair.wait(pair.in_sync, what="in sync after writes")
    assert digest(pair.data_file(pair.a)) == digest(pair.data_file(pair.b))
    st = pair.b.status(pair.resource)
    assert st["volumes"][0]["generation"]["current"] == \
        pair.a.status(pair.resource)["volumes"][0]["generation"]["current"]


def test_peer_loss_resyncs_only_the_dirty_blocks(pair):
    pair.start_in_sync()
    before = pair.a.status(pair.resource)["stats"]["resync_bytes"]
    pair.b.kill()
    sock, export = pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0"
    c = Client(sock, export)
    dirty = set()
    rng = random.Random(7)
    for _ in range(300):
        offset = rng.randrange(0, pair.size // 4096) * 4096
        c.write(offset, rng.randbytes(4096))
        dirty.add(offset)
    c.flush()
    c.close()
    st = pair.a.status(pair.resource)
    assert st["connection"] != "Connected"
    assert st["volumes"][0]["out_of_sync_bytes"] == len(dirty) * 4096
    pair.b.start()
    pair.wait(pair.in_sync, timeout=60, what="resync after reconnect")
    moved = pair.a.status(pair.resource)["stats"]["resync_bytes"] - before
    print(f"resync after peer loss: moved {moved} bytes for {len(dirty) * 4096} dirty bytes")
    assert moved <= 1.2 * len(dirty) * 4096, (moved, len(dirty) * 4096)
    assert digest(pair.data_file(pair.a)) == digest(pair.data_file(pair.b))


def test_role_rules(pair):
    pair.start()
    pair.wait(pair.connected, what="connection")
    refused = pair.b.ctl("primary", pair.resource, check=False)
    assert not refused["ok"] and "Inconsistent" in refused["error"]
    pair.a.ctl("primary", pair.resource, "--force")
    pair.wait(pair.in_sync, timeout=120, what="initial sync")
    refused = pair.b.ctl("primary", pair.resource, check=False)
    assert not refused["ok"] and "peer is Primary" in refused["error"]
    # A planned switchover: demote a, promote b, with no resync.
    pair.a.ctl("secondary", pair.resource)
    pair.wait(lambda: pair.b.status(pair.resource)["peer_role"] == "Secondary", what="peer role")
    pair.b.ctl("primary", pair.resource)
    assert pair.b.status(pair.resource)["role"] == "Primary"
    assert pair.in_sync()


def test_hostile_peer_input_drops_only_that_connection(pair):
    """Garbage is refused by TLS; garbage from a peer that TLS lets in (a's own certificate, as a
    compromised or buggy peer would have) is refused by the decoder and the ident/AUTH checks."""
    import json
    import socket
    import ssl
    import struct

    from tandem.engine import wire

    pair.b.start()                      # b listens; a is not there yet
    port = pair.ports["b"]
    before = digest(pair.data_file(pair.b))
    hello = {"proto": 1, "resource": "other", "node": "a", "peer": "b", "role": "Primary",
             "protocol": "C", "volumes": []}
    attacks = [
        b"GET / HTTP/1.0\r\n\r\n",
        struct.pack("<IHHI", wire.MAGIC, 2, 0, 1 << 30),                       # absurd length
        b"".join(wire.encode_json(wire.T.HELLO, {**hello, "proto": wire.VERSION})),  # wrong resource
        b"".join(wire.encode_json(wire.T.HELLO, {**hello, "resource": pair.resource,
                                                  "volumes": [{"number": 0}]})),  # old version
        b"".join(wire.encode_data(0, 1, 0, b"evil" * 1024, fua=True)),        # data before hello
    ]
    ident = {"proto": wire.VERSION, "resource": pair.resource, "node": "a", "peer": "b"}
    mine = "ab" * 32

    def read_message(s) -> dict:
        head = b""
        while len(head) < wire.HEADER.size:
            head += s.recv(wire.HEADER.size - len(head))
        *_, length = wire.HEADER.unpack(head)
        body = b""
        while len(body) < length:
            body += s.recv(length - len(body))
        return json.loads(body)

    # After a valid ident HELLO: (what to send, given b's ident HELLO).
    auth_attacks = [
        lambda theirs: wire.encode_json(wire.T.HELLO, {**ident, "nonce": "not hex"}),
        lambda theirs: wire.encode_json(wire.T.HELLO, {**ident, "nonce": mine})
        + wire.encode_auth(b"\0" * 32),                                       # wrong proof
        lambda theirs: wire.encode_json(wire.T.HELLO, {**ident, "nonce": theirs["nonce"]}),  # echo
    ]
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.load_cert_chain(pair.security["a"]["tls_cert"], pair.security["a"]["tls_key"])
    tls.load_verify_locations(pair.security["a"]["tls_ca"])

    def attack(payload, wrap: bool) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            s = tls.wrap_socket(raw, server_hostname="b") if wrap else raw
            if callable(payload):
                payload = b"".join(payload(read_message(s)))
            s.sendall(payload)
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except (OSError, TimeoutError):          # reset, TLS alert
                pass

    for payload in attacks:
        attack(payload, wrap=False)
    stats = pair.b.status(pair.resource)["stats"]
    assert (stats["protocol_errors"], stats["auth_errors"]) == (len(attacks), len(attacks))
    for payload in attacks + auth_attacks:
        attack(payload, wrap=True)
    assert pair.b.proc.poll() is None, "tandemd died on hostile input"
    assert digest(pair.data_file(pair.b)) == before, "hostile input changed the data"
    stats = pair.b.status(pair.resource)["stats"]
    assert stats["protocol_errors"] == 2 * len(attacks) + len(auth_attacks)
    assert stats["auth_errors"] == len(attacks) + 2          # the wrong proof, our nonce echoed
    log = pair.b.log.read_text()
    for reason in ("bad magic", "exceeds", "offers resource 'other'", "protocol version 1 is not",
                   "expected HELLO, got DATA", "nonce must be 64 lower-case hex digits",
                   "authentication failed: 'a' does not know the shared secret",
                   "authentication failed: the peer sent our own nonce back"):
        assert reason in log, reason
    pair.a.start()                      # the real peer still gets in
    pair.wait(pair.connected, what="connection after the attacks")
