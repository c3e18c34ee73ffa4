"""Lying hosts for the dup tests, loaded by ``pyscone run`` as plug-ins.

``PYSCONE_TEST_HOSTILE=py:dup_liars:DupLie:CASE`` (with this directory on ``PYTHONPATH``).
Each lie says on stderr what it did (``pyscone-test: lied ...``), so the tests know it was told.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class DupLie(Liar):
    """An ``OPEN`` of a path ending in ``.lie`` answers an fd the enclave must refuse:

    * ``console-fd``: fd 1, the console's stdout (which the enclave never gave up);
    * ``known-fd``: the fd of the last honest ``OPEN`` of a path ending in ``.first``, still open
      on the host (the app closed that number, but a dup of it still names the file).
    """

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in ("console-fd", "known-fd"):
            raise ValueError(f"no lie called {arg!r}")
        self.first = -1

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op != Op.OPEN or result < 0:
            return (result, err, payload)
        if request.endswith(b".first"):
            self.first = result
        if request.endswith(b".lie"):
            forged = 1 if self.arg == "console-fd" else self.first
            os.close(result)  # the honest fd is not needed: the lie replaces it
            sys.stderr.write(f"pyscone-test: lied open: fd {forged}\n")
            sys.stderr.flush()
            return (forged, 0, payload)
        return (result, err, payload)
