"""Every validator, fed anything at all, either returns a well-typed value or stops."""

from __future__ import annotations

import os
import socket
import stat as stat_mod
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyscone import abi
from pyscone.abi import Op
from pyscone.enclave import iago


class Stopped(Exception):
    pass


@pytest.fixture(autouse=True)
def no_exit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def stop(reason: str) -> None:
        raise Stopped(reason)

    monkeypatch.setattr(iago, "fail_stop", stop)
    monkeypatch.setattr(iago, "listings", iago.Listings())
    saved = iago.fds.snapshot()
    yield
    iago.fds.restore(saved)


def validate(op: int, args: tuple[int, ...], req: bytes, result: int, err: int, data: bytes) -> object:
    return iago.validate(op, args + (0,) * (6 - len(args)), req, result, err, data)


def test_honest_replies_pass() -> None:
    assert validate(Op.READ, (5, 10), b"", 3, 0, b"abc")[2] == b"abc"
    assert validate(Op.WRITE, (5,), b"hello", 5, 0, b"")[2] == 5
    st_ = abi.StatResult(0o100644, 1, 2, 1, 0, 0, 10, 0, 0, 0, 4096, 8, 0)
    assert validate(Op.STAT, (1,), b"/x", 0, 0, st_.pack())[2] == st_
    assert validate(Op.OPEN, (0, 0), b"/x", 77, 0, b"")[2] == 77
    assert validate(Op.READ, (5, 10), b"", -1, 11, b"")[:2] == (-1, 11)
    assert validate(Op.PWRITE_SYNC, (5, 0, 3), b"abc", 3, 0, b"")[2] == 3
    assert validate(Op.PWRITE_SYNC, (5, 0, -1), b"abc", 2, 0, b"")[2] == 2  # short: the caller's ENOSPC


@pytest.mark.parametrize(
    ("op", "args", "req", "result", "err", "data"),
    [
        (Op.READ, (5, 3), b"", 4, 0, b"abcd"),  # more than asked
        (Op.READ, (5, 10), b"", 3, 0, b"abcd"),  # result and payload disagree
        (Op.WRITE, (5,), b"abc", 4, 0, b""),  # wrote more than given
        (Op.PWRITE_SYNC, (5, 0, -1), b"abc", 4, 0, b""),  # wrote (and synced) more than given
        (Op.PWRITE_SYNC, (5, 0, -1), b"abc", 3, 0, b"x"),  # a write answers no data
        (Op.OPEN, (0, 0), b"/x", 1, 0, b""),  # fd 1 is the console: aliasing
        (Op.OPEN, (0, 0), b"/x", abi.MAX_FD, 0, b""),
        (Op.READ, (5, 10), b"", -1, 0, b""),  # failure without errno
        (Op.READ, (5, 10), b"", -2, 5, b""),
        (Op.READ, (5, 10), b"", -1, 5, b"x"),  # failure with data
        (Op.READ, (5, 10), b"", 1, 5, b"x"),  # success with errno
        (Op.STAT, (1,), b"/x", 0, 0, b"\x00" * 10),
        (Op.LSEEK, (5, 0, 0), b"", -7, 0, b""),
        (Op.ISATTY, (1,), b"", 2, 0, b""),
        (Op.POLL, (1,), abi.encode_pollfds([(5, abi.POLLIN)]), 1, 0, abi.POLLFD.pack(5, abi.POLLIN, abi.POLLOUT)),
    ],
)
def test_lies_stop(op: int, args: tuple[int, ...], req: bytes, result: int, err: int, data: bytes) -> None:
    with pytest.raises(Stopped):
        validate(op, args, req, result, err, data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(sorted(iago.VALIDATORS)),
    args=st.tuples(*[st.integers(0, 2**16)] * 6),
    result=st.integers(-3, 2**17),
    err=st.integers(-1, 5000),
    data=st.binary(max_size=300),
)
def test_random_replies_never_crash_the_enclave(
    op: int, args: tuple[int, ...], result: int, err: int, data: bytes
) -> None:
    req = abi.encode_pollfds([(args[0], abi.POLLIN)] * min(args[0], 4)) if op == Op.POLL else struct.pack("<I", 0)
    try:
        r, e, value = validate(op, args, req, result, err, data)
    except Stopped:
        return
    assert r >= -1
    if r == -1:
        assert e > 0 or op in (Op.GETADDRINFO, Op.GETNAMEINFO)
    if op in (Op.READ, Op.PREAD, Op.RECV):
        assert isinstance(value, bytes) and len(value) <= args[1]


