"""Console records: the console shield's format (sans-IO: no I/O, no clock, no randomness).

Theory of operation
-------------------
With the console shield on, every write of the app to stdout or stderr becomes one or more
*records*, each ONE line of ASCII text (``psc1:`` + base64 of the binary record + ``\\n``),
so that terminals, ``docker logs`` and ``kubectl logs`` carry them unchanged.  A binary
record is::

    kind (1) | stream (1) | run (16) | gseq (8) | sseq (8) | AES-256-GCM(payload) + tag (16)

The first 34 bytes are the associated data: none of them can change unnoticed.

* ``run`` is 16 random bytes the enclave picks at start (the caller passes them in: this
  module draws no randomness).  Each run seals with its own key, HKDF-SHA256 of the
  owner's 32-byte key with the run as salt and a label as info, so a GCM nonce (the
  ``gseq``, big-endian) is never reused across runs although the owner's key is, and a
  record of another run (or another app with the same key) is recognised as such.
* ``gseq`` numbers all output records of a run, stdout and stderr together: two log files
  (``docker logs`` separates the streams) are merged back into the app's interleaving.
* ``sseq`` numbers the records of one stream, so that a decoder given one stream alone
  still sees a record missing from it.
* A run begins with a START record on each stream (``sseq`` 0) and, on a clean exit, ends
  with an END record on each stream carrying the app's exit status and the run's record
  count.  No END means the app did not exit cleanly (a crash, ``SIGKILL``) *or* the host
  cut the log: the two cannot be told apart, and the decoder says exactly that, never
  "tampered".
* stdin records (made by the owner with ``pyscone console --encode-input``) use a key
  derived with another label: an output record fed back as input does not verify.

The decoder classifies every deviation: *forged* (does not verify), *replayed* (a record
seen before, or of another run), *reordered* (a record after one that follows it),
*dropped* (a gap that stays open), *truncated* (no end record).  A gap is held open for
:data:`REORDER_WINDOW` records before it is called a drop, so a swap of two lines is
reported as the reordering it is, and the output comes out in the right order.
"""

from __future__ import annotations

