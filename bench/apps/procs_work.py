"""One process workload, timed inside the process (bench/procs.py runs it natively and in an enclave).

    python procs_work.py CASE COUNT

Prints one JSON line: ``{"case": ..., "count": ..., "seconds": ...}``, the time of the
measured part alone (a pool's start-up is excluded: its workers are forked and warm first).
Add a case by adding a function to ``CASES``; ``bench/procs.py`` names its unit.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable


def _task(i: int) -> int:
    """A small CPU task: about 50 us of Python."""
    return sum(j * j for j in range(i % 7, 600))


def _pool_map(count: int, chunksize: int | None) -> float:
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_task, range(64))  # both workers forked and serving
        start = time.perf_counter()
        results = pool.map(_task, range(count), chunksize)
        seconds = time.perf_counter() - start
    if len(results) != count:
        raise SystemExit(f"error: {len(results)} results for {count} tasks")
    return seconds


def _sem_pingpong(count: int) -> float:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ping, pong = ctx.Semaphore(0), ctx.Semaphore(0)
    warm = 20

    def child() -> None:
        for _ in range(warm + count):
            ping.acquire()
            pong.release()

    p = ctx.Process(target=child)
    p.start()
    for _ in range(warm):  # the child is running and waiting
        ping.release()
        pong.acquire()
    start = time.perf_counter()
    for _ in range(count):
        ping.release()
        pong.acquire()
    seconds = time.perf_counter() - start
    p.join()
    return seconds


def _fork_wait(count: int, heap_mb: int) -> float:
    """fork + exit + wait, with a heap whose every page is written first (a loaded app's worker)."""
    import os

    heap = bytearray(heap_mb << 20)
    for i in range(0, len(heap), 4096):
        heap[i] = 1
    for _ in range(3 + count):
        if _ == 3:
            start = time.perf_counter()  # (after a warm-up: the first forks touch what the runtime had not)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            raise SystemExit(f"error: a child exited with status {status}")
    return time.perf_counter() - start


def _subprocess_python(count: int) -> float:
    """subprocess.run of python itself (in an enclave: a fresh child enclave, attested to its parent)."""
    import subprocess

    subprocess.run([sys.executable, "-c", "pass"], check=True)  # warm-up
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def _forkserver_process(count: int) -> float:
    """Start and join a Process with the forkserver method: its server forks it and hands it its
    pipes with SCM_RIGHTS (in an enclave: passed descriptors with their sealed channels)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    for _ in range(3 + count):
        if _ == 3:
            start = time.perf_counter()  # (after the server is up and warm)
        p = ctx.Process(target=_task, args=(1,))
        p.start()
        p.join()
        if p.exitcode:
            raise SystemExit(f"error: a forkserver child exited with {p.exitcode}")
    return time.perf_counter() - start


CASES: dict[str, Callable[[int], float]] = {
    # subprocess.run([sys.executable, "-c", "pass"]) and wait for it
    "subprocess-python": _subprocess_python,
    # os.fork() + os._exit(0) in the child + os.waitpid in the parent, with a 100 MB heap
    "fork-100mb": lambda n: _fork_wait(n, 100),
    # multiprocessing.Pool(2).map of small CPU tasks, multiprocessing's own chunking (a few chunks)
    "pool-map": lambda n: _pool_map(n, None),
    # the same, one task per message: every task is a pickle through the pipes and two lock turns
    "pool-map-chunk1": lambda n: _pool_map(n, 1),
    # two processes hand a turn to each other over two semaphores: one round = 2 releases, 2 waits
    "sem-pingpong": _sem_pingpong,
    # Process(...).start() + join() with the forkserver start method (server started before the clock)
    "forkserver-process": _forkserver_process,
}


def main() -> None:
    case, count = sys.argv[1], int(sys.argv[2])
    if case not in CASES:
        raise SystemExit(f"error: no case {case!r} (one of {', '.join(CASES)})")
    seconds = CASES[case](count)
    print(json.dumps({"case": case, "count": count, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
