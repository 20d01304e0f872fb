"""The PostgreSQL connection pool and the per-request connection.

Connections are in autocommit mode: a read is one statement, and every change runs in an
explicit `conn.transaction()` together with its audit row (tandem.center.audit). Each
connection is checked when it is handed out, so those left pointing at an old primary after
a control-plane failover are replaced instead of failing a request.
"""

from collections.abc import AsyncIterator

from fastapi import Request
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool


def make_pool(conninfo: str, min_size: int, max_size: int) -> AsyncConnectionPool:
    return AsyncConnectionPool(conninfo, min_size=min_size, max_size=max_size, open=False, timeout=10,
                               kwargs={"autocommit": True, "row_factory": dict_row,
                                       "application_name": "tandem-center"},
                               check=AsyncConnectionPool.check_connection)


async def connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """FastAPI dependency: a pooled connection for the duration of the request."""
    async with request.app.state.pool.connection() as conn:
        yield conn
