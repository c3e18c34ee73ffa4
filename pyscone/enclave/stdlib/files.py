"""Files: the file functions of ``os``, over host calls (``open`` and ``io.FileIO``
are in ``fileobj``, on top of these).

Paths are made absolute in the enclave (the enclave keeps its own working
directory), so the host never resolves a relative path against a directory the
enclave did not choose, and the file-system shield can match path prefixes.

Errors caused by the app (an fd it never opened, a bad mode) are raised here,
without a host call, with the errno the stdlib would use.

An fd the app names may be a dup (``dups``): each function here takes the app's
number and works on the handle it names (``dups.resolve``).
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from pyscone.abi import MAX_FD, Op, StatResult
from pyscone.enclave import iago, scheduler
from pyscone.enclave.shields import console as console_shield
from pyscone.enclave.shields import famchan, net
from pyscone.enclave.stdlib import dups, interpose, pipes

if TYPE_CHECKING:
    from pyscone.enclave.shields.fs import FsShield

_fds = iago.fds
_cwd = "/"
_slot_data = 65536
# The file-system shield, once mounted: it serves paths in protected regions and the
# virtual fds (>= MAX_FD, numbers the host can never return) it hands out for them.
_shield: FsShield | None = None
# The enclave's umask (``os.umask``): applied to what the app creates, on the host or in the shield.
umask = 0o022

Path = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _call(
    op: int, args: tuple[int, ...] = (), data: bytes = b"", filename: object = None, **kw: Any
) -> tuple[int, Any]:
    result, err, value = scheduler.get().host_call(op, args, data, **kw)
    if result < 0:
        raise OSError(err, os.strerror(err), filename) if filename is not None else OSError(err, os.strerror(err))
    return result, value


def abspath(path: Path) -> str:
    """The normalized absolute path the enclave means by ``path``."""
    p = os.fspath(path)
    s = os.fsdecode(p) if isinstance(p, bytes) else p
    if not isinstance(s, str):
        raise TypeError(f"expected str, bytes or os.PathLike object, not {type(path).__name__}")
    if "\0" in s:
        raise ValueError("embedded null byte")
    if not s:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), p)
    return os.path.normpath(s if s.startswith("/") else os.path.join(_cwd, s))


def _enc(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _no_dir_fd(dir_fd: int | None) -> None:
    if dir_fd is not None:
        raise NotImplementedError("dir_fd unavailable on this platform")


def set_shield(shield: FsShield | None) -> None:
    global _shield
    _shield = shield


def _shielded(path: str) -> FsShield | None:
    """The shield, if it governs ``path``."""
    return _shield if _shield is not None and _shield.governs(path) else None


def _anchored(path: str) -> FsShield | None:
    """The shield, if ``path`` is a shielded region's prefix or an ancestor of one.  There the
    enclave sees a directory, never a host symlink, so ``realpath``/``Path.resolve()`` stay
    lexical (regions are decided on the lexical path) and no symlink leads out of a region."""
    return _shield if _shield is not None and _shield.anchored(path) else None


def _busy(path: str, filename: object) -> None:
    if _anchored(path):  # the way to a region: a host rename or rmdir would move or drop it
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), filename)


def _vfd(fd: int) -> FsShield | None:
    """The shield, if ``fd`` is one of its virtual fds (pipes' local fds come after them)."""
    return _shield if MAX_FD <= fd < pipes.LOCAL_BASE and _shield is not None else None


def in_shield(path: str) -> bool:
    """Whether the FS shield governs ``path`` (an absolute, normalized path)."""
    return _shielded(path) is not None


def _espipe(fd: int) -> OSError:
    """What a seek-like call on a pipe is (after EBADF for a closed one)."""
    pipes.fstat(fd)
    return OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))


def at_exit() -> None:
    """Flush what the app left open and commit the shield's files (the interpreter's exit)."""
    from pyscone.enclave.stdlib import fileobj

    fileobj.flush_all()
    if _shield is not None:
        _shield.commit_all()


