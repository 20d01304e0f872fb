"""A throwaway PostgreSQL 15 cluster (Debian's postgresql-15 binaries) for the center tests.

initdb + pg_ctl in a temp directory, as the `postgres` user when run as root (PostgreSQL
refuses to run as root); a Unix socket in that directory, no TCP. One cluster per session,
one migrated template database, and a fresh database copied from it for each test.
"""

import itertools
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:          # this checkout's package, also with a shared venv
    sys.path.insert(0, str(SRC))

from tandem.center import migrate as mig  # noqa: E402
from tandem.center import tokens  # noqa: E402

PG_BIN = Path("/usr/lib/postgresql/15/bin")
_numbers = itertools.count(1)


@dataclass
class Cluster:
    socket_dir: str

    def dsn(self, dbname: str) -> str:
        return f"host={self.socket_dir} port=5432 user=postgres dbname={dbname}"

    def connect(self, dbname: str = "postgres", **kw) -> psycopg.Connection:
        return psycopg.connect(self.dsn(dbname), autocommit=True, **kw)

    def create_db(self, template: str = "template0") -> str:
        name = f"t{os.getpid()}_{next(_numbers)}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop_db(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _scratch_dir() -> str | None:
    """tmpfs when it has room (a throwaway cluster needs no disk), else the default temp dir."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize > (2 << 30) else None


@pytest.fixture(scope="session")
def pg():
    if not (PG_BIN / "initdb").exists():
        pytest.fail("PostgreSQL 15 is not installed: `make engine-deps` installs postgresql-15")
    base = tempfile.mkdtemp(prefix="tandem-center-pg-", dir=_scratch_dir())
    as_user = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = f"{base}/data"

    def run(*cmd):
        r = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120, cwd=base,
                           check=False)
        if r.returncode:
            log = Path(base, "log")
            raise RuntimeError(f"{cmd[0]} failed: {r.stderr}\n{log.read_text() if log.exists() else ''}")

    run(f"{PG_BIN}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale", "C.UTF-8",
        "--no-sync")
    opts = (f"-k {base} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=100")
    run(f"{PG_BIN}/pg_ctl", "-D", data, "-l", f"{base}/log", "-w", "-t", "60", "-o", opts, "start")
    try:
        yield Cluster(base)
    finally:
        run(f"{PG_BIN}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(pg):
    """A database with the catalogue migrated, copied by `db` for each test."""
    name = pg.create_db()
    with pg.connect(name) as conn:
        mig.migrate(conn)
    return name


@dataclass
class Db:
    cluster: Cluster
    name: str
    dsn: str
    tokens: dict          # role or label -> clear token

    def connect(self, **kw) -> psycopg.Connection:
        return self.cluster.connect(self.name, **kw)

    def audit_rows(self) -> list[tuple]:
        with self.connect() as conn:
            return conn.execute("SELECT id, actor, action, target, inputs, ok, result FROM audit_log "
                                "ORDER BY id").fetchall()


def make_db(pg: Cluster, template: str) -> Db:
    """A fresh migrated database with tokens: admin, operator, reader, and a revoked one."""
    name = pg.create_db(template)
    made = {}
    with pg.connect(name) as conn, conn.transaction():
        for label, role in (("admin", "admin"), ("operator", "operator"), ("reader", "read-only"),
                            ("revoked", "admin")):
            token_id, made[label] = tokens.create(conn, f"test-{label}", role, created_by="tests")
        conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE id = %s", (token_id,))
    return Db(pg, name, pg.dsn(name), made)


@pytest.fixture
def db(pg, template_db):
    made = make_db(pg, template_db)
    yield made
    pg.drop_db(made.name)


@pytest.fixture(scope="module")
def module_db(pg, template_db):
    made = make_db(pg, template_db)
    yield made
    pg.drop_db(made.name)


class Server:
    """`tandem-center serve` in a subprocess (the console script's code, real uvicorn)."""

    def __init__(self, workdir: Path, dsn: str, **server):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        dsn_file = workdir / "center.dsn"
        dsn_file.write_text(dsn + "\n")
        dsn_file.chmod(0o600)
        self.port = server.setdefault("port", free_port())
        server.setdefault("bind", "127.0.0.1")
        lines = ["[database]", f'dsn_file = "{dsn_file}"', "pool_max = 4", "[server]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in server.items()]
        lines += ["[api]", "max_body_bytes = 65536"]
        self.config = workdir / "center.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tandem.center.cli", "-c", str(self.config), *args],
                              env=cli_env(), capture_output=True, text=True, timeout=120, check=False, **kw)

    def cli_popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tandem.center.cli", "-c", str(self.config), *args],
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self, scheme: str = "http", **http) -> "Server":
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tandem.center.cli", "-c", str(self.config),
                                          "serve", "--log-level", "warning"], env=cli_env(), stdout=log,
                                         stderr=subprocess.STDOUT)
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        wait_http(self.url + "/health", self.proc, log=self.log, **http)
        return self

    def stop(self) -> None:
        stop_process(self.proc)


def cli_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for var in ("TANDEM_CENTER_CONFIG", "TANDEM_CENTER_DSN", "TANDEM_CENTER_DSN_FILE"):
        env.pop(var, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None) -> None:
    """Stop a server process: SIGTERM, then SIGKILL after 20 s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60, **kw) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tandem-center exited with {proc.returncode}: {log.read_text()}")
        try:
            httpx.get(url, timeout=5, **kw)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"tandem-center did not answer on {url} within {timeout}s: {log.read_text()}")


@pytest.fixture(scope="session")
def server_class():
    """The Server helper (test modules here are not a package, so they get it as a fixture)."""
    return Server
