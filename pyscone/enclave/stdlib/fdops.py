"""fd-level calls: ``fcntl``, ``flock``/``lockf``, inheritable and blocking flags.

Theory of operation
-------------------
Flags are the enclave's business.  ``FD_CLOEXEC`` (``os.set_inheritable``) means
nothing in an enclave that cannot exec, and ``O_NONBLOCK`` (``os.set_blocking``)
only decides how the enclave waits for a host call (host sockets are always
non-blocking on the host side): both are recorded in ``iago.fds`` and answered
from there, without a host call.  ``F_GETFL`` is answered from what the enclave
asked for when it opened the fd, so the host cannot lie about it.

Locks on host files go to the host (``Op.LOCK``), because other processes on the
host may share them.  The host never waits for a lock: a lock held elsewhere is
``EAGAIN`` at once, and a blocking request (``LOCK_EX`` without ``LOCK_NB``,
``F_SETLKW``) retries in the enclave with a growing sleep that parks only the
calling lthread, so an app waiting on a lock never holds an S-thread.  (Linux's
deadlock detection for ``F_SETLKW`` is lost; a lying host can only refuse a lock
or grant one it does not hold, which is the unprotected-I/O trust "outcome".)

Locks on the FS shield's files (virtual fds, protected or memory regions) are the
enclave's while it is one process: their host files are sealed, so no other process can
use them.  POSIX record locks (``lockf``, ``F_SETLK``) never conflict within one process,
so they are granted at once, exactly as Linux would.  A protected file's ``flock`` is the
host's, on a host fd of the open's own (``FsShield.lock_target``): one open file
description per open, as in Linux, so two opens conflict, and so do the processes of a
family; a memory file's (or directory's) flocks are kept in a table here
(:class:`_FlockTable`).  Once the enclave has forked, a protected file's POSIX locks are
the host's too (its host file is then shared by the family).  A socket or the console has
no one to conflict with: locks on them are granted.

A dup (``dups``) shares what Linux's open file description holds: ``O_NONBLOCK``
and the status flags, and locks, are the handle's; ``FD_CLOEXEC`` is the number's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Any, NoReturn

from pyscone import abi
from pyscone.abi import Op
from pyscone.enclave import iago, scheduler
from pyscone.enclave.stdlib import dups, files, interpose, pipes

_fds = iago.fds
# struct flock on Linux x86-64: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t).
_FLOCK = struct.Struct("hhqqi")
# The F_SETFL bits Linux can change; O_NONBLOCK is the only one the enclave honours.
_SETTABLE = os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_DIRECT", 0) | getattr(os, "O_NOATIME", 0)
_SETTABLE |= getattr(os, "O_ASYNC", 0o20000)
_O_LARGEFILE = 0o100000  # what Linux adds to F_GETFL of every file opened on x86-64
_F_OFD_GETLK, _F_OFD_SETLK, _F_OFD_SETLKW = 36, 37, 38
_RETRY_FIRST, _RETRY_MAX = 0.001, 0.05


def _refuse(what: str) -> NoReturn:
    raise OSError(errno.ENOSYS, f"{what} is not supported inside a pyscone enclave")


def _fd(obj: Any) -> int:
    fd = obj if isinstance(obj, int) else obj.fileno()
    if not isinstance(fd, int):
        raise TypeError("argument must be an int, or have a fileno() method.")
    if fd < 0:
        raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
    return fd


def _kind(fd: int) -> str:
    """What the handle ``fd`` names is (EBADF if closed): a host kind, ``"vfd"`` or ``"pipe"``."""
    fd = dups.resolve(fd)
    if pipes.is_local(fd):
        pipes.fstat(fd)
        return "pipe"
    sh = files._vfd(fd)
    if sh is not None:
        if fd not in sh.opens and fd not in sh.dir_opens:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return "vfd"
    return _fds.kind(fd)


# -- inheritable and blocking ------------------------------------------------------------------


def get_inheritable(fd: int) -> bool:
    _kind(fd)
    return fd in _fds.inheritable


def set_inheritable(fd: int, inheritable: bool) -> None:
    _kind(fd)
    (_fds.inheritable.add if inheritable else _fds.inheritable.discard)(fd)


def get_blocking(fd: int) -> bool:
    _kind(fd)
    return dups.resolve(fd) not in _fds.nonblocking


def set_blocking(fd: int, blocking: bool) -> None:
    _kind(fd)
    (_fds.nonblocking.discard if blocking else _fds.nonblocking.add)(dups.resolve(fd))


def _getfl(fd: int) -> int:
    kind = _kind(fd)
    fd = dups.resolve(fd)
    nb = os.O_NONBLOCK if fd in _fds.nonblocking else 0
    if kind == "vfd":
        sh = files._vfd(fd)
        assert sh is not None
        o = sh.opens.get(fd)
        if o is None:  # a directory
            return os.O_RDONLY | os.O_DIRECTORY | _O_LARGEFILE | nb
        acc = os.O_RDWR if o.readable and o.writable else os.O_WRONLY if o.writable else os.O_RDONLY
        return acc | (os.O_APPEND if o.append else 0) | _O_LARGEFILE | nb
    if kind == iago.FdTable.FILE:
        keep = os.O_ACCMODE | os.O_APPEND | os.O_DIRECTORY | os.O_SYNC | os.O_DSYNC
        keep |= getattr(os, "O_DIRECT", 0) | getattr(os, "O_NOATIME", 0) | getattr(os, "O_PATH", 0)
        return (_fds.flags.get(fd, 0) & keep) | _O_LARGEFILE | nb
    if kind == "pipe":
        return pipes.status_flags(fd) | nb
    if kind == iago.FdTable.SOCKET:
        return os.O_RDWR | nb
    return (os.O_RDONLY if fd == 0 else os.O_WRONLY) | nb  # the console


def _setfl(fd: int, flags: int) -> None:
    changed = (flags ^ _getfl(fd)) & _SETTABLE
    if changed & ~os.O_NONBLOCK:
        _refuse("fcntl F_SETFL of flags other than O_NONBLOCK")
    set_blocking(fd, not flags & os.O_NONBLOCK)


# -- locks -------------------------------------------------------------------------------------


class _FlockTable:
    """``flock`` locks on the FS shield's files: per open file, shared or exclusive."""

    def __init__(self) -> None:
        self.held: dict[object, dict[int, int]] = {}  # file identity -> {vfd: LOCK_SH or LOCK_EX}

    def try_lock(self, key: object, vfd: int, how: int) -> bool:
        holders = self.held.setdefault(key, {})
        if how == fcntl.LOCK_UN:
            holders.pop(vfd, None)
        else:
            others = [m for v, m in holders.items() if v != vfd]
            if fcntl.LOCK_EX in others or (how == fcntl.LOCK_EX and others):
                return False
            holders[vfd] = how
        if not holders:
            del self.held[key]
        return True

    def release(self, vfd: int) -> None:
        """Closing an open file drops its lock."""
        for key in [k for k, h in self.held.items() if vfd in h]:
            self.try_lock(key, vfd, fcntl.LOCK_UN)


