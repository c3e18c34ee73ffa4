"""fd-level calls in real enclaves: ``fcntl``, ``flock``/``lockf``, inheritable and blocking flags."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Server, free_port, run_enclave, run_native, write_app
from test_fs_shield import FS

FLAGS_APP = """
    import fcntl, os, socket, sys
    f = open("data.txt", "w")
    fd = f.fileno()
    print("file", fcntl.fcntl(fd, fcntl.F_GETFD), os.get_inheritable(fd), oct(fcntl.fcntl(fd, fcntl.F_GETFL)))
    os.set_inheritable(fd, True)
    print("inheritable", os.get_inheritable(fd), fcntl.fcntl(fd, fcntl.F_GETFD))
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    print("cloexec", os.get_inheritable(fd))
    os.set_blocking(fd, False)
    print("nonblocking", os.get_blocking(fd), oct(fcntl.fcntl(fd, fcntl.F_GETFL)))
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    print("blocking", os.get_blocking(fd))
    r = open("data.txt", "rb")
    print("reader", oct(fcntl.fcntl(r, fcntl.F_GETFL)), oct(fcntl.fcntl(os.open("data.txt", os.O_RDWR | os.O_APPEND), fcntl.F_GETFL)))
    s = socket.socket()
    print("socket", os.get_blocking(s.fileno()), s.get_inheritable(), oct(fcntl.fcntl(s, fcntl.F_GETFL)))
    s.settimeout(2.0)
    print("timeout", os.get_blocking(s.fileno()))
    s.setblocking(True)
    print("blocking socket", os.get_blocking(s.fileno()))
    s.set_inheritable(True)
    print("socket inheritable", s.get_inheritable())
    a, b = socket.socketpair()
    os.set_blocking(a.fileno(), False)  # under a socket object that still thinks it blocks
    try:
        a.recv(10)
    except BlockingIOError as e:
        print("recv would block", e.errno)
    print("console", os.get_inheritable(1), fcntl.fcntl(2, fcntl.F_GETFD))
    s.close()
    for bad in (lambda: os.get_inheritable(s.fileno() if s.fileno() >= 0 else 999),
                lambda: fcntl.fcntl(999, fcntl.F_GETFD), lambda: os.set_blocking(999, False)):
        try:
            bad()
        except OSError as e:
            print("bad fd", e.errno)
"""


def test_fd_flags_read_and_change_as_natively(tmp_path: Path) -> None:
    app = write_app(tmp_path, FLAGS_APP)
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout
    assert "recv would block 11" in r.stdout and r.stdout.count("bad fd 9") == 3


LOCKER = """
import fcntl, sys, time
f = open(sys.argv[1], "w")
fcntl.flock(f, fcntl.LOCK_EX)
fcntl.lockf(f, fcntl.LOCK_EX)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(float(sys.argv[2]))
"""

WAITER_APP = """
    import fcntl, threading, time
    ticks = []
    stop = False
    def ticker():
        while not stop:
            ticks.append(1)
            time.sleep(0.05)
    threading.Thread(target=ticker, daemon=True).start()
    f = open("shared.lock", "a")
    for name, try_lock in (("flock", lambda: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)),
                           ("lockf", lambda: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB))):
        try:
            try_lock()
            print(name, "granted while the host process holds it")
        except BlockingIOError as e:
            print(name, "busy", e.errno)
    t0 = time.monotonic()
    fcntl.flock(f, fcntl.LOCK_EX)  # waits for the other process, parking this lthread only
    waited = time.monotonic() - t0
    fcntl.lockf(f, fcntl.LOCK_EX)
    stop = True
    print("locked after the holder left", waited > 0.5, "ticks while waiting", len(ticks) > 5)
    fcntl.flock(f, fcntl.LOCK_UN)
    print("unlocked")
