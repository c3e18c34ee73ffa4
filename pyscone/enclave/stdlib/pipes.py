"""Pipes in enclave memory: ``os.pipe``, ``os.pipe2``.

Theory of operation
-------------------
A pipe is a buffer in the enclave with a count of open read and write fds; its
data never leaves enclave memory and a read or a write is no host call.  Its fds
are *local*: numbers from ``LOCAL_BASE`` to ``ALIAS_BASE``, which neither the host
(``< MAX_FD``, Iago refuses more) nor the FS shield's virtual fds
(``MAX_FD`` upwards, one per open) reach.  A ``dup`` of an end is another number
for the same end (``dups`` names the end's fd again; the end is closed here when
its last name closes); the pipe sees EOF when the last write end closes and
``EPIPE`` when the last read end does.

A blocking read of an empty pipe (or a write to a full one) parks the lthread
until the other side acts; ``O_NONBLOCK`` (``pipe2``, ``os.set_blocking``)
answers ``EAGAIN`` instead.

``select``/``poll``/``epoll`` over local fds alone wait in the enclave, with no
host call.  A wait over local and host fds together is one host ``POLL`` that
also watches a *bell*, a host socket pair the enclave opens on first need: a pipe
that changes while such a wait is parked rings it (one host call, only then),
so waitress's trigger pipe and the self-pipe trick wake a select on sockets.

Across a fork.  A pipe in enclave memory would be copied by a fork, and nothing
would cross.  So before a fork (the ``family`` prepare hook) every pipe still open
*moves to the host*: it gets a host channel (``shields/famchan.py``: a seqpacket
socket pair), what its buffer holds goes there sealed, and from then on its fds
(the same local numbers, the same ``O_NONBLOCK``) read and write sealed records
through the host, in the parent and the child alike.  While a pipe moves, its
readers and writers wait (``moving``), so nothing overtakes the bytes being moved.
A pipe made after the fork lives in enclave memory again, until the next fork.

After a move, what a record held beyond what a ``read`` asked for waits in ``buf``
for the next read in this process.  A child forked while such a rest waits does not
get it (the parent, whose read took the record, keeps it): the only place where a
moved pipe differs from a kernel one.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import time
from collections.abc import Callable
from typing import Any

from pyscone import abi
from pyscone.abi import Op, StatResult
from pyscone.enclave import family, iago, scheduler
from pyscone.enclave.shields import famchan

LOCAL_BASE = 1 << 30  # fds the enclave alone gives out (still a C int)
ALIAS_BASE = 3 << 29  # from here up: the numbers ``dups`` gives out, above every pipe
CAPACITY = 65536  # Linux's default pipe size
PIPE_BUF = 4096  # writes up to this size are atomic, and POLLOUT means this much room

_fds = iago.fds


class _Host:
    """A moved pipe's host side in this process: its channel, and its host fds (-1: closed here)."""

    __slots__ = ("chan", "reading", "rfd", "wfd", "writing")

    def __init__(self, chan: famchan.Channel, rfd: int, wfd: int) -> None:
        self.chan = chan
        self.rfd = rfd
        self.wfd = wfd
        self.reading = False  # an lthread has a host read in flight: the others wait their turn
        self.writing = False


class _Pipe:
    __slots__ = ("buf", "host", "ino", "moving", "readers", "watchers", "writers")

    def __init__(self, ino: int) -> None:
        self.buf = bytearray()  # the pipe's bytes; once moved, the rest of a record a read took
        self.readers = 0
        self.writers = 0
        self.ino = ino
        self.watchers: list[Callable[[], None]] = []
        self.host: _Host | None = None
        self.moving = False

    def changed(self) -> None:
        """Wake whoever waits on this pipe (each watcher is called once, then forgotten)."""
        watchers, self.watchers = self.watchers, []
        for w in watchers:
            w()


class _End:
    """One end of a pipe, shared by an fd and its dups."""

    __slots__ = ("pipe", "reading", "refs")

    def __init__(self, pipe: _Pipe, reading: bool) -> None:
        self.pipe = pipe
        self.reading = reading
        self.refs = 0