import binascii
import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

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
_END = struct.Struct(">iQQQQ")  # exit status, records in the run, and in stdin, stdout, stderr


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

    def start(self) -> list[bytes]:
        """The START record of each stream: first, before any data."""
        return [self._line(Kind.START, s, b"") for s in self.streams]

    def write(self, stream: Stream, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The record lines of one write (several if it is larger than the payload bound)."""
        view = memoryview(data).cast("B")
        if view.nbytes <= self._max:
            return [self._line(Kind.DATA, stream, bytes(view))]
        return [self._line(Kind.DATA, stream, bytes(view[i : i + self._max])) for i in range(0, len(view), self._max)]

    def end(self, status: int) -> list[bytes]:
        """The END record of each stream, with the exit status; nothing may follow them."""
        total = self._gseq + len(self.streams)
        counts = [self._sseq.get(s, -1) + 1 for s in Stream]  # with its END (0: not a stream of the run)
        lines = [self._line(Kind.END, s, _END.pack(status, total, *counts)) for s in self.streams]
        self.ended = True
        return lines


def _strip(line: bytes) -> bytes:
    return line.rstrip(b"\r\n")


def is_record(line: bytes) -> bool:
    return line.startswith(PREFIX)


class _Keys:
    """The AEADs of the runs a decoder met (a few: a foreign run is only ever reported)."""

    def __init__(self, key: bytes, label: bytes) -> None:
        self.key = key
        self.label = label
        self._cache: dict[bytes, AESGCM] = {}

    def get(self, run: bytes) -> AESGCM:
        aead = self._cache.get(run)
        if aead is None:
            if len(self._cache) >= 16:
                self._cache.clear()
            aead = self._cache[run] = run_cipher(self.key, run, self.label)
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


@dataclass(frozen=True, slots=True)
class Output:
    """Plaintext the app wrote, in order."""

    stream: Stream
    data: bytes
    gseq: int


@dataclass(frozen=True, slots=True)
class Problem:
    """Something the host did (or a crash), as one line for the owner."""

    kind: str  # forged, replayed, reordered, dropped, truncated
    line: int
    message: str


Event = Output | Problem


@dataclass
class _StreamState:
    expected: int = 0
    held: dict[int, tuple[Record, int]] = field(default_factory=dict)
    ended: bool = False
    last_line: int = 0


class Decoder:
    """Checks and opens a sequence of record lines of one run (one source, in order).

    ``feed`` each line with its line number; it returns the app's output that is now in
    order and the problems it found.  ``finish`` at the end of the input reports gaps that
    never closed and a missing end record.  Lines that are not records (the host's own
    messages) are counted in :attr:`host_lines` and otherwise ignored: they are never
    shown as the app's output.

    Args:
        key: the owner's console key.
        label: :data:`OUTPUT_LABEL` (the app's output) or :data:`INPUT_LABEL`.
        window: records a gap waits for before it is a drop (0: at once).
    """

    def __init__(self, key: bytes, label: bytes = OUTPUT_LABEL, window: int = REORDER_WINDOW) -> None:
        self._keys = _Keys(key, label)
        self._window = window
        self._streams: dict[Stream, _StreamState] = {}
        self._last_gseq = -1
        self._early: list[tuple[Record, int]] = []
        self.run: bytes | None = None
        self.status: int | None = None  # the app's exit status, from its END records
        self.total: int | None = None  # the run's record count, from its END records
        self.counts: dict[Stream, int] = {}  # each stream's record count, from its END records
        self.records = 0  # authentic records of this run, each once
        self.host_lines = 0
        self.problems: list[Problem] = []

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def absent(self) -> dict[Stream, int]:
        """The run's streams (by their END records) of which this input holds no record, with their counts.

        Not a problem in itself: a log of stdout alone is a log of stdout alone.  Whoever
        expected a stream here (``2>&1``) learns it is missing.
        """
        return {s: n for s, n in self.counts.items() if s not in self._streams}

    @property
    def tampered(self) -> bool:
        """Whether a problem other than a missing end record was found."""
        return any(p.kind != "truncated" for p in self.problems)

    def _problem(self, out: list[Event], kind: str, line: int, message: str) -> None:
        p = Problem(kind, line, message)
        self.problems.append(p)
        out.append(p)

    def feed(self, line: bytes, lineno: int) -> list[Event]:
        out: list[Event] = []
        if not is_record(line):
            self.host_lines += 1
            return out
        try:
            rec = open_line(self._keys, line)
        except ConsoleError as e:
            self._problem(out, "forged", lineno, f"line {lineno}: {e}")
            return out
        if self.run is None:
            # The run is the first START's: a record before it (another run's, pasted ahead,
            # or a log whose beginning is cut) waits, up to the window, to be judged by it.
            self._early.append((rec, lineno))
            if rec.kind != Kind.START and len(self._early) <= self._window:
                return out
            self._adopt(out)
            return out
        return self._check(out, rec, lineno)

    def _adopt(self, out: list[Event]) -> None:
        """Take the run of the first START among the early records (else the first record's)."""
        early, self._early = self._early, []
        starts = [r for r, _ in early if r.kind == Kind.START]
        self.run = (starts[0] if starts else early[0][0]).run
        for rec, lineno in early:
            self._check(out, rec, lineno)

    def _check(self, out: list[Event], rec: Record, lineno: int) -> list[Event]:
        if rec.run != self.run:
            self._problem(
                out, "replayed", lineno, f"line {lineno}: a record of another run ({rec.run.hex()[:12]}): replayed"
            )
            return out
        name = STREAM_NAMES[rec.stream]
        st = self._streams.setdefault(rec.stream, _StreamState())
        if rec.sseq < st.expected or rec.sseq in st.held:
            self._problem(out, "replayed", lineno, f"line {lineno}: {name} record {rec.sseq} again: replayed")
            return out
        if rec.sseq > st.expected:
            st.held[rec.sseq] = (rec, lineno)
            if len(st.held) > self._window:
                self._drop_gap(out, rec.stream, st)
            return out
        if st.held:
            later = min(st.held)
            self._problem(
                out,
                "reordered",
                lineno,
                f"line {lineno}: {name} record {rec.sseq} came after record {later} "
                f"(line {st.held[later][1]}): reordered",
            )
        elif rec.gseq < self._last_gseq:
            self._problem(
                out,
                "reordered",
                lineno,
                f"line {lineno}: record {rec.gseq} ({name}) came after record {self._last_gseq}: "
                "stdout and stderr reordered",
            )
        self._last_gseq = max(self._last_gseq, rec.gseq)
        self._release(out, st, rec, lineno)
        return out

    def _release(self, out: list[Event], st: _StreamState, rec: Record, lineno: int) -> None:
        """Take ``rec`` (the next of its stream) and any held records that now follow it."""
        while True:
            self._accept(out, st, rec, lineno)
            nxt = st.held.pop(st.expected, None)
            if nxt is None:
                return
            rec, lineno = nxt
            self._last_gseq = max(self._last_gseq, rec.gseq)

    def _accept(self, out: list[Event], st: _StreamState, rec: Record, lineno: int) -> None:
        st.expected = rec.sseq + 1
        st.last_line = lineno
        self.records += 1
        if rec.kind == Kind.DATA:
            out.append(Output(rec.stream, rec.payload, rec.gseq))
        elif rec.kind == Kind.START and rec.sseq != 0:
            raise AssertionError("an authentic START record is its stream's first")  # pragma: no cover
        elif rec.kind == Kind.END:
            st.ended = True
            if len(rec.payload) == _END.size:
                self.status, self.total, *counts = _END.unpack(rec.payload)
                self.counts = {s: n for s, n in zip(Stream, counts, strict=True) if n}

    def _drop_gap(self, out: list[Event], stream: Stream, st: _StreamState) -> None:
        """Give up on the first gap of a stream: report it, and go on after it."""
        first = min(st.held)
        rec, lineno = st.held.pop(first)
        missing = first - st.expected
        span = f"{st.expected}" if missing == 1 else f"{st.expected}-{first - 1}"
        where = "at the start of the stream (its first records are missing)" if st.expected == 0 else ""
        self._problem(
            out,
            "dropped",
            lineno,
            f"line {lineno}: {STREAM_NAMES[stream]}: dropped {missing} record{'s' if missing != 1 else ''} "
            f"(seq {span}){' ' + where if where else ''}",
        )
        self._last_gseq = max(self._last_gseq, rec.gseq)
        self._release(out, st, rec, lineno)

    def finish(self) -> list[Event]:
        """The end of the input: close every gap (as drops), and check for end records."""
        out: list[Event] = []
        if self._early:
            self._adopt(out)
        for stream, st in sorted(self._streams.items()):
            while st.held:
                self._drop_gap(out, stream, st)
        open_streams = [s for s, st in sorted(self._streams.items()) if not st.ended]
        if self.run is None:
            self._problem(out, "truncated", 0, "no console records at all: the app's output is missing")
        elif open_streams:
            names = " and ".join(STREAM_NAMES[s] for s in open_streams)
            last = max(self._streams[s].last_line for s in open_streams)
            self._problem(
                out,
                "truncated",
                last,
                f"no end record ({names}) after line {last}: the app did not exit cleanly "
                "(killed or crashed?), or the log was cut short",
            )
        return out


class InputReader:
    """The enclave's side of stdin records: bytes from the host in, the owner's plaintext out.

    Strict: any problem (a line that is no record, forged, replayed, reordered, dropped,
    or the host's EOF before the owner's end record) raises :class:`ConsoleError`, and the
    reader stays failed: the app gets an error, never wrong bytes.  An input with no
    records at all is an empty stdin (the owner gave none).
    """

    def __init__(self, key: bytes, max_line: int) -> None:
        self._decoder = Decoder(key, INPUT_LABEL, window=0)
        self._buf = bytearray()
        self._max_line = max_line
        self._lines = 0
        self.failed: str | None = None
        self.ended = False

    def _fail(self, why: str) -> ConsoleError:
        self.failed = why
        return ConsoleError(why)

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the host; return the plaintext of the complete records among them.

        Raises:
            ConsoleError: a bad record (and every later call).
        """
        if self.failed:
            raise ConsoleError(self.failed)
        self._buf += data
        plain = bytearray()
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[: nl + 1])
            del self._buf[: nl + 1]
            self._lines += 1
            if self.ended:
                raise self._fail(f"stdin line {self._lines}: input after the end record")
            if not is_record(line):
                raise self._fail(f"stdin line {self._lines}: not an input record")
            for ev in self._decoder.feed(line, self._lines):
                if isinstance(ev, Problem):
                    raise self._fail("stdin " + ev.message.replace("stdin: ", ""))
                plain += ev.data
            self.ended = self._decoder.status is not None
        if len(self._buf) > self._max_line:
            raise self._fail(f"stdin line {self._lines + 1}: longer than any input record")
        return bytes(plain)

    def eof(self) -> None:
        """The host says end of file.

        Raises:
            ConsoleError: the input stopped before the owner's end record.
        """
        if self.failed:
            raise ConsoleError(self.failed)
        if self.ended or (self._lines == 0 and not self._buf):
            return
        raise self._fail(f"stdin ended after line {self._lines} without its end record: cut short")


__all__ = [
    "INPUT_LABEL",
    "MAX_PAYLOAD",
    "OUTPUT_LABEL",
    "PREFIX",
    "ConsoleError",
    "Decoder",
    "Encoder",
    "InputReader",
    "Kind",
    "Output",
    "Problem",
    "Record",
    "Stream",
    "parse_key",
    "payload_for_line",
]
