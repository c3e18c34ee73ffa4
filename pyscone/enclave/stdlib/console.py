"""``sys.stdin``/``sys.stdout``/``sys.stderr`` as host calls on the host's console.

The console's raw objects write to and read from the host's fds 0-2 through the
system-call interface, under the stdlib's buffered and text layers, with the
buffering plain Python uses: stdout line-buffered on a terminal and
block-buffered otherwise, stderr always line-buffered.  The console *shield*
(``enclave/shields/console.py``), when on, takes every read and write beneath this
layer and turns them into records.  After the app
``dup2``-s a file, a pipe or a socket onto 0-2, ``print`` and ``input`` follow it,
as they do in python, until it puts the console back.  ``os._exit`` sends what the
shield has queued, and its end records, before the process ends.
"""

from __future__ import annotations

import io
import operator
import os
import posix
import sys
from typing import Any, NoReturn

from pyscone.abi import Op
from pyscone.enclave import scheduler
from pyscone.enclave.shields import console as shield
from pyscone.enclave.stdlib import dups, files, interpose


class ConsoleIO(io.RawIOBase):
    def __init__(self, fd: int, slot_data: int) -> None:
        self._fd = fd
        self._slot_data = slot_data
        self._tty: bool | None = None

    def fileno(self) -> int:
        return self._fd

    def _redirected(self) -> bool:
        """Whether the app ``dup2``-ed something else onto this fd (then ``print`` follows it)."""
        return dups.active() and dups.resolve(self._fd) != self._fd

    def readable(self) -> bool:
        return self._fd == 0

    def writable(self) -> bool:
        return self._fd != 0

    def isatty(self) -> bool:
        if self._redirected():
            return files.isatty(self._fd)
        if self._tty is None:
            r, _, v = scheduler.get().host_call(Op.ISATTY, (self._fd,))
            self._tty = bool(v) if r >= 0 else False
        return self._tty

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._redirected():
            data = files.read(self._fd, len(view))
            view[: len(data)] = data
            return len(data)
        if (sh := shield.active()) is not None:
            data = sh.read(len(view))
            view[: len(data)] = data
            return len(data)
        r, err, data = scheduler.get().host_call(Op.READ, (0, min(len(view), self._slot_data)), wait=True)
        if r < 0:
            raise OSError(err, "console read failed")
        view[: len(data)] = data
        return len(data)

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")[: self._slot_data]
        if self._redirected():
            return files.write(self._fd, view)
        if (sh := shield.active()) is not None:
            return sh.write(self._fd, view)
        r, err, _ = scheduler.get().host_call(Op.WRITE, (self._fd,), bytes(view), wait=True)
        if r < 0:
            raise OSError(err, "console write failed")
        return r


def install(slot_data: int, stdout_tty: bool) -> None:
    def text(fd: int, line: bool, errors: str) -> io.TextIOWrapper:
        raw = ConsoleIO(fd, slot_data)
        buf: Any = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        return io.TextIOWrapper(buf, "utf-8", errors, None, line_buffering=line, write_through=fd == 2)

    stdin, stdout, stderr = text(0, False, "strict"), text(1, stdout_tty, "strict"), text(2, True, "backslashreplace")
    interpose(sys, stdin=stdin, stdout=stdout, stderr=stderr, __stdin__=stdin, __stdout__=stdout, __stderr__=stderr)
    interpose(os, _exit=_exit)
    interpose(posix, _exit=_exit)


_real_exit = os._exit


def _exit(status: int, /) -> NoReturn:
    """``os._exit`` of the app: with the console shield on, what it wrote reaches the host first.

    Natively ``os._exit`` drops what python buffers (``sys.stdout``'s buffer: so do we),
    but what the app *wrote* is in the kernel's hands and survives it.  Here the console
    shield's queue is that: it goes to the host, then the end records with the status
    (multiprocessing's and gunicorn's children end this way).  The runtime's own exits
    (a fail-stop, a death by signal, a forked child whose parent is gone) use ``iago.exit_now``
    and send nothing: after a host violation nothing may talk to the host, and a death is no
    clean exit.
    """
    code = operator.index(status)
    shield.exit_now(code & 0xFF)
    _real_exit(code)
