"""Lying hosts for the bytecode-cache tests, loaded by ``pyscone run`` as plug-ins.

``PYSCONE_TEST_HOSTILE=py:cache_liars:FullDisk`` (with this directory on ``PYTHONPATH``): every
write to a file whose name ends in ``.tmp`` (how the enclave writes a cache entry before it
renames it into place) fails with ENOSPC, as on a full disk.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class FullDisk(Liar):
    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        self.tmp_fds: set[int] = set()

    def handle(self, op: int, args: tuple[int, ...], data: bytes, ex: Any) -> Answer | None:
        if op == Op.WRITE and args[0] in self.tmp_fds:
            sys.stderr.write("pyscone-test: lied write: ENOSPC\n")
            sys.stderr.flush()
            return (-1, errno.ENOSPC, b"")
        if op == Op.CLOSE:
            self.tmp_fds.discard(args[0])
        return None

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op == Op.OPEN and result >= 0 and request.endswith(b".tmp"):
            self.tmp_fds.add(result)
        return (result, err, payload)
