"""Summarise the control-plane fault figures recorded by tests/lab/test_control_plane_faults.py.

Reads tests/output/control_plane_faults.json (one object per fault run) and prints, per fault
and figure, every run and the median, as a Markdown table:

    TANDEM_FAULT_RUNS=3 .venv/bin/python -m pytest tests/lab/test_control_plane_faults.py
    .venv/bin/python benchmarks/control_plane_figures.py [--since 2026-11-30T00:00:00Z]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "output" / "control_plane_faults.json"
# (fault, figure, label), in the order of the table.
FIGURES = [
    ("crash-active", "failure_to_writes_accepted_s", "failure -> writes accepted via VIP (s)"),
    ("crash-active", "failure_to_vip_moved_s", "failure -> VIP moved (s)"),
    ("crash-active", "acknowledged_lost", "acknowledged rows lost"),
    ("isolate-active", "failure_to_writes_accepted_s", "failure -> writes accepted via VIP (s)"),
    ("isolate-active", "failure_to_vip_moved_s", "failure -> VIP moved (s)"),
    ("isolate-active", "failure_to_old_primary_read_only_s", "failure -> old primary read-only (s)"),
    ("isolate-active", "failure_to_vip_left_old_s", "failure -> VIP left the old primary (s)"),
    ("isolate-active", "old_last_ack_s", "old primary's last acknowledgement (s)"),
    ("isolate-active", "old_acks_after_fault", "acknowledgements by the old primary after the fault"),
    ("isolate-active", "heal_to_rejoined_s", "heal -> old primary rejoined as secondary (s)"),
    ("isolate-active", "acknowledged_lost", "acknowledged rows lost"),
    ("crash-witness", "write_errors", "write errors via VIP"),
    ("crash-witness", "largest_write_gap_s", "largest pause between acknowledgements (s)"),
    ("crash-witness", "failure_to_alert_s", "failure -> webhook alert, first node (s)"),
    ("crash-witness", "acknowledged_lost", "acknowledged rows lost"),
    ("crash-passive", "failure_to_writes_accepted_s", "failure -> writes accepted again via VIP (s)"),
    ("crash-passive", "largest_write_gap_s", "write stall (s)"),
    ("crash-passive", "write_errors", "write errors via VIP"),
    ("crash-passive", "start_to_sync_standby_s", "start -> back as sync standby (s)"),
    ("crash-passive", "acknowledged_lost", "acknowledged rows lost"),
    ("old-primary-returns", "failure_to_writes_accepted_s", "crash -> writes accepted via VIP (s)"),
    ("old-primary-returns", "failure_to_vip_moved_s", "crash -> VIP moved (s)"),
    ("old-primary-returns", "start_to_rejoined_s", "start -> rejoined as secondary (s)"),
    ("old-primary-returns", "write_errors_during_return", "write errors via VIP during the return"),
    ("old-primary-returns", "acknowledged_lost", "acknowledged rows lost (new primary)"),
    ("old-primary-returns", "acknowledged_missing_on_old", "acknowledged rows missing on the rejoined node"),
]


def value(run: dict, figure: str) -> float | None:
    v = run.get(figure)
    if isinstance(v, dict):  # per node: the first one
        v = min((x for x in v.values() if x is not None), default=None)
    return v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=OUTPUT)
    parser.add_argument("--since", default="", help="only runs recorded at or after this UTC time")
    args = parser.parse_args()
    runs = [r for r in json.loads(args.input.read_text()) if r.get("time", "") >= args.since]
    print("| fault | figure | runs | median |")
    print("|---|---|---|---|")
    for fault, figure, label in FIGURES:
        values = [value(r, figure) for r in runs if r["fault"] == fault]
        values = [v for v in values if v is not None]
        if not values:
            continue
        shown = ", ".join(f"{v:g}" for v in values)
        print(f"| {fault} | {label} | {shown} | {statistics.median(values):g} |")


if __name__ == "__main__":
    main()