# -- checks of values with a valid shape: what an honest host may say passes, a lie stops ----------

INFO = abi.encode_addrinfo


def _sock(fd: int, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM, proto: int = 0) -> int:
    validate(Op.SOCKET, (family, type_, proto), b"", fd, 0, b"")
    return fd


def _file(fd: int, flags: int = os.O_RDONLY, path: bytes = b"/srv/x", kind: int | None = stat_mod.S_IFREG) -> int:
    validate(Op.OPEN, (flags, 0), path, fd, 0, b"")
    if kind is not None:
        validate(Op.FSTAT, (fd,), b"", 0, 0, _st(kind).pack())
    return fd


def _st(kind: int, **kw: int) -> abi.StatResult:
    fields = dict(mode=kind | 0o644, ino=1, dev=2, nlink=1, uid=0, gid=0, size=10, atime_ns=0, mtime_ns=0,
                  ctime_ns=0, blksize=4096, blocks=8, rdev=0)  # fmt: skip
    fields.update(kw)
    return abi.StatResult(**fields)


def _gai(family: int, type_: int, flags: int, req: bytes, infos: list[tuple[int, int, int, str, object]]) -> object:
    return validate(Op.GETADDRINFO, (family, type_, 0, flags), req, len(infos), 0, INFO(infos))[2]


def test_honest_values_of_every_new_check_pass() -> None:
    f, dev, s, u = _file(40), _file(41, path=b"/dev/null", kind=None), _sock(42), _sock(43, type_=socket.SOCK_DGRAM)
    assert validate(Op.LSEEK, (f, 5, os.SEEK_SET), b"", 5, 0, b"")[2] == 5
    assert validate(Op.LSEEK, (f, 0, os.SEEK_END), b"", 10, 0, b"")[2] == 10
    assert validate(Op.LSEEK, (f, -3, os.SEEK_CUR), b"", 0, 0, b"")[2] == 0
    assert validate(Op.LSEEK, (dev, 100, os.SEEK_SET), b"", 0, 0, b"")[2] == 0  # null_lseek
    assert validate(Op.GETSOCKOPT, (s, socket.SOL_SOCKET, socket.SO_TYPE, 0), b"", 1, 0, b"")[2] == 1
    assert validate(Op.GETSOCKOPT, (s, socket.SOL_SOCKET, socket.SO_PROTOCOL, 0), b"", 6, 0, b"")[2] == 6
    assert validate(Op.GETSOCKOPT, (u, socket.SOL_SOCKET, socket.SO_PROTOCOL, 0), b"", 17, 0, b"")[2] == 17
    assert validate(Op.GETSOCKOPT, (s, socket.SOL_SOCKET, socket.SO_RCVBUF, 0), b"", 131072, 0, b"")[2] == 131072
    sender = abi.INET_ADDR.pack(5353, 0, 0) + b"127.0.0.1"
    got = validate(Op.RECVFROM, (u, 10, 0), b"", 1, 0, struct.pack("<I", len(sender)) + sender + b"x")[2]
    assert got == (b"x", ("127.0.0.1", 5353))
    assert validate(Op.RECVFROM, (s, 10, 0), b"", 1, 0, struct.pack("<I", 0) + b"x")[2] == (b"x", None)
    assert validate(Op.STAT, (0,), b"/srv/l", 0, 0, _st(stat_mod.S_IFLNK).pack())[2].mode & stat_mod.S_IFLNK
    assert validate(
        Op.FSTAT, (_file(44, os.O_PATH | os.O_NOFOLLOW, kind=None),), b"", 0, 0, _st(stat_mod.S_IFLNK).pack()
    )
    assert validate(
        Op.FSTAT, (_file(45, os.O_RDWR | os.O_TMPFILE, kind=None),), b"", 0, 0, _st(stat_mod.S_IFREG).pack()
    )
    assert validate(Op.ISATTY, (dev,), b"", 1, 0, b"")[2] is True
    # getaddrinfo: mapped IPv4 for AF_INET6, scoped IPv6, glibc's 16-bit port, names and services unchecked.
    mapped = [(socket.AF_INET6, 1, 6, "", ("::ffff:127.0.0.1", 80, 0, 0))]
    assert _gai(socket.AF_INET6, 0, socket.AI_V4MAPPED, b"127.0.0.1\x0080", mapped)
    assert _gai(0, 0, 0, b"fe80::1%lo\x0080", [(socket.AF_INET6, 1, 6, "", ("fe80::1", 80, 0, 1))])
    assert _gai(0, 0, 0, b"127.0.0.1\x0070000", [(socket.AF_INET, 1, 6, "", ("127.0.0.1", 4464))])
    assert _gai(0, 0, 0, b"example.com\x00http", [(socket.AF_INET, 1, 6, "", ("93.184.216.34", 80))])
    canon = [(socket.AF_INET, 1, 6, "localhost", ("127.0.0.1", 0)), (socket.AF_INET, 2, 17, "", ("127.0.0.1", 0))]
    assert _gai(0, 0, socket.AI_CANONNAME, b"localhost\x00", canon)
    assert _gai(0, 0, socket.AI_PASSIVE, b"\x0080", [(socket.AF_INET6, 1, 6, "", ("::", 80, 0, 0))])
    assert _gai(0, 0, 0, b"\x0080", [(socket.AF_INET, 1, 6, "", ("127.0.0.1", 80))])
    ni = abi.encode_sockaddr(socket.AF_INET, ("127.0.0.1", 80))
    assert validate(Op.GETNAMEINFO, (socket.AF_INET, 0), ni, 0, 0, b"localhost\0http")[2] == ("localhost", "http")
    flags = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
    assert validate(Op.GETNAMEINFO, (socket.AF_INET, flags), ni, 0, 0, b"127.0.0.1\x0080")[2] == ("127.0.0.1", "80")


