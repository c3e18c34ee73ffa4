"""Semaphores for the enclave's ``_multiprocessing.SemLock`` (UNTRUSTED: the host arbitrates them).

Theory of operation
-------------------
Each semaphore the enclave makes is a real POSIX semaphore here: a
``_multiprocessing.SemLock`` of this host process, always of kind SEMAPHORE (which
lthread owns a recursive lock is the enclave's business, not the host's).  It lives
in shared memory (``sem_open``), so a forked copy of this process -- the host of a
forked child enclave -- holds the same semaphore under the same handle, and another
host can open it by name.  That is why the table is one per host *process* (module
level) and not one per executor: the executor a forked host builds for its child
finds the parent's handles, as a forked process finds its parent's semaphores.

Everything but a waiting acquire is one call that cannot block (``sem_trywait``,
``sem_post``, ``sem_getvalue``, and ``sem_open`` on a tmpfs), run on the dispatcher.
A waiting acquire first tries too; when the semaphore is taken, the handler raises
:class:`Wait` and the executor hands the slot to it: a thread of its own (not an
S-thread -- a lock may be held for minutes, and the pool must go on serving files)
waits in short slices and answers the slot when it has the semaphore.  ``CANCEL``
(the enclave's timeout, or an interrupt) and that thread decide under one lock who
answers: the thread, if it got the semaphore first (the enclave then takes the
success it gets), or the cancel, and then a semaphore the thread takes a moment
later is given back at once -- so a timed-out acquire never keeps a unit.
"""

from __future__ import annotations

import _multiprocessing  # type: ignore[import-not-found]  # (no stubs: CPython-internal)
import errno
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from pyscone.abi import Op

Answer = tuple[int, int, bytes]

_SEMAPHORE = 1  # multiprocessing.synchronize.SEMAPHORE
#: How long a waiting thread sleeps in one sem_timedwait before it looks whether it was cancelled.
_SLICE = 0.05

_sems: dict[int, Any] = {}  # handle -> _multiprocessing.SemLock
_next = [1]
_lock = threading.Lock()


def _name(d: bytes) -> str:
    return d.decode("utf-8", "surrogateescape")


def _get(handle: int) -> Any:
    sem = _sems.get(handle)
    if sem is None:
        raise OSError(errno.EINVAL, "no such semaphore")  # as sem_post(3) on a bad sem_t
    return sem


def _add(sem: Any) -> Answer:
    with _lock:
        handle = _next[0]
        _next[0] += 1
        _sems[handle] = sem
    return (handle, 0, b"")


def _new(a: tuple[int, ...], d: bytes) -> Answer:
    return _add(_multiprocessing.SemLock(_SEMAPHORE, a[0], a[1], _name(d), bool(a[2])))


def _open(a: tuple[int, ...], d: bytes) -> Answer:
    return _add(_multiprocessing.SemLock._rebuild(0, _SEMAPHORE, a[0], _name(d)))


def _acquire(a: tuple[int, ...], d: bytes) -> Answer:
    sem = _get(a[0])
    if sem.acquire(False):
        return (1, 0, b"")
    if not a[1]:
        return (0, 0, b"")
    raise Wait(sem)


def _release(a: tuple[int, ...], d: bytes) -> Answer:
    try:
        _get(a[0]).release()
    except ValueError:  # "released too many times": its value is at maxvalue
        return (-1, errno.EOVERFLOW, b"")
    return (0, 0, b"")


def _close(a: tuple[int, ...], d: bytes) -> Answer:
    with _lock:
        _sems.pop(a[0], None)  # the SemLock's dealloc is the sem_close
    return (0, 0, b"")


def _unlink(a: tuple[int, ...], d: bytes) -> Answer:
    _multiprocessing.sem_unlink(_name(d))
    return (0, 0, b"")


#: The executor's handlers for the semaphore opcodes.
HANDLERS: dict[int, Callable[[tuple[int, ...], bytes], Answer]] = {
    Op.SEM_NEW: _new,
    Op.SEM_OPEN: _open,
    Op.SEM_ACQUIRE: _acquire,
    Op.SEM_RELEASE: _release,
    Op.SEM_VALUE: lambda a, d: (_get(a[0])._get_value(), 0, b""),
    Op.SEM_CLOSE: _close,
    Op.SEM_UNLINK: _unlink,
}

_WAITING, _DONE, _CANCELLED = 0, 1, 2


class Wait(Exception):
    """Raised by a waiting acquire that could not have its semaphore at once.

    The executor calls :meth:`start` with how to answer the slot, and :meth:`cancel`
    when the enclave cancels the call.
    """

    def __init__(self, sem: Any) -> None:
        super().__init__("waiting for a semaphore")
        self.sem = sem
        self._state = _WAITING
        self._lock = threading.Lock()

    def start(self, answer: Callable[[Answer], None], stopping: Callable[[], bool]) -> None:
        _waiters.run(lambda: self._wait(answer, stopping))

    def cancel(self) -> bool:
        """Give the call up; true if that happened before it was answered (then the caller answers it)."""
        with self._lock:
            if self._state != _WAITING:
                return False
            self._state = _CANCELLED
            return True

    def _wait(self, answer: Callable[[Answer], None], stopping: Callable[[], bool]) -> None:
        sem = self.sem
        while self._state == _WAITING and not stopping():
            try:
                got = sem.acquire(True, _SLICE)
            except OSError as e:  # (a semaphore closed under us cannot happen: we hold a reference)
                with self._lock:
                    if self._state != _WAITING:
                        return
                    self._state = _DONE
                answer((-1, e.errno or errno.EIO, b""))
                return
            if not got:
                continue
            with self._lock:
                if self._state == _WAITING:
                    self._state = _DONE
                    break
            try:
                sem.release()  # cancelled while we took it: give it back
            except ValueError:  # (at its maximum already: someone released one too many meanwhile)
                pass
            return
        else:
            return
        answer((1, 0, b""))


class _Waiters:
    """The threads that wait for semaphores, kept a while when idle: a contended lock is waited
    for again and again (a pool's workers take turns at its queue), and a thread start each
    time would be most of the cost of a turn."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)  # (under the lock: an idle thread that times out sees it)
                return
        threading.Thread(target=self._serve, args=(job,), name="pyscone-semwait", daemon=True).start()

    def _serve(self, job: Callable[[], None]) -> None:
        while True:
            job()
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._idle -= 1
                        return
                job = self._jobs.get()  # given to us as we timed out


#: How long an idle waiting thread is kept.
_IDLE_S = 5.0
_waiters = _Waiters()


def _after_fork_in_child() -> None:
    # Only the forking thread goes on in a forked host: every wait belongs to the parent's lane,
    # and the locks may have been held by one of its threads.
    global _lock, _waiters
    _lock = threading.Lock()
    _waiters = _Waiters()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["HANDLERS", "Wait"]
