"""The decoder of console logs: a family of runs, each checked on its own (sans-IO).

A log holds the records of a *family*: the run the enclave started with (the root) and the
run of every child it forked, and theirs, interleaved as the host received them.  Each run
is checked on its own (its streams' ``sseq``, its ``gseq``, its END), exactly as a single
run was before forks existed.  A child's START records name its parent's run and the
parent's ``gseq`` at the fork (authenticated), so the decoder links every child to a run
it has seen; the parent's END says how many children it forked, so a child run missing
altogether is seen too.

What is not part of the family is reported, and its output never shown:

* a record whose run has no START here (it waits :data:`REORDER_WINDOW` records for it):
  *a record of another run: replayed*, as is every record of a second root run;
* a child run whose parent is no run of this log: *unlinked* (a run of another log pasted
  in, or a log whose beginning is missing); it is reported once, not as a fault of any run
  here, and its records are counted, not shown.

A run that has no END is *truncated* (killed, crashed, or the log was cut); children that
a parent's END counts but the log lacks are *unstarted* (killed before their first record,
or dropped by the host: the two look the same).  Neither is called tampering.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pyscone.protect.console_records import (
    INPUT_LABEL,
    OUTPUT_LABEL,
    REORDER_WINDOW,
    STREAM_NAMES,
    ConsoleError,
    Kind,
    Lineage,
    Record,
    Stream,
    _Keys,
    end_of,
    is_record,
    lineage_of,
    open_line,
)

#: Problems that say the output is incomplete without saying that the host changed it.
UNCLEAN = frozenset({"truncated", "unstarted"})


@dataclass(frozen=True, slots=True)
class Output:
    """Plaintext the app wrote, in its run's order."""

    stream: Stream
    data: bytes
    gseq: int
    run: bytes = b""
    line: int = 0


@dataclass(frozen=True, slots=True)
class Problem:
    """Something the host did (or a crash), as one line for the owner."""

    kind: str  # forged, replayed, reordered, dropped, unlinked; truncated, unstarted (UNCLEAN)
    line: int
    message: str


Event = Output | Problem


@dataclass
class _StreamState:
    expected: int = 0
    held: dict[int, tuple[Record, int]] = field(default_factory=dict)
    ended: bool = False
    last_line: int = 0


@dataclass
class Run:
    """One run of the family, as far as this log shows it."""

    run: bytes
    lineage: Lineage | None  # None: the family's first run
    streams: dict[Stream, _StreamState] = field(default_factory=dict)
    last_gseq: int = -1
    status: int | None = None  # the exit status, from its END records
    total: int | None = None  # its record count, from its END records
    counts: dict[Stream, int] = field(default_factory=dict)  # each stream's, from its END records
    started: int | None = None  # the children it started (forked or spawned), from its END records
    records: int = 0  # authentic records of this run, each once
    children: list[bytes] = field(default_factory=list)

    @property
    def name(self) -> str:
        """How messages name this run: nothing for the root (as before forks), else its id and pid."""
        return "" if self.lineage is None else f"run {self.run.hex()[:12]} (pid {self.lineage.pid}): "

    @property
    def ended(self) -> bool:
        return bool(self.streams) and all(st.ended for st in self.streams.values())


