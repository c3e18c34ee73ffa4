"""``pyscone console``: the owner's side of the console shield.

Turns record lines (a live stream on stdin, or log files) back into the app's stdout and
stderr, in the app's order, and says on stderr, one line each, what the host did to
them.  A log of an app that forks holds a family of runs (the app's and each child's,
interleaved): each run is checked on its own, each child's exit status is reported, and
each run's output comes out in its order (across processes, as the host received it).
Or it makes stdin records for the app from plain lines (``--encode-input``).  It runs
where the owner's key is, never on the untrusted host.  The checks are those of
:class:`pyscone.protect.console.Decoder`.

Exit status: 0 for a clean stream, 1 if the host forged, reordered, dropped or replayed
records (or pasted in a run of another log), 3 if the only problems are missing end
records or missing child runs (a process did not exit cleanly, or the log was cut short:
the two look the same), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # (the format's crypto is imported when a console command runs, not by every pyscone command)
    from pyscone.protect import console as fmt

EXIT_TAMPERED = 1
EXIT_NO_END = 3


class ToolError(Exception):
    """A user mistake, said in one line."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "console",
        help="decrypt and check the console shield's records (or make stdin records)",
        description="Decrypt the console shield's records from stdin (live: app | pyscone console ...) or "
        "from log files (stdout and stderr logs are merged in the app's order), and report what the host "
        "forged, reordered, dropped, replayed or cut. Exit status: 0 clean, 1 tampered, 3 no end record.",
    )
    p.add_argument("--key-file", required=True, metavar="FILE", help="the console key (64 hex digits)")
    p.add_argument(
        "--encode-input", action="store_true", help="read plain lines on stdin and write the app's stdin records"
    )
    p.add_argument("--make-key", action="store_true", help="write a new random key to --key-file and exit")
    p.add_argument("logs", nargs="*", metavar="LOGFILE", help="record logs (default: stdin)")


