"""The libc layer's Python side: what C libraries' ``open``, ``read``, ``fcntl``... become.

Theory of operation
-------------------
``pyscone/enclave/clib/shim.c`` (built at install, preloaded by the launcher, measured
like every mapped library) stands in front of the C library's file entry points for
every shared library in the process.  Once :func:`arm` has registered :func:`_dispatch`
(after lockdown), a call from a C library (SQLite's unix VFS, say) arrives here as
``(call, a, b, c, p, q)`` and is carried out by the Python layer (``files``, ``fdops``,
the FS shield): the same code, Iago checks and shields as the app's own ``open``.  The
result goes back as a number, an ``OSError`` as ``-errno``.

How a call from C may wait.  It arrives inside the lthread that called into the library,
with C frames (and possibly C locks: SQLite's connection and VFS mutexes) on the stack.
Switching to another lthread there could let that one enter the same library and block
on a mutex the parked lthread holds, which on one OS thread is a deadlock of the whole
enclave.  So a call from C never parks on the host: :func:`_dispatch` puts the scheduler
in sync mode for its duration, and each host call waits in place for its own reply
(replies for other lthreads are still collected and wake them afterwards).  It can still
park where the Python layer waits for another lthread (an FS-shield lock held by an
lthread doing Python-level I/O on the same file, a contended ``flock``); blocking lock
requests from C (``F_SETLKW``) are therefore tried once and answer ``ENOLCK`` if the lock
is held elsewhere, rather than waiting.

Finalizers.  The cyclic garbage collector does not run during a call from C (the shim turns
it off, with the GIL held, before ctypes allocates anything for the call).  A collection there
could run a finalizer that closes a forgotten ``sqlite3`` connection, and SQLite closes a file
under its global VFS mutex, which it also holds around some of the calls that arrive here (the
``fstat`` after an ``open``): on one OS thread, a deadlock.  Collection resumes when the call
returns, in the app's own code.

Threads.  The shim refuses calls from any OS thread but the enclave's (EPERM, counted by
``pyscone_shim_foreign_calls``): the rings have a single producer and the scheduler one
thread.  A C library that does I/O from a thread it started before lockdown meets the
same refusal as it met at the barrier before this layer existed.

Stdio.  glibc's ``FILE`` calls its own internal ``read``/``write``, past the shim, so the
shim's ``fopen``/``fopen64``/``fdopen`` build the ``FILE`` with ``fopencookie``: its
callbacks are the calls ``C_READ``, ``C_WRITE``, ``C_LSEEK`` and ``C_CLOSE`` handled here,
on the enclave fd (numpy's ``tofile``/``fromfile`` ``fdopen`` a dup of the Python file's).
``fileno`` of such a ``FILE`` is that fd.  Not covered: ``freopen``, ``tmpfile``, and the
process's own ``stdin``/``stdout``/``stderr`` (glibc's, on the console fds: refused).

Sockets and poll.  C libraries' client (and listening) sockets, ``poll`` and ``getaddrinfo``
go to the Python layer's socket code: see :mod:`pyscone.enclave.stdlib.clibnet`, which says
where each function belongs.  A blocking one waits in place (above): the enclave's other
lthreads stall meanwhile; non-blocking sockets (libpq's) answer ``EAGAIN`` at once.

What is not covered fails closed as before: ``mmap`` of a file (but SQLite's WAL
index of a shielded database, see :func:`_mmap`), ``*at`` calls relative to a directory fd,
the console fds 0..2 (the console shield's), and the interpreter's own libc calls (the
Python layer interposes those one level up).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import struct
import sys
from collections.abc import Callable

from pyscone.enclave import iago, loader, scheduler
from pyscone.enclave.stdlib import clibnet, dups, fdops, files

_SHIM_ABI = 2
_AT_FDCWD = -100
_O_LARGEFILE = 0o100000  # x86-64: what glibc's open64 adds; the Python layer's files are 64-bit anyway
# struct flock as fdops reads it (l_type, l_whence, l_start, l_len, l_pid).
_FLOCK = struct.Struct("hhqqi")
_F_OFD_GETLK, _F_OFD_SETLK, _F_OFD_SETLKW = 36, 37, 38


class Call(enum.IntEnum):
    """The shim's call numbers (the ``enum`` in shim.h: keep the two in step)."""

    OPEN = 1
    CLOSE = 2
    READ = 3
    WRITE = 4
    PREAD = 5
    PWRITE = 6
    LSEEK = 7
    FSTAT = 8
    STAT = 9
    FSYNC = 10
    FTRUNCATE = 11
    FCNTL = 12
    UNLINK = 13
    ACCESS = 14
    MKDIR = 15
    RMDIR = 16
    GETCWD = 17
    READLINK = 18
    FCHMOD = 19
    FCHOWN = 20
    OPENAT = 21
    MMAP = 22
    RENAME = 23
    FLOCK = 24
    SOCKET = 25
    # Sockets and poll (clibnet.py; 26..45 are theirs).
    CONNECT = 26
    SEND = 27
    RECV = 28
    SENDTO = 29
    RECVFROM = 30
    GETSOCKOPT = 31
    SETSOCKOPT = 32
    GETSOCKNAME = 33
    GETPEERNAME = 34
    SHUTDOWN = 35
    POLL = 36
    GETADDRINFO = 37
    BIND = 38
    LISTEN = 39
    ACCEPT = 40
    SOCKETPAIR = 41
    UNCOVERED = 42
    DUP = 46


