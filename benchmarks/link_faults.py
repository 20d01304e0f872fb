#!/usr/bin/env python3
"""Figures for issue 4: what a link cut costs the VM, and how the pair comes back.

Two real tandemd processes on loopback, protocol C, default tunables
(sync_timeout 1 s, resume_after 5 s) unless given, with the fault proxy
(tandem.faultproxy) on the link. A QD1 NBD writer (4-64 KiB random writes)
runs throughout. Each run:

  1. writes for --before seconds in sync;
  2. cuts the link (--fault: blackhole = silent peer, down, reset) for --cut seconds;
  3. restores it and waits until the pair is in sync again;
  4. writes on for --after seconds.

Reported per run, then as medians over --runs:
  - max and p99.9 client write latency over the whole run (target: <= sync_timeout + 50 ms);
  - the longest write that started during the cut;
  - seconds from link restore to in-sync (includes the resume_after probe);
  - bytes resynced (engine counter) against bytes dirtied (distinct 4 KiB
    blocks the writer had acknowledged between the cut and the resync start,
    from the writer's own journal).

    .venv/bin/python benchmarks/link_faults.py --runs 5 --json results/link_faults.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from tests.engine.harness import Pair  # noqa: E402
from tests.engine.workload import BLOCK, Writer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def event_times(node, event: str) -> list[float]:
    """Wall-clock times of an engine event, from the daemon's structured log."""
    out = []
    for line in node.log.read_text().splitlines():
        if f" {event} resource=" in line:
            stamp = line[:23]                                  # 2026-11-29 18:41:27,369
            out.append(time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:]) / 1000)
    return out


def one_run(root: Path, args, seed: int) -> dict:
    # Engine defaults for everything else (reconnect backoff included): these are
    # the figures an operator gets. The harness's test-speed defaults are overridden.
    tunables = {"sync_timeout": args.sync_timeout, "resume_after": args.resume_after,
                "connect_interval": 1.0, "connect_interval_max": 10.0, "ping_interval": 1.0,
                "ping_timeout": 0.5}
    pair = Pair(root, size=args.size << 20, proxy=True, tunables=tunables)
    try:
        pair.start()
        pair.wait(pair.connected, what="connection")
        pair.a.ctl("primary", pair.resource, "--force")
        pair.wait(pair.in_sync, timeout=300, what="initial sync")
        anchor = time.time() - time.monotonic()                # monotonic -> wall clock
        writer = Writer(pair.a.nbd_socket(pair.resource), f"{pair.resource}/disk0", pair.size,
                        random.Random(seed))
        writer.start()
        time.sleep(args.before)
        resynced_before = pair.a.status(pair.resource)["stats"]["resync_bytes"]
        t_cut = time.monotonic()
        if args.fault == "reset":
            pair.link.reset()
        else:
            pair.link.set(**{args.fault: True})
        time.sleep(args.cut)
        t_restore = time.monotonic()
        if args.fault != "reset":
            pair.link.clear()
        pair.wait(pair.in_sync, timeout=600, what="return to sync")
        t_in_sync = time.monotonic()
        time.sleep(args.after)
        writer.finish()
        if writer.error:
            raise RuntimeError(f"a client write failed: {writer.error}")
        st = pair.a.status(pair.resource)
        resynced = st["stats"]["resync_bytes"] - resynced_before
        starts = [t - anchor for t in event_times(pair.a, "sync-started") if t - anchor > t_cut]
        resync_start = starts[0] if starts else t_in_sync
        dirtied = set()
        for (t0, _), (first, nblocks) in zip(writer.latencies, writer.extents, strict=True):
            if t_cut <= t0 <= resync_start:
                dirtied.update(range(first, first + nblocks))
        lat = [s for _, s in writer.latencies]
        cut_lat = [s for t0, s in writer.latencies if t_cut <= t0 <= t_restore]
        return {
            "writes": len(lat),
            "max_ms": round(max(lat) * 1e3, 1),
            "p999_ms": round(percentile(lat, 0.999) * 1e3, 1),
            "max_during_cut_ms": round(max(cut_lat) * 1e3, 1) if cut_lat else None,
            "writes_during_cut": len(cut_lat),
            "restore_to_in_sync_s": round(t_in_sync - t_restore, 2),
            "resynced_bytes": resynced,
            "dirtied_bytes": len(dirtied) * BLOCK,
            "resync_ratio": round(resynced / (len(dirtied) * BLOCK), 3) if dirtied else None,
        }
    finally:
        pair.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--fault", choices=("blackhole", "down", "reset"), default="blackhole")
    p.add_argument("--size", type=int, default=256, help="volume size in MiB")
    p.add_argument("--sync-timeout", type=float, default=1.0)
    p.add_argument("--resume-after", type=float, default=5.0)
    p.add_argument("--before", type=float, default=3.0)
    p.add_argument("--cut", type=float, default=5.0)
    p.add_argument("--after", type=float, default=2.0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="tandem-faults-") as tmp:
            r = one_run(Path(tmp), args, seed=i)
        print(json.dumps({"run": i + 1, **r}), flush=True)
        runs.append(r)
    keys = [k for k in runs[0] if all(isinstance(r[k], (int, float)) for r in runs)]
    medians = {k: statistics.median(r[k] for r in runs) for k in keys}
    summary = {"fault": args.fault, "sync_timeout_s": args.sync_timeout, "resume_after_s": args.resume_after,
               "runs": len(runs), "median": medians,
               "worst_max_ms": max(r["max_ms"] for r in runs),
               "target_max_ms": round(args.sync_timeout * 1e3 + 50, 1)}
    summary["target_met"] = summary["worst_max_ms"] <= summary["target_max_ms"]
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
