"""The dup table (``stdlib/dups.py``) against a model of Linux's fd table, in process, many sequences.

Handles are the console's 0-2 and pipe ends (both close without a host call); the model maps each
open number to the open file it names and allocates new numbers as the module documents: the lowest
free of 0-2, else the lowest free number from ``ALIAS_BASE`` at or above the argument.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscone.enclave import iago
from pyscone.enclave.stdlib import dups, files, pipes

A = dups.ALIAS_BASE
HOST_NUMBER = 7  # a host fd's number: dup2 onto it is refused


def _reset() -> None:
    iago.fds.restore(iago.FdTable())
    dups._alias.clear()
    dups._refs.clear()
    dups._hidden.clear()


@pytest.fixture(autouse=True)
def fresh_tables() -> Iterator[None]:
    saved = iago.fds.snapshot()
    yield
    _reset()
    iago.fds.restore(saved)


class Model:
    def __init__(self, pipe_fds: list[int]) -> None:
        self.names: dict[int, str] = {0: "c0", 1: "c1", 2: "c2"}
        self.handle_of = {"c0": 0, "c1": 1, "c2": 2}
        for i, fd in enumerate(pipe_fds):
            self.names[fd] = f"p{i}"
            self.handle_of[f"p{i}"] = fd
        self.cloexec: set[int] = set(pipe_fds)

    def lowest(self, start: int) -> int:
        for n in range(start, 3):
            if n not in self.names:
                return n
        n = max(start, A)
        while n in self.names:
            n += 1
        return n

    def alive(self, label: str) -> bool:
        return label in self.names.values()


def _err(call: Callable[..., object], *args: object) -> object:
    try:
        return call(*args)
    except OSError as e:
        return errno.errorcode[e.errno]


def _handle_open(h: int) -> bool:
    return h in pipes._ends if pipes.is_local(h) else h in iago.fds.kinds


OPS = st.lists(
    st.tuples(
        st.sampled_from(["dup", "dupfd", "dup2", "dup2-cloexec", "close"]), st.integers(0, 40), st.integers(0, 40)
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(ops=OPS)
def test_dups_behave_as_the_model(ops: list[tuple[str, int, int]]) -> None:
    _reset()  # each example starts from a fresh table (the fixture runs once for all of them)
    r, w = pipes.pipe2(os.O_NONBLOCK)
    model = Model([r, w])
    pool = [0, 1, 2, r, w, A, A + 1, A + 2, A + 5, HOST_NUMBER]  # numbers the ops may name
    for op, a, b in ops:
        fd = pool[a % len(pool)]
        target = pool[b % len(pool)]
        if op in ("dup", "dupfd"):
            start = 0 if op == "dup" else (0, 1, 2, A, A + 3)[b % 5]
            if fd not in model.names:
                assert _err(dups.dup, fd, start) == "EBADF"
                continue
            n = dups.dup(fd, start)
            assert n == model.lowest(start), (op, fd, start)
            model.names[n] = model.names[fd]
            model.cloexec.add(n)
            if n not in pool:
                pool.append(n)
        elif op.startswith("dup2"):
            inheritable = op == "dup2"
            got = _err(dups.dup2, fd, target, inheritable)
            if fd not in model.names:
                assert got == "EBADF"
            elif target == HOST_NUMBER and fd != target:
                assert got == "ENOSYS"
            else:
                assert got == target
                if fd != target:
                    model.names[target] = model.names[fd]
                    (model.cloexec.discard if inheritable else model.cloexec.add)(target)
        else:
            got = _err(files.close, fd)
            if fd not in model.names:
                assert got == "EBADF"
            else:
                assert got is None
                del model.names[fd]
                model.cloexec.discard(fd)
        # Every number names what the model says, the others are closed, and an open file is
        # open in its subsystem exactly while a number names it.
        for n in pool:
            if n in model.names:
                assert dups.resolve(n) == model.handle_of[model.names[n]], (n, model.names)
                assert (n in iago.fds.inheritable) == (n not in model.cloexec), n
            else:
                assert not dups.is_open(n), n
        for label, h in model.handle_of.items():
            assert _handle_open(h) == model.alive(label), (label, model.names)
    assert all(v >= 1 for v in dups._refs.values())
