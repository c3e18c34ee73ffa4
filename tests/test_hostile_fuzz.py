"""A hostile host that lies about every opcode the enclave sends: hypothesis draws the lies, an oracle judges.

Theory of the harness
---------------------
The enclave's system-call client (``SyscallClient`` and ``iago.validate``) and the
real ``Executor`` run in this one thread over real shared-memory rings, on real
files and loopback sockets: the test submits a request, ``Executor.serve_pending``
executes it honestly, and a ``Liar`` plug-in swaps the honest answer for one that
``iago_lies`` draws (so hypothesis shrinks a failure to a small lie).  The reply
crosses the ring and is validated as in an enclave.  Each lie ends as one of:

* ``fail-stop``: a ``HostViolation`` (in an enclave: exit 86);
* ``oserror``: a clean ``OSError`` (or resolver error) for the app;
* ``honest``: exactly the honest value;
* ``trust``: a different value that ``iago_oracle`` says an honest host could
  have given, counted under its unprotected-I/O trust id (docs/threat-model.md).

Anything else is a wrong value that a check could have caught, and fails.  Each
scenario first makes the enclave's own set-up calls honestly (open, socket,
earlier listing pages...), validated, so iago knows what an enclave would.

A few end-to-end runs of real enclaves under a seeded lying host close the file.
Run with ``-s`` to see the tally per opcode.
"""

from __future__ import annotations

import collections
import copy
import fcntl
import os
import random
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import iago_lies
import iago_oracle
import pytest
from conftest import run_enclave, write_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyscone import abi, rings
from pyscone.abi import Op
from pyscone.enclave import iago
from pyscone.enclave.syscalls import SyscallClient
from pyscone.host.executor import Executor
from pyscone.host.hostile import Answer, Liar

EXAMPLES = int(os.environ.get("PYSCONE_FUZZ_EXAMPLES", "250"))
SLOT = 4096
OUTCOMES = ("fail-stop", "oserror", "honest", "trust")
#: op name -> outcome or "trust:<id>" -> count, over the whole module.
TALLY: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

Draw = Callable[[st.SearchStrategy[Any]], Any]


class Stopped(Exception):
    """What ``fail_stop`` raises here instead of ending the process."""


class Scripted(Liar):
    """Answers honestly, or as ``script`` says, and remembers the honest answer."""

    def __init__(self) -> None:
        super().__init__()
        self.script: Callable[[Answer], Answer] | None = None
        self.honest: Answer | None = None

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Executor, request: bytes
    ) -> Answer:
        self.honest = (result, err, payload)
        if self.script is None:
            return self.honest
        r, e, p = self.script(self.honest)
        # What fits the slot: an i64 result, an i32 errno, at most a slot of data.  (An honest
        # answer may sit at the edge: lseek(SEEK_END) of an ext4 directory is 2**63 - 1.)
        return (_clamp(r, 64), _clamp(e, 32), p[:SLOT])


def _clamp(value: int, bits: int) -> int:
    return max(-(1 << (bits - 1)), min(value, (1 << (bits - 1)) - 1))


@dataclass
class Request:
    op: int
    args: tuple[int, ...]
    data: bytes = b""
    wait: bool = False
    seen_names: set[str] = field(default_factory=set)


