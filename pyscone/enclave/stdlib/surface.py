"""The POSIX surface of the enclave: every public callable of ``os``, ``posix``, ``fcntl``,
``select``, ``signal``, ``time``, ``resource``, ``mmap`` and ``shutil``, by a list.

Each is one of:

* **interposed**: replaced by pyscone (the ``install`` functions of ``stdlib/``, or here);
* **refused**: replaced here by a function that raises
  ``OSError(ENOSYS, "<module>.<name> is not supported inside a pyscone enclave")``, so the app
  meets a clear error it can catch instead of the barrier's bare ``EPERM``;
* **harmless**: left as it is, because it makes no system call the barrier refuses (pure
  computation, the clocks, the process's own identity and signal masks) or because it is
  Python code built on interposed calls (``os.walk``, ``shutil.copytree``).

``tests/test_posix_surface.py`` enumerates the modules and fails on a callable in no list, so
a new Python version's additions are caught; it also calls every refusal in an enclave.
``socket`` and ``ssl`` are listed by their own modules.  ``posix`` shares ``os``'s lists: each
name interposed or refused in ``os`` is set in ``posix`` too.
"""

from __future__ import annotations

import errno
import mmap
import os
import posix
import resource
import time
from typing import Any, NoReturn

from pyscone.enclave.stdlib import interpose


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


INTERPOSED: dict[str, frozenset[str]] = {
    "os": _names("""
        DirEntry access chdir chmod close cpu_count dup dup2 eventfd_read eventfd_write fdatasync fork fstat fstatvfs
        fsync ftruncate get_blocking get_inheritable getcwd getcwdb getpgid getpgrp getxattr isatty kill killpg
        listdir listxattr lockf lseek
        lstat mkdir open pipe pipe2 pread pwrite read readlink remove removexattr rename replace rmdir scandir
        sched_getaffinity set_blocking set_inheritable setxattr stat statvfs symlink sysconf times truncate umask
        unlink utime wait wait3 wait4 waitid waitpid write
    """),
    "fcntl": _names("fcntl flock ioctl lockf"),
    "select": _names("epoll poll select"),
    "signal": _names("getsignal raise_signal set_wakeup_fd signal"),
    "time": _names("sleep"),
    "resource": _names("getrlimit"),
    "mmap": _names("mmap"),
    "shutil": frozenset(),
}

REFUSED: dict[str, frozenset[str]] = {
    "os": _names("""
        chown chroot closerange copy_file_range eventfd execl execle execlp execlpe
        execv execve execvp execvpe fchdir fchmod fchown forkpty fwalk get_terminal_size getgrouplist
        getgroups getloadavg getlogin getpriority getresgid getresuid getsid initgroups lchown link login_tty
        pathconf fpathconf memfd_create mkfifo mknod nice openpty pidfd_open popen posix_fallocate
        posix_fadvise posix_spawn posix_spawnp preadv pwritev readv sched_get_priority_max sched_get_priority_min
        sched_getparam sched_getscheduler sched_rr_get_interval sched_setaffinity sched_setparam
        sched_setscheduler sendfile setegid seteuid setgid setgroups setpgid setpgrp setpriority setregid
        setresgid setresuid setreuid setsid setuid spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp
        spawnvpe splice sync system tcgetpgrp tcsetpgrp ttyname writev
    """),
    "fcntl": frozenset(),
    "select": frozenset(),
    "signal": _names("""
        alarm getitimer pause pidfd_send_signal pthread_kill setitimer sigpending sigtimedwait sigwait sigwaitinfo
    """),
    # (an lthread's threading.get_ident() is no pthread_t: pthread_getcpuclockid would crash on it)
    "time": _names("clock_settime clock_settime_ns pthread_getcpuclockid"),
    "resource": _names("getrusage prlimit setrlimit"),
    "mmap": frozenset(),
    "shutil": frozenset(),
}

HARMLESS: dict[str, frozenset[str]] = {
    # Pure, or only the process's own identity (getpid, getuid, uname: allowed by the barrier),
    # or Python over interposed calls (walk, makedirs, fdopen over io.open).
    "os": _names("""
        GenericAlias Mapping MutableMapping PathLike WCOREDUMP WEXITSTATUS WIFCONTINUED WIFEXITED WIFSIGNALED
        WIFSTOPPED WSTOPSIG WTERMSIG abort confstr ctermid device_encoding fdopen fsdecode fsencode
        fspath get_exec_path getegid getenv getenvb geteuid getgid getpid getppid getrandom getuid major makedev
        makedirs minor putenv register_at_fork removedirs renames sched_param sched_yield stat_result
        statvfs_result strerror terminal_size times_result uname uname_result unsetenv urandom
        waitid_result waitstatus_to_exitcode walk
    """),
    "fcntl": frozenset(),
    "select": frozenset(),
    # Signal masks and handler flags are rt_sigprocmask/rt_sigaction, which the barrier allows.
    "signal": _names("""
        Handlers Sigmasks Signals default_int_handler pthread_sigmask siginterrupt strsignal struct_siginfo
        valid_signals
    """),
    "time": _names("""
        asctime clock_getres clock_gettime clock_gettime_ns ctime get_clock_info gmtime localtime mktime monotonic
        monotonic_ns perf_counter perf_counter_ns process_time process_time_ns strftime
        strptime struct_time thread_time thread_time_ns time time_ns tzset
    """),
    "resource": _names("getpagesize struct_rusage"),
    "mmap": frozenset(),
    # Python over interposed os calls; chown reaches the refused os.chown.
    "shutil": _names("""
        chown copy copy2 copyfile copyfileobj copymode copystat copytree disk_usage get_archive_formats
        get_terminal_size get_unpack_formats ignore_patterns make_archive move register_archive_format
        register_unpack_format rmtree unpack_archive unregister_archive_format unregister_unpack_format which
    """),
}

