"""The VM playbooks on the lab, with real tandemd on hv-a1 (site A) and hv-b1 (site B).

No VM yet (issue 8): a writer inside the production host writes through the resource's
NBD export (the Unix socket QEMU would use), one FUA write at a time, and streams an
acknowledgement journal out of the host line by line. The journal lives in this test
process, so it survives a crash of the host. Every check compares what a site holds with
that journal: each block must hold the last acknowledged write to it (or the one write
that was in flight, never acknowledged), and nothing else.

The tests run in file order and share the two resources:
  vol01  protect -> planned failover -> failback -> crash hv-a1 -> unplanned failover -> failback
  vol02  protect -> partition, writes at A -> interrupted resync -> crash hv-a1 -> unplanned failover
         must roll back to the last consistent recovery point (exactly the pre-partition data).

Each playbook's wall time, and that of a second, no-change run, goes to
tests/output/playbook_timings.json.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from dr_helpers import Run, ctl_status, forget_resources, playbook, remove_engine, start_crashed

REPO = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).resolve().parent / "guest"
NBDCLIENT = REPO / "tests" / "engine" / "nbdclient.py"
TIMINGS = REPO / "tests" / "output" / "playbook_timings.json"
PROD, DR = "hv-a1", "hv-b1"
BLOCKS = 4096                    # 16 MiB volumes, 4 KiB blocks
GROUP = {"tandem_protection_group": {"name": "labtest", "vms": [
    {"name": "vol01", "production": PROD, "dr": DR, "port": 7801, "disks": [{"size": "16MiB"}]},
    {"name": "vol02", "production": PROD, "dr": DR, "port": 7802, "disks": [{"size": "16MiB"}],
     "tunables": {"rp_max_age": 0}},
    {"name": "vol03", "production": PROD, "dr": DR, "port": 7803, "disks": [{"size": "64MiB"}]},
]}}
HOT = 1024                       # vol03's writes stay in its first 4 MiB: one activity-log extent
# vol02's resync, slowed down so that a crash lands in the middle of it.
SLOW_RESYNC = {"resync_rate_max": "128KiB", "resync_rate_min": "64KiB"}


class Journal:
    """The acknowledgement stream of one writer run inside a lab host."""

    def __init__(self, lab, host: str, vm: str, start_seq: int, count: int = 0, seed: int = 1,
                 blocks: int = BLOCKS):
        self.acked: dict[int, int] = {}
        self.inflight: tuple[int, int] | None = None
        self.last_seq = start_seq - 1
        self.proc = subprocess.Popen(
            ["lxc-attach", "-P", str(lab.state / "lxc"), "-n", host, "--clear-env", "--",
             "python3", "/root/nbd_journal.py", "write", f"/run/tandem/{vm}.nbd", f"{vm}/disk0",
             "--blocks", str(blocks), "--start-seq", str(start_seq), "--count", str(count),
             "--seed", str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            kind, block, seq = line.split()
            block, seq = int(block), int(seq)
            if kind == "S":
                self.inflight = (block, seq)
            else:
                self.acked[block] = seq
                self.inflight = None
                self.last_seq = seq

    def wait_acks(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.last_seq < n and time.monotonic() < deadline:
            assert self.proc.poll() is None or self.reader.is_alive(), self.proc.stderr.read()
            time.sleep(0.05)
        assert self.last_seq >= n, f"writer stalled at seq {self.last_seq}"

    def finish(self, timeout: float = 300) -> None:
        """Wait for a writer with a count to end (or for the stream of a crashed host to end)."""
        self.proc.wait(timeout)
        self.reader.join(30)


def merged(*journals: Journal) -> tuple[dict[int, int], set[tuple[int, int]]]:
    """The expected content after several journals in order, and the writes that may or may
    not have landed (in flight when a host died)."""
    expect, maybe = {}, set()
    for j in journals:
        expect.update(j.acked)
        if j.inflight:
            maybe.add(j.inflight)
    return expect, maybe


def dump(lab, host: str, vm: str) -> tuple[dict[int, int], int]:
    """What the site holds: block -> seq of the journal write in it, and the count of
    non-zero blocks that carry no journal write."""
    proc = lab.attach(host, "python3", "/root/nbd_journal.py", "dump", f"/run/tandem/{vm}.nbd",
                      f"{vm}/disk0", "--blocks", str(BLOCKS), timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    return {int(b): s for b, s in data["blocks"].items()}, data["foreign"]


def check_data(lab, host: str, vm: str, expect: dict[int, int], maybe: set[tuple[int, int]] = frozenset()):
    held, foreign = dump(lab, host, vm)
    assert foreign == 0, f"{vm} on {host}: {foreign} blocks hold data nobody wrote"
    wrong = [(b, s, held.get(b)) for b, s in expect.items()
             if held.get(b) != s and (b, held.get(b)) not in maybe]
    extra = [(b, s) for b, s in held.items() if b not in expect and (b, s) not in maybe]
    assert not wrong, (f"{vm} on {host}: {len(wrong)} of {len(expect)} acknowledged blocks are wrong "
                       f"(block, acknowledged seq, held seq), first: {wrong[:5]}")
    assert not extra, f"{vm} on {host}: blocks hold writes that were never sent: {extra[:5]}"


class DRRuns:
    def __init__(self, lab, tmp: Path):
        self.lab, self.tmp = lab, tmp
        self.group = tmp / "protection_group.yml"
        self.write_group()
        self.timings: dict[str, float] = {}
        self.vol01: dict[int, int] = {}      # vol01's expected content between tests

    def write_group(self, vol02_tunables: dict | None = None) -> None:
        group = json.loads(json.dumps(GROUP))
        if vol02_tunables:
            group["tandem_protection_group"]["vms"][1]["tunables"].update(vol02_tunables)
        self.group.write_text(yaml.safe_dump(group))

    def playbook(self, name: str, *extra: str, check: bool = False, record: str | None = None,
                 expect_ok: bool = True, timeout: float = 900) -> Run:
        run = playbook(self.lab, name, *extra, group=self.group, check=check, expect_ok=expect_ok,
                       timeout=timeout)
        if record:
            self.timings[record] = round(run.seconds, 1)
            TIMINGS.parent.mkdir(parents=True, exist_ok=True)
            TIMINGS.write_text(json.dumps(self.timings, indent=2) + "\n")
        return run

    def record_moved(self, what: str, run: Run) -> str:
        """The bytes the reverse resync moved, as failback.yml's summary reports them."""
        m = re.search(r"reverse resync moved ([0-9.]+ \w+) since the DR tandemd started, "
                      r"([0-9.]+ \w+) during this run", run.output)
        assert m, run.output[-3000:]
        self.timings[f"{what}: bytes moved"] = f"{m.group(1)} since DR start, {m.group(2)} in the run"
        TIMINGS.write_text(json.dumps(self.timings, indent=2) + "\n")
        return m.group(1)

    def no_change(self, name: str, *extra: str, record: str | None = None) -> Run:
        run = self.playbook(name, *extra, record=record)
        assert run.changed == 0, f"second {name} run changed something: {run.recap}\n{run.output[-4000:]}"
        return run


