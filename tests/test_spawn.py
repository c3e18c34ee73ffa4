"""Spawning Python from an enclave: a fresh child enclave, configured by its parent over an attested channel.

Real enclaves (``pyscone run``) spawning real child enclaves; a lying host is
``PYSCONE_TEST_HOSTILE_SPAWN`` (host/spawn.py) or a liar of tests/spawn_liars.py.  The
channel's sans-IO core is tests/test_spawnproto.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYSCONE, Server, free_port, run_enclave, wait_port, write_app
from test_cas import Service, World

from pyscone.host import fspf_tool as tool

SECRET = "s3cret-the-host-must-never-see"


def test_run_with_exit_codes_env_cwd_and_a_script(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write_app(
        tmp_path / "sub",
        """
        import os, sys
        print("child", os.getcwd(), os.environ.get("FOO"), sorted(os.environ), sys.argv, flush=True)
        sys.exit(int(sys.argv[1]))
        """,
        "child.py",
    )
    app = write_app(
        tmp_path,
        """
        import functools, os, subprocess, sys
        print = functools.partial(print, flush=True)
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out.txt")
        with open(out, "wb") as f:
            r = subprocess.run([sys.executable, "child.py", "3"], cwd="sub", env={"FOO": "bar"}, stdout=f)
        print("rc", r.returncode)
        print("file", open(out).read().strip())
        r = subprocess.run([sys.executable, "-c", "import sys; print('c', sys.argv); sys.exit(5)", "x"])
        print("rc", r.returncode)
        print("call", subprocess.call([sys.executable, "-I", "-B", "-W", "ignore", "-m", "json.tool", "--help"],
                                      stdout=subprocess.DEVNULL))
        try:
            subprocess.run([sys.executable, "-c", "pass"], cwd="/no/such/dir")
        except FileNotFoundError as e:
            print("cwd", e)
        os.environ["FROM_PARENT"] = "inherited"
        print("inherit", subprocess.run([sys.executable, "-c",
              "import os, sys; sys.exit(0 if os.environ.get('FROM_PARENT') == 'inherited' else 9)"]).returncode)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "rc 3"
    assert lines[1] == f"file child {tmp_path / 'sub'} bar ['FOO'] ['child.py', '3']"
    assert lines[2:] == [
        "c ['-c', 'x']",
        "rc 5",
        "call 0",
        "cwd [Errno 2] No such file or directory: '/no/such/dir'",
        "inherit 0",
    ]


def test_popen_wait_poll_kill_terminate_and_os_waitpid(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import functools, os, signal, socket, subprocess, sys, time
        print = functools.partial(print, flush=True)
        a, b = socket.socketpair()
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3); print('over a socket')"],
                             stdout=b.fileno())
        b.close()
        print("poll", p.poll())
        print("wait", p.wait(), a.recv(100))
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
        p = subprocess.Popen(sleeper)
        try:
            p.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            print("timeout")
        p.terminate()
        print("terminate", p.wait())
        p = subprocess.Popen(sleeper)
        p.kill()
        print("kill", p.wait(), p.poll())
        p = subprocess.Popen(sleeper)
        os.kill(p.pid, signal.SIGTERM)
        pid, status = os.waitpid(p.pid, 0)
        print("waitpid", pid == p.pid, os.WIFSIGNALED(status), os.WTERMSIG(status))
        try:
            os.waitpid(p.pid, 0)
        except ChildProcessError:
            print("reaped")
        p = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(4)"])
        print("wait any", os.wait() == (p.pid, 4 << 8))
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "poll None",
        "wait 0 b'over a socket\\n'",
        "timeout",
        "terminate -15",
        "kill -9 -9",
        "waitpid True True 15",
        "reaped",
        "wait any True",
    ]


