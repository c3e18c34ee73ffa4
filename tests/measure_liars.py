"""A lying host for tests/test_measure_hostile.py, loaded by ``pyscone`` as a plug-in.

``PYSCONE_TEST_HOSTILE=py:measure_liars:ServeOther:JSON`` (with this directory on
``PYTHONPATH``), where JSON maps path suffixes to files: the executor answers an ``OPEN``
of a path that ends in a suffix by opening the other file instead, so whatever the
enclave reads there is the host's.  It says so on stderr (``pyscone-test: ...``).
"""

from __future__ import annotations

import json
import sys

from pyscone.abi import Op
from pyscone.host.executor import Executor
from pyscone.host.hostile import Answer, Liar


class ServeOther(Liar):
    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        self.other: dict[str, str] = json.loads(arg)
        print("pyscone-test: the lying host serves this enclave", file=sys.stderr, flush=True)

    def handle(self, op: int, args: tuple[int, ...], data: bytes, ex: Executor) -> Answer | None:
        if op != Op.OPEN:
            return None
        path = data.decode("utf-8", "surrogateescape")
        for suffix, other in self.other.items():
            if path.endswith(suffix):
                print(f"pyscone-test: lied: served {other} for {path}", file=sys.stderr, flush=True)
                return ex._open(args, other.encode())
        return None