_DISPATCH = ctypes.CFUNCTYPE(
    ctypes.c_longlong, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p,
    ctypes.c_void_p,
)  # fmt: skip

#: The paths of the fds C libraries opened (which file an ``mmap`` is of).
_opened: dict[int, bytes] = {}
#: Paths whose refused ``mmap`` was already explained on stderr.
_explained: set[bytes] = set()
_lib: ctypes.CDLL | None = None
_callback: object = None  # the ctypes function object: kept alive as long as the shim may call it


def prepare() -> bool:
    """Before lockdown: bind the preloaded shim and build the callback.

    Returns False when the shim is not in the process (the launcher did not preload it,
    or it was not built): C libraries' I/O then meets the barrier, as without this layer.
    Nothing is mapped here: the shim is only looked up (``RTLD_NOLOAD``).
    """
    global _lib, _callback
    path = loader.shim_path(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return False
    if lib.pyscone_shim_abi() != _SHIM_ABI:
        raise RuntimeError(f"{path} speaks shim ABI {lib.pyscone_shim_abi()}, the runtime {_SHIM_ABI}")
    if lib.pyscone_shim_prepare() <= 0:
        raise RuntimeError(f"{path}: the interpreter's code cannot be located")
    lib.pyscone_shim_arm.argtypes = [_DISPATCH]
    lib.pyscone_shim_arm.restype = None
    lib.pyscone_shim_foreign_calls.restype = ctypes.c_ulong
    lib.pyscone_shim_fast_answers.restype = lib.pyscone_shim_dispatched.restype = ctypes.c_ulong
    lib.pyscone_shim_local.argtypes = lib.pyscone_shim_forget.argtypes = [ctypes.c_int]
    lib.pyscone_shim_local.restype = lib.pyscone_shim_forget.restype = None
    _lib, _callback = lib, _DISPATCH(_dispatch)
    generation = ctypes.c_uint64.in_dll(lib, "pyscone_shim_gen")

    def changed() -> None:
        generation.value += 1

    files.on_change.append(changed)
    files.on_close.append(lib.pyscone_shim_forget)
    return True


def arm() -> None:
    """After lockdown: route C libraries' file calls to :func:`_dispatch` from now on."""
    if _lib is not None:
        _lib.pyscone_shim_arm(_callback)


def console_streams() -> None:
    """The console shield is on: C stdio's ``stdout``/``stderr`` become streams into it.

    Raises:
        RuntimeError: the shim could not make them (out of memory).
    """
    if _lib is not None and _lib.pyscone_shim_console() != 0:
        raise RuntimeError("the libc layer could not route C stdio's stdout and stderr to the console shield")


def active() -> bool:
    """Whether C libraries' file calls (and their stdio) go through this layer once armed."""
    return _lib is not None


def foreign_calls() -> int:
    """How many calls the shim refused because another OS thread made them."""
    return int(_lib.pyscone_shim_foreign_calls()) if _lib is not None else 0


def fast_answers() -> int:
    """How many calls from C the shim answered from the runtime's earlier answers."""
    return int(_lib.pyscone_shim_fast_answers()) if _lib is not None else 0


def dispatched() -> int:
    """How many calls from C went to :func:`_dispatch`."""
    return int(_lib.pyscone_shim_dispatched()) if _lib is not None else 0


# -- the dispatch --------------------------------------------------------------------------


def _dispatch(call: int, a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    """One call from C: its result, or ``-errno``.  Never raises (there is C below us)."""
    handler = _BY_NUMBER[call] if 0 <= call < len(_BY_NUMBER) else None
    if handler is None:
        return -errno.ENOSYS
    try:
        sched = scheduler.get()
        was, sched.sync = sched.sync, True  # wait in place: see "How a call from C may wait"
        try:
            return handler(a, b, c, p, q)
        finally:
            sched.sync = was
    except iago.HostViolation as e:  # (iago stops the enclave itself; this is for any other raiser)
        iago.fail_stop(str(e))
    except OSError as e:
        return -(e.errno or errno.EIO)
    except (ValueError, TypeError, OverflowError):
        return -errno.EINVAL
    except BaseException as e:  # noqa: BLE001 - ^C or an exit while C waits: keep it for Python
        if isinstance(e, KeyboardInterrupt | SystemExit):
            scheduler.get().request_interrupt(e)
        return -errno.EIO


def _path(p: int | None) -> bytes:
    if not p:
        raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
    return ctypes.string_at(p)


def _view(p: int | None, n: int) -> memoryview:
    """The caller's buffer at ``p`` (no copy)."""
    if not p and n:
        raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
    return memoryview((ctypes.c_char * n).from_address(p or 0)).cast("B") if n else memoryview(b"")


def _out(q: int | None, data: bytes) -> int:
    if data:
        if not q:
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        ctypes.memmove(q, data, len(data))
    return len(data)


def _stat_out(q: int | None, st: os.stat_result) -> int:
    if not q:
        raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
    fields = (ctypes.c_longlong * 13).from_address(q)
    fields[:] = [
        st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, getattr(st, "st_rdev", 0),
        st.st_size, getattr(st, "st_blksize", 4096), getattr(st, "st_blocks", 0),
        st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns,
    ]  # fmt: skip
    return 0


def _open(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    path = _path(p)
    fd = files.os_open(path, a & ~_O_LARGEFILE, b)
    _opened[fd] = path
    if _lib is not None and files._vfd(fd) is not None and fdops.posix_locks_local(fd):
        # An FS-shield file: no other process opens it (its host file is sealed), so its locks
        # and what it says are this enclave's alone: the shim may answer them itself.
        _lib.pyscone_shim_local(fd)
    if os.path.basename(path).startswith(b"etilqs_") and files._shield is not None:
        _warn_temp(path)
    return fd


def _warn_temp(path: bytes) -> None:
    """SQLite's temporary files go to the first of $SQLITE_TMPDIR, $TMPDIR, /var/tmp, /usr/tmp,
    /tmp that exists: with an FSPF mounted, say once if that is outside the shield (its pages,
    possibly a protected database's rows, then reach the host in plaintext)."""
    full = files.abspath(path)
    if files.in_shield(full) or b"etilqs_" in _explained:
        return
    _explained.add(b"etilqs_")
    print(
        f"pyscone: warning: SQLite writes its temporary file {full} on an unprotected path; use PRAGMA "
        "temp_store=memory, or --env SQLITE_TMPDIR=<a directory in an FS-shield region>",
        file=sys.stderr,
        flush=True,
    )


def _openat(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    if c != _AT_FDCWD and not _path(p).startswith(b"/"):
        # Not covered (docs/runtime.md): the Python layer has no directory fds to resolve against.
        raise OSError(errno.ENOSYS, "openat relative to a directory fd is not supported inside a pyscone enclave")
    return _open(a, b, c, p, q)


def _close(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    _opened.pop(a, None)
    files.close(a)
    return 0


def _mmap(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    """May the shim serve a mapping of fd ``a`` from enclave memory?

    Only for SQLite's WAL index (``*-shm``) of a database the FS shield protects: no other
    process can open that database (its host files are sealed), so the index, which only
    coordinates the connections of one machine, may live in this process alone and never
    reach the host.  A ``-shm`` on the host may be shared with other processes, and any other
    file mapping would not see later writes: both stay refused (ENODEV), explained once.
    """
    path = _opened.get(a)
    if path is not None and path.endswith(b"-shm") and files._vfd(a) is not None:
        return 0
    what = path or b"fd %d" % a
    if what not in _explained:
        _explained.add(what)
        hint = ""
        if what.endswith(b"-shm"):
            hint = " (SQLite's WAL mode works in FS-shield regions, or with PRAGMA locking_mode=EXCLUSIVE)"
        message = f"pyscone: a C library maps {os.fsdecode(what)}, which the enclave cannot map: refused{hint}"
        print(message, file=sys.stderr, flush=True)
    return -errno.ENODEV


def _read(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    return _out(q, files.read(a, b))


def _write(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    return files.write(a, _view(p, b))


def _pread(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    return _out(q, files.pread(a, b, c))


def _pwrite(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    return files.pwrite(a, _view(p, b), c)


def _lseek(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    return files.lseek(a, b, c)


def _fstat(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    return _stat_out(q, files.fstat(a))


def _stat(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    path = _path(p)
    try:
        return _stat_out(q, files.stat(path) if a else files.lstat(path))
    except FileNotFoundError:
        if q and path.startswith(b"/") and files.in_shield(files.abspath(path)):
            # What exists there is the FSPF's to say, and only this enclave changes that: the
            # shim may say ENOENT again until a change (files.on_change) ends it.
            (ctypes.c_longlong * 13).from_address(q)[0] = 1
        raise


def _fsync(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    files.fsync(a)
    return 0


def _ftruncate(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    files.ftruncate(a, b)
    return 0


def _fcntl(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    if b in (fcntl.F_GETLK, _F_OFD_GETLK):
        return _getlk(a, q)
    if b in (fcntl.F_SETLK, fcntl.F_SETLKW, _F_OFD_SETLK, _F_OFD_SETLKW):
        if not q:
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        lk = (ctypes.c_longlong * 5).from_address(q)
        lock = _FLOCK.pack(lk[0], lk[1], lk[2], lk[3], 0)
        try:
            # Never the waiting form from C (fdops would park this lthread between retries).
            fdops.fcntl_(a, fcntl.F_SETLK, lock)
        except OSError as e:
            if b in (fcntl.F_SETLKW, _F_OFD_SETLKW) and e.errno in (errno.EAGAIN, errno.EACCES):
                raise OSError(errno.ENOLCK, "a blocking lock request from C cannot wait in the enclave") from None
            raise
        return 0
    return int(fdops.fcntl_(a, b, c))


def _getlk(fd: int, q: int | None) -> int:
    """``F_GETLK``: who would block this lock?  (``fdops`` refuses it; SQLite needs it.)

    On the FS shield's files and on sockets and pipes nothing else can hold a lock (one
    enclave process, in which POSIX locks never conflict), so the answer is ``F_UNLCK``.
    On a host file the question goes to the host as a non-blocking lock of the same range,
    undone at once when granted.  That is exact for a range this process holds no lock on
    (the only ranges SQLite asks about); on a range it does hold, the undo would drop its
    own lock, as POSIX unlocking does.
    """
    if not q:
        raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
    lk = (ctypes.c_longlong * 5).from_address(q)
    kind = fdops._kind(fd)
    if lk[0] not in (fcntl.F_RDLCK, fcntl.F_WRLCK) or lk[1] not in (0, 1, 2):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if kind == "file":
        lock = _FLOCK.pack(lk[0], lk[1], lk[2], lk[3], 0)
        try:
            fdops.fcntl_(fd, fcntl.F_SETLK, lock)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            lk[4] = -1  # held by another process, which the enclave cannot name
            return 0
        fdops.fcntl_(fd, fcntl.F_SETLK, _FLOCK.pack(fcntl.F_UNLCK, lk[1], lk[2], lk[3], 0))
    lk[0] = fcntl.F_UNLCK
    return 0


def _unlink(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    files.unlink(_path(p))
    return 0


def _access(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    path = _path(p)
    if files.access(path, a):
        return 0
    if a == os.F_OK:
        return -errno.ENOENT
    try:
        files.stat(path)
    except OSError as e:
        return -(e.errno or errno.ENOENT)
    return -errno.EACCES


def _mkdir(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    files.mkdir(_path(p), a)
    return 0


def _rmdir(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    files.rmdir(_path(p))
    return 0


def _getcwd(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    cwd = files.getcwdb() + b"\0"
    if len(cwd) > a:
        return -errno.ERANGE
    return _out(q, cwd)


def _readlink(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    target = bytes(files.readlink(_path(p)))
    return _out(q, target[:a])


def _rename(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    files.replace(_path(p), _path(q))  # rename(2) replaces an existing target
    return 0


def _flock(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    try:
        fdops.flock(a, b | fcntl.LOCK_NB)  # never the waiting form from C (see F_SETLKW)
    except OSError as e:
        if not b & fcntl.LOCK_NB and e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            raise OSError(errno.ENOLCK, "a blocking lock request from C cannot wait in the enclave") from None
        raise
    return 0


def _dup(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    # dup(2) clears FD_CLOEXEC on the new number; its path follows it (for _mmap's question).
    fd = dups.dup(a, inheritable=True)
    if a in _opened:
        _opened[fd] = _opened[a]
    return fd


def _unsupported(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    # fchmod/fchown: the Python layer has no fd-based mode or owner change (SQLite ignores
    # the result of both: it only tries to keep a journal's owner and mode like the database's).
    return -errno.ENOSYS


_Handler = Callable[[int, int, int, int | None, int | None], int]
_HANDLERS: dict[Call, _Handler] = {
    Call.OPEN: _open, Call.OPENAT: _openat, Call.CLOSE: _close, Call.READ: _read, Call.WRITE: _write,
    Call.PREAD: _pread, Call.PWRITE: _pwrite, Call.LSEEK: _lseek, Call.FSTAT: _fstat, Call.STAT: _stat,
    Call.FSYNC: _fsync, Call.FTRUNCATE: _ftruncate, Call.FCNTL: _fcntl, Call.UNLINK: _unlink,
    Call.ACCESS: _access, Call.MKDIR: _mkdir, Call.RMDIR: _rmdir, Call.GETCWD: _getcwd,
    Call.READLINK: _readlink, Call.FCHMOD: _unsupported, Call.FCHOWN: _unsupported, Call.MMAP: _mmap,
    Call.RENAME: _rename, Call.FLOCK: _flock,
    Call.SOCKET: clibnet.socket_, Call.SOCKETPAIR: clibnet.socketpair_, Call.CONNECT: clibnet.connect,
    Call.BIND: clibnet.bind, Call.LISTEN: clibnet.listen, Call.ACCEPT: clibnet.accept, Call.SEND: clibnet.send,
    Call.SENDTO: clibnet.sendto, Call.RECV: clibnet.recv, Call.RECVFROM: clibnet.recvfrom,
    Call.GETSOCKOPT: clibnet.getsockopt, Call.SETSOCKOPT: clibnet.setsockopt,
    Call.GETSOCKNAME: clibnet.getsockname, Call.GETPEERNAME: clibnet.getpeername,
    Call.SHUTDOWN: clibnet.shutdown, Call.POLL: clibnet.poll, Call.GETADDRINFO: clibnet.getaddrinfo_,
    Call.UNCOVERED: clibnet.uncovered, Call.DUP: _dup,
}  # fmt: skip
# Indexed by call number: the lookup runs on every call from C.
_BY_NUMBER: list[_Handler | None] = [None] * (max(Call) + 1)
for _call, _handler in _HANDLERS.items():
    _BY_NUMBER[_call] = _handler