def test_what_is_not_the_enclaves_python_is_refused_with_one_enosys(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import errno, functools, os, subprocess, sys
        print = functools.partial(print, flush=True)
        def attempt(what, **kw):
            try:
                subprocess.run(what, **kw)
            except OSError as e:
                print(e.errno == errno.ENOSYS, e)
            else:
                print("ran", what)
        attempt(["ls"])
        attempt(["/bin/sh", "-c", "true"])
        attempt("true", shell=True)
        attempt([sys.executable, "-i"])  # an option a spawned enclave does not take
        attempt([sys.executable, "-c", "pass"], executable="/bin/true")  # executable= is what would run
        attempt([sys.executable, "-c", "pass"], preexec_fn=lambda: None)
        for refused in (os.posix_spawn, os.execv):
            try:
                refused(sys.executable, [sys.executable], {})
            except OSError as e:
                print(e.errno == errno.ENOSYS, e)
        # python3 on the app's PATH is the enclave's Python when it resolves to it
        print("path", subprocess.run(["python3", "-c", "pass"]).returncode)
        """,
    )
    bindir = os.path.dirname(sys.executable)
    r = run_enclave("--env", f"PATH={bindir}", app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 9 and "Traceback" not in r.stderr
    assert all(line.startswith("True [Errno 38] ") for line in lines[:8]), lines
    assert "running ls is not supported inside a pyscone enclave" in lines[0]  # (not on the PATH given)
    assert "python option -i" in lines[3] and "running /bin/true" in lines[4] and "preexec_fn" in lines[5]
    assert lines[8] == "path 0"


def test_pipes_to_a_spawned_child(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, subprocess, sys
        print(subprocess.check_output([sys.executable, "-c", "print('over a pipe')"]), flush=True)
        code = "import sys; data = sys.stdin.read(); print(data.upper()); print('to stderr', file=sys.stderr)"
        r = subprocess.run([sys.executable, "-c", code], input=b"hello " * 20000, capture_output=True)
        print(r.returncode, len(r.stdout), r.stdout[:12], r.stderr, flush=True)
        r = subprocess.run([sys.executable, "-c", "import sys; print('both'); print('streams', file=sys.stderr)"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(sorted(r.stdout.split()), flush=True)
        rd, wr = os.pipe()  # a pipe of the app's own, by its number
        p = subprocess.Popen([sys.executable, "-c", f"import os; os.write({wr}, b'by number'); os.close({wr})"],
                             pass_fds=(wr,))
        os.close(wr)
        print(os.read(rd, 100), os.read(rd, 100), p.wait(), flush=True)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "b'over a pipe\\n'",
        "0 120001 b'HELLO HELLO ' b'to stderr\\n'",
        "['both', 'streams']",
        "b'by number' b'' 0",
    ]


def test_multiprocessing_spawn_runs_a_target_over_its_pipes(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import multiprocessing, os
        def f(conn, x):
            conn.send(("child", x * 2, os.getpid() != os.getppid()))
            conn.close()
        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=f, args=(w, 21))
            p.start()
            print(r.recv(), flush=True)
            p.join()
            print("exitcode", p.exitcode, flush=True)
            p = ctx.Process(target=os._exit, args=(3,))
            p.start()
            p.join()
            print("exitcode", p.exitcode, flush=True)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["('child', 42, True)", "exitcode 0", "exitcode 3"]


def test_the_child_gets_the_family_key_and_env_from_the_parent_never_in_the_hosts_sight(tmp_path: Path) -> None:
    record = tmp_path / "relayed.bin"
    app = write_app(
        tmp_path,
        f"""
        import os, subprocess, sys
        from pyscone.enclave import family
        print("parent", family.key.hex(), flush=True)
        env = {{"SECRET": "{SECRET}"}}
        code = "import os; from pyscone.enclave import family; print('child', family.key.hex(), os.environ['SECRET'])"
        subprocess.run([sys.executable, "-c", code], env=env)
        """,
    )
    r = run_enclave(app, cwd=tmp_path, env={"PYSCONE_TEST_HOSTILE_SPAWN": f"record:{record}"})
    assert r.returncode == 0, r.stderr
    parent, child = r.stdout.splitlines()
    key = parent.split()[1]
    assert child == f"child {key} {SECRET}" and len(key) == 64
    relayed = record.read_bytes()
    assert len(relayed) > 200  # hello, evidence, configuration, acknowledgement
    assert SECRET.encode() not in relayed and bytes.fromhex(key) not in relayed and key.encode() not in relayed
    assert b"SECRET" not in relayed and b"print" not in relayed  # env names and argv too


def test_parent_and_spawned_children_commit_one_fspf_and_lose_nothing(tmp_path: Path) -> None:
    """Distinct files, and one shared file written in turns under flock (fsfamily.py's lock, as at a fork)."""
    fspf = tmp_path / "fs.fspf"
    enc = tmp_path / "enc"
    enc.mkdir()
    paths = tool.Paths.of(str(fspf))
    tool.create(paths)
    tool.add_region(paths, str(enc), "encrypted", 4096)
    child = write_app(
        tmp_path,
        f"""
        import fcntl, sys
        me = sys.argv[1]
        print(open("{enc}/secret.txt").read(), flush=True)  # the parent's commit
        with open(f"{enc}/{{me}}.txt", "w") as f:
            f.write(f"written by {{me}}")
        for i in range(5):
            with open("{enc}/shared.log", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(f"{{me}} {{i}}\\n")
                f.flush()
                fcntl.flock(f, fcntl.LOCK_UN)
        """,
        "child.py",
    )
    app = write_app(
        tmp_path,
        f"""
        import fcntl, subprocess, sys
        with open("{enc}/secret.txt", "w") as f:
            f.write("{SECRET}")
        open("{enc}/shared.log", "w").close()
        kids = [subprocess.Popen([sys.executable, "{child}", f"child{{n}}"]) for n in range(2)]
        for i in range(5):
            with open("{enc}/shared.log", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(f"parent {{i}}\\n")
                f.flush()
                fcntl.flock(f, fcntl.LOCK_UN)
        print("rc", [k.wait() for k in kids], flush=True)
        """,
    )
    r = run_enclave("--fspf", fspf, app, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [SECRET, SECRET, "rc [0, 0]"], r.stdout + r.stderr
    assert SECRET.encode() not in (enc / "secret.txt").read_bytes()
    again = write_app(
        tmp_path,
        f"""
        print(open("{enc}/child0.txt").read(), open("{enc}/child1.txt").read())
        print(sorted(open("{enc}/shared.log").read().splitlines()))
        """,
        "again.py",
    )
    r = run_enclave("--fspf", fspf, again, cwd=tmp_path)  # the next run mounts the family's last commit
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "written by child0 written by child1"
    assert lines[1] == str(sorted(f"{who} {i}" for who in ("parent", "child0", "child1") for i in range(5)))


# -- a host that lies --------------------------------------------------------------------------


_TWO_CHILDREN = """
    import functools, subprocess, sys
    print = functools.partial(print, flush=True)
    for i in range(2):
        try:
            r = subprocess.run([sys.executable, "-c", f"print('child {i} configured')"])
            print("exit", r.returncode)
        except OSError as e:
            print("refused", e.errno, e)
    """


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("signed")
    for args in (("keygen", "signer.pem"), ("sign", "--key", "signer.pem", "-o", "app.sig")):
        r = subprocess.run([*PYSCONE, *args], cwd=d, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    write_app(d, _TWO_CHILDREN)
    return d


def test_a_measured_parent_configures_its_own_runtime(signed: Path) -> None:
    r = run_enclave("--signature", "app.sig", "app.py", cwd=signed)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["child 0 configured", "exit 0", "child 1 configured", "exit 0"]


def test_a_substituted_child_gets_nothing(signed: Path) -> None:
    """The host starts another runtime (another heap limit: another MRENCLAVE, signature dropped)."""
    r = run_enclave("--signature", "app.sig", "app.py", cwd=signed, env={"PYSCONE_TEST_HOSTILE_SPAWN": "heap"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused 13 ") for line in lines), lines
    assert "the child is enclave" in lines[0] and "not the parent's" in lines[0]
    assert "configured" not in r.stdout


@pytest.mark.parametrize("lie", ["tamper", "replay"])
def test_a_tampered_or_replayed_configuration_opens_nowhere(tmp_path: Path, lie: str) -> None:
    app = write_app(tmp_path, _TWO_CHILDREN)
    r = run_enclave(app, cwd=tmp_path, env={"PYSCONE_TEST_HOSTILE_SPAWN": lie})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    refused = "refused 13 [Errno 13] the spawned child was refused its configuration: the channel closed"
    if lie == "tamper":
        assert len(lines) == 2 and all(line.startswith(refused) for line in lines), lines
    else:  # the first child gets the honest message; the second the first one's, which does not open
        assert lines[:2] == ["child 0 configured", "exit 0"] and lines[2].startswith(refused), lines
    assert "spawned child: the configuration does not open (not sealed for this channel)" in r.stderr
    assert "child 1 configured" not in r.stdout


def test_asyncio_subprocesses_of_python(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import asyncio, sys
        async def main():
            code = "import sys; print('from asyncio', flush=True); sys.exit(6)"
            p = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
            print("rc", await p.wait(), flush=True)
        asyncio.run(main())
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["from asyncio", "rc 6"]


# -- with a CAS: the child must quote on the platform the CAS trusted -------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("cas"))
    write_app(w.root, _TWO_CHILDREN)
    policy = w.policy("spawner", f"    mrenclaves: [{w.measure()}]\n    argv: [app.py]\n    env: {{MODE: prod}}\n")
    created = w.owner("session", "create", str(policy))
    assert created.returncode == 0, created.stderr
    yield w
    w.stop()


def test_an_attested_parent_configures_a_child_that_quotes_on_its_platform(world: World) -> None:
    r = world.run("spawner/app")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["child 0 configured", "exit 0", "child 1 configured", "exit 0"]
    audit = world.owner("audit", "spawner").stdout
    # The parent attested once (one run); each child joined as a spawned child of the service.
    assert audit.count(" attest  ok") == 1 and audit.count(" join    ok") == 2, audit


def _run_hostile(world: World, lie: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PYSCONE, "run", *world.pin, "--session", "spawner/app", "--las", f"127.0.0.1:{world.las.port}"],
        cwd=world.root, env={**os.environ, "PYSCONE_TEST_HOSTILE_SPAWN": lie}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_a_child_quoting_on_another_platform_gets_nothing(world: World, tmp_path: Path) -> None:
    """The host runs a LAS of its own, which signs any report (as any simulated LAS does)."""
    rogue = Service(["las", "--dir", str(tmp_path / "rogue"), "--listen", "127.0.0.1:0"], r":(\d+)$")
    try:
        r = _run_hostile(world, f"las:127.0.0.1:{rogue.port}")
    finally:
        rogue.stop()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all("quote from an untrusted platform" in line for line in lines), lines


def test_a_host_cannot_play_the_parent_of_an_attested_child(world: World) -> None:
    """The host answers the child itself, with its own program: the child asks the CAS for the
    service's spawn key (as a spawned child: no run starts), and the host has no proof of it."""
    joins = world.owner("audit", "spawner").stdout.count(" join    ok")
    r = _run_hostile(world, "impostor")
    assert r.returncode == 0, r.stderr
    assert "HOST CODE RAN" not in r.stdout and "configured" not in r.stdout
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused 13 ") for line in lines), lines
    assert r.stderr.count("the parent is not an attested enclave of this service") == 2, r.stderr
    # The CAS vouched for each child (they joined), and each then refused the host's configuration.
    assert world.owner("audit", "spawner").stdout.count(" join    ok") == joins + 2


def test_djangos_auto_reloader_restarts_its_child_enclave(tmp_path: Path) -> None:
    """``manage.py runserver``: the parent spawns the server child, which exits 3 on a change; again."""
    pytest.importorskip("django")
    made = subprocess.run([sys.executable, "-m", "django", "startproject", "proj", str(tmp_path)], capture_output=True)
    assert made.returncode == 0, made.stderr
    port = free_port()
    server = Server(["manage.py", "runserver", f"127.0.0.1:{port}"], tmp_path, port)
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).status == 200
        # The request imported proj.urls: let the reloader's scan (a stat of every module file, each a host
        # call) see it once before it changes.
        time.sleep(6)
        with open(tmp_path / "proj" / "urls.py", "a") as f:
            f.write("\n# changed\n")
        time.sleep(5)  # the reloader looks once a second: the old child exits 3, the parent starts another
        wait_port(port, timeout=30)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).status == 200
    finally:
        _, out, err = server.stop()
    assert "proj/urls.py changed, reloading." in err, err
    assert err.count("Watching for file changes with StatReloader") == 2, err
    # (the second child's stdout is block-buffered and lost when SIGINT stops the parent, which kills
    # it: natively the same; its stderr is the logging module's, flushed)
    assert "Starting development server at" in out


@pytest.mark.parametrize("case", ["console", "pid", "status", "running"])
def test_a_host_that_lies_about_a_spawned_child_stops_the_enclave(tmp_path: Path, case: str) -> None:
    app = write_app(
        tmp_path,
        """
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
        p.poll()
        p.wait()
        print("not stopped")
        """,
    )
    env = {"PYSCONE_TEST_HOSTILE": f"py:spawn_liars:SpawnLie:{case}", "PYTHONPATH": str(Path(__file__).parent)}
    r = run_enclave(app, cwd=tmp_path, env=env)
    assert f"pyscone-test: lied about a spawn ({case})" in r.stderr
    assert "not stopped" not in r.stdout and r.returncode == 86, (r.returncode, r.stderr)
    reason = {
        "console": "SPAWN: host returned fd 1, which is already open in the enclave",
        "pid": "SPAWN_WAIT: wait for pid",
        "status": "which is no exit",
        "running": "a child that still runs has no status",
    }[case]
    assert "host violation: " in r.stderr and reason in r.stderr, r.stderr


def test_a_spawned_child_does_not_outlive_its_parents_launcher(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, subprocess, sys, time
        code = "import os, time; print('child', os.getpid(), flush=True); time.sleep(60)"
        p = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(1.5)
        print("helper", p.pid, flush=True)
        """,  # the parent exits without waiting
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pids = {line.split()[0]: int(line.split()[1]) for line in r.stdout.splitlines()}
    assert set(pids) == {"child", "helper"}, r.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids.values()):
        time.sleep(0.1)
    alive = [name for name, pid in pids.items() if Path(f"/proc/{pid}").exists()]
    assert not alive, alive


def test_pass_fds_gives_the_child_host_sockets_and_files_at_their_numbers(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, socket, subprocess, sys
        a, b = socket.socketpair()
        f = open("passed.txt", "wb")
        os.set_inheritable(b.fileno(), True)
        code = (
            "import os, socket, sys\\n"
            "s = socket.socket(fileno=int(sys.argv[1]))\\n"
            "s.sendall(b'hello over ' + s.family.name.encode())\\n"
            "print('from the child', s.recv(100).decode(), flush=True)\\n"
            "os.write(int(sys.argv[2]), b'written by the child')\\n"
        )
        p = subprocess.Popen([sys.executable, "-c", code, str(b.fileno()), str(f.fileno())],
                             pass_fds=(b.fileno(), f.fileno()))
        print(a.recv(100).decode(), flush=True)
        a.sendall(b"and back")
        print("rc", p.wait(), flush=True)
        f.close()
        print(open("passed.txt").read())
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "hello over AF_UNIX",
        "from the child and back",
        "rc 0",
        "written by the child",
    ]


def test_a_forked_child_spawns_and_waits_for_its_own_children(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, subprocess, sys
        mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
        pid = os.fork()
        if pid == 0:
            try:
                os.waitpid(mine.pid, os.WNOHANG)  # the parent's spawned child is not ours
            except ChildProcessError:
                print("not mine", flush=True)
            r = subprocess.run([sys.executable, "-c", "print('spawned by a forked child', flush=True); exit(2)"])
            print("forked child: spawned rc", r.returncode, flush=True)
            os._exit(0)
        print("parent: forked rc", os.waitpid(pid, 0)[1] >> 8, "spawned rc", mine.wait(), flush=True)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "not mine",
        "spawned by a forked child",
        "forked child: spawned rc 2",
        "parent: forked rc 0 spawned rc 0",
    ]


def test_in_dev_mode_a_host_may_play_the_parent(tmp_path: Path) -> None:
    """Dev mode's limit, kept visible: no CAS vouches for the parent, so the host can configure the child
    (as it configures every dev-mode enclave); the app's Popen still fails, as the host is no child."""
    app = write_app(tmp_path, _TWO_CHILDREN)
    r = run_enclave(app, cwd=tmp_path, env={"PYSCONE_TEST_HOSTILE_SPAWN": "impostor"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("HOST CODE RAN") == 2 and r.stdout.count("refused 13 ") == 2, r.stdout


def test_a_spawned_child_writes_its_consoles_records_as_a_run_of_the_family(tmp_path: Path) -> None:
    key = tmp_path / "console.key"
    made = subprocess.run([*PYSCONE, "console", "--make-key", "--key-file", str(key)], capture_output=True)
    assert made.returncode == 0, made.stderr
    app = write_app(
        tmp_path,
        f"""
        import subprocess, sys
        print("parent {SECRET}", flush=True)
        r = subprocess.run([sys.executable, "-c", "print('child {SECRET}')"])
        print("after", r.returncode, flush=True)
        """,
    )
    r = run_enclave("--console-key-file", key, app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout
    log = tmp_path / "out.log"
    log.write_text(r.stdout)
    shown = subprocess.run([*PYSCONE, "console", "--key-file", str(key), str(log)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [f"parent {SECRET}", f"child {SECRET}", "after 0"]
    assert "and its 1 child run" in shown.stderr


def test_multiprocessing_spawn_pool_queue_and_lock(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import multiprocessing
        def square(x):
            return x * x
        def put(q, lock, n):
            with lock:
                q.put(n)
        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(2) as pool:
                print(pool.map(square, range(8)), flush=True)
            q, lock = ctx.Queue(), ctx.Lock()
            ps = [ctx.Process(target=put, args=(q, lock, n)) for n in range(3)]
            for p in ps:
                p.start()
            print(sorted(q.get(timeout=60) for _ in ps), [p.join() or p.exitcode for p in ps], flush=True)
        """,
    )
    r = run_enclave(app, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str([x * x for x in range(8)]), "[0, 1, 2] [0, 0, 0]"]


def test_uvicorn_workers_are_spawned_enclaves(tmp_path: Path) -> None:
    """``uvicorn --workers 2``: a spawn context, the listening socket passed to each worker."""
    pytest.importorskip("uvicorn")
    write_app(
        tmp_path,
        """
        import os
        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": f"worker {os.getpid()}".encode()})
        """,
        "asgi.py",
    )
    port = free_port()
    server = Server(["-m", "uvicorn", "asgi:app", "--port", str(port), "--workers", "2"], tmp_path, port)
    try:
        bodies = {urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read() for _ in range(20)}
    finally:
        _, _, err = server.stop()
    assert all(b.startswith(b"worker ") for b in bodies), bodies
    assert err.count("Started server process") == 2, err


def test_pipes_and_socketpairs_to_a_spawned_child_carry_only_sealed_records(tmp_path: Path) -> None:
    """What crosses is made upper-case at run time: the app's source (which the host serves) and its
    console (which prints only a verdict) never hold it."""
    record = tmp_path / "carried.bin"
    app = write_app(
        tmp_path,
        """
        import multiprocessing, os, socket, subprocess, sys
        def f(conn):
            conn.send("over a duplex connection".upper())
            sys.exit(0 if conn.recv() == "back to the child".upper() else 1)
        if __name__ == "__main__":
            out = subprocess.check_output([sys.executable, "-c", "print('over stdout'.upper())"])
            a, b = socket.socketpair()
            code = "import socket, sys; socket.socket(fileno=int(sys.argv[1])).sendall('over a pair'.upper().encode())"
            p = subprocess.Popen([sys.executable, "-c", code, str(b.fileno())], pass_fds=(b.fileno(),))
            b.close()
            got = a.recv(100)
            p.wait()
            ctx = multiprocessing.get_context("spawn")
            mine, theirs = ctx.Pipe()  # duplex: a socketpair
            p = ctx.Process(target=f, args=(theirs,))
            p.start()
            got2 = mine.recv()
            mine.send("back to the child".upper())
            p.join()
            ok = (out.lower(), got.lower(), got2.lower(), p.exitcode) == (
                b"over stdout\\n", b"over a pair", "over a duplex connection", 0)
            print("ok" if ok else (out, got, got2, p.exitcode), flush=True)
        """,
    )
    env = {"PYSCONE_TEST_HOSTILE": f"py:spawn_liars:Recorder:{record}", "PYTHONPATH": str(Path(__file__).parent)}
    r = run_enclave(app, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ok"], r.stdout
    carried = record.read_bytes()
    assert len(carried) > 1000
    for what in (b"OVER STDOUT", b"OVER A PAIR", b"OVER A DUPLEX CONNECTION", b"BACK TO THE CHILD"):
        assert what not in carried, what


def test_an_attested_child_reads_its_parents_protected_files_and_changes_none(world: World) -> None:
    data = world.root / "spawn-data"
    data.mkdir()
    fspf = world.root / "spawn.fspf"
    for args in (("fspf", "create", fspf), ("fspf", "addr", fspf, str(data), "--kind", "encrypted")):
        r = subprocess.run([*PYSCONE, *map(str, args)], cwd=world.root, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    tag = subprocess.run([*PYSCONE, "fspf", "tag", str(fspf)], capture_output=True, text=True).stdout.strip()
    key = (world.root / "spawn.fspf.key").read_text().strip()
    write_app(
        world.root,
        f"""
        import errno, subprocess, sys
        with open("{data}/secret.txt", "w") as f:
            f.write("{SECRET}")
        child = (
            "import errno\\n"
            "print(open('{data}/secret.txt').read(), flush=True)\\n"
            "try:\\n"
            "    open('{data}/child.txt', 'w').write('x')\\n"
            "except OSError as e:\\n"
            "    print('child write', errno.errorcode[e.errno], flush=True)\\n"
        )
        print("rc", subprocess.run([sys.executable, "-c", child]).returncode, flush=True)
        with open("{data}/secret.txt", "a") as f:  # the parent still commits, pinned at the CAS
            f.write(" again")
        print(open("{data}/secret.txt").read(), flush=True)
        """,
        "fsapp.py",
    )
    mre = world.measure()
    fspf_yaml = f"    fspf: {{path: {fspf}, key: {key}, tag: {tag}}}\n"
    policy = world.policy("spawnfs", f"    mrenclaves: [{mre}]\n    argv: [fsapp.py]\n{fspf_yaml}")
    created = world.owner("session", "create", str(policy))
    assert created.returncode == 0, created.stderr
    r = world.run("spawnfs/app")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [SECRET, "child write EROFS", "rc 0", f"{SECRET} again"], r.stdout + r.stderr
