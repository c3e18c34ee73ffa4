"""Directory listings and file-system metadata: ``os.listdir``/``scandir``, ``statvfs``,
``umask`` and extended attributes, on top of :mod:`files`'s routing (host or FS shield).

Extended attributes are not carried through the enclave: every ``*xattr`` call is
``ENOTSUP``, what Linux says of a file system without them, which ``shutil.copystat``
(and so ``copy2``/``copytree``) tolerates.  ``umask`` is the enclave's own (the host's
process mask is not the app's business): it is applied to the modes the enclave
creates files and directories with.  ``statvfs`` of a path or fd in a shielded region
reports the host file system that holds the FSPF (a memory region's bytes live in
enclave memory, a protected region's on the host's disk, near it as a rule).
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Iterator
from typing import Any

from pyscone.abi import DT_DIR, DT_LNK, DT_REG, Op, StatvfsResult
from pyscone.enclave import iago
from pyscone.enclave.stdlib import dups, files, interpose, pipes

Path = files.Path


def _dirents(path: str) -> Iterator[tuple[str, int]]:
    if sh := files._shielded(path):
        yield from sh.listdir(path)
        return
    # The way to a shielded region is a directory whatever the host has there (and a memory
    # region has no host directory at all): listed as one, in its parent.
    anchors = files._shield.anchor_children(path) if files._shield is not None else set()
    seen = set()
    for name, dtype in files.host_listdir(path):
        seen.add(name)
        yield name, DT_DIR if name in anchors else dtype
    yield from ((n, DT_DIR) for n in sorted(anchors) if n not in seen)


def listdir(path: Path | None = None) -> list[Any]:
    raw = os.fspath(path) if path is not None else "."
    names = [n for n, _ in _dirents(files.abspath(raw))]
    return [os.fsencode(n) for n in names] if isinstance(raw, bytes) else names


class DirEntry:
    """What ``os.scandir`` yields: the directory entry type, with lazily fetched stats."""

    __slots__ = ("_dtype", "_lstat", "_stat", "name", "path")

    def __init__(self, name: Any, path: Any, dtype: int) -> None:
        self.name = name
        self.path = path
        self._dtype = dtype
        self._stat: os.stat_result | None = None
        self._lstat: os.stat_result | None = None

    def __fspath__(self) -> Any:
        return self.path

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r}>"

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if not follow_symlinks or self._dtype != DT_LNK:
            if self._lstat is None:
                self._lstat = files.lstat(self.path)
            if not follow_symlinks or not stat_mod.S_ISLNK(self._lstat.st_mode):
                return self._lstat
        if self._stat is None:
            self._stat = files.stat(self.path)
        return self._stat

    def _test(self, want: int, check: Any, follow_symlinks: bool) -> bool:
        if self._dtype == want:
            return True
        if (self._dtype == DT_LNK and follow_symlinks) or self._dtype == 0:
            try:
                return bool(check(self.stat(follow_symlinks=follow_symlinks).st_mode))
            except FileNotFoundError:
                return False
        return False

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._test(DT_DIR, stat_mod.S_ISDIR, follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._test(DT_REG, stat_mod.S_ISREG, follow_symlinks)

    def is_symlink(self) -> bool:
        return self._dtype == DT_LNK

    def is_junction(self) -> bool:
        return False

    def inode(self) -> int:
        return self.stat(follow_symlinks=False).st_ino


class _ScandirIterator:
    def __init__(self, path: Any) -> None:
        raw = os.fspath(path) if path is not None else "."
        base = files.abspath(raw)
        self._bytes = isinstance(raw, bytes)
        self._raw: Any = raw
        self._it = _dirents(base)

    def __iter__(self) -> _ScandirIterator:
        return self

    def __next__(self) -> DirEntry:
        name, dtype = next(self._it)
        if self._bytes:
            bname = os.fsencode(name)
            return DirEntry(bname, os.path.join(self._raw, bname), dtype)
        return DirEntry(name, os.path.join(self._raw, name), dtype)

    def __enter__(self) -> _ScandirIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._it = iter(())


def scandir(path: Path | None = None) -> _ScandirIterator:
    return _ScandirIterator(path)


# -- statvfs, umask, xattrs ------------------------------------------------------------------


def _statvfs(fd: int, path: str) -> os.statvfs_result:
    if fd >= 0:
        fd = dups.resolve(fd)  # the handle a dup names
    sh = files._shield
    if sh is not None and ((fd >= 0 and files._vfd(fd)) or (fd < 0 and sh.governs(path))):
        fd, path = -1, sh.fspf_path
    elif fd >= 0:
        if pipes.is_local(fd):
            pipes.fstat(fd)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if iago.fds.kind(fd) != iago.FdTable.FILE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    _, value = files._call(Op.STATVFS, (fd,), files._enc(path) if fd < 0 else b"", filename=path if fd < 0 else None)
    assert isinstance(value, StatvfsResult)
    return value.to_os()  # type: ignore[return-value]


def statvfs(path: Path | int) -> os.statvfs_result:
    if isinstance(path, int):
        return _statvfs(path, "")
    return _statvfs(-1, files.abspath(path))


def fstatvfs(fd: int) -> os.statvfs_result:
    return _statvfs(fd, "")


def umask(mask: int) -> int:
    old, files.umask = files.umask, int(mask) & 0o777
    return old


def _no_xattrs(path: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(path, int):
        if not dups.is_open(path):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    else:
        files._stat(path, kwargs.get("follow_symlinks", True))  # ENOENT for what is not there
    raise OSError(errno.ENOTSUP, "extended attributes are not supported inside a pyscone enclave")


def install() -> None:
    interpose(
        os, listdir=listdir, scandir=scandir, DirEntry=DirEntry, statvfs=statvfs, fstatvfs=fstatvfs, umask=umask,
        listxattr=_no_xattrs, getxattr=_no_xattrs, setxattr=_no_xattrs, removexattr=_no_xattrs,
    )  # fmt: skip
