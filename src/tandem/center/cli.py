"""tandem-center: serve | migrate | token create.

    tandem-center [-c CONFIG] migrate [--check]
    tandem-center [-c CONFIG] serve [--bind ADDR] [--port N] [--unix-socket PATH]
    tandem-center [-c CONFIG] token create --name NAME --role read-only|operator|admin

The database DSN comes from the config file or the environment (see tandem.center.config),
never from the command line, so that no password shows in `ps`.
"""

import argparse
import json
import logging
import ssl
import sys

import psycopg
from psycopg.types.json import Jsonb

from . import config as cfgmod
from . import migrate as mig
from . import tokens


def _connect(cfg: cfgmod.Config) -> psycopg.Connection:
    return psycopg.connect(cfg.database.conninfo(), application_name="tandem-center", connect_timeout=10)


def cmd_migrate(cfg: cfgmod.Config, args) -> int:
    with _connect(cfg) as conn:
        if args.check:
            todo = mig.pending(conn)
            print(json.dumps({"pending": [f"{m.version:04d}_{m.name}" for m in todo]}))
            return 1 if todo else 0
        done = mig.migrate(conn)
    print(json.dumps({"applied": [f"{m.version:04d}_{m.name}" for m in done], "changed": bool(done)}))
    return 0


def cmd_token_create(cfg: cfgmod.Config, args) -> int:
    with _connect(cfg) as conn, conn.transaction():
        token_id, token = tokens.create(conn, args.name, args.role, created_by="cli")
        conn.execute("INSERT INTO audit_log (actor, action, target, inputs, ok, result) "
                     "VALUES ('cli', 'token.create', %s, %s, true, %s)",
                     (f"token/{token_id}", Jsonb({"name": args.name, "role": args.role}),
                      Jsonb({"id": token_id})))
    print(token)           # the only time it is shown
    return 0


def cmd_serve(cfg: cfgmod.Config, args) -> int:
    import uvicorn

    from .app import create_app

    s = cfg.server
    if args.bind:
        s.bind = args.bind
    if args.port:
        s.port = args.port
    if args.unix_socket:
        s.unix_socket = args.unix_socket
    cfg.validate()
    try:                   # refuse to serve a schema this code does not match
        with _connect(cfg) as conn:
            todo = mig.pending(conn)
        if todo:
            print(f"tandem-center: {len(todo)} migration(s) pending: run `tandem-center migrate`",
                  file=sys.stderr)
            return 2
    except psycopg.OperationalError as e:   # database away (failover): start anyway, /health says 503
        logging.getLogger("tandem.center").warning("database unreachable at start: %s", e)
    tls = {}
    if s.tls_cert:
        tls = {"ssl_certfile": s.tls_cert, "ssl_keyfile": s.tls_key}
        if s.tls_client_ca:
            tls["ssl_ca_certs"] = s.tls_client_ca
            tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED if s.tls_require_client_cert else ssl.CERT_OPTIONAL
    where = {"uds": s.unix_socket} if s.unix_socket else {"host": s.bind, "port": s.port}
    uvicorn.run(create_app(cfg), **where, **tls, proxy_headers=False, server_header=False,
                log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem-center", description=__doc__.split("\n")[0])
    p.add_argument("-c", "--config",
                   help=f"TOML config (default $TANDEM_CENTER_CONFIG or {cfgmod.DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the REST API")
    s.add_argument("--bind")
    s.add_argument("--port", type=int)
    s.add_argument("--unix-socket")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)
    m = sub.add_parser("migrate", help="apply pending schema migrations (idempotent)")
    m.add_argument("--check", action="store_true", help="only list pending migrations (exit 1 if any)")
    m.set_defaults(func=cmd_migrate)
    t = sub.add_parser("token", help="API tokens").add_subparsers(dest="token_command", required=True)
    tc = t.add_parser("create", help="create a token and print it (once)")
    tc.add_argument("--name", required=True)
    tc.add_argument("--role", required=True, choices=tokens.ROLES)
    tc.set_defaults(func=cmd_token_create)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = cfgmod.load(args.config)
        return args.func(cfg, args)
    except (cfgmod.ConfigError, mig.MigrationError, ValueError) as e:
        print(f"tandem-center: {e}", file=sys.stderr)
        return 2
    except psycopg.errors.UniqueViolation as e:
        print(f"tandem-center: already exists: {e.diag.message_detail}", file=sys.stderr)
        return 1
    except psycopg.Error as e:
        print(f"tandem-center: database error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
