"""The enclave's verified bytecode cache (TRUSTED): code objects it sealed itself, on host disk.

The recipes (names, sealing, why the host cannot forge or read an entry) are in
``protect/codecache.py``.  This module is their I/O: an entry is one file in the cache
directory, read and written through the enclave's file layer like any file the app
opens.  The directory is the host's choice and is untrusted storage; one inside a
region of the file-system shield is refused (the runtime does not add files to the
app's protected volume).

An entry that does not open is *refused*, never run: the import compiles the measured
source, as if there were no cache, writes a good entry over the bad one, and the
console says so once.  Nothing is lost, since the source (which alone decides the code)
was read and measured anyway; failing the whole enclave over an optimisation the host
can also switch off by deleting files would only make it more fragile.

Writes go to a temporary name and are renamed into place, so a crash or a full disk
leaves no partial entry; a failed write is silently skipped (the next start compiles).

Read-ahead (:class:`WarmSet`): what makes an enclave's imports slow once nothing is
compiled is waiting for the host, twice per module, while the host sleeps between calls.
So the cache also keeps, sealed, the list of modules the app imported last time, in
order (its *manifest*); at the next start the enclave asks the host for the next few
dozen sources and entries at once, and executes modules while the host reads ahead: the
paper's asynchronous system calls, applied to imports.  What is read ahead is only held:
an import uses it exactly as it would have read it (the source hashed and measured when
it is used, the entry opened and compared), so the manifest decides nothing but timing.
"""

from __future__ import annotations

import errno
import marshal
import os
import sys
import time
from dataclasses import dataclass
from types import CodeType
from typing import Any

from pyscone.enclave import scheduler
from pyscone.enclave.stdlib import files
from pyscone.protect.codecache import CacheIntegrityError, CacheKey, interpreter_tag


@dataclass(frozen=True)
class Pending:
    """An entry asked for (:meth:`BytecodeCache.prefetch`) and not yet taken."""

    name: str
    read: Any


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    stored: int = 0
    refused: int = 0


