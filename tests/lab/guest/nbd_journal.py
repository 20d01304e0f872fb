"""Runs inside a lab host: write to an NBD export and journal every acknowledged write, or
dump what an export holds. Standard library only (lab hosts are offline).

  nbd_journal.py write SOCKET EXPORT --blocks N --start-seq Q [--count C] [--seed S]
      Writes one 4 KiB block at a time with FUA, to random blocks among the first N.
      Prints "S block seq" before sending a write and "A block seq" once it is
      acknowledged, flushed line by line, so that whoever reads the stream knows
      every acknowledged write even if this host dies mid-run.
  nbd_journal.py dump SOCKET EXPORT --blocks N
      Prints one JSON object: {"blocks": {block: seq}, "foreign": count} where
      "foreign" counts non-zero blocks that do not carry a journal header.

Every block written carries a header (magic, block, seq) and a filler derived from
them, so a dump proves both which write a block holds and that it is intact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import struct
import sys

from nbdclient import Client

BLOCK = 4096
MAGIC = b"TANDEMJ1"
HEADER = struct.Struct(">8sQQ")


def payload(block: int, seq: int) -> bytes:
    head = HEADER.pack(MAGIC, block, seq)
    seed = hashlib.sha256(head).digest()
    filler = (seed * (BLOCK // len(seed) + 1))[:BLOCK - len(head)]
    return head + filler


def decode(data: bytes, block: int) -> int | None | str:
    """The seq a block holds, None if it is all zeroes, "foreign" if it is neither."""
    if data == bytes(len(data)):
        return None
    magic, got_block, seq = HEADER.unpack_from(data)
    if magic != MAGIC or got_block != block or data != payload(block, seq):
        return "foreign"
    return seq


def write(args) -> int:
    rng = random.Random(args.seed)
    c = Client(args.socket, args.export, timeout=60)
    seq = args.start_seq
    n = 0
    out = sys.stdout
    while args.count == 0 or n < args.count:
        block = rng.randrange(args.blocks)
        out.write(f"S {block} {seq}\n")
        out.flush()
        c.write(block * BLOCK, payload(block, seq), fua=True)
        out.write(f"A {block} {seq}\n")
        out.flush()
        seq += 1
        n += 1
    c.close()
    return 0


def dump(args) -> int:
    c = Client(args.socket, args.export, timeout=60)
    blocks, foreign = {}, 0
    step = 64
    for first in range(0, args.blocks, step):
        count = min(step, args.blocks - first)
        data = c.read(first * BLOCK, count * BLOCK)
        for i in range(count):
            got = decode(data[i * BLOCK:(i + 1) * BLOCK], first + i)
            if got == "foreign":
                foreign += 1
            elif got is not None:
                blocks[first + i] = got
    c.close()
    json.dump({"blocks": blocks, "foreign": foreign}, sys.stdout)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("write", "dump"))
    p.add_argument("socket")
    p.add_argument("export")
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--start-seq", type=int, default=1)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    return write(args) if args.mode == "write" else dump(args)


if __name__ == "__main__":
    sys.exit(main())
