"""Host-call round trip and throughput: T threads doing small ``os.pread`` calls.

Runs the same way natively and in an enclave::

    python bench/syscalls.py --threads 8 --calls 20000
    pyscone run bench/syscalls.py --threads 8 --calls 20000
    pyscone run --syscalls sync bench/syscalls.py --threads 8 --calls 20000

The total number of calls is (about) the same for every thread count: each of
the T threads does ``calls // T`` calls (the reported ``calls`` is the exact
total).  Only the calls are timed: threads are created first and released
together.  Prints one JSON line to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

FILE_BYTES = 4096
READ_BYTES = 64


def make_file(directory: str | None) -> tuple[int, str]:
    """Create a temp file holding FILE_BYTES of data; return (fd, path)."""
    fd, path = tempfile.mkstemp(prefix="pyscone-bench-", dir=directory)
    data = bytes(range(256)) * (FILE_BYTES // 256)
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])
    return fd, path


def run(threads: int, calls: int, directory: str | None) -> dict[str, float | int]:
    per_thread = max(1, calls // threads)
    fd, path = make_file(directory)
    try:
        start = threading.Event()
        errors: list[BaseException] = []

        def worker() -> None:
            start.wait()
            try:
                for _ in range(per_thread):
                    if len(os.pread(fd, READ_BYTES, 0)) != READ_BYTES:
                        raise RuntimeError("short pread")
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        pool = [threading.Thread(target=worker, name=f"pread-{i}") for i in range(threads)]
        for t in pool:
            t.start()
        t0 = time.perf_counter()
        start.set()
        for t in pool:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
    finally:
        os.close(fd)
        os.unlink(path)
    total = per_thread * threads
    return {
        "threads": threads,
        "calls": total,
        "seconds": round(wall, 6),
        "calls_per_s": round(total / wall, 1),
        "us_per_call": round(wall / total * 1e6, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description="os.pread round-trip benchmark (native or in an enclave)")
    p.add_argument("--threads", type=int, default=1, help="number of threads (default 1)")
    p.add_argument("--calls", type=int, default=20_000, help="total calls over all threads (default 20000)")
    p.add_argument("--dir", default=None, help="directory for the temp file (default: the system temp dir)")
    a = p.parse_args()
    if a.threads < 1 or a.calls < 1:
        p.error("--threads and --calls must be at least 1")
    result = run(a.threads, a.calls, a.dir)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
