"""Lying hosts for the semaphore tests, loaded by ``pyscone run`` as plug-ins.

``PYSCONE_TEST_HOSTILE=py:sem_liars:SemLie:CASE`` (with this directory on ``PYTHONPATH``).
"""

from __future__ import annotations

import sys
from typing import Any

from pyscone import abi
from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class SemLie(Liar):
    """``acquire-zero``: a waiting acquire "not acquired"; ``value-huge``: a value above SEM_VALUE_MAX;
    ``handle-zero``: a new semaphore's handle 0."""

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in ("acquire-zero", "value-huge", "handle-zero"):
            raise ValueError(f"no lie called {arg!r}")

    def _told(self, what: str) -> Answer:
        sys.stderr.write(f"pyscone-test: lied {what}\n")
        sys.stderr.flush()
        return (0, 0, b"")

    def handle(self, op: int, args: tuple[int, ...], data: bytes, ex: Any) -> Answer | None:
        if self.arg == "acquire-zero" and op == Op.SEM_ACQUIRE and args[1]:
            return self._told("semaphore: a waiting acquire was not granted")
        if self.arg == "handle-zero" and op == Op.SEM_NEW:
            return self._told("semaphore: handle 0")
        return None

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if self.arg == "value-huge" and op == Op.SEM_VALUE:
            self._told("semaphore: a huge value")
            return (abi.SEM_VALUE_MAX + 1, 0, b"")
        return (result, err, payload)
