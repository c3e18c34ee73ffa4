"""Spawning Python: ``subprocess`` and ``multiprocessing`` start a fresh child enclave.

Theory of operation
-------------------
Every way Python starts a program ends in ``_posixsubprocess.fork_exec``:
``subprocess.Popen`` (so ``run``, ``call``, ``check_output``, asyncio subprocesses)
and ``multiprocessing.util.spawnv_passfds`` (the ``spawn`` and ``forkserver``
start methods).  It is replaced here.  If the program is the enclave's own
Python (``sys.executable``, or a name on the app's ``PATH`` that resolves to the
same file), the host is asked for a fresh enclave of the same measured runtime
(``Op.SPAWN``, host/spawn.py); the python options are parsed here, in the
enclave, into the child's program (a script, ``-m``, ``-c``), which with its env,
cwd and the parent's keys goes to the child over the attested channel
(enclave/spawnchan.py), never through the host.  ``fork_exec`` returns the child's
pid only after the child proved it is this enclave's runtime and acknowledged
its configuration; otherwise the child is killed and reaped, and ``Popen`` raises
``OSError(EACCES)`` (as a failed exec raises from ``Popen``: at once, so the app
never holds a pid of a process that got nothing).  Any other program is
refused with one ``OSError(ENOSYS)``.  ``os.posix_spawn`` stays refused (and
``subprocess`` told not to try it); ``os.exec*`` stays refused (ENOSYS).

The host, not this enclave, is the child's OS parent, so ``os.waitpid``/``wait``
and ``os.kill`` of a spawned pid go to the host (``Op.SPAWN_WAIT``, parked on the
host's reactor until the child exits; ``Op.SPAWN_KILL``).  Other pids go to the
functions these replace (the forked children's, once ``fork`` lands).

What a child may hold at 0-2 and ``pass_fds``: host fds (files the host opens,
sockets), and pipe ends (``os.pipe``, so ``stdout=PIPE`` and ``multiprocessing``'s
connections): a pipe moves to the host as at a fork (``stdlib/pipes.py``: its bytes
then go sealed with the family key, which the child gets from its parent), and the
child gets its channel's host fd.  FS-shield files are refused with ``ENOSYS``.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from pyscone import abi
from pyscone.abi import Op
from pyscone.enclave import family, iago, scheduler, spawnchan
from pyscone.enclave.shields import famchan
from pyscone.enclave.stdlib import dups, interpose, pipes
from pyscone.protect.spawnproto import ChannelError

#: python options that change nothing a spawned enclave does (it is always isolated and measured).
_IGNORED_FLAGS = frozenset("IEsSBuqbdvR")
_WITH_ARGUMENT = frozenset("WX")

_spawned: set[int] = set()
_reaped: set[int] = set()  # spawned and waited for: no child of ours any more (ECHILD)
_real_waitpid: Any = None
_real_kill: Any = None
_self_real = ""


def _refuse(what: str) -> OSError:
    return OSError(errno.ENOSYS, f"{what} is not supported inside a pyscone enclave")


def parse_python_args(args: list[str]) -> dict[str, Any]:
    """python's command line (after the executable) -> the child's program, as boot takes it.

    Raises:
        OSError: ENOSYS for an option a spawned enclave does not support.
    """
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--" or not a.startswith("-") or a == "-":
            break
        if a in ("-c", "-m"):
            if i + 1 >= len(args):
                raise OSError(errno.EINVAL, f"python {a} needs an argument")
            rest = args[i + 2 :]
            if a == "-c":
                return {"command": args[i + 1], "module": False, "argv": ["-c", *rest]}
            return {"command": None, "module": True, "argv": [args[i + 1], *rest]}
        letters = a[1:]
        if letters[0] in _WITH_ARGUMENT:
            i += 1 if len(letters) > 1 else 2
            continue
        if letters.startswith(("c", "m")) and len(letters) > 1:  # -cCODE, -mMODULE
            return parse_python_args([a[:2], a[2:], *args[i + 1 :]])
        bad = [ch for ch in letters if ch not in _IGNORED_FLAGS]
        if bad:
            raise _refuse(f"python option -{bad[0]} for a spawned enclave")
        i += 1
    rest = args[i + 1 :] if i < len(args) and args[i] == "--" else args[i:]
    if not rest or rest[0] == "-":
        raise _refuse("a spawned python that reads its program from stdin")
    return {"command": None, "module": False, "argv": rest}


def _is_own_python(candidates: list[bytes]) -> bool:
    for raw in candidates:
        path = os.fsdecode(raw)
        try:
            if os.path.isfile(path) and os.path.realpath(path) == _self_real:
                return True
        except OSError:
            continue
    return False


class _Given:
    """What a child gets: host fds at its numbers, and pipe ends (their channels' host fds)."""

    def __init__(self) -> None:
        self.fdmap: dict[int, int] = {}  # the child's host fd number -> the parent's host fd
        self.fds: list[list[Any]] = []  # host fds >= 3 at the app's numbers, with what we know of them
        self.pipes: list[list[int | str | bool]] = []  # [number, host fd, channel id, reading, O_NONBLOCK]

    def give(self, n: int, fd: int) -> None:
        """The child's ``n`` is what the app's ``fd`` names now; ENOSYS for what cannot cross."""
        h = dups.resolve(fd)
        if pipes.is_local(h):  # it moves to the host (sealed with the family key), as at a fork
            host, chan, reading = pipes.for_child(h)
            self.fdmap[host] = host
            self.pipes.append([n, host, chan.hex(), reading, h in iago.fds.nonblocking])
            return
        from pyscone.enclave.stdlib import files

        if files._vfd(h) is not None:
            raise _refuse("giving a file of the file-system shield to a spawned child")
        t = iago.fds
        t.kind(h)  # EBADF if closed
        seal = famchan.seal_for_child(h) if t.kinds[h] == iago.FdTable.SOCKET else None
        if seal is not None:  # a socketpair end: sealed records from now on, in the child too
            known = (t.families.get(h, 0), t.types.get(h, 0), t.protos.get(h, 0), t.flags.get(h, 0))
            self.fdmap[h] = h  # (at its own number; 0-2 name it there: the console follows the name)
            self.fds.append([h, t.kinds[h], *known, [seal[0].hex(), seal[1]], n])
            return
        self.fdmap[n] = h
        if n > 2:
            self.fds.append(
                [n, t.kinds[h], t.families.get(h, 0), t.types.get(h, 0), t.protos.get(h, 0), t.flags.get(h, 0)]
            )


def fork_exec(args: Any, executable_list: Any, close_fds: Any, pass_fds: Any, cwd: Any, env: Any, *rest: Any) -> int:
    """``_posixsubprocess.fork_exec`` (3.11's arguments; only the first fourteen are read)."""
    p2cread, _p2cwrite, _c2pread, c2pwrite, _errread, errwrite = rest[:6]
    if any(callable(x) for x in rest[8:]):
        raise _refuse("preexec_fn for a spawned child")
    argv = [os.fsdecode(a) for a in args]
    if not _is_own_python(list(executable_list)):
        found = [os.fsdecode(c) for c in executable_list if os.path.isfile(os.fsdecode(c))]
        name = found[0] if found else (argv[0] if argv else "?")
        raise OSError(
            errno.ENOSYS,
            f"running {name} is not supported inside a pyscone enclave (only the enclave's own Python can be spawned)",
        )
    program = parse_python_args(argv[1:])
    given = _Given()
    for n, fd in ((0, p2cread), (1, c2pwrite), (2, errwrite)):
        if fd != -1 or dups.resolve(n) != n:  # (-1: the parent's own, which is the host's unless dup'ed onto)
            given.give(n, n if fd == -1 else fd)
    errpipe_write = rest[7]
    for n in sorted(set(pass_fds)):
        if n > 2 and n != errpipe_write:  # (Popen keeps its error pipe open for exec: there is no exec)
            given.give(n, n)
    environ = dict(os.environ) if env is None else dict(_env_pair(e) for e in env)
    where = os.path.abspath(os.fsdecode(cwd)) if cwd is not None else os.getcwd()
    if not os.path.isdir(where):  # as Popen reports a child's failed chdir
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fsdecode(cwd))
    config = spawnchan.child_config(program, environ, where, given.fds, given.pipes)
    payload = b"".join(abi.SPAWN_FD.pack(n, h) for n, h in given.fdmap.items())
    result, err, value = scheduler.get().host_call(Op.SPAWN, (), payload)
    if result < 0:
        raise OSError(err, f"the host cannot start a child enclave: {os.strerror(err)}")
    pid, channel = value
    _spawned.add(pid)
    _reaped.discard(pid)
    try:
        spawnchan.give(channel, config)
    except ChannelError as e:
        _end(pid)
        raise OSError(errno.EACCES, f"the spawned child was refused its configuration: {e}") from None
    spawnchan.started()
    return int(pid)


