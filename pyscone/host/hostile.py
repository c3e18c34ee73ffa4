"""Lying hosts for the Iago tests (UNTRUSTED, and never used outside tests).

An :class:`Executor` built with ``hostile=`` runs a :class:`Liar` beside its
honest handlers.  A liar can do three things, at three points of a call:

* :meth:`Liar.handle` answers a request *instead of* executing it (a host that
  serves other bytes, or claims a call succeeded without making it);
* :meth:`Liar.lie` rewrites the honest answer of a call that did run;
* :meth:`Liar.forge_ids` rewrites the slot ids published on the response ring.

``PYSCONE_TEST_HOSTILE`` chooses one for ``pyscone run``:

* ``MODE[:SKIP]``: one of :class:`Hostile`'s built-in lies, told once after
  ``SKIP`` chances;
* ``py:MODULE:CLASS[:ARG]``: ``CLASS`` from ``MODULE`` (importable by the
  launcher, e.g. through ``PYTHONPATH``), a subclass of :class:`Liar`, built
  as ``CLASS(ARG)``.  This is the plug-in point for tests that need a lie of
  their own.

With no liar the executor's honest paths are exactly what they are without
this module: nothing here is looked at per call.
"""

from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyscone import abi
from pyscone.abi import Op

if TYPE_CHECKING:
    from pyscone.host.executor import Executor

Answer = tuple[int, int, bytes]


class Liar:
    """A host that tells the truth; subclass it and override what should lie."""

    def __init__(self, arg: str = "") -> None:
        self.arg = arg

    def handle(self, op: int, args: tuple[int, ...], data: bytes, ex: Executor) -> Answer | None:
        """Answer a request without executing it, or ``None`` to execute it honestly."""
        return None

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Executor, request: bytes
    ) -> Answer:
        """The answer to send for a call whose honest answer is (result, err, payload)."""
        return (result, err, payload)

    def forge_ids(self, sids: list[int], ex: Executor) -> list[int]:
        """The slot ids to publish for a batch of answered slots ``sids``."""
        return sids


def load(spec: str) -> Liar:
    """The liar that ``spec`` (``MODE[:SKIP]`` or ``py:MODULE:CLASS[:ARG]``) names.

    Raises:
        ValueError: an unknown mode, or a plug-in that cannot be loaded.
    """
    if not spec.startswith("py:"):
        return Hostile.parse(spec)
    module, _, rest = spec[3:].partition(":")
    name, _, arg = rest.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load the lying host {spec[3:]!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Liar)):
        raise ValueError(f"{module}:{name} is not a pyscone.host.hostile.Liar")
    return cls(arg)


@dataclass
class Hostile(Liar):
    """A host that lies once, in the way ``mode`` names, after ``skip`` chances.

    Used only by the tests (``PYSCONE_TEST_HOSTILE=mode[:skip]``): every lie must
    make the enclave stop with a host violation before the app sees bad data.
    """

    mode: str
    skip: int = 0
    fired: bool = False
    last_id: int = -1

    MODES = (
        "read-overflow", "write-overcount", "fd-alias", "bad-errno", "bad-stat", "bad-dirent",
        "bad-sockaddr", "bad-poll", "forged-slot", "duplicate-slot", "slot-out-of-range", "ring-overrun",
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.arg = self.mode

    @classmethod
    def parse(cls, spec: str) -> Hostile:
        mode, _, skip = spec.partition(":")
        if mode not in cls.MODES:
            raise ValueError(f"unknown hostile mode {mode!r}; one of {', '.join(cls.MODES)} (or py:MODULE:CLASS)")
        return cls(mode, int(skip or 0))

    def _chance(self) -> bool:
        if self.fired:
            return False
        if self.skip:
            self.skip -= 1
            return False
        self.fired = True
        return True

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Executor, request: bytes
    ) -> Answer:
        m = self.mode
        if m == "read-overflow" and op in (Op.READ, Op.PREAD, Op.RECV) and result >= 0 and self._chance():
            # Claim one byte more than was asked for (the payload stays inside the slot).
            forged = (b"FORGED" * (args[1] // 6 + 1))[: min(args[1] + 1, ex.geometry.slot_data)]
            return (args[1] + 1, 0, forged)
        if m == "write-overcount" and op in (Op.WRITE, Op.SEND) and result >= 0 and self._chance():
            return (result + 4096, 0, payload)
        if m == "fd-alias" and op in abi.NEW_FD_OPS and result >= 0 and self._chance():
            return (1, 0, payload)  # the console's stdout: already known to the enclave
        if m == "bad-errno" and result < 0 and op != Op.NOP and self._chance():
            return (-1, 99999, b"")
        if m == "bad-stat" and op in (Op.STAT, Op.FSTAT) and result >= 0 and self._chance():
            return (0, 0, b"\xff" * abi.STAT.size)
        if m == "bad-dirent" and op == Op.LISTDIR and result >= 0 and self._chance():
            return (1, 0, abi.DIRENTS_HEAD.pack(1, 0) + abi.DIRENT.pack(1, 6) + b"../etc")
        if m == "bad-sockaddr" and op in (Op.ACCEPT, Op.GETSOCKNAME, Op.GETPEERNAME) and result >= 0 and self._chance():
            bad = abi.INET_ADDR.pack(80, 0, 0) + b"not-an-ip"
            return (result, 0, struct.pack("<I", len(bad)) + bad + bad if op == Op.ACCEPT else bad)
        if m == "bad-poll" and op == Op.POLL and result >= 0 and payload and self._chance():
            fd, ev, _ = abi.POLLFD.unpack_from(payload, 0)
            return (1, 0, abi.POLLFD.pack(fd + 1000, ev, abi.POLLIN) + payload[abi.POLLFD.size :])
        return (result, err, payload)

    def forge_ids(self, sids: list[int], ex: Executor) -> list[int]:
        # Each lie keeps the count plausible, so it is the slot-id checks that must catch it.
        m = self.mode
        last, self.last_id = self.last_id, sids[-1]
        if m == "forged-slot" and self._chance():
            outstanding = set(sids)
            forged = next(i for i in range(ex.geometry.nslots - 1, -1, -1) if i not in outstanding)
            return [forged, *sids[1:]]
        if m == "duplicate-slot" and last >= 0 and last not in sids and self._chance():
            return [last, *sids[1:]]  # replay an answer the enclave already consumed
        if m == "slot-out-of-range" and self._chance():
            return [ex.geometry.nslots + 7, *sids[1:]]
        if m == "ring-overrun" and self._chance():
            ex.responses.tail += ex.geometry.ring_size * 2
            return sids
        return sids