_ends: dict[int, _End] = {}
_next_fd = LOCAL_BASE
_next_ino = 1


def is_local(fd: int) -> bool:
    return LOCAL_BASE <= fd < ALIAS_BASE


def next_fd() -> int:
    """The next number a pipe end gets (those below it are never given out again)."""
    return _next_fd


def _end(fd: int) -> _End:
    try:
        return _ends[fd]
    except KeyError:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None


def _attach(end: _End) -> int:
    global _next_fd
    fd = _next_fd
    if fd >= ALIAS_BASE:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    _next_fd += 1
    _ends[fd] = end
    end.refs += 1
    if end.refs == 1:
        if end.reading:
            end.pipe.readers += 1
        else:
            end.pipe.writers += 1
    return fd


def _invalid() -> OSError:
    return OSError(errno.EINVAL, os.strerror(errno.EINVAL))


# -- os functions --------------------------------------------------------------------------------


def pipe2(flags: int) -> tuple[int, int]:
    global _next_ino
    if flags & ~(os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_DIRECT", 0)):
        raise _invalid()
    p = _Pipe(_next_ino)
    _next_ino += 1
    r, w = _attach(_End(p, True)), _attach(_End(p, False))
    if flags & os.O_NONBLOCK:
        _fds.nonblocking.update((r, w))
    return r, w


def pipe() -> tuple[int, int]:
    return pipe2(0)


def close(fd: int) -> None:
    end = _ends.pop(fd, None)
    if end is None:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    _fds.forget(fd)
    end.refs -= 1
    if end.refs == 0:
        if end.reading:
            end.pipe.readers -= 1
            if not end.pipe.readers:
                end.pipe.buf.clear()  # nobody can read it any more
        else:
            end.pipe.writers -= 1
        _close_host_side(end.pipe, end.reading)
        end.pipe.changed()


def _close_host_side(p: _Pipe, reading: bool) -> None:
    """A moved pipe's host fd for one side, once this process holds that side no more."""
    h = p.host
    if h is None or (p.readers if reading else p.writers):
        return
    if reading and h.rfd >= 0:
        famchan.close(h.rfd)
        h.rfd = -1
    elif not reading and h.wfd >= 0:
        famchan.close(h.wfd)
        h.wfd = -1


def _park_on(p: _Pipe) -> None:
    sched = scheduler.get()
    lt = sched.current
    if lt is None:  # the hub (a signal's wakeup write): it may not wait
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    def wake() -> None:
        sched.wake(lt)

    p.watchers.append(wake)
    try:
        sched.park()
    finally:  # interrupted (^C): a stale watcher must not wake this lthread somewhere else later
        if wake in p.watchers:
            p.watchers.remove(wake)


def read(fd: int, n: int) -> bytes:
    end = _end(fd)
    if not end.reading:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    p = end.pipe
    while not p.buf:
        if n == 0:
            return b""
        if p.moving or (p.host is not None and p.host.reading):
            if fd in _fds.nonblocking:
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            _park_on(p)
            continue
        if p.host is not None:
            got = _host_read(p, p.host, fd in _fds.nonblocking)
            if got is None:
                return b""
            p.buf += got
            continue
        if not p.writers:
            return b""
        if fd in _fds.nonblocking:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        _park_on(p)
    data = bytes(p.buf[:n])
    del p.buf[:n]
    if p.host is None:
        p.changed()
    return data


def _host_read(p: _Pipe, h: _Host, nonblocking: bool) -> bytes | None:
    """The next record of a moved pipe (``None``: the end of the stream), this lthread's turn."""
    h.reading = True
    try:
        return famchan.recv(h.rfd, h.chan.reader(0), nonblocking)
    finally:
        h.reading = False
        p.changed()


def _host_write(p: _Pipe, h: _Host, data: memoryview, nonblocking: bool) -> int:
    h.writing = True
    try:
        return famchan.send(h.wfd, h.chan.writer(0), data, nonblocking)
    finally:
        h.writing = False
        p.changed()


def write(fd: int, data: bytes | bytearray | memoryview) -> int:
    end = _end(fd)
    if end.reading:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    p = end.pipe
    view = memoryview(data).cast("B")
    done = 0
    while True:
        if p.moving or (p.host is not None and p.host.writing):
            if fd in _fds.nonblocking:
                if done:
                    return done
                raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            _park_on(p)
            continue
        if p.host is not None:
            if done == len(view):
                return done
            try:
                return done + _host_write(p, p.host, view[done:], fd in _fds.nonblocking)
            except (BlockingIOError, BrokenPipeError):
                if done:
                    return done
                raise
        if not p.readers:
            if done:
                return done
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        room = CAPACITY - len(p.buf)
        # A write of at most PIPE_BUF bytes is atomic: all of it or (non-blocking) EAGAIN.
        if room and (room >= len(view) - done or len(view) - done > PIPE_BUF):
            take = min(room, len(view) - done)
            p.buf += view[done : done + take]
            done += take
            p.changed()
            if done == len(view):
                return done
        if fd in _fds.nonblocking:
            if done:
                return done
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        _park_on(p)


def fstat(fd: int) -> StatResult:
    end = _end(fd)
    now = time.time_ns()
    return StatResult(
        mode=stat_mod.S_IFIFO | 0o600, ino=end.pipe.ino, dev=0, nlink=1, uid=os.getuid(), gid=os.getgid(),
        size=0, atime_ns=now, mtime_ns=now, ctime_ns=now, blksize=PIPE_BUF, blocks=0, rdev=0,
    )  # fmt: skip


def status_flags(fd: int) -> int:
    return os.O_RDONLY if _end(fd).reading else os.O_WRONLY


# -- waiting ---------------------------------------------------------------------------------------


def _revents(fd: int, events: int) -> int:
    end = _ends.get(fd)
    if end is None:
        return abi.POLLNVAL
    p = end.pipe
    if end.reading:
        got = (abi.POLLIN if p.buf else 0) | (abi.POLLHUP if not p.writers else 0)
    else:
        got = abi.POLLERR if not p.readers else abi.POLLOUT if CAPACITY - len(p.buf) >= PIPE_BUF else 0
    return got & (events | abi.POLLHUP | abi.POLLERR)


_bell: tuple[Any, Any] | None = None  # (read socket, write socket) on the host
_bell_rung = False


def _ring() -> None:
    """Wake the waits parked in a host ``POLL`` on the bell: one byte, posted, not awaited (the
    writer need not wait for the host, and a lost or refused byte only delays a waiter that
    re-checks its pipes on any wake-up)."""
    global _bell_rung
    if _bell is None or _bell_rung:
        return
    _bell_rung = True
    sched = scheduler.get()
    pending = sched.start(Op.SEND, (_bell[1].fileno(), 0), b"\0")
    if pending is not None:
        sched.drop(pending)
        return
    try:  # no slot free, or the hub (a signal's wakeup write): a plain non-blocking send
        _bell[1].send(b"\0")
    except OSError:  # full: it is rung already
        pass


def wait(
    local: list[tuple[int, int]],
    host: list[tuple[int, int]],
    timeout: float | None,
    host_poll: Callable[[list[tuple[int, int]], float | None], list[tuple[int, int]]],
) -> list[tuple[int, int]]:
    """``poll`` over local fds (answered here) and host fds (one host ``POLL``)."""
    if any((e := _ends.get(fd)) is not None and e.pipe.host is not None for fd, _ in local):
        return _wait_moved(local, host, timeout, host_poll)
    return _wait(local, host, timeout, host_poll)


def _wait_moved(
    local: list[tuple[int, int]],
    host: list[tuple[int, int]],
    timeout: float | None,
    host_poll: Callable[[list[tuple[int, int]], float | None], list[tuple[int, int]]],
) -> list[tuple[int, int]]:
    """A wait with moved pipes among ``local``: their host fds are waited on with the others'.

    A seqpacket socket is readable only with a whole record (or at the end), so the host's
    readiness is the pipe's; a record's rest left in ``buf`` is ready now."""
    in_memory: list[tuple[int, int]] = []
    now: list[tuple[int, int]] = []
    names: dict[int, list[tuple[int, int]]] = {}  # host fd -> the local fds (and events) it stands for
    extra: list[tuple[int, int]] = []
    for fd, ev in local:
        end = _ends[fd]
        h = end.pipe.host
        if h is None:
            in_memory.append((fd, ev))
            continue
        if end.reading and end.pipe.buf:
            now.append((fd, abi.POLLIN & ev))
            continue
        hfd = h.rfd if end.reading else h.wfd
        want = ev & (abi.POLLIN if end.reading else abi.POLLOUT)
        if hfd not in names:
            extra.append((hfd, want))
        names.setdefault(hfd, []).append((fd, ev))
    now = [(fd, r) for fd, r in now if r]

    def poll_all(fds: list[tuple[int, int]], t: float | None) -> list[tuple[int, int]]:
        out = []
        for hfd, r in host_poll(fds, t):
            if hfd not in names:
                out.append((hfd, r))
                continue
            for fd, ev in names[hfd]:
                said = r
                if (e := _ends.get(fd)) is None:
                    continue  # closed meanwhile by another lthread
                if not e.reading and r & (abi.POLLHUP | abi.POLLERR):
                    said = abi.POLLERR  # a pipe's write end with no reader left, as Linux says it
                if said := said & (ev | abi.POLLHUP | abi.POLLERR):
                    out.append((fd, said))
        return out

    t = 0.0 if now else timeout
    if not in_memory:
        return now + poll_all(host + extra, t)
    return now + _wait(in_memory, host + extra, t, poll_all)


def _wait(
    local: list[tuple[int, int]],
    host: list[tuple[int, int]],
    timeout: float | None,
    host_poll: Callable[[list[tuple[int, int]], float | None], list[tuple[int, int]]],
) -> list[tuple[int, int]]:
    global _bell, _bell_rung
    sched = scheduler.get()
    deadline = None if timeout is None else time.monotonic() + timeout
    pipes = {_ends[fd].pipe for fd, _ in local if fd in _ends}
    while True:
        ready = [(fd, r) for fd, ev in local if (r := _revents(fd, ev))]
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if ready or remaining == 0.0 or sched.current is None:
            return ready + (host_poll(host, 0.0) if host else [])
        if not host:
            lt = sched.current
            woken = [False]

            def wake(lt: Any = lt, woken: list[bool] = woken) -> None:
                if not woken[0]:
                    woken[0] = True
                    sched.wake(lt)

            for p in pipes:
                p.watchers.append(wake)
            timer = sched.call_later(remaining, wake) if remaining is not None else None
            try:
                sched.park()
            finally:
                if timer is not None:
                    timer.cancel()
                for p in pipes:
                    if wake in p.watchers:
                        p.watchers.remove(wake)
            continue
        if _bell is None:
            from pyscone.enclave.stdlib import sockets

            a, b = sockets.socketpair()
            famchan.unnote_pair(a.fileno(), b.fileno())  # the runtime's own: never sealed
            a.setblocking(False)
            b.setblocking(False)
            _bell = (a, b)
        for p in pipes:
            p.watchers.append(_ring)
        try:
            got = host_poll([*host, (_bell[0].fileno(), abi.POLLIN)], remaining)
        finally:
            for p in pipes:
                if _ring in p.watchers:
                    p.watchers.remove(_ring)
        bell_fd = _bell[0].fileno()
        if any(fd == bell_fd for fd, _ in got):
            try:
                _bell[0].recv(4096)
            except OSError:
                pass
            _bell_rung = False
        got = [(fd, r) for fd, r in got if fd != bell_fd]
        ready = [(fd, r) for fd, ev in local if (r := _revents(fd, ev))]
        if got or ready or (deadline is not None and time.monotonic() >= deadline):
            return ready + got


# -- across a fork -----------------------------------------------------------------------------


def _move(p: _Pipe) -> None:
    """Give pipe ``p`` a host channel and move its bytes there (see the module doc)."""
    p.moving = True
    try:
        rfd, wfd = famchan.host_pair()  # (other lthreads run meanwhile: they wait, p.moving)
        h = _Host(famchan.Channel(), rfd, wfd)
        data, p.host = bytes(p.buf), h
        p.buf.clear()
        if data and p.readers:
            try:
                famchan.send(wfd, h.chan.writer(0), data, nonblocking=True)
            except OSError as e:  # not all of it fits in the host's buffer
                raise OSError(e.errno, f"a pipe's {len(data)} unread bytes cannot move to the host: {e}") from None
    finally:
        p.moving = False
        for reading in (True, False):
            _close_host_side(p, reading)  # a side this process holds no more
        p.changed()


def for_child(fd: int) -> tuple[int, bytes, bool]:
    """A pipe end a spawned child gets (stdlib/spawn.py): the pipe moves to the host if it has not.

    Returns:
        the host fd of this end, the pipe's channel id, and whether it is the read end.
    """
    end = _end(fd)
    p = end.pipe
    while p.moving:
        _park_on(p)
    if p.host is None:
        _move(p)
    assert p.host is not None
    h = p.host.rfd if end.reading else p.host.wfd
    if h < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    return h, p.host.chan.id, end.reading


def adopt_from_parent(fd: int, host_fd: int, channel_id: bytes, reading: bool) -> None:
    """In a spawned child: the parent's pipe end ``fd`` (its number), on its channel's host fd."""
    global _next_fd, _next_ino
    if not is_local(fd) or fd in _ends:
        raise ValueError(f"pipe end {fd} is not a free pipe number")
    p = _Pipe(_next_ino)
    _next_ino += 1
    p.host = _Host(famchan.channel(channel_id), host_fd if reading else -1, -1 if reading else host_fd)
    end = _End(p, reading)
    _ends[fd] = end
    end.refs = 1
    if reading:
        p.readers = 1
    else:
        p.writers = 1
    _next_fd = max(_next_fd, fd + 1)


def adopt_passed(host_fd: int, channel_id: bytes, reading: bool) -> int:
    """A pipe end another member passed (``stdlib/fdpass.py``), on its channel's host fd ``host_fd``.

    Returns the app's new number for it: another number for the end this process already
    holds on that channel (the new host fd is closed), or a new end.
    """
    for end in list(_ends.values()):
        p = end.pipe
        if p.host is None or p.host.chan.id != channel_id:
            continue
        held = p.host.rfd if reading else p.host.wfd
        if end.reading == reading and held >= 0:
            famchan.close(host_fd)
            return _attach(end)
        if held < 0:
            if reading:
                p.host.rfd = host_fd
            else:
                p.host.wfd = host_fd
            return _attach(_End(p, reading))
    global _next_ino
    p = _Pipe(_next_ino)
    _next_ino += 1
    p.host = _Host(famchan.channel(channel_id), host_fd if reading else -1, -1 if reading else host_fd)
    return _attach(_End(p, reading))


def _prepare_fork() -> None:
    """Before a fork: every pipe still in enclave memory moves to the host."""
    moved: set[int] = set()
    for end in list(_ends.values()):
        p = end.pipe
        if p.host is None and not p.moving and id(p) not in moved:
            moved.add(id(p))
            _move(p)


def _in_child() -> None:
    """In a forked child: what the parent's lthreads were doing is not the child's."""
    global _bell, _bell_rung
    for end in _ends.values():
        p = end.pipe
        p.watchers.clear()
        if p.host is not None:
            p.buf.clear()  # the rest of a record the parent took stays with the parent
            p.host.reading = p.host.writing = False
    if _bell is not None:  # the parent's bell: ringing it would wake the parent's waits
        for sock in _bell:
            famchan.close(sock.detach())  # (closes the child's copy of the host fd only)
    _bell, _bell_rung = None, False


def install() -> None:
    from pyscone.enclave.stdlib import interpose

    interpose(os, pipe=pipe, pipe2=pipe2)
    family.register(prepare=_prepare_fork, child=_in_child)
    famchan.install()  # (socketpairs: after the pipes, whose bell is one)
