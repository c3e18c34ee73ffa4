"""``_multiprocessing.SemLock`` on host semaphores: multiprocessing's locks in an enclave.

Theory of operation
-------------------
CPython's SemLock is a POSIX named semaphore (``sem_open``: a file in /dev/shm,
mapped), which the barrier refuses.  Here the semaphore lives on the host, a real
one (``host/semaphores.py``), and the enclave holds its handle.  A forked child's
host is a fork of its parent's, so the handle names the same semaphore there: a
lock made before a fork excludes across it, as natively.

What CPython keeps in the SemLock object stays in the enclave, per process: the
count of this process's acquires, and for a recursive mutex which lthread owns it.
Ownership is per (process, lthread): the owner is recorded as the family member id
(new in every forked child) and the lthread's ident, so a child never "owns" a lock
its parent held at the fork, and ``_after_fork`` zeroes the count as CPython's does.

A waiting acquire parks only its lthread: the host waits on a thread of its own,
and a timeout is the scheduler's (``CANCEL``); an acquire the host grants just as
the timeout fires counts as acquired, so no unit is lost either way.  (In sync mode,
where a host call holds up every lthread, a waiting acquire tries and sleeps instead.)

The host arbitrates: a lying host can grant a lock twice or never (mutual
exclusion and liveness are its to break, as with ``flock``), but it learns nothing
the processes send each other and can forge none of it (docs/processes.md, "Locks").
"""

from __future__ import annotations

import errno
import math
import operator
import os
import time
from typing import Any

from pyscone import abi
from pyscone.abi import Op
from pyscone.enclave import family, scheduler

RECURSIVE_MUTEX, SEMAPHORE = 0, 1
SEM_VALUE_MAX = abi.SEM_VALUE_MAX
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
#: Sync mode's waiting acquire: the first and the longest sleep between two tries.
_POLL_FIRST, _POLL_MAX = 0.0005, 0.02


def _c_int(value: object) -> int:
    """An argument CPython parses as a C ``int`` ("i"): the same TypeError and OverflowError."""
    n = operator.index(value)  # type: ignore[arg-type]
    if not _INT_MIN <= n <= _INT_MAX:
        raise OverflowError("Python int too large to convert to C int")
    return n


