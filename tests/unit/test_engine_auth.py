"""The link's challenge-response and certificate name checks (tandem.engine.auth, pure)."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.engine import auth
from tandem.engine.auth import AuthError
from tandem.engine.wire import ProtocolError

SECRET = b"0123456789abcdef0123456789abcdef"


def exchange(secret_a: bytes, secret_b: bytes, resource_a: str = "vm1", resource_b: str = "vm1"):
    """Both sides of one AUTH exchange between nodes a and b; returns what each side's verify did."""
    na, nb = auth.new_nonce(), auth.new_nonce()
    # What each side sends: its MAC over (receiver's nonce, its own nonce).
    from_a = auth.mac(secret_a, resource_a, "a", auth.parse_nonce(nb, na), bytes.fromhex(na))
    from_b = auth.mac(secret_b, resource_b, "b", auth.parse_nonce(na, nb), bytes.fromhex(nb))
    results = {}
    for me, secret, resource, mine, theirs, sender, got in (
            ("a", secret_a, resource_a, na, nb, "b", from_b),
            ("b", secret_b, resource_b, nb, na, "a", from_a)):
        try:
            auth.verify(secret, resource, sender, bytes.fromhex(mine), bytes.fromhex(theirs), got)
            results[me] = "ok"
        except AuthError as e:
            results[me] = str(e)
    return results


def test_same_secret_authenticates_both_ways():
    assert exchange(SECRET, SECRET) == {"a": "ok", "b": "ok"}


def test_a_different_secret_fails_on_both_sides():
    results = exchange(SECRET, SECRET[:-1] + b"X")
    assert all("authentication failed" in r for r in results.values()), results
    assert "does not know the shared secret of resource 'vm1'" in results["a"]


def test_the_mac_is_bound_to_the_resource():
    results = exchange(SECRET, SECRET, "vm1", "vm2")
    assert "ok" not in results.values()


def test_mac_is_hmac_sha256_over_length_prefixed_fields():
    n1, n2 = b"\1" * 32, b"\2" * 32
    fields = [auth.CONTEXT, b"vm1", b"a", n1, n2]
    msg = b"".join(len(f).to_bytes(4, "big") + f for f in fields)
    assert auth.mac(SECRET, "vm1", "a", n1, n2) == hmac.new(SECRET, msg, hashlib.sha256).digest()
    assert len(auth.mac(SECRET, "vm1", "a", n1, n2)) == auth.MAC_BYTES


def test_every_input_changes_the_mac():
    n1, n2 = b"\1" * 32, b"\2" * 32
    base = auth.mac(SECRET, "vm1", "a", n1, n2)
    variants = [
        auth.mac(SECRET + b"x", "vm1", "a", n1, n2),
        auth.mac(SECRET, "vm2", "a", n1, n2),
        auth.mac(SECRET, "vm1", "b", n1, n2),
        auth.mac(SECRET, "vm1", "a", n2, n1),          # nonces swapped
        auth.mac(SECRET, "vm1", "a", n1, n1),
        # Field boundaries matter: "vm1" + "a" is not "vm" + "1a".
        auth.mac(SECRET, "vm", "1a", n1, n2),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_a_reflected_auth_is_refused():
    """A man in the middle that sends a node's own AUTH back to it gets nowhere."""
    ours, theirs = auth.new_nonce(), auth.new_nonce()
    mine = auth.mac(SECRET, "vm1", "a", bytes.fromhex(theirs), bytes.fromhex(ours))
    with pytest.raises(AuthError):
        auth.verify(SECRET, "vm1", "b", bytes.fromhex(ours), bytes.fromhex(theirs), mine)


def test_a_replayed_auth_is_refused():
    """An AUTH recorded from an earlier connection does not fit a new nonce."""
    old_ours, theirs = auth.new_nonce(), auth.new_nonce()
    recorded = auth.mac(SECRET, "vm1", "b", bytes.fromhex(old_ours), bytes.fromhex(theirs))
    auth.verify(SECRET, "vm1", "b", bytes.fromhex(old_ours), bytes.fromhex(theirs), recorded)
    new_ours = auth.new_nonce()
    with pytest.raises(AuthError):
        auth.verify(SECRET, "vm1", "b", bytes.fromhex(new_ours), bytes.fromhex(theirs), recorded)


@settings(max_examples=200, deadline=None)
@given(got=st.binary(min_size=0, max_size=64))
def test_random_proofs_are_refused(got):
    n1, n2 = b"\1" * 32, b"\2" * 32
    with pytest.raises(AuthError):
        auth.verify(SECRET, "vm1", "a", n1, n2, got)


def test_nonces_are_fresh_hex():
    nonces = {auth.new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == 64 and int(n, 16) >= 0 for n in nonces)


@pytest.mark.parametrize("value", [None, 7, "", "ab", "g" * 64, "A" * 64, "a" * 63, "a" * 65, ["a" * 64]])
def test_malformed_nonces_are_protocol_errors(value):
    with pytest.raises(ProtocolError, match="nonce"):
        auth.parse_nonce(value, auth.new_nonce())


def test_our_own_nonce_sent_back_is_refused():
    ours = auth.new_nonce()
    with pytest.raises(AuthError, match="our own nonce"):
        auth.parse_nonce(ours, ours)
    assert auth.parse_nonce("0f" * 32, ours) == b"\x0f" * 32


def test_parse_secret():
    assert auth.parse_secret(b"  " + SECRET + b"\n") == SECRET
    assert auth.parse_secret(b"x" * 16) == b"x" * 16
    with pytest.raises(ValueError, match="holds 15 bytes"):
        auth.parse_secret(b"\n" + b"x" * 15 + b"\n\n")
    with pytest.raises(ValueError, match="holds 0 bytes"):
        auth.parse_secret(b" \t\n")


CERT = {  # the shape of ssl.SSLSocket.getpeercert()
    "subject": ((("commonName", "ignored-when-san"),),),
    "subjectAltName": (("DNS", "hv-b1"), ("DNS", "hv-b1.dr.example"), ("IP Address", "10.0.0.2")),
}


def test_cert_names_prefer_the_san_dns_entries():
    assert auth.cert_names(CERT) == ["hv-b1", "hv-b1.dr.example"]
    assert auth.names_peer(CERT, "hv-b1") and auth.names_peer(CERT, "HV-B1")
    assert auth.names_peer(CERT, "hv-b1.dr.example")
    assert not auth.names_peer(CERT, "ignored-when-san")
    assert not auth.names_peer(CERT, "10.0.0.2")        # not a DNS name
    assert not auth.names_peer(CERT, "hv-b")


def test_cert_names_fall_back_to_the_common_name():
    cert = {"subject": ((("countryName", "DE"),), (("commonName", "hv-a1"),))}
    assert auth.cert_names(cert) == ["hv-a1"]
    assert auth.names_peer(cert, "hv-a1")
    ip_only = {**cert, "subjectAltName": (("IP Address", "10.0.0.1"),)}
    assert auth.cert_names(ip_only) == ["hv-a1"]


def test_no_certificate_names_nobody():
    assert auth.cert_names(None) == [] and auth.cert_names({}) == []
    assert not auth.names_peer(None, "hv-b1") and not auth.names_peer({}, "hv-b1")


def test_wildcards_are_not_expanded():
    cert = {"subjectAltName": (("DNS", "*.dr.example"),)}
    assert not auth.names_peer(cert, "hv-b1.dr.example")
