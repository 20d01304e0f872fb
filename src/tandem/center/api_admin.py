"""Admin only: the audit log and API tokens."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from . import models as m
from . import tokens
from .api_catalogue import Admin, Conn, Limit, PathId
from .audit import audited

router = APIRouter()
_TOKEN_COLUMNS = "id, name, role, created_by, created_at, last_used_at, revoked_at"


@router.get("/audit", response_model=list[m.AuditEntry], tags=["audit"], operation_id="list_audit")
async def list_audit(conn: Conn, who: Admin, limit: Limit = 100,
                     before_id: Annotated[int | None, Query(ge=1, le=m.INT64_MAX)] = None):
    """Newest first; page with before_id."""
    return await (await conn.execute(
        "SELECT * FROM audit_log WHERE id < coalesce(%s, 9223372036854775807) ORDER BY id DESC LIMIT %s",
        (before_id, limit))).fetchall()


@router.get("/tokens", response_model=list[m.Token], tags=["tokens"], operation_id="list_tokens")
async def list_tokens(conn: Conn, who: Admin):
    return await (await conn.execute(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens ORDER BY id")).fetchall()


@router.post("/tokens", response_model=m.NewToken, status_code=201, tags=["tokens"],
             operation_id="create_token")
async def create_token(body: m.TokenIn, conn: Conn, who: Admin):
    """The token is in this answer only."""
    async with audited(conn, who, "token.create", body.model_dump(mode="json")) as entry:
        token = tokens.new_token()
        row = await (await conn.execute(
            f"INSERT INTO api_tokens (name, role, token_sha256, created_by) VALUES (%s, %s, %s, %s) "
            f"RETURNING {_TOKEN_COLUMNS}", (body.name, body.role, tokens.digest(token), who.name))).fetchone()
        entry.target, entry.result = f"token/{row['id']}", {"id": row["id"]}
    return {**row, "token": token}


@router.post("/tokens/{token_id}/revoke", response_model=m.Token, tags=["tokens"],
             operation_id="revoke_token")
async def revoke_token(token_id: PathId, conn: Conn, who: Admin):
    async with audited(conn, who, "token.revoke", {}, f"token/{token_id}") as entry:
        if token_id == who.token_id:
            raise HTTPException(409, "a token cannot revoke itself (use another admin token)")
        row = await (await conn.execute(
            "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s "
            f"RETURNING {_TOKEN_COLUMNS}",
            (token_id,))).fetchone()
        if row is None:
            raise HTTPException(404, f"no token {token_id}")
        entry.result = {"revoked": True}
    return row