class World:
    """The enclave side, the host side and the resources the scenarios use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.region = rings.SharedRegion.create(abi.Geometry(16, SLOT))
        self.bells = (os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK))
        self.liar = Scripted()
        self.ex = Executor(self.region, *self.bells, sthreads=1, spin_us=0, hostile=self.liar)
        self.client = SyscallClient(rings.SharedRegion.attach(self.region.fd), *self.bells, spin_us=0)
        self.serial = 0
        (root / "f").write_bytes(bytes(range(256)) * 4)
        (root / "w").write_bytes(b"w" * 1024)
        (root / "d").mkdir()
        for name in ("a", "b", "c"):
            (root / "d" / name).write_text(name)
        (root / "big").mkdir()
        for i in range(400):  # about three pages of a 4 KiB slot
            (root / "big" / f"entry-{i:04d}-xxxxxxxx").touch()
        os.symlink("f", root / "link")
        os.symlink("nowhere", root / "dangling")
        (root / "scratch").mkdir()
        # The enclave's own descriptors, made honestly and validated, as an enclave would.
        self.f = self.open("f", os.O_RDONLY)
        self.call(Op.FSTAT, (self.f,))  # now known to be a regular file
        self.f_unknown = self.open("f", os.O_RDONLY)  # never fstat-ed: its type is unknown
        self.w = self.open("w", os.O_RDWR)
        self.call(Op.FSTAT, (self.w,))
        self.devnull = self.call(Op.OPEN, (os.O_RDWR, 0), b"/dev/null")[2]
        self.dirfd = self.open("d", os.O_RDONLY | os.O_DIRECTORY)
        self.call(Op.FSTAT, (self.dirfd,))
        self.listener = self.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.call(Op.BIND, (self.listener,), abi.encode_sockaddr(socket.AF_INET, ("127.0.0.1", 0)))
        self.call(Op.LISTEN, (self.listener, 128))
        self.listen_addr = self.call(Op.GETSOCKNAME, (self.listener,))[2]
        self.peer = socket.create_connection(self.listen_addr)
        self.conn = self.call(Op.ACCEPT, (self.listener,))[2][0]
        self.udp = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.call(Op.BIND, (self.udp,), abi.encode_sockaddr(socket.AF_INET, ("127.0.0.1", 0)))
        self.udp_addr = self.call(Op.GETSOCKNAME, (self.udp,))[2]
        self.udp_peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp_peer.bind(("127.0.0.1", 0))
        self.udp_peer.setblocking(False)
        self.peer.setblocking(False)
        self.pair = self.call(Op.SOCKETPAIR, (socket.AF_UNIX, socket.SOCK_STREAM, 0))[2]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.closed_port = s.getsockname()[1]
        # Semaphores: one that is never short of units (a waiting acquire is answered at once), a
        # lock, and a name that another semaphore can be opened by.
        self.sem_name = f"/pyscone-fuzz-{os.getpid()}-{id(self)}"
        self.sem = self.call(Op.SEM_NEW, (1000, abi.SEM_VALUE_MAX, 1), b"/pyscone-fuzz-plenty")[2]
        self.sem_lock = self.call(Op.SEM_NEW, (1, 1, 1), b"/pyscone-fuzz-lock")[2]
        self.sem_named = self.call(Op.SEM_NEW, (0, 1, 0), self.sem_name.encode())[2]
        self.clients: list[socket.socket] = []
        self.base_fds = iago.fds.snapshot()
        self.base_files, self.base_socks = set(self.ex._files), set(self.ex._socks)

    # -- calls -------------------------------------------------------------------------------

    def exchange(
        self, op: int, args: tuple[int, ...], data: bytes = b"", *, wait: bool = False, script: Any = None
    ) -> tuple[Answer, Answer]:
        """One request through the rings; returns (the reply the enclave read, the honest answer)."""
        self.liar.script, self.liar.honest = script, None
        sid = self.client.submit(op, abi.FLAG_WAIT if wait else 0, args, data)
        self.ex.serve_pending(timeout=5.0 if wait else 0.0)
        assert self.client.collect() == [sid], f"{Op(op).name} was not answered"
        reply = self.client.read_reply(sid)
        assert self.liar.honest is not None
        return reply, self.liar.honest

    def call(self, op: int, args: tuple[int, ...], data: bytes = b"", wait: bool = False) -> tuple[int, int, Any]:
        """An honest call, validated as the enclave validates it."""
        reply, _ = self.exchange(op, args, data, wait=wait)
        return iago.validate(op, args, data, *reply)

    def path(self, name: str) -> bytes:
        return str(self.root / name).encode()

    def unique(self) -> str:
        self.serial += 1
        return f"scratch/n{self.serial}"

    def open(self, name: str, flags: int) -> int:
        r, e, fd = self.call(Op.OPEN, (flags, 0o600), self.path(name))
        assert r >= 0, os.strerror(e)
        return int(fd)

    def socket(self, family: int, type_: int) -> int:
        return int(self.call(Op.SOCKET, (family, type_, 0))[2])

    # -- between examples --------------------------------------------------------------------

    def reset(self) -> None:
        # A lie hypothesis stopped drawing half-way leaves its slot unanswered: take it back.
        for sid in list(self.client.outstanding):
            self.client.outstanding.discard(sid)
            self.client.free.append(sid)
        for waiter in list(self.ex._parked.values()):
            self.ex._unpark(waiter)
        iago.fds.restore(self.base_fds)
        iago.listings = iago.Listings()
        for fd in set(self.ex._files) - self.base_files:
            self.ex._files.discard(fd)
            os.close(fd)
        for fd in set(self.ex._socks) - self.base_socks:
            self.ex._socks.pop(fd).close()
        for c in self.clients:
            c.close()
        self.clients.clear()
        lsock = self.ex._socks[self.listener]
        for s in (self.peer, self.udp_peer, self.ex._socks[self.conn], self.ex._socks[self.udp], lsock):
            _drain(s)

    def close(self) -> None:
        self.call(Op.SEM_UNLINK, (), self.sem_name.encode())
        self.peer.close()
        self.udp_peer.close()
        self.ex.stop()


def _drain(s: socket.socket) -> None:
    while True:
        try:
            if s.type == socket.SOCK_STREAM and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                s.accept()[0].close()
            elif not s.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return


# -- scenarios: one real request per opcode, with whatever honest set-up it needs ---------------


def _pick(draw: Draw, options: list[Any]) -> Any:
    return draw(st.sampled_from(options))


def _file_fd(w: World, draw: Draw) -> int:
    return int(_pick(draw, [w.f, w.f_unknown, w.w]))


SCENARIOS: dict[int, Callable[[World, Draw], Request]] = {}


def scenario(*ops: int) -> Callable[[Callable[[World, Draw, int], Request]], None]:
    def register(fn: Callable[[World, Draw, int], Request]) -> None:
        for op in ops:
            SCENARIOS[op] = lambda w, draw, op=op: fn(w, draw, op)  # type: ignore[misc]

    return register


@scenario(Op.NOP, Op.GETHOSTNAME)
def _no_args(w: World, draw: Draw, op: int) -> Request:
    return Request(op, ())


@scenario(Op.CANCEL)
def _cancel(w: World, draw: Draw, op: int) -> Request:
    return Request(op, (draw(st.integers(0, 15)),))  # nothing is parked: the host just says done


@scenario(Op.OPEN)
def _open(w: World, draw: Draw, op: int) -> Request:
    name, flags = _pick(
        draw,
        [
            ("f", os.O_RDONLY),
            ("f", os.O_RDWR),
            ("missing", os.O_RDONLY),
            ("d", os.O_RDONLY | os.O_DIRECTORY),
            ("f", os.O_RDONLY | os.O_DIRECTORY),
            (w.unique(), os.O_RDWR | os.O_CREAT | os.O_EXCL),
            ("link", os.O_PATH | os.O_NOFOLLOW),
            ("d", os.O_RDWR | os.O_TMPFILE),
            ("d", os.O_WRONLY),
        ],
    )
    return Request(op, (flags, 0o600), w.path(name))


@scenario(Op.CLOSE)
def _close(w: World, draw: Draw, op: int) -> Request:
    fd = w.open("f", os.O_RDONLY) if draw(st.booleans()) else -1  # (-1: EBADF, and no fd of ours)
    return Request(op, (fd,))


@scenario(Op.READ)
def _read(w: World, draw: Draw, op: int) -> Request:
    count = draw(st.integers(0, 300))
    if draw(st.booleans()):
        fd = _file_fd(w, draw)
        w.call(Op.LSEEK, (fd, draw(st.integers(0, 1100)), os.SEEK_SET))
        return Request(op, (fd, count))
    w.peer.send(draw(st.binary(max_size=200)))
    return Request(op, (w.conn, count))


@scenario(Op.WRITE)
def _write(w: World, draw: Draw, op: int) -> Request:
    fd = _pick(draw, [w.w, w.conn, w.devnull, w.f])  # (f is read-only: EBADF)
    if fd == w.w:
        w.call(Op.LSEEK, (fd, 0, os.SEEK_SET))
    return Request(op, (fd,), draw(st.binary(max_size=300)))


@scenario(Op.PREAD)
def _pread(w: World, draw: Draw, op: int) -> Request:
    return Request(op, (_file_fd(w, draw), draw(st.integers(0, 300)), draw(st.integers(-1, 1100))))


@scenario(Op.PWRITE)
def _pwrite(w: World, draw: Draw, op: int) -> Request:
    return Request(op, (_pick(draw, [w.w, w.f]), draw(st.integers(-1, 1000))), draw(st.binary(max_size=24)))


@scenario(Op.PWRITE_SYNC)
def _pwrite_sync(w: World, draw: Draw, op: int) -> Request:
    cut = _pick(draw, [-1, -1, 0, 30, 2000])
    return Request(op, (_pick(draw, [w.w, w.f]), draw(st.integers(-1, 1000)), cut), draw(st.binary(max_size=24)))


@scenario(Op.LSEEK)
def _lseek(w: World, draw: Draw, op: int) -> Request:
    # (Not the console: the executor's fds 0-2 are pytest's own.)
    fd = _pick(draw, [w.f, w.f_unknown, w.w, w.devnull, w.dirfd, w.conn])
    whence = _pick(draw, [os.SEEK_SET, os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE, 7])
    return Request(op, (fd, draw(st.integers(-5, 2000)), whence))


@scenario(Op.FSTAT)
def _fstat(w: World, draw: Draw, op: int) -> Request:
    choice = _pick(draw, ["f", "unknown", "dir", "devnull", "conn", "udp", "pair", "created", "path", "tmpfile"])
    fd = {"f": w.f, "unknown": w.f_unknown, "dir": w.dirfd, "devnull": w.devnull, "conn": w.conn, "udp": w.udp}.get(
        choice, w.pair[0]
    )
    if choice == "created":
        fd = w.open(w.unique(), os.O_RDWR | os.O_CREAT | os.O_EXCL)
    elif choice == "path":
        fd = w.open("link", os.O_PATH | os.O_NOFOLLOW)
    elif choice == "tmpfile":
        fd = w.open("d", os.O_RDWR | os.O_TMPFILE)
    return Request(op, (fd,))


@scenario(Op.STAT)
def _stat(w: World, draw: Draw, op: int) -> Request:
    name = _pick(draw, ["f", "d", "link", "dangling", "missing", "/"])
    path = b"/" if name == "/" else w.path(name)
    return Request(op, (int(draw(st.booleans())),), path)


@scenario(Op.LISTDIR)
def _listdir(w: World, draw: Draw, op: int) -> Request:
    name = _pick(draw, ["d", "big", "big", "missing"])
    path, start, seen = w.path(name), 0, set()
    for _ in range(draw(st.integers(0, 2)) if name == "big" else 0):  # honest earlier pages
        _r, _e, value = w.call(Op.LISTDIR, (start,), path)
        entries, more = value
        seen.update(e.name for e in entries)
        start += len(entries)
        if not more:
            break
    return Request(op, (start,), path, seen_names=seen)


@scenario(Op.MKDIR, Op.RMDIR, Op.UNLINK, Op.CHMOD, Op.UTIME, Op.READLINK, Op.ACCESS)
def _path_op(w: World, draw: Draw, op: int) -> Request:
    name = _pick(draw, ["f", "d", "link", "missing", "made"])
    if name == "made":
        name = w.unique()
        if op in (Op.RMDIR,):
            os.mkdir(w.root / name)
        else:
            (w.root / name).write_text("x")
    args = {
        Op.MKDIR: (0o700,),
        Op.CHMOD: (_pick(draw, [0o600, 0o644]),),
        Op.UTIME: _pick(draw, [(0, 0, 0), (1, 10**18, 2 * 10**18)]),
        Op.ACCESS: (_pick(draw, [os.F_OK, os.R_OK, os.W_OK, os.X_OK]),),
    }.get(op, ())
    return Request(op, args, w.path(name))


@scenario(Op.RENAME, Op.SYMLINK)
def _two_paths(w: World, draw: Draw, op: int) -> Request:
    src = w.unique()
    if draw(st.booleans()):
        (w.root / src).write_text("x")
    dst = _pick(draw, [w.unique(), "d"])
    return Request(op, (int(draw(st.booleans())),) if op == Op.RENAME else (), w.path(src) + b"\0" + w.path(dst))


@scenario(Op.FSYNC, Op.FTRUNCATE, Op.ISATTY)
def _fd_op(w: World, draw: Draw, op: int) -> Request:
    fd = _pick(draw, [w.w, w.conn, w.devnull, -1] if op == Op.ISATTY else [w.w, w.f, -1])
    return Request(op, (fd, 1024) if op == Op.FTRUNCATE else (fd,))


@scenario(Op.LOCK)
def _lock(w: World, draw: Draw, op: int) -> Request:
    fd = _pick(draw, [w.w, w.f, w.conn, -1])
    family = _pick(draw, [abi.LOCK_FLOCK, abi.LOCK_POSIX, 7])
    if family == abi.LOCK_FLOCK:
        kind = _pick(draw, [fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_UN, 99])
    else:
        kind = _pick(draw, [fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK, 99])
    return Request(op, (fd, family, kind, _pick(draw, [0, 10]), _pick(draw, [0, 5]), os.SEEK_SET))


@scenario(Op.FORK, Op.FORK_DONE, Op.KILL, Op.FUTIME)
def _process(w: World, draw: Draw, op: int) -> Request:
    # (The fuzz's host has no family: FORK and FORK_DONE are refused honestly; lies are still drawn.)
    if op == Op.FORK:
        return Request(op, ())
    if op == Op.FORK_DONE:
        return Request(op, (_pick(draw, [1, 3]), _pick(draw, [-1, 12345])))
    if op == Op.KILL:  # signal 0: is it there (this process, or one that is not)
        return Request(op, (_pick(draw, [os.getpid(), 2**22 + 17]), 0))
    return Request(op, (_file_fd(w, draw), *_pick(draw, [(0, 0, 0), (1, 10**18, 2 * 10**18)])))


@scenario(Op.SPAWN, Op.SPAWN_WAIT, Op.SPAWN_KILL)
def _spawned(w: World, draw: Draw, op: int) -> Request:
    # (The fuzz's host spawns nothing: SPAWN is ENOSYS, a wait ECHILD, a kill ESRCH; lies are still drawn.)
    if op == Op.SPAWN:
        return Request(op, (), abi.SPAWN_FD.pack(1, w.f))
    return Request(
        op, (_pick(draw, [12345, 2**22 + 17]), _pick(draw, [0, os.WNOHANG] if op == Op.SPAWN_WAIT else [0, 9]))
    )


@scenario(Op.SEM_NEW, Op.SEM_OPEN, Op.SEM_ACQUIRE, Op.SEM_RELEASE, Op.SEM_VALUE, Op.SEM_CLOSE, Op.SEM_UNLINK)
def _semaphore(w: World, draw: Draw, op: int) -> Request:
    if op == Op.SEM_NEW:  # (unlinked at once, or a name in use: EEXIST)
        name = _pick(draw, ["/pyscone-fuzz-new", w.sem_name, "/a/b"])
        return Request(op, (_pick(draw, [0, 1, 5]), _pick(draw, [1, 5, abi.SEM_VALUE_MAX]), 1), name.encode())
    if op == Op.SEM_OPEN:
        return Request(op, (1,), _pick(draw, [w.sem_name, "/pyscone-fuzz-missing"]).encode())
    if op == Op.SEM_UNLINK:
        return Request(op, (), b"/pyscone-fuzz-missing")  # (ENOENT: the world's name stays)
    if op == Op.SEM_CLOSE:
        return Request(op, (_pick(draw, [9999, int(w.call(Op.SEM_NEW, (0, 1, 1), b"/pyscone-fuzz-c")[2])]),))
    handle = _pick(draw, [w.sem, w.sem_lock, w.sem_named, 9999])
    if op == Op.SEM_ACQUIRE:  # waiting only where a unit is there: the fuzz's host answers in place
        return Request(op, (handle, 1 if handle == w.sem and draw(st.booleans()) else 0), wait=True)
    return Request(op, (handle,))


@scenario(Op.STATVFS)
def _statvfs(w: World, draw: Draw, op: int) -> Request:
    fd = _pick(draw, [-1, -1, w.f, w.conn, 999])
    return Request(op, (fd,), w.path(_pick(draw, ["f", "d", "missing"])) if fd == -1 else b"")


@scenario(Op.READFILE)
def _readfile(w: World, draw: Draw, op: int) -> Request:
    limit = _pick(draw, [0, 4, 64, 2000, 65536])
    return Request(op, (limit,), w.path(_pick(draw, ["f", "f", "w", "d", "missing"])))


@scenario(Op.SOCKET, Op.SOCKETPAIR)
def _socket(w: World, draw: Draw, op: int) -> Request:
    family = _pick(draw, [socket.AF_UNIX] if op == Op.SOCKETPAIR else [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX])
    if op == Op.SOCKETPAIR and draw(st.integers(0, 4)) == 0:
        family = socket.AF_INET  # EOPNOTSUPP
    return Request(op, (family, _pick(draw, [socket.SOCK_STREAM, socket.SOCK_DGRAM, 99]), _pick(draw, [0, 0, 6, 17])))


@scenario(Op.BIND, Op.LISTEN, Op.CONNECT)
def _setup_socket(w: World, draw: Draw, op: int) -> Request:
    fd = w.socket(socket.AF_INET, _pick(draw, [socket.SOCK_STREAM, socket.SOCK_DGRAM]))
    if op == Op.BIND:
        host = _pick(draw, ["127.0.0.1", "10.255.255.1"])  # the second is not ours: EADDRNOTAVAIL
        return Request(op, (fd,), abi.encode_sockaddr(socket.AF_INET, (host, 0)))
    if op == Op.LISTEN:
        w.call(Op.BIND, (fd,), abi.encode_sockaddr(socket.AF_INET, ("127.0.0.1", 0)))
        return Request(op, (fd, draw(st.integers(0, 16))))
    port = _pick(draw, [w.listen_addr[1], w.closed_port])
    return Request(op, (fd,), abi.encode_sockaddr(socket.AF_INET, ("127.0.0.1", port)), wait=True)


@scenario(Op.ACCEPT)
def _accept(w: World, draw: Draw, op: int) -> Request:
    if draw(st.integers(0, 3)):
        w.clients.append(socket.create_connection(w.listen_addr))
    return Request(op, (w.listener,))  # (no client: EAGAIN)


@scenario(Op.SEND, Op.SENDTO)
def _send(w: World, draw: Draw, op: int) -> Request:
    payload = draw(st.binary(max_size=300))
    if op == Op.SEND:
        return Request(op, (_pick(draw, [w.conn, w.pair[0], w.udp]), 0), payload)
    dest = abi.encode_sockaddr(socket.AF_INET, w.udp_peer.getsockname())
    return Request(op, (w.udp, 0), struct.pack("<I", len(dest)) + dest + payload)


@scenario(Op.RECV, Op.RECVFROM)
def _recv(w: World, draw: Draw, op: int) -> Request:
    sent = draw(st.binary(max_size=200))
    if op == Op.RECVFROM and draw(st.booleans()):
        if sent:
            w.udp_peer.sendto(sent, w.udp_addr)
        return Request(op, (w.udp, draw(st.integers(0, 300)), 0))
    w.peer.send(sent)
    return Request(op, (w.conn, draw(st.integers(0, 300)), 0))


@scenario(Op.SENDMSG_FDS, Op.RECVMSG_FDS)
def _fd_passing(w: World, draw: Draw, op: int) -> Request:
    a, b = w.call(Op.SOCKETPAIR, (socket.AF_UNIX, socket.SOCK_STREAM, 0))[2]
    if op == Op.SENDMSG_FDS:
        return Request(op, (a, 0, 1), struct.pack("<i", w.f) + draw(st.binary(max_size=200)))
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<i", w.f))] if draw(st.booleans()) else []
    w.ex._socks[b].sendmsg([draw(st.binary(min_size=1, max_size=100))], rights)
    return Request(op, (a, draw(st.integers(0, 300)), 0, _pick(draw, [0, 1, 4])))


@scenario(Op.SHUTDOWN)
def _shutdown(w: World, draw: Draw, op: int) -> Request:
    a, _b = w.call(Op.SOCKETPAIR, (socket.AF_UNIX, socket.SOCK_STREAM, 0))[2]
    return Request(op, (a, _pick(draw, [socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR, 5])))


@scenario(Op.SETSOCKOPT)
def _setsockopt(w: World, draw: Draw, op: int) -> Request:
    fd = _pick(draw, [w.conn, w.udp, w.f])
    level, opt, is_bytes, value = _pick(
        draw,
        [
            (socket.SOL_SOCKET, socket.SO_REUSEADDR, 0, 1),
            (socket.IPPROTO_TCP, socket.TCP_NODELAY, 0, 1),
            (socket.SOL_SOCKET, socket.SO_LINGER, 1, 0),
            (9999, 1, 0, 1),
        ],
    )
    return Request(op, (fd, level, opt, is_bytes, value), struct.pack("ii", 0, 0) if is_bytes else b"")


OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_TYPE, 0),
    (socket.SOL_SOCKET, socket.SO_DOMAIN, 0),
    (socket.SOL_SOCKET, socket.SO_PROTOCOL, 0),
    (socket.SOL_SOCKET, socket.SO_ERROR, 0),
    (socket.SOL_SOCKET, socket.SO_REUSEADDR, 0),
    (socket.SOL_SOCKET, socket.SO_ACCEPTCONN, 0),
    (socket.SOL_SOCKET, socket.SO_RCVBUF, 0),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 0),
    (socket.SOL_SOCKET, socket.SO_LINGER, 8),
    (socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16),
]


@scenario(Op.GETSOCKOPT)
def _getsockopt(w: World, draw: Draw, op: int) -> Request:
    level, opt, buflen = _pick(draw, OPTIONS)
    return Request(op, (_pick(draw, [w.conn, w.listener, w.udp, w.pair[0], w.f]), level, opt, buflen))


@scenario(Op.GETSOCKNAME, Op.GETPEERNAME)
def _names(w: World, draw: Draw, op: int) -> Request:
    return Request(op, (_pick(draw, [w.conn, w.listener, w.udp, w.pair[0]]),))


@scenario(Op.GETADDRINFO)
def _getaddrinfo(w: World, draw: Draw, op: int) -> Request:
    host = _pick(draw, [b"127.0.0.1", b"::1", b"10.1.2.3", b"fe80::1%lo", b"", b"localhost", b"localhost"])
    families = [0, socket.AF_INET] if host == b"localhost" else [0, socket.AF_INET, socket.AF_INET6]
    flags = 0
    for bit in (socket.AI_PASSIVE, socket.AI_CANONNAME, socket.AI_NUMERICHOST, socket.AI_NUMERICSERV):
        flags |= bit if draw(st.integers(0, 3)) == 0 else 0
    family = _pick(draw, families)
    if family == socket.AF_INET6 and draw(st.booleans()):
        flags |= socket.AI_V4MAPPED
    args = (family, _pick(draw, [0, socket.SOCK_STREAM, socket.SOCK_DGRAM]), _pick(draw, [0, 0, 6]), flags)
    return Request(op, args, host + b"\0" + _pick(draw, [b"80", b"", b"http", b"0", b"70000"]))


@scenario(Op.GETNAMEINFO)
def _getnameinfo(w: World, draw: Draw, op: int) -> Request:
    addr, flags = _pick(
        draw,
        [
            (("127.0.0.1", 80), 0),
            (("127.0.0.1", 80), socket.NI_NAMEREQD),
            (("127.0.0.1", 8080), socket.NI_NUMERICSERV),
            (("127.0.0.1", 80), socket.NI_NUMERICHOST),
            (("::1", 443), socket.NI_NUMERICHOST),
            (("10.1.2.3", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV),
            (("localhost", 80), socket.NI_NUMERICHOST),  # not numeric: CPython refuses it
        ],
    )
    return Request(op, (socket.AF_INET, flags), abi.encode_sockaddr(socket.AF_INET, addr))


@scenario(Op.POLL)
def _poll(w: World, draw: Draw, op: int) -> Request:
    fds = draw(
        st.lists(st.sampled_from([w.conn, w.udp, w.pair[0], w.listener, w.f]), min_size=1, max_size=3, unique=True)
    )
    if draw(st.booleans()):
        w.peer.send(b"ready")
    events = [(fd, _pick(draw, [abi.POLLIN, abi.POLLOUT, abi.POLLIN | abi.POLLOUT, abi.POLLPRI])) for fd in fds]
    return Request(op, (len(events),), abi.encode_pollfds(events))


# -- the fuzz -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    def stop(reason: str) -> None:
        raise Stopped(reason)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(iago, "fail_stop", stop)
        saved, listings = iago.fds.snapshot(), iago.listings
        w = World(tmp_path_factory.mktemp("hostile"))
        try:
            yield w
        finally:
            w.close()
            iago.fds.restore(saved)
            iago.listings = listings
    _print_tally()


def _validate(req: Request, reply: Answer, fds: iago.FdTable, listings: iago.Listings) -> tuple[int, int, Any]:
    """Validate ``reply`` from the enclave's state before the call."""
    iago.fds.restore(fds)
    iago.listings = copy.deepcopy(listings)
    return iago.validate(req.op, req.args, req.data, *reply)


