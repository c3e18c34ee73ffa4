"""The console shield: the app's stdout and stderr as encrypted records, its stdin from the owner's.

Every path by which bytes reach the host's fds 0-2 comes here while the shield is on:
``sys.stdout``/``sys.stderr`` (and so ``print`` and the runtime's own ``pyscone:`` lines)
through :class:`~pyscone.enclave.stdlib.console.ConsoleIO`, and ``os.write``/``os.read``
on a number that names the console (0-2 or a dup of them) through ``stdlib/files.py``.
C stdio never reaches the console (the libc shim refuses fds 0-2), so it cannot write
around the shield.  One write is one record (several if larger than a record's bound);
the record format is :mod:`pyscone.protect.console`.

Order.  Records carry a global sequence number, so they must reach the host in the order
they were numbered, even when two lthreads print at once (each parks in its host call) or
a signal handler prints while a write is in flight.  So a write is numbered and queued in
one step, and whichever caller finds no one writing writes the queue out, in order, in as
few host calls as fit; a caller that finds a writer at work leaves its records to it.

stdin.  With the shield on, what the host sends on fd 0 must be the owner's records
(``pyscone console --encode-input``); their plaintext is what ``input()`` and
``os.read(0)`` see.  A bad record is ``EIO`` for the app and a line on stderr (itself a
record), and every later read fails too: never a wrong byte.
"""

from __future__ import annotations

import errno
import sys
from collections import deque
from typing import TYPE_CHECKING

from pyscone.abi import Op
from pyscone.enclave import scheduler

if TYPE_CHECKING:
    from pyscone.protect.console import Encoder, InputReader, Stream

_shield: ConsoleShield | None = None


class ConsoleShield:
    """The encoder of one run, the queue of its lines, and the stdin reader."""

    def __init__(self, key: bytes, run: bytes, slot_data: int) -> None:
        # (Imported here: the record format's crypto is loaded at boot only when a shield may start.)
        from pyscone.protect import console as fmt

        self._enc: Encoder = fmt.Encoder(key, run, max_payload=fmt.payload_for_line(slot_data))
        self._input: InputReader = fmt.InputReader(key, slot_data * 2)
        self._streams: dict[int, Stream] = {1: fmt.Stream.STDOUT, 2: fmt.Stream.STDERR}
        self._bad_input = fmt.ConsoleError
        self._said = False
        self._slot = slot_data
        self._queue: deque[tuple[int, bytes]] = deque()
        self._writing = False
        self._pending = b""
        self.run = run

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """Seal one write to console fd 1 or 2; returns its length (all of it is taken).

        Raises:
            OSError: the host failed a write (the app sees it, as it would a full disk).
        """
        if fd not in (1, 2):
            raise OSError(errno.EBADF, "the console's stdin is not writable with the console shield on")
        n = len(memoryview(data).cast("B"))
        if n:
            self._submit(fd, b"".join(self._enc.write(self._streams[fd], data)))
        return n

    def _submit(self, fd: int, lines: bytes) -> None:
        self._queue.append((fd, lines))
        if self._writing:
            return  # the writer at work takes it, in order
        self._writing = True
        try:
            while self._queue:
                fd, chunk = self._queue.popleft()
                parts = [chunk]
                size = len(chunk)
                while self._queue and self._queue[0][0] == fd and size + len(self._queue[0][1]) <= self._slot:
                    size += len(self._queue[0][1])
                    parts.append(self._queue.popleft()[1])
                self._put(fd, b"".join(parts) if len(parts) > 1 else chunk)
        finally:
            self._writing = False

    def _put(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        sched = scheduler.get()
        while view:
            r, err, _ = sched.host_call(Op.WRITE, (fd,), view[: self._slot], wait=True)
            if r < 0:
                if err == errno.EINTR:
                    continue
                raise OSError(err, "console write failed")
            if r == 0:
                raise OSError(errno.EIO, "the host wrote nothing to the console")
            view = view[r:]

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the owner's input (``b""`` at its end).

        Raises:
            OSError: ``EIO`` for a bad input record (said once on stderr), or the host's error.
        """
        if n <= 0:
            return b""
        sched = scheduler.get()
        while not self._pending:
            if self._input.ended:
                return b""
            r, err, data = sched.host_call(Op.READ, (0, self._slot), wait=True)
            try:
                if r < 0:
                    if err == errno.EINTR:
                        continue
                    raise OSError(err, "console read failed")
                if not data:
                    self._input.eof()
                    return b""
                self._pending = self._input.feed(bytes(data))
            except self._bad_input as e:
                self._refuse_input(str(e))
        out, self._pending = self._pending[:n], self._pending[n:]
        return out

    def _refuse_input(self, why: str) -> None:
        if not self._said:
            self._said = True
            try:
                self.write(2, f"pyscone: console shield: refused input: {why}\n".encode())
            except OSError:
                pass
        raise OSError(errno.EIO, f"console shield: {why}") from None

    def end(self, status: int) -> None:
        """Write the end records (a clean exit, with its status); nothing is written after them."""
        if self._enc.ended:
            return
        out, err = self._enc.end(status)  # stdout's, then stderr's
        self._submit(1, out)
        self._submit(2, err)


def active() -> ConsoleShield | None:
    """The shield, if on."""
    return _shield


def turn_on(key: bytes, run: bytes, slot_data: int) -> ConsoleShield:
    """Start the shield: its START records go out now, before any byte of the app.

    Whatever the console layers buffered until now is flushed in the clear first (only
    the runtime's own start-up lines can be there).
    """
    global _shield
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a console the host closed must not stop the boot
            pass
    shield = ConsoleShield(key, run, slot_data)
    lines = shield._enc.start()
    _shield = shield
    shield._submit(1, lines[0])
    shield._submit(2, lines[1])
    return shield


def finish(status: int) -> None:
    """At a clean exit (also ``sys.exit`` and an uncaught exception's): the end records."""
    shield = _shield
    if shield is None:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed console must not lose the end record
            pass
    try:
        shield.end(status)
    except OSError:
        pass  # the host refused the write: the owner sees "no end record"
