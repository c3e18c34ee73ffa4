"""multiprocessing's semaphores (``_multiprocessing.SemLock``) in one enclave, on host semaphores."""

from __future__ import annotations

import _multiprocessing
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app

from pyscone import abi, rings
from pyscone.abi import Op
from pyscone.enclave.iago import EXIT_HOST_VIOLATION
from pyscone.enclave.syscalls import SyscallClient
from pyscone.host import semaphores
from pyscone.host.executor import Executor

TESTS_DIR = Path(__file__).parent

# Every primitive of multiprocessing.synchronize that needs only SemLock, with lthreads, printed
# so that the enclave's output must equal CPython's own.
PRIMITIVES = """
    import multiprocessing as mp, threading, time

    def p(*a):
        print(*a, flush=True)

    lock = mp.Lock()
    p("lock", lock.acquire(), lock.acquire(False), lock.acquire(True, 0.05), lock.acquire(timeout=-1), repr(lock))
    lock.release()
    try:
        lock.release()
    except ValueError as e:
        p("lock released twice:", e)
    with lock:
        p("with", repr(lock), lock._semlock._count(), lock._semlock._is_mine())

    r = mp.RLock()
    p("rlock", r.acquire(), r.acquire(), repr(r), r._semlock._count(), r._semlock._is_mine())

    def other():
        p("other lthread", r._semlock._is_mine(), r.acquire(False), r.acquire(timeout=0.05), repr(r))
        try:
            r.release()
        except AssertionError as e:
            p("other release:", e)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    r.release()
    r.release()
    p("rlock free", repr(r))

    s = mp.Semaphore(2)
    s.acquire()
    s.acquire()
    p("semaphore", s.get_value(), s.acquire(False), s._semlock._is_zero(), repr(s))
    for _ in range(3):
        s.release()
    p("semaphore", s.get_value(), s._semlock._is_zero(), repr(s))
    b = mp.BoundedSemaphore(2)
    b.acquire()
    b.release()
    try:
        b.release()
    except ValueError as e:
        p("bounded:", e, repr(b))

    c = mp.Condition()
    items = []

    def consumer(i):
        with c:
            p("consumer", i, c.wait_for(lambda: len(items) > i, timeout=10), items[i])

    ts = [threading.Thread(target=consumer, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    time.sleep(0.1)
    for i in range(3):
        with c:
            items.append(i * 10)
            c.notify_all()
        time.sleep(0.02)
    for t in ts:
        t.join()
    with c:
        p("condition", c.wait(0.05), repr(c))
    try:
        c.notify()
    except AssertionError as e:
        p("notify unowned:", e)

    e = mp.Event()
    p("event", e.is_set(), e.wait(0.05))

    def setter():
        time.sleep(0.1)
        e.set()

    t = threading.Thread(target=setter)
    t.start()
    p("event set", e.wait(10), e.is_set())
    t.join()
    e.clear()
    p("event clear", e.is_set())
"""

ERRORS = """
    import os, _multiprocessing as _mp

    SL = _mp.SemLock
    p = print
    p("max", SL.SEM_VALUE_MAX, SL.__module__, SL.__name__)
    for args in [(5, 1, 1, "/x", True), (1, -1, 1, "/x", True), (1, 2**31, 1, "/x", True), (1, 1, 1, 5, True),
                 (1, 1, 1, "/a\\0b", True), ("a", 1, 1, "/x", True), (1, 1, 1, "/a/b", True), (7, 1, 1, 5, True)]:
        try:
            SL(*args)
        except Exception as e:
            p("SemLock", type(e).__name__, e)
    name = "/pyscone-test-" + os.urandom(8).hex()
    a = SL(1, 0, 1, name, False)
    p("named", a.name == name, a.kind, a.maxvalue, type(a.handle).__name__, SL(0, 1, 1, name + "u", True).name)
    try:
        SL(1, 0, 1, name, False)
    except FileExistsError as e:
        p("again:", e.errno)
    other = SL._rebuild(0, 1, 1, name)  # opened by name: the same semaphore
    other.release()
    p("rebuilt", a._get_value(), a.acquire(False), other._get_value())
    same = SL._rebuild(a.handle, 1, 1, None)  # the handle as it is (this process, or a forked child)
    same.release()
    del same  # (the handle stays its maker's)
    p("by handle", a._get_value(), a.acquire(False), a._get_value())
    _mp.sem_unlink(name)
    for bad in [name, 5]:
        try:
            _mp.sem_unlink(bad)
        except Exception as e:
            p("sem_unlink", type(e).__name__, e)
    try:
        SL._rebuild(0, 1, 1, name)
    except FileNotFoundError as e:
        p("gone:", e.errno)
    for kw in [{"timeout": "x"}, {"block": "x"}]:
        try:
            a.acquire(**kw)
        except TypeError as e:
            p("acquire", kw, e)
    try:
        import pickle
        pickle.dumps(a)
    except TypeError as e:
        p("pickle:", e)
"""


