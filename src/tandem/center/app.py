"""The ASGI application: routers under /api/v1, /health outside it, the request size limit
around everything. Stateless: all state is in PostgreSQL, so any number of instances (the
active and the passive control node) can serve behind the VIP."""

import asyncio
import contextlib
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import tandem

from . import api_admin, api_catalogue, api_ops, dashboard, errors
from .config import Config
from .control_plane import ControlPlaneWatch
from .db import make_pool
from .limits import BodyLimit
from .metrics import Metrics
from .models import Health
from .monitor import Monitor
from .schedules import Scheduler
from .sinks import Notifier

API_PREFIX = "/api/v1"


def create_app(config: Config) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool = make_pool(config.database.conninfo(), config.database.pool_min, config.database.pool_max)
        await pool.open(wait=False)        # serve /health (503) even while the database is away
        app.state.pool = pool
        app.state.metrics = Metrics()
        app.state.monitor_config = config.monitor      # the dashboard's idea of stale status
        tasks = []
        if config.monitor.enabled:        # every instance follows the engines; the primary's writes
            mon = Monitor(pool, config.monitor, Notifier(config.alerts), app.state.metrics)
            tasks.append(asyncio.create_task(mon.run(), name="monitor"))
        if config.schedules.enabled:      # every instance runs it; only the leader acts
            sched = Scheduler(config.database.conninfo(), config.schedules, config.monitor,
                              app.state.metrics.registry)
            tasks.append(asyncio.create_task(sched.run(), name="schedules"))
        if config.control_plane.enabled:  # every instance checks; the primary's writes
            watch = ControlPlaneWatch(pool, config.control_plane, Notifier(config.alerts), app.state.metrics)
            tasks.append(asyncio.create_task(watch.run(), name="control-plane"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await pool.close()

    # No /docs or /redoc: they load Swagger UI from a CDN the control nodes may not reach.
    app = FastAPI(title="tandem-center", version=tandem.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Catalogue, runs, recovery points, alerts and audit of Tandem DR. "
                              "Authenticate with `Authorization: Bearer <token>`.")
    errors.install(app)

    @app.get("/health", response_model=Health, tags=["health"], operation_id="health",
             responses={503: {"model": Health}})
    async def health(request: Request):
        """Unauthenticated: is the database reachable from this instance."""
        try:
            # Short: load balancers and keepalived-style checks give up after a second or two.
            async with asyncio.timeout(2), request.app.state.pool.connection(timeout=1.5) as conn:
                await conn.execute("SELECT 1")
        except Exception:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"], operation_id="metrics", include_in_schema=False)
    async def metrics(request: Request):
        """Unauthenticated, like /health: Prometheus text format (tandem.center.metrics)."""
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for router in (*api_catalogue.ROUTERS, api_ops.router, api_admin.router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(dashboard.router)
    app.add_middleware(BodyLimit, max_bytes=config.api.max_body_bytes)
    return app
