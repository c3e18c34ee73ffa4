"""The FS shield across a process family (TRUSTED): one FSPF, several writers.

Theory of operation
-------------------
A forked child starts with a copy of its parent's shield: the FSPF table, the tag it is
at, which copy is pinned.  Left alone, parent and child would each commit their own FSPF
(one losing the other's commits, or writing over the copy the other pinned).  So from the
first fork on (a process that never forks pays nothing) the members coordinate through the
host, with POSIX record locks on one host file, ``FSPF.lock``.  POSIX locks belong to a
host process and every member has its own (the host forks itself with the enclave), so
they exclude each other, and the locks of a member that dies go with its host process.

* **One FSPF change at a time.**  Every change (a file's commit, a create, an unlink, a
  rename, ``mkdir``, ``rmdir``) runs under the family's *commit lock* (a write lock on byte
  0).  Under it the member reads the pin (which FSPF tag is committed now); if that is not
  the tag its own table is at, it loads that FSPF: the copy that carries the tag, verified
  with the key, and its generation not below the newest this member has seen committed
  (else the host rolled it back: ``EIO``, logged).  It adopts it (open files follow their
  file ids to their new paths, or to none if another member unlinked them), makes its one
  change, writes the copy that is not pinned, pins, and unlocks.  The commits of the family
  are one chain: none is lost, the pin names the newest, and a kill anywhere leaves the
  pinned FSPF whole (the commit protocol of ``fs.py`` is unchanged under the lock).
* **One writer per file at a time.**  Each chunk has two record slots on the host, which is
  safe for one writer; two members writing one file at once would fill the same free slots.
  So a member's first change to a file after its last commit takes the file's *lease* (a
  write lock on one byte at an offset drawn from its file id), held until the file is
  committed; a write by another member meanwhile waits for it a second at most, then is
  ``EBUSY``.  Having the lease, the member reloads the FSPF if it moved, so it writes on
  the newest committed version.
  Writers that take turns with ``flock``/``fcntl`` locks, as a shared file is written
  natively, never meet ``EBUSY``: in a family, unlocking a protected file commits it first.
* **Readers see commits at open** (close-to-open consistency, as NFS): an open, a stat, a
  listing and a lock of a protected path first read the pin (one host call) and reload the
  FSPF (under a read lock on byte 0) if another member committed since.  An open file this
  member has not changed moves to the newest committed version.
* **At a fork** every file is committed first (the family starts from one committed state:
  written data is then shared as a kernel's page cache is, never duplicated in two members'
  memory).  The child then starts from what is committed: a change or a write that another
  lthread had in flight at the fork is the parent's (that lthread does not exist in the child).

A pin that cannot tell the committed tag (the CAS, whose pin has no ``current``), or a lock
file that cannot be made, leaves the members uncoordinated: there the family's first process
stays the only writer, and a forked child's change to a protected file is ``EROFS`` (no
commit is ever lost or forked).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pyscone import abi
from pyscone.abi import Op
from pyscone.enclave import family, scheduler
from pyscone.enclave.shields import fspfcopies
from pyscone.enclave.shields.nodes import Node, log
from pyscone.enclave.shields.store import HostStore
from pyscone.enclave.stdlib import files
from pyscone.enclave.stdlib.threads import RLock
from pyscone.protect.chunks import IntegrityError
from pyscone.protect.fspf import FSPF
from pyscone.protect.pfile import ProtectedFile

if TYPE_CHECKING:
    from pyscone.enclave.shields.fs import FsShield

LOCK_SUFFIX = ".lock"
_COMMIT = 0  # the commit lock's byte
_LEASES = 1 << 16  # a file's lease byte is this plus 48 bits of its file id
_RETRY_FIRST, _RETRY_MAX = 0.0002, 0.02
#: How long a write waits for another member's lease on its file before it is EBUSY.
LEASE_PATIENCE = 1.0


def lock_path(fspf_path: str) -> str:
    return fspf_path + LOCK_SUFFIX


def _lease_byte(file_id: bytes) -> int:
    return _LEASES + int.from_bytes(file_id[:6], "little")


class Locks:
    """This member's POSIX record locks on the family's lock file (never waited for on the host)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.leases: set[bytes] = set()

    def open(self) -> None:
        """Before the first fork: every host copy then holds the same descriptor."""
        if self.fd < 0:
            self.fd = files.host_open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def _try(self, kind: int, start: int) -> bool:
        result, err, _ = scheduler.get().host_call(Op.LOCK, (self.fd, abi.LOCK_POSIX, kind, start, 1, os.SEEK_SET))
        if result >= 0:
            return True
        if err in (errno.EAGAIN, errno.EACCES):
            return False
        raise OSError(err, f"{os.strerror(err)}: the family's FSPF lock {self.path}")

    @contextlib.contextmanager
    def commit_lock(self, exclusive: bool) -> Iterator[None]:
        delay = _RETRY_FIRST
        while not self._try(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, _COMMIT):
            scheduler.get().sleep(delay)  # parks this lthread only
            delay = min(2 * delay, _RETRY_MAX)
        try:
            yield
        finally:
            self._try(fcntl.F_UNLCK, _COMMIT)

    def lease(self, file_id: bytes, patience: float) -> bool:
        """Take the file's lease, waiting up to ``patience`` seconds for its holder to commit
        (or for a dead holder's host process to be gone)."""
        if file_id in self.leases:
            return True
        delay, waited = _RETRY_FIRST, 0.0
        while not self._try(fcntl.F_WRLCK, _lease_byte(file_id)):
            if waited >= patience:
                return False
            scheduler.get().sleep(delay)
            waited += delay
            delay = min(2 * delay, _RETRY_MAX)
        self.leases.add(file_id)
        return True

    def release(self, file_id: bytes) -> None:
        if file_id in self.leases:
            self.leases.discard(file_id)
            self._try(fcntl.F_UNLCK, _lease_byte(file_id))