@pytest.fixture(scope="module")
def dr(lab, tmp_path_factory):
    lab.labctl("heal")
    start_crashed(lab)
    d = DRRuns(lab, tmp_path_factory.mktemp("dr"))
    run = d.playbook("engine", record="engine (converge)")
    d.playbook("engine", record="engine (second run)")
    assert run.proc.returncode == 0
    for host in (PROD, DR):
        forget_resources(lab, host, "vol0[123]")
        lab.put(host, "/root/nbdclient.py", NBDCLIENT.read_text())
        lab.put(host, "/root/nbd_journal.py", (GUEST / "nbd_journal.py").read_text())
    yield d
    lab.labctl("heal")
    start_crashed(lab)
    remove_engine(lab)
    for host in (PROD, DR):
        lab.attach(host, "rm", "-rf", "/srv/tandem/vol01", "/srv/tandem/vol02", "/srv/tandem/vol03",
                   "/root/nbd_journal.py",
                   "/root/nbdclient.py")


def test_protect_in_check_mode_creates_nothing(dr):
    run = dr.playbook("protect", check=True, record="protect --check (before protect)")
    assert run.changed > 0, "check mode must report the resources it would create"
    for host in (PROD, DR):
        assert dr.lab.attach(host, "test", "-e", "/etc/tandem/resources.d/vol01.toml").returncode == 1


