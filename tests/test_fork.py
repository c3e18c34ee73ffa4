"""os.fork in an enclave: a child enclave of its own, waits, signals, the family's life and death."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYSCONE, run_enclave, write_app

TESTS = Path(__file__).parent


def _lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_forked_child_runs_exits_and_is_reaped(tmp_path: Path, mode: str) -> None:
    app = write_app(
        tmp_path,
        """
        import os
        r = os.fork()
        if r == 0:
            with open("child.txt", "w") as f:  # the child's own host calls, on its own lane
                f.write(f"{os.getpid()} {os.getppid()}")
            os._exit(7)
        pid, status = os.waitpid(r, 0)
        child, parent = open("child.txt").read().split()
        print(pid == r == int(child), int(parent) == os.getpid(), os.waitstatus_to_exitcode(status))
        """,
    )
    assert _lines(run_enclave("--syscalls", mode, app, cwd=tmp_path)) == ["True True 7"]


def test_fds_are_shared_across_the_fork_as_natively(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, socket
        f = open("log.txt", "w")
        f.write("parent-before\\n"); f.flush()
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
        port = srv.getsockname()[1]
        pid = os.fork()
        if pid == 0:
            f.write("child\\n"); f.flush()  # the same open file description: one offset
            conn, _ = srv.accept()           # the inherited listening socket
            conn.sendall(conn.recv(100).upper())
            conn.close()
            os._exit(0)
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"hello from the parent")
        print(c.recv(100).decode())
        os.waitpid(pid, 0)
        f.write("parent-after\\n"); f.flush()
        os.utime(f.fileno(), ns=(10**18, 2 * 10**18))  # futimens, as gunicorn's worker heartbeat does
        print(os.fstat(f.fileno()).st_mtime_ns == 2 * 10**18)
        f.close()
        print(open("log.txt").read().split())
        """,
    )
    assert _lines(run_enclave(app, cwd=tmp_path)) == [
        "HELLO FROM THE PARENT",
        "True",
        "['parent-before', 'child', 'parent-after']",
    ]


def test_wait_family_signals_and_nested_forks(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, signal, time
        pid = os.fork()
        if pid == 0:
            got = []
            signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
            g = os.fork()
            if g == 0:
                os._exit(3)
            print("grandchild", os.waitstatus_to_exitcode(os.wait4(g, 0)[1]), flush=True)
            while not got:
                time.sleep(0.01)
            os._exit(5)
        print("nohang", os.waitpid(pid, os.WNOHANG), flush=True)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
        os.kill(pid, signal.SIGKILL)
        info = os.waitid(os.P_PID, pid, os.WEXITED)
        print("killed", info.si_code == os.CLD_KILLED, info.si_status == signal.SIGKILL, flush=True)
        for i in range(24):  # more forks than lanes: each lane comes back when its child is gone
            pid = os.fork()
            if pid == 0:
                os._exit(i)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == i
        try:
            os.wait()
        except ChildProcessError:
            print("no children left")
        print(signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL)
        """,
    )
    out = _lines(run_enclave(app, cwd=tmp_path))
    assert sorted(out[:2]) == ["grandchild 3", "nohang (0, 0)"]  # (parent and child print at once)
    assert out[2:] == [
        "child 5",
        "killed True True",
        "no children left",
        "True",
    ]


def test_an_app_sigchld_handler_and_a_blocked_wait_leave_other_lthreads_running(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, signal, threading, time
        seen = []
        signal.signal(signal.SIGCHLD, lambda s, f: seen.append(s))
        ticks = []
        def ticker():
            for _ in range(20):
                ticks.append(1); time.sleep(0.01)
        t = threading.Thread(target=ticker); t.start()
        pid = os.fork()
        if pid == 0:
            time.sleep(0.3)
            os._exit(0)
        os.waitpid(pid, 0)  # parks the main lthread only
        t.join()
        print(len(ticks) == 20, seen == [signal.SIGCHLD])
        """,
    )
    assert _lines(run_enclave(app, cwd=tmp_path)) == ["True True"]


