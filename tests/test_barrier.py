"""The barrier: un-interposed I/O fails closed; the environment is scrubbed; the heap is bounded."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import PYSCONE, run_enclave, write_app

import pyscone

PROBE = """
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, fn):
    ctypes.set_errno(0)
    rc = fn()
    print(name, rc, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno()))
# The raw system calls: libc's open() and socket() themselves go through the libc layer
# (tests/test_clib_sqlite.py, tests/test_clib_sockets.py).
attempt("open", lambda: libc.syscall(2, b"/etc/hostname", 0))  # SYS_open on x86-64
attempt("socket", lambda: libc.syscall(41, socket.AF_INET, socket.SOCK_STREAM, 0))  # SYS_socket
attempt("write", lambda: libc.write(2, b"leak\\n", 5))
attempt("getpid", lambda: int(libc.getpid() > 0))
with open("/etc/hostname") as f:
    print("interposed open", len(f.read()) > 0)
s = socket.socket()
print("interposed socket", s.fileno() >= 0)
s.close()
"""


def test_direct_syscalls_fail_with_eperm_interposed_ones_work(tmp_path: Path) -> None:
    app = write_app(tmp_path, PROBE)
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "open -1 EPERM",
        "socket -1 EPERM",
        "write -1 EPERM",
        "getpid 1 0",
        "interposed open True",
        "interposed socket True",
    ]
    assert "leak" not in r.stderr


def test_no_barrier_is_loud_and_really_off(tmp_path: Path) -> None:
    app = write_app(tmp_path, PROBE)
    r = run_enclave("--no-barrier", app, cwd=tmp_path)
    assert "WITHOUT its seccomp barrier" in r.stderr
    assert r.stdout.splitlines()[0] != "open -1 EPERM"


def test_running_other_programs_is_refused_with_enosys(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import errno, os, subprocess
        for name, fn in [("execv", lambda: os.execv("/bin/true", ["true"])),
                         ("system", lambda: os.system("true")), ("Popen", lambda: subprocess.Popen(["true"])),
                         ("run", lambda: subprocess.run(["true"]))]:
            try:
                fn()
                print(name, "ran")
            except OSError as e:
                print(name, e.errno == errno.ENOSYS, "not supported inside a pyscone enclave" in str(e))
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{n} True True" for n in ("execv", "system", "Popen", "run")]


def test_enclave_process_environment_is_scrubbed_and_not_dumpable(tmp_path: Path) -> None:
    app = write_app(tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(30)\n")
    env = dict(os.environ, HOST_SECRET="do-not-leak")
    proc = subprocess.Popen([*PYSCONE, "run", str(app)], cwd=tmp_path, env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1
        enclave = children[0]
        # Nothing of the host's environment: only the libc layer's shim, preloaded by the launcher.
        shim = Path(pyscone.__file__).parent / "enclave" / "clib" / "libpyscone-shim.so"
        assert Path(f"/proc/{enclave}/environ").read_bytes() == f"LD_PRELOAD={shim}\0".encode()
        status = Path(f"/proc/{enclave}/status").read_text()
        assert "Seccomp:\t2" in status  # filter mode
        # Non-dumpable: /proc/PID files of the enclave belong to root, not its user.
        assert "do-not-leak" not in Path(f"/proc/{enclave}/cmdline").read_text()
    finally:
        proc.kill()
        proc.wait()
        time.sleep(0.1)


def test_heap_limit_is_a_memory_error(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        try:
            block = bytearray(600 * 1024 * 1024)
            print("allocated")
        except MemoryError:
            print("MemoryError")
        small = bytearray(10 * 1024 * 1024)
        print("still alive", len(small))
        """,
    )
    r = run_enclave("--heap", "256M", app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "MemoryError\nstill alive 10485760\n"
    big = run_enclave("--heap", "2G", app, cwd=tmp_path)
    assert big.stdout.startswith("allocated"), big.stderr
