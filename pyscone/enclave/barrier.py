"""The enclave barrier: after boot, every direct system call that could touch a
file, a socket or another process fails closed with EPERM.

Without SGX the enclave is an ordinary process, so an I/O path the runtime does
not interpose (a C extension calling ``open(2)``, ``ctypes`` calling ``socket(2)``)
would silently reach the host.  The barrier turns such a leak into an error.
It is a libseccomp filter whose default action is ``ERRNO(EPERM)`` and whose
allowlist is memory management, signals, clocks, randomness, and the three
descriptors the syscall client needs (argument-filtered): ``read`` on the
enclave's doorbell, ``write`` on the host's doorbell and ``epoll_wait`` on the
client's epoll set.

We bind libseccomp (the library made for the job) through ``ctypes`` directly:
five functions, typed here, rather than a stale third-party shim; Debian's
``python3-seccomp`` is built for Debian's own interpreter only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import resource
import signal
from collections.abc import Sequence

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7
SCMP_FLTATR_CTL_TSYNC = 4
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
#: glibc's fork(): CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD.
FORK_FLAGS = 0x01000000 | 0x00200000 | signal.SIGCHLD


def SCMP_ACT_ERRNO(err: int) -> int:  # noqa: N802 - libseccomp's name
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


#: System calls the enclave may make with any arguments, and why.
ALLOWED = (
    # memory: the interpreter's allocator and greenlet stacks
    "brk", "munmap", "mremap", "madvise", "mprotect",
    # threads' futexes (the GIL, even single-threaded) and libc's thread bookkeeping
    "futex", "set_robust_list", "rseq", "sched_yield",
    # signals: Python installs handlers; SIGINT becomes KeyboardInterrupt in the main lthread
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    # leaving
    "exit", "exit_group",
    # randomness and time: os.urandom, time.*
    "getrandom", "clock_gettime", "clock_getres", "gettimeofday", "clock_nanosleep", "nanosleep",
    # identity of this process only (no other process can be reached)
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "uname",
)  # fmt: skip


class BarrierError(RuntimeError):
    pass


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise BarrierError(f"libseccomp is not installed ({e}); install libseccomp2 or run with --no-barrier") from e
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]  # fmt: skip
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    return lib


def _fd_is(arg: int, fd: int) -> _ArgCmp:
    # Compare the low 32 bits: an ``int`` argument's upper register half is undefined.
    return _ArgCmp(arg, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, fd & 0xFFFFFFFF)


def lockdown(*, read_fds: Sequence[int], write_fds: Sequence[int], epoll_fds: Sequence[int]) -> None:
    """Install the filter for the rest of this process's life (and its forked children's).  Irreversible.

    Args:
        read_fds: the only descriptors ``read(2)`` may use (the enclave's doorbells: its own lane's
            and the spare lanes' its forked children will use).
        write_fds: the only descriptors ``write(2)`` may use (the host's doorbells, likewise).
        epoll_fds: the only epoll sets ``epoll_wait(2)`` may wait on (one per lane).

    Besides those, a process may fork (``clone`` with exactly glibc's fork flags: no thread, no
    shared memory, no new namespace), wait for its own children (``wait4``, ``waitid``) and ask
    to die with its parent (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): a forked child is an enclave
    of the family under this same filter (seccomp filters are inherited and cannot be lifted).

    Raises:
        BarrierError: libseccomp is missing or refused the filter.
    """
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO(errno.EPERM))
    if not ctx:
        raise BarrierError("seccomp_init failed")
    try:
        # Filter every thread of the process, not just this one: a C extension may have
        # started threads before lockdown, and they must not keep an open door.
        if lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_TSYNC, 1) < 0:
            raise BarrierError("seccomp cannot synchronise the filter across threads")

        def rule(name: str, *cmps: _ArgCmp) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return  # not on this architecture
            arr = (_ArgCmp * len(cmps))(*cmps) if cmps else None
            rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, len(cmps), arr)
            if rc < 0:
                raise BarrierError(f"seccomp rule for {name} failed: {-rc}")

        for name in ALLOWED:
            rule(name)
        # mmap only anonymous memory (fd == -1): no file can be mapped in.
        rule("mmap", _fd_is(4, -1))
        for fd in read_fds:
            rule("read", _fd_is(0, fd))
        for fd in write_fds:
            rule("write", _fd_is(0, fd))
        for fd in epoll_fds:
            for name in ("epoll_wait", "epoll_pwait", "epoll_pwait2"):
                rule(name, _fd_is(0, fd))
        # fork(2) as glibc makes it, and nothing else clone can do (threads use clone3: refused).
        rule("clone", _ArgCmp(0, SCMP_CMP_EQ, FORK_FLAGS, 0))
        rule("wait4")
        rule("waitid")
        rule("prctl", _ArgCmp(0, SCMP_CMP_EQ, PR_SET_PDEATHSIG, 0), _ArgCmp(1, SCMP_CMP_EQ, signal.SIGKILL, 0))
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise BarrierError(f"seccomp_load failed: {-rc}")
    finally:
        lib.seccomp_release(ctx)


#: What the runtime needs beyond what it already uses when the limit is set (lockdown,
#: the scheduler, the app's first frames), so that a too-small heap is refused up front.
#: Measured: an empty program in a venv with numpy, pandas and Pillow mapped needed about
#: 60 MiB more than VmData at this point (an allocator arena for the first lthread's frames
#: among it), so less than this made a MemoryError at the app's first line.
HEAP_HEADROOM = 64 << 20


def set_heap_limit(limit: int) -> None:
    """Bound the enclave's private memory (like SCONE_HEAP): beyond it, MemoryError.

    Raises:
        BarrierError: the limit is below what the enclave already uses (plus headroom).
    """
    _lib()  # libseccomp is mapped now: under a small limit it could not be later
    used = _data_in_use()
    if limit < used + HEAP_HEADROOM:
        need = -(-(used + HEAP_HEADROOM) // (1 << 20))
        raise BarrierError(f"--heap {_size(limit)} is too small: the enclave needs at least {need}M to start")
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _data_in_use() -> int:
    """The process's RLIMIT_DATA usage now (VmData), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def no_dump() -> None:
    """PR_SET_DUMPABLE=0: no core dumps, and no ptrace attach by same-uid processes."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise BarrierError(f"prctl(PR_SET_DUMPABLE) failed: errno {ctypes.get_errno()}")


def die_with_host(host_pid: int) -> None:
    """SIGKILL this process when the launcher dies: an enclave never outlives its host."""
    import os
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise BarrierError(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}")
    if os.getppid() != host_pid:  # the launcher died before we asked
        from pyscone.enclave import iago

        iago.exit_now(137)
