"""Two real tandemd processes on loopback, for engine tests.

Each node gets its own config, state, run and data directories under a
temporary directory; they talk over TCP on 127.0.0.1 like two sites would,
over mutual TLS with the resource's shared secret (certs.py): node "a" has a
certificate from the site-a CA and trusts the site-b CA, node "b" the
reverse.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tandem.faultproxy import ProxyControl

from .certs import pki, write_secret

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all bound at once, so the kernel cannot hand one out twice."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class Node:
    def __init__(self, root: Path, name: str):
        self.name = name
        self.root = root / name
        for d in ("etc", "state", "run", "data"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "tandemd.log"
        self.extra_args: list[str] = []              # more tandemd options (the monitor endpoint)
        self.monitor: tuple[str, int] | None = None  # its address when enabled

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def control(self) -> str:
        return str(self.root / "run" / "tandemd.sock")

    def nbd_socket(self, resource: str) -> str:
        return str(self.root / "run" / f"{resource}.nbd")

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tandem.engine.daemon", "--config-dir", str(self.config_dir),
                 "--state-dir", str(self.root / "state"), "--run-dir", str(self.root / "run"),
                 "--log-level", "INFO", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.control):
            if self.proc.poll() is not None:
                raise RuntimeError(f"tandemd {self.name} exited:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tandemd {self.name} did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if os.path.exists(self.control):
            os.unlink(self.control)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def ctl(self, *args: str, check: bool = True) -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "tandem.engine.ctl", "--socket", self.control, *args, "--json"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
            timeout=60)
        out = json.loads(proc.stdout) if proc.stdout.strip() else {"ok": False, "error": proc.stderr}
        if check and proc.returncode != 0:
            raise AssertionError(f"tandemctl {' '.join(args)} on {self.name}: {out}\n{proc.stderr}")
        return out

    def status(self, resource: str) -> dict:
        return self.ctl("status", resource)["resources"][0]


class Pair:
    """Nodes "a" and "b" with one resource of `volumes` volumes of `size` bytes.

    With proxy=True the link goes through a fault proxy process (tandem.faultproxy):
    "a" dials (its name sorts first), so only a's idea of b's address points at
    the proxy; `pair.link` then sets faults on it.

    `security[node.name]` is that node's [security] table; change it with
    `set_security` (then restart the node or run adjust on it).

    With monitor=True both nodes serve the read-only monitor endpoint (node.monitor is its
    address) with their node certificate, to clients whose certificate chains to the
    "monitor" CA: `pair.monitor_client()` is such a client's certificate and key.
    """

    def __init__(self, root: Path, resource: str = "vm1", size: int = 16 * MiB, volumes: int = 1,
                 protocol: str = "C", tunables: dict | None = None, proxy: bool = False,
                 rp_storage: str | None = None, monitor: bool = False):
        self.resource, self.size, self.volumes, self.protocol = resource, size, volumes, protocol
        self.rp_storage = rp_storage
        self.root = root
        self.a, self.b = Node(root, "a"), Node(root, "b")
        port_a, port_b, port_proxy = free_ports(3)
        self.ports = {"a": port_a, "b": port_b}
        self.proxy_port = port_proxy if proxy else None
        self.proxy: subprocess.Popen | None = None
        self.link: ProxyControl | None = None
        self._b_port = self.ports["b"]
        self.tunables = {"connect_interval": 0.2, "connect_interval_max": 1.0, "resume_after": 0.3,
                         "ping_interval": 0.5, "ping_timeout": 0.4, **(tunables or {})}
        self.pki = pki()
        secret = write_secret(root / "secret.key")
        self.security: dict[str, dict] = {}
        for node, site, peer_site in ((self.a, "site-a", "site-b"), (self.b, "site-b", "site-a")):
            pem = self.pki.issue(site, node.name)
            secret_file = node.config_dir / f"{resource}.key"
            write_secret(secret_file, secret)
            self.security[node.name] = {"tls_cert": str(pem.cert), "tls_key": str(pem.key),
                                        "tls_ca": str(self.pki.ca(peer_site).cert),
                                        "secret_file": str(secret_file), "plaintext": False}
            self.write_config(node)
        if monitor:
            self.enable_monitor()

    def enable_monitor(self, client_ca: Path | None = None, control_clients: tuple[str, ...] = ()) -> None:
        """Start the nodes with the monitor endpoint on a free port each (before `start`);
        control_clients: the CNs given --control-clients (rp-create/rp-delete)."""
        client_ca = client_ca or self.pki.ca("monitor").cert
        for node, site, port in zip((self.a, self.b), ("site-a", "site-b"), free_ports(2), strict=True):
            pem = self.pki.issue(site, node.name)
            node.monitor = ("127.0.0.1", port)
            node.extra_args = ["--monitor-listen", f"127.0.0.1:{port}", "--monitor-cert", str(pem.cert),
                               "--monitor-key", str(pem.key), "--monitor-ca", str(client_ca)]
            if control_clients:
                node.extra_args += ["--control-clients", ",".join(control_clients)]

    def monitor_client(self, name: str = "center1"):
        """A client certificate (Pem) from the monitor CA, and the CA bundle that verifies the nodes."""
        return self.pki.issue("monitor", name), self.pki.bundle("site-a", "site-b")

    def write_config(self, node: Node) -> None:
        lines = [f'resource = "{self.resource}"', f'protocol = "{self.protocol}"',
                 f'local_node = "{node.name}"']
        if self.rp_storage:
            lines.append(f'rp_storage = "{self.rp_storage}"')
        for n in ("a", "b"):
            port = self.proxy_port if (self.proxy_port and node is self.a and n == "b") else self.ports[n]
            lines += ["[[nodes]]", f'name = "{n}"', f'address = "127.0.0.1:{port}"']
        for v in range(self.volumes):
            lines += ["[[volumes]]", f"number = {v}",
                      f'path = "{node.root / "data" / f"disk{v}.img"}"',
                      f"size = {self.size}", f'export = "{self.resource}/disk{v}"']
        lines.append("[tunables]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.tunables.items()]
        lines.append("[security]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.security[node.name].items()]
        (node.config_dir / f"{self.resource}.toml").write_text("\n".join(lines) + "\n")

    def set_security(self, node: Node, **changes) -> None:
        """Change node's [security] keys (Path values welcome) and rewrite its resource file."""
        self.security[node.name].update({k: str(v) if isinstance(v, Path) else v for k, v in changes.items()})
        self.write_config(node)

    def start(self) -> None:
        if self.proxy_port and self.proxy is None:
            self._start_proxy()
        self.a.start()
        self.b.start()

    def start_in_sync(self, timeout: float = 120) -> None:
        """Start both nodes, make "a" Primary (the initial full sync) and wait for in sync."""
        self.start()
        self.wait(self.connected, what="connection")
        self.a.ctl("primary", self.resource, "--force")
        self.wait(self.in_sync, timeout=timeout, what="initial sync")

    def _start_proxy(self) -> None:
        control = str(self.root / "proxy.sock")
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        with open(self.root / "proxy.log", "ab") as log:
            self.proxy = subprocess.Popen(
                [sys.executable, "-m", "tandem.faultproxy", "--listen", f"127.0.0.1:{self.proxy_port}",
                 "--target", f"127.0.0.1:{self._b_port}", "--control", control],
                stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        ready = self.proxy.stdout.readline()          # {"port": N} once it listens
        if not ready:
            raise RuntimeError(f"fault proxy did not start: {(self.root / 'proxy.log').read_text()}")
        self.link = ProxyControl(control)

    def stop(self) -> None:
        for node in (self.a, self.b):
            node.stop()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            self.proxy.wait(10)

    def wait(self, predicate, timeout: float = 60, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
                if last:
                    return
            except (AssertionError, OSError, KeyError, IndexError) as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}; last: {last}\n"
                           f"a: {self.a.log.read_text()[-2000:]}\nb: {self.b.log.read_text()[-2000:]}")

    def connected(self) -> bool:
        return all(n.status(self.resource)["connection"] == "Connected" for n in (self.a, self.b))

    def in_sync(self) -> bool:
        for n in (self.a, self.b):
            st = n.status(self.resource)
            if st["connection"] != "Connected":
                return False
            for v in st["volumes"]:
                if v["replication"] != "Established" or v["disk"] != "UpToDate" \
                        or v["peer_disk"] != "UpToDate" or v["out_of_sync_bytes"]:
                    return False
        return True

    def data_file(self, node: Node, volume: int = 0) -> Path:
        return node.root / "data" / f"disk{volume}.img"
