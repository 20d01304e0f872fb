"""CRUD for the catalogue: sites, hypervisors, policies, VMs, volumes, network mappings and
recovery plans. Reading needs the read-only role; every change needs admin and is audited."""

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from . import models as m
from .audit import audited
from .auth import Principal, admin, reader
from .db import connection

Conn = Annotated[AsyncConnection, Depends(connection)]
Admin = Annotated[Principal, Depends(admin)]
Reader = Annotated[Principal, Depends(reader)]
PathId = Annotated[int, m.Field(ge=1, le=m.INT64_MAX)]
Limit = Annotated[int, Query(ge=1, le=1000)]
After = Annotated[int, Query(ge=0, le=m.INT64_MAX, description="return ids greater than this")]


def _values(body: m.Input) -> dict:
    return {k: Jsonb(v) if isinstance(v, dict | list) else v for k, v in body.model_dump(mode="json").items()}


def crud(path: str, table: str, kind: str, model_in: type[m.Input], model_out: type[m.BaseModel],
         check=None) -> APIRouter:
    """A router with list/create/get/replace/delete for one table. `check(conn, body)` may
    refuse a body with a 422 (references the schema cannot express)."""
    router = APIRouter(prefix=path, tags=[kind])
    tbl = sql.Identifier(table)

    async def fetch(conn, item_id):
        row = await (await conn.execute(sql.SQL("SELECT * FROM {} WHERE id = %s").format(tbl),
                                        (item_id,))).fetchone()
        if row is None:
            raise HTTPException(404, f"no {kind} {item_id}")
        return row

    @router.get("", response_model=list[model_out], operation_id=f"list_{table}")
    async def list_items(conn: Conn, who: Reader, limit: Limit = 100, after_id: After = 0):
        q = sql.SQL("SELECT * FROM {} WHERE id > %s ORDER BY id LIMIT %s").format(tbl)
        return await (await conn.execute(q, (after_id, limit))).fetchall()

    @router.post("", response_model=model_out, status_code=201, operation_id=f"create_{kind}")
    async def create(body: model_in, conn: Conn, who: Admin):
        values = _values(body)
        async with audited(conn, who, f"{kind}.create", body.model_dump(mode="json")) as entry:
            if check:
                await check(conn, body)
            q = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING *").format(
                tbl, sql.SQL(", ").join(map(sql.Identifier, values)),
                sql.SQL(", ").join(sql.Placeholder() * len(values)))
            row = await (await conn.execute(q, list(values.values()))).fetchone()
            entry.target, entry.result = f"{kind}/{row['id']}", {"id": row["id"]}
        return row

    @router.get("/{item_id}", response_model=model_out, operation_id=f"get_{kind}")
    async def get(item_id: PathId, conn: Conn, who: Reader):
        return await fetch(conn, item_id)

    @router.put("/{item_id}", response_model=model_out, operation_id=f"replace_{kind}")
    async def replace(item_id: PathId, body: model_in, conn: Conn, who: Admin):
        values = _values(body)
        inputs = body.model_dump(mode="json")
        async with audited(conn, who, f"{kind}.replace", inputs, f"{kind}/{item_id}") as entry:
            if check:
                await check(conn, body)
            q = sql.SQL("UPDATE {} SET {}, updated_at = now() WHERE id = %s RETURNING *").format(
                tbl, sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in values))
            row = await (await conn.execute(q, [*values.values(), item_id])).fetchone()
            if row is None:
                raise HTTPException(404, f"no {kind} {item_id}")
            entry.result = {"id": item_id}
        return row

    @router.delete("/{item_id}", status_code=204, operation_id=f"delete_{kind}")
    async def delete(item_id: PathId, conn: Conn, who: Admin):
        async with audited(conn, who, f"{kind}.delete", {}, f"{kind}/{item_id}") as entry:
            cur = await conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(tbl), (item_id,))
            if cur.rowcount == 0:
                raise HTTPException(404, f"no {kind} {item_id}")
            entry.result = {"deleted": 1}
        return Response(status_code=204)

    return router


async def _plan_vms_exist(conn: AsyncConnection, body: m.RecoveryPlanIn) -> None:
    names = body.document.vm_names()
    cur = await conn.execute("SELECT name FROM protected_vms WHERE name = ANY(%s)", (names,))
    rows = await cur.fetchall()
    missing = sorted(set(names) - {r["name"] for r in rows})
    if missing:
        raise HTTPException(422, f"the plan names VMs that are not protected: {', '.join(missing)}")


ROUTERS = [
    crud("/sites", "sites", "site", m.SiteIn, m.Site),
    crud("/hypervisors", "hypervisors", "hypervisor", m.HypervisorIn, m.Hypervisor),
    crud("/policies", "protection_policies", "policy", m.PolicyIn, m.Policy),
    crud("/vms", "protected_vms", "vm", m.VmIn, m.Vm),
    crud("/volumes", "vm_volumes", "volume", m.VolumeIn, m.Volume),
    crud("/network-mappings", "network_mappings", "network_mapping", m.NetworkMappingIn, m.NetworkMapping),
    crud("/plans", "recovery_plans", "plan", m.RecoveryPlanIn, m.RecoveryPlan, check=_plan_vms_exist),
]
