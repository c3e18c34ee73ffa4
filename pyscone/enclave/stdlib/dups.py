"""``os.dup``/``dup2``, ``fcntl(F_DUPFD[_CLOEXEC])`` and ``socket.dup``: more numbers for one open file.

Theory of operation
-------------------
A dup never reaches the host.  Every fd kind the enclave has (a host file or
socket, the console's 0-2, an FS-shield virtual fd, a pipe end in enclave
memory) is served by a subsystem that knows it by one number, its *handle*: the
host's fd, the shield's vfd, the pipe's local fd.  The app's numbers are names
for handles.  Almost always a number names the handle of the same value (no
table entry, no cost); a dup adds a name, kept here:

* ``_alias``: number -> handle, for each name that differs from its handle;
* ``_refs``: handle -> how many numbers name it, for each handle that was ever
  dup'ed (a handle missing here is named by its own number alone);
* ``_hidden``: handles whose own number the app closed or reused while other
  numbers still name them (that number then gives EBADF, or means its alias).

Every call site that takes an fd (files, sockets, select/poll/epoll, fdops,
fsmeta) asks :func:`resolve` for the handle first, so a dup shares everything
Linux's open file description holds: the offset (a vfd's or a host file's
position is the handle's), ``O_APPEND``, ``O_NONBLOCK`` (``iago.fds.nonblocking``
is keyed by handle) and ``flock`` locks.  ``FD_CLOEXEC`` stays per number
(``iago.fds.inheritable`` is keyed by number).  A handle is closed (on the host,
in the shield, in the pipe) when its last name closes.

Why aliases and no host ``dup`` opcode: the host gains no power and learns
nothing of the app's fd games, no new answer needs an Iago check, and vfds and
pipes (which the host never sees) work the same way.

Which numbers a dup may take.  The host picks its fds' numbers (``0..MAX_FD``),
the shield and the pipes count theirs upwards.  A name must never be a number
one of them could hand out later, or two open files would share it.  So a new
name is

* one of 0, 1, 2 when it is free: the enclave never closes the host's console
  fds, so the host can never return these (``iago`` refuses them);
* else a number from ``ALIAS_BASE`` up, which nothing else hands out.

``dup`` and ``F_DUPFD`` take the lowest free such number at or above their
argument (Linux takes the lowest free number of all; here the numbers between 3
and ``ALIAS_BASE`` belong to the host, the shield and the pipes).  ``dup2`` onto
0-2, onto an alias number, or onto a vfd or pipe number (open, or closed: their
counters never give one out twice) works as in Linux, closing what was there
after the new name is in place, so no other lthread sees the number closed.
``dup2`` onto the number of an open host fd other than 0-2 is refused
(``ENOSYS``): once that host fd closed, the host could hand the number out again.

C callers.  numpy's ``tofile``/``fromfile`` call ``os.dup`` from C, then run C
stdio on the new fd (``fdopen``, ``fwrite``).  The libc layer covers that (its
``fdopen`` builds the ``FILE`` over the enclave fd, stdlib/clib.py), so such a dup
is an ordinary dup.  Without the layer (the shim not preloaded) the stdio would
fail at the barrier and numpy would blame a "wrong debug/release runtime"; so
there an ``os.dup`` whose calling Python function never mentions ``dup`` (the call
came from C code) is refused with one clear ``ENOSYS``.  This is a heuristic on
the caller's code object: a name, local or string constant with the word "dup"
(``dup``, ``os_dup``, ``_dup``; not ``dup2``).  Python code that calls ``os.dup``
through a reference named otherwise is wrongly refused, which is loud; a
function that names ``dup`` and also calls numpy's ``tofile`` gets numpy's own
error, as before.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from typing import NoReturn

from pyscone.abi import MAX_FD
from pyscone.enclave import iago
from pyscone.enclave.stdlib import pipes

ALIAS_BASE = pipes.ALIAS_BASE
_FD_LIMIT = (1 << 31) - 1  # a C int
_CONSOLE = (0, 1, 2)

_WORD = re.compile(r"[^0-9a-z]+")
_fds = iago.fds
_alias: dict[int, int] = {}
_refs: dict[int, int] = {}
_hidden: set[int] = set()


def _ebadf() -> NoReturn:
    raise OSError(errno.EBADF, os.strerror(errno.EBADF))


def resolve(fd: int) -> int:
    """The handle ``fd`` names (``fd`` itself unless it was dup'ed onto); EBADF for a closed name.

    Whether the handle is open is its subsystem's to say (each call site checks, as before)."""
    if not _alias and not _hidden:
        return fd
    h = _alias.get(fd)
    if h is not None:
        return h
    if fd in _hidden:
        _ebadf()
    return fd


def active() -> bool:
    """Whether any number names another handle (call sites may skip translating otherwise)."""
    return bool(_alias or _hidden)


def _check_handle(h: int) -> None:
    """EBADF unless handle ``h`` is open."""
    from pyscone.enclave.stdlib import files

    if pipes.is_local(h):
        pipes.fstat(h)
        return
    sh = files._vfd(h)
    if sh is not None:
        if h not in sh.opens and h not in sh.dir_opens:
            _ebadf()
        return
    _fds.kind(h)


def is_open(fd: int) -> bool:
    try:
        _check_handle(resolve(fd))
    except OSError:
        return False
    return True


def _free(n: int) -> bool:
    """Whether ``n`` (0-2 or an alias number) names nothing now."""
    if n in _alias:
        return False
    if n >= ALIAS_BASE:
        return True
    return n in _hidden or n not in _fds.kinds


def _lowest_free(start: int) -> int:
    for n in range(start, 3):
        if _free(n):
            return n
    n = max(start, ALIAS_BASE)
    while n in _alias:  # linear in the live aliases, which are few
        n += 1
    if n > _FD_LIMIT:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    return n


def _reusable(n: int) -> bool:
    """Whether ``n`` may become a name: no subsystem can hand it out later (see the module doc)."""
    from pyscone.enclave.stdlib import files

    if n in _CONSOLE or ALIAS_BASE <= n <= _FD_LIMIT:
        return True
    if n < MAX_FD:
        return False
    if pipes.is_local(n):
        return n < pipes.next_fd()
    sh = files._shield
    return sh is not None and n < sh.next_vfd


def _name(n: int, h: int) -> None:
    """Make the free number ``n`` a name of the open handle ``h``."""
    count = _refs.get(h)
    if count is None:
        count = 0 if h in _alias or h in _hidden else 1  # its own number, if that still names it
    if n == h:
        _hidden.discard(n)
    else:
        _alias[n] = h
    _refs[h] = count + 1


def unname(n: int) -> int | None:
    """Drop the name ``n``: the handle to close now that nothing names it, or ``None``.

    Raises EBADF for a name the app already closed.  (Whether a handle returned here is
    open is its subsystem's to check, as for a number that was never dup'ed.)"""
    h = _alias.pop(n, None)
    if h is None:
        if n in _hidden:
            _ebadf()
        if n not in _refs:
            return n  # named by itself alone: the common case
        h = n
        _hidden.add(n)
    _fds.inheritable.discard(n)
    left = _refs[h] - 1
    if left == 0:
        del _refs[h]
        _hidden.discard(h)
        return h
    if left == 1 and h not in _hidden and h not in _alias:
        del _refs[h]  # back to a handle named by its own number alone
    else:
        _refs[h] = left
    return None


def close_handle(h: int, quiet: bool = False) -> None:
    """Close handle ``h`` in its subsystem, now that no number names it.  Its own number may
    already be another handle's name: that name keeps its ``FD_CLOEXEC`` flag."""
    from pyscone.enclave.stdlib import files

    keep = h in _alias and h in _fds.inheritable
    try:
        files.close_handle(h)
    except OSError:
        if not quiet:
            raise
    finally:
        if keep:
            _fds.inheritable.add(h)


def dup(fd: int, lowest: int = 0, inheritable: bool = False) -> int:
    """A new number for what ``fd`` names: the lowest free one at or above ``lowest``."""
    if fd < 0:
        _ebadf()
    h = resolve(fd)
    _check_handle(h)
    n = _lowest_free(lowest)
    _name(n, h)
    (_fds.inheritable.add if inheritable else _fds.inheritable.discard)(n)
    return n


def dup2(fd: int, fd2: int, inheritable: bool = True) -> int:
    """Make ``fd2`` name what ``fd`` names, closing what ``fd2`` named (as ``dup2``/``dup3``)."""
    if fd < 0 or fd2 < 0:
        _ebadf()
    h = resolve(fd)
    _check_handle(h)
    if fd2 == fd:
        return fd2
    if fd2 > _FD_LIMIT:
        _ebadf()
    if not _reusable(fd2):
        if fd2 >= MAX_FD:  # a vfd or pipe number not given out yet: as a number beyond the fd limit
            _ebadf()
        raise OSError(
            errno.ENOSYS, "os.dup2 onto a host fd's number (other than 0-2) is not supported inside a pyscone enclave"
        )
    old = resolve(fd2) if is_open(fd2) else None
    if old == h:  # fd2 already names the same open file
        if inheritable:
            _fds.inheritable.add(fd2)
        else:
            _fds.inheritable.discard(fd2)
        return fd2
    # The new name first, then the close of what was there: another lthread (the close may
    # wait for the host) never finds fd2 closed.
    closing = unname(fd2) if old is not None else None
    _name(fd2, h)
    if closing is not None:
        close_handle(closing, quiet=True)  # Linux's dup2 ignores what the implicit close reports
    if inheritable:
        _fds.inheritable.add(fd2)
    else:
        _fds.inheritable.discard(fd2)
    return fd2


def _called_from_c() -> bool:
    """Whether the Python function below this ``os.dup`` never names ``dup`` (see the module doc)."""
    try:
        code = sys._getframe(2).f_code
    except ValueError:
        return True
    words = (*code.co_names, *code.co_varnames, *(c for c in code.co_consts if isinstance(c, str)))
    return not any("dup" in _WORD.split(w.lower()) for w in words)  # os_dup, _dup, "dup"; not dup2


def os_dup(fd: int) -> int:
    """``os.dup``: a new, non-inheritable number for the same open file."""
    from pyscone.enclave.stdlib import clib  # (lazy: clib imports the fd layers)

    if not clib.active() and _called_from_c():
        raise OSError(
            errno.ENOSYS,
            "os.dup from C code (C-library I/O on the new fd, as numpy's tofile/fromfile do) "
            "is not supported inside a pyscone enclave",
        )
    return dup(fd)


def os_dup2(fd: int, fd2: int, inheritable: bool = True) -> int:
    """``os.dup2`` (``dup3`` with ``O_CLOEXEC`` when ``inheritable`` is false)."""
    return dup2(fd, fd2, inheritable)


def socket_dup(fd: int) -> int:
    """``socket.dup``: as ``os.dup`` (CPython's is too, on Linux)."""
    return dup(fd)


def install() -> None:
    import socket

    from pyscone.enclave.stdlib import interpose

    interpose(os, dup=os_dup, dup2=os_dup2)
    interpose(socket, dup=socket_dup)
