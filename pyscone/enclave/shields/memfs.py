"""``memory`` regions (TRUSTED): a file tree that lives in enclave memory only, like a tmpfs.

The host sees nothing of it: no call leaves the enclave.  :class:`~pyscone.enclave.shields.fs.FsShield`
routes every path of a memory region here and holds the lock.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat as stat_mod
from collections.abc import Callable

from pyscone.abi import DT_DIR, DT_REG, StatResult
from pyscone.enclave.shields.nodes import MemoryFile, Node, dir_stat, err
from pyscone.protect.fspf import FSPF


class MemoryRegions:
    def __init__(self, table: FSPF, new_ino: Callable[[], int]) -> None:
        self.prefixes = {r.prefix for r in table.regions if r.kind == "memory"}
        self.dirs = set(self.prefixes)
        self.files: dict[str, Node] = {}
        self._new_ino = new_ino
        self._dir_inos: dict[str, int] = {}

    def is_dir(self, path: str) -> bool:
        return path in self.dirs

    def open(self, path: str, flags: int) -> Node:
        node = self.files.get(path)
        if node is None:
            if path in self.dirs:
                raise err(errno.EISDIR, path)
            if not flags & os.O_CREAT:
                raise err(errno.ENOENT, path)
            if posixpath.dirname(path) not in self.dirs:
                raise err(errno.ENOENT, path)
            node = Node(path, "memory", MemoryFile(), -1, self._new_ino())
            self.files[path] = node
        elif flags & os.O_CREAT and flags & os.O_EXCL:
            raise err(errno.EEXIST, path)
        return node

    def dir_stat(self, path: str) -> StatResult:
        ino = self._dir_inos.get(path)
        if ino is None:
            ino = self._dir_inos[path] = self._new_ino()
        return dir_stat(ino)

    @staticmethod
    def node_stat(node: Node) -> StatResult:
        n = node.file.length
        mt = node.mtime_ns
        mode = stat_mod.S_IFREG | node.mode
        return StatResult(mode, node.ino, 0, 1, 0, 0, n, mt, mt, mt, 4096, (n + 511) // 512, 0)

    def stat(self, path: str) -> StatResult:
        node = self.files.get(path)
        if node is not None:
            return self.node_stat(node)
        if path in self.dirs:
            return self.dir_stat(path)
        raise err(errno.ENOENT, path)

    def node(self, path: str) -> Node | None:
        """The file at ``path``, ``None`` for a directory; raises if nothing is there."""
        node = self.files.get(path)
        if node is None and path not in self.dirs:
            raise err(errno.ENOENT, path)
        return node

    def listdir(self, path: str) -> dict[str, int]:
        if path in self.files:
            raise err(errno.ENOTDIR, path)
        if path not in self.dirs:
            raise err(errno.ENOENT, path)
        prefix = path.rstrip("/") + "/"
        names: dict[str, int] = {}
        for d in self.dirs:
            if d.startswith(prefix) and "/" not in d[len(prefix) :]:
                names[d[len(prefix) :]] = DT_DIR
        for f in self.files:
            if f.startswith(prefix) and "/" not in f[len(prefix) :]:
                names[f[len(prefix) :]] = DT_REG
        return names

    def mkdir(self, path: str) -> None:
        if path in self.dirs or path in self.files:
            raise err(errno.EEXIST, path)
        if posixpath.dirname(path) not in self.dirs:
            raise err(errno.ENOENT, path)
        self.dirs.add(path)

    def rmdir(self, path: str) -> None:
        prefix = path + "/"
        if path in self.files:
            raise err(errno.ENOTDIR, path)
        if path not in self.dirs:
            raise err(errno.ENOENT, path)
        if path in self.prefixes:
            raise err(errno.EBUSY, path)
        if any(p.startswith(prefix) for p in (*self.dirs, *self.files)):
            raise err(errno.ENOTEMPTY, path)
        self.dirs.discard(path)

    def unlink(self, path: str) -> None:
        node = self.files.pop(path, None)
        if node is None:
            raise err(errno.EISDIR if path in self.dirs else errno.ENOENT, path)
        node.path = None

    def rename(self, src: str, dst: str) -> None:
        if posixpath.dirname(dst) not in self.dirs:
            raise err(errno.ENOENT, dst)
        node = self.files.pop(src, None)
        if node is not None:
            if dst in self.dirs:
                self.files[src] = node
                raise err(errno.EISDIR, dst)
            old = self.files.pop(dst, None)
            if old is not None:
                old.path = None
            node.path = dst
            self.files[dst] = node
            return
        if src not in self.dirs:
            raise err(errno.ENOENT, src)
        if src in self.prefixes or dst in self.prefixes:
            raise err(errno.EBUSY, src)
        if dst in self.files:
            raise err(errno.ENOTDIR, dst)
        if any(p.startswith(dst + "/") for p in (*self.dirs, *self.files)):
            raise err(errno.ENOTEMPTY, dst)
        for d in [d for d in self.dirs if d == src or d.startswith(src + "/")]:
            self.dirs.discard(d)
            self.dirs.add(dst + d[len(src) :])
        for f in [f for f in self.files if f.startswith(src + "/")]:
            moved = self.files.pop(f)
            moved.path = dst + f[len(src) :]
            self.files[moved.path] = moved
