"""Real pieces of the control plane on this machine, for the test_cp_* tests: PostgreSQL
clusters (a primary and a streaming standby), a pg_auto_failover monitor (pg_autoctl), network
namespaces with a dummy interface for the VIP, and `tandem-center serve` in a namespace on a Unix
socket. Everything is torn down by its context manager, also when a test fails.

PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.center.conftest import stop_process  # by package path, not the bare `conftest`

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_AUTOCTL = Path("/usr/bin/pg_autoctl")      # pg-auto-failover-cli
SRC = Path(__file__).resolve().parents[2] / "src"


def as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def scratch(prefix: str) -> Path:
    """A temp directory the postgres user owns (tmpfs when there is room)."""
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def run(*cmd, env: dict | None = None, timeout: float = 120, check: bool = True) -> str:
    r = subprocess.run([*as_postgres(), *map(str, cmd)], capture_output=True, text=True, timeout=timeout,
                       env=env, check=False)
    if check and r.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr}{r.stdout}")
    return r.stdout


class PgNode:
    """One PostgreSQL 15 cluster on a Unix socket in its own directory (no TCP)."""

    def __init__(self, base: Path, name: str):
        self.dir, self.name = base / name, name
        self.data, self.sock = self.dir / "data", self.dir
        self.log = self.dir / "log"

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host={self.sock} port=5432 user={user} dbname={dbname}"

    def init(self, **settings) -> PgNode:
        run("mkdir", "-p", self.dir)
        run(PG_BIN / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale", "C.UTF-8", "--no-sync")
        self.configure(listen_addresses="''", unix_socket_directories=f"'{self.sock}'", fsync="off",
                       full_page_writes="off", **settings)
        return self

    def configure(self, **settings) -> None:
        lines = "".join(f"{k} = {v}\n" for k, v in settings.items())
        run("sh", "-c", f"printf '%s' \"$1\" >> {self.data}/postgresql.conf", "sh", lines)

    def start(self) -> None:
        run(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        run(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def sql(self, query: str, dbname: str = "postgres") -> str:
        return run(PG_BIN / "psql", "-h", self.sock, "-p", "5432", "-U", "postgres", "-d", dbname, "-XAtqc",
                   query).strip()


class AutoctlMonitor:
    """A pg_auto_failover monitor (`pg_autoctl create monitor`, then `pg_autoctl run` in its own
    process group, as on the witness). kill() is a crash of the whole witness: SIGKILL to
    pg_autoctl and its PostgreSQL."""

    def __init__(self, base: Path, port: int):
        self.dir, self.port = base, port
        self.data = base / "monitor"
        self.env = {"HOME": str(base), "XDG_CONFIG_HOME": f"{base}/config", "XDG_DATA_HOME": f"{base}/share",
                    "XDG_RUNTIME_DIR": f"{base}/run", "PG_REGRESS_SOCK_DIR": str(base),
                    "PATH": f"{PG_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"}
        self.proc: subprocess.Popen | None = None

    def dsn(self, user: str = "postgres", dbname: str = "pg_auto_failover") -> str:
        return f"host={self.dir} port={self.port} user={user} dbname={dbname}"

    def create(self) -> AutoctlMonitor:
        run(PG_AUTOCTL, "create", "monitor", "--pgdata", self.data, "--pgport", self.port,
            "--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl", env=self.env, timeout=180)
        return self

    def start(self) -> None:
        with (self.dir / "autoctl.log").open("a") as log:
            self.proc = subprocess.Popen([*as_postgres(), "env", *(f"{k}={v}" for k, v in self.env.items()),
                                          str(PG_AUTOCTL), "run", "--pgdata", str(self.data)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if subprocess.run([*as_postgres(), str(PG_BIN / "pg_isready"), "-q", "-h", str(self.dir),
                               "-p", str(self.port)], check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"the monitor did not start: {(self.dir / 'autoctl.log').read_text()}")

    def data_node(self, name: str, port: int) -> AutoctlNode:
        """A data node registered with this monitor (`pg_autoctl create postgres --run`)."""
        return AutoctlNode(self, name, port).start()

    def sql(self, query: str) -> str:
        return run(PG_BIN / "psql", "-h", self.dir, "-p", self.port, "-U", "postgres",
                   "-d", "pg_auto_failover", "-XAtqc", query).strip()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        # the postmaster is pg_autoctl's grandchild, in the same group: wait until it is gone
        pid_file = self.data / "postmaster.pid"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 0)
            except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
                return
            time.sleep(0.1)


class AutoctlNode:
    """A pg_auto_failover data node (keeper + PostgreSQL) in the monitor's directory, in its
    own process group; stop() ends both."""

    def __init__(self, monitor: AutoctlMonitor, name: str, port: int):
        self.monitor, self.name, self.port = monitor, name, port
        self.dir = monitor.dir / name
        self.proc: subprocess.Popen | None = None

    def start(self) -> AutoctlNode:
        run("mkdir", "-p", self.dir / "sock")
        sock = str(self.dir / "sock")          # its PostgreSQL's socket, and where the keeper looks
        env = {**self.monitor.env, "PG_REGRESS_SOCK_DIR": sock, "PGHOST": sock}
        uri = f"postgres://autoctl_node@127.0.0.1:{self.monitor.port}/pg_auto_failover?sslmode=disable"
        with (self.dir.parent / f"{self.name}.log").open("a") as log:
            self.proc = subprocess.Popen(
                [*as_postgres(), "env", *(f"{k}={v}" for k, v in env.items()), str(PG_AUTOCTL), "create",
                 "postgres", "--pgdata", str(self.dir / "data"), "--pgport", str(self.port),
                 "--hostname", "127.0.0.1", "--name", self.name, "--auth", "trust", "--no-ssl",
                 "--monitor", uri, "--dbname", "tandem", "--run"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)      # pg_autoctl stops its PostgreSQL
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        run(PG_BIN / "pg_ctl", "-D", self.dir / "data", "-m", "immediate", "-w", "stop", check=False)


@contextlib.contextmanager
def netns(name: str):
    """A network namespace with lo up; deleted (with its addresses) on exit. The VIP goes on its
    lo: this kernel may have no dummy (or veth) driver, and an address on any interface is what
    keepalived's move amounts to for the center."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def set_address(ns: str, address: str, present: bool, check: bool = True) -> None:
    subprocess.run(["ip", "-n", ns, "addr", "add" if present else "del", f"{address}/32", "dev", "lo"],
                   check=check, capture_output=not check)