def one_lie(w: World, op: int, draw: Draw) -> str:
    """Make one request, lie about it, and classify what the app would get."""
    w.reset()
    req = SCENARIOS[op](w, draw)
    assert req.op == op
    ctx = iago_oracle.Context(iago.fds.snapshot(), req.seen_names)
    listings = copy.deepcopy(iago.listings)
    told: list[Answer] = []

    def script(honest: Answer) -> Answer:
        lie = iago_lies.draw_lie(draw, op, req.args, req.data, honest, ctx)
        told.append((_clamp(lie[0], 64), _clamp(lie[1], 32), lie[2][:SLOT]))
        return lie

    reply, honest = w.exchange(op, req.args, req.data, wait=req.wait, script=script)
    assert [reply] == told, "the ring did not carry the host's answer as written"
    try:
        hr, _he, hv = _validate(req, honest, ctx.fds, listings)
    except Stopped as e:
        raise AssertionError(f"{Op(op).name}: the honest answer {honest!r} was refused: {e}") from None
    if hr >= 0:
        assert iago_oracle.possible(op, req.args, req.data, hr, hv, ctx), f"oracle refuses honest {hv!r}"
    try:
        lr, _le, lv = _validate(req, reply, ctx.fds, listings)
    except Stopped:
        return "fail-stop"
    if lr < 0:
        return "oserror"
    if (lr, lv) == (hr, hv):
        return "honest"
    ids = iago_oracle.judge(op, req.args, req.data, (hr, hv), (lr, lv), ctx)
    assert ids is not None, (
        f"{Op(op).name}{req.args} {req.data[:80]!r}: the app would get the wrong value {lv!r} "
        f"(honest: {hv!r}) from the lie {reply!r}"
    )
    assert ids <= set(iago_oracle.TRUST), ids
    return "trust:" + ",".join(sorted(ids))


