"""Every validator, fed anything at all, either returns a well-typed value or stops."""

from __future__ import annotations

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
    saved = dict(iago.fds.kinds), dict(iago.fds.families)
    yield
    iago.fds.kinds, iago.fds.families = saved


def validate(op: int, args: tuple[int, ...], req: bytes, result: int, err: int, data: bytes) -> object:
    return iago.validate(op, args + (0,) * (6 - len(args)), req, result, err, data)


def test_honest_replies_pass() -> None:
    assert validate(Op.READ, (5, 10), b"", 3, 0, b"abc")[2] == b"abc"
    assert validate(Op.WRITE, (5,), b"hello", 5, 0, b"")[2] == 5
    st_ = abi.StatResult(0o100644, 1, 2, 1, 0, 0, 10, 0, 0, 0, 4096, 8, 0)
    assert validate(Op.STAT, (1,), b"/x", 0, 0, st_.pack())[2] == st_
    assert validate(Op.OPEN, (0, 0), b"/x", 77, 0, b"")[2] == 77
    assert validate(Op.READ, (5, 10), b"", -1, 11, b"")[:2] == (-1, 11)


@pytest.mark.parametrize(
    ("op", "args", "req", "result", "err", "data"),
    [
        (Op.READ, (5, 3), b"", 4, 0, b"abcd"),  # more than asked
        (Op.READ, (5, 10), b"", 3, 0, b"abcd"),  # result and payload disagree
        (Op.WRITE, (5,), b"abc", 4, 0, b""),  # wrote more than given
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