class Center:
    """`tandem-center serve` (optionally in a network namespace) with a config built from
    sections {name: {key: value}}; reached over a Unix socket (any namespace can)."""

    def __init__(self, workdir: Path, dsn: str, sections: dict, netns: str | None = None):
        self.workdir, self.netns = workdir, netns
        workdir.mkdir(parents=True, exist_ok=True)
        dsn_file = workdir / "center.dsn"
        dsn_file.write_text(dsn + "\n")
        dsn_file.chmod(0o600)
        self.socket = workdir / "center.sock"
        sections = {"database": {"dsn_file": str(dsn_file), "pool_max": 4},
                    "server": {"unix_socket": str(self.socket)}, **sections}
        self.config = workdir / "center.toml"
        self.config.write_text("".join(
            f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in s.items())
            for name, s in sections.items()))
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://center",
                                 timeout=10)

    def start(self) -> Center:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        for var in ("TANDEM_CENTER_CONFIG", "TANDEM_CENTER_DSN", "TANDEM_CENTER_DSN_FILE"):
            env.pop(var, None)
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "tandem.center.cli",
                                          "-c", str(self.config), "serve", "--log-level", "info"],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tandem-center exited ({self.proc.returncode}): {self.log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                self.http.get("/health")
                return self
            time.sleep(0.1)
        raise RuntimeError(f"tandem-center did not answer: {self.log.read_text()}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.http.close()


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