class BytecodeCache:
    """Entries in ``directory``, sealed with ``key``.

    Args:
        directory: an absolute path on the host (outside every shield region).
        key: the 32-byte cache key.
    """

    def __init__(self, directory: str, key: bytes) -> None:
        self.directory = directory
        self.key = CacheKey(key, interpreter_tag())
        self.stats = Stats()
        self._warned = False

    def entry_path(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def prefetch(self, path: str) -> Pending:
        """Ask the host for the entry of ``path`` now; :meth:`load` takes it (read the source meanwhile)."""
        name = self.key.name(path)
        return Pending(name, files.start_read_whole(self.entry_path(name)))

    def load(self, pending: Pending, source_sha256: bytes, path: str) -> CodeType | None:
        """The cached code of ``path`` if it was compiled from the source with this digest."""
        try:
            blob = files.finish_read_whole(pending.read, self.entry_path(pending.name))
        except OSError:
            self.stats.misses += 1
            return None
        try:
            payload = self.key.unpack(pending.name, blob, source_sha256)
            code = marshal.loads(payload) if payload is not None else None
        except (CacheIntegrityError, ValueError, EOFError, TypeError) as e:
            self.refuse(path, e)
            return None
        if code is None:
            self.stats.misses += 1  # compiled from another version of the source
            return None
        if type(code) is not CodeType or code.co_filename != path:
            self.refuse(path, None)
            return None
        self.stats.hits += 1
        return code

    def refuse(self, path: str, e: Exception | None) -> None:
        self.stats.refused += 1
        if not self._warned:
            self._warned = True
            why = str(e) if isinstance(e, CacheIntegrityError) else "not a code object of this module"
            _console(
                f"pyscone: bytecode cache: an entry (for {path}) was refused ({why}: altered on the host?); "
                "compiling from source instead"
            )

    def store(self, pending: Pending, source_sha256: bytes, code: CodeType) -> None:
        """Seal ``code`` (compiled from the source with this digest) as the entry :meth:`load` missed.

        Best effort: a failure only costs a compile at the next start.
        """
        name = pending.name
        if self.write_entry(name, self.key.pack(name, source_sha256, marshal.dumps(code))):
            self.stats.stored += 1

    def write_entry(self, name: str, blob: bytes) -> bool:
        """Put ``blob`` in place as the entry ``name``, whole or not at all."""
        final = self.entry_path(name)
        tmp = f"{final}.{os.urandom(6).hex()}.tmp"
        try:
            fd = files.os_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            try:
                view = memoryview(blob)
                while view:
                    n = files.write(fd, view)
                    if n <= 0:
                        raise OSError(errno.EIO, "short write")
                    view = view[n:]
            finally:
                files.close(fd)
            files.replace(tmp, final)
        except OSError:
            try:
                files.unlink(tmp)
            except OSError:
                pass
            return False
        return True


def usable_directory(directory: str) -> str | None:
    """Why the enclave will not keep its cache in ``directory`` (None: it will)."""
    if not directory.startswith("/"):
        return "not an absolute path"
    directory = os.path.normpath(directory)
    if files.in_shield(directory):
        return "inside a region of the file-system shield"
    try:
        st = files.stat(directory)
    except OSError as e:
        return e.strerror or "cannot be read"
    if (st.st_mode & 0o170000) != 0o040000:
        return "not a directory"
    return None


def _console(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed console must not break an import
        pass


WINDOW = 24  # modules read ahead at once (two host calls each, of 1024 slots)
MANIFEST_MAX = 5000  # modules a manifest lists
QUIET_S = 1.0  # no new import for this long: the app is warm, write its manifest


class WarmSet:
    """The app's imports, read ahead from the manifest of its last run; and this run's list.

    Args:
        cache: the cache the manifest is kept in.
        app: what identifies the app (its program, module or command, and cwd).
    """

    def __init__(self, cache: BytecodeCache, app: str) -> None:
        self.cache = cache
        self.name = cache.key.name("manifest:" + app)
        self.order: list[str] = []
        self.next = 0
        self.ahead: dict[str, tuple[Any, Pending]] = {}
        self.seen: dict[str, None] = {}  # this run's imports, in order
        self.last = time.monotonic()
        self.written = False

    def begin(self) -> None:
        """Read the manifest (one host call) and start reading ahead; write the new one later."""
        try:
            blob = files.read_whole(self.cache.entry_path(self.name))
            payload = self.cache.key.open(self.name, blob)
            self.order = [p for p in payload.decode("utf-8", "surrogateescape").split("\n") if p.startswith("/")]
        except OSError:
            pass  # no manifest yet
        except (CacheIntegrityError, UnicodeDecodeError) as e:
            self.cache.refuse("the import manifest", e)
        self._fill()
        scheduler.get().spawn(self._writer, name="pyscone-bytecode-manifest")

    def _fill(self) -> None:
        while len(self.ahead) < WINDOW and self.next < len(self.order):
            path = self.order[self.next]
            self.next += 1
            if path in self.ahead or path in self.seen:
                continue
            source = files.start_read_whole(path)
            if source is None:
                continue  # a shielded source (read through the shield), or no free slot now
            self.ahead[path] = (source, self.cache.prefetch(path))

    def take(self, path: str) -> tuple[Any, Pending]:
        """The source read and the entry for ``path``: read ahead, or asked for now."""
        if len(self.seen) < MANIFEST_MAX:
            self.seen[path] = None
        self.last = time.monotonic()
        got = self.ahead.pop(path, None)
        if len(self.ahead) <= WINDOW // 2:
            # Refill in batches: one doorbell wakes the host for a dozen reads, not for each.
            self._fill()
        if got is not None:
            return got
        return files.start_read_whole(path), self.cache.prefetch(path)

    def _writer(self) -> None:
        sched = scheduler.get()
        while (idle := time.monotonic() - self.last) < QUIET_S:
            sched.sleep(QUIET_S - idle)
        self.finish()

    def finish(self) -> None:
        """The app is warm (or exits): drop what it did not import; keep this run's list."""
        if self.written:
            return
        self.written = True
        sched = scheduler.get()
        for source, entry in self.ahead.values():
            for pending in (source, entry.read):
                if pending is not None:
                    sched.drop(pending)
        self.ahead.clear()
        self.next = len(self.order)
        if list(self.seen) != self.order:
            payload = "\n".join(self.seen).encode("utf-8", "surrogateescape")
            self.cache.write_entry(self.name, self.cache.key.seal(self.name, payload))


#: The cache imports use, once boot has configured one (None: compile every time).
active: BytecodeCache | None = None
warm: WarmSet | None = None


def configure(directory: str, key: bytes, app: str) -> str | None:
    """Use the cache in ``directory`` with ``key`` from now on, reading ahead what ``app``
    imported last time; or say why not."""
    global active, warm
    why = usable_directory(directory)
    if why is not None:
        return f"bytecode cache {directory}: {why}; imports compile from source"
    active = BytecodeCache(directory, key)
    warm = WarmSet(active, app)
    warm.begin()
    return None


def begin(path: str) -> tuple[Any, Pending | None]:
    """For an import of ``path``: its source read (started, or None) and its cache entry."""
    if warm is not None:
        return warm.take(path)
    return None, None


def at_exit() -> None:
    if warm is not None:
        warm.finish()
