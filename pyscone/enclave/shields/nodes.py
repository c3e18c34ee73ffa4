"""The file-system shield's in-enclave objects (TRUSTED): open files, memory files, errors."""

from __future__ import annotations

import os
import stat as stat_mod
import sys
import time

from pyscone.abi import StatResult
from pyscone.enclave.stdlib.threads import RLock
from pyscone.protect.pfile import ProtectedFile


def err(code: int, path: str | None = None) -> OSError:
    if path is None:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), path)


def log(message: str) -> None:
    try:
        sys.stderr.write(f"pyscone: fs shield: {message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed console must not hide the error we raise next
        pass


def dir_stat(ino: int) -> StatResult:
    """A directory that only the enclave knows of (a memory directory, or one the host lacks)."""
    now = time.time_ns()
    return StatResult(stat_mod.S_IFDIR | 0o700, ino, 0, 2, 0, 0, 4096, now, now, now, 4096, 8, 0)


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

    __slots__ = ("created", "file", "host_fd", "host_st", "ino", "kind", "lock", "mode", "mtime_ns", "path", "refs")

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
        # The host's fstat of host_fd, and file.mutations when it was asked: the host's part of
        # a stat (mode, times, inode) is asked again only after the contents changed.
        self.host_st: tuple[int, StatResult] | None = None


class OpenFile:
    __slots__ = ("append", "lock_fd", "node", "poisoned", "pos", "read_end", "readable", "writable")

    def __init__(self, node: Node, readable: bool, writable: bool, append: bool) -> None:
        self.node = node
        self.lock_fd = -1  # a host fd of its own for flock (an open file description per open)
        self.pos = 0
        self.read_end = 0  # where the last read ended: a read from elsewhere follows a seek
        self.poisoned = False  # a read at the position met a refused chunk: seeks fail (FsShield.lseek)
        self.readable = readable
        self.writable = writable
        self.append = append


class OpenDir:
    """A directory the app opened (``os.open(d, O_RDONLY)``, to fsync it): a virtual fd too,
    so that no host fd of a protected region ever reaches the app."""

    __slots__ = ("kind", "path")

    def __init__(self, path: str, kind: str) -> None:
        self.path = path
        self.kind = kind
