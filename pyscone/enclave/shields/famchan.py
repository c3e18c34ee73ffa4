"""Sealed channels between the enclaves of a family: the host I/O under ``protect/famseal``.

Theory of operation
-------------------
A pipe lives in enclave memory until the process forks (``stdlib/pipes.py``).  Then
it must cross to the child, and only the host can carry bytes between two enclaves,
so it *moves*: the ``family`` prepare hook gives it a host channel and from then on
its bytes go through the host sealed (``famseal``), in both processes.

The host channel of a pipe is a host ``socketpair(AF_UNIX, SOCK_SEQPACKET)``, not a
host pipe, because a seqpacket socket keeps record boundaries:

* one ``send`` is one record, whole or not at all (``EAGAIN``), whatever its size
  (a host pipe is atomic only up to PIPE_BUF, 4096 bytes, less than a 4096-byte
  write plus the seal's overhead): an app write of up to PIPE_BUF bytes is one
  record and never interleaves with another writer's;
* one ``recv`` takes exactly one record: several readers (in several processes)
  never split a record between them, and a reader never takes more than the record
  it opens, so what it does not read stays in the host for the others;
* so readiness does not lie: the host says readable only when a whole record (or
  the end of the stream) is there.
* the end of the stream is the kernel's: a reader sees it when every process that
  held the write end has closed it, as with a pipe.

Within one process, one lthread at a time reads (and one writes) a channel's host
side (``stdlib/pipes.py`` keeps the turn), so records are opened in the order the
host delivered them and sent in the order they were sealed.

A record that does not open (changed, forged, replayed, reordered, of another
channel, cut short) stops the enclave (``iago.fail_stop``), as every other lie of
the host does: the stream has lost its integrity and its framing, and an ``OSError``
would let an app (or ``multiprocessing``, which reads errors as a peer that went
away) carry on past data that was tampered with.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

from pyscone import abi
from pyscone.abi import Op
from pyscone.enclave import family, iago, scheduler
from pyscone.protect import famseal

_fds = iago.fds


class Channel:
    """One pipe's (or socketpair's) sealing state in this process (see :func:`channel`)."""

    __slots__ = ("__weakref__", "_readers", "_writers", "id")

    def __init__(self, channel_id: bytes | None = None) -> None:
        self.id = channel_id if channel_id is not None else os.urandom(famseal.CHANNEL_ID_SIZE)
        self._writers: dict[int, famseal.Writer] = {}
        self._readers: dict[int, famseal.Reader] = {}
        _channels[self.id] = self

    def writer(self, direction: int) -> famseal.Writer:
        """This member's writer (a forked child gets its own: it has a new member id)."""
        w = self._writers.get(direction)
        if w is None or w.member != family.member:
            w = famseal.Writer(famseal.channel_key(family.key, self.id, direction), self.id, direction, family.member)
            self._writers[direction] = w
        return w

    def reader(self, direction: int) -> famseal.Reader:
        r = self._readers.get(direction)
        if r is None:
            r = famseal.Reader(famseal.channel_key(family.key, self.id, direction), self.id, direction)
            self._readers[direction] = r
        return r


_channels: weakref.WeakValueDictionary[bytes, Channel] = weakref.WeakValueDictionary()


def channel(channel_id: bytes) -> Channel:
    """The state of channel ``channel_id`` in this process, made on first need.

    One per channel, however many ends of it the process holds or receives: a second
    ``Channel`` of the same id would start a second writer (sequence numbers from 0) under
    the same key and member id, so two records would share a nonce.
    """
    return _channels.get(channel_id) or Channel(channel_id)


def _chunk() -> int:
    from pyscone.enclave.stdlib import sockets

    return min(famseal.MAX_PLAIN, sockets._slot_data - famseal.OVERHEAD)


def host_pair() -> tuple[int, int]:
    """A new host seqpacket socket pair: (the end that reads, the end that writes)."""
    result, err, value = scheduler.get().host_call(Op.SOCKETPAIR, (socket.AF_UNIX, socket.SOCK_SEQPACKET, 0))
    if result < 0:
        raise OSError(err, os.strerror(err))
    return value  # type: ignore[no-any-return]


def close(h: int) -> None:
    """Close a channel's host fd (posted: a close reports nothing worth a round trip)."""
    _fds.forget(h)  # before the host can reuse the number
    scheduler.get().post(Op.CLOSE, (h,))


def send(h: int, writer: famseal.Writer, data: bytes | bytearray | memoryview, nonblocking: bool) -> int:
    """Seal ``data`` and send it as records on host fd ``h``; how many bytes went.

    Raises:
        BlockingIOError: nothing went (non-blocking, no room).
        BrokenPipeError: nothing went, nobody reads any more.
    """
    view = memoryview(data).cast("B")
    chunk = _chunk()
    sched = scheduler.get()
    done = 0
    while done < len(view):
        piece = view[done : done + chunk]
        record = writer.seal(piece)
        result, err, _ = sched.host_call(Op.SEND, (h, 0), record, wait=not nonblocking)
        if result < 0:
            if done:
                return done
            if err in (errno.EPIPE, errno.ECONNRESET):
                raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            raise OSError(err, os.strerror(err))
        if result != len(record):
            iago.fail_stop(f"the host took {result} bytes of a {len(record)}-byte sealed record")
        done += len(piece)
    return done


