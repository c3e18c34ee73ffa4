"""The FS shield's directory changes and path metadata (TRUSTED): a part of :class:`FsShield`.

Directory changes in a protected region are FSPF changes, each committed at once: so a
directory the app made exists at the next start whatever the host removed or added.  A
rename is two FSPF changes around the host's rename (the entry first names its old host path
as ``store``); a crash between them is finished at the next mount (``FsShield.recover``).
In a process family each change runs under the family's commit lock, on its newest FSPF
(``fsfamily.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import posixpath
import stat as stat_mod
import time
from typing import TYPE_CHECKING, Any

from pyscone.abi import DT_DIR, DT_REG
from pyscone.enclave.shields.nodes import Node, log
from pyscone.enclave.shields.nodes import err as _err
from pyscone.enclave.stdlib import files
from pyscone.protect import namespace

if TYPE_CHECKING:
    from pyscone.enclave.shields.fs import FsShield

PROTECTED = namespace.PROTECTED


def _changing(sh: FsShield, path: str) -> contextlib.AbstractContextManager[None]:
    """Around a directory change: in a family, under its commit lock, on its newest FSPF."""
    if sh.family.active and sh.kind(path) != "memory":
        return sh.family.changing()
    return contextlib.nullcontext()


def _keep_parent(sh: FsShield, path: str) -> None:
    """``path`` is leaving its directory: if that was all the directory held, record the
    directory in the FSPF (it existed only by implication, and must stay)."""
    parent = posixpath.dirname(path)
    tree = sh._names()
    listing = tree.listing(parent) or {}
    region = sh.fspf.region_for(parent)
    if set(listing) <= {posixpath.basename(path)} and region.kind in PROTECTED and region.prefix != parent:
        sh.fspf.dirs.add(parent)


def mkdir(sh: FsShield, path: str, mode: int) -> None:
    with sh.lock, _changing(sh, path):
        if sh.kind(path) == "memory":
            sh.mem.mkdir(path)
            return
        tree = sh._names()
        if tree.exists(path):
            raise _err(errno.EEXIST, path)
        if not tree.is_dir(posixpath.dirname(path)):
            raise sh._missing(path)
        sh._host_makedirs(posixpath.dirname(path))
        try:
            files.host_mkdir(path, mode)
        except FileExistsError:
            st = files.host_stat(path, False)
            if st is None or not stat_mod.S_ISDIR(st.mode):  # something of the host's: not ours
                files.host_unlink(path)
                files.host_mkdir(path, mode)
        sh.fspf.dirs.add(path)
        tree.add(path, DT_DIR)
        sh._write_fspf()


def rmdir(sh: FsShield, path: str) -> None:
    with sh.lock, _changing(sh, path):
        if sh.kind(path) == "memory":
            sh.mem.rmdir(path)
            return
        tree = sh._names()
        if path in sh.fspf.files:
            raise _err(errno.ENOTDIR, path)
        if not tree.is_dir(path):
            raise sh._missing(path)
        if sh.fspf.region_for(path).prefix == path:
            raise _err(errno.EBUSY, path)
        if not tree.empty(path):
            raise _err(errno.ENOTEMPTY, path)
        _keep_parent(sh, path)
        sh.fspf.dirs.discard(path)
        tree.remove(path)
        sh._write_fspf()
        _clear_host_dir(sh, path)


def _clear_host_dir(sh: FsShield, path: str) -> None:
    """Remove the host's directory at ``path``, which the FSPF says is gone or empty: what
    is left in it (orphans of a crash, the host's own files) is not ours."""
    try:
        files.host_rmdir(path)
        return
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        if e.errno != errno.ENOTEMPTY:
            log(f"{path}: the host did not remove the directory: {e.strerror}")
            return
    try:
        for name, dtype in list(files.host_listdir(path)):
            where = posixpath.join(path, name)
            files.host_rmdir(where) if dtype == DT_DIR else files.host_unlink(where)
        files.host_rmdir(path)
    except OSError as e:
        log(f"{path}: left on the host (not in the FSPF): {e.strerror}")


def unlink(sh: FsShield, path: str) -> None:
    with sh.lock, _changing(sh, path):
        if sh.kind(path) == "memory":
            sh.mem.unlink(path)
            return
        tree = sh._names()
        entry = sh.fspf.files.get(path)
        if entry is None:
            raise _err(errno.EISDIR, path) if tree.is_dir(path) else sh._missing(path)
        _keep_parent(sh, path)
        del sh.fspf.files[path]
        tree.remove(path)
        node = sh.nodes.get(entry.key.file_id)
        if node is not None:
            node.path = None
            node.created = False
        sh._write_fspf()
        try:
            files.host_unlink(entry.store or path)
        except FileNotFoundError:
            pass


def rename(sh: FsShield, src: str, dst: str) -> None:
    kind = sh.kind(src)
    if sh.kind(dst) != kind:
        raise _err(errno.EXDEV, src)
    if dst == src:
        sh.stat(src, False)  # renaming a file onto itself: nothing to do, if it exists
        return
    if dst.startswith(src + "/"):
        raise _err(errno.EINVAL, src)
    with sh.lock, _changing(sh, src):
        if kind == "memory":
            sh.mem.rename(src, dst)
        elif src in sh.fspf.files:
            _rename_file(sh, src, dst)
        else:
            _rename_dir(sh, src, dst)


def _move_entries(sh: FsShield, pairs: list[tuple[str, str]]) -> None:
    """FSPF first (records still at their old host paths), host rename, FSPF again."""
    for old, new in pairs:
        entry = sh.fspf.files.pop(old)
        sh.fspf.files[new] = dataclasses.replace(entry, store=entry.store or old)
        node = sh.nodes.get(entry.key.file_id)
        if node is not None:
            node.path = new


def _rename_file(sh: FsShield, src: str, dst: str) -> None:
    tree = sh._names()
    if tree.is_dir(dst):
        raise _err(errno.EISDIR, dst)
    if not tree.is_dir(posixpath.dirname(dst)):
        raise sh._missing(dst)
    sh._host_makedirs(posixpath.dirname(dst))
    old = sh.fspf.files.pop(dst, None)
    if old is not None:
        node = sh.nodes.get(old.key.file_id)
        if node is not None:
            node.path = None
            node.created = False
    store = sh.fspf.files[src].store or src
    if posixpath.dirname(src) != posixpath.dirname(dst):
        _keep_parent(sh, src)
    _move_entries(sh, [(src, dst)])
    tree.remove(src)
    tree.add(dst, DT_REG)
    sh._write_fspf()  # commit point: dst names the file, its records still at src
    files.host_rename(store, dst, True)
    sh.fspf.files[dst] = dataclasses.replace(sh.fspf.files[dst], store="")
    sh._write_fspf()
    if old is not None and old.store and old.store != dst:
        try:
            files.host_unlink(old.store)
        except FileNotFoundError:
            pass


def _rename_dir(sh: FsShield, src: str, dst: str) -> None:
    tree = sh._names()
    if not tree.is_dir(src):
        raise sh._missing(src)
    if any(r.prefix in (src, dst) or r.prefix.startswith(src + "/") for r in sh.fspf.regions):
        raise _err(errno.EBUSY, src)  # a region (or the way to one) does not move
    if dst in sh.fspf.files:
        raise _err(errno.ENOTDIR, dst)
    if not tree.empty(dst):
        raise _err(errno.ENOTEMPTY, dst)
    if not tree.is_dir(posixpath.dirname(dst)):
        raise sh._missing(dst)
    sh._host_makedirs(posixpath.dirname(dst))
    _clear_host_dir(sh, dst)  # empty for the FSPF: what the host has there must not stop the rename
    pairs = [(p, dst + p[len(src) :]) for p in sh.fspf.files if p.startswith(src + "/")]
    moved = {d for d in sh.fspf.dirs if d == src or d.startswith(src + "/")}
    if posixpath.dirname(src) != posixpath.dirname(dst):
        _keep_parent(sh, src)
    sh.fspf.dirs -= moved
    sh.fspf.dirs |= {dst + d[len(src) :] for d in moved}
    _move_entries(sh, pairs)
    sh._tree = None
    sh._write_fspf()  # commit point: the files' records are still at their old paths
    if files.host_stat(src, True) is not None:
        files.host_rename(src, dst, True)
    if pairs:
        for _, new in pairs:
            sh.fspf.files[new] = dataclasses.replace(sh.fspf.files[new], store="")
        sh._write_fspf()


def _metadata(sh: FsShield, path: str) -> tuple[Node | None, str]:
    """Where ``path``'s permissions and times live: its memory node (``None`` for a memory
    directory), or the host path that holds it.  Raises if ``path`` does not exist."""
    if sh.kind(path) == "memory":
        return sh.mem.node(path), ""
    entry = sh.fspf.files.get(path)
    if entry is not None:
        return None, entry.store or path
    if not sh._names().is_dir(path):
        raise sh._missing(path)
    return None, path


def access(sh: FsShield, path: str, mode: int) -> bool:
    with sh.lock:
        try:
            _, host = _metadata(sh, path)
        except OSError:
            return False
        if mode == os.F_OK or not host:
            return True
        if host == path and sh._names().is_dir(path) and files.host_stat(path, True) is None:
            return True  # a directory the host lacks: it is made when it is needed
        return files.host_access(host, mode)


def _forget_host_stat(sh: FsShield, path: str) -> None:
    """A chmod or utime of an open protected file: its next stat asks the host again."""
    entry = sh.fspf.files.get(path)
    open_node = sh.nodes.get(entry.key.file_id) if entry is not None else None
    if open_node is not None:
        open_node.host_st = None


def chmod(sh: FsShield, path: str, mode: int) -> None:
    with sh.lock:
        node, host = _metadata(sh, path)
        _forget_host_stat(sh, path)
        if host:
            if sh._names().is_dir(host):
                sh._host_makedirs(host)
            files.host_chmod(host, mode)
        elif node is not None:
            node.mode = stat_mod.S_IMODE(mode)


def utime(sh: FsShield, path: str, args: tuple[int, int, int]) -> None:
    with sh.lock:
        node, host = _metadata(sh, path)
        _forget_host_stat(sh, path)
        if host:
            if sh._names().is_dir(host):
                sh._host_makedirs(host)
            files.host_utime(host, args)
        elif node is not None:
            node.mtime_ns = args[2] if args[0] else time.time_ns()


def symlink(sh: FsShield, path: str) -> None:
    raise OSError(errno.EPERM, "symbolic links cannot be created in a protected region", path)


def readlink(sh: FsShield, path: str) -> Any:
    """No symlink exists in a shielded region: EINVAL for what exists, else ENOENT."""
    with sh.lock:
        if sh.kind(path) == "memory":
            sh.mem.stat(path)
        elif not sh._names().exists(path):
            raise sh._missing(path)
    raise _err(errno.EINVAL, path)