# -- host operations on paths (the shield uses these for its stores) ----------------------


def host_open(p: str, flags: int, mode: int) -> int:
    fd, _ = _call(Op.OPEN, (flags, mode), _enc(p), filename=p)
    return int(fd)


def host_stat(p: str, follow: bool) -> StatResult | None:
    """The host's stat of ``p``, or ``None`` if there is nothing there."""
    try:
        return _call(Op.STAT, (int(follow),), _enc(p), filename=p)[1]  # type: ignore[no-any-return]
    except (FileNotFoundError, NotADirectoryError):
        return None


def host_fstat(fd: int) -> StatResult:
    return _call(Op.FSTAT, (fd,))[1]  # type: ignore[no-any-return]


def host_listdir(path: str) -> Iterator[tuple[str, int]]:
    start = 0
    while True:
        _, (entries, more) = _call(Op.LISTDIR, (start,), _enc(path), filename=path)
        for e in entries:
            yield e.name, e.dtype
        start += len(entries)
        if not more:
            return


def host_mkdir(p: str, mode: int) -> None:
    _call(Op.MKDIR, (mode,), _enc(p), filename=p)


def host_rmdir(p: str) -> None:
    _call(Op.RMDIR, (), _enc(p), filename=p)


def host_unlink(p: str) -> None:
    _call(Op.UNLINK, (), _enc(p), filename=p)


def host_rename(src: str, dst: str, replace: bool) -> None:
    _call(Op.RENAME, (int(replace),), _enc(src) + b"\0" + _enc(dst), filename=src)


def host_access(p: str, mode: int) -> bool:
    r, _ = _call(Op.ACCESS, (mode,), _enc(p))
    return r == 0


def host_chmod(p: str, mode: int) -> None:
    _call(Op.CHMOD, (mode,), _enc(p), filename=p)


def host_utime(p: str, args: tuple[int, int, int]) -> None:
    _call(Op.UTIME, args, _enc(p), filename=p)


def host_readlink(p: str) -> bytes:
    _, target = _call(Op.READLINK, (), _enc(p), filename=p)
    return bytes(target)


# -- os functions ------------------------------------------------------------------------


def read_whole(path: Path) -> bytes:
    """All of the file at ``path`` (imports read hundreds of small files this way).

    A host file that fits a slot takes one host call (``READFILE``) instead of ``open``,
    ``read``, ``read`` and ``close``; a bigger one, or one the shield protects, is read
    through an fd as ``open`` would.
    """
    p = abspath(path)
    first = b""
    if _shielded(p) is None:
        try:
            _, (data, more) = _call(Op.READFILE, (_slot_data,), _enc(p), filename=os.fspath(path))
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: not a regular file
                raise
        else:
            if not more:
                return bytes(data)
            first = bytes(data)
    return _read_rest(p, first)