MODULES = tuple(INTERPOSED)


def public_callables(module: Any) -> set[str]:
    """What the lists must cover: the public callables of ``module`` (exception classes aside)."""
    out = set()
    for name in dir(module):
        value = getattr(module, name)
        if name.startswith("_") or not callable(value):
            continue
        if isinstance(value, type) and issubclass(value, BaseException):
            continue
        out.add(name)
    return out


def refuser(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise OSError(errno.ENOSYS, f"{what} is not supported inside a pyscone enclave")

    refused.__name__ = what.rpartition(".")[2]
    refused.__qualname__ = refused.__name__
    return refused


# -- what is interposed here ----------------------------------------------------------------------


class _Mmap(mmap.mmap):
    """``mmap.mmap`` of anonymous memory only: a host fd is no file in the enclave's address space."""

    def __new__(cls, fileno: int, length: int, *args: Any, **kwargs: Any) -> _Mmap:
        if fileno != -1:
            raise OSError(errno.ENOSYS, "mmap.mmap of a file is not supported inside a pyscone enclave")
        return super().__new__(cls, fileno, length, *args, **kwargs)


_limits: dict[int, tuple[int, int]] = {}


def snapshot_limits() -> None:
    """Read the resource limits while the barrier still lets us (boot calls it last before lockdown)."""
    _limits.update({v: _real_getrlimit(v) for k, v in vars(resource).items() if k.startswith("RLIMIT_")})


_real_getrlimit = resource.getrlimit


def install(cpu_count: int) -> None:
    """Refuse what is refused, and interpose the few calls that live here.

    Runs after every other ``install`` (so ``posix`` can be given ``os``'s replacements) and after
    lockdown (the boot itself sets resource limits).
    """

    def getrlimit(which: int) -> tuple[int, int]:
        """The limits as they were at lockdown (the enclave cannot change them)."""
        try:
            return _limits[which]
        except KeyError:
            raise ValueError("invalid resource specified") from None

    def sched_getaffinity(pid: int) -> set[int]:
        if pid not in (0, os.getpid()):
            raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))
        return set(range(cpu_count))

    real_sysconf = os.sysconf
    from_limits = {"SC_CHILD_MAX": resource.RLIMIT_NPROC, "SC_OPEN_MAX": resource.RLIMIT_NOFILE}
    from_limits["SC_SIGQUEUE_MAX"] = resource.RLIMIT_SIGPENDING

    def sysconf(name: str | int) -> int:
        """``os.sysconf``; the values glibc reads from resource limits come from the snapshot."""
        for key, limit in from_limits.items():
            if name in (key, os.sysconf_names.get(key)):
                soft = _limits[limit][0]
                return -1 if soft == resource.RLIM_INFINITY else soft
        return real_sysconf(name)

    def times() -> os.times_result:
        return os.times_result((time.process_time(), 0.0, 0.0, 0.0, time.monotonic()))

    from pyscone.enclave import scheduler
    from pyscone.enclave.stdlib import forks

    client = scheduler.get().client
    doorbells = {client.doorbell_host, client.doorbell_enclave, *forks.doorbells()}
    real_read, real_write = os.eventfd_read, os.eventfd_write

    # The syscall client rings its doorbells with these (the barrier allows exactly that); the
    # app has no eventfd (os.eventfd is refused), so any other fd is refused.
    def eventfd_read(fd: int) -> int:
        if fd not in doorbells:
            raise OSError(errno.ENOSYS, "os.eventfd_read is not supported inside a pyscone enclave")
        return real_read(fd)

    def eventfd_write(fd: int, value: int) -> None:
        if fd not in doorbells:
            raise OSError(errno.ENOSYS, "os.eventfd_write is not supported inside a pyscone enclave")
        real_write(fd, value)

    interpose(os, eventfd_read=eventfd_read, eventfd_write=eventfd_write)
    interpose(resource, getrlimit=getrlimit)
    interpose(os, sched_getaffinity=sched_getaffinity, times=times, sysconf=sysconf)
    interpose(mmap, mmap=_Mmap)
    modules = {m: __import__(m) for m in MODULES}
    for mod, names in REFUSED.items():
        for name in names:
            if hasattr(modules[mod], name):
                interpose(modules[mod], **{name: refuser(f"{mod}.{name}")})
    for name in INTERPOSED["os"] | REFUSED["os"]:
        if hasattr(posix, name) and hasattr(os, name):
            interpose(posix, **{name: getattr(os, name)})
