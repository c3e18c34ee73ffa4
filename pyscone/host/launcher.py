"""``pyscone run``'s host side (UNTRUSTED): create untrusted memory, start the
enclave process and serve its system calls until it exits.

The enclave is started with an empty environment, ``python -I -S`` and the
measuring loader's bootstrap (``enclave/loader.py``: nothing from the host's
environment or its site-packages hooks runs before the loader that measures
them, and the enclave refuses any other flags), with ``/dev/null`` as its standard
input, and with exactly four inherited descriptors: the shared memory, the two
doorbells and a pipe that carries its start-up configuration.  Its stdout and
stderr stay connected only so that a failure *before* lockdown can be reported;
after lockdown the barrier forbids writing to them and all output goes through
the system-call interface.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import pyscone
from pyscone import abi, rings
from pyscone.enclave import loader
from pyscone.enclave.iago import EXIT_HOST_VIOLATION
from pyscone.host.executor import Executor
from pyscone.host.family import HostFamily, LanePool


@dataclass
class EnclaveConfig:
    """What the enclave is told at start.  In production the CAS supplies argv and env."""

    argv: list[str]
    module: bool = False
    command: str | None = None  # python -c: the code (argv is then ["-c", ...])
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    syscalls: str = "async"
    spin_us: int = 400
    heap: int = 1 << 30
    barrier: bool = True
    preload: list[str] = field(default_factory=list)
    stats: bool = False
    cpu_count: int = 1
    fspf: dict[str, object] | None = None  # path, key (hex), accepted tags, tag file
    measure: bool = False  # measure the enclave before lockdown (MRENCLAVE)
    measure_out: str | None = None  # write the measurement here and exit (pyscone measure)
    signature: str | None = None  # the enclave signature (hex of the file), checked against MRENCLAVE
    cas: dict[str, str] | None = None  # the CAS this enclave attests to: url, cert_sha256 (measured)
    session: str | None = None  # NAME/SERVICE at the CAS
    expect_program: str | None = None  # with a CAS: the program the host started (it must be the session's)
    las: str | None = None  # HOST:PORT of this host's LAS
    # The bytecode cache: the host's directory, and in dev mode its key (hex); with a CAS the
    # CAS gives the key.  Not measured: the cache holds only what the enclave itself sealed.
    bytecode_cache: dict[str, str] | None = None
    venv: str | None = None  # the app's virtualenv, absolute (enclave/venv.py; measured)
    network: dict[str, object] | None = None  # dev mode: the network shield's rules (with a CAS, the CAS's)
    console: dict[str, str] | None = None  # dev mode's console shield: {"key": hex} (with a CAS: the policy's)


@dataclass
class HostConfig:
    """How the host serves the enclave: its shape is untrusted and not measured."""

    slots: int = abi.DEFAULT_SLOTS
    slot_data: int = abi.DEFAULT_SLOT_DATA
    sthreads: int = 3
    spin_us: int = 400
    hostile: str | None = None
    #: Spare lanes: how many forked enclaves of the family may run at once besides the first.
    processes: int = 8


#: The pyscone package the enclave runs (the measuring loader loads it from here, measured).
_PYSCONE_DIR = os.path.dirname(os.path.abspath(pyscone.__file__))


def _enclave_env() -> dict[str, str]:
    """The enclave's whole environment: the libc layer's shim preloaded, if it was built.

    The measuring loader accepts exactly this one variable with exactly this value
    (``loader._check_start``); without a built shim, C libraries' own I/O meets the barrier.
    """
    shim = loader.shim_path(_PYSCONE_DIR)
    return {"LD_PRELOAD": shim} if os.path.isfile(shim) else {}


class LaunchError(Exception):
    """The host cannot start the enclave (reported as one ``error:`` line)."""


def run(
    enclave: EnclaveConfig,
    host: HostConfig,
    *,
    inherit: Sequence[int] = (),
    boot_extra: Mapping[str, object] | None = None,
) -> int:
    """Run one enclave to completion; return its exit status (128+N for signal N).

    ``inherit`` are host fds of this process the enclave may use (a spawned child's,
    host/spawn.py), ``boot_extra`` more boot JSON (its ``spawn_channel``).
    """
    # The host holds every fd the enclave opens: allow as many as the hard limit does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    geometry = abi.Geometry(host.slots, host.slot_data)
    try:
        region = rings.SharedRegion.create(geometry)
    except OSError as e:
        size = geometry.total_size >> 20
        raise LaunchError(
            f"cannot create the {size} MiB shared-memory region for the system calls: {e.strerror}"
        ) from None
    try:
        pool = LanePool(host.processes, geometry)
    except OSError as e:
        region.close()
        raise LaunchError(f"cannot create the {host.processes} spare lanes for forked enclaves: {e.strerror}") from None
    bell_host = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    bell_enclave = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    executor = Executor(
        region, bell_host, bell_enclave, sthreads=host.sthreads, spin_us=host.spin_us, hostile=host.hostile
    )
    executor.family = HostFamily(pool)
    executor.spawner.configure(enclave, host)
    for fd in inherit:
        executor.adopt_inherited(fd)
    cfg_r, cfg_w = os.pipe()
    boot = {
        "shm_fd": region.fd,
        "bell_host": bell_host,
        "bell_enclave": bell_enclave,
        **asdict(enclave),
        "cwd": enclave.cwd or os.getcwd(),
        "cpu_count": os.cpu_count() or 1,
        "lanes": pool.boot_entries(),
        **(boot_extra or {}),
    }
    executor.start()
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {}
    try:
        # The enclave runs in its own session: the terminal's ^C reaches the launcher
        # only, which forwards it once.  It dies with the launcher (PR_SET_PDEATHSIG).
        proc = subprocess.Popen(
            [sys.executable, *loader.INTERPRETER_FLAGS, "-c", loader.BOOTSTRAP, str(cfg_r), _PYSCONE_DIR],
            pass_fds=(region.fd, bell_host, bell_enclave, cfg_r, *pool.fds()),
            env=_enclave_env(),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(cfg_r)
        for sig in forwarded:
            previous[sig] = signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
        with os.fdopen(cfg_w, "wb") as f:
            f.write(json.dumps({**boot, "host_pid": os.getpid()}).encode())
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        executor.stop()
    if code == EXIT_HOST_VIOLATION:
        reason = region.read_fatal()
        if reason:
            print(f"pyscone: enclave stopped: {reason}", file=sys.stderr)
    if enclave.stats:
        s = executor.stats
        print(
            f"pyscone: host: {s.requests} calls, {s.parked} parked, {s.pooled} on S-threads, "
            f"{s.doorbells_sent} doorbells, {s.sleeps} sleeps, {s.watchdog_wakeups} watchdog wake-ups",
            file=sys.stderr,
        )
        top = ", ".join(f"{abi.Op(op).name.lower()} {n}" for op, n in s.by_op.most_common(10))
        print(f"pyscone: host calls by kind: {top}", file=sys.stderr)
    region.close()
    pool.close()
    os.close(bell_host)
    os.close(bell_enclave)
    return 128 - code if code < 0 else code
