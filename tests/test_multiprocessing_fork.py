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


PROCESSES_APP = (
    watchdog(30)
    + """
import multiprocessing as mp, os, sys
import concurrent.futures as cf

def square(x):
    return x * x

def worker_pid(_):
    return os.getpid()

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    what = sys.argv[1]
    if what == "queue":
        q = ctx.Queue()
        ps = [ctx.Process(target=q.put, args=(i,)) for i in range(2)]
        for p in ps:
            p.start()
        print("queue", sorted(q.get(timeout=10) for _ in ps))
        for p in ps:
            p.join(10)
        print("exit", [p.exitcode for p in ps])
        jq = ctx.JoinableQueue()
        p = ctx.Process(target=lambda: [jq.put(i) for i in range(3)])
        p.start()
        print("joinable", [jq.get(timeout=10) for _ in range(3)])
        for _ in range(3):
            jq.task_done()
        jq.join()
        p.join(10)
    elif what == "pool":
        with ctx.Pool(2) as pool:
            print("map", pool.map(square, range(20)))
            print("imap_unordered", sorted(pool.imap_unordered(square, range(20), chunksize=3)))
            print("imap", list(pool.imap(square, range(5))))
            print("apply_async", pool.apply_async(square, (7,)).get(10))
            print("starmap", pool.starmap(pow, [(2, 3), (3, 2)]))
            pids = set(pool.map(worker_pid, range(40), chunksize=1))
            print("workers", 1 <= len(pids) <= 2, os.getpid() not in pids)  # (natively one may serve all)
        with ctx.Pool(2, maxtasksperchild=2) as pool:  # workers replaced as they go (forked by a thread)
            print("maxtasksperchild", pool.map(square, range(12), chunksize=1))
    elif what == "manager":
        with ctx.Manager() as manager:  # a server process, proxies over a Unix socket
            d, items = manager.dict(), manager.list()
            p = ctx.Process(target=lambda: (d.update(a=1), items.append(2)))
            p.start()
            p.join(10)
            print("manager", dict(d), list(items), p.exitcode)
    else:
        with cf.ProcessPoolExecutor(2, mp_context=ctx) as ex:
            print("executor", list(ex.map(square, range(10))), ex.submit(square, 9).result(10))
            print("chunked", list(ex.map(square, range(10), chunksize=4)))
"""
)


@pytest.mark.parametrize("what", ["queue", "pool", "executor", "manager"])
def test_queues_pools_executor_and_manager_as_natively(tmp_path: Path, what: str) -> None:
    app = write_app(tmp_path, PROCESSES_APP)
    native = run_native(app, what, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave(app, what, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout == native.stdout


def test_a_fork_while_an_lthread_waits_for_a_lock_leaves_the_wait_to_the_parent(tmp_path: Path) -> None:
    # The waiting acquire is the parent's (its host thread is not in the child's host); the child,
    # forked meanwhile, uses the same lock's semaphore and another, and the wait ends on release.
    out = _lines(
        tmp_path,
        WATCHDOG
        + """
import multiprocessing as mp, threading, time

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    lock, sem = ctx.Lock(), ctx.Semaphore(0)
    lock.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=20)))
    t.start()
    time.sleep(0.2)  # it waits on the host now
    def child():
        print("child sees the lock taken", not lock.acquire(timeout=0.1), flush=True)
        sem.release()
    p = ctx.Process(target=child)
    p.start()
    print("parent got the child's release", sem.acquire(timeout=10), flush=True)
    p.join(10)
    print("waiting still", got, p.exitcode, flush=True)
    lock.release()
    t.join(10)
    print("then", got)
""",
    )
    assert out == [
        "child sees the lock taken True",
        "parent got the child's release True",
        "waiting still [] 0",
        "then [True]",
    ]
