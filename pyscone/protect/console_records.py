"""Console records, one at a time: the binary layout, the keys, the encoder (sans-IO).

The theory of operation is in :mod:`pyscone.protect.console`; the decoder of a log (a family of
runs) in :mod:`pyscone.protect.console_decoder`.
"""

from __future__ import annotations

import binascii
import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
RUN_SIZE = 16
TAG_SIZE = 16
PREFIX = b"psc1:"
#: The most plaintext one record carries; a larger write becomes several records.
MAX_PAYLOAD = 32768
#: How many later records of a stream a gap waits for its missing record before it is a drop.
REORDER_WINDOW = 32
OUTPUT_LABEL = b"pyscone console output v1"
INPUT_LABEL = b"pyscone console input v1"

_HEADER = struct.Struct(">BB16sQQ")
#: An END record's payload: exit status, records in the run, in stdin, stdout, stderr, and children started.
_END = struct.Struct(">iQQQQQ")
_END_V1 = struct.Struct(">iQQQQ")  # (before children were counted: still read)
#: A forked child's START payload: its parent's run, the parent's gseq at the fork, its pid.
_FORKED = struct.Struct(">16sQI")


class Kind(enum.IntEnum):
    START = 1
    DATA = 2
    END = 3


class Stream(enum.IntEnum):
    STDIN = 0
    STDOUT = 1
    STDERR = 2


STREAM_NAMES = {Stream.STDIN: "stdin", Stream.STDOUT: "stdout", Stream.STDERR: "stderr"}


class ConsoleError(Exception):
    """A console record (or stream) failed its checks; the message says which and how."""


def run_cipher(key: bytes, run: bytes, label: bytes) -> AESGCM:
    """The AEAD of one run: HKDF-SHA256(key, salt=run, info=label).

    Raises:
        ValueError: the key is not 32 bytes or the run id not 16.
    """
    if len(key) != KEY_SIZE:
        raise ValueError(f"a console key is {KEY_SIZE} bytes (64 hex digits)")
    if len(run) != RUN_SIZE:
        raise ValueError(f"a run id is {RUN_SIZE} bytes")
    derived = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=run, info=label).derive(key)
    return AESGCM(derived)


def parse_key(text: str) -> bytes:
    """A console key written as 64 hex digits (surrounding whitespace ignored).

    Raises:
        ValueError: anything else.
    """
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE:
        raise ValueError("a console key is 64 hex digits (32 bytes)")
    return key