def recv(h: int, reader: famseal.Reader, nonblocking: bool) -> bytes | None:
    """The plaintext of the next record on host fd ``h`` (``b""`` for an empty one), or
    ``None`` at the end of the stream.

    Raises:
        BlockingIOError: nothing there (non-blocking).
    """
    result, err, value = scheduler.get().host_call(Op.RECV, (h, _chunk() + famseal.OVERHEAD, 0), wait=not nonblocking)
    if result < 0:
        raise OSError(err, os.strerror(err))
    try:
        if not value:
            reader.eof()
            return None
        return b"".join(reader.feed(value))
    except famseal.SealError as e:
        iago.fail_stop(f"a family pipe: {e}")


# -- socketpairs ----------------------------------------------------------------------------------
#
# ``socket.socketpair()`` is a host socket pair from the start (a stream: two lthreads of one
# enclave use it like any socket).  Before a fork, each AF_UNIX stream pair still open is
# *sealed* in place: the same host fds, the same numbers, its unread plaintext drained and sent
# again sealed; from then on each end writes records of its own direction and opens the other's.
# A stream keeps no record boundaries, so a reader takes exactly one record from the host (its
# header, then the rest: two host calls), never more, and a wait reports an end readable only when
# a peek shows a whole record there (or the end of the stream).


class _SockEnd:
    """A sealed socketpair end in this process."""

    __slots__ = ("chan", "out", "reading", "rest", "waiters", "writing")

    def __init__(self, chan: Channel, out: int) -> None:
        self.chan = chan
        self.out = out  # the direction this end writes; it reads the other
        self.rest = bytearray()  # what the last record opened held beyond what was read
        self.reading = False
        self.writing = False
        self.waiters: list[Callable[[], None]] = []

    def wait_turn(self, timeout: float | None) -> None:
        if timeout == 0.0:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        sched = scheduler.get()
        lt = sched.current
        if lt is None:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))

        def wake() -> None:
            sched.wake(lt)

        self.waiters.append(wake)
        try:
            sched.park()
        finally:
            if wake in self.waiters:
                self.waiters.remove(wake)

    def turn_over(self) -> None:
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            w()


#: AF_UNIX stream socketpair ends not sealed yet: handle -> (its peer's handle, the direction it writes).
pairs: dict[int, tuple[int, int]] = {}
#: Sealed socketpair ends: handle -> state.
sealed: dict[int, _SockEnd] = {}


def note_pair(a: int, b: int) -> None:
    """``socket.socketpair`` made host sockets ``a`` and ``b`` (AF_UNIX, stream)."""
    pairs[a] = (b, 0)
    pairs[b] = (a, 1)


def unnote_pair(a: int, b: int) -> None:
    """A pair of the runtime's own (the pipes' bell): never sealed."""
    pairs.pop(a, None)
    pairs.pop(b, None)


def _forget(h: int) -> None:
    pairs.pop(h, None)
    sealed.pop(h, None)


def _call(op: int, args: tuple[int, ...], data: bytes = b"", timeout: float | None = None) -> tuple[int, Any]:
    result, err, value = scheduler.get().host_call(
        op, args, data, wait=timeout != 0.0, timeout=timeout if timeout else None
    )
    if result < 0:
        if err == errno.ETIMEDOUT and timeout:
            raise TimeoutError("timed out")
        raise OSError(err, os.strerror(err))
    return result, value


def _drain(h: int) -> bytes:
    """What host socket ``h`` holds unread now (plaintext, written before it was sealed)."""
    out = bytearray()
    while True:
        try:
            _, data = _call(Op.RECV, (h, 65536, 0), timeout=0.0)
        except (BlockingIOError, ConnectionResetError):
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def seal_pairs() -> None:
    """Before a fork: seal every AF_UNIX stream socketpair still open (see above)."""
    while pairs:
        h, (peer, out) = pairs.popitem()
        open_peer = pairs.get(peer) == (h, 1 - out)
        if open_peer:
            del pairs[peer]
        chan = Channel()
        ends = {h: out, **({peer: 1 - out} if open_peer else {})}
        unread = {e: _drain(e) for e in ends}
        for e, d in ends.items():
            sealed[e] = _SockEnd(chan, d)
        for e, data in unread.items():
            if not data:
                continue
            other = next((x for x in ends if x != e), None)
            if other is None:  # its peer is closed: the bytes stay here, for this process
                sealed[e].rest += data
            else:
                sock_send(other, data, 0.0)


