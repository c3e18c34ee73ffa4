"""File throughput with ordinary Python file objects, for the file-system shield benchmark.

    python bench/apps/fs_io.py DIR SIZE PATTERN [--ops N] [--seed S]
    pyscone run --fspf FSPF bench/apps/fs_io.py DIR SIZE PATTERN ...

Works on ``DIR/data.bin``, a file of ``SIZE`` bytes (suffixes K and M: powers of 1024).
``PATTERN`` is one of the names below, a comma-separated list of them, or ``all`` (every
one, in the order listed, which is also the order that needs no set-up):

* ``seq-write-4k``, ``seq-write-64k``: ``open(path, "wb")``, ``f.write(block)`` until
  ``SIZE`` bytes, then ``f.flush(); os.fsync(f.fileno()); f.close()``.  The file is
  removed first (not timed), so every write starts from nothing.
* ``seq-read-4k``, ``seq-read-64k``: ``open(path, "rb")``, ``f.read(block)`` to the end.
* ``rand-read-4k``, ``rand-read-64k``: ``--ops`` times ``f.seek(offset); f.read(block)``
  at block-aligned offsets drawn by ``random.Random(seed)``.
* ``rand-write-4k``, ``rand-write-64k``: the same on ``open(path, "r+b")`` with
  ``f.write(block)``, then flush, fsync and close.

Each timing runs from ``open`` to ``close``: in a protected region fsync/close is the
commit.  A read pattern that finds no file of ``SIZE`` bytes writes one first (not timed).
Prints one JSON line per pattern to stdout: pattern, bytes, ops, seconds, mb_per_s
(10^6 bytes per second).  Plain user code: it runs unchanged natively and in an enclave.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

PATTERNS = (
    "seq-write-4k",
    "seq-write-64k",
    "seq-read-4k",
    "seq-read-64k",
    "rand-read-4k",
    "rand-read-64k",
    "rand-write-4k",
    "rand-write-64k",
)
BLOCKS = {"4k": 4096, "64k": 65536}
FILE_NAME = "data.bin"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def seq_write(path: str, size: int, block: int) -> int:
    data = os.urandom(block)
    f = open(path, "wb")  # noqa: SIM115 - closed explicitly: the close is part of what is timed
    written = 0
    while written < size:
        n = min(block, size - written)
        f.write(data if n == block else data[:n])
        written += n
    f.flush()
    os.fsync(f.fileno())
    f.close()
    return written


def seq_read(path: str, block: int) -> int:
    total = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                break
            total += len(data)
    return total


def offsets(size: int, block: int, ops: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    slots = max(1, size // block)
    return [rng.randrange(slots) * block for _ in range(ops)]


def rand_read(path: str, block: int, where: list[int]) -> int:
    total = 0
    with open(path, "rb") as f:
        for off in where:
            f.seek(off)
            total += len(f.read(block))
    return total


def rand_write(path: str, block: int, where: list[int]) -> int:
    data = os.urandom(block)
    f = open(path, "r+b")  # noqa: SIM115 - closed explicitly: the close is part of what is timed
    for off in where:
        f.seek(off)
        f.write(data)
    f.flush()
    os.fsync(f.fileno())
    f.close()
    return block * len(where)


def ensure_file(path: str, size: int) -> None:
    """A file of ``size`` bytes for the read and random-write patterns (not timed)."""
    try:
        if os.stat(path).st_size == size:
            return
    except FileNotFoundError:
        pass
    seq_write(path, size, BLOCKS["64k"])


def run(pattern: str, directory: str, size: int, ops: int, seed: int) -> dict[str, object]:
    kind, _, bs = pattern.rpartition("-")
    block = BLOCKS[bs]
    path = os.path.join(directory, FILE_NAME)
    if kind == "seq-write":
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        ensure_file(path, size)
    where = offsets(size, block, ops, seed) if kind.startswith("rand") else []
    t0 = time.perf_counter()
    if kind == "seq-write":
        moved = seq_write(path, size, block)
    elif kind == "seq-read":
        moved = seq_read(path, block)
    elif kind == "rand-read":
        moved = rand_read(path, block, where)
    else:
        moved = rand_write(path, block, where)
    seconds = time.perf_counter() - t0
    expected = size if kind.startswith("seq") else block * ops
    if moved != expected:
        raise RuntimeError(f"{pattern}: moved {moved} bytes, expected {expected}")
    return {
        "pattern": pattern,
        "block": block,
        "bytes": moved,
        "ops": -(-moved // block),
        "seconds": round(seconds, 6),
        "mb_per_s": round(moved / seconds / 1e6, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description="file throughput of plain Python file objects")
    p.add_argument("dir", help="directory for data.bin")
    p.add_argument("size", type=parse_size, help="file size, e.g. 64M")
    p.add_argument("pattern", help=f"all, or a comma-separated list of: {', '.join(PATTERNS)}")
    p.add_argument("--ops", type=int, default=2000, help="operations per random pattern (default 2000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random offsets (default 1)")
    a = p.parse_args()
    patterns = list(PATTERNS) if a.pattern == "all" else a.pattern.split(",")
    unknown = [x for x in patterns if x not in PATTERNS]
    if unknown:
        p.error(f"unknown pattern(s): {', '.join(unknown)}")
    if a.size < BLOCKS["64k"] or a.ops < 1:
        p.error("SIZE must be at least 64K and --ops at least 1")
    for pattern in patterns:
        result = run(pattern, a.dir, a.size, a.ops, a.seed)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