ENCLAVE_OPS = sorted(SCENARIOS, key=lambda op: int(op))


@pytest.mark.parametrize("op", ENCLAVE_OPS, ids=lambda op: Op(op).name.lower())
def test_every_lie_is_caught_or_undetectable(world: World, op: int) -> None:
    tally = TALLY[Op(op).name]

    @settings(
        max_examples=EXAMPLES,
        derandomize=os.environ.get("CI") == "true",  # CI gates a landing on fixed lies; local runs explore
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        outcome = one_lie(world, op, data.draw)
        tally["tried"] += 1
        kind, _, ids = outcome.partition(":")
        tally[kind] += 1
        for trust_id in filter(None, ids.split(",")):
            tally["trust:" + trust_id] += 1

    run()
    assert tally["tried"] >= EXAMPLES // 2
    assert tally["fail-stop"] > 0, "no lie about this opcode was caught: the lies are too tame"


def test_every_opcode_the_enclave_sends_is_fuzzed() -> None:
    sent = set()
    root = Path(iago.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "iago.py":
            continue
        for name in Op.__members__:
            if f"Op.{name}" in path.read_text():
                sent.add(Op[name])
    sent.add(Op.NOP)  # the benchmarks' round trip
    assert sent <= set(SCENARIOS), f"no lies for {sorted(o.name for o in sent - set(SCENARIOS))}"
    assert set(SCENARIOS) == set(iago.VALIDATORS) == set(iago_lies.SHAPED) == set(iago_oracle.SPECS)


def test_the_trust_list_is_the_documented_one() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "threat-model.md").read_text()
    section = doc.split("## What the host can still do", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            documented[cells[0].strip("`")] = cells[1]
    assert documented == iago_oracle.TRUST


def _print_tally() -> None:
    if not TALLY:
        return
    out = sys.stdout
    cols = ("tried", *OUTCOMES)
    out.write("\nhostile-host fuzz: lies per opcode and what became of them\n")
    out.write(f"{'opcode':<12}" + "".join(f"{c:>10}" for c in cols) + "  trust ids\n")
    totals: collections.Counter[str] = collections.Counter()
    for name in sorted(TALLY, key=lambda n: int(Op[n])):
        t = TALLY[name]
        totals.update(t)
        trust = ", ".join(f"{k[6:]} {v}" for k, v in sorted(t.items()) if k.startswith("trust:"))
        out.write(f"{name.lower():<12}" + "".join(f"{t[c]:>10}" for c in cols) + f"  {trust}\n")
    out.write(f"{'total':<12}" + "".join(f"{totals[c]:>10}" for c in cols) + "\n")
    out.flush()


# -- end to end: real enclaves under a seeded lying host ------------------------------------------

E2E_APP = """
import os, select, socket, sys
with open("data.txt", "w") as f:
    f.write("0123456789")
fd = os.open("data.txt", os.O_RDONLY)
print("read", os.read(fd, 4), os.lseek(fd, 2, os.SEEK_SET), os.fstat(fd).st_size)
print("listed", sorted(os.listdir(".")), os.stat("data.txt").st_size, os.path.isdir("."))
try:
    open("missing.txt")
except OSError as e:
    print("errno", e.errno)
srv = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(srv.getsockname())
s, addr = srv.accept()
c.sendall(b"hi")
print("tcp", select.select([s], [], [], 5)[0] == [s], s.recv(10), addr[0], s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); v.sendto(b"dgram", u.getsockname())
data, sender = u.recvfrom(100)
print("udp", data, sender[0], socket.getaddrinfo("127.0.0.1", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4])
sys.stdout.flush()
"""
SEEDS = int(os.environ.get("PYSCONE_FUZZ_SEEDS", "24"))


def test_seeded_lies_in_real_enclaves_stop_before_the_app_sees_them(tmp_path: Path) -> None:
    app = write_app(tmp_path, E2E_APP)
    env = {"PYTHONPATH": str(Path(__file__).parent)}
    honest = run_enclave(app, cwd=tmp_path, env={**env, "PYSCONE_TEST_HOSTILE": "py:liars:RandomLie:0:0"})
    assert honest.returncode == 0, honest.stderr
    calls = int(honest.stderr.split("pyscone-test: ", 1)[1].split(" calls", 1)[0])
    lied_about: collections.Counter[str] = collections.Counter()
    for seed in random.Random(9).sample(range(10**6), SEEDS):
        r = run_enclave(app, cwd=tmp_path, env={**env, "PYSCONE_TEST_HOSTILE": f"py:liars:RandomLie:{seed}:{calls}"})
        told = [line for line in r.stderr.splitlines() if line.startswith("pyscone-test: lied about ")]
        if not told:  # this run made fewer calls than the honest one: no lie, same output
            assert r.returncode == 0 and r.stdout == honest.stdout, (seed, r.stderr)
            continue
        lied_about[told[0].split()[3].rstrip(":")] += 1
        assert r.returncode == iago.EXIT_HOST_VIOLATION, (seed, told, r.stdout, r.stderr)
        assert r.stderr.strip().splitlines()[-1].startswith("pyscone: enclave stopped: host violation: ")
        # What the app printed before the lie is the honest output's beginning: nothing forged.
        assert honest.stdout.startswith(r.stdout), (seed, told, r.stdout)
    print(f"\nseeded lies in real enclaves ({calls} calls per run): {dict(sorted(lied_about.items()))}")
    assert sum(lied_about.values()) >= SEEDS // 2
