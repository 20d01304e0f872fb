#!/usr/bin/env python3
"""The lab guest's clean shutdown on the ACPI power button, under plain QEMU TCG on this
machine (no lab, no libvirt): docs/lab-guest.md, "Clean shutdown".

For each run: build the image (or take it from the cache), boot it on a fresh raw disk file,
let the app write records, press the power button over QMP (system_powerdown, what
`virsh shutdown` does) and time it until QEMU exits. Then check the disk file: every record
the app reported durable before the button is there, and the last record on the disk is the
one the app reported last, on its way out (console: "tdr-app: stopped, last durable record N").

--control IMAGE_DIR boots another image (e.g. one built before the change) the same way and
records whether it ignores the button (QEMU still running after --timeout seconds).

Figures: tests/output/guest_acpi_shutdown.json. Exit status 1 if a run failed a check.
Run: .venv/bin/python benchmarks/guest_shutdown.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "lab"), str(REPO / "tests" / "lab")]

from guestlib import acpi_shutdown_run  # noqa: E402
from tandem_lab import guest  # noqa: E402
from tandem_lab.paths import Paths  # noqa: E402

OUTPUT = REPO / "tests" / "output" / "guest_acpi_shutdown.json"


def series(image: Path, runs: int, records_before: int, timeout: float) -> list[dict]:
    out = []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="tandem-guest-acpi.") as tmp:
            run = acpi_shutdown_run(image, Path(tmp), records_before, timeout)
        run["console"] = run["console"].splitlines()[-8:]
        brief = {k: v for k, v in run.items() if k not in ("guest_uptime_at", "console")}
        print(f"{image.name} run {i + 1}: {json.dumps(brief)}", file=sys.stderr, flush=True)
        out.append(run)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--records", type=int, default=5, help="records on the disk before the button")
    ap.add_argument("--timeout", type=float, default=60, help="seconds QEMU gets to exit")
    ap.add_argument("--control", type=Path, help="an image directory to compare with")
    ap.add_argument("--output", type=Path, default=OUTPUT)
    args = ap.parse_args()

    info = guest.build(Paths.from_env())
    image = Paths.from_env().cache / "guest" / info["key"]
    figures = {"image": info["key"], "kernel": info["kernel"],
               "qemu": "TCG, 1 vCPU, 128 MiB, machine pc, PVH vmlinux, raw virtio disk, no NIC",
               "load_average_at_start": os.getloadavg(),
               "runs": series(image, args.runs, args.records, args.timeout)}
    done = [r["powerdown_to_exit_s"] for r in figures["runs"] if r["exited"]]
    figures["median_powerdown_to_exit_s"] = statistics.median(done) if done else None
    figures["median_boot_to_app_s"] = statistics.median(r["boot_to_app_s"] for r in figures["runs"])
    if args.control:
        figures["control"] = {"image": str(args.control),
                              "runs": series(args.control, 1, args.records, args.timeout)}
    figures["load_average_at_end"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k not in ("runs", "control")}, indent=2))
    print(f"figures: {args.output}", file=sys.stderr)
    return 0 if all(r["ok"] for r in figures["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
