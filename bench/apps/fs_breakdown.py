"""Where the time of an encrypted sequential 64 KiB write and read goes: chunk crypto,
host calls (system calls), FSPF sealing, and the rest (Python bookkeeping).

    pyscone run --fspf FSPF bench/apps/fs_breakdown.py enclave DIR SIZE
    python bench/apps/fs_breakdown.py inprocess DIR SIZE [--kind encrypted|authenticated]

``enclave``: the same ``open``/``write``/``read`` calls as ``fs_io.py`` (seq-write-64k,
then seq-read-64k), on ``DIR/data.bin`` through the file-system shield; ``DIR`` must lie in a
protected region.  The shield's functions are wrapped to time them (a diagnostic, not
how an app should touch the runtime):

* ``chunk_crypto``: ``pyscone.protect.pfile``'s ``seal_run_into`` / ``open_run_into`` / ``open_chunk``;
* ``host_calls``: every host call but fsync (``Scheduler.host_call``: slot copy in, the
  host's system call, the wait, slot copy out, iago's check);
* ``fsync``: the fsync host calls (the disk flush native Python pays too);
* ``fspf_seal``: sealing the FSPF at the commit;
* ``other``: the rest (the io stack, the shield, ``ProtectedFile``'s bookkeeping, copies).

``inprocess``: no enclave.  A ``ProtectedFile`` over a plain file, driven with what the
shield receives from the enclave's buffered file objects: 64 KiB writes (a write larger
than the buffer goes straight through), reads of one buffer (``st_blksize``: 15 chunks of
4 KiB whose records fit one 64 KiB host call), host I/O split like the shield's
``HostStore``; the commit is ``ProtectedFile.commit``, fsync, and an atomic FSPF write.
Here ``host_calls`` and ``fsync`` are the time in those system calls.

Times are exclusive (a wrapped call's time excludes wrapped calls inside it).  The
wrappers cost about a microsecond a call, so totals are a little above an unwrapped run.
Prints one JSON line per pattern.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fs_io  # found next to this file (the line above), in the enclave too

BLOCK = 65536
MAX_IO = 65536  # the default slot size: the shield's largest host call
CHUNK = 4096
READ_RAW = (MAX_IO // (CHUNK + 28)) * CHUNK  # the shield's st_blksize: 61,440 bytes


class Clock:
    """Exclusive wall time and call counts per category of wrapped function."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: Counter[str] = Counter()
        self._children: list[float] = []

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(self, category: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, timed under ``category`` (or under ``category(*args)``, a function of its arguments)."""
        children = self._children
        perf = time.perf_counter
        name_of: Callable[..., str] = category if callable(category) else (lambda *args: category)

        def timed(*args: Any, **kwargs: Any) -> Any:
            cat: str = name_of(*args)
            children.append(0.0)
            t0 = perf()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = perf() - t0
                inner = children.pop()
                self.seconds[cat] = self.seconds.get(cat, 0.0) + dt - inner
                self.calls[cat] += 1
                if children:
                    children[-1] += dt

        return timed

    def result(self, pattern: str, mode: str, nbytes: int, seconds: float) -> dict[str, object]:
        parts = {k: round(v, 6) for k, v in sorted(self.seconds.items())}
        return {
            "pattern": pattern,
            "mode": mode,
            "bytes": nbytes,
            "seconds": round(seconds, 6),
            "mb_per_s": round(nbytes / seconds / 1e6, 3),
            "parts_s": {**parts, "other": round(seconds - sum(self.seconds.values()), 6)},
            "calls": dict(sorted(self.calls.items())),
        }


def instrument_protect(clock: Clock) -> None:
    from pyscone.protect import fspf, pfile

    pf: Any = pfile  # ProtectedFile looks these up in its module at every call
    for name in ("open_chunk", "open_run_into", "seal_run_into"):
        setattr(pf, name, clock.wrap("chunk_crypto", getattr(pf, name)))
    fm: Any = fspf  # the shield and the FSPF tool call fspf.seal at every commit
    fm.seal = clock.wrap("fspf_seal", fm.seal)


def enclave(directory: str, size: int) -> list[dict[str, object]]:
    from pyscone.abi import Op
    from pyscone.enclave import scheduler
    from pyscone.enclave.shields import fs

    if fs.shield() is None:
        raise SystemExit("enclave mode runs in an enclave with a shield: pyscone run --fspf FSPF ...")
    clock = Clock()
    instrument_protect(clock)
    cls: Any = type(scheduler.get())
    cls.host_call = clock.wrap(lambda _self, op, *_: "fsync" if op == Op.FSYNC else "host_calls", cls.host_call)
    cls.start = clock.wrap("host_calls", cls.start)  # read-ahead and write-behind
    cls.finish = clock.wrap("host_calls", cls.finish)
    path = os.path.join(directory, fs_io.FILE_NAME)
    out = []
    for pattern in ("seq-write-64k", "seq-read-64k"):
        clock.reset()
        t0 = time.perf_counter()
        n = fs_io.seq_write(path, size, BLOCK) if pattern == "seq-write-64k" else fs_io.seq_read(path, BLOCK)
        out.append(clock.result(pattern, "enclave", n, time.perf_counter() - t0))
    return out


def inprocess(directory: str, size: int, kind: str) -> list[dict[str, object]]:
    from pyscone.host import fspf_tool as tool
    from pyscone.protect.chunks import FileKey
    from pyscone.protect.fspf import FileEntry
    from pyscone.protect.pfile import LocalStore, ProtectedFile

    clock = Clock()
    instrument_protect(clock)
    io_call = clock.wrap("host_calls", lambda fn, *a: fn(*a))
    tool._write_atomic = clock.wrap("host_calls", tool._write_atomic)  # the FSPF and its tag file
    os.fsync = clock.wrap("fsync", os.fsync)

    class SplitStore(LocalStore):
        """``HostStore`` without the enclave: records in a plain file, at most MAX_IO a call."""

        def __init__(self, fd: int) -> None:
            self.fd = fd

        def pread(self, offset: int, size: int) -> bytes:
            parts = []
            while size > 0:
                n = min(size, MAX_IO)
                data: bytes = io_call(os.pread, self.fd, n, offset)
                parts.append(data)
                if len(data) < n:
                    break
                offset += n
                size -= n
            return b"".join(parts)

        def pwrite(self, offset: int, data: bytes | bytearray) -> None:
            view = memoryview(data)
            while view:
                n: int = io_call(os.pwrite, self.fd, view[:MAX_IO], offset)
                offset += n
                view = view[n:]

    paths = tool.Paths.of(os.path.join(directory, "bench.fspf"))
    tool.create(paths, force=True)
    tool.add_region(paths, directory, kind, CHUNK)
    table, key, _ = tool.load(paths)
    path = os.path.join(directory, fs_io.FILE_NAME)
    block = os.urandom(BLOCK)
    out = []

    clock.reset()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pf = ProtectedFile(FileEntry(FileKey.generate(encrypted=kind == "encrypted", chunk_size=CHUNK)), SplitStore(fd))
        for off in range(0, size, BLOCK):
            pf.write(off, block[: min(BLOCK, size - off)])
        entry = pf.commit()
        os.fsync(fd)
        table.files[path] = entry
        tool.save(paths, table, key)
    finally:
        os.close(fd)
    out.append(clock.result("seq-write-64k", f"inprocess-{kind}", size, time.perf_counter() - t0))

    clock.reset()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        pf = ProtectedFile(entry, SplitStore(fd))
        pos = 0
        while pos < size:
            pos += len(pf.read(pos, READ_RAW))
    finally:
        os.close(fd)
    out.append(clock.result("seq-read-64k", f"inprocess-{kind}", pos, time.perf_counter() - t0))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="time split of sequential 64 KiB protected-file I/O")
    p.add_argument("mode", choices=("enclave", "inprocess"))
    p.add_argument("dir", help="a directory (in a protected region for enclave mode)")
    p.add_argument("size", type=fs_io.parse_size, help="file size, e.g. 64M")
    p.add_argument("--kind", choices=("encrypted", "authenticated"), default="encrypted", help="inprocess only")
    a = p.parse_args()
    if a.mode == "enclave":
        results = enclave(a.dir, a.size)
    else:
        with tempfile.TemporaryDirectory(dir=a.dir) as d:
            results = inprocess(os.path.realpath(d), a.size, a.kind)
    for r in results:
        sys.stdout.write(json.dumps(r) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
