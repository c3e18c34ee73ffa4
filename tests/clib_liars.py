"""Lying hosts for the libc layer's tests: they lie only about the files SQLite opens.

``PYSCONE_TEST_HOSTILE=py:clib_liars:DbLie:CASE`` (with this directory on ``PYTHONPATH``)
tells CASE once, about a call on a file whose name ends in ``.db`` (so the lie is about a
call that SQLite, not Python, made), and says so on stderr.
"""

from __future__ import annotations

import sys
from typing import Any

from pyscone import abi
from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class DbLie(Liar):
    """``pread-overflow``: a read of the database answers one byte more than SQLite asked for
    (into a C buffer of exactly the asked size); ``fd-alias``: the journal's open answers the
    database's own fd number (a second file under a number the enclave already holds)."""

    CASES = ("pread-overflow", "fd-alias")

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in self.CASES:
            raise ValueError(f"no lie called {arg!r}")
        self.db_fds: set[int] = set()
        self.fired = False

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        forged: Answer | None = None
        if op == Op.OPEN and result >= 0 and request.endswith(b".db"):
            self.db_fds.add(result)
        elif self.fired:
            pass
        elif self.arg == "pread-overflow" and op == Op.PREAD and args[0] in self.db_fds and result > 0:
            forged = (args[1] + 1, 0, (payload + b"\xff" * (args[1] + 1))[: args[1] + 1])
        elif self.arg == "fd-alias" and op == Op.OPEN and result >= 0 and request.endswith(b".db-journal"):
            forged = (min(self.db_fds), 0, payload)
        if forged is None:
            return (result, err, payload)
        self.fired = True
        print(f"pyscone-test: lied about {Op(op).name}: {self.arg}", file=sys.stderr, flush=True)
        return forged


# The calls whose first argument is an fd (what the renumbering host must translate back).
_FD_OPS = frozenset(
    {Op.CLOSE, Op.READ, Op.WRITE, Op.PREAD, Op.PWRITE, Op.LSEEK, Op.FSTAT, Op.FSYNC, Op.FTRUNCATE, Op.ISATTY, Op.LOCK}
)


class DoorbellNumbers(Liar):
    """Hands out the database's fd under the number of the enclave's own doorbell, an fd of the
    enclave process the host knows (it passed it), and serves that number as the database.

    Allowed: fd numbers are the host's to choose.  A libc layer that forwarded calls on "the
    runtime's own fds" by number would send SQLite's reads and writes to the doorbell instead.
    """

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        self.real: int | None = None
        self.fake = -1

    def handle(self, op: int, args: tuple[int, ...], data: bytes, ex: Any) -> Answer | None:
        if self.real is not None and op in _FD_OPS and args and args[0] == self.fake:
            real = self.real
            if op == Op.CLOSE:
                self.real = None
            return ex._handlers[op]((real, *args[1:]), data)  # type: ignore[no-any-return]
        return None

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op == Op.OPEN and result >= 0 and request.endswith(b".db") and self.real is None:
            self.real, self.fake = result, ex.doorbell_out
            print(f"pyscone-test: lied about OPEN: fd {result} answered as {self.fake}", file=sys.stderr, flush=True)
            return (self.fake, err, payload)
        return (result, err, payload)


class SockLie(Liar):
    """Lies about the sockets a C library made (``CONNECT`` to port ``PORT`` marks the fd):
    ``recv-overflow:PORT``: a ``RECV`` answers one byte more than the C buffer asked for;
    ``poll-stranger:PORT``: a ``POLL`` on that fd reports it ready under another fd's number."""

    CASES = ("recv-overflow", "poll-stranger")

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        self.case, _, port = arg.partition(":")
        if self.case not in self.CASES or not port.isdigit():
            raise ValueError(f"no lie called {arg!r}")
        self.port = int(port)
        self.fds: set[int] = set()
        self.fired = False

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        forged: Answer | None = None
        if op == Op.CONNECT and request[:2] == self.port.to_bytes(2, "little"):
            self.fds.add(args[0])  # (abi.INET_ADDR: the port first, little-endian)
        elif self.fired or not args or (args[0] not in self.fds and op != Op.POLL):
            pass
        elif self.case == "recv-overflow" and op == Op.RECV and result > 0:
            forged = (args[1] + 1, 0, (payload + b"!" * (args[1] + 1))[: args[1] + 1])
        elif self.case == "poll-stranger" and op == Op.POLL and result > 0:
            fd, ev, revents = abi.POLLFD.unpack_from(payload, 0)
            if fd in self.fds:
                forged = (result, 0, abi.POLLFD.pack(fd + 1, ev, revents) + payload[abi.POLLFD.size :])
        if forged is None:
            return (result, err, payload)
        self.fired = True
        print(f"pyscone-test: lied about {Op(op).name}: {self.case}", file=sys.stderr, flush=True)
        return forged
