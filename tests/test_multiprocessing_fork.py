"""multiprocessing with the fork start method: locks, events and pools across child enclaves."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app


def watchdog(seconds: float) -> str:
    """App code that ends the app if it hangs (a timer lthread), so that a failure is quick and clear."""
    return f"""
import os, threading
def _hung():
    print("HUNG", flush=True)
    os._exit(3)
_t = threading.Timer({seconds}, _hung)
_t.daemon = True
_t.start()
"""


WATCHDOG = watchdog(40)


def _lines(tmp_path: Path, source: str, *, native: bool = True) -> list[str]:
    app = write_app(tmp_path, source)
    r = run_enclave(app, cwd=tmp_path, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    if native:
        n = run_native(app, cwd=tmp_path, timeout=90)
        assert n.returncode == 0, n.stderr
        assert r.stdout == n.stdout
    return r.stdout.splitlines()


def test_a_lock_shared_by_parent_and_children_excludes(tmp_path: Path) -> None:
    # Three processes add 1 to a number in a file, 50 times each, reading and writing it with a
    # pause between: under the lock nothing is lost; without it (the control) updates are.
    out = _lines(
        tmp_path,
        WATCHDOG
        + """
import multiprocessing as mp, time

def bump(lock, path, n, use_lock):
    for _ in range(n):
        if use_lock:
            lock.acquire()
        with open(path) as f:
            v = int(f.read() or 0)  # (unlocked, a read may fall between truncate and write)
        time.sleep(0.001)
        with open(path, "w") as f:
            f.write(str(v + 1))
        if use_lock:
            lock.release()

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    for use_lock in (True, False):
        path = f"count-{use_lock}"
        with open(path, "w") as f:
            f.write("0")
        lock = ctx.Lock()
        ps = [ctx.Process(target=bump, args=(lock, path, 50, use_lock)) for _ in range(2)]
        for p in ps:
            p.start()
        bump(lock, path, 50, use_lock)
        for p in ps:
            p.join(30)
        with open(path) as f:
            n = int(f.read())
        print("locked" if use_lock else "unlocked", n if use_lock else n < 150, [p.exitcode for p in ps])
""",
        native=False,
    )
    assert out == ["locked 150 [0, 0]", "unlocked True [0, 0]"]


def test_events_conditions_semaphores_and_rlocks_across_the_fork_as_natively(tmp_path: Path) -> None:
    _lines(
        tmp_path,
        WATCHDOG
        + """
import multiprocessing as mp, time

def child(r, ev, done, cond, sem, a, b):
    # A forked child owns nothing its parent held (multiprocessing re-zeroes the counts).
    print("child owns", r._semlock._is_mine(), r._semlock._count(), r.acquire(timeout=0.1), flush=True)
    ev.set()
    with r:  # the parent releases it once it saw the event
        print("child got the rlock", r._semlock._is_mine(), flush=True)
    with cond:
        cond.notify()
    sem.acquire()  # the parent's release lets us go
    a.send("child done")
    done.wait(10)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    r, ev, done, cond, sem = ctx.RLock(), ctx.Event(), ctx.Event(), ctx.Condition(), ctx.Semaphore(0)
    a, b = ctx.Pipe()
    r.acquire()
    r.acquire()
    with cond:
        p = ctx.Process(target=child, args=(r, ev, done, cond, sem, a, b))
        p.start()
        print("event", ev.wait(10), flush=True)
        time.sleep(0.2)
        r.release()
        r.release()
        print("notified", cond.wait(10), flush=True)
    sem.release()
    print(b.recv(), flush=True)
    done.set()
    p.join(10)
    print("exit", p.exitcode, sem.get_value(), r._semlock._count())
""",
    )


def test_queue_and_pool_over_socketpair_connections(tmp_path: Path) -> None:
    # multiprocessing's queues and pools on duplex connections (socket pairs, shared across a fork
    # like every host fd), so that this exercises the locks and forks whatever the state of
    # os.pipe across a fork (the family's sealed pipes, tested below once they are there).
    # (Not ProcessPoolExecutor: it takes a worker's sentinel, an os.pipe, for its death.)
    out = _lines(
        tmp_path,
        WATCHDOG
        + """
import multiprocessing as mp, multiprocessing.connection as connection, os
_pipe = connection.Pipe
connection.Pipe = lambda duplex=True: _pipe(True)

def square(x):
    return x * x

def worker_pid(_):
    return os.getpid()

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=q.put, args=(i,)) for i in range(2)]
    for p in ps:
        p.start()
    print("queue", sorted(q.get(timeout=10) for _ in ps))
    for p in ps:
        p.join(10)
    with ctx.Pool(2) as pool:
        print("map", pool.map(square, range(20)))
        print("imap_unordered", sorted(pool.imap_unordered(square, range(20), chunksize=3)))
        print("apply_async", pool.apply_async(square, (7,)).get(10))
        pids = set(pool.map(worker_pid, range(40), chunksize=1))
        print("workers", 1 <= len(pids) <= 2, os.getpid() not in pids)  # (natively one may serve all)
""",
    )
    assert out[1] == "map " + str([x * x for x in range(20)])
    assert out[4] == "workers True True"


PIPES_APP = (
    watchdog(10)
    + """
import multiprocessing as mp, os, sys
import concurrent.futures as cf

def square(x):
    return x * x

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    what = sys.argv[1]
    if what == "queue":
        q = ctx.Queue()
        p = ctx.Process(target=q.put, args=("from the child",))
        p.start()
        print(q.get(timeout=10))
        p.join(10)
        print("exit", p.exitcode)
    elif what == "pool":
        with ctx.Pool(2) as pool:
            print(pool.map(square, range(10)))
            print(sorted(pool.imap_unordered(square, range(10))))
    else:
        with cf.ProcessPoolExecutor(2, mp_context=ctx) as ex:
            print(list(ex.map(square, range(10))))
"""
)


@pytest.mark.xfail(
    strict=True, reason="os.pipe() is enclave memory and not shared across a fork until the family's sealed pipes land"
)
@pytest.mark.parametrize("what", ["queue", "pool", "executor"])
def test_queue_pool_and_executor_as_the_stdlib_makes_them(tmp_path: Path, what: str) -> None:
    app = write_app(tmp_path, PIPES_APP)
    native = run_native(app, what, cwd=tmp_path)
    r = run_enclave(app, what, cwd=tmp_path, timeout=25)  # (a hang is a TimeoutExpired: a failure)
    assert r.returncode == 0 and r.stdout == native.stdout, r.stdout + r.stderr[-2000:]