class Decoder:
    """Checks and opens the record lines of one log (one source, in order).

    ``feed`` each line with its line number; it returns the app's output that is now in
    order (each run's in its order) and the problems it found.  ``finish`` at the end of
    the input reports gaps that never closed, missing end records and missing children.
    Lines that are not records (the host's own messages) are counted in :attr:`host_lines`
    and otherwise ignored: they are never shown as the app's output.

    Args:
        key: the owner's console key.
        label: :data:`OUTPUT_LABEL` (the app's output) or :data:`INPUT_LABEL`.
        window: records a gap (or a record before its run's START) waits before it is judged.
    """

    def __init__(self, key: bytes, label: bytes = OUTPUT_LABEL, window: int = REORDER_WINDOW) -> None:
        self._keys = _Keys(key, label)
        self._window = window
        self.runs: dict[bytes, Run] = {}  # the family, in the order met (the root first)
        self.root: Run | None = None
        self._foreign: set[bytes] = set()  # other roots: every record of theirs is reported
        self._unlinked: set[bytes] = set()  # children of no run here: reported once, not shown
        self._held: list[tuple[Record, int, int]] = []  # (record, line, records fed then): run unknown yet
        self._fed = 0
        self.unlinked_records = 0
        self.host_lines = 0
        self.problems: list[Problem] = []

    # -- the root run's view (what a log of one run reports) ---------------------------------

    @property
    def run(self) -> bytes | None:
        return self.root.run if self.root else None

    @property
    def status(self) -> int | None:
        return self.root.status if self.root else None

    @property
    def total(self) -> int | None:
        return self.root.total if self.root else None

    @property
    def counts(self) -> dict[Stream, int]:
        return self.root.counts if self.root else {}

    @property
    def records(self) -> int:
        """Authentic records of the family, each once."""
        return sum(r.records for r in self.runs.values())

    @property
    def children(self) -> list[Run]:
        """The family's runs but the root, in the order their START was met."""
        return [r for r in self.runs.values() if r is not self.root]

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def absent(self) -> dict[Stream, int]:
        """The root's streams (by its END records) of which this input holds no record, with their counts.

        Not a problem in itself: a log of stdout alone is a log of stdout alone.  Whoever
        expected a stream here (``2>&1``) learns it is missing.
        """
        root = self.root
        return {} if root is None else {s: n for s, n in root.counts.items() if s not in root.streams}

    @property
    def tampered(self) -> bool:
        """Whether a problem other than missing output (no end record, a child missing) was found."""
        return any(p.kind not in UNCLEAN for p in self.problems)

    def _problem(self, out: list[Event], kind: str, line: int, message: str) -> None:
        p = Problem(kind, line, message)
        self.problems.append(p)
        out.append(p)

    # -- routing: which run a record belongs to ------------------------------------------------

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
        self._fed += 1
        if self._route(out, rec, lineno):
            self._retry(out)
        if self._held and self._fed - self._held[0][2] >= self._window:
            self._expire(out, everything=False)
        return out

    def _known(self, rec: Record) -> bool:
        """Whether ``rec`` can be judged now (else it waits for its run's START, or its parent's)."""
        if rec.run in self.runs or rec.run in self._foreign or rec.run in self._unlinked:
            return True
        if rec.kind != Kind.START:
            return False
        lineage = lineage_of(rec.payload)
        if lineage is None:
            return True
        return lineage.parent in self.runs or lineage.parent in self._foreign or lineage.parent in self._unlinked

    def _route(self, out: list[Event], rec: Record, lineno: int) -> bool:
        """Judge ``rec`` or hold it; returns whether a new run joined the family."""
        if not self._known(rec):
            self._held.append((rec, lineno, self._fed))
            return False
        run = self.runs.get(rec.run)
        if run is not None:
            self._check(out, run, rec, lineno)
            return False
        if rec.run in self._unlinked:
            self.unlinked_records += 1
            return False
        lineage = lineage_of(rec.payload) if rec.kind == Kind.START else None
        if rec.run in self._foreign or (lineage is None and self.root is not None):
            self._foreign.add(rec.run)
            self._another_run(out, rec, lineno)
            return False
        if lineage is not None and lineage.parent not in self.runs:
            self._unlink(out, rec, lineno, lineage)
            return True  # (its own children, if held, are judged now too)
        self._join(out, rec, lineno, lineage)
        return True

    def _join(self, out: list[Event], rec: Record, lineno: int, lineage: Lineage | None) -> None:
        run = Run(rec.run, lineage)
        self.runs[rec.run] = run
        if lineage is None:
            self.root = run
        else:
            self.runs[lineage.parent].children.append(rec.run)
        # Its records that came before this START are checked with it in the order they came
        # (a START the host moved behind them is the reordering it is).
        early = [(r, n) for r, n, _ in self._held if r.run == rec.run]
        if early:
            self._held = [h for h in self._held if h[0].run != rec.run]
        for r, n in sorted([*early, (rec, lineno)], key=lambda t: t[1]):
            self._check(out, run, r, n)

    def _another_run(self, out: list[Event], rec: Record, lineno: int) -> None:
        self._problem(
            out, "replayed", lineno, f"line {lineno}: a record of another run ({rec.run.hex()[:12]}): replayed"
        )

    def _unlink(self, out: list[Event], rec: Record, lineno: int, lineage: Lineage) -> None:
        self._unlinked.add(rec.run)
        self.unlinked_records += 1
        self._problem(
            out,
            "unlinked",
            lineno,
            f"line {lineno}: run {rec.run.hex()[:12]} (pid {lineage.pid}) was forked by run "
            f"{lineage.parent.hex()[:12]}, which is not in this log: a run of another log pasted in, "
            "or the log lacks its beginning (its output is not shown)",
        )

    def _retry(self, out: list[Event]) -> None:
        """Judge the held records that a new run (or a newly unlinked one) makes judgeable."""
        progress = True
        while progress and self._held:
            progress = False
            held, self._held = self._held, []
            for rec, lineno, since in held:
                if self._known(rec):
                    progress |= self._route(out, rec, lineno)
                else:
                    self._held.append((rec, lineno, since))

    def _expire(self, out: list[Event], *, everything: bool) -> None:
        """Judge the records that waited long enough for their run's START (all of them at the end)."""
        if self.root is None:
            # No root START within the window: the log's beginning is missing (or a foreign
            # record was pasted ahead).  The first record that is no child's START names the
            # root, whose streams then begin with a gap (reported as dropped).
            first = next((r for r, _, _ in self._held if r.kind != Kind.START or lineage_of(r.payload) is None), None)
            if first is not None:
                self.root = self.runs[first.run] = Run(first.run, None)
                self._retry(out)
        while self._held and (everything or self._fed - self._held[0][2] >= self._window):
            rec, lineno, _ = self._held.pop(0)
            lineage = lineage_of(rec.payload) if rec.kind == Kind.START else None
            if self._known(rec):
                new = self._route(out, rec, lineno)
            elif lineage is not None:
                self._unlink(out, rec, lineno, lineage)
                new = True
            else:
                self._foreign.add(rec.run)
                self._another_run(out, rec, lineno)
                new = True  # (the run's other held records are judged as its now)
            if new:
                self._retry(out)

    # -- the checks of one run (as for a log of one run) ---------------------------------------

    def _check(self, out: list[Event], run: Run, rec: Record, lineno: int) -> None:
        name = STREAM_NAMES[rec.stream]
        st = run.streams.setdefault(rec.stream, _StreamState())
        if rec.sseq < st.expected or rec.sseq in st.held:
            self._problem(out, "replayed", lineno, f"line {lineno}: {run.name}{name} record {rec.sseq} again: replayed")
            return
        if rec.sseq > st.expected:
            st.held[rec.sseq] = (rec, lineno)
            if len(st.held) > self._window:
                self._drop_gap(out, run, rec.stream, st)
            return
        if st.held:
            later = min(st.held)
            self._problem(
                out,
                "reordered",
                lineno,
                f"line {lineno}: {run.name}{name} record {rec.sseq} came after record {later} "
                f"(line {st.held[later][1]}): reordered",
            )
        elif rec.gseq < run.last_gseq:
            self._problem(
                out,
                "reordered",
                lineno,
                f"line {lineno}: {run.name}record {rec.gseq} ({name}) came after record {run.last_gseq}: "
                "stdout and stderr reordered",
            )
        run.last_gseq = max(run.last_gseq, rec.gseq)
        self._release(out, run, st, rec, lineno)

    def _release(self, out: list[Event], run: Run, st: _StreamState, rec: Record, lineno: int) -> None:
        """Take ``rec`` (the next of its stream) and any held records that now follow it."""
        while True:
            self._accept(out, run, st, rec, lineno)
            nxt = st.held.pop(st.expected, None)
            if nxt is None:
                return
            rec, lineno = nxt
            run.last_gseq = max(run.last_gseq, rec.gseq)

    def _accept(self, out: list[Event], run: Run, st: _StreamState, rec: Record, lineno: int) -> None:
        st.expected = rec.sseq + 1
        st.last_line = lineno
        run.records += 1
        if rec.kind == Kind.DATA:
            out.append(Output(rec.stream, rec.payload, rec.gseq, rec.run, lineno))
        elif rec.kind == Kind.START and rec.sseq != 0:
            raise AssertionError("an authentic START record is its stream's first")  # pragma: no cover
        elif rec.kind == Kind.END:
            st.ended = True
            if (end := end_of(rec.payload)) is not None:
                run.status, run.total, run.counts, run.started = end.status, end.total, end.counts, end.children

    def _drop_gap(self, out: list[Event], run: Run, stream: Stream, st: _StreamState) -> None:
        """Give up on the first gap of a stream: report it, and go on after it."""
        first = min(st.held)
        rec, lineno = st.held.pop(first)
        missing = first - st.expected
        span = f"{st.expected}" if missing == 1 else f"{st.expected}-{first - 1}"
        where = " at the start of the stream (its first records are missing)" if st.expected == 0 else ""
        self._problem(
            out,
            "dropped",
            lineno,
            f"line {lineno}: {run.name}{STREAM_NAMES[stream]}: dropped {missing} record{'s' if missing != 1 else ''} "
            f"(seq {span}){where}",
        )
        run.last_gseq = max(run.last_gseq, rec.gseq)
        self._release(out, run, st, rec, lineno)

    def finish(self) -> list[Event]:
        """The end of the input: close every gap (as drops), check for end records and children."""
        out: list[Event] = []
        self._expire(out, everything=True)
        for run in self.runs.values():
            for stream, st in sorted(run.streams.items()):
                while st.held:
                    self._drop_gap(out, run, stream, st)
        if self.root is None:
            self._problem(out, "truncated", 0, "no console records at all: the app's output is missing")
        for run in self.runs.values():
            open_streams = [s for s, st in sorted(run.streams.items()) if not st.ended]
            if open_streams:
                names = " and ".join(STREAM_NAMES[s] for s in open_streams)
                last = max(run.streams[s].last_line for s in open_streams)
                who = "the app" if run.lineage is None else "the process"
                self._problem(
                    out,
                    "truncated",
                    last,
                    f"{run.name}no end record ({names}) after line {last}: {who} did not exit cleanly "
                    "(killed or crashed?), or the log was cut short",
                )
            if run.started is not None and len(run.children) < run.started:
                missing = run.started - len(run.children)
                self._problem(
                    out,
                    "unstarted",
                    0,
                    f"{run.name or 'the app: '}started {run.started} child process{'es' if run.started != 1 else ''}, "
                    f"{missing} of whose runs {'are' if missing != 1 else 'is'} not in this log: killed before "
                    "their first record, or dropped by the host",
                )
        return out


