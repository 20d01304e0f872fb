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

--reflink measures the reflink store (rpreflink.py) instead, on an XFS with
reflink=1: --workdir if it is one, else (as root) a sparse --xfs-gib image in
--workdir, loop-mounted for the run and unmounted after. Same live file (sparse
--size-gib, --blocks scattered 4 KiB blocks written and fsynced: a fragmented
file, the worst case for FICLONE, which works extent by extent), then:

  1. five RP creates (one FICLONE + fsync each), timed;
  2. 4 KiB overwrites of written blocks before any RP (plain) and of other
     written blocks after the RPs (the filesystem copies on write), each as
     pwrite alone and as pwrite + fdatasync (where XFS does the CoW remap);
  3. changed_since of the newest RP (FIEMAP, then reads of what is not shared),
     one usage pass (bytes_used of every RP), a restore of the newest RP, a
     delete, a reopen;
  4. for scale, five creates on a volume of the same size in a few big
     extents (posix_fallocate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from tandem.engine.rpreflink import ReflinkStore, fiemap, probe  # noqa: E402
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
    ap.add_argument("--reflink", action="store_true", help="the reflink store on XFS (see above)")
    ap.add_argument("--xfs-gib", type=float, default=16, help="--reflink: size of the loop-mounted XFS")
    args = ap.parse_args()
    if args.reflink:
        return main_reflink(args)

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


# -- --reflink ---------------------------------------------------------------------------------

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PATH": SBIN})


@contextlib.contextmanager
def xfs_mount(workdir: str, gib: float, keep: bool):
    """A directory on an XFS with reflink=1: workdir if it is one, else a loop mount."""
    with tempfile.TemporaryDirectory(prefix="rp-probe-", dir=workdir) as d:
        fd = os.open(os.path.join(d, "f"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            why = probe(os.path.join(d, "f.rp"), fd)
        finally:
            os.close(fd)
    if why is None:
        yield workdir, "workdir"
        return
    if os.geteuid() != 0:
        raise SystemExit(f"{workdir} has no reflink ({why}) and making an XFS loop mount needs root")
    base = tempfile.mkdtemp(prefix="rp-bench-xfs-", dir=workdir)
    image, mnt = os.path.join(base, "xfs.img"), os.path.join(base, "mnt")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(int(gib * (1 << 30)))
    _sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", image)
    _sh("mount", "-o", "loop", image, mnt)
    try:
        yield mnt, f"loop-mounted XFS reflink=1 ({gib:g} GiB sparse image in {workdir})"
    finally:
        for _ in range(20):
            try:
                _sh("umount", mnt)
                break
            except subprocess.CalledProcessError:
                time.sleep(0.5)
        if not keep and not os.path.ismount(mnt):
            shutil.rmtree(base, ignore_errors=True)


def main_reflink(args) -> int:
    size = int(args.size_gib * (1 << 30)) // BLOCK * BLOCK
    rng = random.Random(1)
    picks = rng.sample(range(size // BLOCK), args.blocks)
    n = min(args.touches, args.blocks // 8)
    # Four disjoint sets of written blocks to overwrite: before the RPs (unshared) and
    # after them (shared with every RP), each with and without fdatasync.
    sets = [picks[k * n:(k + 1) * n] for k in range(4)]
    data, other = os.urandom(BLOCK), os.urandom(BLOCK)
    result: dict = {"store": "reflink", "volume_bytes": size, "chunk": args.chunk,
                    "scattered_blocks": args.blocks, "python": platform.python_version(),
                    "kernel": platform.release()}
    with xfs_mount(args.workdir, args.xfs_gib, args.keep) as (mnt, where):
        result["filesystem"] = where
        work = tempfile.mkdtemp(prefix="rp-bench-", dir=mnt)
        try:
            path = os.path.join(work, "live.img")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, size)
            print(f"writing {args.blocks} scattered 4 KiB blocks ...", file=sys.stderr)
            t0 = time.perf_counter()
            for b in picks:
                os.pwrite(fd, data, b * BLOCK)
            os.fsync(fd)
            result["populate_s"] = round(time.perf_counter() - t0, 1)
            result["live_extents"] = len(fiemap(fd, 0, size, sync=True))

            def overwrite(blocks, sync: bool) -> dict:
                samples = []
                for b in blocks:
                    t0 = time.perf_counter()
                    os.pwrite(fd, other, b * BLOCK)
                    if sync:
                        os.fdatasync(fd)
                    samples.append(time.perf_counter() - t0)
                os.fsync(fd)
                return stats_us(samples)

            print("overwrites before any RP ...", file=sys.stderr)
            before = {"pwrite": overwrite(sets[0], False), "pwrite_fdatasync": overwrite(sets[1], True)}

            store = ReflinkStore.open(path + ".rp", fd, size, chunk=args.chunk)
            creates = []
            for k in range(5):
                t0 = time.perf_counter()
                store.create(f"rp-{k}")
                creates.append(time.perf_counter() - t0)
                print(f"create rp-{k}: {creates[-1]:.3f} s", file=sys.stderr)
            result["create_s"] = {"median": round(statistics.median(creates), 4),
                                  "all": [round(t, 4) for t in creates]}

            print("first overwrites of shared blocks after the RPs ...", file=sys.stderr)
            after = {"pwrite": overwrite(sets[2], False), "pwrite_fdatasync": overwrite(sets[3], True)}
            result["overwrite_4k_of_a_written_block"] = {"no_rp": before, "shared_with_5_rps": after}
            result["live_extents_after_overwrites"] = len(fiemap(fd, 0, size, sync=True))

            newest = store.rp_ids()[-1]
            t0 = time.perf_counter()
            changed = store.changed_since(newest)
            result["changed_since_newest"] = {
                "seconds": round(time.perf_counter() - t0, 3),
                "bytes": sum(length for _, length in changed)}
            t0 = time.perf_counter()
            used = store.usage()                       # what bytes_used() serves, measured now
            result["bytes_used"] = {"usage_pass_s": round(time.perf_counter() - t0, 3), **used}
            t0 = time.perf_counter()
            restored = store.restore(newest)
            result["restore_newest"] = {"seconds": round(time.perf_counter() - t0, 3),
                                        "bytes": sum(length for _, length in restored)}
            t0 = time.perf_counter()
            store.delete("rp-0")
            result["delete_s"] = round(time.perf_counter() - t0, 4)
            store.close()
            t0 = time.perf_counter()
            store = ReflinkStore.open(path + ".rp", fd, size)
            result["reopen_s"] = round(time.perf_counter() - t0, 4)
            result["rps"] = store.rp_ids()
            store.close()
            os.close(fd)

            # For scale: the same volume allocated in a few big extents (fallocate).
            path = os.path.join(work, "contiguous.img")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
            store = ReflinkStore.open(path + ".rp", fd, size, chunk=args.chunk)
            creates = []
            for k in range(5):
                t0 = time.perf_counter()
                store.create(f"rp-{k}")
                creates.append(time.perf_counter() - t0)
            result["contiguous"] = {"extents": len(fiemap(fd, 0, size)),
                                    "create_s": {"median": round(statistics.median(creates), 4),
                                                 "all": [round(t, 4) for t in creates]}}
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
