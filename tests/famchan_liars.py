"""Hosts that record or tamper with what a family's pipes and socketpairs carry (plug-ins for
``PYSCONE_TEST_HOSTILE=py:famchan_liars:CLASS:ARG``, this directory on ``PYTHONPATH``).

``Recorder:PATH`` appends every payload of every SEND/WRITE request and RECV/READ answer (of
the host process that serves the call: the family's first enclave's, or a forked child's, which
is a fork of it) to PATH.  ``Tamper:CASE`` tells one lie about a RECV on a family channel:
``pipe-flip``/``pair-flip`` flip a byte of the first record read from a pipe's seqpacket
channel/a socketpair, ``pipe-replay`` answers a pipe's second record read with its first.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar


class Recorder(Liar):
    SENT: tuple[int, ...] = (Op.SEND, Op.WRITE)  # whose requests are kept
    RECEIVED: tuple[int, ...] = (Op.RECV, Op.READ)  # whose answers are kept

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op in self.SENT and request:
            self._keep(request)
        if op in self.RECEIVED and result > 0 and payload:
            self._keep(payload)
        return (result, err, payload)

    def _keep(self, data: bytes) -> None:
        fd = os.open(self.arg, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, len(data).to_bytes(4, "big") + bytes(data))
        finally:
            os.close(fd)


class Tamper(Liar):
    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in ("pipe-flip", "pipe-replay", "pair-flip"):
            raise ValueError(f"no lie called {arg!r}")
        self.seqpacket: set[int] = set()
        self.stream: set[int] = set()
        self.first: bytes | None = None
        self.fired = False

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op == Op.SOCKETPAIR and result >= 0 and args[0] == socket.AF_UNIX:
            fds = {result, int.from_bytes(payload, "little", signed=True)}
            (self.seqpacket if args[1] == socket.SOCK_SEQPACKET else self.stream).update(fds)
        if self.fired or op != Op.RECV or result <= 0 or args[2] != 0:
            return (result, err, payload)
        fd = args[0]
        if self.arg == "pair-flip" and fd in self.stream and len(payload) >= 20:
            return self._told(payload[:3] + bytes([payload[3] ^ 1]) + payload[4:])  # a bit of the member id
        if self.arg == "pipe-flip" and fd in self.seqpacket:
            return self._told(payload[:30] + bytes([payload[30] ^ 0x40]) + payload[31:])
        if self.arg == "pipe-replay" and fd in self.seqpacket:
            if self.first is None:
                self.first = payload
            else:
                return self._told(self.first)
        return (result, err, payload)

    def _told(self, forged: bytes) -> Answer:
        self.fired = True
        print(f"pyscone-test: lied about RECV: {self.arg}", file=sys.stderr, flush=True)
        return (len(forged), 0, forged)


class PartialSends(Liar):
    """An honest host whose stream sockets take big sends in small parts (as a full socket buffer
    does): every SEND of more than 64 bytes on an AF_UNIX stream socketpair takes half of them,
    20 ms after it came."""

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        self.stream: set[int] = set()
        self.told = False

    def handle(self, op: int, args: tuple[int, ...], data: bytes, ex: Any) -> Answer | None:
        if op == Op.SEND and args[0] in self.stream and len(data) > 64:
            # The rest comes a little later, so a reader can see a record's first part alone.
            time.sleep(0.02)
            if not self.told:
                self.told = True
                print("pyscone-test: lied about SEND: partial", file=sys.stderr, flush=True)
            try:
                return (ex._sock(args[0]).send(data[: len(data) // 2]), 0, b"")
            except BlockingIOError:
                return None  # full: the honest handler parks the call until there is room
        return None

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op == Op.SOCKETPAIR and result >= 0 and args[0] == socket.AF_UNIX and args[1] == socket.SOCK_STREAM:
            self.stream.update({result, int.from_bytes(payload, "little", signed=True)})
        return (result, err, payload)
