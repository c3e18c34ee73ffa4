"""The host side of a process family (UNTRUSTED): spare lanes, and one host process per child.

Theory of operation
-------------------
A forked enclave needs its own rings and doorbells (a *lane*), and after lockdown it can
neither map memory nor open a descriptor.  So the launcher makes the lanes in advance
(``LanePool``: a memfd and two eventfds each, handed to the first enclave before it locks
down and inherited by every enclave it forks), and a fork goes like this:

1. the enclave asks ``FORK``; this host process takes a free lane and forks *itself*.  The
   copy serves the child's lane and holds every host descriptor of the parent with the same
   number and open file description, which is exactly what fork(2) gives the child's own
   descriptors natively: the enclave's fd table stays valid in the child unchanged;
2. the enclave forks (a real fork(2): the child is the same measured enclave under the same
   barrier) and tells ``FORK_DONE`` with the child's pid (or -1);
3. the copy serves the lane until that pid exits (a pidfd), then resets the lane and frees it.

Lanes are shared by every host process of the family, so who holds which is a table in
shared memory (a memfd) under a POSIX record lock, which excludes other *processes* (flock
would not: forked copies share its open file description).  A lane whose holder died
without freeing it is taken back.  Every host copy dies with the process that forked it
(``PR_SET_PDEATHSIG``), so nothing outlives the launcher; each enclave child dies with its
parent enclave likewise (set by the enclave itself).

Nothing here is trusted: the enclave checks the lane it is told and validates every
answer on it as on its first lane.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import signal
import struct
import sys
import time
from typing import TYPE_CHECKING

from pyscone import abi, rings

if TYPE_CHECKING:
    from pyscone.host.executor import Answer, Executor

_PR_SET_PDEATHSIG = 1
#: How long a fork waits for a lane that a child which just exited is about to give back.
_LANE_WAIT_S = 2.0
_OWNER = struct.Struct("<q")
#: The header words a lane's next user must find at zero: counters, sleep flags, fatal length.
_RESET_WORDS = (
    abi.OFF_REQ_TAIL, abi.OFF_REQ_HEAD, abi.OFF_RESP_TAIL, abi.OFF_RESP_HEAD,
    abi.OFF_HOST_SLEEPING, abi.OFF_ENCLAVE_SLEEPING, abi.OFF_FATAL, abi.OFF_SPIN_HINT,
)  # fmt: skip


class Lane:
    __slots__ = ("bell_enclave", "bell_host", "index", "region")

    def __init__(self, index: int, region: rings.SharedRegion, bell_host: int, bell_enclave: int) -> None:
        self.index = index
        self.region = region
        self.bell_host = bell_host
        self.bell_enclave = bell_enclave

    def reset(self) -> None:
        """Make the lane as new for its next enclave (both of its users are gone)."""
        for off in _RESET_WORDS:
            self.region.set_flag(off, 0)
        for fd in (self.bell_host, self.bell_enclave):
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass


class LanePool:
    """The family's spare lanes, 1..n (lane 0 is the first enclave's own region)."""

    def __init__(self, count: int, geometry: abi.Geometry) -> None:
        self.lanes: dict[int, Lane] = {}
        try:
            for index in range(1, count + 1):
                region = rings.SharedRegion.create(geometry)
                bells = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2))
                self.lanes[index] = Lane(index, region, *bells)
            self._table = os.memfd_create("pyscone-lanes", os.MFD_CLOEXEC)
            os.ftruncate(self._table, _OWNER.size * (count + 1))
        except OSError:
            self.close()
            raise

    def boot_entries(self) -> list[dict[str, int]]:
        """What the enclave is told about the spare lanes (in its boot configuration)."""
        return [
            {"shm_fd": lane.region.fd, "bell_host": lane.bell_host, "bell_enclave": lane.bell_enclave}
            for lane in self.lanes.values()
        ]

    def fds(self) -> list[int]:
        return [fd for lane in self.lanes.values() for fd in (lane.region.fd, lane.bell_host, lane.bell_enclave)]

    def take(self, wait: float = 0.0) -> Lane | None:
        """A free lane, now held by this process; ``None`` if every lane stays in use for ``wait`` s.

        (A lane comes back a moment after its child exits, when its server has seen the exit:
        a parent that forks and reaps in a loop may be that moment ahead of it.)
        """
        deadline = time.monotonic() + wait
        while True:
            with self._locked():
                for index, lane in self.lanes.items():
                    owner = self._owner(index)
                    if owner and _alive(owner):
                        continue
                    if owner:  # its holder died without freeing it
                        lane.reset()
                    self._set_owner(index, os.getpid())
                    return lane
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.001)

    def hold(self, lane: Lane) -> None:
        """This process (the lane's server, just forked) holds ``lane`` from now on."""
        with self._locked():
            self._set_owner(lane.index, os.getpid())

    def free(self, lane: Lane) -> None:
        lane.reset()
        with self._locked():
            self._set_owner(lane.index, 0)

    def in_use(self) -> int:
        """How many lanes a live process holds (read without the lock: for advice only)."""
        raw = os.pread(self._table, _OWNER.size * (len(self.lanes) + 1), 0)  # one read: it runs every 50 ms
        return sum(1 for (owner,) in _OWNER.iter_unpack(raw[_OWNER.size :]) if owner and _alive(owner))

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.region.close()
            os.close(lane.bell_host)
            os.close(lane.bell_enclave)
        self.lanes.clear()
        if hasattr(self, "_table"):
            os.close(self._table)

    def _owner(self, index: int) -> int:
        return int(_OWNER.unpack(os.pread(self._table, _OWNER.size, index * _OWNER.size))[0])

    def _set_owner(self, index: int, pid: int) -> None:
        os.pwrite(self._table, _OWNER.pack(pid), index * _OWNER.size)

    def _locked(self) -> _RecordLock:
        return _RecordLock(self._table)


class _RecordLock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class HostFamily:
    """``FORK`` and ``FORK_DONE`` for one host process's executor."""

    def __init__(self, pool: LanePool) -> None:
        self.pool = pool
        self.cpus = os.cpu_count() or 1
        self._pending: dict[int, int] = {}  # lane -> write end of the pipe that carries the child's pid
        self._copies: set[int] = set()  # forked copies of this host process, not yet reaped

    def crowded(self) -> bool:
        """Whether the family's enclaves and their hosts outnumber the cores (then nobody should spin)."""
        return 2 * (1 + self.pool.in_use()) > self.cpus

    def fork(self, ex: Executor) -> Answer:
        lane = self.pool.take(wait=_LANE_WAIT_S)
        if lane is None:
            return (-1, errno.EAGAIN, b"")
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            self.pool.free(lane)
            return (-1, e.errno or errno.EAGAIN, b"")
        if pid == 0:  # the child's host: never returns into the parent's dispatcher
            code = 0
            try:
                os.close(w)
                self._serve(lane, ex, r)
            except BaseException:  # noqa: BLE001 - report, then leave without unwinding the parent's stack
                import traceback

                traceback.print_exc()
                code = 70
            finally:
                os._exit(code)
        os.close(r)
        self._pending[lane.index] = w
        self._copies.add(pid)  # reaped by reap() when done (it exits when the child enclave has)
        return (lane.index, 0, b"")

    def reap(self) -> None:
        """Reap the copies of this host process that are done (the dispatcher calls it now and then;
        a thread per fork would cost the fork itself a thread start)."""
        for pid in list(self._copies):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._copies.discard(pid)

    def fork_done(self, lane: int, pid: int) -> Answer:
        w = self._pending.pop(lane, None)
        if w is None:
            return (-1, errno.EINVAL, b"")
        try:
            os.write(w, _OWNER.pack(pid))
        finally:
            os.close(w)
        return (0, 0, b"")

    def _serve(self, lane: Lane, parent: Executor, pid_pipe: int) -> None:
        parent_pid = os.getppid()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)  # the family's launcher forwards these to the first enclave
        self.pool.hold(lane)
        for w in self._pending.values():  # the parent's other forks in progress are its own
            os.close(w)
        self._pending = {}
        self._copies = set()
        from pyscone.host.executor import Executor

        # The parent's answer and the enclave's own fork come first; the child's calls wait in
        # its ring for the moment this copy takes to start serving them.
        raw = os.read(pid_pipe, _OWNER.size)
        os.close(pid_pipe)
        pid = _OWNER.unpack(raw)[0] if len(raw) == _OWNER.size else -1
        if pid <= 0:  # the enclave's fork failed
            self.pool.free(lane)
            return
        watch = _watch(pid)
        if watch is None or _exited(watch, 0.0):  # (a child that made no call: nothing to serve)
            self._finish(lane, pid, watch)
            return
        ex = Executor.forked_from(parent, lane.region, lane.bell_host, lane.bell_enclave)
        ex.family = self
        ex.start()
        _exited(watch, None)
        ex.stop()
        self._finish(lane, pid, watch)

    def _finish(self, lane: Lane, pid: int, watch: int | None) -> None:
        if watch is not None:
            os.close(watch)
        reason = lane.region.read_fatal()
        if reason:
            print(f"pyscone: enclave {pid} stopped: {reason}", file=sys.stderr, flush=True)
        _reap_children(deadline=time.monotonic() + 5)
        self.pool.free(lane)


def _watch(pid: int) -> int | None:
    """A pidfd of the child enclave (``None``: it is gone already)."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _exited(pidfd: int, timeout: float | None) -> bool:
    return bool(select.select([pidfd], [], [], timeout)[0])


def _reap_children(*, deadline: float) -> None:
    """Wait (a while) for this copy's own copies: they free their lanes as their enclaves end."""
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)