def _page(names: list[str], more: bool) -> bytes:
    return abi.encode_dirents([abi.Dirent(n, abi.DT_REG) for n in names], more)


def test_a_name_listed_again_on_a_later_page_stops_but_two_listings_of_one_directory_do_not() -> None:
    for _ in range(2):  # two listings of /d at once (two lthreads): each is checked on its own
        validate(Op.LISTDIR, (0,), b"/d", 2, 0, _page(["a", "b"], True))
    validate(Op.LISTDIR, (2,), b"/d", 1, 0, _page(["c"], False))
    validate(Op.LISTDIR, (2,), b"/d", 1, 0, _page(["c"], False))
    validate(Op.LISTDIR, (0,), b"/d", 2, 0, _page(["a", "b"], True))
    with pytest.raises(Stopped, match="'b' listed again on a later page"):
        validate(Op.LISTDIR, (2,), b"/d", 2, 0, _page(["c", "b"], False))


def test_abandoned_listings_are_forgotten_oldest_first() -> None:
    for i in range(iago.Listings.LIMIT + 5):
        validate(Op.LISTDIR, (0,), f"/d{i}".encode(), 1, 0, _page(["a"], True))
    assert iago.listings.count == iago.Listings.LIMIT
    validate(Op.LISTDIR, (1,), b"/d0", 1, 0, _page(["a"], False))  # forgotten: no longer checkable
    with pytest.raises(Stopped):
        validate(Op.LISTDIR, (1,), f"/d{iago.Listings.LIMIT + 4}".encode(), 1, 0, _page(["a"], False))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("lseek-set", "SEEK_SET"),
        ("lseek-cur-before", "landed at"),
        ("lseek-whence", "whence 9"),
        ("lseek-socket", "pipe or socket"),
        ("stat-follow-link", "found a symbolic link"),
        ("stat-root", "root directory"),
        ("stat-gid", "does not fit"),
        ("stat-blksize", "block size"),
        ("fstat-socket", "fstat of a socket"),
        ("fstat-excl-dir", "not a regular file"),
        ("fstat-odirectory", "not a directory"),
        ("fstat-write-dir", "for writing"),
        ("fstat-file-link", "cannot return an fd"),
        ("isatty-regular", "not a character device"),
        ("so-type", "option 3"),
        ("so-domain", "option 39"),
        ("so-protocol-udp", "option 38"),
        ("so-error", "not an errno"),
        ("tcp-nodelay", "boolean"),
        ("udp-no-sender", "without a sender"),
        ("tcp-sender", "with a sender"),
        ("gai-family", "family"),
        ("gai-type", "socket type"),
        ("gai-proto", "protocol"),
        ("gai-literal", "numeric host"),
        ("gai-literal-mapped-elsewhere", "numeric host"),
        ("gai-port", "port"),
        ("gai-canon-not-asked", "canonical name"),
        ("gai-canon-second", "canonical name"),
        ("gai-passive", "no host"),
        ("gai-loopback", "no host"),
        ("gai-numerichost", "AI_NUMERICHOST"),
        ("gai-numericserv", "AI_NUMERICSERV"),
        ("gai-empty", "no address"),
        ("ni-not-numeric", "not numeric"),
        ("ni-host", "NI_NUMERICHOST"),
        ("ni-port", "NI_NUMERICSERV"),
        ("readlink-empty", "empty target"),
        ("hostname", "HOST_NAME_MAX"),
    ],
)
def test_each_lie_of_a_valid_shape_stops(case: str, reason: str) -> None:
    f, s, u = _file(50), _sock(51), _sock(52, type_=socket.SOCK_DGRAM)
    sa = abi.INET_ADDR.pack(53, 0, 0) + b"10.6.6.6"
    st_ = {
        "stat-follow-link": (Op.STAT, (1,), b"/srv/l", _st(stat_mod.S_IFLNK)),
        "stat-root": (Op.STAT, (1,), b"/", _st(stat_mod.S_IFREG)),
        "stat-gid": (Op.STAT, (1,), b"/x", _st(stat_mod.S_IFREG, gid=1 << 32)),
        "stat-blksize": (Op.STAT, (1,), b"/x", _st(stat_mod.S_IFREG, blksize=0)),
        "fstat-socket": (Op.FSTAT, (s,), b"", _st(stat_mod.S_IFREG)),
        "fstat-excl-dir": (
            Op.FSTAT,
            (_file(60, os.O_RDWR | os.O_CREAT | os.O_EXCL, kind=None),),
            b"",
            _st(stat_mod.S_IFDIR),
        ),
        "fstat-odirectory": (
            Op.FSTAT,
            (_file(61, os.O_RDONLY | os.O_DIRECTORY, kind=None),),
            b"",
            _st(stat_mod.S_IFREG),
        ),
        "fstat-write-dir": (Op.FSTAT, (_file(62, os.O_WRONLY, kind=None),), b"", _st(stat_mod.S_IFDIR)),
        "fstat-file-link": (Op.FSTAT, (_file(63, kind=None),), b"", _st(stat_mod.S_IFLNK)),
    }
    ni = abi.encode_sockaddr(socket.AF_INET, ("127.0.0.1", 80))
    v4 = (socket.AF_INET, 1, 6, "", ("127.0.0.1", 80))
    calls: dict[str, tuple[int, tuple[int, ...], bytes, int, bytes]] = {
        "lseek-set": (Op.LSEEK, (f, 5, os.SEEK_SET), b"", 6, b""),
        "lseek-cur-before": (Op.LSEEK, (f, 5, os.SEEK_CUR), b"", 4, b""),
        "lseek-whence": (Op.LSEEK, (f, 0, 9), b"", 0, b""),
        "lseek-socket": (Op.LSEEK, (s, 0, os.SEEK_CUR), b"", 0, b""),
        "isatty-regular": (Op.ISATTY, (f,), b"", 1, b""),
        "so-type": (Op.GETSOCKOPT, (s, socket.SOL_SOCKET, socket.SO_TYPE, 0), b"", 2, b""),
        "so-domain": (Op.GETSOCKOPT, (s, socket.SOL_SOCKET, socket.SO_DOMAIN, 0), b"", 10, b""),
        "so-protocol-udp": (Op.GETSOCKOPT, (u, socket.SOL_SOCKET, socket.SO_PROTOCOL, 0), b"", 6, b""),
        "so-error": (Op.GETSOCKOPT, (s, socket.SOL_SOCKET, socket.SO_ERROR, 0), b"", 5000, b""),
        "tcp-nodelay": (Op.GETSOCKOPT, (s, socket.IPPROTO_TCP, socket.TCP_NODELAY, 0), b"", 2, b""),
        "udp-no-sender": (Op.RECVFROM, (u, 10, 0), b"", 1, struct.pack("<I", 0) + b"x"),
        "tcp-sender": (Op.RECVFROM, (s, 10, 0), b"", 1, struct.pack("<I", len(sa)) + sa + b"x"),
        "ni-not-numeric": (
            Op.GETNAMEINFO,
            (socket.AF_INET, 0),
            abi.encode_sockaddr(socket.AF_INET, ("localhost", 80)),
            0,
            b"a\0b",
        ),
        "ni-host": (Op.GETNAMEINFO, (socket.AF_INET, socket.NI_NUMERICHOST), ni, 0, b"10.6.6.6\0http"),
        "ni-port": (Op.GETNAMEINFO, (socket.AF_INET, socket.NI_NUMERICSERV), ni, 0, b"localhost\x006666"),
        "readlink-empty": (Op.READLINK, (), b"/l", 0, b""),
        "hostname": (Op.GETHOSTNAME, (), b"", 0, b"h" * 65),
    }
    gai: dict[str, tuple[tuple[int, int, int, int], bytes, list[tuple[int, int, int, str, object]]]] = {
        "gai-family": ((socket.AF_INET6, 0, 0, 0), b"localhost\x0080", [v4]),
        "gai-type": ((0, socket.SOCK_DGRAM, 0, 0), b"localhost\x0080", [v4]),
        "gai-proto": ((0, 0, 17, 0), b"localhost\x0080", [v4]),
        "gai-literal": ((0, 0, 0, 0), b"127.0.0.2\x0080", [v4]),
        "gai-literal-mapped-elsewhere": (
            (0, 0, 0, 0),
            b"10.6.6.6\x0080",
            [(socket.AF_INET6, 1, 6, "", ("::ffff:127.0.0.1", 80, 0, 0))],
        ),
        "gai-port": ((0, 0, 0, 0), b"127.0.0.1\x008080", [v4]),
        "gai-canon-not-asked": ((0, 0, 0, 0), b"localhost\x0080", [(socket.AF_INET, 1, 6, "evil", ("127.0.0.1", 80))]),
        "gai-canon-second": (
            (0, 0, 0, socket.AI_CANONNAME),
            b"localhost\x0080",
            [v4, (socket.AF_INET, 2, 17, "evil", ("127.0.0.1", 80))],
        ),
        "gai-passive": ((0, 0, 0, socket.AI_PASSIVE), b"\x0080", [v4]),
        "gai-loopback": ((0, 0, 0, 0), b"\x0080", [(socket.AF_INET, 1, 6, "", ("0.0.0.0", 80))]),
        "gai-numerichost": ((0, 0, 0, socket.AI_NUMERICHOST), b"localhost\x0080", [v4]),
        "gai-numericserv": ((0, 0, 0, socket.AI_NUMERICSERV), b"127.0.0.1\x00http", [v4]),
        "gai-empty": ((0, 0, 0, 0), b"localhost\x0080", []),
    }
    with pytest.raises(Stopped, match=reason):
        if case in st_:
            op, args, req, value = st_[case]
            validate(op, args, req, 0, 0, value.pack())
        elif case in calls:
            op, args, req, result, data = calls[case]
            validate(op, args, req, result, 0, data)
        else:
            args4, req, infos = gai[case]
            validate(Op.GETADDRINFO, args4, req, len(infos), 0, INFO(infos))