def _read_rest(p: str, first: bytes) -> bytes:
    """``first`` (what ``READFILE`` brought) and the rest of the file, through an fd."""
    fd = os_open(p, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [first]
        offset = len(first)
        while chunk := (pread(fd, _slot_data, offset) if first else read(fd, _slot_data)):
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        close(fd)
    return b"".join(chunks)


def start_read_whole(path: str) -> Any:
    """Start :func:`read_whole` of a host file (outside the shield); :func:`finish_read_whole` ends it.

    For a reader that has other host calls to make meanwhile (imports: the source and its
    cached bytecode at once).  Returns a token, or None when the call cannot start now.
    """
    if _shielded(path) is not None:
        return None
    return scheduler.get().start(Op.READFILE, (_slot_data,), _enc(path))


def finish_read_whole(pending: Any, path: str) -> bytes:
    """The contents :func:`start_read_whole` asked for (raises what :func:`read_whole` would)."""
    if pending is None:
        return read_whole(path)
    result, err, value = scheduler.get().finish(pending)
    if result < 0:
        if err == errno.EINVAL:
            return read_whole(path)
        raise OSError(err, os.strerror(err), path)
    data, more = value
    return bytes(data) if not more else _read_rest(path, bytes(data))


#: Called after every call that may change an FS-shield file's contents or metadata, or what
#: exists in a region (writes to host files need not: nothing is kept about those): the libc
#: layer (clib.py) keeps answers about FS-shield files while none of these runs.
on_change: list[Callable[[], None]] = []
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _changes(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` may change files: the ``on_change`` hooks run after it (whatever its outcome)."""

    @functools.wraps(fn)
    def changing(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        finally:
            _changed()

    return changing


def os_open(path: Path, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    _no_dir_fd(dir_fd)
    p = abspath(path)
    mode &= ~umask
    if sh := _shielded(p):
        if not flags & (os.O_CREAT | os.O_TRUNC):
            return sh.open(p, flags, mode)
        try:
            return sh.open(p, flags, mode)
        finally:
            _changed()
    fd, _ = _call(Op.OPEN, (flags, mode), _enc(p), filename=os.fspath(path))
    return int(fd)


#: Called with each virtual fd the app closes (``fdops`` drops its ``flock`` there).
on_close: list[Callable[[int], None]] = []


def close(fd: int) -> None:
    h = dups.unname(fd)
    if h is None:
        return  # other numbers still name the open file
    if h == fd:
        close_handle(fd)
    else:
        dups.close_handle(h)


def close_handle(fd: int) -> None:
    """Close a handle (a host fd, a vfd or a pipe end) that no number names any more."""
    if pipes.is_local(fd):
        return pipes.close(fd)
    if sh := _vfd(fd):
        known = fd in sh.opens or fd in sh.dir_opens
        try:
            sh.close(fd)
        finally:
            if known:
                _fds.forget(fd)
                for hook in on_close:
                    hook(fd)
        return
    if _fds.kind(fd) == iago.FdTable.SOCKET and (conn := net.conn(fd)) is not None:
        conn.close_notify(net.HostIO(fd, 0.0))  # a C library's close: the peer sees a clean end
    # Forget the fd *before* the host closes it (Linux releases it even if close fails):
    # the host may hand the number out again at once, to a call answered before ours.
    _fds.forget(fd)
    if fd > 2:
        _call(Op.CLOSE, (fd,))


def read(fd: int, n: int) -> bytes:
    if n < 0:
        raise ValueError("negative length")
    fd = dups.resolve(fd)
    if pipes.is_local(fd):
        return pipes.read(fd, n)
    if sh := _vfd(fd):
        return sh.read(fd, n)
    if fd <= 2 and (cs := console_shield.active()) is not None:
        if fd != 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return cs.read(n)
    kind = _fds.kind(fd)
    if kind == iago.FdTable.SOCKET and (conn := net.conn(fd)) is not None:
        return conn.recv(net.HostIO(fd, 0.0 if fd in _fds.nonblocking else None), min(n, _slot_data))
    if fd in famchan.sealed:  # a socketpair that crossed a fork
        return famchan.sock_recv(fd, min(n, _slot_data), 0.0 if fd in _fds.nonblocking else None)
    # A socket with O_NONBLOCK (a C library's, set with fcntl) answers EAGAIN, as in Linux.
    wait = kind != iago.FdTable.FILE and fd not in _fds.nonblocking
    _, data = _call(Op.READ, (fd, min(n, _slot_data)), wait=wait)
    return bytes(data)


def _changed() -> None:
    for hook in on_change:
        hook()


def write(fd: int, data: bytes | bytearray | memoryview) -> int:
    fd = dups.resolve(fd)
    if pipes.is_local(fd):
        return pipes.write(fd, data)
    if sh := _vfd(fd):
        try:  # (only an FS-shield file's change matters to on_change: see its comment)
            return sh.write(fd, data)
        finally:
            _changed()
    if fd <= 2 and (cs := console_shield.active()) is not None:
        return cs.write(fd, data)
    kind = _fds.kind(fd)
    view = memoryview(data).cast("B")[:_slot_data]
    if kind == iago.FdTable.SOCKET and (conn := net.conn(fd)) is not None:
        return conn.send(net.HostIO(fd, 0.0 if fd in _fds.nonblocking else None), bytes(view))
    if fd in famchan.sealed:
        return famchan.sock_send(fd, view, 0.0 if fd in _fds.nonblocking else None)
    n, _ = _call(Op.WRITE, (fd,), bytes(view), wait=kind != iago.FdTable.FILE and fd not in _fds.nonblocking)
    return int(n)


def pread(fd: int, n: int, offset: int) -> bytes:
    if n < 0:
        raise ValueError("negative length")
    fd = dups.resolve(fd)
    if pipes.is_local(fd):
        raise _espipe(fd)
    if fd <= 2 and console_shield.active():  # records are a stream
        raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))
    if sh := _vfd(fd):
        return sh.pread(fd, n, offset)
    _fds.kind(fd)
    _, data = _call(Op.PREAD, (fd, min(n, _slot_data), offset))
    return bytes(data)


def pwrite(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    fd = dups.resolve(fd)
    if pipes.is_local(fd):
        raise _espipe(fd)
    if fd <= 2 and console_shield.active():  # records are a stream
        raise OSError(errno.ESPIPE, os.strerror(errno.ESPIPE))
    if sh := _vfd(fd):
        try:
            return sh.pwrite(fd, data, offset)
        finally:
            _changed()
    _fds.kind(fd)
    n, _ = _call(Op.PWRITE, (fd, offset), bytes(memoryview(data).cast("B")[:_slot_data]))
    return int(n)


def lseek(fd: int, pos: int, how: int) -> int:
    fd = dups.resolve(fd)
    if pipes.is_local(fd):
        raise _espipe(fd)
    if sh := _vfd(fd):
        return sh.lseek(fd, pos, how)
    _fds.kind(fd)
    r, _ = _call(Op.LSEEK, (fd, pos, how))
    return int(r)


def fstat(fd: int) -> os.stat_result:
    return _stat(fd, True).to_os()  # type: ignore[return-value]


def _stat(path: Path | int, follow: bool) -> StatResult:
    if isinstance(path, int):
        path = dups.resolve(path)
        if pipes.is_local(path):
            return pipes.fstat(path)
        if sh := _vfd(path):
            return sh.fstat(path)
        _fds.kind(path)
        return _call(Op.FSTAT, (path,))[1]  # type: ignore[no-any-return]
    p = abspath(path)
    if sh := _shielded(p):
        return sh.stat(p, follow)
    if sh := _anchored(p):
        return sh.anchor_stat(p)
    return _call(Op.STAT, (int(follow),), _enc(p), filename=os.fspath(path))[1]  # type: ignore[no-any-return]


def stat(path: Path | int, *, dir_fd: int | None = None, follow_symlinks: bool = True) -> os.stat_result:
    _no_dir_fd(dir_fd)
    return _stat(path, follow_symlinks).to_os()  # type: ignore[return-value]


def lstat(path: Path, *, dir_fd: int | None = None) -> os.stat_result:
    _no_dir_fd(dir_fd)
    return _stat(path, False).to_os()  # type: ignore[return-value]


def listdir(path: Path | None = None) -> list[Any]:
    """``os.listdir`` (the import system lists directories through here)."""
    from pyscone.enclave.stdlib import fsmeta

    return fsmeta.listdir(path)


@_changes
def mkdir(path: Path, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
    _no_dir_fd(dir_fd)
    p = abspath(path)
    mode &= ~umask
    if sh := _shielded(p):
        return sh.mkdir(p, mode)
    _call(Op.MKDIR, (mode,), _enc(p), filename=os.fspath(path))


@_changes
def rmdir(path: Path, *, dir_fd: int | None = None) -> None:
    _no_dir_fd(dir_fd)
    p = abspath(path)
    if sh := _shielded(p):
        return sh.rmdir(p)
    _busy(p, os.fspath(path))
    _call(Op.RMDIR, (), _enc(p), filename=os.fspath(path))


@_changes
def unlink(path: Path, *, dir_fd: int | None = None) -> None:
    _no_dir_fd(dir_fd)
    p = abspath(path)
    if sh := _shielded(p):
        return sh.unlink(p)
    _call(Op.UNLINK, (), _enc(p), filename=os.fspath(path))


@_changes
def _rename(src: Path, dst: Path, replace: bool) -> None:
    s, d = abspath(src), abspath(dst)
    if _shield is not None and (_shield.governs(s) or _shield.governs(d)):
        try:
            return _shield.rename(s, d)
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.fspath(src), None, os.fspath(dst)) from None
    _busy(s, os.fspath(src))
    _busy(d, os.fspath(dst))
    _call(Op.RENAME, (int(replace),), _enc(s) + b"\0" + _enc(d), filename=os.fspath(src))


def rename(src: Path, dst: Path, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    _no_dir_fd(src_dir_fd or dst_dir_fd)
    _rename(src, dst, False)


def replace(src: Path, dst: Path, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
    _no_dir_fd(src_dir_fd or dst_dir_fd)
    _rename(src, dst, True)


def fsync(fd: Any, *, data_only: bool = False) -> None:
    """``os.fsync``; ``data_only``: ``os.fdatasync`` (a protected file commits either way)."""
    fd = dups.resolve(fd if isinstance(fd, int) else fd.fileno())
    if pipes.is_local(fd):
        pipes.fstat(fd)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if sh := _vfd(fd):
        return sh.fsync(fd)
    _fds.kind(fd)
    _call(Op.FSYNC, (fd, int(data_only)))


def fdatasync(fd: Any) -> None:
    fsync(fd, data_only=True)


def ftruncate(fd: int, length: int) -> None:
    fd = dups.resolve(fd)
    if pipes.is_local(fd):
        pipes.fstat(fd)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if sh := _vfd(fd):
        try:
            return sh.ftruncate(fd, length)
        finally:
            _changed()
    _fds.kind(fd)
    _call(Op.FTRUNCATE, (fd, length))


def truncate(path: Path | int, length: int) -> None:
    if isinstance(path, int):
        ftruncate(path, length)
        return
    fd = os_open(path, os.O_WRONLY)
    try:
        ftruncate(fd, length)
    finally:
        close(fd)


def access(
    path: Path, mode: int, *, dir_fd: int | None = None, effective_ids: bool = False, follow_symlinks: bool = True
) -> bool:
    _no_dir_fd(dir_fd)
    p = abspath(path)
    if sh := _shielded(p):
        return sh.access(p, mode)
    return host_access(p, mode)


@_changes
def chmod(path: Path, mode: int, *, dir_fd: int | None = None, follow_symlinks: bool = True) -> None:
    _no_dir_fd(dir_fd)
    p = abspath(path)
    if sh := _shielded(p):
        return sh.chmod(p, mode)
    _call(Op.CHMOD, (mode,), _enc(p), filename=os.fspath(path))


@_changes
def utime(
    path: Path,
    times: tuple[float, float] | None = None,
    *,
    ns: tuple[int, int] | None = None,
    dir_fd: int | None = None,
    follow_symlinks: bool = True,
) -> None:
    _no_dir_fd(dir_fd)
    if times is not None and ns is not None:
        raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
    if times is not None:
        ns = (int(times[0] * 1e9), int(times[1] * 1e9))
    args = (1, ns[0], ns[1]) if ns is not None else (0, 0, 0)
    if isinstance(path, int):  # futimens (gunicorn's worker heartbeat is one)
        fd = dups.resolve(path)
        if pipes.is_local(fd) or _vfd(fd):
            raise OSError(
                errno.ENOSYS, "os.utime of an open protected file or pipe is not supported inside a pyscone enclave"
            )
        _fds.kind(fd)
        _call(Op.FUTIME, (fd, *args))
        return None
    p = abspath(path)
    if sh := _shielded(p):
        return sh.utime(p, args)
    _call(Op.UTIME, args, _enc(p), filename=os.fspath(path))


def readlink(path: Path, *, dir_fd: int | None = None) -> Any:
    _no_dir_fd(dir_fd)
    raw = os.fspath(path)
    p = abspath(raw)
    if sh := _shielded(p):
        target = sh.readlink(p)
    elif sh := _anchored(p):
        sh.anchor_stat(p)  # it exists (a directory), and is no link
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), raw)
    else:
        target = host_readlink(p)
    return bytes(target) if isinstance(raw, bytes) else bytes(target).decode("utf-8", "surrogateescape")


def symlink(src: Path, dst: Path, target_is_directory: bool = False, *, dir_fd: int | None = None) -> None:
    _no_dir_fd(dir_fd)
    s = os.fsdecode(os.fspath(src))  # a link target is stored as given, not made absolute
    d = abspath(dst)
    if sh := _shielded(d):
        return sh.symlink(d)
    _call(Op.SYMLINK, (), _enc(s) + b"\0" + _enc(d), filename=os.fspath(dst))


def isatty(fd: int) -> bool:
    try:
        fd = dups.resolve(fd)
    except OSError:
        return False
    if _vfd(fd) or pipes.is_local(fd):
        return False
    try:
        _fds.kind(fd)
    except OSError:
        return False
    r, _ = _call(Op.ISATTY, (fd,))
    return bool(r)


def getcwd() -> str:
    return _cwd


def getcwdb() -> bytes:
    return os.fsencode(_cwd)


def chdir(path: Path) -> None:
    global _cwd
    p = abspath(path)
    st = _stat(p, True)
    if not stat_mod.S_ISDIR(st.mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fspath(path))
    _cwd = p


def install(cwd: str, slot_data: int) -> None:
    """Replace the file functions of ``os``, ``io`` and ``builtins``."""
    import builtins
    import shutil

    from pyscone.enclave.stdlib import fileobj, fsmeta

    global _cwd, _slot_data
    _cwd = os.path.normpath(cwd)
    _slot_data = slot_data
    interpose(
        os, open=os_open, close=close, read=read, write=write, pread=pread, pwrite=pwrite, lseek=lseek,
        fstat=fstat, stat=stat, lstat=lstat, mkdir=mkdir, rmdir=rmdir,
        unlink=unlink, remove=unlink, rename=rename, replace=replace, fsync=fsync, fdatasync=fdatasync,
        ftruncate=ftruncate, truncate=truncate, access=access, chmod=chmod, utime=utime, readlink=readlink,
        symlink=symlink, isatty=isatty, getcwd=getcwd, getcwdb=getcwdb, chdir=chdir,
        # No dir_fd support: stdlib code (shutil.rmtree, os.fwalk) then takes its path-based route.
        supports_dir_fd=set(), supports_fd={stat, truncate}, supports_effective_ids=set(),
        supports_follow_symlinks={stat, access, chmod, utime},
    )  # fmt: skip
    fsmeta.install()
    for name in ("BufferedReader", "BufferedWriter", "BufferedRandom", "BufferedRWPair"):
        interpose(io, **{name: fileobj.lthread_safe(getattr(io, name))})
    interpose(io, open=fileobj.open, open_code=fileobj.open_code, FileIO=fileobj.EnclaveFileIO)
    interpose(builtins, open=fileobj.open)
    import tokenize

    interpose(tokenize, _builtin_open=fileobj.open)  # linecache reads sources through it
    interpose(shutil, _USE_CP_SENDFILE=False, _use_fd_functions=False)
