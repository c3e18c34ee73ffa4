"""The file-system shield (TRUSTED): the FSPF's protected regions, mounted over host files.

``stdlib/files.py`` asks :meth:`FsShield.governs` for every path; what lies in an
``authenticated``, ``encrypted`` or ``memory`` region is served here, the rest
goes to the host as before.

* **Protected files** (``authenticated``/``encrypted``) are :class:`ProtectedFile`
  objects over the host file at the same path (their *store*), read and written
  through host calls.  The app gets a *virtual* fd (``>= VFD_BASE``, a number the
  host can never hand out), so no unshielded function can reach the records.
* **What exists** in a protected region is what the FSPF lists: a regular file on
  the host that the FSPF does not list is ignored (logged; the app sees ENOENT);
  a listed file whose store is gone, or whose records fail verification, is an
  ``OSError(EIO)`` (logged).  Directories are host metadata (their names and
  permissions are not protected); file names are visible to the host too.
* **Memory files** live in enclave memory only; the host sees nothing of them.
* **Commit** (fsync, close of a writer, exit): the file's changed chunks are sealed
  into free slots, the store is fsynced, and a new sealed FSPF replaces the old
  one (write temporary, fsync, rename, fsync directory) — the commit point.  Its
  tag is ``shield().tag``.
* **Pinning** the newest tag where the next start checks it (the CAS in production, a
  tag file in dev mode) is two-phase, so a kill cannot strand the file system: the
  :class:`TagPin` accepts the new tag as *pending* before the FSPF is replaced, and
  as the only one after.  A kill in between leaves both acceptable: the old one is
  then a legitimate crash outcome (that commit never returned to the app).
* **Rename** of a protected file is an FSPF change first (the entry names its old
  host path as ``store``), then a host rename, then a second FSPF change; a crash
  between them is finished at the next mount (:meth:`FsShield.recover`).

Locking: each open file has its own lthread lock for data operations; one shield
lock orders FSPF changes.  Order: file lock, then shield lock.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import posixpath
import stat as stat_mod
import sys
import time
from collections.abc import Iterator
from typing import Any, Protocol

from pyscone import abi
from pyscone.abi import DT_DIR, DT_REG, StatResult
from pyscone.enclave.shields.store import HostStore, replace_host_file
from pyscone.enclave.stdlib import files
from pyscone.enclave.stdlib.threads import RLock
from pyscone.protect import fspf as fspf_mod
from pyscone.protect.chunks import OVERHEAD, FileKey, IntegrityError
from pyscone.protect.fspf import FSPF, FileEntry
from pyscone.protect.pfile import ProtectedFile

VFD_BASE = abi.MAX_FD  # the host never returns an fd this high (iago refuses it)
PROTECTED = ("authenticated", "encrypted")


def _err(code: int, path: str | None = None) -> OSError:
    if path is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), path)


def log(message: str) -> None:
    try:
        sys.stderr.write(f"pyscone: fs shield: {message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed console must not hide the error we raise next
        pass


class MemoryFile:
    """A file that lives in enclave memory only (``memory`` regions)."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def length(self) -> int:
        return len(self.data)

    @property
    def dirty(self) -> bool:
        return False

    def readinto(self, offset: int, out: memoryview) -> int:
        data = self.data[offset : offset + len(out)]
        out[: len(data)] = data
        return len(data)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        view = memoryview(data).cast("B")
        self.data[offset : offset + len(view)] = view
        return len(view)

    def truncate(self, length: int) -> None:
        if length < len(self.data):
            del self.data[length:]
        else:
            self.data.extend(bytes(length - len(self.data)))


class Node:
    """One file with at least one open fd (protected), or one memory file."""

    __slots__ = ("created", "file", "host_fd", "ino", "kind", "lock", "mode", "mtime_ns", "path", "refs")

    def __init__(self, path: str, kind: str, file: ProtectedFile | MemoryFile, host_fd: int, ino: int) -> None:
        self.path: str | None = path  # None once unlinked (the data lives until the last close)
        self.kind = kind
        self.file = file
        self.host_fd = host_fd
        self.refs = 0
        self.lock = RLock()
        self.created = False  # a new protected file not yet in the FSPF on disk
        self.ino = ino
        self.mode = 0o644
        self.mtime_ns = time.time_ns()


