"""Database and request errors as JSON 4xx/5xx answers: hostile or malformed input must get a
client error, never a 500 (schemathesis checks this against the OpenAPI spec)."""

import logging

import psycopg
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg import errors as pgerr
from psycopg_pool import PoolTimeout

log = logging.getLogger("tandem.center")


def http_error(exc: BaseException) -> tuple[int, str]:
    """(status, message) for an exception raised while handling a request."""
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail)
    if isinstance(exc, pgerr.UniqueViolation):
        return 409, f"already exists ({_diag(exc)})"
    if isinstance(exc, pgerr.ForeignKeyViolation):
        # On insert/update: the row refers to a missing one; on delete: others refer to it.
        if (exc.diag.message_primary or "").startswith("insert or update"):
            return 422, f"refers to a missing object ({_diag(exc)})"
        return 409, f"still referenced ({_diag(exc)})"
    if isinstance(exc, pgerr.ReadOnlySqlTransaction):
        return 503, "the database is read-only here (not the primary): retry through the VIP"
    if isinstance(exc, psycopg.IntegrityError | psycopg.DataError | pgerr.ProgramLimitExceeded):
        return 422, f"invalid value ({_diag(exc)})"
    if isinstance(exc, psycopg.OperationalError | PoolTimeout):
        return 503, "the database is unavailable"
    return 500, "internal error"


def _diag(exc: psycopg.Error) -> str:
    d = exc.diag
    return d.message_detail or d.constraint_name or d.message_primary or type(exc).__name__


def install(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status, message = http_error(exc)
        if status >= 500 and status != 503:
            log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        headers = getattr(exc, "headers", None)
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # pydantic's errors may echo the input; keep the location and message only.
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    app.add_exception_handler(HTTPException, handle)
    app.add_exception_handler(psycopg.Error, handle)
    app.add_exception_handler(PoolTimeout, handle)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, handle)