def _c_str(name: object, what: str) -> bytes:
    """A name CPython parses as a C string ("s"): a str with no NUL, as UTF-8."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be str, not {type(name).__name__}")
    raw = name.encode("utf-8")
    if b"\0" in raw:
        raise ValueError("embedded null character")
    return raw


def _timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) and not hasattr(type(timeout), "__float__"):
        raise TypeError(f"must be real number, not {type(timeout).__name__}")
    t = float(timeout)  # type: ignore[arg-type]
    if math.isnan(t):
        raise ValueError("Invalid value NaN (not a number)")
    return None if t == math.inf else max(t, 0.0)


def _call(op: int, args: tuple[int, ...], data: bytes = b"", **kw: Any) -> int:
    result, err, _ = scheduler.get().host_call(op, args, data, **kw)
    if result < 0:
        raise OSError(err, os.strerror(err))
    return result


def _me() -> tuple[bytes, int]:
    lt = scheduler.get().current
    return family.member, (lt.ident if lt is not None else 0)


class SemLock:
    """Semaphore/Mutex type (``_multiprocessing.SemLock``), with the host holding the semaphore."""

    SEM_VALUE_MAX = SEM_VALUE_MAX

    __slots__ = ("__weakref__", "_closes", "_count_", "_handle", "_kind", "_maxvalue", "_name", "_owner")
    _handle: int
    _kind: int
    _maxvalue: int
    _name: str | None
    _count_: int
    _owner: tuple[bytes, int] | None
    _closes: bool

    def __init__(self, kind: int, value: int, maxvalue: int, name: str, unlink: int) -> None:
        kind, value, maxvalue = _c_int(kind), _c_int(value), _c_int(maxvalue)
        raw, unlink = _c_str(name, "SemLock() argument 'name'"), _c_int(unlink)  # (all parsed first, as CPython)
        if kind not in (RECURSIVE_MUTEX, SEMAPHORE):
            raise ValueError("unrecognized kind")
        if value < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # as sem_open(3), which takes it unsigned
        handle = _call(Op.SEM_NEW, (value, maxvalue, int(bool(unlink))), raw)
        self._setup(handle, kind, maxvalue, None if unlink else name)

    def _setup(self, handle: int, kind: int, maxvalue: int, name: str | None, *, closes: bool = True) -> None:
        self._closes = closes  # (a SemLock rebuilt from a handle shares it: closing is its maker's)
        self._handle = handle
        self._kind = kind
        self._maxvalue = maxvalue
        self._name = name
        self._count_ = 0
        self._owner = None

    @classmethod
    def _rebuild(cls, handle: int, kind: int, maxvalue: int, name: str | None) -> SemLock:
        """The SemLock another process passed (``multiprocessing`` pickles these four).

        With a name, the semaphore is opened by it (a spawned child); without one, the
        handle is the host's and good as it is (in this process, or a forked child).
        """
        handle, kind, maxvalue = operator.index(handle), _c_int(kind), _c_int(maxvalue)
        if name is not None:
            handle = _call(Op.SEM_OPEN, (maxvalue,), _c_str(name, "_rebuild() argument 4"))
        elif handle < 1:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self = cls.__new__(cls)
        self._setup(handle, kind, maxvalue, name, closes=name is not None)
        return self

    # -- the lock ------------------------------------------------------------------------

    def acquire(self, block: int = True, timeout: object = None) -> bool:
        """Acquire the semaphore/lock; ``False`` if ``block`` is false or ``timeout`` passed first."""
        blocking = _c_int(block)
        if self._kind == RECURSIVE_MUTEX and self._is_mine():
            self._count_ += 1
            return True
        t = _timeout(timeout)
        sched = scheduler.get()
        if not blocking or t == 0:
            got = _call(Op.SEM_ACQUIRE, (self._handle, 0))
        elif sched.sync and sched.current is not None:
            got = self._poll(sched, t)
        else:
            result, err, _ = sched.host_call(Op.SEM_ACQUIRE, (self._handle, 1), wait=True, timeout=t)
            if result < 0 and err != errno.ETIMEDOUT:
                raise OSError(err, os.strerror(err))
            got = result > 0
        if not got:
            return False
        self._count_ += 1
        self._owner = _me()
        return True

    def _poll(self, sched: scheduler.Scheduler, timeout: float | None) -> bool:
        # Sync mode: a host call waits in place, holding up every lthread, and the holder may be
        # one of them.  So try, and sleep in between (this lthread only), as flock does there.
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _POLL_FIRST
        while not _call(Op.SEM_ACQUIRE, (self._handle, 0)):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            sched.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, _POLL_MAX)
        return True

    def release(self) -> None:
        """Release the semaphore/lock."""
        if self._kind == RECURSIVE_MUTEX:
            if not self._is_mine():
                raise AssertionError("attempt to release recursive lock not owned by thread")
            if self._count_ > 1:
                self._count_ -= 1
                return
        result, err, _ = scheduler.get().host_call(Op.SEM_RELEASE, (self._handle,))
        if result < 0:
            if err == errno.EOVERFLOW:
                raise ValueError("semaphore or lock released too many times")
            raise OSError(err, os.strerror(err))
        self._count_ -= 1

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- what multiprocessing.synchronize reads --------------------------------------------

    def _count(self) -> int:
        """The number of this process's acquires minus its releases."""
        return self._count_

    def _is_mine(self) -> bool:
        """Whether this lthread of this process holds it (meaningful for a lock)."""
        return self._count_ > 0 and self._owner == _me()

    def _get_value(self) -> int:
        return _call(Op.SEM_VALUE, (self._handle,))

    def _is_zero(self) -> bool:
        return self._get_value() == 0

    def _after_fork(self) -> None:
        """Re-zero the count in a forked child (multiprocessing calls it there)."""
        self._count_ = 0

    @property
    def handle(self) -> int:
        return self._handle

    @property
    def kind(self) -> int:
        return self._kind

    @property
    def maxvalue(self) -> int:
        return self._maxvalue

    @property
    def name(self) -> str | None:
        return self._name

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle '_multiprocessing.SemLock' object")

    def __del__(self) -> None:
        handle = getattr(self, "_handle", 0)
        if handle and self._closes:
            try:  # (a finalizer must not switch lthreads: the close goes out with the next call)
                scheduler.get().defer(Op.SEM_CLOSE, (handle,))
            except Exception:  # noqa: BLE001 - at shutdown there may be no scheduler left
                pass


SemLock.__module__ = "_multiprocessing"


def sem_unlink(name: str) -> None:
    """Remove a semaphore's name (``_multiprocessing.sem_unlink``)."""
    _call(Op.SEM_UNLINK, (), _c_str(name, "sem_unlink() argument"))


__all__ = ["RECURSIVE_MUTEX", "SEMAPHORE", "SEM_VALUE_MAX", "SemLock", "sem_unlink"]
