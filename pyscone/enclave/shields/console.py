"""The console shield: the app's stdout and stderr as encrypted records, its stdin from the owner's.

Every path by which bytes reach the host's fds 0-2 comes here while the shield is on:
``sys.stdout``/``sys.stderr`` (and so ``print`` and the runtime's own ``pyscone:`` lines)
through :class:`~pyscone.enclave.stdlib.console.ConsoleIO`, and ``os.write``/``os.read``
on a number that names the console (0-2 or a dup of them) through ``stdlib/files.py``.
C code cannot write around the shield: the libc layer refuses a C library's ``write`` to
fds 0-2, and replaces glibc's ``stdout`` and ``stderr`` (``printf``) by streams into the shield.
One write is one record (several if larger than a record's bound); the record format is
:mod:`pyscone.protect.console`.

Order and write-behind.  Records carry a global sequence number, so they must reach the
host in the order they were numbered, even when two lthreads print at once or a signal
handler prints while a write is in flight.  So a write is numbered and queued in one
step, and the queue goes to the host in order with at most one host write in flight
(``Scheduler.start``): the app does not wait for the host, and what it writes while a host
write is under way is coalesced behind it into one host write of up to a slot (a burst of
small writes within :data:`_GAP_S` of the last host write waits for the next one, too).
What is queued goes out at the app's next write, when the app waits for anything (a timer
of the hub), before a read of stdin (a prompt is out before its answer is awaited), and at
exit, before the end records.  The queue is bounded (:data:`_BACKLOG`): past it a write
waits.  A host write that fails is the error of the app's next write (as a buffered
file's would be).

Processes.  A forked child must not go on with its parent's encoder: the same run key and
counters in two processes would reuse GCM nonces (a break of both confidentiality and
integrity), and the owner could not tell the two streams apart.  So the shield's family
hooks (:mod:`pyscone.enclave.family`) do, around every fork: in the parent, before it,
send everything queued (so what the parent wrote before the fork is on the host before
anything of the child's); in the child, start a run of its own (a new random run id: its
own key, its counters from 0) whose START records name the parent's run and ``gseq`` at
the fork, and drop the parent's queue, write in flight and timer flag (the parent sends
its own); in the parent, after it, count the child (its END records say how many).  The
shield also checks its pid whenever it is used (:func:`active`), so a child never writes
with its parent's encoder even if another module's fork hook prints before ours runs.  A
*spawned* child gets its parent's run and ``gseq`` with the console key
(:func:`spawn_spec`), and names them in its START records as a forked child does.
``os._exit`` with the shield on sends what is queued and the end records, with its status,
without letting another lthread run: what the app wrote is the console itself, so it is
not lost as a native process's unflushed *buffers* are (those of ``sys.stdout`` are lost
as natively).

stdin.  With the shield on, what the host sends on fd 0 must be the owner's records
(``pyscone console --encode-input``); their plaintext is what ``input()`` and
``os.read(0)`` see.  A bad record is ``EIO`` for the app and a line on stderr (itself a
record), and every later read fails too: never a wrong byte.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from pyscone.abi import Op
from pyscone.enclave import family, scheduler

if TYPE_CHECKING:
    from pyscone.enclave.scheduler import InFlight
    from pyscone.protect.console import Encoder, InputReader, Lineage, Stream

#: Record bytes that may wait behind the write in flight before a write waits for the host.
_BACKLOG = 1 << 18
#: When the app waits for anything, how soon the hub moves what is still queued.
_TICK_S = 0.0005
#: A small write within this long of the last host write waits to go with the next ones.
_GAP_S = 0.001
#: How often a run of writes that never wait lets others run (python switches threads every 5 ms).
_TURN_S = 0.001
_NO_WAIT, _BELOW_BACKLOG, _DRAIN, _NOW, _IN_PLACE = 0, 1, 2, 3, 4

_shield: ConsoleShield | None = None


class ConsoleShield:
    """The encoder of one run, the queue of its lines, and the stdin reader."""

    def __init__(self, key: bytes, run: bytes, slot_data: int) -> None:
        # (Imported here: the record format's crypto is loaded at boot only when a shield may start.)
        from pyscone.protect import console as fmt

        self._key = key
        self._enc: Encoder = fmt.Encoder(key, run, max_payload=fmt.payload_for_line(slot_data))
        self._children = 0  # children started (each a run of its own): the END records say how many
        self._pid = os.getpid()  # (a forked child has another: it must not write with this encoder)
        self._input: InputReader = fmt.InputReader(key, slot_data * 2)
        self._streams: dict[int, Stream] = {1: fmt.Stream.STDOUT, 2: fmt.Stream.STDERR}
        self._bad_input = fmt.ConsoleError
        self._said = False
        self._slot = slot_data
        self._queue: deque[tuple[int, bytes]] = deque()  # (fd, record lines), in sequence order
        self._queued = 0
        self._inflight: tuple[InFlight, int, bytes] | None = None
        self._pumping = False
        self._timer_armed = False
        self._started = 0.0  # when the last host write was started (time.monotonic)
        self._turn = 0.0  # when a write last looked for others waiting to run
        self._error: OSError | None = None
        self._pending = b""
        self.run = run

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """Seal one write to console fd 1 or 2; returns its length (all of it is taken).

        Raises:
            OSError: the host failed this or an earlier write (as a full disk fails a buffered file).
        """
        if fd not in (1, 2):
            raise OSError(errno.EBADF, "the console's stdin is not writable with the console shield on")
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if not n:
            return 0
        lines = self._enc.write(self._streams[fd], data)
        self._enqueue(fd, lines[0] if len(lines) == 1 else b"".join(lines))
        sched = scheduler.get()
        now = time.monotonic()
        if self._queued >= self._slot or now - self._started >= _GAP_S:
            self._pump(_BELOW_BACKLOG if self._queued > _BACKLOG else _NO_WAIT)
        elif not self._timer_armed:  # (a burst: the pump would only wait too)
            self._arm(sched)
        # A host call is a turn for the other lthreads, and a safe point for signals: a
        # write that does not wait for the host still gives them theirs, every _TURN_S
        # (a loop that only prints would otherwise starve them, and ^C).
        if now - self._turn >= _TURN_S and not self._pumping and sched.current is not None and not sched.sync:
            self._turn = now
            if sched.others_waiting():
                sched.yield_now()
        return n

    def _enqueue(self, fd: int, chunk: bytes) -> None:
        self._queue.append((fd, chunk))
        self._queued += len(chunk)

    def _pump(self, wait: int = _NO_WAIT) -> None:
        """Move the queue to the host: one write in flight at a time, the rest coalesced behind it.

        ``wait``: :data:`_NO_WAIT` never waits (what is left goes with the next write, a
        flush, or the timer: the hub's, when the app next waits for anything);
        :data:`_BELOW_BACKLOG` waits until the queue is under :data:`_BACKLOG`, one write
        still in flight; :data:`_DRAIN` until everything is on the host; :data:`_NOW` (the
        timer) never waits but starts what is queued; :data:`_IN_PLACE` drains as
        :data:`_DRAIN` does, but waits in place (no other lthread runs meanwhile: ``os._exit``).
        With :data:`_NO_WAIT`, a new host write starts at once only if the last started a
        while ago (:data:`_GAP_S`) or a slot's worth is queued, so that a burst of small
        writes becomes a few large ones.
        """
        if self._pumping:
            return  # (re-entered from a signal handler or a finalizer: the outer pump takes it)
        self._pumping = True
        sched = scheduler.get()
        try:
            while True:
                must = wait in (_DRAIN, _IN_PLACE) or (wait == _BELOW_BACKLOG and self._queued > _BACKLOG)
                if self._inflight is not None:
                    call, fd, sent = self._inflight
                    if must and wait != _IN_PLACE and sched.current is not None and not sched.sync:
                        reply: tuple[int, int, object] | None = sched.finish(call)
                    else:
                        reply = sched.poll(call, wait=must)
                    if reply is None:
                        self._arm(sched)
                        return
                    self._inflight = None
                    self._done(fd, sent, reply[0], reply[1])
                if not self._queue:
                    return
                now = time.monotonic()
                if wait == _NO_WAIT and self._queued < self._slot and now - self._started < _GAP_S:
                    self._arm(sched)
                    return
                self._started = now
                fd, data = self._take()
                # (The hub, on the timer, may start one too: the reply is polled for, or finished.)
                pending = sched.start(Op.WRITE, (fd,), data, polled=True)
                if pending is None and wait == _IN_PLACE:
                    r, err, _ = sched.host_call_in_place(Op.WRITE, (fd,), data)
                    self._done(fd, data, r, err)
                elif pending is None:  # sync mode, or no free slot: an ordinary call
                    r, err, _ = sched.host_call(Op.WRITE, (fd,), data, wait=True)
                    self._done(fd, data, r, err)
                else:
                    self._inflight = (pending, fd, data)
        finally:
            self._pumping = False

    def _take(self) -> tuple[int, bytes]:
        """Up to a slot of the queue's head fd (a record line may span two host writes)."""
        fd = self._queue[0][0]
        parts = []
        room = self._slot
        while room and self._queue and self._queue[0][0] == fd:
            data = self._queue.popleft()[1]
            if len(data) > room:
                self._queue.appendleft((fd, data[room:]))
                data = data[:room]
            parts.append(data)
            room -= len(data)
        self._queued -= self._slot - room
        return fd, b"".join(parts) if len(parts) > 1 else parts[0]

    def _done(self, fd: int, sent: bytes, r: int, err: int) -> None:
        """One host write answered: a short one is sent again from where it stopped, first."""
        if r < 0 and err == errno.EINTR:
            r = 0
        elif r < 0:
            self._error = OSError(err, "console write failed")
            return
        elif r == 0 and sent:
            self._error = OSError(errno.EIO, "the host wrote nothing to the console")
            return
        if r < len(sent):
            self._queue.appendleft((fd, sent[r:]))
            self._queued += len(sent) - r

    def _arm(self, sched: scheduler.Scheduler) -> None:
        if not self._timer_armed:
            self._timer_armed = True
            sched.call_later(_TICK_S, self._tick)

    def _tick(self) -> None:
        self._timer_armed = False
        self._pump(_NOW)

    def flush(self) -> None:
        """Wait until every record written so far is on the host."""
        sched = scheduler.get()
        while self._queue or self._inflight is not None:
            if self._pumping:
                if sched.current is not None:  # another lthread is at it: let it finish
                    sched.sleep(0.0005)
                    continue
                self._pumping = False  # the hub at exit: that lthread will never resume
            self._pump(_DRAIN)
            if self._error is not None:
                error, self._error = self._error, None
                raise error

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the owner's input (``b""`` at its end).

        Raises:
            OSError: ``EIO`` for a bad input record (said once on stderr), or the host's error.
        """
        if n <= 0:
            return b""
        self.flush()  # a prompt is out before its answer is awaited
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
        out, err = self._enc.end(status, self._children)  # stdout's, then stderr's
        self._enqueue(1, out)
        self._enqueue(2, err)
        self.flush()

    def begin(self, lineage: Lineage | None = None) -> None:
        """Write the START records (a forked child's name its parent's run) and send them."""
        out, err = self._enc.start(lineage)
        self._enqueue(1, out)
        self._enqueue(2, err)
        self.flush()

    def exit_now(self, status: int) -> None:
        """``os._exit``: what is queued, then the end records, to the host -- no other lthread runs.

        A host write that fails ends it (the owner then sees no end record).
        """
        self._pumping = False  # (an lthread parked in a pump, or we in a signal handler: it never resumes)
        if not self._enc.ended:
            out, err = self._enc.end(status, self._children)
            self._enqueue(1, out)
            self._enqueue(2, err)
        while (self._queue or self._inflight is not None) and self._error is None:
            self._pump(_IN_PLACE)

    def forked(self) -> ConsoleShield:
        """In a forked child: the shield of its own run, with none of the parent's output state.

        What the parent queued or has in flight is the parent's to send; the timer that
        would have sent it is gone with the parent's other timers.  The stdin reader is
        inherited as it stands (the input is one stream of records: the parent and a child
        that both read it each miss what the other took, and their reads fail).
        """
        from pyscone.protect import console as fmt

        lineage = fmt.Lineage(self.run, self._enc.gseq, os.getpid())
        child = ConsoleShield(self._key, os.urandom(fmt.RUN_SIZE), self._slot)
        child._input, child._pending, child._said = self._input, self._pending, self._said
        try:
            child.begin(lineage)
        except OSError as e:  # (the START records stay queued; the child's next write says why)
            child._error = e
        return child


def active() -> ConsoleShield | None:
    """The shield of this process, if on (in a forked child, the child's own run from its first use)."""
    shield = _shield
    if shield is not None and shield._pid != os.getpid():
        _after_fork_child()
        shield = _shield
    return shield


def turn_on(key: bytes, run: bytes, slot_data: int, lineage: Lineage | None = None) -> ConsoleShield:
    """Start the shield: its START records go out now, before any byte of the app.

    Whatever the console layers buffered until now is flushed in the clear first (only
    the runtime's own start-up lines can be there).

    Args:
        key: the owner's console key.
        run: 16 random bytes.
        slot_data: a slot's data size (a host write's bound).
        lineage: for a spawned child, its parent's run and ``gseq`` (:func:`lineage_in`).
    """
    global _shield, _hooked
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a console the host closed must not stop the boot
            pass
    from pyscone.enclave.stdlib import clib

    clib.console_streams()  # (if the libc layer is bound already; before _shield: a failure leaves it off)
    shield = ConsoleShield(key, run, slot_data)
    _shield = shield
    shield.begin(lineage)
    if not _hooked:
        _hooked = True
        family.register(prepare=_before_fork, parent=_after_fork_parent, child=_after_fork_child)
    return shield


_hooked = False


def _before_fork() -> None:
    """In the parent: everything queued goes to the host before the child can write."""
    shield = active()
    if shield is None:
        return
    try:
        shield.flush()
    except OSError as e:
        shield._error = e  # (the app's next write says it, as without a fork)


def _after_fork_parent(pid: int) -> None:
    if (shield := active()) is not None and pid > 0:
        shield._children += 1


def _after_fork_child() -> None:
    global _shield
    if _shield is not None and _shield._pid != os.getpid():
        _shield = _shield.forked()


def spawn_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The console settings for a child this enclave spawns: the key, and this run's lineage.

    What is queued goes to the host first (the child's records follow it, as a forked
    child's do).  Call :func:`child_started` once the child runs: the end records count it.
    """
    shield = active()
    if shield is None:
        return spec
    _before_fork()
    return {**spec, "parent": shield.run.hex(), "gseq": shield._enc.gseq}


def child_started() -> None:
    """A spawned child runs (its run is one of the family's: the end records count it)."""
    if (shield := active()) is not None:
        shield._children += 1


def lineage_in(spec: dict[str, Any]) -> Lineage | None:
    """The lineage in a spawned child's console settings (``None``: the family's first enclave)."""
    if "parent" not in spec:
        return None
    from pyscone.protect import console as fmt

    parent = bytes.fromhex(str(spec["parent"]))
    if len(parent) != fmt.RUN_SIZE:
        raise ValueError("the parent's run is 16 bytes")
    return fmt.Lineage(parent, int(spec["gseq"]), os.getpid())


def exit_now(status: int) -> None:
    """``os._exit`` of the app: the queue and the end records go out first (if the shield is on)."""
    if (shield := active()) is not None:
        shield.exit_now(status)


def finish(status: int) -> None:
    """At a clean exit (also ``sys.exit`` and an uncaught exception's): the end records."""
    shield = active()
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
