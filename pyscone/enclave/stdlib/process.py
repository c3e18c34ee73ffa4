"""Processes and time: what an enclave cannot do, refused clearly; ``time.sleep`` on lthreads.

An enclave cannot create processes (SCONE and Gramine restrict the same).  Rather
than the barrier's bare ``EPERM``, the app gets ``OSError(ENOSYS, "... is not
supported inside a pyscone enclave")``, which it can catch and report.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any, NoReturn

from pyscone.enclave import scheduler

_REFUSED_OS = (
    "fork", "forkpty", "vfork", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
    "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn",
    "posix_spawnp", "system", "popen", "kill", "killpg", "wait", "waitpid", "wait3", "wait4", "waitid",
    "pipe", "pipe2", "dup", "dup2", "sendfile", "setsid", "setpgid", "ptrace", "chroot", "mkfifo", "mknod",
)  # fmt: skip


def _refuser(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise OSError(errno.ENOSYS, f"{what} is not supported inside a pyscone enclave")

    refused.__name__ = what.rpartition(".")[2]
    return refused


class _RefusedPopen:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSYS, "subprocess is not supported inside a pyscone enclave")


def sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    scheduler.get().sleep(seconds)


def install(cpu_count: int) -> None:
    import subprocess

    for name in _REFUSED_OS:
        if hasattr(os, name):
            setattr(os, name, _refuser(f"os.{name}"))
    os.cpu_count = lambda: cpu_count
    subprocess.Popen = _RefusedPopen  # type: ignore[misc,assignment]
    for name in ("run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _refuser(f"subprocess.{name}"))
    time.sleep = sleep
