#!/usr/bin/env python3
"""Recovery points: what create() and a first write to a chunk cost (standard library only).

Sets up, in a temporary directory under --workdir (default /var/tmp: keep it on the
disk you mean to measure, not a tmpfs):

  1. a sparse live volume file of --size-gib (default 10 GiB);
  2. an RP "base", then --blocks (default 100k) 4 KiB writes at scattered offsets
     through the write path's hooks (needs_preserve, preserve, pwrite), so base's
     log and in-memory index hold tens of thousands of chunks;
  3. five more RPs, timing each create() (the figure that must stay << 1 s);
  4. --touches (default 2000) first-touch 4 KiB writes (each chunk's first write
     after the newest RP: preserve copies the 64 KiB chunk and fdatasyncs the log)
     against plain 4 KiB pwrites and pwrite + fdatasync at fresh offsets;
  5. the needs_preserve() fast path (chunk already saved), and the time to reopen
     the store (index rebuild from the logs' batch heads).

Prints one JSON object to stdout (progress to stderr); removes its files unless --keep.
Run: .venv/bin/python benchmarks/rp_create.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tandem.engine.rpstore import DEFAULT_CHUNK, RPStore  # noqa: E402

BLOCK = 4096


def write(store: RPStore, fd: int, offset: int, data: bytes) -> None:
    if store.needs_preserve(offset, len(data)):
        store.preserve(offset, len(data))
    os.pwrite(fd, data, offset)


def stats_us(samples: list[float]) -> dict:
    samples = sorted(samples)
    return {
        "median_us": round(statistics.median(samples) * 1e6, 1),
        "mean_us": round(statistics.fmean(samples) * 1e6, 1),
        "p99_us": round(samples[int(len(samples) * 0.99) - 1] * 1e6, 1),
        "max_us": round(samples[-1] * 1e6, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=10)
    ap.add_argument("--blocks", type=int, default=100_000)
    ap.add_argument("--touches", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--keep", action="store_true", help="leave the files behind")
    args = ap.parse_args()

    size = int(args.size_gib * (1 << 30)) // BLOCK * BLOCK
    rng = random.Random(1)
    nblocks = size // BLOCK
    picks = rng.sample(range(nblocks), args.blocks + 2 * args.touches)
    base_blocks = picks[:args.blocks]
    chunk_blocks = args.chunk // BLOCK
    used = {b // chunk_blocks for b in base_blocks}
    # Offsets for the first-touch and plain writes: in chunks nothing else touched.
    fresh = [b for b in picks[args.blocks:] if b // chunk_blocks not in used]
    fresh_chunks: dict[int, int] = {}
    for b in fresh:
        fresh_chunks.setdefault(b // chunk_blocks, b)
    fresh = list(fresh_chunks.values())
    touch_blocks, plain_blocks = fresh[:args.touches], fresh[args.touches:2 * args.touches]
    data = os.urandom(BLOCK)

    work = tempfile.mkdtemp(prefix="rp-bench-", dir=args.workdir)
    result: dict = {
        "volume_bytes": size, "chunk": args.chunk, "scattered_blocks": args.blocks,
        "python": platform.python_version(), "workdir": args.workdir,
    }
    try:
        fd = os.open(os.path.join(work, "live.img"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
        rps = os.path.join(work, "rps")
        store = RPStore.open(rps, fd, size, chunk=args.chunk)
        store.create("base")

        print(f"writing {args.blocks} scattered 4 KiB blocks after RP base ...", file=sys.stderr)
        t0 = time.perf_counter()
        for b in base_blocks:
            write(store, fd, b * BLOCK, data)
        populate = time.perf_counter() - t0
        result["populate"] = {
            "seconds": round(populate, 1),
            "chunks_preserved": sum(-(-n // args.chunk) for _, n in store.changed_since("base")),
            "base_log_bytes": store.bytes_used("base"),
        }

        creates = []
        for k in range(5):
            t0 = time.perf_counter()
            store.create(f"rp-{k}")
            creates.append(time.perf_counter() - t0)
        result["create_s"] = {"median": round(statistics.median(creates), 5),
                              "all": [round(t, 5) for t in creates]}

        print(f"{len(touch_blocks)} first-touch writes vs plain writes ...", file=sys.stderr)
        first_touch, plain, plain_sync = [], [], []
        for b in touch_blocks:
            t0 = time.perf_counter()
            write(store, fd, b * BLOCK, data)
            first_touch.append(time.perf_counter() - t0)
        half = len(plain_blocks) // 2
        for b in plain_blocks[:half]:
            t0 = time.perf_counter()
            os.pwrite(fd, data, b * BLOCK)
            plain.append(time.perf_counter() - t0)
        for b in plain_blocks[half:]:
            t0 = time.perf_counter()
            os.pwrite(fd, data, b * BLOCK)
            os.fdatasync(fd)
            plain_sync.append(time.perf_counter() - t0)
        result["write_4k"] = {
            "first_touch_with_preserve": stats_us(first_touch),
            "plain_pwrite": stats_us(plain),
            "plain_pwrite_fdatasync": stats_us(plain_sync),
        }

        offset = touch_blocks[0] * BLOCK                   # saved: the fast path says no
        n = 200_000
        t0 = time.perf_counter()
        for _ in range(n):
            store.needs_preserve(offset, BLOCK)
        result["needs_preserve_fast_path_ns"] = round((time.perf_counter() - t0) / n * 1e9)

        store.close()
        t0 = time.perf_counter()
        store = RPStore.open(rps, fd, size, chunk=args.chunk)
        result["reopen_s"] = round(time.perf_counter() - t0, 3)
        result["rps"] = store.rp_ids()
        store.close()
        os.close(fd)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