"""


def test_locks_on_host_files_are_the_hosts_and_a_wait_parks_one_lthread(tmp_path: Path) -> None:
    lock = tmp_path / "shared.lock"
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(lock), "1.5"])
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "shared.lock.ready").exists():
            assert time.monotonic() < deadline and holder.poll() is None, "the lock holder did not start"
            time.sleep(0.02)
        r = run_enclave(write_app(tmp_path, WAITER_APP), cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "flock busy 11",
        "lockf busy 11",
        "locked after the holder left True ticks while waiting True",
        "unlocked",
    ], r.stdout


SHIELDED_APP = """
    import fcntl, os, sys, threading, time
    for d in sys.argv[1:]:
        p = os.path.join(d, "state.db")
        with open(p, "w") as f:
            f.write("x")
        a, b = open(p, "r+"), open(p, "rb")
        print(d[-3:], "flags", oct(fcntl.fcntl(a, fcntl.F_GETFL)), oct(fcntl.fcntl(b, fcntl.F_GETFL)), fcntl.fcntl(a, fcntl.F_GETFD))
        fcntl.flock(a, fcntl.LOCK_SH)
        fcntl.flock(b, fcntl.LOCK_SH | fcntl.LOCK_NB)
        print(d[-3:], "two shared")
        fcntl.flock(b, fcntl.LOCK_UN)
        fcntl.flock(a, fcntl.LOCK_EX)
        try:
            fcntl.flock(b, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError as e:
            print(d[-3:], "exclusive excludes", e.errno)
        fcntl.lockf(b, fcntl.LOCK_EX | fcntl.LOCK_NB)  # POSIX locks never conflict within a process
        print(d[-3:], "lockf granted")
        got = []
        def wait_for_it():
            fcntl.flock(b, fcntl.LOCK_EX)
            got.append(time.monotonic())
        t = threading.Thread(target=wait_for_it)
        t.start()
        time.sleep(0.3)
        print(d[-3:], "still waiting", not got)
        a.close()  # closing the file drops its lock
        t.join(5)
        print(d[-3:], "granted after close", bool(got))
        b.close()
"""


def test_locks_on_shielded_files_behave_as_natively(tmp_path: Path) -> None:
    fs = FS(tmp_path)
    app = write_app(tmp_path, SHIELDED_APP)
    r = fs.run(app, str(fs.enc), str(fs.mem))
    assert r.returncode == 0, r.stderr
    for d in ("enc", "mem"):
        assert f"{d} flags 0o100002 0o100000 1" in r.stdout, r.stdout
        for line in ("two shared", "exclusive excludes 11", "lockf granted", "still waiting True"):
            assert f"{d} {line}" in r.stdout, r.stdout
        assert f"{d} granted after close True" in r.stdout, r.stdout


REFUSED_APP = """
    import fcntl, os
    f = open("x.txt", "w")
    for what, call in (("F_GETPIPE_SZ", lambda: fcntl.fcntl(f, fcntl.F_GETPIPE_SZ)),
                       ("F_GETLK", lambda: fcntl.fcntl(f, fcntl.F_GETLK, bytes(32))),
                       ("O_APPEND", lambda: fcntl.fcntl(f, fcntl.F_SETFL, os.O_APPEND)),
                       ("ioctl", lambda: fcntl.ioctl(f, 0x541B, bytes(4)))):
        try:
            call()
            print(what, "ran")
        except OSError as e:
            print(what, e.errno, e.strerror)
    for bad in (lambda: fcntl.flock(f, 99), lambda: fcntl.lockf(f, 99)):
        try:
            bad()
        except OSError as e:
            print("invalid", e.errno)
"""


def test_what_is_not_supported_is_refused_by_name(tmp_path: Path) -> None:
    r = run_enclave(write_app(tmp_path, REFUSED_APP), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "F_GETPIPE_SZ 38 fcntl F_GETPIPE_SZ is not supported inside a pyscone enclave"
    assert lines[1] == "F_GETLK 38 fcntl F_GETLK is not supported inside a pyscone enclave"
    assert (
        lines[2] == "O_APPEND 38 fcntl F_SETFL of flags other than O_NONBLOCK is not supported inside a pyscone enclave"
    )
    assert lines[3] == "ioctl 38 fcntl.ioctl is not supported inside a pyscone enclave"
    assert lines[4:] == ["invalid 22", "invalid 22"]


CHERRYPY_APP = """
    import sys
    import cherrypy
    class Root:
        @cherrypy.expose
        def index(self):
            return "hello from cherrypy\\n"
    cherrypy.config.update({"server.socket_host": "127.0.0.1", "server.socket_port": int(sys.argv[1]),
                            "engine.autoreload.on": False})
    cherrypy.quickstart(Root())
"""


def test_cherrypy_serves_curl(tmp_path: Path, server: list[Server]) -> None:
    """cheroot makes its listening socket non-inheritable with fcntl(F_GETFD/F_SETFD)."""
    pytest.importorskip("cherrypy")
    port = free_port()
    server.append(Server([str(write_app(tmp_path, CHERRYPY_APP)), str(port)], tmp_path, port))
    out = subprocess.run(["curl", "-s", "-m", "10", f"http://127.0.0.1:{port}/"], capture_output=True, text=True)
    assert out.stdout == "hello from cherrypy\n", out
