"""The host's system-call executor (UNTRUSTED): S-threads and a reactor.

Theory of operation
-------------------
One *dispatcher* thread consumes the request ring.  For each slot it reads the
opcode and runs the matching handler:

* calls bounded by memory speed (socket operations, which are always
  non-blocking here, reads and writes of regular files, fstat, lseek, close)
  run inline on the dispatcher;
* a socket call that would block and carries ``FLAG_WAIT`` is *parked* on the
  reactor, an epoll set owned by the dispatcher, and retried when its fd is
  ready.  Thousands of lthreads blocked in ``accept``/``recv`` therefore cost
  one epoll registration each, not one thread each;
* calls that may block on a device or forever (open, fsync, metadata updates,
  console reads and writes, name resolution) go to a pool of S-threads.

The dispatcher's epoll set also holds the request doorbell, so "sleep until
there is a request or a socket is ready" is one ``epoll_wait``.  Before it
sleeps it spins for a bounded, adaptive time and sets the ``host sleeping``
flag, so the enclave rings the doorbell only when the host really sleeps.

Completed calls are pushed to the response ring (under a lock, since pool
threads complete calls too); the enclave's doorbell is rung only when the
enclave said it is sleeping.

``hostile=`` turns this executor into a lying host for the Iago tests (see
``host/hostile.py``); without it nothing of that runs.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import queue
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyscone import abi, rings
from pyscone.abi import Op
from pyscone.host import hostile as hostile_mod
from pyscone.host import semaphores
from pyscone.host.hostile import Hostile, Liar
from pyscone.host.spawn import SpawnHost

if TYPE_CHECKING:
    from pyscone.host.family import HostFamily

Answer = tuple[int, int, bytes]
_OK: Answer = (0, 0, b"")

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_ALWAYS = select.EPOLLERR | select.EPOLLHUP


class _WouldBlock(Exception):
    """Raised by a socket handler that must be parked until ``fd`` is ready."""

    def __init__(
        self, fd: int, mask: int, retry: Callable[[], Answer] | None = None, nowait: Answer | None = None
    ) -> None:
        self.fd = fd
        self.mask = mask
        self.retry = retry
        self.nowait = nowait  # the answer when the caller does not wait (default EAGAIN)


@dataclass(eq=False)
class _Waiter:
    sid: int
    fds: list[tuple[int, int]]  # (fd, epoll mask)
    retry: Callable[[], Answer]
    op: int
    args: tuple[int, ...]


@dataclass
class Stats:
    requests: int = 0
    parked: int = 0
    pooled: int = 0
    doorbells_sent: int = 0
    sleeps: int = 0
    watchdog_wakeups: int = 0
    by_op: collections.Counter[int] = field(default_factory=collections.Counter)


def _void(fn: Callable[..., object], *args: object) -> Answer:
    """Run a call that returns nothing and answer success."""
    fn(*args)
    return _OK


def _pwrite_sync(a: tuple[int, ...], data: bytes) -> Answer:
    """``Op.PWRITE_SYNC``: write all of ``data``, cut the file if asked, then fdatasync."""
    fd, offset, size = a[0], a[1], a[2]
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            break
        done += n
    if done < len(data):
        return (done, 0, b"")  # a short write: the disk is full; nothing to make durable
    if size >= 0:
        os.ftruncate(fd, size)
    os.fdatasync(fd)
    return (done, 0, b"")


def _err(e: OSError) -> Answer:
    return (-1, e.errno or errno.EIO, b"")


class Executor:
    """Executes the enclave's system calls on the host."""

    def __init__(
        self,
        region: rings.SharedRegion,
        doorbell_in: int,
        doorbell_out: int,
        *,
        sthreads: int = 3,
        spin_us: int = 400,
        hostile: str | Liar | None = None,
    ) -> None:
        if sthreads < 1:
            raise ValueError("at least one S-thread (the dispatcher) is needed")
        self.region = region
        self.geometry = region.geometry
        self.sthreads = sthreads
        self.spin_us = spin_us
        #: Forks of the enclave (set by the launcher; ``None``: this enclave cannot fork).
        self.family: HostFamily | None = None
        self.mm = region.mm
        self._slot_off = [region.geometry.slot_off(i) for i in range(region.geometry.nslots)]
        self.doorbell_in = doorbell_in
        self.doorbell_out = doorbell_out
        self.requests = rings.request_consumer(region)
        self.responses = rings.response_producer(region)
        self.spin_max = spin_us / 1e6
        self.spin = self.spin_max
        self.stats = Stats()
        self._resp_lock = threading.Lock()
        self._stop = False
        self._ep = select.epoll()
        self._ep.register(doorbell_in, select.EPOLLIN)
        self._fdwait: dict[int, list[_Waiter]] = {}
        self._fdmask: dict[int, int] = {}
        self._parked: dict[int, _Waiter] = {}
        self._elsewhere: dict[int, semaphores.Wait] = {}  # slot -> a call another thread answers
        self._socks: dict[int, socket.socket] = {}
        self._files: set[int] = set()
        self._pool_q: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._pool = [
            threading.Thread(target=self._pool_main, name=f"pyscone-sthread-{i}", daemon=True)
            for i in range(sthreads - 1)
        ]
        self._thread = threading.Thread(target=self._dispatch_main, name="pyscone-dispatcher", daemon=True)
        self.hostile: Liar | None = hostile_mod.load(hostile) if isinstance(hostile, str) else hostile
        self.spawner = SpawnHost(self)  # fresh child enclaves (host/spawn.py): off until configured
        self._handlers: dict[int, Callable[[tuple[int, ...], bytes], Answer]] = {
            Op.NOP: lambda a, d: _OK,
            Op.OPEN: self._open,
            Op.CLOSE: self._close,
            Op.READ: self._read,
            Op.WRITE: self._write,
            Op.PREAD: lambda a, d: (len(b := os.pread(a[0], a[1], a[2])), 0, b),
            Op.PWRITE: lambda a, d: (os.pwrite(a[0], d, a[1]), 0, b""),
            Op.LSEEK: lambda a, d: (os.lseek(a[0], a[1], a[2]), 0, b""),
            Op.FSTAT: lambda a, d: (0, 0, abi.stat_from_os(os.fstat(a[0])).pack()),
            Op.STAT: self._stat,
            Op.LISTDIR: self._listdir,
            Op.MKDIR: lambda a, d: _void(os.mkdir, _path(d), a[0]),
            Op.RMDIR: lambda a, d: _void(os.rmdir, _path(d)),
            Op.UNLINK: lambda a, d: _void(os.unlink, _path(d)),
            Op.RENAME: self._rename,
            Op.FSYNC: lambda a, d: _void(os.fdatasync if a[1] else os.fsync, a[0]),
            Op.FTRUNCATE: lambda a, d: _void(os.ftruncate, a[0], a[1]),
            Op.ACCESS: lambda a, d: (int(not os.access(_path(d), a[0])), 0, b""),
            Op.CHMOD: lambda a, d: _void(os.chmod, _path(d), a[0]),
            Op.UTIME: self._utime,
            Op.READLINK: lambda a, d: (0, 0, os.fsencode(os.readlink(_path(d)))),
            Op.SYMLINK: self._symlink,
            Op.ISATTY: lambda a, d: (int(os.isatty(a[0])), 0, b""),
            Op.LOCK: self._lock,
            Op.STATVFS: self._statvfs,
            Op.READFILE: self._readfile,
            Op.PWRITE_SYNC: _pwrite_sync,
            Op.SOCKET: self._socket,
            Op.SOCKETPAIR: self._socketpair,
            Op.BIND: lambda a, d: _void(self._sock(a[0]).bind, self._addr(a[0], d)),
            Op.LISTEN: lambda a, d: _void(self._sock(a[0]).listen, a[1]),
            Op.ACCEPT: self._accept,
            Op.CONNECT: self._connect,
            Op.SEND: self._send,
            Op.RECV: self._recv,
            Op.SENDTO: self._sendto,
            Op.RECVFROM: self._recvfrom,
            Op.SHUTDOWN: lambda a, d: _void(self._sock(a[0]).shutdown, a[1]),
            Op.SETSOCKOPT: self._setsockopt,
            Op.GETSOCKOPT: self._getsockopt,
            Op.GETSOCKNAME: lambda a, d: self._name(a[0], self._sock(a[0]).getsockname()),
            Op.GETPEERNAME: lambda a, d: self._name(a[0], self._sock(a[0]).getpeername()),
            Op.GETADDRINFO: self._getaddrinfo,
            Op.GETHOSTNAME: lambda a, d: (0, 0, socket.gethostname().encode()),
            Op.GETNAMEINFO: self._getnameinfo,
            Op.POLL: self._poll,
            Op.FORK: self._fork,
            Op.FORK_DONE: self._fork_done,
            Op.KILL: lambda a, d: _void(os.kill, a[0], a[1]),
            Op.FUTIME: self._futime,
            Op.SENDMSG_FDS: self._sendmsg_fds,
            Op.RECVMSG_FDS: self._recvmsg_fds,
            **semaphores.HANDLERS,
            Op.SPAWN: self.spawner.spawn,
            Op.SPAWN_WAIT: self.spawner.wait,
            Op.SPAWN_KILL: self.spawner.kill,
        }
        # Calls that may block on a device or forever run on the S-thread pool.  (LOCK is never
        # the waiting form, see _lock: inline, it saves SQLite four pool hand-offs per transaction.)
        self._pooled = frozenset(
            {Op.OPEN, Op.FSYNC, Op.STATVFS, Op.STAT, Op.LISTDIR, Op.MKDIR, Op.RMDIR, Op.UNLINK, Op.RENAME, Op.FORK}
            | {
                Op.FTRUNCATE,
                Op.PWRITE_SYNC,
                Op.ACCESS,
                Op.CHMOD,
                Op.UTIME,
                Op.READLINK,
                Op.SYMLINK,
                Op.GETADDRINFO,
                Op.GETNAMEINFO,
                Op.SPAWN,
            }
        )
        if not self._pool:  # one S-thread: the dispatcher does everything
            self._pooled = frozenset()
        # Pages of one directory listing, served from one scan: (path, next index) -> entries.
        self._listings: dict[tuple[str, int], list[list[os.DirEntry[str]]]] = {}
        self._listings_lock = threading.Lock()
        if self.hostile is not None:
            # The liar sees every request first; wrapping the table keeps the honest path untouched.
            liar = self.hostile
            for op, handler in list(self._handlers.items()):
                self._handlers[op] = _consult(liar, self, op, handler)

    @classmethod
    def forked_from(cls, parent: Executor, region: rings.SharedRegion, doorbell_in: int, doorbell_out: int) -> Executor:
        """In a forked copy of this host process: serve a child enclave's lane with the
        parent's host descriptors (the copy holds them under the same numbers)."""
        parent._ep.close()  # one epoll instance with the parent's: this copy needs its own
        ex = cls(
            region, doorbell_in, doorbell_out, sthreads=parent.sthreads, spin_us=parent.spin_us, hostile=parent.hostile
        )
        ex._socks = dict(parent._socks)
        ex._files = set(parent._files)
        ex.spawner.template = parent.spawner.template  # a forked enclave spawns as its parent does
        return ex

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        for t in self._pool:
            t.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        os.eventfd_write(self.doorbell_in, 1)
        for _ in self._pool:
            self._pool_q.put(None)
        if self._thread.ident is not None:  # (not started when driven by serve_pending)
            self._thread.join(timeout=5)
        for s in self._socks.values():
            s.close()
        for fd in self._files:
            try:
                os.close(fd)
            except OSError:
                pass
        self._ep.close()

    def serve_pending(self, timeout: float = 0.0) -> int:
        """Serve every request already in the ring, in the caller's thread; return how many were answered.

        For in-process drivers (tests that play the enclave and the host in one thread, and
        so can decide each answer deterministically).  Use it instead of :meth:`start`, never
        beside it, with ``sthreads=1`` (no pool).  A call parked on the reactor is retried
        until it completes or ``timeout`` seconds have passed.
        """
        if self._pool:
            raise RuntimeError("serve_pending needs an executor with one S-thread")
        done: list[int] = []
        reqs = self.requests
        tail = reqs.peek_tail()
        if tail != reqs.head:
            for sid in reqs.take(tail):
                self._dispatch(sid, done)
        deadline = time.monotonic() + timeout
        while self._parked and (remaining := deadline - time.monotonic()) > 0:
            for fd, ev in self._ep.poll(remaining):
                if fd != self.doorbell_in:
                    self._on_ready(fd, ev, done)
        if done:
            self._publish(done)
        return len(done)

    # -- dispatcher -----------------------------------------------------------------------

    def _dispatch_main(self) -> None:
        reqs, region, ep = self.requests, self.region, self._ep
        done: list[int] = []
        spin_until = 0.0
        next_advice = 0.0
        while not self._stop:
            tail = reqs.peek_tail()
            busy = False
            if tail != reqs.head:
                for sid in reqs.take(tail):
                    self._dispatch(sid, done)
                busy = True
            if self._fdwait:
                for fd, ev in ep.poll(0):
                    if fd == self.doorbell_in:
                        continue
                    self._on_ready(fd, ev, done)
                    busy = True
            if done:
                self._publish(done)
                done = []
            now = time.perf_counter()
            if now >= next_advice:
                next_advice = now + 0.05
                self._advise()
            if busy:
                spin_until = now + self.spin
                continue
            if now < spin_until:
                os.sched_yield()  # spin politely: the enclave or the client may need this core
                continue
            # Idle: announce that we sleep, re-check, then wait for the doorbell or a socket.
            region.set_flag(abi.OFF_HOST_SLEEPING, 1)
            if reqs.pending():
                region.set_flag(abi.OFF_HOST_SLEEPING, 0)
                continue
            self.stats.sleeps += 1
            events = ep.poll(0.1)
            region.set_flag(abi.OFF_HOST_SLEEPING, 0)
            if not events and reqs.pending():
                self.stats.watchdog_wakeups += 1
            for fd, ev in events:
                if fd == self.doorbell_in:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                else:
                    self._on_ready(fd, ev, done)
            spin_until = time.perf_counter() + self.spin

    def _advise(self) -> None:
        """Spin (both sides) only while the family leaves cores to spin on."""
        if self.family is None:
            return
        self.family.reap()
        spin = 0.0 if self.family.crowded() else self.spin_max
        self.spin = spin
        self.region.set_flag(abi.OFF_SPIN_HINT, int(spin * 1e6) + 1)

    def _dispatch(self, sid: int, done: list[int]) -> None:
        if sid >= self.geometry.nslots:
            return  # a broken enclave; nothing sensible to answer
        off = self._slot_off[sid]
        op, flags, *args, dlen = abi.REQ.unpack_from(self.mm, off)
        self.stats.requests += 1
        self.stats.by_op[op] += 1
        if op == Op.CANCEL:
            self._cancel(args[0], done)
            self._answer(sid, _OK)
            done.append(sid)
            return
        if op in self._pooled or (
            self._pool and op in (Op.READ, Op.WRITE) and args[0] not in self._socks and args[0] not in self._files
        ):
            self.stats.pooled += 1
            self._pool_q.put(sid)
            return
        if op in (Op.PREAD, Op.PWRITE) and self.hostile is None:
            self._positioned_io(sid, off, op, args, dlen)
            done.append(sid)
            return
        data = bytes(self.mm[off + abi.SLOT_HEADER : off + abi.SLOT_HEADER + dlen]) if dlen else b""
        self._run(sid, op, flags, tuple(args), data, done)

    def _positioned_io(self, sid: int, off: int, op: int, args: list[int], dlen: int) -> None:
        """pread straight into the slot, pwrite straight from it: file data is copied once here."""
        start = off + abi.SLOT_HEADER
        n, pos = (args[1], args[2]) if op == Op.PREAD else (dlen, args[1])
        # (preadv takes offset -1 as "the file position": pread's callers mean EINVAL)
        if not 0 <= n <= self.geometry.slot_data or pos < 0:
            self._answer(sid, (-1, errno.EINVAL, b""))
            return
        view = memoryview(self.mm)[start : start + n]
        try:
            if op == Op.PREAD:
                result = got = os.preadv(args[0], [view], pos)
            else:
                result, got = os.pwrite(args[0], view, pos), 0
        except OSError as e:
            self._answer(sid, _err(e))
            return
        except (ValueError, OverflowError):
            self._answer(sid, (-1, errno.EINVAL, b""))
            return
        finally:
            view.release()
        abi.RESP.pack_into(self.mm, off + abi.RESP_OFF, result, 0, got)

    def _run(self, sid: int, op: int, flags: int, args: tuple[int, ...], data: bytes, done: list[int]) -> None:
        handler = self._handlers.get(op)
        try:
            if handler is None:
                ans: Answer = (-1, errno.ENOSYS, b"")
            else:
                ans = handler(args, data)
        except _WouldBlock as wb:
            if flags & abi.FLAG_WAIT:
                retry = wb.retry or (lambda: self._retry(op, args, data))
                if isinstance(wb, _MultiWait):
                    fds = [(fd, _epoll_mask(ev)) for fd, ev in wb.req]
                else:
                    fds = [(wb.fd, wb.mask)]
                self._park(_Waiter(sid, fds, retry, op, args))
                return
            ans = wb.nowait or (-1, errno.EAGAIN, b"")
        except semaphores.Wait as w:
            self._hand_over(sid, w, op, args)
            return
        except OSError as e:
            ans = _err(e)
        except (ValueError, TypeError, OverflowError, UnicodeError, struct.error):
            ans = (-1, errno.EINVAL, b"")
        self._answer(sid, ans, op, args)
        done.append(sid)

    def _hand_over(self, sid: int, w: semaphores.Wait, op: int, args: tuple[int, ...]) -> None:
        """Let another thread answer ``sid`` (a semaphore's wait); ``CANCEL`` still reaches it."""

        def answer(ans: Answer) -> None:
            # (Forgotten before the answer is out: only then may the enclave reuse the slot.)
            if self._elsewhere.get(sid) is w:
                self._elsewhere.pop(sid, None)
            self._answer(sid, ans, op, args)
            self._publish([sid])

        self._elsewhere[sid] = w
        w.start(answer, lambda: self._stop)

    def _retry(self, op: int, args: tuple[int, ...], data: bytes) -> Answer:
        return self._handlers[op](args, data)

    def _answer(self, sid: int, ans: Answer, op: int = Op.NOP, args: tuple[int, ...] = ()) -> None:
        result, err, payload = ans
        off = self._slot_off[sid]
        if self.hostile is not None:
            dlen = abi.REQ.unpack_from(self.mm, off)[-1]  # the request is still in the slot
            request = bytes(self.mm[off + abi.SLOT_HEADER : off + abi.SLOT_HEADER + dlen])
            result, err, payload = self.hostile.lie(op, args, result, err, payload, self, request)
        n = len(payload)
        if n:
            self.mm[off + abi.SLOT_HEADER : off + abi.SLOT_HEADER + n] = payload
        abi.RESP.pack_into(self.mm, off + abi.RESP_OFF, result, err, n)

    def _publish(self, sids: list[int]) -> None:
        if self.hostile is not None:
            sids = self.hostile.forge_ids(sids, self)
        with self._resp_lock:
            self.responses.push_many(sids)
        if self.region.flag(abi.OFF_ENCLAVE_SLEEPING):
            self.stats.doorbells_sent += 1
            os.eventfd_write(self.doorbell_out, 1)

    # -- the S-thread pool -------------------------------------------------------------

    def _pool_main(self) -> None:
        while True:
            sid = self._pool_q.get()
            if sid is None:
                return
            off = self._slot_off[sid]
            op, flags, *args, dlen = abi.REQ.unpack_from(self.mm, off)
            data = bytes(self.mm[off + abi.SLOT_HEADER : off + abi.SLOT_HEADER + dlen]) if dlen else b""
            done: list[int] = []
            self._run(sid, op, flags & ~abi.FLAG_WAIT, tuple(args), data, done)
            if done:
                self._publish(done)

    # -- reactor --------------------------------------------------------------------------

    def _park(self, w: _Waiter) -> None:
        self.stats.parked += 1
        self._parked[w.sid] = w
        for fd, _mask in w.fds:
            self._fdwait.setdefault(fd, []).append(w)
            self._rearm(fd)

    def _unpark(self, w: _Waiter) -> None:
        del self._parked[w.sid]
        for fd, _ in w.fds:
            waiters = self._fdwait.get(fd)
            if waiters is not None:
                waiters.remove(w)
                self._rearm(fd)

    def _rearm(self, fd: int) -> None:
        waiters = self._fdwait.get(fd)
        mask = 0
        for w in waiters or ():
            for wfd, m in w.fds:
                if wfd == fd:
                    mask |= m
        old = self._fdmask.get(fd, 0)
        if mask == old:
            if not waiters:
                self._fdwait.pop(fd, None)
            return
        try:
            if not mask:
                self._ep.unregister(fd)
                del self._fdmask[fd]
                self._fdwait.pop(fd, None)
            elif not old:
                self._ep.register(fd, mask)
                self._fdmask[fd] = mask
            else:
                self._ep.modify(fd, mask)
                self._fdmask[fd] = mask
        except OSError:  # closed under us: the waiters are failed by _close
            self._fdmask.pop(fd, None)

    def _on_ready(self, fd: int, ev: int, done: list[int]) -> None:
        for w in list(self._fdwait.get(fd, ())):
            if w.sid not in self._parked:
                continue
            try:
                ans = w.retry()
            except _WouldBlock:
                continue
            except OSError as e:
                ans = _err(e)
            self._unpark(w)
            self._answer(w.sid, ans, w.op, w.args)
            done.append(w.sid)

    def _cancel(self, target: int, done: list[int]) -> None:
        w = self._parked.get(target)
        if w is None:
            other = self._elsewhere.pop(target, None)
            if other is not None and other.cancel():
                self._answer(target, (-1, errno.ECANCELED, b""))
                done.append(target)
            return  # already answered (or running on the pool): the enclave uses that answer
        self._unpark(w)
        self._answer(target, (-1, errno.ECANCELED, b""), w.op, w.args)
        done.append(target)

    def _fail_waiters(self, fd: int, done: list[int] | None) -> None:
        for w in list(self._fdwait.get(fd, ())):
            self._unpark(w)
            self._answer(w.sid, (-1, errno.EBADF, b""), w.op, w.args)
            if done is not None:
                done.append(w.sid)
            else:
                self._publish([w.sid])

    # -- files ------------------------------------------------------------------------------

    def _fork(self, a: tuple[int, ...], d: bytes) -> Answer:
        if self.family is None:
            return (-1, errno.ENOSYS, b"")
        return self.family.fork(self)

    def _fork_done(self, a: tuple[int, ...], d: bytes) -> Answer:
        if self.family is None:
            return (-1, errno.EINVAL, b"")
        return self.family.fork_done(a[0], a[1])

    def _open(self, a: tuple[int, ...], d: bytes) -> Answer:
        fd = os.open(_path(d), a[0] | os.O_CLOEXEC, a[1])
        self._files.add(fd)
        return (fd, 0, b"")

    def _close(self, a: tuple[int, ...], d: bytes) -> Answer:
        fd = a[0]
        if fd in self._fdwait:
            self._fail_waiters(fd, None)
        if fd in self._fdmask:
            try:
                self._ep.unregister(fd)
            except OSError:
                pass
            del self._fdmask[fd]
        sock = self._socks.pop(fd, None)
        if sock is not None:
            sock.close()
            return _OK
        if fd <= 2:
            return _OK  # the console stays open for the launcher
        self._files.discard(fd)
        os.close(fd)
        return _OK

    def _lock(self, a: tuple[int, ...], d: bytes) -> Answer:
        """flock(2) or a POSIX record lock, never waiting: a lock held elsewhere answers EAGAIN at
        once and the enclave retries, so a waiting lthread never holds an S-thread."""
        fd, family, kind = a[0], a[1], a[2]
        if fd not in self._files:  # a socket, the console or a number the enclave never opened
            return (-1, errno.EBADF, b"")
        if family == abi.LOCK_FLOCK and kind in (fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_UN):
            return _void(fcntl.flock, fd, kind | fcntl.LOCK_NB)
        cmds = {fcntl.F_RDLCK: fcntl.LOCK_SH, fcntl.F_WRLCK: fcntl.LOCK_EX, fcntl.F_UNLCK: fcntl.LOCK_UN}
        if family == abi.LOCK_POSIX and kind in cmds:
            # lockf takes LOCK_UN alone: LOCK_UN | LOCK_NB is "unrecognized" (ValueError).
            nb = 0 if kind == fcntl.F_UNLCK else fcntl.LOCK_NB
            return _void(fcntl.lockf, fd, cmds[kind] | nb, a[4], a[3], a[5])
        return (-1, errno.EINVAL, b"")

    def _statvfs(self, a: tuple[int, ...], d: bytes) -> Answer:
        if a[0] >= 0 and a[0] not in self._files:
            return (-1, errno.EBADF, b"")
        st = os.statvfs(a[0]) if a[0] >= 0 else os.statvfs(_path(d))
        return (0, 0, abi.StatvfsResult.from_os(st).pack())

    def _readfile(self, a: tuple[int, ...], d: bytes) -> Answer:
        # On the dispatcher, like READ: only a regular file is read (O_NONBLOCK, so a FIFO's
        # open cannot block it); anything else is EINVAL, and the enclave opens it instead.
        limit = min(a[0], self.geometry.slot_data)
        fd = os.open(_path(d), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return (-1, errno.EINVAL, b"")
            chunks, size = [], 0
            while size <= limit and (b := os.read(fd, limit + 1 - size)):
                chunks.append(b)
                size += len(b)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        return (int(len(data) > limit), 0, data[:limit])

    def _read(self, a: tuple[int, ...], d: bytes) -> Answer:
        sock = self._socks.get(a[0])
        if sock is not None:
            return self._recv((a[0], a[1], 0), d)
        b = os.read(a[0], a[1])
        return (len(b), 0, b)

    def _write(self, a: tuple[int, ...], d: bytes) -> Answer:
        sock = self._socks.get(a[0])
        if sock is not None:
            return self._send((a[0], 0), d)
        return (os.write(a[0], d), 0, b"")

    def _stat(self, a: tuple[int, ...], d: bytes) -> Answer:
        return (0, 0, abi.stat_from_os(os.stat(_path(d), follow_symlinks=bool(a[0]))).pack())

    def _listdir(self, a: tuple[int, ...], d: bytes) -> Answer:
        # A listing larger than a slot is paged.  Its later pages come from the scan made for
        # its first, so a file created or removed meanwhile cannot shift a name onto two
        # pages (the enclave refuses a name listed twice) or off every page.
        path, start = _path(d), a[0]
        budget = self.geometry.slot_data - abi.DIRENTS_HEAD.size
        names: list[abi.Dirent] = []
        rest = self._take_listing(path, start) if start else None
        with os.scandir(path) if rest is None else _Listed(rest) as it:
            for i, entry in enumerate(it):
                if rest is None and i < start:
                    continue  # a continuation we no longer hold: scan again, as before
                raw = entry.name.encode("utf-8", "surrogateescape")
                cost = abi.DIRENT.size + len(raw)
                if cost > budget:
                    self._keep_listing(path, start + len(names), [entry, *it])
                    return (len(names), 0, abi.encode_dirents(names, True))
                budget -= cost
                names.append(abi.Dirent(entry.name, _dtype(entry)))
        return (len(names), 0, abi.encode_dirents(names, False))

    def _take_listing(self, path: str, start: int) -> list[os.DirEntry[str]] | None:
        with self._listings_lock:
            waiting = self._listings.get((path, start))
            if not waiting:
                return None
            rest = waiting.pop(0)
            if not waiting:
                del self._listings[(path, start)]
            return rest

    def _keep_listing(self, path: str, start: int, rest: list[os.DirEntry[str]]) -> None:
        with self._listings_lock:
            self._listings.setdefault((path, start), []).append(rest)
            while sum(map(len, self._listings.values())) > _LISTINGS_KEPT:  # abandoned listings
                oldest = next(iter(self._listings))
                self._listings[oldest].pop(0)
                if not self._listings[oldest]:
                    del self._listings[oldest]

    def _rename(self, a: tuple[int, ...], d: bytes) -> Answer:
        src, dst = d.split(b"\0", 1)
        os.replace(_path(src), _path(dst)) if a[0] else os.rename(_path(src), _path(dst))
        return _OK

    def _symlink(self, a: tuple[int, ...], d: bytes) -> Answer:
        target, link = d.split(b"\0", 1)
        os.symlink(_path(target), _path(link))
        return _OK

    def _futime(self, a: tuple[int, ...], d: bytes) -> Answer:
        if a[1]:
            os.utime(a[0], ns=(a[2], a[3]))
        else:
            os.utime(a[0])
        return _OK

    def _utime(self, a: tuple[int, ...], d: bytes) -> Answer:
        if a[0]:
            os.utime(_path(d), ns=(a[1], a[2]))
        else:
            os.utime(_path(d))
        return _OK

    # -- sockets ---------------------------------------------------------------------------

    def adopt_inherited(self, fd: int) -> None:
        """Serve a host fd this process inherited (a spawned enclave's channel and passed fds)."""
        mode = os.fstat(fd).st_mode
        if stat.S_ISSOCK(mode):
            self._adopt(socket.socket(fileno=fd))
        elif stat.S_ISREG(mode):
            self._files.add(fd)  # (anything else, a FIFO or a device, is read and written on S-threads)

    def _sock(self, fd: int) -> socket.socket:
        s = self._socks.get(fd)
        if s is None:
            raise OSError(errno.ENOTSOCK if fd in self._files else errno.EBADF, "not a socket")
        return s

    def _adopt(self, s: socket.socket) -> int:
        s.setblocking(False)
        self._socks[s.fileno()] = s
        return s.fileno()

    def _addr(self, fd: int, d: bytes) -> abi.SockAddr:
        return abi.decode_request_sockaddr(self._sock(fd).family, d)

    def _name(self, fd: int, addr: object) -> Answer:
        return (0, 0, abi.encode_result_sockaddr(self._sock(fd).family, addr))

    def _socket(self, a: tuple[int, ...], d: bytes) -> Answer:
        return (self._adopt(socket.socket(a[0], a[1], a[2])), 0, b"")

    def _socketpair(self, a: tuple[int, ...], d: bytes) -> Answer:
        s1, s2 = socket.socketpair(a[0], a[1], a[2])
        return (self._adopt(s1), 0, struct.pack("<i", self._adopt(s2)))

    def _accept(self, a: tuple[int, ...], d: bytes) -> Answer:
        lsock = self._sock(a[0])
        try:
            conn, addr = lsock.accept()
        except BlockingIOError:
            raise _WouldBlock(a[0], _IN) from None
        peer = abi.encode_result_sockaddr(lsock.family, addr)
        local = abi.encode_result_sockaddr(lsock.family, conn.getsockname())
        return (self._adopt(conn), 0, struct.pack("<I", len(peer)) + peer + local)

    def _connect(self, a: tuple[int, ...], d: bytes) -> Answer:
        fd = a[0]
        sock = self._sock(fd)
        err = sock.connect_ex(self._addr(fd, d))
        if err in (errno.EINPROGRESS, errno.EALREADY):

            def finish() -> Answer:
                e = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                return (-1, e, b"") if e else _OK

            raise _WouldBlock(fd, _OUT, finish)
        return (-1, err, b"") if err else _OK

    def _send(self, a: tuple[int, ...], d: bytes) -> Answer:
        try:
            return (self._sock(a[0]).send(d, a[1]), 0, b"")
        except BlockingIOError:
            raise _WouldBlock(a[0], _OUT) from None

    def _recv(self, a: tuple[int, ...], d: bytes) -> Answer:
        try:
            b = self._sock(a[0]).recv(a[1], a[2])
        except BlockingIOError:
            raise _WouldBlock(a[0], _IN) from None
        return (len(b), 0, b)

    def _sendmsg_fds(self, a: tuple[int, ...], d: bytes) -> Answer:
        n = a[2]
        fds = struct.unpack_from(f"<{n}i", d, 0)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"<{n}i", *fds))]
        try:
            return (self._sock(a[0]).sendmsg([d[4 * n :]], rights, a[1]), 0, b"")
        except BlockingIOError:
            raise _WouldBlock(a[0], _OUT) from None

    def _recvmsg_fds(self, a: tuple[int, ...], d: bytes) -> Answer:
        room = socket.CMSG_LEN(4 * a[3]) if a[3] > 0 else 0
        try:
            msg, anc, flags, _ = self._sock(a[0]).recvmsg(a[1], room, a[2] | socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            raise _WouldBlock(a[0], _IN) from None
        fds: list[int] = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += struct.unpack(f"<{len(data) // 4}i", data[: len(data) - len(data) % 4])
        for fd in fds:  # now the host's: a socket (a pipe's channel is one) or a file
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                self._adopt(socket.socket(fileno=fd))
            else:
                self._files.add(fd)
        head = abi.RECVMSG_HEAD.pack(len(fds), flags)
        return (len(msg), 0, head + struct.pack(f"<{len(fds)}i", *fds) + msg)

    def _sendto(self, a: tuple[int, ...], d: bytes) -> Answer:
        (alen,) = struct.unpack_from("<I", d, 0)
        addr = self._addr(a[0], d[4 : 4 + alen])
        try:
            return (self._sock(a[0]).sendto(d[4 + alen :], a[1], addr), 0, b"")
        except BlockingIOError:
            raise _WouldBlock(a[0], _OUT) from None

    def _recvfrom(self, a: tuple[int, ...], d: bytes) -> Answer:
        sock = self._sock(a[0])
        try:
            b, addr = sock.recvfrom(a[1], a[2])
        except BlockingIOError:
            raise _WouldBlock(a[0], _IN) from None
        enc = abi.encode_result_sockaddr(sock.family, addr) if addr is not None else b""
        return (len(b), 0, struct.pack("<I", len(enc)) + enc + b)

    def _setsockopt(self, a: tuple[int, ...], d: bytes) -> Answer:
        self._sock(a[0]).setsockopt(a[1], a[2], d if a[3] else a[4])
        return _OK

    def _getsockopt(self, a: tuple[int, ...], d: bytes) -> Answer:
        sock = self._sock(a[0])
        if a[3]:
            return (0, 0, sock.getsockopt(a[1], a[2], a[3]))
        return (sock.getsockopt(a[1], a[2]), 0, b"")

    def _getaddrinfo(self, a: tuple[int, ...], d: bytes) -> Answer:
        host_b, port_b = d.split(b"\0", 1)
        host = host_b.decode() if host_b else None
        port = port_b.decode() if port_b else None
        try:
            infos = socket.getaddrinfo(host, port, a[0], a[1], a[2], a[3])
        except socket.gaierror as e:
            return (-1, 0, str(e.errno).encode())  # errno 0 + payload: a resolver error code
        keep: list[tuple[int, int, int, str, object]] = [
            (f, t, p, c, sa) for f, t, p, c, sa in infos if f in (socket.AF_INET, socket.AF_INET6)
        ]
        if not keep:  # only other families: as glibc says when it finds nothing
            return (-1, 0, str(socket.EAI_NONAME).encode())
        return (len(keep), 0, abi.encode_addrinfo(keep))

    def _getnameinfo(self, a: tuple[int, ...], d: bytes) -> Answer:
        addr = abi.decode_request_sockaddr(a[0], d)
        try:
            host, port = socket.getnameinfo(addr, a[1])  # type: ignore[arg-type]
        except socket.gaierror as e:
            return (-1, 0, str(e.errno).encode())
        return (0, 0, host.encode() + b"\0" + port.encode())

    def _poll(self, a: tuple[int, ...], d: bytes) -> Answer:
        req = [abi.POLLFD.unpack_from(d, i * abi.POLLFD.size)[:2] for i in range(a[0])]
        p = select.poll()
        for fd, ev in req:
            p.register(fd, ev)
        ready = dict(p.poll(0))
        out = b"".join(abi.POLLFD.pack(fd, ev, ready.get(fd, 0) & 0xFFFF) for fd, ev in req)
        if not ready and a[0]:
            retry = lambda: self._poll(a, d)  # noqa: E731
            if len(req) == 1:
                raise _WouldBlock(req[0][0], _epoll_mask(req[0][1]), retry, nowait=(0, 0, out))
            raise _MultiWait(req, retry, nowait=(0, 0, out))
        return (len(ready), 0, out)


class _MultiWait(_WouldBlock):
    def __init__(self, req: list[tuple[int, int]], retry: Callable[[], Answer], nowait: Answer) -> None:
        super().__init__(req[0][0], 0, retry, nowait)
        self.req = req


def _epoll_mask(poll_events: int) -> int:
    mask = 0
    if poll_events & (abi.POLLIN | abi.POLLPRI):
        mask |= _IN
    if poll_events & abi.POLLOUT:
        mask |= _OUT
    return mask | _ALWAYS


def _path(d: bytes) -> str:
    return d.decode("utf-8", "surrogateescape")


#: Listings whose later pages are still held for the enclave, at most (each one a list of entries).
_LISTINGS_KEPT = 64


class _Listed:
    """The held rest of a listing, used like the ``os.scandir`` iterator it came from."""

    def __init__(self, entries: list[os.DirEntry[str]]) -> None:
        self._it = iter(entries)

    def __iter__(self) -> collections.abc.Iterator[os.DirEntry[str]]:
        return self._it

    def __enter__(self) -> _Listed:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _dtype(entry: os.DirEntry[str]) -> int:
    try:
        return (
            abi.DT_LNK if entry.is_symlink() else
            abi.DT_DIR if entry.is_dir(follow_symlinks=False) else
            abi.DT_REG if entry.is_file(follow_symlinks=False) else abi.DT_OTHER
        )  # fmt: skip
    except OSError:
        return abi.DT_UNKNOWN


def _consult(
    liar: Liar, ex: Executor, op: int, handler: Callable[[tuple[int, ...], bytes], Answer]
) -> Callable[[tuple[int, ...], bytes], Answer]:
    def run(a: tuple[int, ...], d: bytes) -> Answer:
        forged = liar.handle(op, a, d, ex)
        return handler(a, d) if forged is None else forged

    return run


__all__ = ["Answer", "Executor", "Hostile", "Liar", "Stats"]