def _end(pid: int) -> None:
    """Reap a child that got nothing: it sees the closed channel and exits saying why; else SIGKILL."""
    sched = scheduler.get()
    for _ in range(100):
        if _wait(pid, os.WNOHANG)[0]:
            return
        sched.sleep(0.05)
    _kill(pid, 9)
    _wait(pid, 0)


def _env_pair(entry: bytes) -> tuple[str, str]:
    key, _, value = os.fsdecode(entry).partition("=")
    return key, value


def _wait(pid: int, options: int) -> tuple[int, int]:
    blocking = not options & os.WNOHANG
    result, err, status = scheduler.get().host_call(Op.SPAWN_WAIT, (pid, options & os.WNOHANG), wait=blocking)
    if result < 0:
        if err == errno.ECHILD:
            _spawned.discard(pid)
        raise OSError(err, os.strerror(err))
    if result:
        _spawned.discard(pid)
        _reaped.add(pid)
    return int(result), int(status)


def _kill(pid: int, sig: int) -> None:
    result, err, _ = scheduler.get().host_call(Op.SPAWN_KILL, (pid, int(sig)))
    if result < 0:
        raise OSError(err, os.strerror(err))


def waitpid(pid: int, options: int) -> tuple[int, int]:
    """``os.waitpid``: a spawned child's through the host; any other pid as before."""
    if pid in _spawned:
        return _wait(pid, options)
    if pid in _reaped:
        raise ChildProcessError(errno.ECHILD, os.strerror(errno.ECHILD))
    if pid == -1 and _spawned:
        while True:  # any child: poll each spawned one, and the forked ones (the kernel's children)
            for child in sorted(_spawned):
                done = _wait(child, os.WNOHANG)
                if done[0]:
                    return done
            try:
                done = _real_waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                done = (0, 0)
            if done[0]:
                return done
            if options & os.WNOHANG:
                return (0, 0)
            scheduler.get().sleep(0.005)
    return _real_waitpid(pid, options)  # type: ignore[no-any-return]


