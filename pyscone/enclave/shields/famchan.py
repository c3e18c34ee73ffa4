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

from pyscone.abi import Op
from pyscone.enclave import family, iago, scheduler
from pyscone.protect import famseal

_fds = iago.fds


class Channel:
    """One pipe's (or socketpair's) sealing state in this process."""

    __slots__ = ("_readers", "_writers", "id")

    def __init__(self, channel_id: bytes | None = None) -> None:
        self.id = channel_id if channel_id is not None else os.urandom(famseal.CHANNEL_ID_SIZE)
        self._writers: dict[int, famseal.Writer] = {}
        self._readers: dict[int, famseal.Reader] = {}

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
