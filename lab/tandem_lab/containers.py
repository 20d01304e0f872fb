"""LXC system containers: one per lab host, systemd as PID 1.

All containers live under the lab's own lxcpath, so the lab never touches
containers it did not make and `down` can find everything it made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from pathlib import Path

from . import render
from .paths import Paths
from .system import CommandError, out, run, step
from .topology import Host, Topology


class Containers:
    def __init__(self, paths: Paths):
        self.paths = paths
        self.lxcpath = str(paths.lxcpath)

    def _lxc(self, cmd: str, name: str, *args, **kw):
        return run([f"lxc-{cmd}", "-P", self.lxcpath, "-n", name, *args], **kw)

    def names(self) -> list[str]:
        if not self.paths.lxcpath.is_dir():
            return []
        return sorted(d.name for d in self.paths.lxcpath.iterdir() if (d / "config").exists())

    def state(self, name: str) -> str:
        """RUNNING, STOPPED, FROZEN, ... or ABSENT."""
        if not (self.paths.container(name) / "config").exists():
            return "ABSENT"
        proc = self._lxc("info", name, "-s", "-H", check=False)
        return proc.stdout.strip() or "ABSENT"

    def pid(self, name: str) -> int | None:
        proc = self._lxc("info", name, "-p", "-H", check=False)
        return int(proc.stdout) if proc.stdout.strip().isdigit() else None

    def attach(self, name: str, *argv: str, check=True, timeout=60):
        return self._lxc("attach", name, "--clear-env", "--", *argv,
                         check=check, timeout=timeout)

    # -- create / start -------------------------------------------------

    def ensure(self, topo: Topology, host: Host, rootfs: str, data_dir: str | None,
               authorized_key: str) -> bool:
        """Create the container if missing or out of date; True if (re)created."""
        cdir = self.paths.container(host.name)
        config = render.lxc_config(host, rootfs, str(cdir), data_dir)
        cfile = cdir / "config"
        if cfile.exists() and cfile.read_text() == config:
            return False
        if cfile.exists():
            step(f"{host.name}: configuration changed, recreating the container")
            self.destroy(host.name)
        delta = cdir / "delta"
        _write(delta / "etc" / "hostname", host.name + "\n")
        # systemd would derive the same machine-id for every container from the
        # machine's DMI uuid; journald, D-Bus and DHCP want one per host.
        _write(delta / "etc" / "machine-id", uuid.uuid4().hex + "\n", mode=0o444)
        _write(delta / "etc" / "hosts", render.etc_hosts(topo, host))
        _write(delta / "root" / ".ssh" / "authorized_keys", authorized_key, mode=0o600)
        os.chmod(delta / "root" / ".ssh", 0o700)
        unit = "tandem-lab-routes.service"
        _write(delta / "etc" / "systemd" / "system" / unit, render.routes_unit(topo, host))
        wants = delta / "etc" / "systemd" / "system" / "multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{unit}")
        _write(cfile, config)
        return True

    def start(self, name: str) -> None:
        state = self.state(name)
        if state == "FROZEN":
            self.thaw(name)
        elif state != "RUNNING":
            self._lxc("start", name)

    def freeze(self, name: str) -> None:
        if self.state(name) == "RUNNING":
            self._lxc("freeze", name)

    def thaw(self, name: str) -> None:
        if self.state(name) == "FROZEN":
            self._lxc("unfreeze", name)

    def wait_booted(self, names: list[str], timeout: float = 180) -> dict[str, float]:
        """Wait until systemd in each container reports `running`.

        Returns the seconds each host took. `degraded` (a failed unit) is an
        error: a lab host that boots with a failed unit is not a good test bed.
        """
        t0 = time.monotonic()
        pending, done = set(names), {}
        last: dict[str, str] = {}
        while pending:
            for name in sorted(pending):
                proc = self.attach(name, "systemctl", "is-system-running", check=False, timeout=15)
                status = proc.stdout.strip()
                last[name] = status
                if status == "running":
                    done[name] = time.monotonic() - t0
                    pending.discard(name)
                elif status == "degraded":
                    failed = self.attach(name, "systemctl", "--failed", "--no-legend",
                                         check=False).stdout.strip()
                    raise RuntimeError(f"{name} booted with failed units:\n{failed}")
            if pending and time.monotonic() - t0 > timeout:
                detail = ", ".join(f"{n}={last.get(n) or '?'}" for n in sorted(pending))
                raise TimeoutError(f"hosts did not finish booting in {timeout:.0f}s: {detail}")
            if pending:
                time.sleep(0.5)
        return done

    def memory(self, name: str) -> dict[str, int] | None:
        """Memory charged to a host's cgroup, in bytes: rss, shmem and page cache."""
        for stat, keys in (
            (Path(f"/sys/fs/cgroup/memory/lxc.payload.{name}/memory.stat"),   # cgroup v1
             {"rss": "total_rss", "shmem": "total_shmem", "cache": "total_cache"}),
            (Path(f"/sys/fs/cgroup/lxc.payload.{name}/memory.stat"),          # cgroup v2
             {"rss": "anon", "shmem": "shmem", "cache": "file"}),
        ):
            if stat.exists():
                values = dict(line.split() for line in stat.read_text().splitlines())
                return {k: int(values.get(v, 0)) for k, v in keys.items()}
        return None

    def host_key(self, name: str) -> str:
        return self.attach(name, "cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout.strip()

    # -- stop / destroy --------------------------------------------------

    def kill(self, name: str) -> None:
        """Stop at once, like pulling the power (used for crashes and `down`)."""
        state = self.state(name)
        self.thaw(name)
        if state not in ("STOPPED", "ABSENT"):
            self._lxc("stop", name, "-k", timeout=60)

    def destroy(self, name: str) -> None:
        self.kill(name)
        # lxc-destroy refuses a half-made container; the rmtree removes what is left.
        with contextlib.suppress(CommandError):
            self._lxc("destroy", name, timeout=120)
        shutil.rmtree(self.paths.container(name), ignore_errors=True)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def lxc_monitor_pids(lxcpath: str) -> list[int]:
    """LXC processes that still refer to our lxcpath (should be none after down)."""
    pids = []
    for line in out(["ps", "-eo", "pid=,args="]).splitlines():
        pid, _, args = line.strip().partition(" ")
        if lxcpath in args and "ps -eo" not in args:
            pids.append(int(pid))
    return pids
