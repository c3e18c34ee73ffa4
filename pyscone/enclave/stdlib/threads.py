"""``_thread`` on lthreads: an unmodified threaded app gets user-level threads.

The stdlib's ``threading`` is pure Python over ``_thread``'s few primitives
(start a thread, a lock, an identity, a sentinel lock released when a thread
ends).  We provide those primitives on the scheduler and re-import ``threading``
over them, so ``Thread``, ``Condition``, ``Event``, ``Semaphore``, ``Barrier``,
``Timer``, ``queue.Queue`` and ``concurrent.futures`` all run as lthreads.  The
import system's per-module locks use the same primitives, so two lthreads that
import the same module concurrently wait for each other properly.

Locks hand ownership directly to the next waiter on release (FIFO), so a woken
lthread never finds its lock stolen.
"""

from __future__ import annotations

import sys
import types
from collections import deque
from typing import Any

from pyscone.enclave import scheduler
from pyscone.enclave.scheduler import LThread, Scheduler
from pyscone.enclave.stdlib import interpose

TIMEOUT_MAX = float(2**31)
_main_ident = 1


def _sched() -> Scheduler:
    return scheduler.get()


def get_ident() -> int:
    lt = scheduler.get().current
    return lt.ident if lt is not None else _main_ident


class Lock:
    """A non-reentrant lock whose waiters are parked lthreads."""

    __slots__ = ("__weakref__", "_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[LThread] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._locked:
            self._locked = True
            return True
        if not blocking:
            if timeout != -1:
                raise ValueError("can't specify a timeout for a non-blocking call")
            return False
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        if timeout > TIMEOUT_MAX:
            raise OverflowError("timeout value is too large")
        s = _sched()
        lt = s.current
        if lt is None:
            raise RuntimeError("deadlock: the scheduler itself would block on a lock")
        self._waiters.append(lt)
        timer = None
        if timeout >= 0:

            def expire() -> None:
                try:
                    self._waiters.remove(lt)
                except ValueError:
                    return  # handed the lock in the meantime
                s.wake(lt, False)

            timer = s.call_later(timeout, expire)
        try:
            while True:
                got = s.park()
                if got is True or got is False:  # handed the lock, or timed out
                    return got
                # anything else is a spurious wake-up: keep waiting
        except BaseException:
            if lt in self._waiters:
                self._waiters.remove(lt)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def release(self) -> None:
        if not self._locked:
            raise RuntimeError("release unlocked lock")
        if self._waiters:
            _sched().wake(self._waiters.popleft(), True)  # ownership passes to the waiter
        else:
            self._locked = False

    def locked(self) -> bool:
        return self._locked

    def _at_fork_reinit(self) -> None:
        self._locked = False
        self._waiters.clear()

    acquire_lock = acquire
    release_lock = release
    locked_lock = locked

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<{'locked' if self._locked else 'unlocked'} pyscone lock object at {id(self):#x}>"


class RLock:
    """A reentrant lock; also provides what ``threading.Condition`` uses."""

    __slots__ = ("__weakref__", "_block", "_count", "_owner")

    def __init__(self) -> None:
        self._block = Lock()
        self._owner = 0
        self._count = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = get_ident()
        if self._owner == me:
            self._count += 1
            return True
        if not self._block.acquire(blocking, timeout):
            return False
        self._owner = me
        self._count = 1
        return True

    def release(self) -> None:
        if self._owner != get_ident():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if not self._count:
            self._owner = 0
            self._block.release()

    def _is_owned(self) -> bool:
        return self._owner == get_ident()

    def _recursion_count(self) -> int:
        """How often the calling lthread holds it (CPython's RLock has it; multiprocessing uses it)."""
        return self._count if self._owner == get_ident() else 0

    def _release_save(self) -> tuple[int, int]:
        if not self._count:
            raise RuntimeError("cannot release un-acquired lock")
        state = (self._count, self._owner)
        self._count = 0
        self._owner = 0
        self._block.release()
        return state

    def _acquire_restore(self, state: tuple[int, int]) -> None:
        self._block.acquire()
        self._count, self._owner = state

    def _at_fork_reinit(self) -> None:
        self._block._at_fork_reinit()
        self._owner = 0
        self._count = 0

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<pyscone RLock owner={self._owner} count={self._count} at {id(self):#x}>"


def start_new_thread(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> int:
    if not isinstance(args, tuple):
        raise TypeError("2nd arg must be a tuple")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError("optional 3rd arg must be a dictionary")
    kw = kwargs or {}

    def body() -> None:
        try:
            function(*args, **kw)
        except SystemExit:
            pass
        except BaseException:  # noqa: BLE001 - what _thread does: report, don't propagate
            from pyscone.enclave import redact

            try:
                redact.print_exc(header=f"Exception ignored in thread started by: {function!r}\n")
            except BaseException:  # noqa: BLE001
                pass

    return _sched().spawn(body).ident


def _set_sentinel() -> Lock:
    """A lock released when the calling lthread ends (``Thread.join`` waits on it)."""
    lock = Lock()
    lt = _sched().current
    if lt is not None:

        def released() -> None:
            if lock.locked():
                lock.release()

        lt.on_exit.append(released)
    return lock


def _count() -> int:
    return len(_sched().lthreads)


def stack_size(size: int = 0) -> int:
    if size and size < 32768:
        raise ValueError("size not valid: 32768 bytes minimum")
    return 0


def interrupt_main(signum: int = 2) -> None:
    _sched().request_interrupt(KeyboardInterrupt())


def exit() -> None:  # noqa: A001 - _thread's name
    raise SystemExit


def install() -> types.ModuleType:
    """Swap ``_thread`` for the lthread version and re-import ``threading`` over it."""
    import _thread as real
    import importlib._bootstrap as bootstrap

    mod = types.ModuleType("_thread", "Low-level threading API, on pyscone lthreads.")
    mod.__dict__.update(
        LockType=Lock, RLock=RLock, TIMEOUT_MAX=TIMEOUT_MAX, allocate_lock=Lock, allocate=Lock,
        error=RuntimeError, exit=exit, exit_thread=exit, get_ident=get_ident, get_native_id=get_ident,
        interrupt_main=interrupt_main, stack_size=stack_size, start_new_thread=start_new_thread,
        start_new=start_new_thread, _set_sentinel=_set_sentinel, _count=_count,
    )  # fmt: skip
    # No _excepthook: threading then uses its pure-Python hook, whose tracebacks read
    # source lines through the interposed open (the C one would hit the barrier).
    del real
    sys.modules["_thread"] = mod
    interpose(bootstrap, _thread=mod)
    # Modules that bound the OS-thread primitives at import must be imported afresh.
    for name in ("threading", "_threading_local", "queue", "_dummy_thread"):
        sys.modules.pop(name, None)
    import _threading_local
    import queue
    import threading

    interpose(mod, _local=_threading_local.local)
    interpose(threading, local=_threading_local.local)
    # The C SimpleQueue blocks the OS thread; the pure-Python one blocks an lthread.
    interpose(queue, SimpleQueue=queue._PySimpleQueue)  # type: ignore[attr-defined]
    return mod
