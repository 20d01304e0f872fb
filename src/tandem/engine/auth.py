"""Who is at the other end of a replication link: pure checks, no I/O.

Two layers guard a link (docs/engine.md, "Security"):

- mutual TLS: each node's certificate must carry the node name the other
  side expects (`cert_names`, `names_peer`);
- the resource's shared secret: in the ident stage each node sends a random
  nonce in its HELLO, then an AUTH message with `mac(...)` over both nonces,
  the resource and its own node name; the other side checks it with `verify`.
  A connection that TLS lets through is so also tied to this one resource,
  and a certificate mis-issued by a trusted CA is not enough to get in.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from .wire import ProtocolError

#: Domain separation: these MACs are good for nothing else.
CONTEXT = b"tandem-dr replication link auth v1"
NONCE_BYTES = 32
MAC_BYTES = 32                      # HMAC-SHA256
MIN_SECRET_BYTES = 16
_NONCE = re.compile(f"[0-9a-f]{{{2 * NONCE_BYTES}}}")


class AuthError(ProtocolError):
    """The peer failed authentication (TLS or the shared secret): drop the connection."""


def new_nonce() -> str:
    """A fresh challenge for one connection attempt, as it goes in the HELLO (hex)."""
    return secrets.token_hex(NONCE_BYTES)


def parse_nonce(value: object, ours: str) -> bytes:
    """The peer's nonce from its HELLO; ProtocolError unless it is 64 hex digits and not ours."""
    if not isinstance(value, str) or not _NONCE.fullmatch(value):
        raise ProtocolError(f"malformed HELLO: nonce must be {2 * NONCE_BYTES} lower-case hex digits")
    if hmac.compare_digest(value, ours):
        raise AuthError("authentication failed: the peer sent our own nonce back")
    return bytes.fromhex(value)


def parse_secret(raw: bytes) -> bytes:
    """The key in a secret file: its content without surrounding whitespace (ValueError if short)."""
    secret = raw.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"holds {len(secret)} bytes (without surrounding whitespace); "
                         f"at least {MIN_SECRET_BYTES} are needed")
    return secret


def _fields(*parts: bytes) -> bytes:
    # Length-prefixed, so no two different field lists give the same input.
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def mac(secret: bytes, resource: str, sender: str, receiver_nonce: bytes, sender_nonce: bytes) -> bytes:
    """What `sender` puts in its AUTH: HMAC-SHA256(secret, context, resource, sender, both nonces).

    The receiver's nonce makes it fresh (no replay); the sender's name and
    nonce order make it one-way (no reflecting a node's AUTH back at it).
    """
    msg = _fields(CONTEXT, resource.encode(), sender.encode(), receiver_nonce, sender_nonce)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def verify(secret: bytes, resource: str, sender: str, receiver_nonce: bytes, sender_nonce: bytes,
           got: bytes) -> None:
    """Check the AUTH that `sender` sent us (receiver_nonce is ours); AuthError if it is wrong."""
    if not hmac.compare_digest(mac(secret, resource, sender, receiver_nonce, sender_nonce), bytes(got)):
        raise AuthError(f"authentication failed: {sender!r} does not know the shared secret of "
                        f"resource {resource!r} (do both nodes have the same secret_file content?)")


def cert_names(peercert: dict | None) -> list[str]:
    """The DNS names a certificate (as from SSLSocket.getpeercert()) is for.

    Its subjectAltName DNS entries; only if it has none, its subject CN(s).
    """
    if not peercert:
        return []
    names = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    if names:
        return names
    return [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]


def names_peer(peercert: dict | None, peer: str) -> bool:
    """Whether the certificate is for node `peer`: an exact name (case-insensitive), no wildcards."""
    return any(name.lower() == peer.lower() for name in cert_names(peercert))
