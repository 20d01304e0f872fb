"""API tokens: 256 random bits, shown once; only their SHA-256 is stored.

A slow password hash (bcrypt, scrypt, argon2) protects low-entropy secrets against guessing
from a stolen hash. These tokens are 256-bit random strings: no guess is feasible whatever the
hash, so a fast hash loses nothing, and it lets a request find its token by an indexed lookup
of the hash instead of spending ~100 ms of CPU per request (itself a denial-of-service lever).
"""

from __future__ import annotations

import hashlib
import re
import secrets

ROLES = ("read-only", "operator", "admin")
PREFIX = "tdc_"          # recognisable in logs and by secret scanners
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")     # the tc_name domain of migration 0001


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create(conn, name: str, role: str, created_by: str) -> tuple[int, str]:
    """Insert a token (in the caller's transaction); returns (id, the clear token)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not NAME.fullmatch(name):
        raise ValueError(f"token name {name!r}: lower-case letters, digits, '_', '.', '-' (at most 63)")
    token = new_token()
    row = conn.execute("INSERT INTO api_tokens (name, role, token_sha256, created_by) "
                       "VALUES (%s, %s, %s, %s) RETURNING id", (name, role, digest(token), created_by))
    return row.fetchone()[0], token