def wait() -> tuple[int, int]:
    return waitpid(-1, 0)


def kill(pid: int, sig: int) -> None:
    """``os.kill``: a spawned child's through the host; any other pid as before."""
    if pid in _spawned:
        _kill(pid, sig)
        return
    _real_kill(pid, sig)


def _forget_children() -> None:
    _spawned.clear()
    _reaped.clear()


def install() -> None:
    """Replace ``fork_exec``, and ``os.waitpid``/``wait``/``kill`` (over the fork code's: boot runs this after it)."""
    global _real_waitpid, _real_kill, _self_real
    import _posixsubprocess
    import subprocess

    _self_real = os.path.realpath(sys.executable)
    _real_waitpid, _real_kill = os.waitpid, os.kill
    interpose(_posixsubprocess, fork_exec=fork_exec)
    if hasattr(subprocess, "_fork_exec"):  # 3.12+ binds it at import
        interpose(subprocess, _fork_exec=fork_exec)
    interpose(subprocess, _USE_POSIX_SPAWN=False)
    interpose(os, waitpid=waitpid, wait=wait, kill=kill)
    family.register(child=_forget_children)  # a forked child's spawned children are its parent's
    # Popen.poll binds os.waitpid as a default argument when subprocess is imported.
    poll = subprocess.Popen._internal_poll  # type: ignore[attr-defined]
    poll.__defaults__ = (None, waitpid, os.WNOHANG, errno.ECHILD)


__all__ = ["fork_exec", "install", "kill", "parse_python_args", "wait", "waitpid"]
