"""File objects: ``open``, ``io.open``, ``io.FileIO`` for the enclave, over ``files``' calls.

``open`` is rebuilt on :class:`EnclaveFileIO`, a raw I/O object whose reads and writes
are the enclave's (host calls, the file-system shield, pipes); the stdlib's own C
``BufferedReader``/``BufferedWriter``/``TextIOWrapper`` sit on top of it exactly as they
sit on ``FileIO``, so text modes, newlines, encodings and buffering behave as in plain
Python.  ``files.install`` puts them in place.
"""

from __future__ import annotations

import errno
import io
import os
import stat as stat_mod
import weakref
from typing import Any

from pyscone.enclave.stdlib import dups, files

# Buffered file objects open() made: flushed at exit, as the interpreter's finalization would.
_buffered: weakref.WeakSet[Any] = weakref.WeakSet()


def flush_all() -> None:
    """Flush what the app left open (the interpreter's exit)."""
    for f in list(_buffered):
        try:
            if not f.closed:
                f.flush()
        except Exception:  # noqa: BLE001 - as at interpreter exit: best effort
            pass


class EnclaveFileIO(io.RawIOBase):
    """``io.FileIO`` for the enclave: raw, unbuffered I/O on a host fd."""

    def __init__(self, file: files.Path | int, mode: str = "r", closefd: bool = True, opener: Any = None) -> None:
        self._fd = -1
        self._under_buffer = False
        if isinstance(file, float):
            raise TypeError("integer argument expected, got float")
        if set(mode) - set("rwxab+") or sum(c in "rwxa" for c in mode) != 1 or mode.count("+") > 1:
            raise ValueError(f"invalid mode: {mode}")
        self._readable = "r" in mode or "+" in mode
        self._writable = any(c in mode for c in "wxa") or "+" in mode
        self._append = "a" in mode
        self._created = "x" in mode
        flags = os.O_RDWR if self._readable and self._writable else os.O_RDONLY if self._readable else os.O_WRONLY
        if "w" in mode:
            flags |= os.O_CREAT | os.O_TRUNC
        elif "x" in mode:
            flags |= os.O_CREAT | os.O_EXCL
        elif "a" in mode:
            flags |= os.O_CREAT | os.O_APPEND
        if isinstance(file, int):
            if file < 0:
                raise ValueError("negative file descriptor")
            if not dups.is_open(file):
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            self._fd = file
        else:
            if not closefd:
                raise ValueError("Cannot use closefd=False with file name")
            fd = opener(file, flags | os.O_CLOEXEC) if opener else files.os_open(file, flags, 0o666)
            if not isinstance(fd, int) or fd < 0:
                raise ValueError(f"opener returned {fd}")
            self._fd = fd
        self.closefd = closefd
        self.name: Any = file
        try:
            st = files.fstat(self._fd)
            if stat_mod.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), file)
            self._blksize = st.st_blksize if st.st_blksize > 1 else io.DEFAULT_BUFFER_SIZE
            self._seekable: bool | None = stat_mod.S_ISREG(st.st_mode) or None
            if self._append:
                files.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            if closefd:
                files.close(self._fd)
            self._fd = -1
            raise

    @property
    def mode(self) -> str:
        if self._created:
            return "xb+" if self._readable else "xb"
        if self._append:
            return "ab+" if self._readable else "ab"
        if self._readable:
            return "rb+" if self._writable else "rb"
        return "wb"

    def _check(self) -> None:
        if self._fd < 0:
            raise ValueError("I/O operation on closed file")

    def fileno(self) -> int:
        self._check()
        return self._fd

    def readable(self) -> bool:
        self._check()
        return self._readable

    def writable(self) -> bool:
        self._check()
        return self._writable

    def seekable(self) -> bool:
        self._check()
        if self._seekable is None:
            try:
                self.tell()
                self._seekable = True
            except OSError:
                self._seekable = False
        return self._seekable

    def isatty(self) -> bool:
        self._check()
        return files.isatty(self._fd)

    def readinto(self, b: Any) -> int:
        self._check()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        view = memoryview(b).cast("B")
        h = dups.resolve(self._fd)
        if sh := files._vfd(h):
            # Decrypted straight into the caller's buffer; a buffered reader may get a short read.
            return sh.readinto(h, view, self._under_buffer)
        data = files.read(self._fd, len(view))
        n = len(data)
        view[:n] = data
        return n

    def readall(self) -> bytes:
        self._check()
        chunks = []
        while True:
            data = files.read(self._fd, files._slot_data)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def read(self, size: int | None = -1) -> bytes | None:
        if size is None or size < 0:
            return self.readall()
        self._check()
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        return files.read(self._fd, size)

    def write(self, b: Any) -> int:
        self._check()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        return files.write(self._fd, b)

    def seek(self, pos: int, whence: int = 0) -> int:
        self._check()
        if isinstance(pos, float):
            raise TypeError("an integer is required")
        return files.lseek(self._fd, pos, whence)

    def tell(self) -> int:
        self._check()
        return files.lseek(self._fd, 0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        self._check()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        if size is None:
            size = self.tell()
        files.ftruncate(self._fd, size)
        return size

    def close(self) -> None:
        if self._fd >= 0:
            try:
                super().close()
            finally:
                fd, self._fd = self._fd, -1
                if self.closefd:
                    files.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _dealloc_warn(self, source: object) -> None:
        pass

    def __repr__(self) -> str:
        if self._fd < 0:
            return "<pyscone.EnclaveFileIO [closed]>"
        return f"<pyscone.EnclaveFileIO name={self.name!r} mode={self.mode!r} closefd={self.closefd}>"

    def __getstate__(self) -> object:
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")


# -- buffered objects shared between lthreads ------------------------------------------------
#
# The C buffered classes guard their state with a lock keyed by the *OS thread*.  An
# lthread that parks inside ``write`` (waiting for the host) still holds it, so a second
# lthread on the same OS thread would hit "reentrant call inside <_io.BufferedWriter>".
# These subclasses take an lthread-aware lock first: the second lthread waits its turn.

_BUFFERED_METHODS = (
    "read", "read1", "readinto", "readinto1", "readline", "readlines", "peek", "write", "writelines",
    "flush", "seek", "tell", "truncate", "close", "detach", "__next__",
)  # fmt: skip


def lthread_safe(cls: type) -> type:
    from pyscone.enclave.stdlib.threads import RLock

    base_init = cls.__init__  # type: ignore[misc] # the C class's own, captured before subclassing

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        self._pyscone_lock = RLock()
        base_init(self, *args, **kwargs)

    ns: dict[str, Any] = {"__init__": init, "__module__": "io", "__qualname__": cls.__qualname__}
    for name in _BUFFERED_METHODS:
        orig = getattr(cls, name, None)
        if orig is None:
            continue

        def wrapped(self: Any, *args: Any, _orig: Any = orig, **kwargs: Any) -> Any:
            with self._pyscone_lock:
                return _orig(self, *args, **kwargs)

        wrapped.__name__ = name
        ns[name] = wrapped
    return type(cls.__name__, (cls,), ns)


def open(  # noqa: A001 - it *is* open
    file: files.Path | int,
    mode: str = "r",
    buffering: int = -1,
    encoding: str | None = None,
    errors: str | None = None,
    newline: str | None = None,
    closefd: bool = True,
    opener: Any = None,
) -> Any:
    """The builtin ``open``, over enclave file objects.  Same arguments, same errors."""
    if not isinstance(file, int):
        file = os.fspath(file)
    if not isinstance(mode, str):
        raise TypeError(f"open() argument 'mode' must be str, not {type(mode).__name__}")
    modes = set(mode)
    if modes - set("axrwb+t") or len(mode) > len(modes):
        raise ValueError(f"invalid mode: '{mode}'")
    creating, reading, writing, appending = "x" in modes, "r" in modes, "w" in modes, "a" in modes
    updating, text, binary = "+" in modes, "t" in modes, "b" in modes
    if text and binary:
        raise ValueError("can't have text and binary mode at once")
    if creating + reading + writing + appending > 1:
        raise ValueError("must have exactly one of create/read/write/append mode")
    if not (creating or reading or writing or appending):
        raise ValueError("Must have exactly one of create/read/write/append mode and at most one plus")
    if binary and encoding is not None:
        raise ValueError("binary mode doesn't take an encoding argument")
    if binary and errors is not None:
        raise ValueError("binary mode doesn't take an errors argument")
    if binary and newline is not None:
        raise ValueError("binary mode doesn't take a newline argument")
    if binary and buffering == 1:
        import warnings

        warnings.warn(
            "line buffering (buffering=1) isn't supported in binary mode, the default buffer size will be used",
            RuntimeWarning,
            2,
        )
    rawmode = ("x" if creating else "") + ("r" if reading else "") + ("w" if writing else "")
    rawmode += ("a" if appending else "") + ("+" if updating else "")
    raw = EnclaveFileIO(file, rawmode, closefd, opener=opener)
    result: Any = raw
    try:
        line_buffering = False
        if buffering == 1 or (buffering < 0 and raw.isatty()):
            buffering = -1
            line_buffering = True
        if buffering < 0:
            buffering = max(raw._blksize, io.DEFAULT_BUFFER_SIZE)
        if buffering == 0:
            if binary:
                return result
            raise ValueError("can't have unbuffered text I/O")
        raw._under_buffer = True  # only its buffer reads from it: short reads are fine
        if updating:
            buffer: Any = io.BufferedRandom(raw, buffering)
        elif creating or writing or appending:
            buffer = io.BufferedWriter(raw, buffering)
        else:
            buffer = io.BufferedReader(raw, buffering)
        result = buffer
        _buffered.add(buffer)
        if binary:
            return result
        encoding = io.text_encoding(encoding)
        text_io = io.TextIOWrapper(buffer, encoding, errors, newline, line_buffering)
        result = text_io
        _buffered.add(text_io)
        text_io.mode = mode  # type: ignore[misc]
        return result
    except BaseException:
        result.close()
        raise


def open_code(path: str) -> Any:
    if not isinstance(path, str):
        raise TypeError(f"open_code() argument 'path' must be str, not {type(path).__name__}")
    return open(path, "rb")