def line_overhead() -> int:
    """How much longer than ``4/3`` of its payload a record line may be (prefix, header, tag, padding)."""
    return len(PREFIX) + 4 * ((_HEADER.size + TAG_SIZE + 2) // 3) + 4 + 1


def payload_for_line(max_line: int) -> int:
    """The largest payload whose record line fits in ``max_line`` bytes (at most :data:`MAX_PAYLOAD`)."""
    return max(1, min(MAX_PAYLOAD, (max_line - line_overhead()) * 3 // 4))


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a forked child's run comes from (its START records say it, authenticated)."""

    parent: bytes  # the parent's run
    gseq: int  # the parent's next gseq at the fork: the child's records follow the parent's before it
    pid: int  # the child's process id (for the owner's reports; it changes nothing)


@dataclass(frozen=True, slots=True)
class End:
    """What an END record says."""

    status: int
    total: int  # records in the run, its END records included
    counts: dict[Stream, int]  # records of each of its streams
    children: int | None  # children it started, forked or spawned (None: a pyscone that did not count them)


def lineage_of(start_payload: bytes) -> Lineage | None:
    """The lineage in a START record's payload (``None``: the first run of a family)."""
    if len(start_payload) != _FORKED.size:
        return None
    parent, gseq, pid = _FORKED.unpack(start_payload)
    return Lineage(parent, gseq, pid)


def end_of(end_payload: bytes) -> End | None:
    """What an END record's payload says (``None``: a payload of another version)."""
    if len(end_payload) == _END.size:
        status, total, *counts, children = _END.unpack(end_payload)
    elif len(end_payload) == _END_V1.size:
        status, total, *counts = _END_V1.unpack(end_payload)
        children = None
    else:
        return None
    return End(status, total, {s: n for s, n in zip(Stream, counts, strict=True) if n}, children)


@dataclass(frozen=True, slots=True)
class Record:
    kind: Kind
    stream: Stream
    run: bytes
    gseq: int
    sseq: int
    payload: bytes


class Encoder:
    """Makes the record lines of one run (output, or the owner's input for an app).

    Args:
        key: the owner's 32-byte console key.
        run: 16 random bytes, new for every run.
        streams: the streams of this run (their START and END records).
        label: :data:`OUTPUT_LABEL` or :data:`INPUT_LABEL`.
    """

    def __init__(
        self,
        key: bytes,
        run: bytes,
        streams: Iterable[Stream] = (Stream.STDOUT, Stream.STDERR),
        label: bytes = OUTPUT_LABEL,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.run = run
        self.streams = tuple(streams)
        self._aead = run_cipher(key, run, label)
        self._gseq = 0
        self._sseq = dict.fromkeys(self.streams, 0)
        self._max = max(1, min(max_payload, MAX_PAYLOAD))
        self.ended = False

    def _line(self, kind: Kind, stream: Stream, payload: bytes) -> bytes:
        if self.ended:
            raise ConsoleError("the run has ended: no record after its end records")
        header = _HEADER.pack(kind, stream, self.run, self._gseq, self._sseq[stream])
        sealed = self._aead.encrypt(self._gseq.to_bytes(12, "big"), payload, header)
        self._gseq += 1
        self._sseq[stream] += 1
        return PREFIX + binascii.b2a_base64(header + sealed)  # (with its newline)

    @property
    def gseq(self) -> int:
        """The next record's global sequence number (how many the run has numbered)."""
        return self._gseq

    def start(self, lineage: Lineage | None = None) -> list[bytes]:
        """The START record of each stream: first, before any data.

        Args:
            lineage: for the run of a forked child, its parent's run and where it forked.
        """
        payload = b"" if lineage is None else _FORKED.pack(lineage.parent, lineage.gseq, lineage.pid)
        return [self._line(Kind.START, s, payload) for s in self.streams]

    def write(self, stream: Stream, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The record lines of one write (several if it is larger than the payload bound)."""
        view = memoryview(data).cast("B")
        if view.nbytes <= self._max:
            return [self._line(Kind.DATA, stream, bytes(view))]
        return [self._line(Kind.DATA, stream, bytes(view[i : i + self._max])) for i in range(0, len(view), self._max)]

    def end(self, status: int, children: int = 0) -> list[bytes]:
        """The END record of each stream, with the exit status; nothing may follow them.

        Args:
            status: the exit status.
            children: how many children the process started, forked or spawned (each a run of its own).
        """
        total = self._gseq + len(self.streams)
        counts = [self._sseq.get(s, -1) + 1 for s in Stream]  # with its END (0: not a stream of the run)
        lines = [self._line(Kind.END, s, _END.pack(status, total, *counts, children)) for s in self.streams]
        self.ended = True
        return lines


def _strip(line: bytes) -> bytes:
    return line.rstrip(b"\r\n")


def is_record(line: bytes) -> bool:
    return line.startswith(PREFIX)


class _Keys:
    """The AEADs of the runs a decoder met, the most recently used kept (a family has a run per
    process: gunicorn's workers, restarted, are many, and write at once)."""

    _KEEP = 1024

    def __init__(self, key: bytes, label: bytes) -> None:
        self.key = key
        self.label = label
        self._cache: dict[bytes, AESGCM] = {}

    def get(self, run: bytes) -> AESGCM:
        aead = self._cache.pop(run, None)
        if aead is None:
            if len(self._cache) >= self._KEEP:
                del self._cache[next(iter(self._cache))]  # (the least recently used)
            aead = run_cipher(self.key, run, self.label)
        self._cache[run] = aead
        return aead


def open_line(keys: _Keys, line: bytes) -> Record:
    """Verify and open one record line.

    Raises:
        ConsoleError: it is not a well-formed record, or it does not verify.
    """
    body = _strip(line)
    if not body.startswith(PREFIX):
        raise ConsoleError("not a console record")
    try:
        raw = binascii.a2b_base64(body[len(PREFIX) :], strict_mode=True)
    except (binascii.Error, ValueError):
        raise ConsoleError("forged record (not valid base64)") from None
    if len(raw) < _HEADER.size + TAG_SIZE:
        raise ConsoleError("forged record (too short)")
    header = raw[: _HEADER.size]
    kind, stream, run, gseq, sseq = _HEADER.unpack(header)
    try:
        payload = keys.get(run).decrypt(gseq.to_bytes(12, "big"), raw[_HEADER.size :], header)
    except InvalidTag:
        raise ConsoleError("forged record (authentication failed)") from None
    # Verified: kind and stream are the encoder's, but a future version's must not crash us.
    if kind not in Kind.__members__.values() or stream not in Stream.__members__.values():
        raise ConsoleError("record of an unknown kind or stream (another version of pyscone?)")
    return Record(Kind(kind), Stream(stream), run, gseq, sseq, payload)