class OpenFile:
    __slots__ = ("append", "node", "pos", "read_end", "readable", "writable")

    def __init__(self, node: Node, readable: bool, writable: bool, append: bool) -> None:
        self.node = node
        self.pos = 0
        self.read_end = 0  # where the last read ended: a read from elsewhere follows a seek
        self.readable = readable
        self.writable = writable
        self.append = append


class TagPin(Protocol):
    """Where the newest FSPF tag is pinned (dev mode: a file; production: the CAS).  Both
    methods raise ``OSError`` if the pin did not take the change: a commit is durable for
    the app only when its pin is acknowledged, so the shield then fails it with ``EIO``."""

    def prepare(self, old: str, new: str) -> None:
        """Before the commit point: accept ``new`` besides ``old``."""

    def commit(self, new: str) -> None:
        """After it: accept ``new`` only (until then the next start may get ``old``)."""


class FsShield:
    def __init__(self, table: FSPF, key: bytes, fspf_path: str, tag: str, max_io: int) -> None:
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
        self.mem_dirs = {r.prefix for r in table.regions if r.kind == "memory"}
        self.mem_files: dict[str, Node] = {}
        self._ino = 1 << 40
        self._ignored: set[str] = set()
        # Only protected regions' metadata decides; skip the FSPF's own files when listing.
        self._own = {fspf_path, fspf_path + ".tmp"}

    # -- routing ------------------------------------------------------------------------------

    def kind(self, path: str) -> str:
        return self.fspf.region_for(path).kind

    def governs(self, path: str) -> bool:
        return self.kind(path) != "unprotected" and path not in self._own

    def _open_file(self, vfd: int) -> OpenFile:
        try:
            return self.opens[vfd]
        except KeyError:
            raise _err(errno.EBADF) from None

    def _new_ino(self) -> int:
        self._ino += 1
        return self._ino

    def _ignore(self, path: str) -> None:
        if path not in self._ignored and path not in self._own:
            self._ignored.add(path)
            log(f"ignored {path}: on the host but not in the FSPF (added by the host, or created and never committed)")

    # -- the FSPF -----------------------------------------------------------------------------

    def _write_fspf(self) -> None:
        """Seal and atomically replace the FSPF on the host: the commit point.  Raises
        ``OSError(EIO)`` if the pin fails either phase; after the commit point the shield goes
        on from the new FSPF, but the app must not count that commit durable."""

        def unpinned(what: str, e: OSError) -> OSError:
            log(f"commit {what} FSPF tag {tag}: {e.strerror or e}")
            return OSError(errno.EIO, f"{os.strerror(errno.EIO)}: commit {what.split(':')[0]}: {e.strerror or e}")

        blob, tag = fspf_mod.seal(self.fspf, self.key)
        if self.pin is not None:
            try:
                self.pin.prepare(self.tag, tag)
            except OSError as e:
                raise unpinned("refused: the pin did not take", e) from None
        replace_host_file(self.fspf_path, blob, self.max_io)
        self.tag = tag
        self.commits += 1
        if self.pin is not None:
            try:
                self.pin.commit(tag)  # if lost, the next commit's first phase narrows the pin
            except OSError as e:
                raise unpinned("not durable: the pin did not acknowledge", e) from None

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
        """Make ``node``'s writes durable and part of the FSPF."""
        if node.kind == "memory":
            return
        with node.lock:
            pf = node.file
            assert isinstance(pf, ProtectedFile)
            if not (pf.dirty or node.created):
                return
            store = pf.store
            assert isinstance(store, HostStore)
            try:
                entry = pf.commit()
            except IntegrityError as e:
                raise self._integrity(node.path or "(unlinked file)", e) from None
            store.drain()
            if store.wrote:
                files.fsync(node.host_fd)
                store.wrote = False
            with self.lock:
                node.created = False
                if node.path is None:
                    return
                current = self.fspf.files.get(node.path)
                self.fspf.files[node.path] = dataclasses.replace(entry, store=current.store if current else "")
                self._write_fspf()

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
            if kind == "memory":
                node = self._open_memory(path, flags)
            else:
                found = self._open_protected(path, flags, mode, kind, writable)
                if isinstance(found, int):
                    return found  # a directory: the host's own fd
                node = found
            vfd = self.next_vfd
            self.next_vfd += 1
            self.opens[vfd] = OpenFile(node, readable, writable, bool(flags & os.O_APPEND))
            node.refs += 1
        if flags & os.O_TRUNC and writable:
            with node.lock:  # outside the shield lock: the lock order is file, then shield
                node.file.truncate(0)
        return vfd

    def _open_memory(self, path: str, flags: int) -> Node:
        node = self.mem_files.get(path)
        if node is None:
            if path in self.mem_dirs:
                raise _err(errno.EISDIR, path)
            if not flags & os.O_CREAT:
                raise _err(errno.ENOENT, path)
            if posixpath.dirname(path) not in self.mem_dirs:
                raise _err(errno.ENOENT, path)
            node = Node(path, "memory", MemoryFile(), -1, self._new_ino())
            self.mem_files[path] = node
        elif flags & os.O_CREAT and flags & os.O_EXCL:
            raise _err(errno.EEXIST, path)
        return node

    def _open_protected(self, path: str, flags: int, mode: int, kind: str, writable: bool) -> Node | int:
        entry = self.fspf.files.get(path)
        if entry is not None:
            if flags & os.O_CREAT and flags & os.O_EXCL:
                raise _err(errno.EEXIST, path)
            node = self.nodes.get(entry.key.file_id)
            return node if node is not None else self._attach(path, entry)
        st = files.host_stat(path, True)
        if st is not None and stat_mod.S_ISDIR(st.mode):
            if writable:
                raise _err(errno.EISDIR, path)
            return files.host_open(path, flags, mode)
        if not flags & os.O_CREAT:
            if st is not None:
                self._ignore(path)
            raise _err(errno.ENOENT, path)
        # A new protected file.  A stale host file at its path (a crash before its first
        # commit, or one the host put there) is overwritten.
        region = self.fspf.region_for(path)
        key = FileKey.generate(encrypted=kind == "encrypted", chunk_size=region.chunk_size)
        fd = files.host_open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode & 0o777)
        entry = FileEntry(key)
        self.fspf.files[path] = entry
        node = Node(
            path, kind, ProtectedFile(entry, HostStore(fd, self.max_io), io_bytes=self.max_io), fd, self._new_ino()
        )
        node.created = True
        self.nodes[key.file_id] = node
        return node

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
        o = self.opens.pop(vfd, None)
        if o is None:
            raise _err(errno.EBADF)
        node = o.node
        node.refs -= 1
        try:
            if o.writable:
                self.commit(node)
        finally:
            if node.refs == 0 and node.kind != "memory":
                assert isinstance(node.file, ProtectedFile)
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
            raise self._integrity(node.path or "(unlinked file)", e) from None

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
            n = self._readinto(o.node, o.pos, out)
            o.pos += n
            o.read_end = o.pos
            return n

    def write(self, vfd: int, data: bytes | bytearray | memoryview) -> int:
        o = self._open_file(vfd)
        if not o.writable:
            raise _err(errno.EBADF)
        with o.node.lock:
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
            o.node.mtime_ns = time.time_ns()
            return self._write(o.node, offset, data)

    def lseek(self, vfd: int, pos: int, how: int) -> int:
        o = self._open_file(vfd)
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
        o = self._open_file(vfd)
        if not o.writable:
            raise _err(errno.EINVAL)
        if length < 0:
            raise _err(errno.EINVAL)
        with o.node.lock:
            try:
                o.node.file.truncate(length)
            except IntegrityError as e:
                raise self._integrity(o.node.path or "(unlinked file)", e) from None

    def fsync(self, vfd: int) -> None:
        self.commit(self._open_file(vfd).node)

    def fstat(self, vfd: int) -> StatResult:
        node = self._open_file(vfd).node
        if node.kind == "memory":
            return self._mem_stat(node)
        return self._file_stat(files.host_fstat(node.host_fd), node.file.length, node.file)

    # -- metadata -----------------------------------------------------------------------------

    def _blksize(self, chunk_size: int) -> int:
        # What BufferedReader/Writer use as their buffer: whole chunks whose records fit one call.
        return max(1, self.max_io // (chunk_size + OVERHEAD)) * chunk_size

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

    def _mem_stat(self, node: Node | None, directory: bool = False) -> StatResult:
        now = time.time_ns()
        if directory or node is None:
            return StatResult(stat_mod.S_IFDIR | 0o700, self._new_ino(), 0, 2, 0, 0, 4096, now, now, now, 4096, 8, 0)
        n = node.file.length
        mt = node.mtime_ns
        mode = stat_mod.S_IFREG | node.mode
        return StatResult(mode, node.ino, 0, 1, 0, 0, n, mt, mt, mt, 4096, (n + 511) // 512, 0)

    def stat(self, path: str, follow: bool) -> StatResult:
        with self.lock:
            if self.kind(path) == "memory":
                node = self.mem_files.get(path)
                if node is not None:
                    return self._mem_stat(node)
                if path in self.mem_dirs:
                    return self._mem_stat(None, directory=True)
                raise _err(errno.ENOENT, path)
            entry = self.fspf.files.get(path)
            if entry is None:
                st = files.host_stat(path, follow)
                if st is None:
                    raise _err(errno.ENOENT, path)
                if stat_mod.S_ISREG(st.mode):
                    self._ignore(path)
                    raise _err(errno.ENOENT, path)
                return st
            node = self.nodes.get(entry.key.file_id)
            if node is not None:
                return self._file_stat(files.host_fstat(node.host_fd), node.file.length, node.file)
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
            names: dict[str, int] = {}
            prefix = path.rstrip("/") + "/"
            if self.kind(path) == "memory":
                if path in self.mem_files:
                    raise _err(errno.ENOTDIR, path)
                if path not in self.mem_dirs:
                    raise _err(errno.ENOENT, path)
                for d in self.mem_dirs:
                    if d.startswith(prefix) and "/" not in d[len(prefix) :]:
                        names[d[len(prefix) :]] = DT_DIR
                for f in self.mem_files:
                    if f.startswith(prefix) and "/" not in f[len(prefix) :]:
                        names[f[len(prefix) :]] = DT_REG
            else:
                if path in self.fspf.files:
                    raise _err(errno.ENOTDIR, path)
                for f in self.fspf.files:
                    if f.startswith(prefix):
                        name, sep, _ = f[len(prefix) :].partition("/")
                        names[name] = DT_DIR if sep else DT_REG
                try:
                    host = list(files.host_listdir(path))
                except FileNotFoundError:
                    if not names:
                        raise
                    host = []
                for name, dtype in host:
                    if name in names:
                        continue
                    if dtype == DT_REG:
                        self._ignore(prefix + name)
                    else:
                        names[name] = dtype
            names.update(self.region_children(path))
            return iter(sorted(names.items()))

    def region_children(self, path: str) -> dict[str, int]:
        """Memory regions directly below ``path``: they exist though the host has no directory."""
        prefix = path.rstrip("/") + "/"
        return {
            r.prefix[len(prefix) :]: DT_DIR
            for r in self.fspf.regions
            if r.kind == "memory" and r.prefix.startswith(prefix) and "/" not in r.prefix[len(prefix) :]
        }

    def mkdir(self, path: str, mode: int) -> None:
        with self.lock:
            if self.kind(path) == "memory":
                if path in self.mem_dirs or path in self.mem_files:
                    raise _err(errno.EEXIST, path)
                if posixpath.dirname(path) not in self.mem_dirs:
                    raise _err(errno.ENOENT, path)
                self.mem_dirs.add(path)
                return
            if path in self.fspf.files:
                raise _err(errno.EEXIST, path)
            files.host_mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        with self.lock:
            prefix = path + "/"
            if self.kind(path) == "memory":
                if path in self.mem_files:
                    raise _err(errno.ENOTDIR, path)
                if path not in self.mem_dirs:
                    raise _err(errno.ENOENT, path)
                if any(r.prefix == path for r in self.fspf.regions):
                    raise _err(errno.EBUSY, path)
                if any(p.startswith(prefix) for p in (*self.mem_dirs, *self.mem_files)):
                    raise _err(errno.ENOTEMPTY, path)
                self.mem_dirs.discard(path)
                return
            if path in self.fspf.files:
                raise _err(errno.ENOTDIR, path)
            if any(p.startswith(prefix) for p in self.fspf.files):
                raise _err(errno.ENOTEMPTY, path)
            try:
                files.host_rmdir(path)
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                # Only files the FSPF does not list (orphans of a crash) may remain: drop them.
                leftovers = list(files.host_listdir(path))
                if not leftovers or any(dtype != DT_REG for _, dtype in leftovers):
                    raise
                for name, _ in leftovers:
                    files.host_unlink(prefix + name)
                files.host_rmdir(path)

    def unlink(self, path: str) -> None:
        with self.lock:
            if self.kind(path) == "memory":
                node = self.mem_files.pop(path, None)
                if node is None:
                    raise _err(errno.EISDIR if path in self.mem_dirs else errno.ENOENT, path)
                node.path = None
                return
            entry = self.fspf.files.pop(path, None)
            if entry is None:
                st = files.host_stat(path, False)
                if st is not None and stat_mod.S_ISDIR(st.mode):
                    raise _err(errno.EISDIR, path)
                if st is not None and not stat_mod.S_ISREG(st.mode):
                    files.host_unlink(path)  # a symlink or the like: host metadata
                    return
                raise _err(errno.ENOENT, path)
            node = self.nodes.get(entry.key.file_id)
            if node is not None:
                node.path = None
                node.created = False
            self._write_fspf()
            try:
                files.host_unlink(entry.store or path)
            except FileNotFoundError:
                pass

    def rename(self, src: str, dst: str) -> None:
        kind = self.kind(src)
        if self.kind(dst) != kind:
            raise _err(errno.EXDEV, src)
        if dst == src:
            self.stat(src, False)  # renaming a file onto itself: nothing to do, if it exists
            return
        if dst.startswith(src + "/"):
            raise _err(errno.EINVAL, src)
        with self.lock:
            if kind == "memory":
                self._rename_memory(src, dst)
            elif src in self.fspf.files:
                self._rename_file(src, dst)
            else:
                self._rename_dir(src, dst)

    def _rename_memory(self, src: str, dst: str) -> None:
        if posixpath.dirname(dst) not in self.mem_dirs:
            raise _err(errno.ENOENT, dst)
        node = self.mem_files.pop(src, None)
        if node is not None:
            if dst in self.mem_dirs:
                self.mem_files[src] = node
                raise _err(errno.EISDIR, dst)
            old = self.mem_files.pop(dst, None)
            if old is not None:
                old.path = None
            node.path = dst
            self.mem_files[dst] = node
            return
        if src not in self.mem_dirs:
            raise _err(errno.ENOENT, src)
        if dst in self.mem_files:
            raise _err(errno.ENOTDIR, dst)
        if any(p.startswith(dst + "/") for p in (*self.mem_dirs, *self.mem_files)):
            raise _err(errno.ENOTEMPTY, dst)
        for d in [d for d in self.mem_dirs if d == src or d.startswith(src + "/")]:
            self.mem_dirs.discard(d)
            self.mem_dirs.add(dst + d[len(src) :])
        for f in [f for f in self.mem_files if f.startswith(src + "/")]:
            moved = self.mem_files.pop(f)
            moved.path = dst + f[len(src) :]
            self.mem_files[moved.path] = moved

    def _move_entries(self, pairs: list[tuple[str, str]]) -> None:
        """FSPF first (records still at their old host paths), host rename, FSPF again."""
        for old, new in pairs:
            entry = self.fspf.files.pop(old)
            self.fspf.files[new] = dataclasses.replace(entry, store=entry.store or old)
            node = self.nodes.get(entry.key.file_id)
            if node is not None:
                node.path = new

    def _rename_file(self, src: str, dst: str) -> None:
        st = files.host_stat(dst, True)
        if st is not None and stat_mod.S_ISDIR(st.mode):
            raise _err(errno.EISDIR, dst)
        if files.host_stat(posixpath.dirname(dst), True) is None:
            raise _err(errno.ENOENT, dst)
        old = self.fspf.files.pop(dst, None)
        if old is not None:
            node = self.nodes.get(old.key.file_id)
            if node is not None:
                node.path = None
                node.created = False
        store = self.fspf.files[src].store or src
        self._move_entries([(src, dst)])
        self._write_fspf()  # commit point: dst names the file, its records still at src
        files.host_rename(store, dst, True)
        self.fspf.files[dst] = dataclasses.replace(self.fspf.files[dst], store="")
        self._write_fspf()
        if old is not None and old.store and old.store != dst:
            try:
                files.host_unlink(old.store)
            except FileNotFoundError:
                pass

    def _rename_dir(self, src: str, dst: str) -> None:
        st = files.host_stat(src, False)
        if st is None:
            raise _err(errno.ENOENT, src)
        if not stat_mod.S_ISDIR(st.mode):
            if stat_mod.S_ISREG(st.mode):
                self._ignore(src)
                raise _err(errno.ENOENT, src)
            files.host_rename(src, dst, True)  # a symlink: host metadata
            return
        if dst in self.fspf.files:
            raise _err(errno.ENOTDIR, dst)
        if any(p.startswith(dst + "/") for p in self.fspf.files):
            raise _err(errno.ENOTEMPTY, dst)
        pairs = [(p, dst + p[len(src) :]) for p in self.fspf.files if p.startswith(src + "/")]
        if not pairs:
            files.host_rename(src, dst, True)
            return
        self._move_entries(pairs)
        self._write_fspf()
        files.host_rename(src, dst, True)
        for _, new in pairs:
            self.fspf.files[new] = dataclasses.replace(self.fspf.files[new], store="")
        self._write_fspf()

    def _metadata(self, path: str) -> tuple[Node | None, str]:
        """Where ``path``'s permissions and times live: its memory node (``None`` for a memory
        directory), or the host path that holds it.  Raises if ``path`` does not exist."""
        if self.kind(path) == "memory":
            node = self.mem_files.get(path)
            if node is None and path not in self.mem_dirs:
                raise _err(errno.ENOENT, path)
            return node, ""
        self.stat(path, True)
        entry = self.fspf.files.get(path)
        return None, (entry.store or path) if entry else path

    def access(self, path: str, mode: int) -> bool:
        try:
            _, host = self._metadata(path)
        except OSError:
            return False
        return mode == os.F_OK or not host or files.host_access(host, mode)

    def chmod(self, path: str, mode: int) -> None:
        with self.lock:
            node, host = self._metadata(path)
            if host:
                files.host_chmod(host, mode)
            elif node is not None:
                node.mode = stat_mod.S_IMODE(mode)

    def utime(self, path: str, args: tuple[int, int, int]) -> None:
        with self.lock:
            node, host = self._metadata(path)
            if host:
                files.host_utime(host, args)
            elif node is not None:
                node.mtime_ns = args[2] if args[0] else time.time_ns()

    def symlink(self, path: str) -> None:
        raise OSError(errno.EPERM, "symbolic links cannot be created in a protected region", path)

    def readlink(self, path: str) -> Any:
        if self.kind(path) == "memory" or path in self.fspf.files:
            self.stat(path, False)
            raise _err(errno.EINVAL, path)
        return files.host_readlink(path)


_shield: FsShield | None = None


def mount(table: FSPF, key: bytes, fspf_path: str, tag: str, max_io: int) -> FsShield:
    """Route the protected regions of ``table`` through a new shield."""
    global _shield
    shield = FsShield(table, key, fspf_path, tag, max_io)
    files.set_shield(shield)
    _shield = shield
    shield.recover()
    return shield


def load(path: str, key: bytes, pinned: list[str] | None, max_io: int) -> tuple[FSPF, str]:
    """Read and open the sealed FSPF at ``path`` (a host path) with ``key``.

    Raises:
        IntegrityError: wrong key, altered, or not a pinned version (``pinned``: the tags
            accepted, normally one; two after a kill between the phases of a pin).
        OSError: it cannot be read.
    """
    fd = files.host_open(path, os.O_RDONLY, 0)
    try:
        size = files.fstat(fd).st_size
        blob = bytes(HostStore(fd, max_io).pread(0, size))
    finally:
        files.close(fd)
    tag = fspf_mod.tag_of(blob)
    if pinned is not None and tag not in [t.lower() for t in pinned]:
        raise IntegrityError("the FSPF is not the pinned version")
    return fspf_mod.open_sealed(blob, key), tag


def shield() -> FsShield | None:
    return _shield
