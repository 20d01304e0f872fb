"""Online verify (`tandemctl verify`) between two real daemons: clean pairs, corruption
behind the engine's back (found exactly, resynced on request), no false positives under
concurrent writes, refusals, and a link loss in the middle."""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from .harness import MiB, Pair
from .test_replication import random_writes
from .workload import Writer

BLOCK = 4096


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def synced_pair(tmp_path, **kw) -> Pair:
    """A started pair, a Primary, in sync, with random data on the volume."""
    pair = Pair(tmp_path, **kw)
    pair.data_file(pair.a).write_bytes(os.urandom(pair.size))
    pair.start_in_sync()
    return pair


def set_tunables(pair: Pair, node, **tunables) -> None:
    """Change tunables online (tandemctl adjust) on one node."""
    path = node.config_dir / f"{pair.resource}.toml"
    text = path.read_text()
    for key, value in tunables.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if not n:
            text = text.replace("[tunables]\n", f"[tunables]\n{key} = {value}\n")
    path.write_text(text)
    node.ctl("adjust", pair.resource)


@pytest.fixture
def pair(tmp_path):
    p = synced_pair(tmp_path)
    yield p
    p.stop()


def test_a_pair_in_sync_verifies_clean(pair):
    random_writes(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", pair.size, 200, 3)
    pair.wait(pair.in_sync, what="in sync after writes")
    out = pair.a.ctl("verify", pair.resource)
    assert out["ok"] and out["out_of_sync_bytes"] == 0 and not out["resync_started"]
    [v] = out["volumes"]
    assert (v["volume"], v["checked_bytes"], v["out_of_sync_bytes"], v["ranges"]) == (0, pair.size, 0, [])
    assert v["seconds"] >= 0
    assert "verify_percent" not in pair.a.status(pair.resource)["volumes"][0]     # only while running
    log = pair.a.log.read_text()
    assert "verify-started" in log and "verify-finished" in log


def test_corruption_is_found_exactly_and_resynced_on_request(pair):
    # Corrupt blocks of the Secondary's data file behind the engine's back (it reads
    # through the same page cache, so it sees the new bytes at once).
    bad = [5, 6, 7, 100, 2000, pair.size // BLOCK - 1]
    with open(pair.data_file(pair.b), "r+b") as f:
        for block in bad:
            f.seek(block * BLOCK)
            f.write(os.urandom(BLOCK))
    want = [[5 * BLOCK, 3 * BLOCK], [100 * BLOCK, BLOCK], [2000 * BLOCK, BLOCK],
            [pair.size - BLOCK, BLOCK]]
    b_before = digest(pair.data_file(pair.b))

    out = pair.a.ctl("verify", pair.resource)
    [v] = out["volumes"]
    assert v["ranges"] == want and v["out_of_sync_bytes"] == len(bad) * BLOCK
    assert v["checked_bytes"] == pair.size and not out["resync_started"]
    # Without --resync nothing changes: still connected, nothing marked, data as it was.
    assert pair.in_sync()
    assert digest(pair.data_file(pair.b)) == b_before != digest(pair.data_file(pair.a))

    moved_before = pair.a.status(pair.resource)["stats"]["resync_bytes"]
    out = pair.a.ctl("verify", pair.resource, "--resync")
    assert out["ok"] and out["resync_started"] and out["volumes"][0]["ranges"] == want
    pair.wait(pair.in_sync, timeout=60, what="resync after verify")
    moved = pair.a.status(pair.resource)["stats"]["resync_bytes"] - moved_before
    print(f"verify --resync moved {moved} bytes for {len(bad) * BLOCK} corrupted bytes")
    assert len(bad) * BLOCK <= moved <= 1.2 * len(bad) * BLOCK
    assert digest(pair.data_file(pair.a)) == digest(pair.data_file(pair.b))
    out = pair.a.ctl("verify", pair.resource)
    assert out["out_of_sync_bytes"] == 0
    assert "verify-resync" in pair.a.log.read_text()      # the reason of the reconnect


def test_no_false_positives_under_concurrent_writes(pair):
    # A write that races a verify request shows up as a false positive only if it
    # lands while its range is being read, so the chance per verify is about
    # write rate x read time: run several writers and many quick verifies (the
    # pacer kept at full rate). Without the range hold, or with the peer answering
    # out of apply order, this fails.
    # Each writer has a region of its own: concurrent *overlapping* writes can
    # really leave the nodes different (their local completion order may differ
    # from their send order), and verify would rightly report that.
    set_tunables(pair, pair.a, resync_rate_max=256 * MiB, resync_rate_min=256 * MiB)
    region = pair.size // 4
    writers = [Writer(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", region,
                      random.Random(11 + i), base=i * region) for i in range(4)]
    for w in writers:
        w.start()
    try:
        time.sleep(0.3)
        before = sum(w.count for w in writers)
        results = [pair.a.ctl("verify", pair.resource) for _ in range(12)]
        during = sum(w.count for w in writers) - before
    finally:
        for w in writers:
            w.finish()
    assert all(w.error is None for w in writers), [w.error for w in writers]
    seconds = sum(r["volumes"][0]["seconds"] for r in results)
    print(f"12 verifies took {seconds:.2f}s with {during} concurrent writes")
    assert during > 500, "the writes did not overlap the verifies"
    for out in results:
        [v] = out["volumes"]
        assert v["checked_bytes"] == pair.size
        assert (v["out_of_sync_bytes"], v["ranges"]) == (0, []), "false positives"
    pair.wait(pair.in_sync, what="in sync after the writes")
    assert digest(pair.data_file(pair.a)) == digest(pair.data_file(pair.b))


def test_refusals(pair):
    refused = pair.b.ctl("verify", pair.resource, check=False)
    assert not refused["ok"] and "peer is Primary" in refused["error"]
    pair.b.stop()
    pair.wait(lambda: pair.a.status(pair.resource)["connection"] != "Connected", what="disconnect")
    refused = pair.a.ctl("verify", pair.resource, check=False)
    assert not refused["ok"] and "not connected" in refused["error"]


def test_neither_primary_verifies_from_either_node(pair):
    pair.a.ctl("secondary", pair.resource)
    pair.wait(lambda: pair.b.status(pair.resource)["peer_role"] == "Secondary", what="peer role")
    for node in (pair.a, pair.b):
        out = node.ctl("verify", pair.resource)
        assert out["ok"] and out["volumes"][0]["checked_bytes"] == pair.size
        assert out["out_of_sync_bytes"] == 0


def test_link_loss_ends_the_verify_with_an_error(pair):
    set_tunables(pair, pair.a, resync_rate_max=2 * MiB, resync_rate_min=1 * MiB)   # ~8 s for 16 MiB
    result = {}
    t = threading.Thread(target=lambda: result.update(pair.a.ctl("verify", pair.resource, check=False)))
    t.start()
    pair.wait(lambda: pair.a.status(pair.resource)["volumes"][0].get("verify_percent", 0) > 0,
              timeout=20, what="verify progress in status")
    again = pair.a.ctl("verify", pair.resource, check=False)
    assert not again["ok"] and "already running" in again["error"]
    pair.b.kill()
    t0 = time.monotonic()
    t.join(30)
    assert not t.is_alive(), "verify hangs after the link went away"
    print(f"verify ended {time.monotonic() - t0:.2f}s after the peer died: {result.get('error')}")
    assert not result["ok"] and "verify stopped" in result["error"]
    [v] = result["volumes"]
    assert 0 < v["checked_bytes"] < pair.size
    assert "verify_percent" not in pair.a.status(pair.resource)["volumes"][0]
    # Nothing is left behind: after the peer is back, a verify runs again.
    pair.b.start()
    pair.wait(pair.in_sync, timeout=60, what="back in sync")
    set_tunables(pair, pair.a, resync_rate_max=100 * MiB, resync_rate_min=4 * MiB)
    assert pair.a.ctl("verify", pair.resource)["out_of_sync_bytes"] == 0


# -- hostile verify messages, from a fake peer that completes the real handshake ----------

class FakePeer:
    """Speaks the wire protocol as node "a" to node b, claiming a's state."""

    def __init__(self, pair: Pair, role: str):
        from tandem.engine import auth, wire
        self.wire = wire
        toml = pair.b.config_dir.joinpath(f"{pair.resource}.toml").read_text()
        port = int(toml.split('name = "b"\naddress = "127.0.0.1:')[1].split('"')[0])
        # Inside mutual TLS with a's certificate and the shared secret: the real
        # handshake, so the hostile messages reach the verify code.
        sec = pair.security["a"]
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.load_cert_chain(sec["tls_cert"], sec["tls_key"])
        tls.load_verify_locations(sec["tls_ca"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.s = tls.wrap_socket(raw, server_hostname="b")
        nonce = auth.new_nonce()
        ident = {"proto": wire.VERSION, "resource": pair.resource, "node": "a", "peer": "b", "probe": 0,
                 "nonce": nonce}
        self.send(wire.encode_json(wire.T.HELLO, ident))
        theirs = self.recv()
        assert theirs.type == wire.T.HELLO
        secret = auth.parse_secret(Path(sec["secret_file"]).read_bytes())
        their_nonce = bytes.fromhex(theirs.body["nonce"])
        self.send(wire.encode_auth(auth.mac(secret, pair.resource, "a", their_nonce, bytes.fromhex(nonce))))
        assert self.recv().type == wire.T.AUTH
        ident = {k: v for k, v in ident.items() if k != "nonce"}
        vols = [{"number": v["volume"], "size": v["size"], "current": int(v["generation"]["current"], 16),
                 "bitmap": 0, "history": [int(h, 16) for h in v["generation"]["history"]],
                 "consistent": True, "disk": "UpToDate", "crashed_primary": False, "bits": 0}
                for v in pair.b.status(pair.resource)["volumes"]]
        self.send(wire.encode_json(wire.T.HELLO, {**ident, "role": role, "protocol": "C", "discard": None,
                                                  "volumes": vols}))
        assert self.recv().type == wire.T.HELLO
        pair.wait(lambda: pair.b.status(pair.resource)["connection"] == "Connected", what="fake peer in")

    def send(self, parts) -> None:
        self.s.sendall(b"".join(parts))

    def _exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def recv(self):
        """The next message other than a keep-alive (answered)."""
        wire = self.wire
        while True:
            t, flags, n = wire.parse_header(wire.HEADER.unpack(self._exactly(wire.HEADER.size)))
            msg = wire.parse_payload(t, flags, self._exactly(n))
            if msg.type == wire.T.PING:
                self.send(wire.encode_u64(wire.T.PING_ACK, msg.seq))
            elif msg.type != wire.T.PING_ACK:
                return msg

    def dropped(self) -> bool:
        """Did b close the connection (within the socket timeout)?"""
        try:
            while True:
                self.recv()
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        finally:
            self.s.close()


def test_hostile_verify_messages_drop_only_that_connection(pair):
    from tandem.engine import wire
    from tandem.engine.verify import block_digests

    res = pair.resource
    pair.a.stop()                       # a Secondary b; the fake peer plays a
    pair.wait(lambda: pair.b.status(res)["connection"] == "Connecting", what="b alone")
    b_data = digest(pair.data_file(pair.b))
    errors = pair.b.status(res)["stats"]["protocol_errors"]

    # An honest request is answered, in order, with exactly the differing block.
    peer = FakePeer(pair, "Secondary")
    fd = os.open(pair.data_file(pair.a), os.O_RDONLY)
    try:
        digests = bytearray(block_digests(fd, MiB, MiB, BLOCK))
    finally:
        os.close(fd)
    digests[16 * 9] ^= 1                                   # block 9 "differs"
    peer.send(wire.encode_verify_req(1, 0, MiB, MiB, BLOCK, bytes(digests)))
    reply = peer.recv()
    assert (reply.type, reply.seq, reply.offset, reply.length, reply.block_size) == \
        (wire.T.VERIFY_REPLY, 1, MiB, MiB, BLOCK)
    assert int.from_bytes(reply.data, "little") == 1 << 9

    hostile = [
        wire.encode_verify_reply(7, 0, 0, MiB, BLOCK, bytes(32)),             # nothing in flight
        wire.encode_verify_req(2, 3, 0, BLOCK, BLOCK, bytes(16)),             # no volume 3
        wire.encode_verify_req(2, 0, pair.size - BLOCK, 2 * BLOCK, BLOCK, bytes(32)),   # past the end
        wire.encode_verify_req(2, 0, 0, BLOCK + 512, BLOCK, bytes(32)),       # not whole blocks
    ]
    for n, attack in enumerate(hostile, 1):
        peer.send(attack)
        assert peer.dropped(), "the connection stayed up"
        pair.wait(lambda n=n: pair.b.status(res)["stats"]["protocol_errors"] >= errors + n,
                  what="protocol error counted")
        pair.wait(lambda: pair.b.status(res)["connection"] == "Connecting", what="b waits again")
        if n < len(hostile):
            peer = FakePeer(pair, "Secondary")
    # A VERIFY_REQ to a Primary.
    pair.b.ctl("primary", res, "--force")
    peer = FakePeer(pair, "Secondary")
    peer.send(wire.encode_verify_req(2, 0, 0, BLOCK, BLOCK, bytes(16)))
    assert peer.dropped()
    pair.wait(lambda: pair.b.status(res)["stats"]["protocol_errors"] >= errors + len(hostile) + 1,
              what="protocol error counted")
    assert pair.b.proc.poll() is None
    assert digest(pair.data_file(pair.b)) == b_data
    assert "VERIFY_REQ sent to a Primary" in pair.b.log.read_text()
