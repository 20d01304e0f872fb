"""The replication link over mutual TLS with the shared secret: who gets in and who does not.

Two real daemons, real certificates (certs.py), no mocks. Every rejection
test first shows that the very same setup connects, then changes one thing
on one node with `tandemctl adjust` (an online change-security: that node
reconnects with the new settings), checks that the nodes never connect, that
the failure is counted and logged, and that the Primary keeps serving writes
meanwhile; then it puts the right setting back and the pair reconnects.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from pathlib import Path

import pytest

from .certs import write_secret
from .harness import Pair
from .nbdclient import Client


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.stop()


def stats(node, pair) -> dict:
    return node.status(pair.resource)["stats"]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_in_sync(pair, primary):
    """The happy path with the setup under test: connected, TLS up, initial sync done."""
    pair.start()
    pair.wait(pair.connected, what="connection with the good settings")
    for node in (pair.a, pair.b):
        assert re.search(r"tls established peer=[ab] .* version=TLSv1\.3", node.log.read_text()), \
            f"{node.name} did not log the TLS handshake"
        assert stats(node, pair)["auth_errors"] == 0
    primary.ctl("primary", pair.resource, "--force")
    pair.wait(pair.in_sync, timeout=120, what="initial sync")


def reconfigure(pair, node, **security):
    """Change node's [security] table and apply it online (adjust: change-security)."""
    pair.set_security(node, **security)
    reply = node.ctl("adjust")
    assert [a["kind"] for a in reply["actions"]] == ["change-security"], reply


