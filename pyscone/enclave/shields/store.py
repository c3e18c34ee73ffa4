"""Where a protected file's records live on the host (TRUSTED): :class:`HostStore`.

A store moves records between the enclave and the host file in slot-sized host
calls, and overlaps those calls with the enclave's own work: read-ahead for a reader
going forward, write-behind for a writer.  :func:`replace_host_file` is the atomic,
durable replacement the shield uses for the FSPF and the dev-mode tag file.

A commit's durable steps are started, then waited for (:class:`Durable`), so the ones that
may overlap do: :class:`DurableWrite` (a whole small file rewritten in place and synced, its
last piece and the sync in one ``PWRITE_SYNC`` call) and :class:`DataSync` (a store's writes
and its file's ``fdatasync``).
"""

from __future__ import annotations

import abc
import errno
import os
import posixpath
from collections import deque

from pyscone.abi import Op
from pyscone.enclave import scheduler
from pyscone.enclave.stdlib import files


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


#: Read-ahead segments (slot-sized host reads) a store keeps at most.
READ_AHEAD_CALLS = 8
#: Slot-sized writes in flight before a writer waits for the oldest.
WRITE_BEHIND_CALLS = 8


class _Segment:
    """Bytes of the host file asked for by one host call: in flight, or arrived."""

    __slots__ = ("call", "data", "end", "start")

    def __init__(self, start: int, end: int, call: scheduler.InFlight | None, data: bytes = b"") -> None:
        self.start = start
        self.end = end
        self.call = call
        self.data = data


class HostStore:
    """A protected file's records in its host file, moved in slot-sized host calls.

    The calls overlap with the enclave's own work (SCONE's asynchronous system calls
    put to use): a read that needs several calls starts them all before it waits;
    :meth:`prefetch` starts reads of what the file expects to need next, so the host
    reads them while the enclave verifies what it has (read-ahead); writes are started
    and not waited for, up to :data:`WRITE_BEHIND_CALLS` at a time (write-behind).

    The first write that fails is kept, and every later :meth:`drain` raises it: a
    commit after a lost write fails rather than name records that never reached the
    disk, and the last committed state stays as it was.  A read drains first, so it
    never races a write; a write forgets the read-ahead, which may predate it.  (The
    host runs file calls in the order they were queued; one that does not can only
    make a read fail verification.)
    """

    __slots__ = ("_ahead", "_error", "_writes", "fd", "max_io", "wrote")

    def __init__(self, fd: int, max_io: int) -> None:
        self.fd = fd
        self.max_io = max_io
        self.wrote = False
        self._ahead: list[_Segment] = []  # read-ahead, sorted by offset, not overlapping
        self._writes: deque[tuple[scheduler.InFlight, int]] = deque()
        self._error: OSError | None = None

    def _segment_at(self, pos: int) -> tuple[_Segment | None, int]:
        """The read-ahead segment holding ``pos``, else None and where the next one starts."""
        for seg in self._ahead:
            if seg.start <= pos < seg.end:
                return seg, seg.start
            if seg.start > pos:
                return None, seg.start
        return None, -1

    def pread(self, offset: int, size: int) -> bytes | memoryview:
        self.drain()
        end = offset + size
        plan: list[tuple[_Segment, int, int]] = []  # segment, offset in it, length
        pos = offset
        while pos < end:
            seg, nxt = self._segment_at(pos)
            if seg is None:
                take = min(self.max_io, end - pos, nxt - pos if nxt >= 0 else end)
                seg = self._start_read(pos, take)
            else:
                take = min(end, seg.end) - pos
            plan.append((seg, pos - seg.start, take))
            pos += take
        if self._ahead:  # what this read used up is no longer ahead
            self._ahead = [seg for seg in self._ahead if not offset < seg.end <= end]
        parts: list[bytes | memoryview] = []
        for seg, lo, n in plan:
            piece = memoryview(self._arrived(seg))[lo : lo + n]
            parts.append(piece)
            if len(piece) < n:
                break  # end of the host file: the records will fail to verify
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def prefetch(self, offset: int, size: int) -> None:
        """Start reading ``size`` bytes at ``offset`` for a later :meth:`pread` (best effort)."""
        end = offset + size
        pos = offset
        while pos < end and len(self._ahead) < READ_AHEAD_CALLS:
            seg, nxt = self._segment_at(pos)
            if seg is not None:
                pos = seg.end
                continue
            seg = self._start_read(pos, min(self.max_io, end - pos, nxt - pos if nxt >= 0 else end))
            if seg.call is None:
                return  # no slot free (or the hub): read-ahead is an optimisation only
            self._ahead.append(seg)
            self._ahead.sort(key=lambda s: s.start)
            pos = seg.end

    def forget(self) -> None:
        """Drop the read-ahead (the reader went elsewhere)."""
        sched = scheduler.get()
        for seg in self._ahead:
            if seg.call is not None:
                sched.drop(seg.call)
        self._ahead = []

    def after_fork(self) -> None:
        """In a forked child: the calls in flight were the parent's (on its lane), not ours."""
        self._ahead = []
        self._writes.clear()

    def _start_read(self, pos: int, n: int) -> _Segment:
        return _Segment(pos, pos + n, scheduler.get().start(Op.PREAD, (self.fd, n, pos)))

    def _arrived(self, seg: _Segment) -> bytes:
        sched = scheduler.get()
        call, seg.call = seg.call, None
        if call is not None:
            result, err, value = sched.finish(call)
        elif seg.data or seg.end == seg.start:
            return seg.data
        else:
            result, err, value = sched.host_call(Op.PREAD, (self.fd, seg.end - seg.start, seg.start))
        if result < 0:
            raise _err(err)
        seg.data = value
        return seg.data

    def pwrite(self, offset: int, data: bytes | bytearray) -> None:
        if self._error is not None:
            raise self._error
        self.wrote = True
        self.forget()
        sched = scheduler.get()
        view = memoryview(data)
        while view:
            piece = view[: self.max_io]
            if len(self._writes) >= WRITE_BEHIND_CALLS:
                self._written(*self._writes.popleft())
            call = sched.start(Op.PWRITE, (self.fd, offset), piece)
            if call is None:
                self._check_write(*sched.host_call(Op.PWRITE, (self.fd, offset), piece)[:2], len(piece))
            else:
                self._writes.append((call, len(piece)))
            offset += len(piece)
            view = view[len(piece) :]
        if self._error is not None:
            raise self._error

    def _written(self, call: scheduler.InFlight, n: int) -> None:
        try:
            result, err, _ = scheduler.get().finish(call)
        except BaseException:
            # Interrupted (^C, a signal handler's exception): the write may or may not happen,
            # so nothing may be committed on top of it.
            if self._error is None:
                self._error = _err(errno.EIO)
            raise
        self._check_write(result, err, n)

    def _check_write(self, result: int, err: int, n: int) -> None:
        if self._error is None and result != n:
            # A short write to a regular file means the disk is full.
            self._error = _err(err if result < 0 else errno.ENOSPC)

    def drain(self) -> None:
        """Wait for every write in flight; raise the first write error this store has had."""
        while self._writes:
            self._written(*self._writes.popleft())
        if self._error is not None:
            raise self._error

    def write_all(self, data: bytes) -> None:
        """Write ``data`` from offset 0 and wait until all of it is written."""
        try:
            self.pwrite(0, data)
            self.drain()
        finally:
            self.release()

    def release_checked(self) -> None:
        """Wait for every write in flight and raise the first error (the fd stays open)."""
        try:
            self.drain()
        finally:
            self.forget()

    def release(self) -> None:
        """Before the fd is closed: nothing may stay in flight on it."""
        self.forget()
        try:
            self.drain()
        except OSError:
            pass  # already raised to the app by the commit that hit it


