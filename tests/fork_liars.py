"""Lying hosts about forks (``PYSCONE_TEST_HOSTILE=py:fork_liars:LaneLie:CASE``).

CASE ``own``: the first ``FORK`` names lane 0, the parent's own region; ``far``: a lane
that does not exist; ``again``: the second fork gets the lane the first child still runs on.
"""

from __future__ import annotations

import sys
from typing import Any

from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class LaneLie(Liar):
    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in ("own", "far", "again"):
            raise ValueError(f"no lane lie called {arg!r}")
        self.case = arg
        self.first = -1

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op != Op.FORK or result < 0:
            return (result, err, payload)
        if self.case == "own":
            result = 0
        elif self.case == "far":
            result = 10_000
        elif self.first < 0:
            self.first = result
            return (result, err, payload)
        else:
            result = self.first
        print(f"pyscone-test: lied about a fork's lane ({self.case}: {result})", file=sys.stderr, flush=True)
        return (result, err, payload)
