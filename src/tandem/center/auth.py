"""Bearer-token authentication and role checks.

Roles are ordered: read-only (GET), operator (+ runs, recovery points, alert ack), admin
(everything, tokens included). A missing, unknown or revoked token is 401; a valid token with
too small a role is 403.
"""

import contextlib
from dataclasses import dataclass
from typing import Annotated

import psycopg
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg import AsyncConnection

from . import audit, tokens
from .db import connection

RANK = {role: rank for rank, role in enumerate(tokens.ROLES)}
_bearer = HTTPBearer(auto_error=False, description="an API token made by `tandem-center token create`")
_UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Principal:
    token_id: int
    name: str
    role: str


async def authenticate(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                       conn: Annotated[AsyncConnection, Depends(connection)]) -> Principal:
    if creds is None:
        raise HTTPException(401, "missing bearer token", headers=_UNAUTHORIZED)
    token = creds.credentials
    if not token.startswith(tokens.PREFIX) or len(token) > 100:
        raise HTTPException(401, "invalid token", headers=_UNAUTHORIZED)
    row = await (await conn.execute(
        "SELECT id, name, role FROM api_tokens WHERE token_sha256 = %s AND revoked_at IS NULL",
        (tokens.digest(token),))).fetchone()
    if row is None:
        raise HTTPException(401, "invalid or revoked token", headers=_UNAUTHORIZED)
    # At most once a minute; best effort (a read-only node still serves reads).
    with contextlib.suppress(psycopg.errors.ReadOnlySqlTransaction):
        await conn.execute("UPDATE api_tokens SET last_used_at = now() WHERE id = %s AND "
                           "(last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
                           (row["id"],))
    return Principal(row["id"], row["name"], row["role"])


def require(role: str):
    """A dependency giving the caller's Principal if its role is at least `role`. A change
    refused for the role is audited (who tried what); a refused read is not."""
    need = RANK[role]

    async def check(request: Request, who: Annotated[Principal, Depends(authenticate)],
                    conn: Annotated[AsyncConnection, Depends(connection)]) -> Principal:
        if RANK[who.role] < need:
            if request.method not in ("GET", "HEAD"):
                with contextlib.suppress(psycopg.errors.ReadOnlySqlTransaction):   # a standby: 403 anyway
                    await audit.write(conn, who.name, "denied", f"{request.method} {request.url.path}", {},
                                      False, {"status": 403, "needs": role})
            raise HTTPException(403, f"needs the {role} role (token {who.name!r} is {who.role})")
        return who

    return check


reader = require("read-only")
operator = require("operator")
admin = require("admin")
