"""A lying host for the C-stdio tests: it lies only about the files named ``*.bin``.

``PYSCONE_TEST_HOSTILE=py:stdio_liars:BinLie:CASE`` (with this directory on ``PYTHONPATH``)
tells CASE once, about a call on such a file (numpy's ``tofile``/``fromfile`` do their I/O
from C, through a ``FILE`` the libc layer built; an enclave's dup of an fd is the same host
fd), and says so on stderr.
"""

from __future__ import annotations

import sys
from typing import Any

from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class BinLie(Liar):
    """``read-overflow``: a read answers one byte more than asked for (into glibc's stdio
    buffer of exactly that size); ``write-overcount``: a write claims 4096 bytes more than
    it was given."""

    CASES = ("read-overflow", "write-overcount")

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in self.CASES:
            raise ValueError(f"no lie called {arg!r}")
        self.fds: set[int] = set()
        self.fired = False

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        forged: Answer | None = None
        if op == Op.OPEN and result >= 0 and request.endswith(b".bin"):
            self.fds.add(result)
        elif self.fired or not args or args[0] not in self.fds:
            pass
        elif self.arg == "read-overflow" and op == Op.READ and result > 0:
            forged = (args[1] + 1, 0, (payload + b"\xff" * (args[1] + 1))[: args[1] + 1])
        elif self.arg == "write-overcount" and op == Op.WRITE and result > 0:
            forged = (result + 4096, 0, payload)
        if forged is None:
            return (result, err, payload)
        self.fired = True
        print(f"pyscone-test: lied about {Op(op).name}: {self.arg}", file=sys.stderr, flush=True)
        return forged