def read_key(path: str) -> bytes:
    """The console key in ``path`` (64 hex digits).

    Raises:
        ToolError: unreadable, or not a key.
    """
    from pyscone.protect import console as fmt

    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ToolError(f"console key file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        text = ""
    try:
        return fmt.parse_key(text)
    except ValueError as e:
        raise ToolError(f"console key file {path}: {e}") from None


def make_key(path: str) -> None:
    """Write a new random key to ``path`` (mode 0600; an existing file is never replaced)."""
    from pyscone.protect import console as fmt

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ToolError(f"console key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(fmt.KEY_SIZE).hex() + "\n")


def run(a: argparse.Namespace) -> int:
    try:
        if a.make_key:
            make_key(a.key_file)
            print(f"wrote a new console key to {a.key_file} (keep it secret)", file=sys.stderr)
            return 0
        key = read_key(a.key_file)
        if a.encode_input:
            if a.logs:
                raise ToolError("--encode-input reads plain lines on stdin (no LOGFILE)")
            encode_input(key, sys.stdin.buffer, sys.stdout.buffer)
            return 0
        return decode(key, a.logs)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def encode_input(key: bytes, src: IO[bytes], dst: IO[bytes]) -> None:
    """Each plain line of ``src`` becomes a record (flushed at once: the app may be waiting)."""
    from pyscone.protect import console as fmt

    enc = fmt.Encoder(key, os.urandom(fmt.RUN_SIZE), (fmt.Stream.STDIN,), fmt.INPUT_LABEL)
    dst.writelines(enc.start())
    dst.flush()
    for line in iter(src.readline, b""):
        dst.writelines(enc.write(fmt.Stream.STDIN, line))
        dst.flush()
    dst.writelines(enc.end(0))
    dst.flush()


def _say(message: str) -> None:
    sys.stderr.write(f"pyscone console: {message}\n")
    sys.stderr.flush()


def _emit(ev: fmt.Output) -> None:
    from pyscone.protect import console as fmt

    out = sys.stdout.buffer if ev.stream == fmt.Stream.STDOUT else sys.stderr.buffer
    out.write(ev.data)
    out.flush()


def _lines(src: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    yield from enumerate(iter(src.readline, b""), 1)


def decode(key: bytes, logs: list[str]) -> int:
    """Decode stdin (or one log) live, or merge several logs by the app's global order."""
    from pyscone.protect import console as fmt

    if len(logs) <= 1:
        dec = fmt.Decoder(key)
        name = f"{logs[0]}: " if logs else ""
        src = _open(logs[0]) if logs else sys.stdin.buffer
        try:
            for n, line in _lines(src):
                for ev in dec.feed(line, n):
                    _emit(ev) if isinstance(ev, fmt.Output) else _say(name + ev.message)
        finally:
            if logs:
                src.close()
        for ev in dec.finish():
            _emit(ev) if isinstance(ev, fmt.Output) else _say(name + ev.message)
        return _summary([dec], extra=0)
    decoders, outputs = [], []
    for path in logs:
        dec = fmt.Decoder(key)
        mine = []
        with _open(path) as src:
            events = [ev for n, line in _lines(src) for ev in dec.feed(line, n)]
        events += dec.finish()
        for ev in events:
            if isinstance(ev, fmt.Output):
                mine.append(ev)
            else:
                _say(f"{path}: {ev.message}")
        decoders.append(dec)
        outputs.append(mine)
    extra = 0
    runs = {d.run for d in decoders if d.run is not None}
    if len(runs) > 1:
        _say("the logs are of different runs: " + ", ".join(r.hex()[:12] for r in sorted(runs)))
        extra += 1
    lineage = {r.run: r.lineage for d in decoders for r in d.runs.values()}
    merged, twice = fmt.merge(outputs, lineage)
    if twice:
        _say(f"{twice} record{'s are' if twice != 1 else ' is'} in two logs: replayed")
        extra += twice
    for ev in merged:
        _emit(ev)
    return _summary(decoders, extra)


def _open(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as e:
        raise ToolError(f"{path}: {e.strerror}") from None


def _summary(decoders: Iterable[fmt.Decoder], extra: int) -> int:
    from pyscone.protect import console as fmt

    decs = list(decoders)
    children = _report_children(decs)
    problems = [p for d in decs for p in d.problems]
    host = sum(d.host_lines for d in decs)
    note = f"; {host} line{'s' if host != 1 else ''} of host text (not records) ignored" if host else ""
    seen = [d for d in decs if d.run is not None]
    absent = set.intersection(*(set(d.absent) for d in seen)) if seen else set()
    for stream in sorted(absent):
        count = max(d.absent[stream] for d in seen)
        note += (
            f"; no {fmt.STREAM_NAMES[stream]} records here (the run wrote {count}: give its log too if it was expected)"
        )
    tampered = extra or any(d.tampered for d in decs)
    if tampered:
        kinds = sorted({p.kind for p in problems if p.kind not in fmt.UNCLEAN})
        _say(
            f"TAMPERED: the host changed the output ({', '.join(kinds) or 'mixed runs'}; "
            f"{len(problems) + extra} problem{'s' if len(problems) + extra != 1 else ''}){note}"
        )
        return EXIT_TAMPERED
    if problems:  # only missing end records (or child runs), already said
        if note:
            _say(note[2:])
        return EXIT_NO_END
    dec = decs[0]
    run = dec.run.hex()[:12] if dec.run else "?"
    records = sum(d.records for d in decs)
    kids = len(children)
    family = f" and its {kids} child run{'s' if kids != 1 else ''}" if kids else ""
    _say(f"ok: {records} records of run {run}{family}, the app exited with status {dec.status}{note}")
    return 0


def _report_children(decs: list[fmt.Decoder]) -> dict[bytes, fmt.Run]:
    """One line for each child run that ended: its exit status (a run without one is a problem already)."""
    children: dict[bytes, fmt.Run] = {}
    for d in decs:
        for r in d.children:
            if r.run not in children or children[r.run].status is None:
                children[r.run] = r
    for r in children.values():
        if r.status is not None and r.lineage is not None:
            _say(
                f"run {r.run.hex()[:12]} (pid {r.lineage.pid}, forked by run {r.lineage.parent.hex()[:12]} "
                f"after its record {r.lineage.gseq - 1}): exited with status {r.status}"
            )
    return children
