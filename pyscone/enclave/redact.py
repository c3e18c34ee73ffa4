"""What the runtime itself prints about the enclave's state (TRUSTED).

The console is the host's until the console shield encrypts it, and the host can make
the runtime print at any moment: a SIGINT becomes a ``KeyboardInterrupt`` whose
traceback the runtime reports, and a crash of any lthread is reported the same way.
A traceback names files and functions and quotes source lines, so from code that the
FS shield keeps *encrypted* (or in enclave memory) it would hand the host exactly what
the shield hides.

So, in a production enclave, the tracebacks the runtime prints (uncaught exceptions,
``^C``, thread and lthread crashes) show a frame of protected code as one line,
``[protected code]``, and withhold the message of an exception raised there (it may
quote the data).  Frames of code the host can read anyway (the interpreter's standard
library, unprotected and authenticated files) print as usual, so a crash is still
locatable.  Debug enclaves (``--no-barrier``) print everything, and say so; the lthread
dump (``kill -USR2``) exists only there.  What the *app* prints or logs is the app's
choice and goes to the console as it is (the console shield is what protects that).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterable
from types import TracebackType

_PROTECTED = "<pyscone: protected code>"
_RUNTIME = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the pyscone package
_debug = True


def protected(filename: str) -> bool:
    """Whether code from ``filename`` is hidden from the host (an encrypted or memory region)."""
    # Never import here: a report may be printed by several lthreads at once, and the shield
    # is loaded by boot whenever one is mounted (no module means no protected code).
    fs = sys.modules.get("pyscone.enclave.shields.fs")
    if fs is None:
        return False
    shield = fs.shield()
    if shield is None or not filename.startswith("/"):
        return False
    return shield.kind(filename) in ("encrypted", "memory")


class _Stack(traceback.StackSummary):
    def format_frame_summary(self, frame_summary: traceback.FrameSummary) -> str:
        if frame_summary.filename == _PROTECTED:
            n = frame_summary.lineno or 1
            return f"  [protected code{f': {n} frames' if n > 1 else ''}]\n"
        return super().format_frame_summary(frame_summary)


def _redact(te: traceback.TracebackException, seen: set[int]) -> None:
    if id(te) in seen:
        return
    seen.add(id(te))
    frames: list[traceback.FrameSummary] = []
    for f in te.stack:
        if f.filename.startswith(_RUNTIME):
            continue  # the runtime's own frames: natively these would be C, never shown
        if protected(f.filename):
            if frames and frames[-1].filename == _PROTECTED:
                frames[-1].lineno = (frames[-1].lineno or 1) + 1
            else:
                frames.append(traceback.FrameSummary(_PROTECTED, 1, "", lookup_line=False, line=""))
        else:
            frames.append(f)
    raised_inside = bool(frames) and frames[-1].filename == _PROTECTED
    stack = _Stack()  # (StackSummary.from_list always makes a plain StackSummary)
    stack.extend(frames)
    te.stack = stack
    if te.exc_type is not None and issubclass(te.exc_type, SyntaxError) and protected(te.filename or ""):
        te.filename = _PROTECTED
        for field in ("lineno", "text", "offset", "end_offset"):  # the line, and where in it
            setattr(te, field, None)
        raised_inside = True
    if raised_inside:
        te._str = "(message withheld: raised in protected code)"  # type: ignore[attr-defined]
    for other in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):
        if other is not None:
            _redact(other, seen)


def format_exception(
    exc_type: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
) -> Iterable[str]:
    """Like :func:`traceback.format_exception`, with protected code hidden unless debugging."""
    if _debug or value is None:
        return traceback.format_exception(exc_type, value, tb)
    te = traceback.TracebackException(type(value), value, tb, compact=True)
    _redact(te, set())
    return te.format()


def print_exception(
    exc_type: type[BaseException] | None,
    value: BaseException | None,
    tb: TracebackType | None,
    header: str = "",
) -> None:
    """What the runtime prints for an exception it reports (to the console), in one write:
    reports from several lthreads at once do not interleave (``traceback.print_exception``
    writes line by line, and an lthread may switch at every console write)."""
    sys.stderr.write(header + "".join(format_exception(exc_type, value, tb)))
    sys.stderr.flush()


def print_exc(header: str = "") -> None:
    exc_type, value, tb = sys.exc_info()
    print_exception(exc_type, value, tb, header)


def install(debug: bool) -> None:
    """Choose what the runtime's reports show, and route the interpreter's own hooks here."""
    global _debug
    import threading

    _debug = debug
    sys.excepthook = print_exception

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        print_exception(args.exc_type, args.exc_value, args.exc_traceback, header=f"Exception in thread {name}:\n")

    threading.excepthook = thread_hook