def test_fork_from_a_thread_the_child_is_that_thread(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, threading, time
        def work():
            pid = os.fork()
            if pid == 0:
                print("child in", threading.current_thread().name == "worker", flush=True)
                return  # the child ends when its only thread does
            print("status", os.waitpid(pid, 0)[1], flush=True)
        t = threading.Thread(target=work, name="worker"); t.start(); t.join()
        """,
    )
    assert _lines(run_enclave(app, cwd=tmp_path)) == ["child in True", "status 0"]


def test_too_many_children_is_one_clear_error(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, time
        pids = []
        try:
            while True:
                pid = os.fork()
                if pid == 0:
                    time.sleep(30); os._exit(0)
                pids.append(pid)
        except BlockingIOError as e:
            print(len(pids), e)
        for p in pids:
            os.kill(p, 9); os.waitpid(p, 0)
        """,
    )
    out = _lines(run_enclave("--processes", "2", app, cwd=tmp_path))
    assert out == [
        "2 [Errno 11] no free lane for another enclave: at most 2 forked enclaves run at once (pyscone run --processes)"
    ]


def test_the_barrier_allows_fork_and_nothing_else_of_clone(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import ctypes, errno
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_VM, CLONE_THREAD, CLONE_SIGHAND = 0x100, 0x10000, 0x800
        for flags in (CLONE_VM | CLONE_SIGHAND | CLONE_THREAD, 17, 0x20000000 | 17):  # thread, plain, new pid ns
            r = libc.syscall(56, flags, 0, 0, 0, 0)
            print(r, errno.errorcode.get(ctypes.get_errno()))
        print(libc.syscall(435, 0, 0), errno.errorcode.get(ctypes.get_errno()))  # clone3
        """,
    )
    assert _lines(run_enclave(app, cwd=tmp_path)) == ["-1 EPERM"] * 4


@pytest.mark.parametrize("case", ["own", "far", "again"])
def test_a_host_that_names_a_wrong_lane_stops_the_enclave(tmp_path: Path, case: str) -> None:
    app = write_app(
        tmp_path,
        """
        import os, time
        first = os.fork()
        if first == 0:
            time.sleep(2); os._exit(0)
        second = os.fork()
        if second == 0:
            os._exit(0)
        print("not stopped")
        """,
    )
    env = {"PYSCONE_TEST_HOSTILE": f"py:fork_liars:LaneLie:{case}", "PYTHONPATH": str(TESTS)}
    r = run_enclave(app, cwd=tmp_path, env=env)
    assert "pyscone-test: lied about a fork's lane" in r.stderr
    assert "not stopped" not in r.stdout
    reason = {
        "own": "a fork's lane must be a positive number",
        "far": "the host named lane 10000, which is not a spare lane of this enclave",
        "again": "on which a child of this enclave still runs",
    }[case]
    assert "host violation: FORK: " in r.stderr and reason in r.stderr, r.stderr
    assert r.returncode != 0


def _family(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    out = {pid}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out |= _family(int(child))
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.add(p)
    return alive


@pytest.mark.parametrize("victim", ["launcher", "parent enclave"])
def test_no_enclave_outlives_a_killed_launcher_or_parent(tmp_path: Path, victim: str) -> None:
    app = write_app(
        tmp_path,
        """
        import os, time
        if os.fork() == 0:
            if os.fork() == 0:
                print("grandchild", os.getpid(), flush=True)
            while True:
                time.sleep(1)
        while True:
            time.sleep(1)
        """,
    )
    proc = subprocess.Popen([*PYSCONE, "run", str(app)], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("grandchild")
        family = _family(proc.pid)
        enclaves = [p for p in family if b"-I" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]
        assert len(enclaves) == 3, family
        first = min(enclaves)
        os.kill(proc.pid if victim == "launcher" else first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(family - {proc.pid}) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(family - {proc.pid}), "a process of the family outlived the " + victim
    finally:
        proc.kill()
        proc.wait()


def test_the_apps_fork_hooks_run_in_the_child_on_its_own_lane(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os
        os.register_at_fork(before=lambda: print("before", flush=True),
                            after_in_child=lambda: print("in child", flush=True),
                            after_in_parent=lambda: print("in parent", flush=True))
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print("done")
        """,
    )
    out = _lines(run_enclave(app, cwd=tmp_path))
    assert out[0] == "before" and out[-1] == "done" and sorted(out[1:3]) == ["in child", "in parent"]


def test_a_fork_right_after_a_reaped_child_waits_for_its_lane(tmp_path: Path) -> None:
    # With one spare lane, each fork comes a moment before the host has seen the last child go.
    app = write_app(
        tmp_path,
        """
        import os
        for i in range(20):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        print("20 forks")
        """,
    )
    assert _lines(run_enclave("--processes", "1", app, cwd=tmp_path)) == ["20 forks"]
