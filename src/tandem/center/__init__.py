"""tandem-center: the control-plane service (catalogue, REST API, audit; issue 7).

Unlike the engine (tandem.engine, stdlib only) the center uses well-kept libraries, installed
with the ``center`` extra: FastAPI/pydantic (API + OpenAPI), uvicorn (server), psycopg 3 and
psycopg_pool (PostgreSQL). Nothing in tandem.engine imports this package.

One module per concern: config, db, migrate, tokens, auth, audit, models, api_* (routers),
limits (request size), app (assembly), cli. Monitoring, alert sinks, schedules and metrics
are to come as their own modules next to these.
"""