def test_protect_then_nothing_to_do(dr):
    dr.playbook("protect", record="protect")
    for vm in ("vol01", "vol02", "vol03"):
        prod, rep = ctl_status(dr.lab, PROD, vm), ctl_status(dr.lab, DR, vm)
        assert (prod["role"], rep["role"]) == ("Primary", "Secondary")
        assert all(v["replication"] == "Established" and v["out_of_sync_bytes"] == 0
                   for v in prod["volumes"])
    dr.no_change("protect", record="protect (second run)")
    run = dr.playbook("protect", check=True, record="protect --check (protected)")
    assert run.changed == 0, run.output[-4000:]
    run = dr.no_change("status", record="status")
    rows = [line for line in run.output.splitlines() if re.search(r'"vol0[123] ', line)]
    assert len(rows) == 3 and all("Primary/UpToDate" in r and "Secondary/UpToDate" in r and "in-sync" in r
                                  for r in rows), run.output[-3000:]


def test_planned_failover_and_failback_lose_nothing(dr):
    lab = dr.lab
    before = Journal(lab, PROD, "vol01", start_seq=1, count=400)
    before.finish()
    assert before.last_seq == 400, before.proc.stderr.read()
    run = dr.playbook("failover", "-e", "mode=planned", "-e", "vms=vol01", check=True,
                      record="failover planned --check")
    assert run.changed > 0, "check mode must report the demote and the promote it would do"
    assert ctl_status(lab, PROD, "vol01")["role"] == "Primary", "check mode changed a role"
    assert ctl_status(lab, DR, "vol01")["role"] == "Secondary", "check mode changed a role"
    dr.playbook("failover", "-e", "mode=planned", "-e", "vms=vol01", record="failover planned")
    assert ctl_status(lab, DR, "vol01")["role"] == "Primary"
    assert ctl_status(lab, PROD, "vol01")["role"] == "Secondary"
    check_data(lab, DR, "vol01", *merged(before))
    dr.no_change("failover", "-e", "mode=planned", "-e", "vms=vol01", record="failover planned (second run)")

    at_dr = Journal(lab, DR, "vol01", start_seq=1001, count=400, seed=2)
    at_dr.finish()
    assert at_dr.last_seq == 1400, at_dr.proc.stderr.read()
    run = dr.playbook("failback", "-e", "vms=vol01", check=True, record="failback --check")
    assert run.changed > 0 and ctl_status(lab, DR, "vol01")["role"] == "Primary", run.output[-3000:]
    run = dr.playbook("failback", "-e", "vms=vol01", record="failback (after planned failover)")
    dr.record_moved("failback (after planned failover)", run)
    assert ctl_status(lab, PROD, "vol01")["role"] == "Primary"
    dr.vol01 = merged(before, at_dr)[0]
    check_data(lab, PROD, "vol01", dr.vol01)
    dr.no_change("failback", "-e", "vms=vol01", record="failback (second run)")


def test_unplanned_failover_after_crash_keeps_every_acknowledged_write(dr):
    lab = dr.lab
    writer = Journal(lab, PROD, "vol01", start_seq=2001, seed=3)
    writer.wait_acks(2300)
    lab.labctl("crash", PROD)
    writer.finish(60)
    assert writer.last_seq >= 2300
    # The lost site is not contacted: the run must succeed with hv-a1 down.
    dr.playbook("failover", "-e", "mode=unplanned", "-e", "vms=vol01", record="failover unplanned")
    assert ctl_status(lab, DR, "vol01")["role"] == "Primary"
    # status.yml goes on without the lost site and shows it.
    run = dr.playbook("status", "-e", "vms=vol01", record="status (site A down)")
    assert any("vol01" in line and "unreachable" in line for line in run.output.splitlines()), run.output
    # Everything acknowledged before the crash, in this test and the earlier ones, is at DR.
    history, maybe = merged(writer)
    history = {**dr.vol01, **history}
    check_data(lab, DR, "vol01", history, maybe)
    dr.no_change("failover", "-e", "mode=unplanned", "-e", "vms=vol01",
                 record="failover unplanned (second run)")

    landed = maybe_landed(lab, DR, "vol01", maybe)
    at_dr = Journal(lab, DR, "vol01", start_seq=3001, count=300, seed=4)
    at_dr.finish()
    lab.labctl("start", PROD)
    run = dr.playbook("failback", "-e", "vms=vol01", record="failback (after unplanned failover)")
    dr.record_moved("failback (after unplanned failover)", run)
    # The production site ends with exactly what the DR site held: the crash's in-flight write
    # only if it had reached DR, whatever hv-a1 had written locally before it died.
    check_data(lab, PROD, "vol01", {**history, **landed, **at_dr.acked})


