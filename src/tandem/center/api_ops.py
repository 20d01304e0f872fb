"""Operations: runs (failover, failback, drill) with per-step results, recovery points as the
engines report them, and alerts. Reading needs read-only; changes need operator (audited)."""

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from psycopg import sql
from psycopg.types.json import Jsonb

from . import models as m
from .api_catalogue import After, Conn, Limit, PathId, Reader
from .audit import audited
from .auth import Principal, operator

Operator = Annotated[Principal, Depends(operator)]
router = APIRouter()


# -- runs --------------------------------------------------------------------------------------

async def _run(conn, run_id: int, lock: bool = False) -> dict:
    q = "SELECT * FROM runs WHERE id = %s" + (" FOR UPDATE" if lock else "")
    run = await (await conn.execute(q, (run_id,))).fetchone()
    if run is None:
        raise HTTPException(404, f"no run {run_id}")
    return run


async def _with_steps(conn, run: dict) -> dict:
    run["steps"] = await (await conn.execute("SELECT * FROM run_steps WHERE run_id = %s ORDER BY seq",
                                             (run["id"],))).fetchall()
    return run


@router.get("/runs", response_model=list[m.Run], tags=["runs"], operation_id="list_runs")
async def list_runs(conn: Conn, who: Reader, limit: Limit = 100, after_id: After = 0,
                    key: Annotated[m.Key | None, Query(description="the run with this key")] = None,
                    series: Annotated[m.Key | None, Query(description="runs of this series")] = None,
                    newest_first: bool = False):
    """Runs by id (without their steps); `?series=S&newest_first=true&limit=1` is the newest
    run of a series, the one a plan runner resumes."""
    q = sql.SQL("SELECT * FROM runs WHERE id > %s {} {} ORDER BY id {} LIMIT %s").format(
        sql.SQL("AND key = %s" if key else ""), sql.SQL("AND series = %s" if series else ""),
        sql.SQL("DESC" if newest_first else "ASC"))
    params = [after_id, *(v for v in (key, series) if v), limit]
    return await (await conn.execute(q, params)).fetchall()


_CREATED = {200: {"model": m.Run, "description": "a run with this key exists already (no change)"}}


@router.post("/runs", response_model=m.Run, status_code=201, tags=["runs"], operation_id="create_run",
             responses=_CREATED)
async def create_run(body: m.RunIn, conn: Conn, who: Operator, response: Response):
    """With a `key`, creating the same run again answers 200 and the stored run (with its
    steps); the same key with another kind, plan, series or parameters is a 409."""
    async with audited(conn, who, "run.create", body.model_dump(mode="json")) as entry:
        run = await (await conn.execute(
            "INSERT INTO runs (kind, plan_id, parameters, started_by, key, series) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING RETURNING *",
            (body.kind, body.plan_id, Jsonb(body.parameters), who.name, body.key, body.series))).fetchone()
        if run is None:                    # only a known key conflicts
            run = await (await conn.execute("SELECT * FROM runs WHERE key = %s", (body.key,))).fetchone()
            if _run_fields(run) != _run_fields(body.model_dump()):
                raise HTTPException(409, f"run {body.key} was created with other values")
            response.status_code = 200
        entry.target = f"run/{run['id']}"
        entry.result = {"id": run["id"], "new": response.status_code != 200}
    return await _with_steps(conn, run)


def _run_fields(run: dict) -> tuple:
    return run["kind"], run["plan_id"], run["series"], run["parameters"]


@router.get("/runs/{run_id}", response_model=m.Run, tags=["runs"], operation_id="get_run")
async def get_run(run_id: PathId, conn: Conn, who: Reader):
    return await _with_steps(conn, await _run(conn, run_id))


@router.post("/runs/{run_id}/steps", response_model=m.Step, status_code=201, tags=["runs"],
             operation_id="append_run_step",
             responses={200: {"model": m.Step, "description": "a step with this key exists already"}})
async def append_step(run_id: PathId, body: m.StepIn, conn: Conn, who: Operator, response: Response):
    """Steps are numbered 1..n in the order they arrive, on a running run only. With a `key`,
    appending the same step again answers 200 and the stored step (also once the run is
    finished); the same key with another name, status, times or detail is a 409."""
    async with audited(conn, who, "run.step", body.model_dump(mode="json"), f"run/{run_id}") as entry:
        run = await _run(conn, run_id, lock=True)          # serialises appenders: seq has no gaps
        if body.key:
            step = await (await conn.execute("SELECT * FROM run_steps WHERE run_id = %s AND key = %s",
                                             (run_id, body.key))).fetchone()
            if step is not None:
                if _step_fields(step) != _step_fields(body.model_dump()):
                    raise HTTPException(409, f"step {body.key} of run {run_id} has other values")
                response.status_code = 200
                entry.result = {"seq": step["seq"], "new": False}
                return step
        if run["state"] != "running":
            raise HTTPException(409, f"run {run_id} is {run['state']}: no more steps")
        step = await (await conn.execute(
            """INSERT INTO run_steps (run_id, seq, key, name, status, started_at, finished_at, detail)
               SELECT %s, coalesce(max(seq), 0) + 1, %s, %s, %s, %s, %s, %s FROM run_steps WHERE run_id = %s
               RETURNING *""",
            (run_id, body.key, body.name, body.status, body.started_at, body.finished_at, Jsonb(body.detail),
             run_id))
        ).fetchone()
        entry.result = {"seq": step["seq"], "new": True}
    return step


