"""Lying hosts for end-to-end tests, loaded by ``pyscone run`` as plug-ins.

``PYSCONE_TEST_HOSTILE=py:liars:Lie:CASE`` (with this directory on ``PYTHONPATH``)
makes the executor tell the lie named CASE once, the first time a call it is
about comes by; ``py:liars:RandomLie:SEED:CALLS`` tells one catchable lie, about
the call (of the first CALLS) a seeded choice picks, whatever its opcode; with CALLS 0 it
only counts the calls of an honest run.  Each lie has a valid shape, so
only a check of its *value* can catch it.  A liar says on stderr what it did
(``pyscone-test: lied ...``), so the tests know the lie was told.
"""

from __future__ import annotations

import atexit
import dataclasses
import random
import socket
import stat
import struct
import sys
from collections.abc import Callable
from typing import Any

from pyscone import abi
from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar

FORGED_IP = "10.6.6.6"


def _infos(payload: bytes) -> list[list[Any]]:
    return [list(i) for i in abi.decode_addrinfo(payload)]


def _encode(infos: list[list[Any]]) -> Answer:
    return (len(infos), 0, abi.encode_addrinfo([tuple(i) for i in infos]))  # type: ignore[misc]


def _stat_with(payload: bytes, **fields: int) -> Answer:
    return (0, 0, dataclasses.replace(abi.StatResult.unpack(payload), **fields).pack())


class Lie(Liar):
    """One lie, named by ``arg``, told once."""

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in CASES:
            raise ValueError(f"no lie called {arg!r}")
        self.case = CASES[arg]
        self.fired = False
        self.data_fds: set[int] = set()  # fds of files whose name ends in data.txt
        self.sockets: set[int] = set()
        self.pages: dict[bytes, list[str]] = {}  # path -> names on its first listing page

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op == Op.OPEN and result >= 0 and request.endswith(b"data.txt"):
            self.data_fds.add(result)
        if op in (Op.SOCKET, Op.ACCEPT) and result >= 0:
            self.sockets.add(result)
        if op == Op.LISTDIR and result > 0 and args[0] == 0:
            self.pages[request] = [e.name for e in abi.decode_dirents(payload)[0]]
        if self.fired:
            return (result, err, payload)
        forged = self.case(self, op, args, result, err, payload, request)
        if forged is None:
            return (result, err, payload)
        self.fired = True
        print(f"pyscone-test: lied about {Op(op).name}: {self.arg}", file=sys.stderr, flush=True)
        return forged


Case = Callable[[Lie, int, tuple[int, ...], int, int, bytes, bytes], Answer | None]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


# -- name resolution ------------------------------------------------------------------------------


