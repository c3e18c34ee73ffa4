"""The ``pyscone`` command line: a thin layer that parses and calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pyscone import abi

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class UsageError(Exception):
    """A user mistake: reported as one ``error: ...`` line."""


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and t[-1:] else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise UsageError(f"{text!r} is not a size (examples: 512M, 2G, 1048576)")
    return int(number) * SIZE_UNITS[unit]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse_size(raw)
    except UsageError:
        raise UsageError(f"{name}={raw!r} is not a number") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyscone", description="Secure containers for unmodified Python applications.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a Python program in a (simulated) enclave",
        description="Run an unmodified Python program in a simulated enclave. Arguments after the program go to it.",
    )
    run.add_argument("-m", dest="module", metavar="MODULE", help="run a library module as a script, like python -m")
    run.add_argument(
        "--syscalls",
        choices=("async", "sync"),
        default=os.environ.get("PYSCONE_SYSCALLS", "async"),
        help="asynchronous (default) or synchronous system calls  [PYSCONE_SYSCALLS]",
    )
    run.add_argument(
        "--slots", type=int, default=None, help=f"syscall slots (default {abi.DEFAULT_SLOTS})  [PYSCONE_SLOTS]"
    )
    run.add_argument("--slot-size", default=None, help="data bytes per slot (default 64K)  [PYSCONE_SLOT_SIZE]")
    run.add_argument(
        "--sthreads",
        type=int,
        default=None,
        help="host S-threads: 1 dispatcher/reactor + N-1 pool threads (default 3)  [PYSCONE_STHREADS]",
    )
    run.add_argument(
        "--spin-us",
        type=int,
        default=None,
        help="max spin before sleeping, in microseconds (default 400; 0 in sync mode)  [PYSCONE_SPIN_US]",
    )
    run.add_argument("--heap", default=None, help="enclave heap limit, e.g. 512M (default 1G)  [PYSCONE_HEAP]")
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the app (the host's environment never reaches the enclave)",
    )
    run.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE before lockdown (for C extensions outside the standard library)",
    )
    run.add_argument("--no-barrier", action="store_true", help="DEBUG ONLY: do not install the seccomp barrier")
    run.add_argument("--stats", action="store_true", help="print system-call statistics at exit")
    run.add_argument("program", nargs="?", help="the script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the program")
    return p


def cmd_run(a: argparse.Namespace) -> int:
    from pyscone.host import launcher

    if a.module:
        argv = [a.module] + ([a.program] if a.program else []) + a.args
    elif a.program:
        if not os.path.isfile(a.program):
            raise UsageError(f"can't open file {a.program!r}: no such file")
        argv = [a.program, *a.args]
    else:
        raise UsageError("pyscone run needs a program (pyscone run app.py) or a module (pyscone run -m module)")
    env = {}
    for item in a.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    slots = a.slots if a.slots is not None else _env_int("PYSCONE_SLOTS", abi.DEFAULT_SLOTS)
    slot_data = parse_size(a.slot_size) if a.slot_size else _env_int("PYSCONE_SLOT_SIZE", abi.DEFAULT_SLOT_DATA)
    sthreads = a.sthreads if a.sthreads is not None else _env_int("PYSCONE_STHREADS", 3)
    # Sync mode models an enclave exit per call: the thread leaves (hands the call to the host
    # through the kernel and sleeps), so by default neither side spins.  --spin-us overrides.
    spin_default = 0 if a.syscalls == "sync" else 400
    spin = a.spin_us if a.spin_us is not None else _env_int("PYSCONE_SPIN_US", spin_default)
    heap = parse_size(a.heap) if a.heap else _env_int("PYSCONE_HEAP", 1 << 30)
    try:
        abi.Geometry(slots, slot_data)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if sthreads < 1:
        raise UsageError("--sthreads must be at least 1")
    if spin < 0:
        raise UsageError("--spin-us must not be negative")
    if a.no_barrier:
        print(
            "pyscone: WARNING: --no-barrier: the enclave runs WITHOUT its seccomp barrier; "
            "un-interposed I/O reaches the host in the clear. Debugging only.",
            file=sys.stderr,
        )
    enclave = launcher.EnclaveConfig(
        argv=argv,
        module=bool(a.module),
        env=env,
        syscalls=a.syscalls,
        spin_us=spin,
        heap=heap,
        barrier=not a.no_barrier,
        preload=a.preload,
        stats=a.stats,
    )
    host = launcher.HostConfig(
        slots=slots,
        slot_data=slot_data,
        sthreads=sthreads,
        spin_us=spin,
        hostile=os.environ.get("PYSCONE_TEST_HOSTILE") or None,
    )
    return launcher.run(enclave, host)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if a.command == "run":
            return cmd_run(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. an unknown PYSCONE_TEST_HOSTILE mode
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {a.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