def _step_fields(step: dict) -> tuple:
    return step["name"], step["status"], step["started_at"], step["finished_at"], step["detail"]


@router.post("/runs/{run_id}/finish", response_model=m.Run, tags=["runs"], operation_id="finish_run")
async def finish_run(run_id: PathId, body: m.RunFinish, conn: Conn, who: Operator):
    """Once: finishing a finished run again with the same state and result answers it
    unchanged; with another state or result, 409."""
    async with audited(conn, who, "run.finish", body.model_dump(mode="json"), f"run/{run_id}") as entry:
        run = await _run(conn, run_id, lock=True)
        if run["state"] != "running":
            if (run["state"], run["result"]) != (body.state, body.result):
                raise HTTPException(409, f"run {run_id} is already {run['state']}")
            entry.result = {"state": body.state, "new": False}
        else:
            run = await (await conn.execute(
                "UPDATE runs SET state = %s, result = %s, finished_at = now() WHERE id = %s RETURNING *",
                (body.state, Jsonb(body.result), run_id))).fetchone()
            entry.result = {"state": body.state, "new": True}
    return await _with_steps(conn, run)


# -- recovery points ---------------------------------------------------------------------------

@router.post("/recovery-points", response_model=m.RecoveryPoint, status_code=201, tags=["recovery points"],
             operation_id="report_recovery_point",
             responses={200: {"model": m.RecoveryPoint, "description": "already reported (no change)"}})
async def report_rp(body: m.RecoveryPointIn, conn: Conn, who: Operator, response: Response):
    """An engine (or the playbook that made it) reports a recovery point. Reporting the same
    (vm, site, name) again is a no-op answered with 200 and the stored point."""
    async with audited(conn, who, "recovery_point.report", body.model_dump(mode="json")) as entry:
        row = await (await conn.execute(
            """INSERT INTO recovery_points (vm_id, site_id, name, taken_at, consistency, reported_by)
               VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (vm_id, site_id, name) DO NOTHING RETURNING *""",
            (body.vm_id, body.site_id, body.name, body.taken_at, body.consistency, who.name))).fetchone()
        if row is None:
            row = await (await conn.execute(
                "SELECT * FROM recovery_points WHERE vm_id = %s AND site_id = %s AND name = %s",
                (body.vm_id, body.site_id, body.name))).fetchone()
            if (row["taken_at"], row["consistency"]) != (body.taken_at, body.consistency):
                raise HTTPException(409, f"recovery point {body.name} was reported with other values")
            response.status_code = 200
        entry.target = f"recovery_point/{row['id']}"
        entry.result = {"id": row["id"], "new": response.status_code != 200}
    return row


@router.get("/recovery-points", response_model=list[m.RecoveryPoint], tags=["recovery points"],
            operation_id="list_recovery_points")
async def list_rps(conn: Conn, who: Reader, vm_id: Annotated[int, Query(ge=1, le=m.INT64_MAX)],
                   limit: Limit = 100):
    """A VM's recovery points, newest first."""
    return await (await conn.execute(
        "SELECT * FROM recovery_points WHERE vm_id = %s ORDER BY taken_at DESC, id DESC LIMIT %s",
        (vm_id, limit))).fetchall()


# -- alerts ------------------------------------------------------------------------------------

@router.get("/alerts", response_model=list[m.Alert], tags=["alerts"], operation_id="list_alerts")
async def list_alerts(conn: Conn, who: Reader, limit: Limit = 100, after_id: After = 0,
                      state: Literal["open", "raised", "acknowledged", "cleared", "all"] = "open"):
    """Alerts by id; `open` (default) = raised or acknowledged."""
    states = {"open": ["raised", "acknowledged"],
              "all": ["raised", "acknowledged", "cleared"]}.get(state, [state])
    return await (await conn.execute(
        "SELECT * FROM alerts WHERE id > %s AND state = ANY(%s) ORDER BY id LIMIT %s",
        (after_id, states, limit))).fetchall()


@router.post("/alerts/{alert_id}/ack", response_model=m.Alert, tags=["alerts"], operation_id="ack_alert")
async def ack_alert(alert_id: PathId, conn: Conn, who: Operator):
    async with audited(conn, who, "alert.ack", {}, f"alert/{alert_id}") as entry:
        cur = await conn.execute("SELECT state FROM alerts WHERE id = %s FOR UPDATE", (alert_id,))
        row = await cur.fetchone()
        if row is None:
            raise HTTPException(404, f"no alert {alert_id}")
        if row["state"] != "raised":
            raise HTTPException(409, f"alert {alert_id} is {row['state']}")
        alert = await (await conn.execute(
            "UPDATE alerts SET state = 'acknowledged', acked_at = now(), acked_by = %s "
            "WHERE id = %s RETURNING *",
            (who.name, alert_id))).fetchone()
        entry.result = {"state": "acknowledged"}
    return alert