_flocks = _FlockTable()


def _identity(fd: int) -> object:
    """The file a virtual fd has open (what two opens of one file share)."""
    sh = files._vfd(fd)
    assert sh is not None
    o = sh.opens.get(fd)
    return o.node if o is not None else ("dir", sh.dir_opens[fd].path)


def posix_locks_local(fd: int) -> bool:
    """Whether a POSIX record lock on ``fd`` is granted at once, with no one to ask: on
    everything but a host file (an FS-shield file, whose host file only this enclave opens; a
    socket; the console), no other process can hold one, and within one process POSIX locks
    never conflict.  (The libc layer's shim grants them itself on the fds clib marks so.)
    A protected file opened once the enclave has forked is shared with the family's other
    processes: its POSIX locks are the host's (``FsShield.lock_target``)."""
    kind = _kind(fd)
    if kind == "vfd":
        sh = files._vfd(dups.resolve(fd))
        return sh is None or sh.lock_target(dups.resolve(fd), abi.LOCK_POSIX, fcntl.F_RDLCK) is None
    return kind != iago.FdTable.FILE


def _lock(fd: int, family: int, kind: int, start: int, length: int, whence: int, wait: bool) -> None:
    """One lock request; ``wait``: until it is granted (retried here, never on the host)."""
    where = _kind(fd)
    fd = dups.resolve(fd)  # a lock belongs to the open file, which dups share
    # A protected file's flock (and in a process family its POSIX locks) is the host's.
    sh = files._vfd(fd) if where == "vfd" else None
    target = sh.lock_target(fd, family, kind) if sh is not None else None
    local = where != iago.FdTable.FILE and target is None  # posix_locks_local(fd)
    if local and (family == abi.LOCK_POSIX or where != "vfd"):
        return  # no other process can hold a lock here; only a vfd's flocks are kept (_flocks)
    delay = _RETRY_FIRST
    while True:
        if local:
            if _flocks.try_lock(_identity(fd), fd, kind):
                return
            err = errno.EWOULDBLOCK
        else:
            lock_fd = fd if target is None else target
            result, err, _ = scheduler.get().host_call(Op.LOCK, (lock_fd, family, kind, start, length, whence))
            if result >= 0:
                if sh is not None:
                    sh.locked(fd)
                return
            if err not in (errno.EAGAIN, errno.EACCES) or not wait:
                raise OSError(err, os.strerror(err))
        if not wait:
            raise OSError(err, os.strerror(err))
        scheduler.get().sleep(delay)
        delay = min(delay * 2, _RETRY_MAX)


