"""Processes: ``os.fork``, the ``wait`` family and ``kill`` -- each child its own enclave.

Theory of operation
-------------------
A fork is a real fork(2) of the enclave (the barrier allows exactly glibc's fork flags):
the child is the same measured code with a copy of the parent's memory -- keys, shields,
configuration -- under the same, inherited, barrier.  What it cannot inherit is the
parent's rings: two enclaves cannot share one single-producer ring.  So the launcher made
spare *lanes* (rings + doorbells) before lockdown; every enclave of the family maps them
at boot, and a fork is:

1. ``FORK`` (in place, no other lthread runs until the fork is done: the host's copy must
   hold exactly the descriptors the child's fd table names).  The host forks itself and
   answers the lane its copy serves; we check it is a spare lane of ours and not our own.
2. fork(2).  In the child: ask to die with the parent (``PR_SET_PDEATHSIG``; an orphan would
   have no one to reap it inside the family), move the syscall client to the lane, drop
   the other lthreads (as other threads vanish in a forked child), run the family's
   ``child`` hooks.  In the parent: ``FORK_DONE`` with the child's pid.

``wait``/``waitpid``/``wait3``/``wait4``/``waitid`` are the kernel's (the barrier allows
them: they reach only this process's own children, which are enclaves of its family); a
blocking wait parks only its lthread and retries when ``SIGCHLD`` arrives (or a short
timer: a wake-up is never lost).  ``kill`` of another process goes through the host (it
could refuse: denial of service is out of scope); ``kill`` of ourselves is
``signal.raise_signal``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
from collections.abc import Callable
from typing import Any, TypeVar

from pyscone import rings
from pyscone.abi import Op
from pyscone.enclave import family, iago, scheduler
from pyscone.enclave.stdlib import interpose, process
from pyscone.enclave.syscalls import SyscallClient

_PR_SET_PDEATHSIG = 1
#: Longest a blocked wait sleeps between two looks (a SIGCHLD cuts it short).
_POLL_MAX = 0.05


class _Lane:
    __slots__ = ("bell_enclave", "bell_host", "ep", "region")

    def __init__(self, region: rings.SharedRegion, bell_host: int, bell_enclave: int) -> None:
        self.region = region
        self.bell_host = bell_host
        self.bell_enclave = bell_enclave
        self.ep = select.epoll()
        self.ep.register(bell_enclave, select.EPOLLIN)


_lanes: dict[int, _Lane] = {}
_own = 0  # the lane this enclave runs on (0: the family's first enclave's own region)
_pgid = 0
_prctl: Any = None
_real_fork = os.fork
_real_waitpid = os.waitpid
_real_wait3 = os.wait3
_real_wait4 = os.wait4
_real_waitid = os.waitid
#: (lane, parent pid) while a fork is under way.
_forking: tuple[int, int] | None = None
#: lane -> the pid of the child of ours that was last forked onto it.
_children: dict[int, int] = {}
#: The lthreads a forked child left behind, kept so that they are never collected (unwound).
_left_behind: list[object] = []
_child_waiters: list[Callable[[], None]] = []

T = TypeVar("T")


def attach(cfg: dict[str, Any]) -> None:
    """At boot, before lockdown: map the spare lanes and make their epoll sets."""
    global _pgid, _prctl
    for index, entry in enumerate(cfg.get("lanes") or (), 1):
        region = rings.SharedRegion.attach(int(entry["shm_fd"]))
        _lanes[index] = _Lane(region, int(entry["bell_host"]), int(entry["bell_enclave"]))
    _pgid = os.getpgrp()
    _prctl = ctypes.CDLL(None, use_errno=True).prctl


def barrier_fds(client: SyscallClient) -> dict[str, list[int]]:
    """The descriptors the barrier lets this enclave and its forked children use."""
    lanes = list(_lanes.values())
    return {
        "read_fds": [client.doorbell_enclave, *(lane.bell_enclave for lane in lanes)],
        "write_fds": [client.doorbell_host, *(lane.bell_host for lane in lanes)],
        "epoll_fds": [client.ep.fileno(), *(lane.ep.fileno() for lane in lanes)],
    }


def doorbells() -> set[int]:
    """Every doorbell of every lane (``os.eventfd_read``/``write`` accept these only)."""
    return {fd for lane in _lanes.values() for fd in (lane.bell_host, lane.bell_enclave)}


# -- fork ---------------------------------------------------------------------------------


def fork() -> int:
    """``os.fork``: a child enclave on a spare lane (see the module's theory of operation).

    Raises:
        BlockingIOError: every spare lane is in use (``pyscone run --processes``).
        OSError: the host or the kernel could not fork.
    """
    sched = scheduler.get()
    family.run_prepare()
    sched.settle()
    _, err, lane = sched.host_call_in_place(Op.FORK)
    if err:
        if err == errno.EAGAIN:
            raise BlockingIOError(
                err,
                f"no free lane for another enclave: at most {len(_lanes)} forked enclaves run at once"
                " (pyscone run --processes)",
            )
        raise OSError(err, os.strerror(err))
    if lane not in _lanes or lane == _own:
        iago.fail_stop(f"FORK: the host named lane {lane}, which is not a spare lane of this enclave")
    if _running(_children.get(lane, 0)):
        # (A grandchild's lane we cannot know: two enclaves on one lane garble each other's
        # calls, which the host can do anyway by lying in its answers; never a secret.)
        iago.fail_stop(f"FORK: the host named lane {lane}, on which a child of this enclave still runs")
    global _forking
    _forking = (lane, os.getpid())
    try:
        pid = _real_fork()  # in the child, _after_fork_in_child runs inside this call
    except OSError:
        sched.host_call_in_place(Op.FORK_DONE, (lane, -1))
        family.run_parent(-1)
        raise
    finally:
        _forking = None
    if pid == 0:
        return 0
    _children[lane] = pid
    sched.post(Op.FORK_DONE, (lane, pid))
    family.run_parent(pid)
    return pid


def _after_fork_in_child() -> None:
    """The first of the child's ``os.register_at_fork`` hooks: the app's (and the stdlib's
    later ones, which may print) run on the child's own lane, never on its parent's."""
    if _forking is None:
        return
    try:
        _become_child(*_forking)
    except BaseException:  # noqa: BLE001 - CPython would print it and go on, on the parent's lane
        iago.exit_now(70)  # a child that could not become itself is none: the parent's wait says 70


def _become_child(lane: int, parent: int) -> None:
    global _own
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        iago.exit_now(128 + signal.SIGKILL)  # the parent is gone already: so are we
    sched = scheduler.get()
    old = sched.client
    mine = _lanes[lane]
    client = SyscallClient(mine.region, mine.bell_host, mine.bell_enclave, int(old.spin_max * 1e6), ep=mine.ep)
    iago.move_fatal(old.region.write_fatal, mine.region.write_fatal)
    _left_behind.extend(sched.after_fork_child(client))
    _own = lane
    _child_waiters.clear()
    _children.clear()  # the parent's children are not ours
    family.run_child()


def _running(pid: int) -> bool:
    """Whether ``pid``, a child of ours, has not exited yet (without reaping it)."""
    if pid <= 0:
        return False
    try:
        return _real_waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False  # reaped already


# -- wait -----------------------------------------------------------------------------------


def _blocking(attempt: Callable[[], T], ready: Callable[[T], bool]) -> T:
    """Run a ``WNOHANG`` wait until it reports a child, parking only this lthread between tries."""
    sched = scheduler.get()
    delay = 50e-6
    while True:
        got = attempt()
        if ready(got):
            return got
        lt = sched.current
        if lt is None:  # (the hub never waits for a child)
            raise RuntimeError("wait outside an lthread")
        wake = _waker(sched, lt)
        _child_waiters.append(wake)
        timer = sched.call_later(delay, wake)
        try:
            sched.park()
        finally:
            timer.cancel()
            if wake in _child_waiters:
                _child_waiters.remove(wake)
        delay = min(delay * 2, _POLL_MAX)


def _waker(sched: scheduler.Scheduler, lt: scheduler.LThread) -> Callable[[], None]:
    """Wake ``lt`` once, whichever comes first: SIGCHLD or its timer (a second wake would
    resume it at some later, unrelated park)."""
    woken = False

    def wake() -> None:
        nonlocal woken
        if not woken:
            woken = True
            sched.wake(lt)

    return wake


def _on_sigchld() -> None:
    waiters = list(_child_waiters)
    _child_waiters.clear()
    for wake in waiters:
        wake()


def waitpid(pid: int, options: int, /) -> tuple[int, int]:
    if options & os.WNOHANG:
        return _real_waitpid(pid, options)
    return _blocking(lambda: _real_waitpid(pid, options | os.WNOHANG), lambda r: r[0] != 0)


def wait() -> tuple[int, int]:
    return waitpid(-1, 0)


def wait3(options: int) -> tuple[int, int, Any]:
    if options & os.WNOHANG:
        return _real_wait3(options)
    return _blocking(lambda: _real_wait3(options | os.WNOHANG), lambda r: r[0] != 0)


def wait4(pid: int, options: int) -> tuple[int, int, Any]:
    if options & os.WNOHANG:
        return _real_wait4(pid, options)
    return _blocking(lambda: _real_wait4(pid, options | os.WNOHANG), lambda r: r[0] != 0)


def waitid(idtype: int, ident: int, options: int, /) -> Any:
    if options & os.WNOHANG:
        return _real_waitid(idtype, ident, options)
    return _blocking(lambda: _real_waitid(idtype, ident, options | os.WNOHANG), lambda r: r is not None)


# -- signals to other processes ------------------------------------------------------------------


def kill(pid: int, sig: int, /) -> None:
    pid, sig = int(pid), int(sig)
    if not 0 <= sig < signal.NSIG:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if pid == os.getpid():
        if sig:
            process.raise_signal(sig)
        return
    if pid == 0:  # our process group, which on the host is the family's first enclave's
        pid = -_pgid
    _, err, _ = scheduler.get().host_call(Op.KILL, (pid, sig))
    if err:
        raise OSError(err, os.strerror(err))


def killpg(pgid: int, sig: int, /) -> None:
    if pgid < 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    kill(-(pgid or _pgid), sig)


def getpgrp() -> int:
    return _pgid


def getpgid(pid: int, /) -> int:
    if pid in (0, os.getpid()):
        return _pgid
    raise OSError(errno.ENOSYS, "os.getpgid of another process is not supported inside a pyscone enclave")


def install() -> None:
    """Before the app runs (its fork hooks must come after ours)."""
    os.register_at_fork(after_in_child=_after_fork_in_child)
    process.watch_signal(signal.SIGCHLD, _on_sigchld)
    interpose(
        os,
        fork=fork,
        waitpid=waitpid,
        wait=wait,
        wait3=wait3,
        wait4=wait4,
        waitid=waitid,
        kill=kill,
        killpg=killpg,
        getpgrp=getpgrp,
        getpgid=getpgid,
    )
