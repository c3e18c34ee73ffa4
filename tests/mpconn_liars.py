"""Hosts that tamper with a family's ``multiprocessing`` Unix connections (plug-ins for
``PYSCONE_TEST_HOSTILE=py:mpconn_liars:Tamper:CASE``, this directory on ``PYTHONPATH``).

Each lie is about what the *listening* enclave reads (``RECV``) on the Unix stream sockets it
accepted, in the order it accepted them; it is told once:

* ``record-flip``: flips the first byte read past the first 80 bytes of the first connection
  (the hello, the confirmation and the first record's header are 22 + 38 + 20 bytes): a byte of
  the first sealed record's ciphertext;
* ``replay-hello``: answers the second connection's first two reads (its hello and confirmation)
  with the first connection's;
* ``replay-records``: lets the second connection's hello through, then answers the next two
  reads (a record's header and body) with the first connection's first record, sealed under the
  first connection's channel.

(The plaintext recorder for these connections is ``famchan_liars.Recorder``.)
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from pyscone.abi import NEW_FD_OPS, Op
from pyscone.host.hostile import Answer, Liar

HELLO_BYTES = 22 + 38  # famhello.HELLO_SIZE + CONFIRM_SIZE: what the listener reads before records


class Tamper(Liar):
    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in ("record-flip", "replay-hello", "replay-records"):
            raise ValueError(f"no lie called {arg!r}")
        self.conn: dict[int, int] = {}  # host fd -> which Unix stream connection it accepted (0, 1, ...)
        self.reads: list[list[bytes]] = []  # what each read of each connection returned
        self.offset: list[int] = []  # bytes read so far on each
        self.fired = False

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op in NEW_FD_OPS and result >= 0:
            self.conn.pop(result, None)  # (a number the host reused)
        if op == Op.ACCEPT and result >= 0:
            try:
                unix = ex._sock(result).family == socket.AF_UNIX
            except OSError:
                unix = False
            if unix:
                self.conn[result] = len(self.reads)
                self.reads.append([])
                self.offset.append(0)
            return (result, err, payload)
        if op != Op.RECV or args[2] != 0 or args[0] not in self.conn or self.fired:
            return (result, err, payload)
        which = self.conn[args[0]]
        got = payload if result > 0 else b""
        at = self.offset[which]
        self.offset[which] = at + len(got)
        index = len(self.reads[which])
        self.reads[which].append(got)
        if self.arg == "record-flip" and which == 0 and at >= HELLO_BYTES + 20 and got:
            return self._told(bytes([got[0] ^ 0x20]) + got[1:])
        if self.arg.startswith("replay-") and which == 1:
            # The hello and the confirmation are the first two reads; the first record's header and
            # body the next two (an honest host hands each over whole).
            replayed = (0, 1) if self.arg == "replay-hello" else (2, 3)
            first = self.reads[0]
            if index in replayed and index < len(first) and len(first[index]) <= args[1]:
                if index == replayed[-1]:
                    return self._told(first[index])
                return (len(first[index]), 0, first[index])
        return (result, err, payload)

    def _told(self, forged: bytes) -> Answer:
        self.fired = True
        print(f"pyscone-test: lied about RECV: {self.arg}", file=sys.stderr, flush=True)
        return (len(forged), 0, forged)
