"""security.load: the checks tandemd makes on a resource's certificate, key, CAs and secret."""

from __future__ import annotations

import asyncio
import ssl
import subprocess

import pytest

from tandem.engine import security
from tandem.engine.config import parse_resource

from .certs import OPENSSL, pki, write_secret

SOURCE = "/etc/tandem/resources.d/vm1.toml"


def cfg(tmp_path, **sec):
    p = pki()
    pem = p.issue("site-a", "a")
    if not (tmp_path / "vm1.key").exists():
        write_secret(tmp_path / "vm1.key")
    values = {"tls_cert": str(pem.cert), "tls_key": str(pem.key), "tls_ca": str(p.ca("site-b").cert),
              "secret_file": str(tmp_path / "vm1.key"), **{k: str(v) if v is not True else v
                                                            for k, v in sec.items()}}
    doc = {"resource": "vm1", "protocol": "C", "local_node": "a",
           "nodes": [{"name": "a", "address": "127.0.0.1:1"}, {"name": "b", "address": "127.0.0.1:2"}],
           "volumes": [{"number": 0, "path": "/x", "size": 4096}], "security": values}
    return parse_resource(doc, source=SOURCE)


def problems(tmp_path, **sec) -> list[str]:
    with pytest.raises(security.SecurityError) as info:
        security.load(cfg(tmp_path, **sec))
    assert all(p.source == SOURCE for p in info.value.problems)
    return [f"{p.key}: {p.message}" for p in info.value.problems]


def test_good_files_give_two_tls_1_3_contexts_and_the_secret(tmp_path):
    sec = security.load(cfg(tmp_path))
    assert not sec.plaintext and sec.secret == (tmp_path / "vm1.key").read_text().strip().encode()
    assert sec.client_tls.peer_name == sec.server_tls.peer_name == "b"
    for tls in (sec.client_tls, sec.server_tls):
        assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert tls.context.verify_mode == ssl.CERT_REQUIRED
    assert sec.client_tls.context.check_hostname
    assert sec.secret.decode() not in repr(sec)


def test_plaintext_reads_nothing(tmp_path):
    sec = security.load(cfg(tmp_path, plaintext=True, tls_cert="/nonexistent", secret_file="/nonexistent"))
    assert sec.plaintext and sec.client_tls is None and sec.server_tls is None


def test_missing_files_are_all_reported_with_resource_key_and_path(tmp_path):
    missing = tmp_path / "missing"
    got = problems(tmp_path, tls_cert=missing / "a.crt", tls_key=missing / "a.key", tls_ca=missing / "ca.crt",
                   secret_file=missing / "vm1.key")
    assert got == [f"security.{key}: resource 'vm1': cannot read '{missing / name}': "
                   f"No such file or directory"
                   for key, name in (("tls_cert", "a.crt"), ("tls_key", "a.key"), ("tls_ca", "ca.crt"),
                                     ("secret_file", "vm1.key"))]
    # A ConfigError: tandemd and adjust report it like one.
    assert issubclass(security.SecurityError, security.ConfigError)


def test_a_short_secret_is_refused(tmp_path):
    short = tmp_path / "short.key"
    short.write_text("  0123456789abcde \n")
    assert problems(tmp_path, secret_file=short) == [
        f"security.secret_file: resource 'vm1': '{short}' holds 15 bytes (without surrounding whitespace); "
        f"at least 16 are needed"]


def test_files_that_are_not_pem(tmp_path):
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    assert problems(tmp_path, tls_cert=junk) == [f"security.tls_cert: resource 'vm1': '{junk}' holds no PEM "
                                                 f"certificate"]
    assert problems(tmp_path, tls_key=junk) == [f"security.tls_key: resource 'vm1': '{junk}' holds no PEM "
                                                f"private key"]
    assert problems(tmp_path, tls_ca=junk) == [f"security.tls_ca: resource 'vm1': '{junk}' holds no PEM "
                                               f"CA certificate"]


def test_a_key_that_does_not_match_the_certificate(tmp_path):
    other = pki().issue("site-a", "c")
    (msg,) = problems(tmp_path, tls_key=other.key)
    assert msg.startswith(f"security.tls_key: resource 'vm1': '{other.key}' is not the private key of the "
                          f"certificate in ")


def test_an_encrypted_key_is_refused_without_prompting(tmp_path):
    pem = pki().issue("site-a", "a")
    locked = tmp_path / "locked.key"
    subprocess.run([OPENSSL, "pkey", "-in", str(pem.key), "-aes256", "-passout", "pass:x",
                    "-out", str(locked)], check=True, stdin=subprocess.DEVNULL)
    (msg,) = problems(tmp_path, tls_key=locked)
    assert msg == ("security.tls_key: resource 'vm1': the private key is encrypted; tandemd needs it "
                   "unencrypted (readable by tandemd only)")


class _Link:
    """Just what Security.authenticate and revoke look at before any I/O."""

    def __init__(self, tls):
        self.tls, self.closed = tls, False

    def close(self):
        self.closed = True


def test_replaced_settings_let_no_link_through(tmp_path):
    """adjust (change-security) revokes the old settings: links made or let in with them close."""
    old, new = security.load(cfg(tmp_path)), security.load(cfg(tmp_path))
    stale = _Link(old.server_tls)
    with pytest.raises(ConnectionResetError, match="security settings changed during the handshake"):
        asyncio.run(new.authenticate(stale, "00" * 32, {}))
    plain = security.load(cfg(tmp_path, plaintext=True))
    links = [_Link(None), _Link(None)]
    for link in links:
        asyncio.run(plain.authenticate(link, "00" * 32, {}))      # plaintext: nothing to prove
    assert not any(link.closed for link in links)
    plain.revoke()
    assert all(link.closed for link in links)