class Durable(abc.ABC):
    """A durable host step in flight (an abstract base: :class:`DataSync`, :class:`DurableWrite`):
    :meth:`wait` returns once it is durable, or raises ``OSError``.  Each is waited for exactly
    once (its host calls are then finished); ``done`` says it became durable."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    @abc.abstractmethod
    def wait(self) -> None: ...


class _Started:
    """One host call started now and finished later (or made at once when it cannot be
    started: no slot free, or the hub; it is then done before anything queued after it)."""

    __slots__ = ("_call", "_done")

    def __init__(self, op: int, args: tuple[int, ...], data: bytes | memoryview = b"") -> None:
        sched = scheduler.get()
        self._call = sched.start(op, args, data)
        self._done = None if self._call is not None else sched.host_call(op, args, data)[:2]

    def finish(self) -> tuple[int, int]:
        """(result, errno) of the call."""
        call, self._call = self._call, None
        if call is not None:
            self._done = scheduler.get().finish(call)[:2]
        assert self._done is not None
        return self._done


class DurableWrite(Durable):
    """``data`` written over the start of host file ``fd`` and synced (``fdatasync``), the file
    cut to ``len(data)`` if ``cut``: the write-behind carries all but the last slot, and the last
    slot, the cut and the sync are one ``PWRITE_SYNC`` call, queued after them (the host runs a
    file's calls in order, so the sync covers them)."""

    __slots__ = ("_call", "_n", "_store")

    def __init__(self, fd: int, data: bytes, max_io: int, cut: bool) -> None:
        last = (len(data) - 1) // max_io * max_io if data else 0  # where the last slot starts
        self._store = HostStore(fd, max_io)
        if last:
            try:
                self._store.pwrite(0, data[:last])
            except BaseException:
                self._store.release()
                raise
        self._n = len(data) - last
        super().__init__()
        self._call = _Started(Op.PWRITE_SYNC, (fd, last, len(data) if cut else -1), memoryview(data)[last:])

    def wait(self) -> None:
        try:
            result, err = self._call.finish()
        finally:
            self._store.release_checked()
        if result < 0:
            raise _err(err)
        if result != self._n:
            raise _err(errno.ENOSPC)  # a short write to a regular file: the disk is full
        self.done = True


class DataSync(Durable):
    """A protected file's records durable: ``fdatasync`` of its host file, started by
    :meth:`start` (it is queued after the store's writes, so it covers them), then the writes'
    results checked."""

    __slots__ = ("_call", "_store")

    def __init__(self, store: HostStore) -> None:
        super().__init__()
        self._store = store
        self._call: _Started | None = None

    def start(self) -> None:
        """Queue the sync now (the caller has its other step ready to queue right after)."""
        if self._call is None:
            self._call = _Started(Op.FSYNC, (self._store.fd, 1))

    def wait(self) -> None:
        self.start()
        assert self._call is not None
        try:
            self._store.drain()
        finally:
            result, err = self._call.finish()
        if result < 0:
            raise _err(err)
        self._store.wrote = False
        self.done = True


def replace_host_file(path: str, data: bytes, max_io: int) -> None:
    """Replace the host file ``path`` with ``data`` atomically and durably: write a temporary
    file, fsync it, rename it over ``path``, fsync the directory.  A kill or a power loss
    leaves the old contents or the new, never a mix or an empty file."""
    tmp = path + ".tmp"
    fd = files.host_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        HostStore(fd, max_io).write_all(data)
        files.fsync(fd)
    finally:
        files.close(fd)
    files.host_rename(tmp, path, True)
    dfd = files.host_open(posixpath.dirname(path) or "/", os.O_RDONLY, 0)
    try:
        files.fsync(dfd)
    finally:
        files.close(dfd)