def assert_rejected(pair, primary, counted: dict, logged: dict, seconds: float = 3.0):
    """The nodes stay apart: counted[node] errors more (stat name, minimum), logged[node] in its log;
    the Primary writes all along; the Secondary's disk does not change."""
    secondary = pair.b if primary is pair.a else pair.a
    base = {n.name: stats(n, pair) for n in (pair.a, pair.b)}
    before = digest(pair.data_file(secondary))
    client = Client(primary.nbd_socket(pair.resource), f"{pair.resource}/disk0")
    rng = random.Random(5)
    written = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or written < 50:
            t0 = time.monotonic()
            client.write(rng.randrange(0, pair.size // 4096) * 4096, rng.randbytes(4096))
            assert time.monotonic() - t0 < 2.0, "a write on the Primary stalled"
            written += 1
            for node in (pair.a, pair.b):
                assert node.status(pair.resource)["connection"] != "Connected", \
                    f"{node.name} connected:\n{node.log.read_text()[-3000:]}"
        client.flush()
    finally:
        client.close()

    def errors_counted():
        for node in (pair.a, pair.b):
            for stat, minimum in counted.get(node.name, {}).items():
                if stats(node, pair)[stat] - base[node.name][stat] < minimum:
                    return False
        return True

    pair.wait(errors_counted, timeout=20, what=f"errors counted: {counted}")
    for node in (pair.a, pair.b):
        for pattern in logged.get(node.name, ()):
            assert re.search(pattern, node.log.read_text()), f"{pattern!r} not in the log of {node.name}"
    st = primary.status(pair.resource)
    assert st["role"] == "Primary" and st["volumes"][0]["out_of_sync_bytes"] > 0
    assert digest(pair.data_file(secondary)) == before, "the rejected link wrote to the Secondary"


def back_in_sync(pair, node, **security):
    reconfigure(pair, node, **security)
    pair.wait(pair.in_sync, timeout=60, what="resync once the right settings are back")
    assert digest(pair.data_file(pair.a)) == digest(pair.data_file(pair.b))


# --------------------------------------------------------------------------- certificates


@pytest.mark.parametrize("rogue", ["a", "b"], ids=["dialer", "listener"])
def test_a_certificate_from_an_unknown_ca_is_rejected(pair, rogue):
    primary = pair.b                     # the listener, which strangers dial
    start_in_sync(pair, primary)
    node = pair.a if rogue == "a" else pair.b
    good = dict(pair.security[node.name])
    pem = pair.pki.issue("rogue-site", node.name)     # the right name, from a CA nobody trusts
    reconfigure(pair, node, tls_cert=pem.cert, tls_key=pem.key)
    if rogue == "a":
        # b refuses a's certificate. In TLS 1.3 that happens after a's side of the handshake
        # is done, and b just closes: a can only say that it was closed on.
        counted = {"b": {"auth_errors": 2}}
        logged = {"b": [r"TLS handshake from 127\.0\.0\.1:\d+ failed: certificate verify failed: "
                        r"unable to get local issuer certificate"],
                  "a": [r"closed the TLS connection before sending anything"]}
    else:
        counted = {"a": {"auth_errors": 2}}
        logged = {"a": [r"TLS handshake with 127\.0\.0\.1:\d+ failed: certificate verify failed: "
                        r"unable to get local issuer certificate"]}
    assert_rejected(pair, primary, counted, logged)
    back_in_sync(pair, node, tls_cert=good["tls_cert"], tls_key=good["tls_key"])


@pytest.mark.parametrize("impostor", ["a", "b"], ids=["dialer", "listener"])
def test_a_valid_certificate_for_another_name_is_rejected(pair, impostor):
    """Signed by the CA the peer trusts, but issued to "c": not the configured peer."""
    primary = pair.b
    start_in_sync(pair, primary)
    node = pair.a if impostor == "a" else pair.b
    good = dict(pair.security[node.name])
    pem = pair.pki.issue("site-a" if impostor == "a" else "site-b", "c")
    reconfigure(pair, node, tls_cert=pem.cert, tls_key=pem.key)
    if impostor == "a":
        counted = {"b": {"auth_errors": 2}}
        logged = {"b": [r"unknown peer 127\.0\.0\.1:\d+: its certificate is for \['c'\], not for 'a'"]}
    else:
        counted = {"a": {"auth_errors": 2}}
        logged = {"a": [r"TLS handshake with 127\.0\.0\.1:\d+ failed: certificate verify failed: "
                        r"Hostname mismatch, certificate is not valid for 'b'"]}
    assert_rejected(pair, primary, counted, logged)
    back_in_sync(pair, node, tls_cert=good["tls_cert"], tls_key=good["tls_key"])


def test_a_ca_bundle_of_both_sites_works_too(pair):
    bundle = pair.pki.bundle("site-a", "site-b")
    for node in (pair.a, pair.b):
        pair.set_security(node, tls_ca=bundle)
    start_in_sync(pair, pair.a)


# --------------------------------------------------------------------------- the shared secret


def test_a_wrong_shared_secret_is_rejected(pair, tmp_path):
    primary = pair.b
    start_in_sync(pair, primary)
    good = pair.security["a"]["secret_file"]
    wrong = tmp_path / "wrong.key"
    write_secret(wrong)
    reconfigure(pair, pair.a, secret_file=wrong)
    # Both sides check the other's proof, so both notice.
    message = r"authentication failed: '{}' does not know the shared secret of resource 'vm1'"
    assert_rejected(pair, primary, {"a": {"auth_errors": 2}, "b": {"auth_errors": 2}},
                    {"a": [message.format("b")], "b": [message.format("a")]})
    back_in_sync(pair, pair.a, secret_file=good)


def test_a_missing_secret_file_stops_only_that_resource(pair, tmp_path):
    """Checked when the resource starts: a clear error, and the daemon runs its other resources."""
    # A second resource on node a, whose peer never comes: it just has to run.
    other = Pair(tmp_path / "other", resource="vm2")
    (pair.a.config_dir / "vm2.toml").write_text((other.a.config_dir / "vm2.toml").read_text())
    missing = tmp_path / "secrets" / "vm1.key"
    pair.set_security(pair.a, secret_file=missing)
    pair.a.start()
    assert [r["name"] for r in pair.a.ctl("status")["resources"]] == ["vm2"]
    assert (f"security.secret_file: resource 'vm1': cannot read '{missing}': No such file or directory"
            in pair.a.log.read_text())
    reply = pair.a.ctl("adjust", check=False)        # still missing: adjust says why, vm2 runs on
    assert not reply["ok"]
    assert f"security.secret_file: resource 'vm1': cannot read '{missing}'" in reply["error"]
    assert [r["name"] for r in pair.a.ctl("status")["resources"]] == ["vm2"]
    missing.parent.mkdir()
    write_secret(missing, Path(pair.security["b"]["secret_file"]).read_text().strip())
    assert [a["kind"] for a in pair.a.ctl("adjust")["actions"]] == ["add-resource"]
    pair.b.start()
    pair.wait(pair.connected, what="connection once the secret is there")


# --------------------------------------------------------------------------- plaintext


def test_plaintext_and_tls_never_connect(pair):
    for node in (pair.a, pair.b):
        pair.set_security(node, plaintext=True)
    pair.start()
    pair.wait(pair.connected, what="plaintext connection")           # plaintext on both: works
    assert "tls established" not in pair.a.log.read_text()
    pair.b.ctl("primary", pair.resource, "--force")
    pair.wait(pair.in_sync, timeout=120, what="initial sync")

    # a dials in plaintext, b listens with TLS: b's TLS refuses a's HELLO.
    reconfigure(pair, pair.b, plaintext=False)
    assert_rejected(pair, pair.b, {"b": {"auth_errors": 2}},
                    {"b": [r"TLS handshake from 127\.0\.0\.1:\d+ failed: wrong version number "
                           r"\(not TLS: is the peer in plaintext mode\?\)"]})
    # a dials with TLS, b listens in plaintext: b's decoder refuses the ClientHello.
    reconfigure(pair, pair.a, plaintext=False)
    reconfigure(pair, pair.b, plaintext=True)
    assert_rejected(pair, pair.b, {"b": {"protocol_errors": 2}},
                    {"b": [r"protocol error .*reason=bad magic 0x[0-9a-f]+: a TLS handshake"]})
    back_in_sync(pair, pair.b, plaintext=False)                      # TLS on both: works