def _same_as_native(tmp_path: Path, source: str, *enclave_args: str) -> str:
    app = write_app(tmp_path, source)
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave(*enclave_args, app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout
    return r.stdout


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_every_primitive_behaves_as_natively_with_lthreads(tmp_path: Path, mode: str) -> None:
    # (In sync mode a host call holds up every lthread: a lock another lthread holds is polled.)
    out = _same_as_native(tmp_path, PRIMITIVES, "--syscalls", mode)
    assert "consumer 2 True 20" in out and "event set True True" in out


def test_errors_names_and_rebuild_are_cpythons(tmp_path: Path) -> None:
    out = _same_as_native(tmp_path, ERRORS)
    assert "rebuilt 1 True 0" in out and "gone: 2" in out


def test_a_timed_out_acquire_returns_false_in_time_and_keeps_no_unit(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import multiprocessing as mp, threading, time
        lock = mp.Lock()
        lock.acquire()
        t0 = time.monotonic()
        print("timed out", lock.acquire(timeout=0.3), 0.25 < time.monotonic() - t0 < 3)
        lock.release()
        print("free again", lock.acquire(False))
        lock.release()
        # Timeouts racing with grants: every unit released is taken once or still there.
        s = mp.Semaphore(0)
        taken = [0]
        def taker():
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                if s.acquire(timeout=0.002):
                    taken[0] += 1
        ts = [threading.Thread(target=taker) for _ in range(3)]
        for t in ts:
            t.start()
        for i in range(300):
            s.release()
            if i % 3 == 0:
                time.sleep(0.001)
        for t in ts:
            t.join()
        time.sleep(0.2)  # (a unit the host took for a cancelled wait is back within a slice)
        print("units", taken[0] + s.get_value())
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["timed out False True", "free again True", "units 300"]


def test_lthreads_blocked_in_acquire_leave_the_enclave_and_the_host_pool_running(tmp_path: Path) -> None:
    # Six lthreads wait for six held locks: more than the host has S-threads.  Files (served by
    # that pool) and timers still work meanwhile, and every waiter gets its lock on release.
    app = write_app(
        tmp_path,
        """
        import multiprocessing as mp, os, threading, time
        locks = [mp.Lock() for _ in range(6)]
        for lock in locks:
            lock.acquire()
        got = []
        def waiter(i):
            locks[i].acquire()
            got.append(i)
        ts = [threading.Thread(target=waiter, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        for k in range(10):
            with open(f"f{k}", "w") as f:
                f.write("x")
                f.flush()
                os.fsync(f.fileno())
            time.sleep(0.01)
        print("files while they wait", got, time.monotonic() - t0 < 5)
        for lock in reversed(locks):
            lock.release()
        for t in ts:
            t.join(10)
        print("all got theirs", sorted(got))
        """,
    )
    r = run_enclave(app, cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["files while they wait [] True", "all got theirs [0, 1, 2, 3, 4, 5]"]


def test_multiprocessing_queues_work_in_one_enclave(tmp_path: Path) -> None:
    out = _same_as_native(
        tmp_path,
        """
        import multiprocessing as mp, queue
        q = mp.Queue(2)
        q.put([1, 2])
        q.put("b")
        try:
            q.put("c", timeout=0.1)
        except queue.Full:
            print("full")
        print("queue", q.get(timeout=5), q.get(timeout=5))
        try:
            q.get(timeout=0.1)
        except queue.Empty:
            print("empty")
        sq = mp.SimpleQueue()
        sq.put("x")
        print("simple", sq.get(), sq.empty())
        jq = mp.JoinableQueue()
        jq.put(1)
        jq.get()
        jq.task_done()
        jq.join()
        print("joined")
        q.close()
        q.join_thread()
        """,
    )
    assert out.splitlines()[0] == "full"


# -- the host side, in this process: real POSIX semaphores, real threads ---------------------------


@pytest.fixture
def lane() -> Iterator[tuple[Executor, SyscallClient]]:
    geometry = abi.Geometry(8, 4096)
    region = rings.SharedRegion.create(geometry)
    bell_host = os.eventfd(0, os.EFD_NONBLOCK)
    bell_enclave = os.eventfd(0, os.EFD_NONBLOCK)
    executor = Executor(region, bell_host, bell_enclave, sthreads=2, spin_us=100)
    client = SyscallClient(rings.SharedRegion.attach(region.fd), bell_host, bell_enclave, spin_us=100)
    executor.start()
    yield executor, client
    executor.stop()


def _replies(client: SyscallClient, want: int, timeout: float = 5.0) -> dict[int, tuple[int, int, bytes]]:
    got: dict[int, tuple[int, int, bytes]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for sid in client.collect():
            got[sid] = client.read_reply(sid)
        if len(got) >= want:
            break
        client.wait(0.01)
    return got


def test_a_waiting_acquire_is_answered_on_release_or_cancelled_and_then_gives_back_its_unit(
    lane: tuple[Executor, SyscallClient],
) -> None:
    executor, client = lane
    sid = client.submit(Op.SEM_NEW, 0, (0, 1, 1), b"/pyscone-test-" + os.urandom(8).hex().encode())
    handle, err, _ = _replies(client, 1)[sid]
    assert handle > 0 and err == 0

    # Released while it waits: answered, acquired.
    wait = client.submit(Op.SEM_ACQUIRE, abi.FLAG_WAIT, (handle, 1), b"")
    assert _replies(client, 1, timeout=0.2) == {}
    rel = client.submit(Op.SEM_RELEASE, 0, (handle,), b"")
    assert _replies(client, 2) == {rel: (0, 0, b""), wait: (1, 0, b"")}

    # Cancelled while it waits: ECANCELED now; released later, the unit stays with the semaphore.
    wait = client.submit(Op.SEM_ACQUIRE, abi.FLAG_WAIT, (handle, 1), b"")
    time.sleep(2.5 * semaphores._SLICE)  # cancelled in the middle of a slice of its wait
    cancel = client.submit(Op.CANCEL, 0, (wait,), b"")
    assert _replies(client, 2) == {cancel: (0, 0, b""), wait: (-1, errno.ECANCELED, b"")}
    rel = client.submit(Op.SEM_RELEASE, 0, (handle,), b"")
    assert _replies(client, 1) == {rel: (0, 0, b"")}
    time.sleep(3 * semaphores._SLICE)  # the abandoned waiter takes it, sees the cancel, gives it back
    value = client.submit(Op.SEM_VALUE, 0, (handle,), b"")
    assert _replies(client, 1) == {value: (1, 0, b"")}
    assert not executor._elsewhere

    # Not waiting: at once, 0 when taken; too many releases: EOVERFLOW; a bad handle: EINVAL.
    calls = [
        client.submit(Op.SEM_ACQUIRE, 0, (handle, 0), b""),
        client.submit(Op.SEM_ACQUIRE, 0, (handle, 0), b""),
        client.submit(Op.SEM_RELEASE, 0, (handle,), b""),
        client.submit(Op.SEM_RELEASE, 0, (handle,), b""),
        client.submit(Op.SEM_VALUE, 0, (9999,), b""),
        client.submit(Op.SEM_CLOSE, 0, (handle,), b""),
    ]
    got = _replies(client, len(calls))
    assert [got[s] for s in calls] == [
        (1, 0, b""), (0, 0, b""), (0, 0, b""), (-1, errno.EOVERFLOW, b""), (-1, errno.EINVAL, b""), (0, 0, b""),
    ]  # fmt: skip


def test_a_wait_that_loses_the_race_to_its_cancel_gives_the_semaphore_back() -> None:
    sem = _multiprocessing.SemLock(1, 0, 1, "/pyscone-test-" + os.urandom(8).hex(), True)
    answers: list[tuple[int, int, bytes]] = []
    w = semaphores.Wait(sem)
    w.start(answers.append, lambda: False)
    assert w.cancel()  # the enclave gave up first
    sem.release()  # the waiter takes it within a slice, then sees the cancel
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and threading.active_count() > 1 and sem._get_value() == 0:
        time.sleep(0.01)
    time.sleep(2 * semaphores._SLICE)
    assert sem._get_value() == 1 and answers == []
    assert not w.cancel()

    w = semaphores.Wait(sem)
    w.start(answers.append, lambda: False)
    deadline = time.monotonic() + 2
    while not answers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answers == [(1, 0, b"")] and sem._get_value() == 0
    assert not w.cancel()  # answered already: the enclave takes that answer


# -- a lying host -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("acquire-zero", "a blocking semaphore acquire answered 0"),
        ("value-huge", "above SEM_VALUE_MAX"),
        ("handle-zero", "a semaphore handle must be a positive number"),
    ],
)
def test_a_malformed_semaphore_answer_stops_the_enclave(tmp_path: Path, case: str, reason: str) -> None:
    app = write_app(
        tmp_path,
        """
        import multiprocessing as mp
        lock = mp.Lock()
        lock.acquire()
        print("APP-SAW value", lock._semlock._get_value())
        print("APP-SAW second acquire", lock.acquire(timeout=5))
        """,
    )
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:sem_liars:SemLie:{case}"}
    r = run_enclave(app, cwd=tmp_path, env=env)
    assert "pyscone-test: lied" in r.stderr, r.stderr
    assert r.returncode == EXIT_HOST_VIOLATION, r.stderr
    assert "APP-SAW second" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pyscone: enclave stopped: host violation: ") and reason in last, last


def test_shared_memory_is_refused_with_enosys_not_the_barriers_eperm(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import multiprocessing as mp
        from multiprocessing import shared_memory
        for make in (lambda: mp.Value("i", 0), lambda: mp.Barrier(2), lambda: shared_memory.SharedMemory(create=True, size=64)):
            try:
                make()
            except OSError as e:
                print(e.errno)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["38", "38", "38"]
