#!/usr/bin/env python3
"""Benchmark tandemd's NBD write path with fio against nbdkit (standard library only).

Targets (each set up in a temporary directory, all on loopback / unix sockets):

  a  nbdkit      ``nbdkit file`` plugin: the baseline
  b  standalone  tandemd, resource promoted with ``tandemctl primary --force`` while its
                 peer daemon is not running (local disk + bitmap only)
  c  proto-c     tandemd protocol C, peer daemon running on loopback, in sync (Established)
  d  proto-a     tandemd protocol A, likewise
  e  nbd-runner  the bare NBD server, ``python -m tandem.engine.nbd --file``

The replication link runs over mutual TLS with the resource's shared secret, as
deployed (``--link plaintext`` to measure without): certificates from a throw-away
CA per site, made with the openssl CLI.

Workloads (fio, ioengine=nbd): 4 KiB random write at QD1 and QD16, 1 MiB sequential
write at QD16. Every (target, workload) pair is run ``--runs`` times; the targets are
interleaved within each round (and their order rotated from round to round) so that
drift on a noisy machine hits all of them alike. Raw per-run numbers go to
``benchmarks/results/<timestamp>.json``; a Markdown table of medians and the target
checks go to stdout. Exit status: 0 all checks pass, 1 a check failed, 2 error.

See benchmarks/README.md. Run: ``make bench`` or ``.venv/bin/python benchmarks/bench.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tandem.engine import ctl  # noqa: E402  (the repo's own tandemctl client)

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RESOURCE = "vm1"
EXPORT = f"{RESOURCE}/disk0"

WORKLOADS: dict[str, dict] = {
    "4k-randwrite-qd1": {"rw": "randwrite", "bs": 4 * KiB, "iodepth": 1},
    "4k-randwrite-qd16": {"rw": "randwrite", "bs": 4 * KiB, "iodepth": 16},
    "1m-seqwrite-qd16": {"rw": "write", "bs": 1 * MiB, "iodepth": 16},
}

# key -> (letter, description)
TARGETS: dict[str, tuple[str, str]] = {
    "nbdkit": ("a", "nbdkit file plugin (baseline)"),
    "standalone": ("b", "tandemd standalone (peer down, --force)"),
    "proto-c": ("c", "tandemd protocol C, peer in sync"),
    "proto-a": ("d", "tandemd protocol A, peer in sync"),
    "nbd-runner": ("e", "bare NBD runner (tandem.engine.nbd --file)"),
}

QD1, QD16, SEQ = "4k-randwrite-qd1", "4k-randwrite-qd16", "1m-seqwrite-qd16"
# (id, kind, numerator, denominator, workload, limit, gating). kind "ratio": IOPS of
# num/den >= limit; kind "latency": clat of num - den <= limit (µs).
CHECKS = [
    ("b>=1.0*a @4k-qd16", "ratio", "standalone", "nbdkit", QD16, 1.0, True),
    ("b>=1.0*a @1m-qd16", "ratio", "standalone", "nbdkit", SEQ, 1.0, True),
    ("c>=0.6*b @4k-qd16", "ratio", "proto-c", "standalone", QD16, 0.6, True),
    ("c>=0.6*b @1m-qd16", "ratio", "proto-c", "standalone", SEQ, 0.6, True),
    ("c<=b+150us clat mean @4k-qd1", "latency", "proto-c", "standalone", QD1, 150.0, True),
    ("c<=b+150us clat p50 @4k-qd1", "latency-p50", "proto-c", "standalone", QD1, 150.0, False),
]
INFO_RATIOS = [  # informational, no limit
    ("e/a (NBD layer vs nbdkit)", "nbd-runner", "nbdkit"),
    ("b/e (engine vs bare NBD)", "standalone", "nbd-runner"),
    ("d/b (protocol A vs standalone)", "proto-a", "standalone"),
    ("c/d (protocol C vs A)", "proto-c", "proto-a"),
]


class BenchError(Exception):
    """A setup or run failure with a message for the user."""


# --------------------------------------------------------------------------- loopback floor
# Protocol C's added latency has a floor no engine can beat: one round trip between
# two processes over loopback TCP (a 4 KiB write out, a small ack back). On a VM that
# floor alone can exceed the 150 µs budget, so it is measured in the same invocation
# (blocking sockets, no event loop: the cheapest round trip Python can do) and shown
# next to the latency check.
RTT_ECHO = """
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
want = int(sys.argv[1])
while True:
    got = 0
    while got < want:
        chunk = conn.recv(want - got)
        if not chunk:
            sys.exit(0)
        got += len(chunk)
    conn.sendall(b"a" * 20)
"""
RTT_PAYLOAD = 4096 + 32
RTT_ROUNDS = 3000


def loopback_rtt(python: str, rounds: int = RTT_ROUNDS) -> dict:
    """Median/p10/p90 µs of a 4 KiB request / 20-byte reply between two processes."""
    proc = subprocess.Popen([python, "-c", RTT_ECHO, str(RTT_PAYLOAD)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out = b"w" * RTT_PAYLOAD
            samples = []
            for i in range(rounds + rounds // 10):
                t0 = time.perf_counter()
                sock.sendall(out)
                got = 0
                while got < 20:
                    got += len(sock.recv(20 - got))
                if i >= rounds // 10:           # the first tenth warms up
                    samples.append((time.perf_counter() - t0) * 1e6)
    finally:
        proc.kill()
        proc.wait()
    samples.sort()
    return {"median_us": median(samples), "p10_us": samples[len(samples) // 10],
            "p90_us": samples[len(samples) * 9 // 10], "rounds": rounds}


# --------------------------------------------------------------------------- processes

def _load_pdeathsig():
    """A preexec_fn that makes a child get SIGTERM when bench.py dies (even by SIGKILL)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError, ImportError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)          # PR_SET_PDEATHSIG
        if os.getppid() != parent:                  # the parent died before prctl
            os._exit(1)

    return preexec


