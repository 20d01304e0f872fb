"""A live tandem-center for the tandem_center_* module tests: the real app served by uvicorn
(`tandem-center serve`) on loopback, on a throwaway PostgreSQL 15, with real tokens.

The cluster, the migrated template database and the server helper are tests/center's
(conftest.py), loaded from there rather than copied; test modules import the fixtures below.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

CENTER_TESTS = Path(__file__).resolve().parents[1] / "center"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


center_fixtures = _load("tandem_center_test_conftest", CENTER_TESTS / "conftest.py")


def pki(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (tests/center's)."""
    _load("tandem_center_test_server", CENTER_TESTS / "test_server.py")._pki(directory)


pg = center_fixtures.pg                    # the session's PostgreSQL cluster
template_db = center_fixtures.template_db  # migrated once, copied per server


@dataclass
class Live:
    url: str
    tokens: dict           # admin, operator, reader, revoked -> clear token
    db: object             # tests/center's Db: connect(), audit_rows()
    server: object

    def count(self, table: str) -> int:
        with self.db.connect() as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def start(pg, template_db, workdir: Path, **server) -> Live:
    db = center_fixtures.make_db(pg, template_db)
    srv = center_fixtures.Server(workdir, db.dsn, **server)
    return Live("", db.tokens, db, srv)


@pytest.fixture(scope="module")
def center(pg, template_db, tmp_path_factory):
    """A served center over plain HTTP on 127.0.0.1, one per test module."""
    live = start(pg, template_db, tmp_path_factory.mktemp("center"))
    live.url = live.server.start().url
    yield live
    live.server.stop()
    pg.drop_db(live.db.name)