def flock(fd: Any, operation: int) -> None:
    """``fcntl.flock``: same arguments, same errors."""
    f = _fd(fd)
    how = operation & ~fcntl.LOCK_NB
    if how not in (fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_UN):
        _kind(f)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    _lock(f, abi.LOCK_FLOCK, how, 0, 0, 0, wait=not operation & fcntl.LOCK_NB)


_LOCKF_TYPES = {fcntl.LOCK_UN: fcntl.F_UNLCK, fcntl.LOCK_SH: fcntl.F_RDLCK, fcntl.LOCK_EX: fcntl.F_WRLCK}


def lockf(fd: Any, cmd: int, len: int = 0, start: int = 0, whence: int = 0) -> Any:  # noqa: A002 - the stdlib's name
    """``fcntl.lockf``: a POSIX record lock (as CPython's, built on ``F_SETLK``/``F_SETLKW``)."""
    f = _fd(fd)
    kind = _LOCKF_TYPES.get(cmd & ~fcntl.LOCK_NB)
    if kind is None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    _lock(f, abi.LOCK_POSIX, kind, start, len, whence, wait=not cmd & fcntl.LOCK_NB)
    return None


def os_lockf(fd: int, command: int, length: int) -> None:
    """``os.lockf`` (POSIX ``lockf(3)``: F_LOCK, F_TLOCK, F_ULOCK; F_TEST is refused)."""
    if command == os.F_TEST:
        _kind(fd)
        _refuse("os.lockf F_TEST")
    kinds = {os.F_LOCK: fcntl.F_WRLCK, os.F_TLOCK: fcntl.F_WRLCK, os.F_ULOCK: fcntl.F_UNLCK}
    if command not in kinds:
        _kind(fd)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    _lock(fd, abi.LOCK_POSIX, kinds[command], 0, length, os.SEEK_CUR, wait=command == os.F_LOCK)


def _record_lock(fd: int, cmd: int, arg: Any) -> bytes:
    if not isinstance(arg, bytes | bytearray) or len(arg) != _FLOCK.size:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    l_type, whence, start, length, _pid = _FLOCK.unpack(arg)
    if l_type not in (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK) or whence not in (0, 1, 2):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    wait = cmd in (fcntl.F_SETLKW, _F_OFD_SETLKW)
    _lock(fd, abi.LOCK_POSIX, l_type, start, length, whence, wait)
    return bytes(arg)


# -- fcntl -------------------------------------------------------------------------------------

_DUPS = {fcntl.F_DUPFD: "F_DUPFD", getattr(fcntl, "F_DUPFD_CLOEXEC", 1030): "F_DUPFD_CLOEXEC"}


# Command names for refusals; where two share a number (F_GETLK, F_GETLK64) the shorter wins.
_COMMANDS = {
    v: k for k, v in sorted(vars(fcntl).items(), key=lambda kv: -len(kv[0])) if k.startswith("F_") and type(v) is int
}


def fcntl_(fd: Any, cmd: int, arg: Any = 0) -> Any:
    """``fcntl.fcntl``: the descriptor flags, the status flags and record locks.

    Anything else (leases, signals, pipe sizes, ``F_GETLK``) is refused with ENOSYS.
    """
    f = _fd(fd)
    _kind(f)
    if cmd == fcntl.F_GETFD:
        return 0 if f in _fds.inheritable else fcntl.FD_CLOEXEC
    if cmd == fcntl.F_SETFD:
        set_inheritable(f, not int(arg) & fcntl.FD_CLOEXEC)
        return 0
    if cmd == fcntl.F_GETFL:
        return _getfl(f)
    if cmd == fcntl.F_SETFL:
        _setfl(f, int(arg))
        return 0
    if cmd in (fcntl.F_SETLK, fcntl.F_SETLKW, _F_OFD_SETLK, _F_OFD_SETLKW):
        return _record_lock(f, cmd, arg)
    if cmd in _DUPS:
        lowest = int(arg)
        if not 0 <= lowest <= 2**31 - 1:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        # The lowest free number >= arg that dups may give (see its theory of operation).
        return dups.dup(f, lowest, inheritable=cmd == fcntl.F_DUPFD)
    _refuse(f"fcntl {_COMMANDS.get(cmd, f'command {cmd}')}")


def ioctl(fd: Any, request: int, arg: Any = 0, mutate_flag: bool = True) -> NoReturn:
    _fd(fd)
    _refuse("fcntl.ioctl")


def install() -> None:
    """Replace ``fcntl``'s calls and the fd-flag functions of ``os``."""
    interpose(fcntl, fcntl=fcntl_, flock=flock, lockf=lockf, ioctl=ioctl)
    interpose(
        os, get_inheritable=get_inheritable, set_inheritable=set_inheritable, get_blocking=get_blocking,
        set_blocking=set_blocking, lockf=os_lockf,
    )  # fmt: skip
    files.on_close.append(_flocks.release)
    pipes.install()
    dups.install()