class Processes:
    """Every process bench.py starts, each in its own session (so Ctrl-C reaches only
    bench.py, which then stops them in order). Stopped by pid / process group only."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._preexec = _load_pdeathsig()

    def spawn(self, name: str, argv: list[str], log: Path, env: dict | None = None,
              cwd: str | None = None) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=self._preexec)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 30.0) -> None:
        """SIGTERM (a tandemd shuts down cleanly), then SIGKILL after `timeout`. Signals go
        to the child's own process group, and only while the child is not yet reaped, so
        its pid (= the group id) cannot have been reused by anything else."""
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            try:
                self.stop(proc)
            except Exception as e:  # noqa: BLE001 - best effort: stop the others anyway
                print(f"bench: could not stop pid {proc.pid}: {e}", file=sys.stderr)
        self.procs.clear()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


NOISY_OTHER_CPU_PCT = 25
FOREIGN_COMMS = {"fio", "nbdkit", "py-spy", "qemu-img", "qemu-nbd", "nbdcopy", "stress", "stress-ng"}


def foreign_load(procs: Processes) -> list[str]:
    """Benchmark-like processes on this machine that bench.py did not start (they make the
    numbers noisy on a small machine): fio, nbdkit, other tandem engines, ..."""
    ours = {p.pid for _n, p in procs.procs} | {os.getpid()}
    parent: dict[int, int] = {}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        if comm in FOREIGN_COMMS or "tandem.engine" in cmd:
            found.append((pid, comm, cmd))
    out = []
    for pid, comm, cmd in found:
        p, seen = pid, 0
        while p > 1 and p not in ours and seen < 64:      # a descendant of ours (fio forks its jobs)?
            p, seen = parent.get(p, 1), seen + 1
        if p not in ours:
            out.append(f"{pid} {cmd[:120] or comm}")
    return out


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU of reaped children (fio and its job processes once fio has exited)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what}: process exited with {proc.returncode}" + _tail(log))
        try:
            last = predicate()
            if last:
                return last
        except (OSError, KeyError, IndexError, ValueError) as e:
            last = e
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what} (last: {last!r})" + _tail(log))
        time.sleep(interval)


def _tail(log: Path | None, n: int = 3000) -> str:
    if log is None or not log.exists():
        return ""
    return f"\n--- {log} (tail) ---\n{log.read_text(errors='replace')[-n:]}"


def unix_socket_ready(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """n distinct free ports (bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_backing(path: Path, size: int, mode: str) -> None:
    """A backing file of `size` bytes whose blocks are allocated (and, for "write",
    written once), so no run measures first-touch allocation."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if mode == "sparse":
            os.ftruncate(fd, size)
        elif mode == "fallocate":
            os.posix_fallocate(fd, 0, size)
        else:
            chunk = bytes(8 * MiB)
            done = 0
            while done < size:
                done += os.write(fd, chunk[:min(len(chunk), size - done)])
            os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- tandemd nodes

class Node:
    """One tandemd with its own config, state, run and data directories (cf. tests/engine/harness.py)."""

    def __init__(self, spawn, root: Path, name: str, python: str, src: Path):
        self.spawn, self.name, self.python = spawn, name, python
        self.root = root / name
        for d in ("etc", "state", "run", "data"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "tandemd.log"
        self.env = {**os.environ, "PYTHONPATH": str(src)}

    @property
    def control(self) -> str:
        return str(self.root / "run" / "tandemd.sock")

    @property
    def nbd_socket(self) -> str:
        return str(self.root / "run" / f"{RESOURCE}.nbd")

    @property
    def disk(self) -> Path:
        return self.root / "data" / "disk0.img"

    def write_config(self, protocol: str, ports: dict[str, int], size: int, tunables: dict,
                     security: dict | None = None) -> None:
        lines = [f'resource = "{RESOURCE}"', f'protocol = "{protocol}"', f'local_node = "{self.name}"']
        for n in ("a", "b"):
            lines += ["[[nodes]]", f'name = "{n}"', f'address = "127.0.0.1:{ports[n]}"']
        lines += ["[[volumes]]", "number = 0", f'path = "{self.disk}"', f"size = {size}",
                  f'export = "{EXPORT}"']
        if tunables:
            lines.append("[tunables]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in tunables.items()]
        if security:
            lines.append("[security]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in security.items()]
        (self.root / "etc" / f"{RESOURCE}.toml").write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.proc = self.spawn(
            f"tandemd-{self.name}",
            [self.python, "-m", "tandem.engine.daemon", "--config-dir", str(self.root / "etc"),
             "--state-dir", str(self.root / "state"), "--run-dir", str(self.root / "run"),
             "--log-level", "INFO"],
            self.log, env=self.env)
        wait_for(lambda: unix_socket_ready(self.control), 30, f"tandemd {self.name} to start",
                 self.proc, self.log)

    def request(self, req: dict, timeout: float = 60) -> dict:
        """One control request (what tandemctl sends), without a Python start-up per poll."""
        return ctl.request(self.control, req, timeout)

    def status(self) -> dict:
        reply = self.request({"cmd": "status", "resource": RESOURCE})
        if not reply.get("ok"):
            raise BenchError(f"tandemd {self.name}: status failed: {reply}")
        return reply["resources"][0]

    def tandemctl(self, *args: str) -> dict:
        argv = [self.python, "-m", "tandem.engine.ctl", "--socket", self.control, *args, "--json"]
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=120)
        if proc.returncode != 0:
            raise BenchError(f"tandemctl {' '.join(args)} on {self.name} failed ({proc.returncode}): "
                             f"{proc.stdout.strip()} {proc.stderr.strip()}" + _tail(self.log))
        return json.loads(proc.stdout)


# --------------------------------------------------------------------------- targets

class Target:
    key = ""

    def __init__(self, ctx: Context, variant: str | None = None, src: Path | None = None):
        self.ctx = ctx
        self.base = type(self).key
        self.letter, self.title = TARGETS[self.base]
        self.variant, self.src = variant, src or REPO / "src"
        if variant is not None:         # the same target, running another engine tree (--compare)
            self.key = f"{self.base}@{variant}"
            self.letter, self.title = f"{self.letter}@{variant}", f"{self.title} [src: {self.src}]"
        self.dir = ctx.workdir / self.key
        self.uri = ""
        self.pids: dict[str, int] = {}          # role -> pid, for CPU accounting and profiling
        self.python_pids: dict[str, int] = {}   # the ones py-spy can profile
        self.servers: list[tuple[subprocess.Popen, Path]] = []
        self.generation = 0                     # 1 + restarts
        self.failures = 0
        self.disabled: str | None = None        # why the target is no longer run

    def start(self) -> None:
        """Set the target up from scratch in a fresh directory."""
        self.generation += 1
        self.dir = self.ctx.workdir / (self.key if self.generation == 1 else f"{self.key}.{self.generation}")
        self.dir.mkdir()
        self.servers = []
        self.setup()

    def setup(self) -> None:
        raise NotImplementedError

    def spawn(self, name: str, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        proc = self.ctx.procs.spawn(name, argv, log, env=env)
        self.servers.append((proc, log))
        return proc

    def dead(self) -> str | None:
        """None while every server process of the target runs, else what happened."""
        for proc, log in self.servers:
            if proc.poll() is not None:
                return f"{log.name} (pid {proc.pid}) exited with status {proc.returncode}" + _tail(log, 1500)
        return None

    def teardown(self) -> None:
        """Stop the target's processes and free its disk space (logs stay)."""
        for proc, _log in reversed(self.servers):
            self.ctx.procs.stop(proc)
        ours = {id(p) for p, _ in self.servers}
        self.ctx.procs.procs = [(n, p) for n, p in self.ctx.procs.procs if id(p) not in ours]
        for img in self.backing_files():
            img.unlink()

    def backing_files(self) -> list[Path]:
        return list(self.dir.rglob("*.img"))

    def drop_cache(self) -> None:
        """Drop the page cache of the target's backing files (clean pages only: sync first).

        Why: on kernels whose ext4 caches files in large folios (6.16 on), a 4 KiB write into a
        folio that a 1 MiB write made costs several times one into a 4 KiB folio (the kernel
        walks and dirties the whole folio): 33 against 4 µs per pwrite on the reference machine.
        Which folios a file has depends on what wrote it last (the warm-up, the previous 1 MiB
        run, a resync) and on free memory, so without this every target, and every instance
        of one, pays its own kernel cost per write."""
        for img in self.backing_files():
            fd = os.open(img, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def before_run(self) -> dict:
        """Make sure the target is ready; returns state to compare after the run."""
        return {}

    def after_run(self, before: dict) -> str | None:
        """None if the run was valid, else the reason it is not."""
        reason = self.dead()
        return None if reason is None else f"server died: {reason.splitlines()[0]}"

    def security(self, node: str) -> dict | None:
        """The [security] table for tandemd node "a" or "b" of this target (None: leave it out)."""
        if not has_security(self.src):
            return None                 # an engine tree from before [security] (--compare): plaintext
        if self.ctx.link == "plaintext":
            return {"plaintext": True}
        return self.ctx.tls(node)

    def link(self) -> str:
        return "plaintext" if not has_security(self.src) or self.ctx.link == "plaintext" else "tls"

    def describe(self) -> dict:
        return {"letter": self.letter, "title": self.title, "uri": self.uri, "pids": self.pids,
                "src": str(self.src), "src_sha256": src_digest(self.src),
                "generations": self.generation, "disabled": self.disabled}


class NbdkitTarget(Target):
    key = "nbdkit"

    def setup(self) -> None:
        img, sock, log = self.dir / "disk.img", str(self.dir / "nbd.sock"), self.dir / "nbdkit.log"
        make_backing(img, self.ctx.size, self.ctx.prealloc)
        proc = self.spawn("nbdkit", [self.ctx.nbdkit, "--foreground", "--exit-with-parent",
                                               "--unix", sock, "file", f"file={img}"], log)
        wait_for(lambda: unix_socket_ready(sock), 30, "nbdkit to listen", proc, log)
        self.uri = f"nbd+unix:///?socket={sock}"
        self.pids = {"nbdkit": proc.pid}


class RunnerTarget(Target):
    key = "nbd-runner"

    def setup(self) -> None:
        img, sock, log = self.dir / "disk.img", str(self.dir / "nbd.sock"), self.dir / "runner.log"
        make_backing(img, self.ctx.size, self.ctx.prealloc)
        env = {**os.environ, "PYTHONPATH": str(self.src)}
        argv = [self.ctx.python, "-m", "tandem.engine.nbd", "--file", str(img), "--socket", sock,
                "--log-level", "WARNING"]
        proc = self.spawn("nbd-runner", argv, log, env=env)
        wait_for(lambda: unix_socket_ready(sock), 30, "the NBD runner to listen", proc, log)
        self.uri = f"nbd+unix:///?socket={sock}"
        self.pids = self.python_pids = {"runner": proc.pid}


class StandaloneTarget(Target):
    key = "standalone"

    def setup(self) -> None:
        node = self.node = Node(self.spawn, self.dir, "a", self.ctx.python, self.src)
        # Node b exists in the configuration only: nothing listens on its port.
        ports = dict(zip(("a", "b"), free_ports(2), strict=True))
        node.write_config("C", ports, self.ctx.size, self.ctx.tunables, self.security("a"))
        make_backing(node.disk, self.ctx.size, self.ctx.prealloc)
        node.start()
        node.tandemctl("primary", RESOURCE, "--force")
        st = node.status()
        if st["role"] != "Primary" or st["connection"] == "Connected":
            raise BenchError(f"standalone: expected an unconnected Primary, got {st}")
        wait_for(lambda: unix_socket_ready(node.nbd_socket), 30, "the standalone NBD socket",
                 node.proc, node.log)
        self.uri = f"nbd+unix:///{EXPORT}?socket={node.nbd_socket}"
        self.pids = self.python_pids = {"primary": node.proc.pid}

    def after_run(self, before: dict) -> str | None:
        reason = super().after_run(before)
        if reason is None and self.node.status()["connection"] == "Connected":
            reason = "the standalone node got connected"
        return reason


class PairTarget(Target):
    protocol = "C"

    def setup(self) -> None:
        a = self.a = Node(self.spawn, self.dir, "a", self.ctx.python, self.src)
        b = self.b = Node(self.spawn, self.dir, "b", self.ctx.python, self.src)
        ports = dict(zip(("a", "b"), free_ports(2), strict=True))
        for node in (a, b):
            node.write_config(self.protocol, ports, self.ctx.size, self.ctx.tunables,
                              self.security(node.name))
            make_backing(node.disk, self.ctx.size, self.ctx.prealloc)
        a.start()
        b.start()
        wait_for(lambda: all(n.status()["connection"] == "Connected" for n in (a, b)), 60,
                 f"{self.key}: the pair to connect", a.proc, a.log)
        a.tandemctl("primary", RESOURCE, "--force")        # initial full sync a -> b
        t0 = time.monotonic()
        self.wait_in_sync(timeout=max(300.0, self.ctx.size / (5 * MiB)))
        self.initial_sync_seconds = round(time.monotonic() - t0, 2)
        wait_for(lambda: unix_socket_ready(a.nbd_socket), 30, f"{self.key}: NBD socket", a.proc, a.log)
        self.uri = f"nbd+unix:///{EXPORT}?socket={a.nbd_socket}"
        self.pids = self.python_pids = {"primary": a.proc.pid, "secondary": b.proc.pid}

    def in_sync(self) -> bool:
        for n in (self.a, self.b):
            st = n.status()
            if st["connection"] != "Connected":
                return False
            for v in st["volumes"]:
                if v["replication"] != "Established" or v["disk"] != "UpToDate" \
                        or v["peer_disk"] != "UpToDate" or v["out_of_sync_bytes"] or v["in_flight_bytes"]:
                    return False
        return self.a.status()["role"] == "Primary"

    def wait_in_sync(self, timeout: float = 120.0) -> None:
        wait_for(self.in_sync, timeout,
                 f"{self.key}: the pair to be in sync (Established, nothing in flight)",
                 self.a.proc, self.a.log, interval=0.2)

    def before_run(self) -> dict:
        self.wait_in_sync()
        st = self.a.status()
        return {"connects": st["stats"]["connects"]}

    def after_run(self, before: dict) -> str | None:
        reason = super().after_run(before)
        if reason:
            return reason
        st = self.a.status()
        if st["connection"] != "Connected" or st["stats"]["connects"] != before["connects"]:
            return "the replication link dropped during the run (writes went to the bitmap)"
        if any(v["replication"] != "Established" for v in st["volumes"]):
            return f"replication left Established: {[v['replication'] for v in st['volumes']]}"
        return None

    def describe(self) -> dict:
        return {**super().describe(), "protocol": self.protocol, "link": self.link(),
                "initial_sync_seconds": getattr(self, "initial_sync_seconds", None)}


class ProtoCTarget(PairTarget):
    key, protocol = "proto-c", "C"


class ProtoATarget(PairTarget):
    key, protocol = "proto-a", "A"


ENGINE_TARGETS = ("standalone", "proto-c", "proto-a", "nbd-runner")
TARGET_CLASSES = {cls.key: cls for cls in (NbdkitTarget, StandaloneTarget, ProtoCTarget, ProtoATarget,
                                            RunnerTarget)}


class Context:
    def __init__(self, args, workdir: Path, procs: Processes):
        self.args, self.workdir, self.procs = args, workdir, procs
        self.size = args.size
        self.prealloc = args.prealloc
        self.python = args.python
        self.nbdkit = args.nbdkit
        # Defaults otherwise (docs/engine-config.md); the initial full sync runs unthrottled.
        self.tunables = {"resync_rate_max": 0}
        self.link = args.link
        self._pki = None

    def tls(self, node: str) -> dict:
        """Node a's or b's [security] paths: a CA per site (the tests' certs.py), one shared secret."""
        if self._pki is None:
            self._pki = _load_certs().PKI(self.workdir / "pki")
            secret = self.workdir / "pki" / "secret.key"
            secret.write_text(os.urandom(32).hex() + "\n")
            secret.chmod(0o600)
        site, peer_site = ("site-a", "site-b") if node == "a" else ("site-b", "site-a")
        pem = self._pki.issue(site, node)
        return {"tls_cert": str(pem.cert), "tls_key": str(pem.key),
                "tls_ca": str(self._pki.ca(peer_site).cert),
                "secret_file": str(self.workdir / "pki" / "secret.key")}


def _load_certs():
    """tests/engine/certs.py (standard library and the openssl CLI), loaded by path."""
    spec = importlib.util.spec_from_file_location("tandem_test_certs", REPO / "tests" / "engine" / "certs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_security(src: Path) -> bool:
    """Whether an engine tree knows the [security] table (older ones refuse it as an unknown key)."""
    return "SecurityConfig" in (src / "tandem" / "engine" / "config.py").read_text()

# --------------------------------------------------------------------------- fio

def check_tools(args, targets: list[str]) -> dict:
    versions = {}
    if shutil.which(args.fio) is None:
        raise BenchError(f"fio not found ({args.fio}); install it: apt-get install -y fio")
    proc = subprocess.run([args.fio, "--enghelp=nbd"], capture_output=True, text=True)
    if proc.returncode != 0 or "uri" not in proc.stdout:
        raise BenchError(
            "this fio has no 'nbd' ioengine (fio --enghelp=nbd failed: "
            f"{(proc.stdout + proc.stderr).strip()!r}). fio must be built with libnbd: Debian's "
            "fio package (>= 3.19) is; or build fio with libnbd-dev installed.")
    versions["fio"] = subprocess.run([args.fio, "--version"], capture_output=True, text=True).stdout.strip()
    if "nbdkit" in targets:
        if shutil.which(args.nbdkit) is None:
            raise BenchError(f"nbdkit not found ({args.nbdkit}); install it (apt-get install -y nbdkit) "
                             "or leave out the baseline with --targets")
        proc = subprocess.run([args.nbdkit, "file", "--version"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"nbdkit has no usable 'file' plugin: {proc.stderr.strip()}")
        versions["nbdkit"] = proc.stdout.strip().replace("\n", "; ")
    proc = subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"cannot run the engine's Python {args.python}: {proc.stderr.strip()}")
    versions["python"] = proc.stdout.strip()
    if args.link == "tls" and set(targets) & {"standalone", "proto-c", "proto-a"}:
        openssl = _load_certs().OPENSSL
        if not os.access(openssl, os.X_OK):
            raise BenchError(f"{openssl} not found: the TLS link needs it to make test certificates "
                             "(apt-get install -y openssl), or use --link plaintext")
        proc = subprocess.run([openssl, "version"], capture_output=True, text=True)
        versions["openssl"] = proc.stdout.strip()
    if args.py_spy and shutil.which(args.py_spy_bin) is None:
        raise BenchError(f"--py-spy: {args.py_spy_bin} not found (pip install py-spy into the venv)")
    return versions


def fio_argv(args, name: str, uri: str, workload: dict, out: Path, runtime: float, ramp: float,
             size: int, time_based: bool = True) -> list[str]:
    argv = [args.fio, f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={workload['rw']}",
            f"--bs={workload['bs']}", f"--iodepth={workload['iodepth']}", "--numjobs=1",
            f"--size={size}", "--norandommap", "--output-format=json", f"--output={out}"]
    if time_based:
        argv += ["--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}"]
    return argv


def run_fio(ctx: Context, argv: list[str], out: Path, timeout: float) -> dict:
    log = out.with_suffix(".log")
    proc = ctx.procs.spawn("fio", argv, log)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        ctx.procs.stop(proc, timeout=5)
        raise BenchError(f"fio did not finish within {timeout:.0f} s: {' '.join(argv)}"
                         + _tail(log)) from None
    finally:
        if proc.poll() is None:
            ctx.procs.stop(proc, timeout=5)
        ctx.procs.procs = [(n, p) for n, p in ctx.procs.procs if p is not proc]
    text = out.read_text(errors="replace") if out.exists() else ""
    start = text.find("{")
    if proc.returncode != 0 or start < 0:
        raise BenchError(f"fio failed ({proc.returncode}): {' '.join(argv)}" + _tail(log) + _tail(out))
    data = json.loads(text[start:])
    job = data["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}: {' '.join(argv)}" + _tail(log))
    return data


def metrics(fio: dict) -> dict:
    job = fio["jobs"][0]
    w = job["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {
        "iops": w["iops"],
        "bw_mib_s": w["bw_bytes"] / MiB,
        "clat_mean_us": w["clat_ns"]["mean"] / 1000,
        "clat_p50_us": pct.get("50.000000", float("nan")) / 1000,
        "clat_p99_us": pct.get("99.000000", float("nan")) / 1000,
        "lat_mean_us": w["lat_ns"]["mean"] / 1000,
        "total_ios": w["total_ios"],
        "runtime_ms": w["runtime"],
        "fio_cpu_pct": job["usr_cpu"] + job["sys_cpu"],
    }


# --------------------------------------------------------------------------- the benchmark

def run_one(ctx: Context, target: Target, wl_name: str, rnd: int, seq: int) -> dict:
    args = ctx.args
    out = ctx.workdir / "fio" / f"r{rnd}-{wl_name}-{target.key}.json"
    before = target.before_run()
    if args.sync_between:
        os.sync()       # start each run with no other run's dirty pages to write back
    if args.drop_cache:
        target.drop_cache()
    if args.pause:
        time.sleep(args.pause)
    argv = fio_argv(args, f"{target.key}-{wl_name}", target.uri, WORKLOADS[wl_name], out,
                    args.runtime, args.ramp, args.fio_size or ctx.size)
    foreign = foreign_load(ctx.procs)
    cpu0 = {r: cpu_seconds(p) for r, p in target.pids.items()}
    load0 = os.getloadavg()[0]
    busy0, kids0 = machine_busy_seconds(), children_cpu_seconds()
    t0 = time.monotonic()
    fio = run_fio(ctx, argv, out, timeout=args.runtime + args.ramp + 300)
    wall = time.monotonic() - t0
    busy, fio_cpu = machine_busy_seconds() - busy0, children_cpu_seconds() - kids0
    cpu = {r: cpu_seconds(p) - cpu0[r] for r, p in target.pids.items()}
    m = metrics(fio)
    invalid = target.after_run(before)
    srv = sum(cpu.values())
    # Everything else the machine did meanwhile: other processes (noise) and kernel threads
    # (page-cache writeback of our own writes is part of it).
    other = max(0.0, busy - srv - fio_cpu)
    rec = {"round": rnd, "seq": seq, "target": target.key, "workload": wl_name, **m,
           "server_cpu_s": {r: round(v, 3) for r, v in cpu.items()},
           "server_cpu_pct": round(100 * srv / wall, 1),
           # approximate: CPU over the whole fio process (ramp included) / IOs over ramp+runtime
           "server_cpu_us_per_io": round(srv * 1e6 / max(1.0, m["iops"] * wall), 1),
           "fio_process_cpu_pct": round(100 * fio_cpu / wall, 1),
           "machine_cpu_pct": round(100 * busy / wall, 1), "other_cpu_pct": round(100 * other / wall, 1),
           "wall_s": round(wall, 2), "loadavg_1m_before": load0, "valid": invalid is None,
           "invalid_reason": invalid, "foreign_processes": foreign}
    flag = "" if invalid is None else f"  INVALID: {invalid}"
    log(f"  round {rnd + 1} {wl_name:18s} {target.letter} {target.key:11s} {m['iops']:10.0f} IOPS "
        f"{m['bw_mib_s']:8.1f} MiB/s  clat {m['clat_mean_us']:8.1f} µs  "
        f"CPU srv {rec['server_cpu_pct']:5.1f}% "
        f"fio {rec['fio_process_cpu_pct']:5.1f}% other {rec['other_cpu_pct']:5.1f}%{flag}")
    if invalid and isinstance(target, PairTarget):
        target.wait_in_sync(timeout=600)
    return rec


def run_guarded(ctx: Context, target: Target, wl_name: str, rnd: int, seq: int) -> dict:
    """run_one, but a failure costs one run, not the whole benchmark: the run is recorded
    as invalid and a target whose server died is set up again (--max-restarts)."""
    try:
        return run_one(ctx, target, wl_name, rnd, seq)
    except BenchError as e:
        died = target.dead()
        reason = f"server died: {died.splitlines()[0]}" if died else f"run failed: {str(e).splitlines()[0]}"
        rec = {"round": rnd, "seq": seq, "target": target.key, "workload": wl_name, "valid": False,
               "invalid_reason": reason, "error": str(e)[-4000:]}
        log(f"  round {rnd + 1} {wl_name:18s} {target.letter} {target.key:11s} FAILED: {reason}\n"
            + (died or str(e))[-2000:])
        target.failures += 1
        if died or target.failures > 3:
            if target.generation > ctx.args.max_restarts:
                target.disabled = f"gave up after {target.generation - 1} restart(s): {reason}"
                log(f"bench: {target.key}: {target.disabled}")
            else:
                log(f"bench: {target.key}: setting it up again")
                target.teardown()
                try:
                    target.start()
                    if ctx.args.warmup:
                        warm_up(ctx, target)
                    target.failures = 0
                except BenchError as e2:
                    target.disabled = f"restart failed: {str(e2).splitlines()[0]}"
                    log(f"bench: {target.key}: {target.disabled}")
        return rec


def warm_up(ctx: Context, target: Target) -> None:
    """One sequential pass over the volume through the target: primes the page cache,
    the allocation of every block and (for tandemd) every activity-log extent."""
    out = ctx.workdir / "fio" / f"warmup-{target.key}.json"
    argv = fio_argv(ctx.args, f"warmup-{target.key}", target.uri, WORKLOADS[SEQ], out, 0, 0,
                    ctx.args.fio_size or ctx.size, time_based=False)
    t0 = time.monotonic()
    fio = run_fio(ctx, argv, out, timeout=1800)
    log(f"  warm-up {target.key}: {metrics(fio)['bw_mib_s']:.0f} MiB/s, {time.monotonic() - t0:.1f} s")
    if isinstance(target, PairTarget):
        target.wait_in_sync(timeout=600)


def profile(ctx: Context, targets: list[Target], workloads: list[str], profdir: Path) -> list[dict]:
    """One extra (unrecorded) run per Python target and workload under py-spy record."""
    args = ctx.args
    profdir.mkdir(parents=True, exist_ok=True)
    found = []
    for target in targets:
        if not target.python_pids or target.disabled:
            continue
        for wl_name in workloads:
            before = target.before_run()
            spies = []
            for role, pid in target.python_pids.items():
                raw = profdir / f"{target.key}-{wl_name}-{role}.txt"
                spy_argv = [args.py_spy_bin, "record", "--pid", str(pid), "--rate", str(args.py_spy_rate),
                            "--duration", str(int(args.runtime)), "--format", "raw", "--output", str(raw),
                            "--nonblocking"] + (["--gil"] if args.py_spy_gil else [])
                spies.append((role, raw, ctx.procs.spawn("py-spy", spy_argv, raw.with_suffix(".log"))))
            out = ctx.workdir / "fio" / f"profile-{wl_name}-{target.key}.json"
            # Profile the steady state: py-spy starts sampling now, fio ramps for 1 s.
            fio = run_fio(ctx, fio_argv(args, f"profile-{target.key}", target.uri, WORKLOADS[wl_name], out,
                                        args.runtime + 1, 1, args.fio_size or ctx.size), out,
                          timeout=args.runtime + 300)
            for role, raw, proc in spies:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    ctx.procs.stop(proc)
                ctx.procs.procs = [(n, p) for n, p in ctx.procs.procs if p is not proc]
                if raw.exists():
                    found.append({"target": target.key, "workload": wl_name, "role": role,
                                  "raw": str(raw), "iops": metrics(fio)["iops"],
                                  "top": top_frames(raw, args.py_spy_top)})
                else:
                    log(f"  py-spy produced nothing for {target.key}/{role}" + _tail(raw.with_suffix(".log")))
            target.after_run(before)
    return found


def top_frames(raw: Path, n: int) -> dict:
    """Self and inclusive sample shares per frame "function (file:line)" from py-spy's raw format."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        # First frame may be the thread name ("process 123:..." / "thread ..."): skip non-frames.
        frames = [f for f in frames if f.endswith(")") and ":" in f]
        if not frames:
            continue
        self_c[_short(frames[-1])] += c
        for f in {_short(f) for f in frames}:
            incl[f] += c
    pct = (lambda v: round(100.0 * v / total, 1)) if total else (lambda v: 0.0)
    return {"samples": total,
            "self": [(f, pct(v)) for f, v in self_c.most_common(n)],
            "inclusive": [(f, pct(v)) for f, v in incl.most_common(n)]}


def _short(frame: str) -> str:
    src = str(REPO / "src") + "/"
    return frame.replace(src, "").replace(sys.prefix + "/", "")


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]      # drop NaN
    return statistics.median(values) if values else float("nan")


def summarize(records: list[dict]) -> dict:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r["valid"]:
            groups[(r["target"], r["workload"])].append(r)
    summary: dict[str, dict] = defaultdict(dict)
    for (t, w), rs in groups.items():
        summary[w][t] = {
            "runs": len(rs),
            **{k: median([r[k] for r in rs]) for k in ("iops", "bw_mib_s", "clat_mean_us", "clat_p50_us",
                                                       "clat_p99_us", "lat_mean_us", "server_cpu_pct",
                                                       "server_cpu_us_per_io", "other_cpu_pct")},
            "iops_min": min(r["iops"] for r in rs), "iops_max": max(r["iops"] for r in rs),
        }
    return summary


def per_round_ratio(records: list[dict], num: str, den: str, workload: str) -> list[float]:
    by = {(r["round"], r["target"]): r for r in records if r["workload"] == workload and r["valid"]}
    rounds = sorted({r["round"] for r in records})
    return [by[(k, num)]["iops"] / by[(k, den)]["iops"] for k in rounds
            if (k, num) in by and (k, den) in by and by[(k, den)]["iops"]]


def evaluate(summary: dict, records: list[dict]) -> list[dict]:
    out = []
    for cid, kind, num, den, wl, limit, gating in CHECKS:
        s_num, s_den = summary.get(wl, {}).get(num), summary.get(wl, {}).get(den)
        row = {"id": cid, "kind": kind, "workload": wl, "num": num, "den": den, "limit": limit,
               "gating": gating, "value": None, "result": "SKIP"}
        if s_num and s_den:
            if kind == "ratio":
                v = s_num["iops"] / s_den["iops"] if s_den["iops"] else float("nan")
                row["value"] = v
                rr = per_round_ratio(records, num, den, wl)
                row["per_round"] = rr
                row["result"] = "PASS" if v >= limit else "FAIL"
            else:
                key = "clat_mean_us" if kind == "latency" else "clat_p50_us"
                v = s_num[key] - s_den[key]
                row.update(value=v, num_us=s_num[key], den_us=s_den[key])
                row["result"] = "PASS" if v <= limit else "FAIL"
        out.append(row)
    return out


def markdown(summary: dict, checks: list[dict], records: list[dict], meta: dict) -> str:
    lines = [f"### tandemd benchmark — {meta['timestamp']}", "",
             f"{meta['runs']} runs per cell, medians; fio {meta['runtime']:g} s time_based after "
             f"{meta['ramp']:g} s ramp; volume {meta['size'] // MiB} MiB; replication link "
             f"{meta.get('link', 'plaintext')}; {meta['host']['cpus']} CPUs; "
             f"commit {meta['git'].get('commit', '?')[:12]}"
             f"{' + uncommitted src changes' if meta['git'].get('dirty') else ''} "
             f"(src sha256 {meta['git'].get('src_sha256', '?')[:12]}).",
             "",
             "| workload | target | IOPS | IOPS min–max | MiB/s | clat mean µs | clat p50 µs | clat p99 µs "
             "| server CPU % | CPU µs/IO | other CPU % | runs |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for wl in meta["workloads"]:
        for t in meta["targets"]:
            s = summary.get(wl, {}).get(t)
            letter = meta["labels"][t][0]
            if not s:
                lines.append(f"| {wl} | ({letter}) {t} | – | – | – | – | – | – | – | – | – | 0 |")
                continue
            lines.append(
                f"| {wl} | ({letter}) {t} | {s['iops']:.0f} | {s['iops_min']:.0f}–{s['iops_max']:.0f} "
                f"| {s['bw_mib_s']:.1f} | {s['clat_mean_us']:.1f} | {s['clat_p50_us']:.1f} "
                f"| {s['clat_p99_us']:.1f} | {s['server_cpu_pct']:.0f} | {s['server_cpu_us_per_io']:.0f} "
                f"| {s['other_cpu_pct']:.0f} | {s['runs']} |")
    lines += ["", "| check | value | per-round | limit | result |", "|---|--:|--:|--:|---|"]
    for c in checks:
        if c["value"] is None:
            lines.append(f"| {c['id']} | – | – | – | SKIP (target not run) |")
            continue
        res = c["result"] if c["gating"] else f"{c['result']} (info)"
        if c["kind"] == "ratio":
            pr = ", ".join(f"{v:.2f}" for v in c.get("per_round", []))
            lines.append(f"| {c['id']} | {c['value']:.3f}× | {pr} | ≥ {c['limit']:.1f}× | **{res}** |")
        else:
            lines.append(f"| {c['id']} | {c['num_us']:.1f} − {c['den_us']:.1f} = {c['value']:+.1f} µs | "
                         f" | ≤ +{c['limit']:.0f} µs | **{res}** |")
    rtt = meta.get("loopback_rtt")
    latency = next((c for c in checks if c["kind"] == "latency" and c["value"] is not None), None)
    if rtt:
        per = ", ".join(f"{r['median_us']:.0f}" for r in rtt["per_round"])
        lines += ["", f"Loopback round-trip floor (two processes, blocking sockets, 4 KiB out, 20 B back): "
                  f"median {rtt['median_us']:.0f} µs (per round: {per})."]
        if latency:
            lines.append(f"Protocol C's latency over standalone minus that floor: "
                         f"{latency['value'] - rtt['median_us']:+.0f} µs (what the engine itself adds).")
    info = []
    for label, num, den in INFO_RATIOS:
        cells = []
        for wl in meta["workloads"]:
            s_num, s_den = summary.get(wl, {}).get(num), summary.get(wl, {}).get(den)
            if s_num and s_den and s_den["iops"]:
                cells.append(f"{wl} {s_num['iops'] / s_den['iops']:.2f}×")
        if cells:
            info.append(f"- {label}: " + ", ".join(cells))
    if info:
        lines += ["", "IOPS ratios (informational):", *info]
    lines += ["", "server CPU % = CPU of the target's server process(es) over the run (200 % = both of 2 "
              "cores); CPU µs/IO ≈ that per completed I/O; other CPU % = the rest of the machine meanwhile "
              "(kernel writeback and any other load: noise), excluding fio."]
    noisy = [r for r in records if r.get("other_cpu_pct", 0) > NOISY_OTHER_CPU_PCT]
    if noisy:
        lines += ["", f"**Noise:** {len(noisy)} of {len(records)} runs saw more than {NOISY_OTHER_CPU_PCT} % "
                  "CPU used outside the benchmark; compare per-round ratios, not absolute numbers."]
    foreign = sorted({f for r in records for f in r.get("foreign_processes", [])})
    if foreign:
        lines += ["", "Benchmark-like processes not started by bench.py were present during runs:",
                  *[f"- `{f}`" for f in foreign[:10]]]
    bad = [r for r in records if not r["valid"]]
    if bad:
        lines += ["", f"**{len(bad)} run(s) invalid and excluded from the medians:**"]
        lines += [f"- round {r['round'] + 1} {r['workload']} {r['target']}: {r['invalid_reason']}"
                  for r in bad]
    variants = [t for t in meta["targets"] if "@" in t]
    if variants:
        lines += ["", "Variants (--compare) against the same target on this tree, IOPS ratio "
                  "(per-round) and clat mean difference:"]
        for t in variants:
            base = t.split("@", 1)[0]
            cells = []
            for wl in meta["workloads"]:
                sv, sb = summary.get(wl, {}).get(t), summary.get(wl, {}).get(base)
                if sv and sb and sb["iops"]:
                    pr = ", ".join(f"{v:.2f}" for v in per_round_ratio(records, t, base, wl))
                    cells.append(f"{wl} {sv['iops'] / sb['iops']:.2f}× ({pr}), "
                                 f"{sv['clat_mean_us'] - sb['clat_mean_us']:+.0f} µs")
            lines.append(f"- {t} vs {base}: " + "; ".join(cells))
    lines += ["", "Targets: " + "; ".join(f"({meta['labels'][t][0]}) {t} = {meta['labels'][t][1]}"
                                        for t in meta["targets"])]
    return "\n".join(lines)


def git_info() -> dict:
    def git(*a):
        p = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None
    return {"commit": git("rev-parse", "HEAD") or "?",
            "dirty": bool(git("status", "--porcelain", "--", "src")),
            "src_sha256": src_digest(REPO / "src")}


def src_digest(src: Path) -> str:
    """sha256 over the engine's Python files (names and contents) under a src/ tree."""
    digest = hashlib.sha256()
    for f in sorted((src / "tandem").rglob("*.py")):
        digest.update(f.relative_to(src).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(t[:-1]) * mult[t[-1]]
    return int(t)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Targets: " + ", ".join(f"{k} ({v[0]})" for k, v in TARGETS.items())
                                + ". Workloads: " + ", ".join(WORKLOADS) + ".")
    p.add_argument("--runs", type=int, default=3,
                   help="runs per (target, workload); medians need >= 3 (default 3)")
    p.add_argument("--runtime", type=float, default=10, help="fio runtime per run, seconds (default 10)")
    p.add_argument("--ramp", type=float, default=2,
                   help="fio ramp_time before measuring, seconds (default 2)")
    p.add_argument("--size", type=parse_size, default=GiB, help="volume / backing file size (default 1G)")
    p.add_argument("--fio-size", type=parse_size, default=0,
                   help="fio --size (region written); default: the volume")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma-separated subset of: " + ",".join(TARGETS))
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of: " + ",".join(WORKLOADS))
    p.add_argument("--prealloc", choices=("write", "fallocate", "sparse"), default="write",
                   help="how backing files are prepared (default write: zeroes written once and fsynced)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the sequential warm-up pass through each target")
    p.add_argument("--pause", type=float, default=1.0, help="idle seconds before each run (default 1)")
    p.add_argument("--no-sync", dest="sync_between", action="store_false",
                   help="do not call sync(2) before each run")
    p.add_argument("--keep-cache", dest="drop_cache", action="store_false",
                   help="do not drop the backing files' page cache before each run (by default every run "
                        "starts with none, so that no target inherits large folios from an earlier run)")
    p.add_argument("--workdir", default="/var/tmp",
                   help="parent of the temporary directory (default /var/tmp; "
                        "keep it on the disk you mean to measure)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, fio JSON)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=SRC",
                   help="also run every selected engine target (b-e) from another engine tree SRC "
                        "(a src/ directory holding tandem/engine, e.g. of a git worktree), as target "
                        "KEY@NAME, interleaved with the others: A/B a change in one invocation. "
                        "Repeatable")
    p.add_argument("--link", choices=("tls", "plaintext"), default="tls",
                   help="the replication link of targets b-d: mutual TLS with the shared secret, as deployed "
                        "(default), or security.plaintext = true to measure without it. A --compare tree "
                        "from before [security] always runs plaintext")
    p.add_argument("--max-restarts", type=int, default=2,
                   help="set a target up again at most this often when its server dies (default 2)")
    p.add_argument("--output", default=None,
                   help="result JSON path (default benchmarks/results/<timestamp>.json)")
    p.add_argument("--python", default=sys.executable, help="interpreter for tandemd and the NBD runner")
    p.add_argument("--fio", default="fio")
    p.add_argument("--nbdkit", default="nbdkit")
    p.add_argument("--py-spy", action="store_true",
                   help="after the measured rounds, profile each Python target once per workload with py-spy "
                        "(not part of the medians)")
    spy_path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    p.add_argument("--py-spy-bin", default=shutil.which("py-spy", path=spy_path) or "py-spy")
    p.add_argument("--py-spy-rate", type=int, default=200)
    p.add_argument("--py-spy-gil", action="store_true",
                   help="sample only the thread holding the GIL (where the interpreter's CPU goes)")
    p.add_argument("--py-spy-top", type=int, default=25)
    p.add_argument("--py-spy-workloads", default=QD16, help=f"workloads to profile (default {QD16})")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.py_spy_workloads = [w.strip() for w in args.py_spy_workloads.split(",") if w.strip()]
    for t in args.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    for w in args.workloads + args.py_spy_workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    compare = []
    for spec in args.compare:
        name, sep, src = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            p.error(f"--compare wants NAME=SRC with a simple NAME, got {spec!r}")
        src_path = Path(src).resolve()
        if not (src_path / "tandem" / "engine" / "daemon.py").is_file():
            p.error(f"--compare {name}: {src_path} holds no tandem/engine/daemon.py")
        compare.append((name, src_path))
    if len({n for n, _ in compare}) != len(compare):
        p.error("--compare names must be unique")
    args.compare = compare
    if args.size < 16 * MiB or args.size % (4 * KiB):
        p.error("--size must be a multiple of 4 KiB and at least 16 MiB")
    if args.fio_size > args.size:
        p.error("--fio-size must fit in the volume")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    # Ctrl-C, kill and a closed terminal all end in the same cleanup. SIGINT is set
    # explicitly: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    procs = Processes()
    workdir = None
    keep_logs = False
    targets: list[Target] = []
    started = datetime.datetime.now(datetime.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    try:
        versions = check_tools(args, args.targets)
        git_start = git_info()      # what the daemons load: they import src/ at start
        if args.runs < 3:
            log(f"bench: note: --runs {args.runs} < 3; the spec asks for medians of at least 3 runs")
        foreign = foreign_load(procs)
        if foreign:
            log("bench: warning: benchmark-like processes not started by bench.py are running; "
                "on a small machine they skew the numbers (each run records them):\n  "
                + "\n  ".join(foreign))
        workdir = Path(tempfile.mkdtemp(prefix="tandem-bench-", dir=args.workdir))
        (workdir / "fio").mkdir()
        ctx = Context(args, workdir, procs)
        log(f"bench: work directory {workdir}")
        for key in args.targets:
            for variant, src in [(None, None)] + (args.compare if key in ENGINE_TARGETS else []):
                target = TARGET_CLASSES[key](ctx, variant, src)
                log(f"bench: setting up ({target.letter}) {target.key}: {target.title}")
                t0 = time.monotonic()
                target.start()
                targets.append(target)
                log(f"  ready in {time.monotonic() - t0:.1f} s: {target.uri}")
        if args.warmup:
            log("bench: warm-up (one sequential pass per target, not recorded)")
            for target in targets:
                warm_up(ctx, target)
        records = []
        rtts = []
        seq = 0
        for rnd in range(args.runs):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            log(f"bench: round {rnd + 1}/{args.runs}, target order {' '.join(t.letter for t in order)}")
            if QD1 in args.workloads:
                rtts.append(loopback_rtt(args.python))
                log(f"  loopback round-trip floor: median {rtts[-1]['median_us']:.0f} µs "
                    f"(p10 {rtts[-1]['p10_us']:.0f}, p90 {rtts[-1]['p90_us']:.0f})")
            for wl in args.workloads:
                for target in order:
                    if target.disabled is None:
                        records.append(run_guarded(ctx, target, wl, rnd, seq))
                        seq += 1
        profiles = []
        if args.py_spy:
            profdir = Path(args.output).with_suffix("") if args.output else RESULTS_DIR / f"{stamp}-profile"
            log(f"bench: profiling with py-spy into {profdir}")
            profiles = profile(ctx, targets, args.py_spy_workloads, profdir)
        git_end = git_info()
        if git_end["src_sha256"] != git_start["src_sha256"]:
            log("bench: warning: src/ changed while the benchmark ran; a target set up again "
                "after the change runs the new code")
        summary = summarize(records)
        checks = evaluate(summary, records)
        meta = {
            "timestamp": stamp, "runs": args.runs, "runtime": args.runtime, "ramp": args.ramp,
            "size": args.size, "fio_size": args.fio_size or args.size, "prealloc": args.prealloc,
            "warmup": args.warmup, "sync_between": args.sync_between, "drop_cache": args.drop_cache,
            "pause": args.pause,
            "targets": [t.key for t in targets], "workloads": args.workloads, "versions": versions,
            "labels": {t.key: (t.letter, t.title) for t in targets},
            "git": git_start, "tunables": ctx.tunables, "link": args.link,
            "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "machine": platform.machine(),
                     "loadavg_end": os.getloadavg(), "workdir": args.workdir},
            "target_details": {t.key: t.describe() for t in targets},
            "src_changed_during_run": git_end["src_sha256"] != git_start["src_sha256"],
            "duration_s": round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1),
            "loopback_rtt": {"median_us": median([r["median_us"] for r in rtts]), "per_round": rtts}
            if rtts else None,
        }
        result = {"meta": meta, "runs": records, "summary": summary, "checks": checks, "profiles": profiles}
        out = Path(args.output) if args.output else RESULTS_DIR / f"{stamp}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        table = markdown(summary, checks, records, meta)
        print(table)
        if profiles:
            print("\n### py-spy (self time, % of samples)\n")
            for pr in profiles:
                print(f"- {pr['target']} {pr['workload']} {pr['role']} ({pr['top']['samples']} samples, "
                      f"{pr['iops']:.0f} IOPS while profiled; raw: {pr['raw']})")
                for frame, share in pr["top"]["self"][:10]:
                    print(f"  - {share:5.1f}%  {frame}")
        log(f"bench: results written to {out}")
        failed = [c for c in checks if c["gating"] and c["result"] == "FAIL"]
        gave_up = [t for t in targets if t.disabled]
        if gave_up:
            log("bench: error: targets dropped part-way: "
                + "; ".join(f"{t.key}: {t.disabled}" for t in gave_up))
            keep_logs = True
            return 2
        return 1 if failed else 0
    except BenchError as e:
        log(f"bench: error: {e}")
        keep_logs = True
        return 2
    except KeyboardInterrupt:
        log("bench: interrupted; stopping everything it started")
        return 130
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)     # do not interrupt the cleanup
        try:
            procs.stop_all()
            if workdir is not None:
                if args.keep:
                    log(f"bench: kept {workdir}")
                elif keep_logs:
                    for img in workdir.rglob("*.img"):
                        img.unlink()
                    log(f"bench: kept the logs in {workdir} (backing files removed)")
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old)


if __name__ == "__main__":
    sys.exit(main())
