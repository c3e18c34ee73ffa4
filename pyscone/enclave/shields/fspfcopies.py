"""Where the sealed FSPF lives on the host: two copies, overwritten in place in turn.

Theory of operation
-------------------
The FSPF's host path ``P`` and ``P.1`` are its two *copies*.  A commit seals the table with
the next ``generation`` and writes it over the copy that is *not* the pinned one, in place
(its last slot, the cut when its size changed and the ``fdatasync`` in one ``PWRITE_SYNC``
host call, which the shield runs beside the data's own sync); then the pin (the CAS, or the
dev-mode tag file) moves to the new tag in one report.  The pinned copy is never written while
it is pinned, so whatever a kill or a power loss interrupts:

* during the write: the pinned copy is whole and the next start mounts it (the torn copy does
  not open, or its tag is not pinned); that commit never returned to the app;
* after the write, before the pin took the new tag: the new copy is whole but not pinned, and
  the next start mounts the old one, as for any commit whose ``fsync`` did not return;
* after the pin: the next start mounts the new copy.

At mount every copy that exists, opens (its MAC) and carries a tag the pin accepts is a
candidate; the highest generation wins (with no pin, rollback protection is off and the
newest copy that opens is used).  The host tools (``pyscone fspf``) leave one copy: they write
``P`` and remove ``P.1``.

This replaced a whole-file replacement of ``P`` (temporary file, fsync, rename, directory
fsync) between the two phases of a pin (the new tag pending, then alone): one write and one
fsync per commit instead of two fsyncs and a rename, and one pin report instead of two.
SQLite's rollback journal makes four FS-shield commits per transaction.
"""

from __future__ import annotations

import errno
import os
import posixpath

from pyscone.enclave.shields.nodes import log
from pyscone.enclave.shields.store import Durable, DurableWrite, HostStore
from pyscone.enclave.stdlib import files
from pyscone.protect import fspf as fspf_mod
from pyscone.protect.chunks import IntegrityError
from pyscone.protect.fspf import FSPF

COPIES = 2


def copy_path(path: str, copy: int) -> str:
    """The host path of copy ``copy`` (0: the FSPF's own path, which the tools write)."""
    return path if copy == 0 else f"{path}.{copy}"


def _read(path: str, max_io: int) -> bytes | None:
    try:
        fd = files.host_open(path, os.O_RDONLY, 0)
    except FileNotFoundError:
        return None
    try:
        size = files.fstat(fd).st_size
        return bytes(HostStore(fd, max_io).pread(0, size))
    finally:
        files.close(fd)


def load(path: str, key: bytes, pinned: list[str] | None, max_io: int) -> tuple[FSPF, str, int]:
    """Read and open the sealed FSPF at ``path`` (a host path) with ``key``: its newest copy
    that opens and that the pin accepts.  Returns (table, tag, copy).

    Raises:
        IntegrityError: no copy opens with the key and is a pinned version (``pinned``: the
            tags accepted).
        OSError: ``P`` cannot be read (it must exist: the tools make it).
    """
    accepted = None if pinned is None else {t.lower() for t in pinned}
    best: tuple[int, int, FSPF, str] | None = None
    problem: Exception | None = None
    for copy in range(COPIES):
        where = copy_path(path, copy)
        blob = _read(where, max_io)
        if blob is None:
            if copy == 0:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            continue
        try:
            tag = fspf_mod.tag_of(blob)
            if accepted is not None and tag not in accepted:
                problem = problem or IntegrityError("the FSPF is not the pinned version")
                continue
            table = fspf_mod.open_sealed(blob, key)
        except (IntegrityError, ValueError) as e:
            log(f"{where}: this copy of the FSPF does not open ({e}): not used")
            problem = e
            continue
        if best is None or table.generation > best[0]:
            best = (table.generation, copy, table, tag)
    if best is None:
        assert problem is not None
        raise problem
    return best[2], best[3], best[1]


class Copies:
    """The two copies while mounted: ``current`` is the one pinned (never written)."""

    def __init__(self, path: str, max_io: int, current: int) -> None:
        self.path = path
        self.max_io = max_io
        self.current = current
        self._fds: dict[int, int] = {}
        self._sizes: dict[int, int] = {}

    def names(self) -> set[str]:
        return {copy_path(self.path, c) for c in range(COPIES)}

    def start(self, blob: bytes, shared: bool = False) -> tuple[int, Durable]:
        """Start writing ``blob`` over the copy that is not the current one: (that copy, the
        write, durable once waited for).  The caller may overlap other durable steps with it,
        and makes the copy current once the pin has taken its tag.  ``shared``: other processes
        of the family write the copies too, so their sizes are not known here (always cut)."""
        target = 1 - self.current
        fd = self._fds.get(target)
        if fd is None:
            fd = self._open(target)
        # Cut only when the size changed (the cut is part of the same host call anyway); an
        # unknown size after a failed write is cut again.
        cut = self._sizes.pop(target, None) != len(blob) or shared
        return target, _Sized(DurableWrite(fd, blob, self.max_io, cut), self._sizes, target, len(blob))

    def _open(self, copy: int) -> int:
        where = copy_path(self.path, copy)
        new = files.host_stat(where, False) is None
        fd = files.host_open(where, os.O_WRONLY | os.O_CREAT, 0o600)
        self._fds[copy] = fd
        if new:  # its name must be durable before a pin may name what it holds
            dfd = files.host_open(posixpath.dirname(where) or "/", os.O_RDONLY, 0)
            try:
                files.fsync(dfd)
            finally:
                files.close(dfd)
        return fd


class _Sized(Durable):
    """A copy's write that records the copy's size once it is durable."""

    __slots__ = ("_copy", "_size", "_sizes", "_write")

    def __init__(self, write: Durable, sizes: dict[int, int], copy: int, size: int) -> None:
        super().__init__()
        self._write, self._sizes, self._copy, self._size = write, sizes, copy, size

    def wait(self) -> None:
        self._write.wait()
        self._sizes[self._copy] = self._size
        self.done = True
