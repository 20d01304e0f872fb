"""A resource's link security: its TLS contexts and shared secret (the [security] table).

`load(cfg)` reads the files that the resource's [security] table names and
builds the two TLS contexts (one to dial, one to listen). Every problem is a
SecurityError: a ConfigError whose lines name the resource file, the key, the
resource and the path, so tandemd reports it like a configuration error and
does not start that resource. `Security.authenticate` runs the shared-secret
challenge-response of the ident stage; the pure parts are in auth.py.

Both contexts require TLS 1.3 and a certificate from the peer that chains to
`tls_ca` and carries the peer's node name (the dialer checks it with
check_hostname, the listener in link.py after the handshake). TLS 1.3 is in
every OpenSSL since 1.1.1 and both ends are tandemd, so nothing older is
needed; it has no renegotiation and encrypts the certificates.
"""

from __future__ import annotations

import logging
import os
import ssl
import weakref
from dataclasses import dataclass, field

from . import auth, wire
from .config import ConfigError, Problem, default_secret_file
from .link import TLS

log = logging.getLogger("tandem.engine.security")

AUTH_TIMEOUT = 5.0


class SecurityError(ConfigError):
    """A certificate, key, CA bundle or secret file of a resource cannot be used."""


@dataclass(frozen=True)
class Security:
    """What a resource's links use. All None in plaintext mode."""

    resource: str
    local: str
    peer: str
    secret: bytes | None = field(default=None, repr=False)
    #: To dial the peer / to accept it.
    client_tls: TLS | None = None
    server_tls: TLS | None = None
    #: Links that passed `authenticate` with these settings (closed by `revoke`).
    _links: weakref.WeakSet = field(default_factory=weakref.WeakSet, compare=False, repr=False)

    @property
    def plaintext(self) -> bool:
        return self.secret is None

    async def authenticate(self, link, nonce: str, peer_ident: dict, timeout: float = AUTH_TIMEOUT) -> None:
        """Prove we hold the secret and check that the peer does (after the ident HELLOs).

        nonce is the one we sent in our HELLO, peer_ident the peer's HELLO.
        Raises auth.AuthError (a wire.ProtocolError) if the peer's proof is
        wrong. Does nothing in plaintext mode.
        """
        if not any(link.tls is tls for tls in (self.client_tls, self.server_tls)):
            # Made with settings that adjust has replaced since: not good enough any more.
            raise ConnectionResetError("the security settings changed during the handshake")
        self._links.add(link)
        if self.secret is None:
            return
        theirs = auth.parse_nonce(peer_ident.get("nonce"), nonce)
        ours = bytes.fromhex(nonce)
        link.send(wire.encode_auth(auth.mac(self.secret, self.resource, self.local, theirs, ours)))
        msg = await link.read_message(timeout)
        if msg.type != wire.T.AUTH:
            raise wire.ProtocolError(f"expected AUTH, got {msg.type.name}")
        auth.verify(self.secret, self.resource, self.peer, ours, theirs, msg.data)


    def revoke(self) -> None:
        """These settings are replaced: close every link that was let in with them."""
        for link in list(self._links):
            link.close()


def load(cfg) -> Security:
    """Read and check the resource's [security] files; SecurityError lists every problem."""
    sec = cfg.security
    names = {"resource": cfg.name, "local": cfg.local.name, "peer": cfg.peer.name}
    if sec.plaintext:
        log.warning("resource %s: security.plaintext is set: the replication link is neither encrypted "
                    "nor authenticated", cfg.name)
        return Security(**names)
    source = cfg.source or cfg.name
    problems: list[Problem] = []

    def problem(key: str, message: str) -> None:
        problems.append(Problem(source, f"security.{key}", f"resource {cfg.name!r}: {message}"))

    paths = {"tls_cert": sec.tls_cert, "tls_key": sec.tls_key, "tls_ca": sec.tls_ca,
             "secret_file": sec.secret_file or default_secret_file(cfg.name)}
    content: dict[str, bytes] = {}
    for key, path in paths.items():
        try:
            content[key] = _read(path)
        except OSError as e:
            problem(key, f"cannot read {path!r}: {e.strerror or e}")
            continue
        if key in ("tls_key", "secret_file") and os.stat(path).st_mode & 0o077:
            log.warning("resource %s: security.%s %r can be read by other users than its owner (chmod 600)",
                        cfg.name, key, path)

    secret = None
    if "secret_file" in content:
        try:
            secret = auth.parse_secret(content["secret_file"])
        except ValueError as e:
            problem("secret_file", f"{paths['secret_file']!r} {e}")
    if "tls_cert" in content and b"-----BEGIN CERTIFICATE-----" not in content["tls_cert"]:
        problem("tls_cert", f"{paths['tls_cert']!r} holds no PEM certificate")
        content.pop("tls_cert")
    if "tls_key" in content and b"PRIVATE KEY-----" not in content["tls_key"]:
        problem("tls_key", f"{paths['tls_key']!r} holds no PEM private key")
        content.pop("tls_key")
    if "tls_ca" in content and b"-----BEGIN CERTIFICATE-----" not in content["tls_ca"]:
        problem("tls_ca", f"{paths['tls_ca']!r} holds no PEM CA certificate")
        content.pop("tls_ca")

    contexts = []
    if {"tls_cert", "tls_key", "tls_ca"} <= content.keys():
        for side in (ssl.PROTOCOL_TLS_CLIENT, ssl.PROTOCOL_TLS_SERVER):
            try:
                contexts.append(_context(side, paths["tls_cert"], paths["tls_key"], paths["tls_ca"]))
            except _Problem as e:
                problem(e.key, e.message)
                break
    if problems:
        raise SecurityError(problems)
    client, server = contexts
    return Security(**names, secret=secret, client_tls=TLS(client, cfg.peer.name),
                    server_tls=TLS(server, cfg.peer.name))


class _Problem(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 20)


def _no_password() -> bytes:
    raise _Problem("tls_key", "the private key is encrypted; tandemd needs it unencrypted "
                              "(readable by tandemd only)")


def _context(side: int, cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED             # the listener too: mutual TLS
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if side == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = True                   # the server's certificate names the peer node
    else:
        ctx.num_tickets = 0                         # no resumption: every link shows its certificate
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise _Problem("tls_ca", f"cannot load CA certificates from {ca!r}: {_reason(e)}") from None
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise _Problem("tls_key", f"{key!r} is not the private key of the certificate "
                                      f"in {cert!r}") from None
        raise _Problem("tls_cert", f"cannot load the certificate {cert!r} with the key {key!r}: "
                                   f"{_reason(e)}") from None
    return ctx


def _reason(e: ssl.SSLError) -> str:
    return (e.reason or str(e)).lower().replace("_", " ")