@case("gai-family")
def _gai_family(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.GETADDRINFO or r <= 0 or a[0] != socket.AF_INET:
        return None
    return _encode(
        [[socket.AF_INET6, t, pr, c, ("::ffff:" + FORGED_IP, sa[1], 0, 0)] for _f, t, pr, c, sa in _infos(p)]
    )


@case("gai-socktype")
def _gai_socktype(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.GETADDRINFO or r <= 0 or a[1] != socket.SOCK_STREAM:
        return None
    return _encode([[f, socket.SOCK_DGRAM, socket.IPPROTO_UDP, c, sa] for f, _t, _p, c, sa in _infos(p)])


@case("gai-numeric-host")
def _gai_numeric(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.GETADDRINFO or r <= 0 or not req.startswith(b"127.0.0.1\0"):
        return None
    return _encode([[f, t, pr, c, (FORGED_IP, sa[1])] for f, t, pr, c, sa in _infos(p) if f == socket.AF_INET])


@case("gai-port")
def _gai_port(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.GETADDRINFO or r <= 0 or not req.endswith(b"\x008080"):
        return None
    return _encode([[f, t, pr, c, (sa[0], 6666, *sa[2:])] for f, t, pr, c, sa in _infos(p)])


@case("gai-canonname")
def _gai_canon(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.GETADDRINFO or r <= 0 or a[3] & socket.AI_CANONNAME:
        return None
    return _encode([[f, t, pr, "evil.example", sa] for f, t, pr, _c, sa in _infos(p)])


@case("gai-no-host")
def _gai_no_host(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.GETADDRINFO or r <= 0 or not req.startswith(b"\0"):
        return None
    return _encode([[socket.AF_INET, t, pr, c, (FORGED_IP, sa[1])] for _f, t, pr, c, sa in _infos(p)])


@case("gai-numerichost-flag")
def _gai_flag(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.GETADDRINFO or r >= 0 or not a[3] & socket.AI_NUMERICHOST:
        return None
    return _encode([[socket.AF_INET, socket.SOCK_STREAM, 6, "", (FORGED_IP, 80)]])


@case("gai-empty")
def _gai_empty(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    return _encode([]) if op == Op.GETADDRINFO and r > 0 else None


@case("nameinfo-numeric")
def _ni_numeric(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.GETNAMEINFO or r < 0 or not a[1] & socket.NI_NUMERICHOST:
        return None
    return (0, 0, FORGED_IP.encode() + b"\x006666")


@case("nameinfo-not-numeric")
def _ni_name(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    return (0, 0, b"evil.example\0http") if op == Op.GETNAMEINFO and r < 0 else None


@case("hostname-long")
def _hostname(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    return (0, 0, b"forged" * 20) if op == Op.GETHOSTNAME and r == 0 else None


# -- datagrams and socket options ----------------------------------------------------------------


@case("recvfrom-no-sender")
def _no_sender(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.RECVFROM or r < 0:
        return None
    (alen,) = struct.unpack_from("<I", p, 0)
    return (r, 0, struct.pack("<I", 0) + p[4 + alen :]) if alen else None


@case("recvfrom-stream-sender")
def _stream_sender(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.RECVFROM or r < 0 or struct.unpack_from("<I", p, 0)[0]:
        return None
    addr = abi.INET_ADDR.pack(6666, 0, 0) + FORGED_IP.encode()
    return (r, 0, struct.pack("<I", len(addr)) + addr + p[4:])


def _option(opt: int, value: int, level: int = socket.SOL_SOCKET) -> Case:
    def lie(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
        return (value, 0, b"") if op == Op.GETSOCKOPT and a[1:3] == (level, opt) and not a[3] and r >= 0 else None

    return lie


CASES["so-type"] = _option(socket.SO_TYPE, socket.SOCK_DGRAM)
CASES["so-domain"] = _option(socket.SO_DOMAIN, socket.AF_INET6)
CASES["so-protocol"] = _option(socket.SO_PROTOCOL, socket.IPPROTO_UDP)
CASES["so-error"] = _option(socket.SO_ERROR, 99999)
CASES["so-bool"] = _option(socket.SO_REUSEADDR, 7)


@case("isatty-socket")
def _isatty(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    return (1, 0, b"") if op == Op.ISATTY and a[0] in lie.sockets else None


# -- files -----------------------------------------------------------------------------------------


@case("dirent-repeat")
def _repeat(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    first = lie.pages.get(req)
    if op != Op.LISTDIR or r <= 0 or not a[0] or not first:
        return None
    entries, more = abi.decode_dirents(p)
    entries[0] = abi.Dirent(first[0], entries[0].dtype)  # a name the first page gave already
    return (len(entries), 0, abi.encode_dirents(entries, more))


@case("stat-followed-link")
def _followed(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.STAT or r < 0 or not a[0] or not req.endswith(b"data.txt"):
        return None
    return _stat_with(p, mode=stat.S_IFLNK | 0o777)


@case("stat-root-not-dir")
def _root(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    return _stat_with(p, mode=stat.S_IFREG | 0o644) if op == Op.STAT and r == 0 and req == b"/" else None


@case("stat-owner")
def _owner(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    return _stat_with(p, uid=1 << 40) if op == Op.STAT and r == 0 and req.endswith(b"data.txt") else None


@case("stat-blksize")
def _blksize(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    return _stat_with(p, blksize=0) if op == Op.STAT and r == 0 and req.endswith(b"data.txt") else None


@case("fstat-socket-kind")
def _fstat_socket(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.FSTAT or r != 0 or a[0] not in lie.sockets:
        return None
    return _stat_with(p, mode=stat.S_IFREG | 0o644)


@case("fstat-created-kind")
def _fstat_created(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    if op != Op.FSTAT or r != 0 or a[0] not in lie.data_fds:
        return None
    return _stat_with(p, mode=stat.S_IFLNK | 0o777)


def _lseek(whence: int, forge: Callable[[int, int], int], on_failure: bool = False) -> Case:
    def lie(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
        if op != Op.LSEEK or a[2] != whence or (r < 0) != on_failure:
            return None
        return (forge(a[1], r), 0, b"")

    return lie


CASES["lseek-set"] = _lseek(0, lambda offset, r: offset + 3)
CASES["lseek-end"] = _lseek(2, lambda offset, r: offset // 2)  # a file of negative size
CASES["lseek-whence"] = _lseek(7, lambda offset, r: 0, on_failure=True)
CASES["lseek-socket"] = _lseek(1, lambda offset, r: 0, on_failure=True)


@case("readlink-empty")
def _readlink(lie: Lie, op: int, a: tuple[int, ...], r: int, e: int, p: bytes, req: bytes) -> Answer | None:
    return (0, 0, b"") if op == Op.READLINK and r == 0 else None


# -- one catchable lie about whichever call a seed picks ---------------------------------------------


class RandomLie(Liar):
    """Lies once, about the N-th call (N from the seed), in a way every opcode's checks must catch."""

    GENERIC = ("errno-on-success", "failure-without-errno", "failure-with-data", "impossible-result")

    def __init__(self, arg: str = "0:100") -> None:
        super().__init__(arg)
        seed, _, calls = arg.partition(":")
        self.rng = random.Random(int(seed))
        self.calls = 0
        if calls == "0":  # tell no lie; count the calls of an honest run
            self.at = -1
            atexit.register(lambda: print(f"pyscone-test: {self.calls} calls", file=sys.stderr, flush=True))
        else:
            self.at = self.rng.randrange(1, int(calls or 100) + 1)

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        self.calls += 1
        # (Replies to CANCEL, CLOSE and a posted SETSOCKOPT are dropped unread: lie about the next call.)
        if self.calls != self.at or op in (Op.NOP, Op.CANCEL, Op.CLOSE, Op.SETSOCKOPT):
            if self.calls == self.at:
                self.at += 1
            return (result, err, payload)
        how, forged = self._forge(op, args, result, err, payload)
        print(f"pyscone-test: lied about {Op(op).name}: {how}", file=sys.stderr, flush=True)
        return forged

    def _forge(self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes) -> tuple[str, Answer]:
        specific = []
        if result >= 0 and op in (Op.READ, Op.PREAD, Op.RECV):
            specific.append(("read-overflow", (args[1] + 1, 0, b"F" * (args[1] + 1))))
        if result >= 0 and op in abi.NEW_FD_OPS:
            specific.append(("fd-alias", (2, 0, payload)))
        if result >= 0 and op in (Op.STAT, Op.FSTAT):
            specific.append(("stat-blksize", _stat_with(payload, blksize=0)))
        if result >= 0 and op == Op.LISTDIR:
            specific.append(("dirent-dotdot", (1, 0, abi.encode_dirents([abi.Dirent("..", abi.DT_DIR)], False))))
        how = self.rng.choice(list(self.GENERIC) + [s[0] for s in specific])
        if how == "errno-on-success":
            return how, (max(result, 0), 5, payload if result >= 0 else b"")
        if how == "failure-without-errno":
            return how, (-1, 0, b"")
        if how == "failure-with-data":
            return how, (-1, 5, b"FORGED")
        if how == "impossible-result":
            return how, (-7, err or 5, b"")
        return how, dict(specific)[how]
