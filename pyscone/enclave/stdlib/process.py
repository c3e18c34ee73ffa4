"""Processes, signals and time.

An enclave cannot create processes (SCONE and Gramine restrict the same).  Rather
than the barrier's bare ``EPERM``, the app gets ``OSError(ENOSYS, "... is not
supported inside a pyscone enclave")``, which it can catch and report.

Signals: CPython runs a Python signal handler between two bytecodes of the main
OS thread, which here may be the hub or any lthread, even half-way through a host
call.  So the OS-level handler is always ours and only queues; the hub runs the
app's handler (as ``signal.getsignal`` reports it) at its next safe point, turns
the default SIGINT handler into a KeyboardInterrupt *in the main lthread*, and
writes the signal number to the wakeup fd, if one is set (so
``loop.add_signal_handler`` works).  As in SCONE, a signal is therefore handled
when the main lthread next waits, not in the middle of a CPU-bound loop.
``time.sleep`` parks only the calling lthread.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from pyscone.enclave import iago, scheduler
from pyscone.enclave.stdlib import interpose

_REFUSED_OS = (
    "forkpty", "vfork", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
    "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn",
    "posix_spawnp", "system", "popen", "sendfile", "setsid", "setpgid", "ptrace", "chroot", "mkfifo", "mknod",
)  # fmt: skip


def _refuser(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise OSError(errno.ENOSYS, f"{what} is not supported inside a pyscone enclave")

    refused.__name__ = what.rpartition(".")[2]
    return refused


def sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    scheduler.get().sleep(seconds)


_app_handlers: dict[int, Any] = {}
_wakeup_fd = -1


#: The runtime's own interest in a signal (SIGCHLD wakes the lthreads waiting for a child),
#: served beside the app's handler, whatever that is.
_watchers: dict[int, list[Callable[[], None]]] = {}


def watch_signal(signum: int, callback: Callable[[], None]) -> None:
    """Run ``callback`` in the hub whenever ``signum`` arrives (for a signal whose default
    action is to do nothing: the app still sees SIG_DFL)."""
    _watchers.setdefault(signum, []).append(callback)
    if _real_getsignal(signum) == signal.SIG_DFL:
        _real_signal(signum, _dispatch)


def _dispatch(signum: int, frame: Any) -> None:
    """The OS-level handler for every caught signal.  It only queues work for the hub:
    running the app's handler here, in the middle of whatever lthread was interrupted,
    could re-enter a host call half-way through."""
    sched = scheduler.get()
    watchers = _watchers.get(signum, ())
    handler = _app_handlers.get(signum, None if watchers else signal.default_int_handler)
    wakeup = _wakeup_fd

    def deliver() -> None:
        for watcher in watchers:
            watcher()
        if handler is None:
            return
        if wakeup >= 0:
            try:
                os.write(wakeup, bytes([signum]))
            except OSError:
                pass
        if handler is signal.default_int_handler:
            raise KeyboardInterrupt
        if callable(handler):
            handler(signum, None)

    sched.queue_signal_handler(deliver)


def _signal(signum: int, handler: Any) -> Any:
    if handler in (signal.SIG_DFL, signal.SIG_IGN):
        old = _app_handlers.pop(signum, None)
        # (SIG_IGN is the kernel's: for SIGCHLD it means children are reaped unasked)
        keep = handler == signal.SIG_DFL and signum in _watchers
        prev = _real_signal(signum, _dispatch if keep else handler)
        if prev is _dispatch:
            prev = signal.SIG_DFL if signum in _watchers else signal.default_int_handler
        return old if old is not None else prev
    if not callable(handler):
        raise TypeError("signal handler must be signal.SIG_IGN, signal.SIG_DFL, or a callable object")
    old = getsignal(signum)
    _real_signal(signum, _dispatch)
    _app_handlers[signum] = handler
    return old


def getsignal(signum: int) -> Any:
    if signum in _app_handlers:
        return _app_handlers[signum]
    current = _real_getsignal(signum)
    if current is _dispatch:
        return signal.SIG_DFL if signum in _watchers else signal.default_int_handler
    return current


def set_wakeup_fd(fd: int, *, warn_on_full_buffer: bool = True) -> int:
    global _wakeup_fd
    if fd != -1:
        from pyscone.enclave.stdlib import dups

        if not dups.is_open(fd):  # a pipe's write end (the self-pipe trick), a socket, or a dup of one
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    old, _wakeup_fd = _wakeup_fd, fd
    return old


# Signals whose default action is to do nothing (signal(7)); the others' stop or end the process.
_IGNORED_BY_DEFAULT = frozenset({signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH, signal.SIGCONT})
_STOPPING = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


def raise_signal(signum: int) -> None:
    """``signal.raise_signal``: the signal, delivered in the enclave (the barrier refuses ``tgkill``).

    A Python handler runs at once when the main lthread raises the signal (CPython runs it
    in the main thread before the next bytecode), else at the main lthread's next wait.  A
    default action that ends the process ends the enclave (exit status 128 + signum, as a
    shell reports a death by signal; no atexit, no flush, as for a real signal).
    """
    signum = int(signum)
    if not 0 < signum < signal.NSIG:
        raise ValueError("signal number out of range")
    handler = getsignal(signum)
    if callable(handler):
        sched = scheduler.get()
        main = sched.main
        if main is None or sched.current is not main:
            _dispatch(signum, None)
            return
        if _wakeup_fd >= 0:
            try:
                os.write(_wakeup_fd, bytes([signum]))
            except OSError:
                pass
        handler(signum, None)  # default_int_handler raises KeyboardInterrupt here, as natively
        return
    if handler == signal.SIG_IGN or signum in _IGNORED_BY_DEFAULT:
        return
    if signum in _STOPPING:
        raise OSError(errno.ENOSYS, "stopping the process is not supported inside a pyscone enclave")
    iago.exit_now(128 + signum)


_real_signal = signal.signal
_real_getsignal = signal.getsignal


def install(cpu_count: int) -> None:
    for name in _REFUSED_OS:
        if hasattr(os, name):
            interpose(os, **{name: _refuser(f"os.{name}")})
    interpose(os, cpu_count=lambda: cpu_count)
    try:
        _multiprocessing: Any = importlib.import_module("_multiprocessing")
    except ImportError:
        pass
    else:  # its semaphores are POSIX named semaphores (shm_open): here the host holds them
        from pyscone.enclave.stdlib import semlock

        interpose(_multiprocessing, SemLock=semlock.SemLock, sem_unlink=semlock.sem_unlink)
        synchronize = sys.modules.get("multiprocessing.synchronize")
        if synchronize is not None:  # imported before us (its own SemLock wraps ours by attribute)
            interpose(synchronize, sem_unlink=semlock.sem_unlink)
    try:  # multiprocessing.shared_memory: a file mapped in, which the barrier refuses (say so, not EPERM)
        _posixshmem: Any = importlib.import_module("_posixshmem")
    except ImportError:
        pass
    else:
        interpose(_posixshmem, shm_open=_refuser("shared memory (shm_open)"), shm_unlink=_refuser("shm_unlink"))
    interpose(time, sleep=sleep)
    _app_handlers[signal.SIGINT] = signal.default_int_handler
    _real_signal(signal.SIGINT, _dispatch)
    interpose(signal, signal=_signal, getsignal=getsignal, set_wakeup_fd=set_wakeup_fd, raise_signal=raise_signal)