def merge(logs: Sequence[Iterable[Output]], lineage: dict[bytes, Lineage | None]) -> tuple[list[Output], int]:
    """Merge the outputs of several logs of one family (stdout's and stderr's) into one order.

    Each run's outputs come in its ``gseq`` order (its stdout and stderr interleaved as it
    wrote them); a child's come after its parent's that precede the fork; otherwise each
    log's arrival order is kept (where they conflict -- separate processes' queues reach the
    host when they do -- a run's order wins).  An output found in two logs is kept once.

    Returns:
        The outputs in order, and how many were in two logs (replayed).
    """
    pending: list[list[Output]] = []
    order: dict[bytes, list[int]] = {}  # each run's gseqs, sorted
    seen: set[tuple[bytes, int]] = set()
    twice = 0
    for log in logs:
        mine = []
        for ev in log:
            if (ev.run, ev.gseq) in seen:
                twice += 1
                continue
            seen.add((ev.run, ev.gseq))
            mine.append(ev)
            order.setdefault(ev.run, []).append(ev.gseq)
        pending.append(mine)
    for gseqs in order.values():
        gseqs.sort()
    done = dict.fromkeys(order, 0)  # how many of each run's outputs are out

    def nxt(run: bytes) -> int | None:
        gseqs = order.get(run, ())
        return gseqs[done[run]] if done.get(run, 0) < len(gseqs) else None

    def ready(ev: Output) -> bool:
        if nxt(ev.run) != ev.gseq:
            return False
        link = lineage.get(ev.run)
        return link is None or (n := nxt(link.parent)) is None or n >= link.gseq

    heads = [0] * len(pending)
    out: list[Output] = []
    while True:
        live = [i for i in range(len(pending)) if heads[i] < len(pending[i])]
        if not live:
            return out, twice
        pick = next((i for i in live if ready(pending[i][heads[i]])), None)
        if pick is not None:
            ev = pending[pick][heads[pick]]
            heads[pick] += 1
        else:  # the logs' orders conflict: take the next output of the first head's run, wherever it is
            run = pending[live[0]][heads[live[0]]].run
            want = nxt(run)
            pick, at = next(
                (i, j)
                for i in live
                for j in range(heads[i], len(pending[i]))
                if pending[i][j].run == run and pending[i][j].gseq == want
            )
            ev = pending[pick].pop(at)
        out.append(ev)
        done[ev.run] += 1


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
