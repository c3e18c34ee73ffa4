"""The file-system shield (TRUSTED): the FSPF's protected regions, mounted over host files.

``stdlib/files.py`` asks :meth:`FsShield.governs` for every path; what lies in an
``authenticated``, ``encrypted`` or ``memory`` region is served here, the rest
goes to the host as before.

* **Protected files** (``authenticated``/``encrypted``) are :class:`ProtectedFile`
  objects over the host file at the same path (their *store*), read and written
  through host calls.  The app gets a *virtual* fd (``>= VFD_BASE``, a number the
  host can never hand out), so no unshielded function can reach the records.
* **What exists** in a protected region is what the FSPF says, and nothing else
  (``protect/namespace.py``): its files, the directories it records (``mkdir`` adds
  one, at a commit) and those they imply.  Whatever else the host has there -- a
  file, a directory, a symlink, a "this is a directory" answer -- does not exist for
  the app (ENOENT; logged once when a listing meets it), and no host fd of a
  protected region ever reaches the app: an opened directory is a virtual fd too.
  A listed file whose store is gone, or whose records fail verification, is an
  ``OSError(EIO)`` (logged).  Directory permissions and times are host metadata;
  names are visible to the host.
* **Symlinks**: none exist inside a protected region, and at a region's prefix or
  any ancestor of it the enclave reports a directory whatever the host put there
  (``anchor_stat``), so ``os.path.realpath``/``Path.resolve()`` stay lexical and a
  host symlink cannot move a path out of (or into) a region.
* **Memory files** live in enclave memory only; the host sees nothing of them.
* **Commit** (fsync, close of a writer, exit): the file's changed chunks are sealed
  into free slots, the store's sync is started, and the new sealed FSPF is written over
  the FSPF's copy that is not pinned (``fspfcopies.py``: two copies on the host,
  written in place in turn), beside that sync when a pin follows.  Its tag is
  ``shield().tag``.
* **Pinning** the newest tag where the next start checks it (the CAS in production, a
  tag file in dev mode) is then one report, the commit point: the :class:`TagPin`
  accepts the new tag alone, reported only once the data and the copy are both durable.
  The pinned copy is never written, so a kill anywhere
  leaves the last pinned FSPF whole (a commit whose pin was not taken never
  returned to the app).
* **Rename** of a protected file is an FSPF change first (the entry names its old
  host path as ``store``), then a host rename, then a second FSPF change; a crash
  between them is finished at the next mount (:meth:`FsShield.recover`).

Locking: each open file has its own lthread lock for data operations; one shield
lock orders FSPF changes.  Order: file lock, then shield lock.  Across the processes of a
family (after a fork) FSPF changes and each file's writer are ordered by host locks as well
(``fsfamily.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import posixpath
import stat as stat_mod
import time
from collections.abc import Iterator
from typing import Any, Protocol

from pyscone import abi
from pyscone.abi import DT_DIR, DT_REG, StatResult
from pyscone.enclave.shields import fsdirs, fsfamily, fspfcopies
from pyscone.enclave.shields.memfs import MemoryRegions
from pyscone.enclave.shields.nodes import MemoryFile, Node, OpenDir, OpenFile, dir_stat, log
from pyscone.enclave.shields.nodes import err as _err
from pyscone.enclave.shields.store import DataSync, HostStore
from pyscone.enclave.stdlib import files
from pyscone.enclave.stdlib.threads import RLock
from pyscone.protect import fspf as fspf_mod
from pyscone.protect import namespace
from pyscone.protect.chunks import OVERHEAD, FileKey, IntegrityError
from pyscone.protect.fspf import FSPF, FileEntry
from pyscone.protect.pfile import ProtectedFile

VFD_BASE = abi.MAX_FD  # the host never returns an fd this high (iago refuses it)
PROTECTED = namespace.PROTECTED
__all__ = ["VFD_BASE", "FsShield", "MemoryFile", "Node", "OpenFile", "TagPin", "load", "log", "mount", "shield"]
load = fspfcopies.load


class TagPin(Protocol):
    """Where the newest FSPF tag is pinned (dev mode: a file; production: the CAS).  Raises
    ``OSError`` if the pin did not take the change: a commit is durable for the app only when
    its pin is acknowledged, so the shield then fails it with ``EIO``."""

    def commit(self, old: str, new: str) -> None:
        """Accept ``new`` only, from now on; ``old`` is the tag it follows (the CAS refuses a
        report that does not follow its chain of commits)."""


class FsShield:
    def __init__(self, table: FSPF, key: bytes, fspf_path: str, tag: str, max_io: int, copy: int = 0) -> None:
        self.fspf = table
        self.key = key
        self.fspf_path = fspf_path
        self.tag = tag
        self.max_io = max_io
        self.lock = RLock()
        self.nodes: dict[bytes, Node] = {}  # file id -> open protected file
        self.opens: dict[int, OpenFile] = {}
        self.next_vfd = VFD_BASE
        self.pin: TagPin | None = None
        self.commits = 0
        self._ino = 1 << 40
        self.mem = MemoryRegions(table, self._new_ino)
        self.dir_opens: dict[int, OpenDir] = {}
        self._tree: namespace.Tree | None = None
        self._anchors = namespace.anchors(table)  # the regions never change while mounted
        self._anchor_children: dict[str, set[str]] = {}
        for a in self._anchors - {"/"}:
            self._anchor_children.setdefault(posixpath.dirname(a), set()).add(posixpath.basename(a))
        self._dir_inos: dict[str, int] = {}
        self._ignored: set[str] = set()
        # Only protected regions' metadata decides; skip the FSPF's own files when listing.
        self.copies = fspfcopies.Copies(fspf_path, max_io, copy)
        self._own = {fspf_path + ".tmp", *self.copies.names(), fsfamily.lock_path(fspf_path)}
        self.family = fsfamily.Family(self)

    # -- routing ------------------------------------------------------------------------------

    def kind(self, path: str) -> str:
        return self.fspf.region_for(path).kind

    def governs(self, path: str) -> bool:
        return self.kind(path) != "unprotected" and path not in self._own

    def anchored(self, path: str) -> bool:
        """``path`` is a shielded region's prefix or an ancestor of one."""
        return path in self._anchors

    def anchor_children(self, path: str) -> set[str]:
        """The names below ``path`` that lead to a shielded region: directories, always."""
        return self._anchor_children.get(path, set())

    def anchor_stat(self, path: str) -> StatResult:
        """``stat``/``lstat`` of an anchored path outside the shield: a directory, never a link.

        The host's own stat is used for its metadata when it says "directory" (after
        following its symlinks); anything else it put there reads as a directory.
        """
        return self._dir_stat(path)

    def _names(self) -> namespace.Tree:
        if self._tree is None:
            self._tree = namespace.Tree(self.fspf)
        return self._tree

    def _missing(self, path: str) -> OSError:
        """The error for a path that does not exist: ENOTDIR if a file lies on its way."""
        p = posixpath.dirname(path)
        while p != "/" and self.kind(p) in PROTECTED:
            if p in self.fspf.files:
                return _err(errno.ENOTDIR, path)
            if self._names().is_dir(p):
                break
            p = posixpath.dirname(p)
        return _err(errno.ENOENT, path)

    def _dir_stat(self, path: str) -> StatResult:
        st = files.host_stat(path, True)
        if st is not None and stat_mod.S_ISDIR(st.mode):
            return st
        ino = self._dir_inos.get(path)
        if ino is None:
            ino = self._dir_inos[path] = self._new_ino()
        return dir_stat(ino)

    def _open_file(self, vfd: int) -> OpenFile:
        try:
            return self.opens[vfd]
        except KeyError:
            raise _err(errno.EISDIR if vfd in self.dir_opens else errno.EBADF) from None

    def _new_ino(self) -> int:
        self._ino += 1
        return self._ino

    def _ignore(self, path: str) -> None:
        if path not in self._ignored and path not in self._own:
            self._ignored.add(path)
            log(f"ignored {path}: on the host but not in the FSPF (added by the host, or created and never committed)")

    # -- the FSPF -----------------------------------------------------------------------------

    def _write_fspf(self, data: DataSync | None = None) -> None:
        """Seal the FSPF, write it over the unpinned copy, then pin it: the commit point.

        ``data``: the sync of the file this commit names, if its records changed; started
        here, once the FSPF is sealed, right before the copy's write, so the two run side by
        side.  Both must be durable before the pin, and neither is the commit point (until the
        pin, a kill leaves the old FSPF, whose copy neither touches).  If either fails, nothing
        is pinned and the error is raised.

        Raises ``OSError(EIO)`` if the pin did not take it; the shield then goes on from the new
        FSPF, but the app must not count that commit durable (the next start gets the old one)."""
        try:
            self._seal_write_pin(data)
        except BaseException:
            self.family.stale = True  # the pin may or may not have the new tag: ask it next time
            raise
        self.family.committed(self.fspf.generation)

    def _seal_write_pin(self, data: DataSync | None) -> None:
        self.fspf.generation += 1
        blob, tag = fspf_mod.seal(self.fspf, self.key)
        if data is not None:
            data.start()  # both queued back to back, after the sealing: they run side by side
        try:
            copy, write = self.copies.start(blob, shared=self.family.active)
        except BaseException:
            if data is not None:
                with contextlib.suppress(OSError):
                    data.wait()  # finish its call; if it is durable, a later commit names it
            raise
        if data is not None:
            try:
                data.wait()
            except BaseException:
                with contextlib.suppress(OSError):
                    write.wait()  # finish its calls: its copy is not pinned, so it names nothing
                raise
        write.wait()
        old, self.tag = self.tag, tag
        self.commits += 1
        if self.pin is not None:
            try:
                self.pin.commit(old, tag)
            except OSError as e:
                log(f"commit not durable: the pin did not acknowledge FSPF tag {tag}: {e.strerror or e}")
                raise OSError(
                    errno.EIO,
                    f"{os.strerror(errno.EIO)}: commit not durable: the pin did not acknowledge: {e.strerror or e}",
                ) from None
        self.copies.current = copy

    def recover(self) -> None:
        """Finish renames a crash interrupted (entries whose records are still at ``store``)."""
        moved = False
        for path, entry in list(self.fspf.files.items()):
            if not entry.store:
                continue
            if files.host_stat(entry.store, False) is not None:
                self._host_makedirs(posixpath.dirname(path))
                files.host_rename(entry.store, path, True)
            self.fspf.files[path] = dataclasses.replace(entry, store="")
            moved = True
        if moved:
            self._write_fspf()

    def _host_makedirs(self, path: str) -> None:
        st = files.host_stat(path, True)
        if st is not None:
            return
        self._host_makedirs(posixpath.dirname(path))
        try:
            files.host_mkdir(path, 0o700)
        except FileExistsError:
            pass

    def commit(self, node: Node) -> None:
        """Make ``node``'s writes durable and part of the FSPF.

        When a pin is the commit point the file's sync runs beside the FSPF's write
        (:meth:`_write_fspf`).  With no pin the newest copy of the FSPF wins at the next mount,
        so there the records are durable before the FSPF is written."""
        if node.kind == "memory":
            return
        with node.lock:
            pf = node.file
            assert isinstance(pf, ProtectedFile)
            if not (pf.dirty or node.created):
                self.family.done_writing(node)
                return
            store = pf.store
            assert isinstance(store, HostStore)
            try:
                entry = pf.commit()
            except IntegrityError as e:
                raise self._integrity(node.path or "(unlinked file)", e) from None
            data = DataSync(store) if store.wrote else None  # its records, not its times
            try:
                if data is None:
                    store.drain()
                elif self.pin is None or node.path is None:
                    data.wait()
                    data = None
            except BaseException:
                pf.undo_commit()  # not durable: a retried fsync commits again
                raise
            # (In a family: under its commit lock, on its newest FSPF; if that cannot be had,
            # the new entry was never committed.)
            with self.lock, self.family.changing(refused=pf.undo_commit):
                if node.path is None:
                    node.created = False
                    self.family.done_writing(node)
                    return
                current = self.fspf.files.get(node.path)
                self.fspf.files[node.path] = dataclasses.replace(entry, store=current.store if current else "")
                tag = self.tag
                try:
                    self._write_fspf(data)
                except BaseException:
                    if self.tag == tag:
                        # Failed before the pin (the records' sync, or the FSPF copy's write):
                        # nothing names this entry, so the FSPF and the file go back to the one
                        # they had -- a retried fsync commits again, and no later write reuses
                        # a slot the pinned FSPF names.  (A pin that failed may have been taken:
                        # then the shield goes on from the new FSPF, see _write_fspf.)
                        self._restore(node.path, current)
                        pf.undo_commit()
                    raise
                node.created = False
                self.family.done_writing(node)

    def _restore(self, path: str, entry: FileEntry | None) -> None:
        if entry is None:
            self.fspf.files.pop(path, None)
        else:
            self.fspf.files[path] = entry

    def commit_all(self) -> None:
        for node in list(self.nodes.values()):
            self.commit(node)

    def _integrity(self, path: str, e: IntegrityError) -> OSError:
        log(f"{path}: refused: {e} (altered, moved, truncated or rolled back on the host)")
        return _err(errno.EIO, path)

    # -- opening and closing ------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int) -> int:
        kind = self.kind(path)
        acc = flags & os.O_ACCMODE
        readable, writable = acc in (os.O_RDONLY, os.O_RDWR), acc in (os.O_WRONLY, os.O_RDWR)
        with self.lock:
            memory = kind == "memory"
            if not memory:
                self.family.fresh()  # (in a family: what another process committed is seen at open)
            if self.mem.is_dir(path) if memory else self._names().is_dir(path):
                return self._open_dir(path, kind, flags, writable)
            if flags & os.O_DIRECTORY:
                if path in (self.mem.files if memory else self.fspf.files):
                    raise _err(errno.ENOTDIR, path)
                raise _err(errno.ENOENT, path) if memory else self._missing(path)
            node = self.mem.open(path, flags) if memory else self._open_protected(path, flags, mode, kind)
            vfd = self._new_vfd()
            self.opens[vfd] = OpenFile(node, readable, writable, bool(flags & os.O_APPEND))
            node.refs += 1
        if flags & os.O_TRUNC and writable:
            try:
                with node.lock:  # outside the shield lock: the lock order is file, then shield
                    self.family.will_write(node)
                    node.file.truncate(0)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.close(vfd)
                raise
        return vfd

    def _new_vfd(self) -> int:
        vfd = self.next_vfd
        self.next_vfd += 1
        return vfd

    def _open_dir(self, path: str, kind: str, flags: int, writable: bool) -> int:
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise _err(errno.EEXIST, path)
        if writable or flags & os.O_CREAT:
            raise _err(errno.EISDIR, path)
        vfd = self._new_vfd()
        self.dir_opens[vfd] = OpenDir(path, kind)
        return vfd

    def _open_protected(self, path: str, flags: int, mode: int, kind: str) -> Node:
        if flags & os.O_CREAT and path not in self.fspf.files and self.family.active:
            with self.family.changing():  # a new file is an FSPF change the family sees at once
                node = self._find_or_create(path, flags, mode, kind)
                if node.created:
                    try:
                        self._write_fspf()
                    except BaseException:
                        self._forget_new(node)
                        raise
                    node.created = False
                return node
        return self._find_or_create(path, flags, mode, kind)

    def _forget_new(self, node: Node) -> None:
        """A new file whose creation did not commit: as if it had not been made."""
        assert isinstance(node.file, ProtectedFile) and node.path is not None
        self.fspf.files.pop(node.path, None)
        self.nodes.pop(node.file.key.file_id, None)
        self._tree = None
        files.close(node.host_fd)

    def _find_or_create(self, path: str, flags: int, mode: int, kind: str) -> Node:
        entry = self.fspf.files.get(path)
        if entry is not None:
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise _err(errno.EEXIST, path)
            node = self.nodes.get(entry.key.file_id)
            return node if node is not None else self._attach(path, entry)
        # Not in the FSPF: it does not exist, whatever the host has at this path.
        if not flags & os.O_CREAT:
            raise self._missing(path)
        tree = self._names()
        if not tree.is_dir(posixpath.dirname(path)):
            raise self._missing(path)
        # A new protected file.  A stale host file at its path (a crash before its first
        # commit, or one the host put there) is overwritten.
        region = self.fspf.region_for(path)
        key = FileKey.generate(encrypted=kind == "encrypted", chunk_size=region.chunk_size)
        fd = self._host_create(path, mode & 0o777)
        entry = FileEntry(key)
        self.fspf.files[path] = entry
        tree.add(path, DT_REG)
        node = Node(
            path, kind, ProtectedFile(entry, HostStore(fd, self.max_io), io_bytes=self.max_io), fd, self._new_ino()
        )
        node.created = True
        self.nodes[key.file_id] = node
        return node

    def _host_create(self, path: str, mode: int) -> int:
        how = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        try:
            return files.host_open(path, how, mode)
        except FileNotFoundError:
            # The FSPF's directory is not on the host (yet: directories are made when needed).
            self._host_makedirs(posixpath.dirname(path))
            return files.host_open(path, how, mode)

    def _attach(self, path: str, entry: FileEntry) -> Node:
        """Open the store of a listed file, not yet open in the enclave."""
        fd = -1
        for where in (entry.store, path) if entry.store else (path,):
            for how in (os.O_RDWR, os.O_RDONLY):
                try:
                    fd = files.host_open(where, how, 0)
                    break
                except FileNotFoundError:
                    break
                except PermissionError:
                    continue  # a read-only store (an image's code): reading is all it can do
                except IsADirectoryError:
                    break
            if fd >= 0:
                break
        if fd < 0:
            log(f"{path}: refused: listed in the FSPF but missing on the host (deleted by the host)")
            raise _err(errno.EIO, path)
        st = files.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            files.close(fd)
            log(f"{path}: refused: listed in the FSPF but not a regular file on the host")
            raise _err(errno.EIO, path)
        kind = "encrypted" if entry.key.encrypted else "authenticated"
        node = Node(path, kind, ProtectedFile(entry, HostStore(fd, self.max_io), io_bytes=self.max_io), fd, st.st_ino)
        self.nodes[entry.key.file_id] = node
        return node

    def close(self, vfd: int) -> None:
        if self.dir_opens.pop(vfd, None) is not None:
            return
        o = self.opens.pop(vfd, None)
        if o is None:
            raise _err(errno.EBADF)
        node = o.node
        node.refs -= 1
        try:
            if o.writable:
                self.commit(node)
        finally:
            if o.lock_fd >= 0:
                files.close(o.lock_fd)  # (after the commit) drops its flock
            if node.refs == 0 and node.kind != "memory":
                assert isinstance(node.file, ProtectedFile)
                if self.family.active:
                    self.family.locks.release(node.file.key.file_id)
                self.nodes.pop(node.file.key.file_id, None)
                assert isinstance(node.file.store, HostStore)
                node.file.store.release()
                files.close(node.host_fd)

    # -- data ---------------------------------------------------------------------------------

    def _read(self, node: Node, offset: int, size: int) -> bytes:
        out = bytearray(max(0, min(size, node.file.length - offset)))
        self._readinto(node, offset, memoryview(out))
        return bytes(out)

    def _readinto(self, node: Node, offset: int, out: memoryview) -> int:
        try:
            return node.file.readinto(offset, out)
        except IntegrityError as e:
            if not self._moved_on(node):
                raise self._integrity(node.path or "(unlinked file)", e) from None
        try:  # the file's newest version, which another process of the family committed
            return node.file.readinto(offset, out)
        except IntegrityError as e:
            raise self._integrity(node.path or "(unlinked file)", e) from None

    def _moved_on(self, node: Node) -> bool:
        """In a family, a file open here may have been committed twice by another process since
        (its second commit reuses the slots this version names): whether ``node`` now reads
        the newest committed version instead."""
        if not self.family.active or node.file.dirty:
            return False
        old = node.file
        with self.lock:
            self.family.fresh()
        return node.file is not old

    def _write(self, node: Node, offset: int, data: bytes | bytearray | memoryview) -> int:
        try:
            return node.file.write(offset, data)
        except IntegrityError as e:  # a partial chunk's old contents failed to verify
            raise self._integrity(node.path or "(unlinked file)", e) from None

    def read(self, vfd: int, n: int) -> bytes:
        o = self._open_file(vfd)
        out = bytearray(max(0, min(n, o.node.file.length - o.pos)))
        got = self.readinto(vfd, memoryview(out))
        return bytes(out) if got == len(out) else bytes(out[:got])

    def readinto(self, vfd: int, out: memoryview, buffered: bool = False) -> int:
        """Read at the file position into ``out``.

        ``buffered``: the caller is a buffered reader filling its buffer.  Right after a seek
        such a read returns only up to the end of the chunk it starts in: the reader then
        has what a small random read needs, and asks again (from where this ended) for more.
        Without it a random 4 KiB read would open a whole buffer's worth of chunks.
        """
        o = self._open_file(vfd)
        if not o.readable:
            raise _err(errno.EBADF)
        with o.node.lock:
            pf = o.node.file
            if buffered and o.pos != o.read_end and isinstance(pf, ProtectedFile):
                cs = pf.key.chunk_size
                out = out[: cs - o.pos % cs]
            try:
                n = self._readinto(o.node, o.pos, out)
            except OSError:
                o.poisoned = True
                raise
            o.pos += n
            o.read_end = o.pos
            return n

    def write(self, vfd: int, data: bytes | bytearray | memoryview) -> int:
        if vfd in self.dir_opens:
            raise _err(errno.EBADF)  # a directory is open for reading only
        o = self._open_file(vfd)
        if not o.writable:
            raise _err(errno.EBADF)
        with o.node.lock:
            self.family.will_write(o.node)
            if o.append:
                o.pos = o.node.file.length
            n = self._write(o.node, o.pos, data)
            o.pos += n
            o.node.mtime_ns = time.time_ns()
            return n

    def _positioned(self, vfd: int, offset: int, writing: bool) -> OpenFile:
        o = self._open_file(vfd)
        if not (o.writable if writing else o.readable):
            raise _err(errno.EBADF)
        if offset < 0:
            raise _err(errno.EINVAL)
        return o

    def pread(self, vfd: int, n: int, offset: int) -> bytes:
        o = self._positioned(vfd, offset, writing=False)
        with o.node.lock:
            return self._read(o.node, offset, n)

    def pwrite(self, vfd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        o = self._positioned(vfd, offset, writing=True)
        with o.node.lock:
            self.family.will_write(o.node)
            o.node.mtime_ns = time.time_ns()
            return self._write(o.node, offset, data)

    def lseek(self, vfd: int, pos: int, how: int) -> int:
        if vfd in self.dir_opens:
            return 0  # as Linux: a directory's offset is the listing's, which we never read
        o = self._open_file(vfd)
        if o.poisoned:
            # C readers lose a refused chunk's EIO: numpy's fromfile keeps a short fread's
            # zero-filled array and never asks ferror, but does check this seek (and tell).
            raise _err(errno.EIO)
        if how == os.SEEK_SET:
            new = pos
        elif how == os.SEEK_CUR:
            new = o.pos + pos
        elif how == os.SEEK_END:
            new = o.node.file.length + pos
        else:
            raise _err(errno.EINVAL)
        if new < 0:
            raise _err(errno.EINVAL)
        o.pos = new
        return new

    def ftruncate(self, vfd: int, length: int) -> None:
        if vfd in self.dir_opens:
            raise _err(errno.EINVAL)
        o = self._open_file(vfd)
        if not o.writable:
            raise _err(errno.EINVAL)
        if length < 0:
            raise _err(errno.EINVAL)
        with o.node.lock:
            self.family.will_write(o.node)
            try:
                o.node.file.truncate(length)
            except IntegrityError as e:
                raise self._integrity(o.node.path or "(unlinked file)", e) from None

    def fsync(self, vfd: int) -> None:
        if vfd in self.dir_opens:
            return  # every change to a directory was committed (to the FSPF) when it was made
        self.commit(self._open_file(vfd).node)

    def fstat(self, vfd: int) -> StatResult:
        d = self.dir_opens.get(vfd)
        if d is not None:
            return self.mem.dir_stat(d.path) if d.kind == "memory" else self._dir_stat(d.path)
        node = self._open_file(vfd).node
        if node.kind == "memory":
            return self.mem.node_stat(node)
        return self._node_stat(node)

    # -- locks --------------------------------------------------------------------------------

    def lock_target(self, vfd: int, family: int, kind: int) -> int | None:
        """The host fd on which a lock of ``vfd`` is taken, or ``None`` (the enclave decides:
        a memory file's, a directory's, and before any fork a POSIX lock, which no other
        process can contend).  A protected file's ``flock`` is the host's, on an fd of the
        open's own (as natively, one per open file description, shared by dups and across a
        fork), so that the processes of a family exclude each other.  In a family an unlock
        commits the file first: the next holder sees what was written under the lock."""
        o = self.opens.get(vfd)
        if o is None or o.node.kind == "memory" or o.node.path is None:
            return None
        if family == abi.LOCK_POSIX:
            if not self.family.active:
                return None
            target = o.node.host_fd
            unlock = kind == fcntl.F_UNLCK
        else:
            if o.lock_fd < 0:
                with self.lock:
                    self._open_lock_fd(o)
            target = o.lock_fd
            unlock = kind == fcntl.LOCK_UN
        if unlock and self.family.active:
            self.commit(o.node)
        return target

    def _open_lock_fd(self, o: OpenFile) -> None:
        assert o.node.path is not None
        entry = self.fspf.files.get(o.node.path)
        o.lock_fd = files.host_open((entry.store if entry else "") or o.node.path, os.O_RDONLY, 0)

    def locked(self, vfd: int) -> None:
        """A lock of ``vfd`` was granted: what another process committed before is seen now."""
        if self.family.active:
            with self.lock:
                self.family.fresh()

    # -- metadata -----------------------------------------------------------------------------

    def _blksize(self, chunk_size: int) -> int:
        # What BufferedReader/Writer use as their buffer: whole chunks whose records fit one call.
        return max(1, self.max_io // (chunk_size + OVERHEAD)) * chunk_size

    def _node_stat(self, node: Node) -> StatResult:
        """An open protected file's stat: its length is the enclave's, the rest the host's."""
        pf = node.file
        assert isinstance(pf, ProtectedFile)  # (a memory file's stat is self.mem's)
        cached = node.host_st
        if cached is None or cached[0] != pf.mutations:
            cached = node.host_st = (pf.mutations, files.host_fstat(node.host_fd))
        return self._file_stat(cached[1], pf.length, pf)

    def _file_stat(self, st: StatResult, length: int, pf: ProtectedFile | MemoryFile) -> StatResult:
        chunk = pf.key.chunk_size if isinstance(pf, ProtectedFile) else 4096
        return dataclasses.replace(
            st,
            mode=stat_mod.S_IFREG | stat_mod.S_IMODE(st.mode),
            size=length,
            blksize=self._blksize(chunk),
            blocks=(length + 511) // 512,
            nlink=1,
        )

    def stat(self, path: str, follow: bool) -> StatResult:
        with self.lock:
            if self.kind(path) == "memory":
                return self.mem.stat(path)
            self.family.fresh()
            entry = self.fspf.files.get(path)
            if entry is None:
                if self._names().is_dir(path):
                    return self._dir_stat(path)
                raise self._missing(path)
            node = self.nodes.get(entry.key.file_id)
            if node is not None:
                return self._node_stat(node)
            st = files.host_stat(entry.store or path, False)
            if st is None and entry.store:
                st = files.host_stat(path, False)
            if st is None or not stat_mod.S_ISREG(st.mode):
                log(f"{path}: refused: listed in the FSPF but missing on the host (deleted by the host)")
                raise _err(errno.EIO, path)
            return dataclasses.replace(
                st, mode=stat_mod.S_IFREG | stat_mod.S_IMODE(st.mode), size=entry.length, nlink=1,
                blksize=self._blksize(entry.key.chunk_size), blocks=(entry.length + 511) // 512,
            )  # fmt: skip

    def listdir(self, path: str) -> Iterator[tuple[str, int]]:
        with self.lock:
            if self.kind(path) == "memory":
                names = self.mem.listdir(path)
            else:
                self.family.fresh()
                if path in self.fspf.files:
                    raise _err(errno.ENOTDIR, path)
                listing = self._names().listing(path)
                if listing is None:
                    raise self._missing(path)
                names = dict(listing)
                self._log_ignored(path, names)
            names.update(dict.fromkeys(self.anchor_children(path), DT_DIR))
            return iter(sorted(names.items()))

    def _log_ignored(self, path: str, names: dict[str, int]) -> None:
        """Name what the host has here and the FSPF does not: an operator's clue (planted, or
        left by a crash).  The host's answer decides nothing else."""
        try:
            host = [n for n, _ in files.host_listdir(path) if n not in names]
        except OSError:
            return
        for name in host:
            self._ignore(posixpath.join(path, name))

    # Directory changes, and metadata of protected paths: ``fsdirs.py``.

    def mkdir(self, path: str, mode: int) -> None:
        fsdirs.mkdir(self, path, mode)

    def rmdir(self, path: str) -> None:
        fsdirs.rmdir(self, path)

    def unlink(self, path: str) -> None:
        fsdirs.unlink(self, path)

    def rename(self, src: str, dst: str) -> None:
        fsdirs.rename(self, src, dst)

    def access(self, path: str, mode: int) -> bool:
        return fsdirs.access(self, path, mode)

    def chmod(self, path: str, mode: int) -> None:
        fsdirs.chmod(self, path, mode)

    def utime(self, path: str, args: tuple[int, int, int]) -> None:
        fsdirs.utime(self, path, args)

    def symlink(self, path: str) -> None:
        fsdirs.symlink(self, path)

    def readlink(self, path: str) -> Any:
        return fsdirs.readlink(self, path)


_shield: FsShield | None = None


def mount(table: FSPF, key: bytes, fspf_path: str, tag: str, max_io: int, copy: int = 0) -> FsShield:
    """Route the protected regions of ``table`` (read from FSPF copy ``copy``) through a new shield."""
    global _shield
    shield = FsShield(table, key, fspf_path, tag, max_io, copy)
    files.set_shield(shield)
    _shield = shield
    shield.recover()
    shield.family.register()
    return shield


def shield() -> FsShield | None:
    return _shield
