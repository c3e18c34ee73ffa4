"""Hosts that lie about descriptors passed between a family's enclaves (plug-ins for
``PYSCONE_TEST_HOSTILE=py:fdpass_liars:CLASS:ARG``, this directory on ``PYTHONPATH``).

``Tamper:CASE`` tells one lie about a ``RECVMSG_FDS`` that brought descriptors:
``flip`` flips a byte of the sealed notice, ``replay`` answers the second such message with
the first one's bytes (its own fds), ``extra`` hands over one host fd more than were sent.
``Recorder:PATH`` appends every payload the host relays on a socket (sent or received) to PATH
(famchan_liars' recorder, without the console's writes and reads).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import famchan_liars

from pyscone import abi
from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class Tamper(Liar):
    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in ("flip", "replay", "extra"):
            raise ValueError(f"no lie called {arg!r}")
        self.first: bytes | None = None
        self.fired = False

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if self.fired or op != Op.RECVMSG_FDS or result <= 0:
            return (result, err, payload)
        nfds, flags = abi.RECVMSG_HEAD.unpack_from(payload, 0)
        if not nfds:
            return (result, err, payload)
        cut = abi.RECVMSG_HEAD.size + 4 * nfds
        head, data = payload[:cut], payload[cut:]
        if self.arg == "flip" and len(data) > 20:
            return self._told(result, head + data[:20] + bytes([data[20] ^ 1]) + data[21:])
        if self.arg == "replay":
            if self.first is None:
                self.first = data
                return (result, err, payload)
            return self._told(len(self.first), head + self.first)
        if self.arg == "extra":
            extra = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            ex._files.add(extra)
            more = abi.RECVMSG_HEAD.pack(nfds + 1, flags) + payload[abi.RECVMSG_HEAD.size : cut]
            return self._told(result, more + extra.to_bytes(4, "little", signed=True) + data)
        return (result, err, payload)

    def _told(self, result: int, forged: bytes) -> Answer:
        self.fired = True
        print(f"pyscone-test: lied about RECVMSG_FDS: {self.arg}", file=sys.stderr, flush=True)
        return (result, 0, forged)


class Recorder(famchan_liars.Recorder):
    SENT = (Op.SEND, Op.SENDMSG_FDS)
    RECEIVED = (Op.RECV, Op.RECVMSG_FDS)
