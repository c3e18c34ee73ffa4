"""A lying host for the TLS tests, loaded by ``pyscone run`` as a plug-in.

``PYSCONE_TEST_HOSTILE=py:tls_liars:FlipCiphertext`` (with this directory on ``PYTHONPATH``)
flips one byte in the first large ``RECV`` answer (a TLS application-data record body: the
handshake's records are all small), once.  Only TLS can catch it: the bytes of a socket are the
host's (docs/threat-model.md, ``content``).
"""

from __future__ import annotations

import sys
from typing import Any

from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar

BIG = 8192


class FlipCiphertext(Liar):
    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        self.fired = False

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op == Op.RECV and not self.fired and result >= BIG and len(payload) >= BIG:
            self.fired = True
            print(f"pyscone-test: lied: flipped a byte of a {len(payload)}-byte recv", file=sys.stderr, flush=True)
            i = len(payload) // 2
            return (result, err, payload[:i] + bytes([payload[i] ^ 0x01]) + payload[i + 1 :])
        return (result, err, payload)