class Family:
    """The shield's part in a process family: active from the first fork on."""

    def __init__(self, shield: FsShield) -> None:
        self.sh = shield
        self.locks = Locks(lock_path(shield.fspf_path))
        self.active = False
        self.child = False
        #: The newest generation this member has seen committed: a reload below it is a rollback.
        self.floor = shield.fspf.generation
        #: The table may not be the committed one (a change failed around its pin): reload.
        self.stale = False
        #: The family's lock file could be made: members coordinate (else children do not write).
        self.lockable = True
        self._depth = 0

    # -- what is committed now ------------------------------------------------------------

    @property
    def coordinated(self) -> bool:
        pin = self.sh.pin
        return self.active and self.lockable and (pin is None or callable(getattr(pin, "current", None)))

    def _pinned(self) -> list[str] | None:
        """The tags the pin accepts now (``None``: no pin, the newest copy that opens wins)."""
        pin = self.sh.pin
        return None if pin is None else list(pin.current())  # type: ignore[attr-defined]

    def _current(self, tags: list[str] | None) -> bool:
        return tags is not None and not self.stale and tags == [self.sh.tag]

    def _reload(self, tags: list[str] | None) -> None:
        sh = self.sh
        try:
            table, tag, copy = fspfcopies.load(sh.fspf_path, sh.key, tags, sh.max_io)
        except (IntegrityError, ValueError) as e:
            log(f"{sh.fspf_path}: refused: the family's committed FSPF does not open: {e}")
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: the committed FSPF does not open") from None
        if table.generation < self.floor:
            log(
                f"{sh.fspf_path}: refused: the FSPF went back to generation {table.generation} after"
                f" {self.floor} was committed (rolled back on the host)"
            )
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: the FSPF was rolled back on the host")
        if sorted(map(repr, table.regions)) != sorted(map(repr, sh.fspf.regions)):
            log(f"{sh.fspf_path}: refused: the family's committed FSPF has other regions")
            raise OSError(errno.EIO, f"{os.strerror(errno.EIO)}: the committed FSPF has other regions")
        self.floor = table.generation
        self.stale = False
        self._adopt(table, tag, copy)

    def _adopt(self, table: FSPF, tag: str, copy: int) -> None:
        """Go on from ``table``, which another process of the family committed: open files
        follow their file ids (to a new path, or to none: unlinked), and those this process
        has not changed move to their newest committed version."""
        sh = self.sh
        sh.fspf, sh.tag, sh.copies.current = table, tag, copy
        sh._tree = None
        where = {e.key.file_id: (p, e) for p, e in table.files.items()}
        for fid, node in sh.nodes.items():
            found = where.get(fid)
            if found is None:
                node.path, node.created = None, False
                continue
            node.path, entry = found
            pf = node.file
            assert isinstance(pf, ProtectedFile)
            old = pf.entry
            if (old.length, old.tags, old.slots) != (entry.length, entry.tags, entry.slots) and not pf.dirty:
                # (Not under the file's lock, which comes before the shield's: a read in flight
                # finishes on the version it began with.)
                store = pf.store
                assert isinstance(store, HostStore)
                store.forget()
                node.file = ProtectedFile(entry, store, io_bytes=sh.max_io)
                node.host_st = None

    def fresh(self) -> None:
        """Before an open, a stat, a listing or after a lock (shield lock held): if another
        member committed since, move to the newest committed FSPF."""
        if not self.coordinated or self._depth:
            return
        tags = self._pinned()
        if self._current(tags):
            return
        with self.locks.commit_lock(exclusive=False):
            tags = self._pinned()
            if not self._current(tags):
                self._reload(tags)

    @contextlib.contextmanager
    def changing(self, refused: Callable[[], object] | None = None) -> Iterator[None]:
        """Around one FSPF change (shield lock held): the commit lock, on the newest FSPF.
        ``refused``: called if the change may not go ahead (it raises)."""
        if not self.active or self._depth:
            yield
            return
        with contextlib.ExitStack() as stack:
            try:
                if not self.coordinated:
                    self._solo()
                else:
                    stack.enter_context(self.locks.commit_lock(exclusive=True))
                    tags = self._pinned()
                    if not self._current(tags):
                        self._reload(tags)
            except BaseException:
                if refused is not None:
                    refused()
                raise
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1

    def _solo(self) -> None:
        if self.child:
            raise OSError(
                errno.EROFS,
                "protected files are read-only in a forked child here: the family cannot order its"
                " commits (a CAS pins the FSPF, or its lock file cannot be made), so only the"
                " first process writes them",
            )

    def committed(self, generation: int) -> None:
        """This member's change was pinned (or, with no pin, its copy written)."""
        self.floor = max(self.floor, generation)

    # -- writers ----------------------------------------------------------------------------

    def will_write(self, node: Node) -> None:
        """Before a change to ``node``'s contents (its file lock held): take its lease."""
        if not self.active or node.kind == "memory":
            return
        if not self.coordinated:
            self._solo()
            return
        pf = node.file
        assert isinstance(pf, ProtectedFile)
        fid = pf.key.file_id
        if fid in self.locks.leases:
            return
        if not self.locks.lease(fid, LEASE_PATIENCE):
            raise OSError(
                errno.EBUSY,
                "another process of this family has uncommitted writes to this protected file"
                " (order the writers with a lock: unlocking commits)",
                node.path,
            )
        if not pf.dirty:
            with self.sh.lock:
                self.fresh()  # continue from the newest committed version of the file

    def done_writing(self, node: Node) -> None:
        """``node`` is committed (or gone): its lease goes."""
        pf = node.file
        if self.active and isinstance(pf, ProtectedFile) and not pf.dirty:
            self.locks.release(pf.key.file_id)

    # -- fork hooks -------------------------------------------------------------------------

    def register(self) -> None:
        family.register(prepare=self._prepare, parent=self._parent, child=self._child)

    def _prepare(self) -> None:
        sh = self.sh
        sh.commit_all()  # (a commit that fails fails the fork)
        if self.locks.fd < 0 and self.lockable:
            try:
                self.locks.open()
            except OSError as e:
                self.lockable = False
                log(f"{self.locks.path}: cannot be made ({e.strerror}): forked children will not write protected files")
        for o in list(sh.opens.values()):  # an open's flock is shared across a fork, as natively
            if o.lock_fd < 0 and o.node.kind != "memory" and o.node.path is not None:
                sh._open_lock_fd(o)
        for node in sh.nodes.values():
            if isinstance(node.file, ProtectedFile) and isinstance(node.file.store, HostStore):
                node.file.store.forget()  # no read of ours in flight across the fork

    # -- spawned children (stdlib/spawn.py): members of the family as forked ones are ------------

    def before_spawn(self) -> None:
        """Before a spawned child mounts this FSPF: everything committed, the lock file open (as at a
        fork), and from now on this process commits under the family's lock (the child may run first)."""
        self._prepare()
        self.active = True

    def spawned(self) -> None:
        """In a spawned child, once its shield is mounted: a member from the start, which looks at the pin first."""
        self.active = self.child = True
        self.stale = True
        try:
            self.locks.open()  # its own host process's lock fd (a forked child inherits its parent's)
        except OSError as e:
            self.lockable = False
            log(f"{self.locks.path}: cannot be opened ({e.strerror}): this spawned child writes no protected file")

    def _parent(self, pid: int) -> None:
        if pid > 0:
            self.active = True

    def _child(self) -> None:
        """The fork may have come while another lthread was in an FSPF change or a write (those
        lthreads are gone here): this process starts from the committed FSPF and files."""
        self.active = self.child = True
        self.stale = True  # reload at the first look
        self.locks.leases.clear()  # (POSIX locks are not inherited)
        sh = self.sh
        sh.lock = RLock()  # its holder and waiters were lthreads of the parent's
        for node in sh.nodes.values():
            node.lock = RLock()
            pf = node.file
            if isinstance(pf, ProtectedFile) and isinstance(pf.store, HostStore):
                pf.store.after_fork()
                if pf.dirty:  # written after the fork's commits: the parent's to commit, not ours
                    node.file = ProtectedFile(pf.entry, pf.store, io_bytes=sh.max_io)
