"""Lying hosts for the POSIX-layer tests, loaded by ``pyscone run`` as plug-ins.

``PYSCONE_TEST_HOSTILE=py:posix_liars:PosixLie:CASE`` (with this directory on ``PYTHONPATH``).
Each lie says on stderr what it did (``pyscone-test: lied ...``), so the tests know it was told.
"""

from __future__ import annotations

import sys
from typing import Any

from pyscone import abi
from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class PosixLie(Liar):
    """``statvfs-free``: more free blocks than blocks; ``lock-payload``: a lock "granted" with data;
    ``lock-refused``: every lock held elsewhere (EAGAIN); ``bell-always``: every poll that watches
    a socket pair says its first one is readable, whatever it holds."""

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in ("statvfs-free", "lock-payload", "lock-refused", "bell-always"):
            raise ValueError(f"no lie called {arg!r}")
        self.pair_fds: set[int] = set()

    def _told(self, what: str) -> None:
        sys.stderr.write(f"pyscone-test: lied {what}\n")
        sys.stderr.flush()

    def handle(self, op: int, args: tuple[int, ...], data: bytes, ex: Any) -> Answer | None:
        if self.arg == "bell-always" and op == Op.POLL:
            req = [abi.POLLFD.unpack_from(data, i * abi.POLLFD.size)[:2] for i in range(args[0])]
            if any(fd in self.pair_fds for fd, _ in req):
                out = b"".join(abi.POLLFD.pack(fd, ev, abi.POLLIN if fd in self.pair_fds else 0) for fd, ev in req)
                self._told("poll: the bell is ringing")
                return (1, 0, out)
        if self.arg == "lock-refused" and op == Op.LOCK:
            self._told("lock: held elsewhere")
            return (-1, 11, b"")
        return None

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op == Op.SOCKETPAIR and result >= 0:
            self.pair_fds.update((result, int.from_bytes(payload[:4], "little", signed=True)))
        if self.arg == "statvfs-free" and op == Op.STATVFS and result == 0:
            f = list(abi.STATVFS.unpack(payload))
            f[3] = f[2] + 1  # bfree > blocks
            self._told("statvfs: more free than there is")
            return (0, 0, abi.STATVFS.pack(*f))
        if self.arg == "lock-payload" and op == Op.LOCK and result == 0:
            self._told("lock: granted with data")
            return (0, 0, b"FORGED")
        return (result, err, payload)