def maybe_landed(lab, host: str, vm: str, maybe) -> dict[int, int]:
    """Which of the in-flight writes the site actually holds."""
    if not maybe:
        return {}
    held = dump(lab, host, vm)[0]
    return {b: s for b, s in maybe if held.get(b) == s}


def test_failover_during_interrupted_resync_uses_the_last_consistent_rp(dr):
    lab = dr.lab
    start_crashed(lab)
    # hv-a1 came back from the crash test as Secondary for vol02 too (a restarted node
    # always does, as with DRBD); vol02 never failed over, so it is promoted again there.
    assert lab.wait_for(lambda: ctl_status(lab, PROD, "vol02")["connection"] == "Connected", timeout=60)
    proc = lab.attach(PROD, "tandemctl", "primary", "vol02")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = Journal(lab, PROD, "vol02", start_seq=1, count=300, seed=5)
    before.finish()
    assert before.last_seq == 300, before.proc.stderr.read()
    # Slow the resync down (an online tunable change through protect.yml), then cut the link.
    dr.write_group(SLOW_RESYNC)
    dr.playbook("protect", "-e", "vms=vol02", record="protect (tunable change)")
    lab.labctl("partition", "a", "b")
    assert lab.wait_for(lambda: ctl_status(lab, PROD, "vol02")["connection"] != "Connected", timeout=30)
    during = Journal(lab, PROD, "vol02", start_seq=1001, count=1500, seed=6)
    during.finish()
    assert during.last_seq == 2500, during.proc.stderr.read()
    lab.labctl("heal")

    def resyncing():
        vols = ctl_status(lab, DR, "vol02")["volumes"]
        return any(v["replication"] == "SyncTarget" and v.get("sync_percent", 0) > 0 for v in vols)
    assert lab.wait_for(resyncing, timeout=60), ctl_status(lab, DR, "vol02")
    assert ctl_status(lab, DR, "vol02")["volumes"][0]["disk"] == "Inconsistent"
    lab.labctl("crash", PROD)

    dr.playbook("failover", "-e", "mode=unplanned", "-e", "vms=vol02",
                record="failover unplanned (Inconsistent)")
    st = ctl_status(lab, DR, "vol02")
    assert st["role"] == "Primary" and st["volumes"][0]["disk"] == "UpToDate", st
    # Exactly the data from before the partition: none of the half-resynced writes.
    check_data(lab, DR, "vol02", *merged(before))


def test_failback_after_a_crash_resyncs_only_the_changes_and_the_hot_area(dr):
    """vol03 (64 MiB): writes confined to its first 4 MiB, crash hv-a1, unplanned failover,
    writes at DR in the same 4 MiB, failback. The reverse resync is the activity log's hot
    area plus what DR changed: a few MiB, not the 64 MiB a full copy would move."""
    lab = dr.lab
    start_crashed(lab)
    assert lab.wait_for(lambda: ctl_status(lab, PROD, "vol03")["connection"] == "Connected", timeout=60)
    if ctl_status(lab, PROD, "vol03")["role"] != "Primary":
        proc = lab.attach(PROD, "tandemctl", "primary", "vol03")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    writer = Journal(lab, PROD, "vol03", start_seq=1, seed=7, blocks=HOT)
    writer.wait_acks(300)
    lab.labctl("crash", PROD)
    writer.finish(60)
    dr.playbook("failover", "-e", "mode=unplanned", "-e", "vms=vol03")
    landed = maybe_landed(lab, DR, "vol03", merged(writer)[1])
    at_dr = Journal(lab, DR, "vol03", start_seq=1001, count=300, seed=8, blocks=HOT)
    at_dr.finish()
    lab.labctl("start", PROD)
    run = dr.playbook("failback", "-e", "vms=vol03", record="failback (vol03, writes in one AL extent)")
    moved = dr.record_moved("failback (vol03, writes in one AL extent)", run)
    number, unit = moved.split()
    moved_bytes = float(number) * {"Bytes": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[unit]
    assert 0 < moved_bytes <= 8 << 20, f"reverse resync moved {moved}: not incremental"
    check_data(lab, PROD, "vol03", {**merged(writer)[0], **landed, **at_dr.acked})
