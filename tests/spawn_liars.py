"""Lying hosts about spawned children (``PYSCONE_TEST_HOSTILE=py:spawn_liars:SpawnLie:CASE``).

CASE ``console``: ``SPAWN``'s channel is fd 1, the console's; ``pid``: ``SPAWN_WAIT`` answers for
another pid; ``status``: it answers a status word that is no exit (a stopped child); ``running``:
a child that still runs (``WNOHANG``) comes with a status.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class SpawnLie(Liar):
    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in ("console", "pid", "status", "running"):
            raise ValueError(f"no spawn lie called {arg!r}")
        self.case = arg

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if result < 0:
            return (result, err, payload)
        if op == Op.SPAWN and self.case == "console":
            payload = struct.pack("<i", 1)
        elif op == Op.SPAWN_WAIT and self.case == "pid" and result:
            result += 1
        elif op == Op.SPAWN_WAIT and self.case == "status" and result:
            payload = struct.pack("<i", 0x137F)  # WIFSTOPPED(SIGSTOP)
        elif op == Op.SPAWN_WAIT and self.case == "running" and result == 0:
            payload = struct.pack("<i", 3 << 8)
        else:
            return (result, err, payload)
        print(f"pyscone-test: lied about a spawn ({self.case})", file=sys.stderr, flush=True)
        return (result, err, payload)


class Recorder(Liar):
    """An honest host that appends every byte it carries for the parent (requests and answers) to ARG."""

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        with open(self.arg, "ab") as f:
            f.write(request + payload)
        return (result, err, payload)