def seal_for_child(h: int) -> tuple[bytes, int] | None:
    """A socketpair end given to a spawned child (stdlib/spawn.py): sealed now if it is not yet,
    as at a fork.  Returns its channel id and the direction it writes (``None``: not a pair)."""
    if h in pairs:
        seal_pairs()
    e = sealed.get(h)
    return (e.chan.id, e.out) if e is not None else None


def adopt_sealed(h: int, channel_id: bytes, out: int) -> None:
    """In a spawned child: host socket ``h`` is its parent's sealed socketpair end (direction ``out``)."""
    if out not in (0, 1):
        raise ValueError("a socketpair end writes direction 0 or 1")
    sealed[h] = _SockEnd(channel(channel_id), out)


def sock_send(h: int, data: bytes | bytearray | memoryview, timeout: float | None) -> int:
    """Send ``data`` sealed on sealed end ``h``; how many bytes went (timeout 0: non-blocking).

    A record the host took part of is finished before anything else (waiting if need be):
    a stream with half a record in it is lost to every reader."""
    e = sealed[h]
    while e.writing:
        e.wait_turn(timeout)
    e.writing = True
    try:
        view = memoryview(data).cast("B")
        writer = e.chan.writer(e.out)
        chunk = _chunk()
        done = 0
        while done < len(view):
            piece = view[done : done + chunk]
            record = writer.seal(piece)
            sent = 0
            while sent < len(record):
                try:
                    n, _ = _call(Op.SEND, (h, 0), record[sent:], None if sent else timeout)
                except OSError:
                    if done and not sent:
                        return done
                    raise
                if not 0 < n <= len(record) - sent:
                    iago.fail_stop(f"the host took {n} bytes of the {len(record) - sent} bytes sent")
                sent += n
            done += len(piece)
        return done
    finally:
        e.writing = False
        e.turn_over()


def sock_recv(h: int, n: int, timeout: float | None, peek: bool = False) -> bytes:
    """Up to ``n`` bytes of plaintext from sealed end ``h`` (``b""``: the end of the stream)."""
    e = sealed[h]
    if n <= 0:
        return b""
    while not e.rest:
        if e.reading:
            e.wait_turn(timeout)
            continue
        e.reading = True
        try:
            got = _recv_record(h, e.chan.reader(1 - e.out), timeout)
        finally:
            e.reading = False
            e.turn_over()
        if got is None:
            return b""
        e.rest += got
    data = bytes(e.rest[:n])
    if not peek:
        del e.rest[:n]
    return data


def _recv_record(h: int, reader: famseal.Reader, timeout: float | None) -> bytes | None:
    """One whole record's plaintext from the stream (never a byte of the next), or ``None`` at its end."""
    while True:
        need = reader.need()
        _, data = _call(Op.RECV, (h, need, 0), timeout=timeout)
        try:
            if not data:
                # A stream that ends inside a record: its writer died while sending it (a host that
                # cuts the stream could cut it at a record's end as well).  As natively, the reader
                # sees the end of the stream after the last whole record; the part is never delivered.
                reader.abandon()
                return None
            plains = reader.feed(data)
        except famseal.SealError as err:
            iago.fail_stop(f"a family socketpair: {err}")
        if plains:
            return b"".join(plains)


def _whole_record(h: int, e: _SockEnd) -> bool:
    """Whether end ``h`` can be read without waiting: a whole record (or the end) is there."""
    try:
        _, data = _call(Op.RECV, (h, famseal.MAX_RECORD, socket.MSG_PEEK), timeout=0.0)
    except BlockingIOError:
        return False
    except OSError:
        return True  # an error: the read will say it
    return not data or e.chan.reader(1 - e.out).completes(data)


def poll(
    fds: list[tuple[int, int]],
    timeout: float | None,
    host_poll: Callable[[list[tuple[int, int]], float | None], list[tuple[int, int]]],
) -> list[tuple[int, int]]:
    """A host ``poll`` over ``fds``, some of them sealed ends: readable only as said above."""
    sched = scheduler.get()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ready: dict[int, int] = {}
        for h, ev in fds:
            e = sealed.get(h)
            if e is not None and ev & abi.POLLIN and e.rest:
                ready[h] = abi.POLLIN
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        partial = False
        for h, r in host_poll(fds, 0.0 if ready else left):
            e = sealed.get(h)
            if e is not None and r & abi.POLLIN and not e.rest and not _whole_record(h, e):
                r &= ~abi.POLLIN  # part of a record: its writer is still sending the rest
                partial = True
            if r:
                ready[h] = ready.get(h, 0) | r
        if ready or (deadline is not None and time.monotonic() >= deadline):
            return list(ready.items())
        if partial:
            sched.sleep(0.001)  # the host stays readable until the rest comes: look again soon


def in_child() -> None:
    """In a forked child: the parent's lthreads and what a record held beyond their reads stay there."""
    for e in sealed.values():
        e.rest.clear()
        e.reading = e.writing = False
        e.waiters.clear()


def install() -> None:
    _fds.forget_hooks.append(_forget)
    family.register(prepare=seal_pairs, child=in_child)
