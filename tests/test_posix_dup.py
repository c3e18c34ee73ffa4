"""dup, dup2, F_DUPFD and socket.dup of every fd kind: real enclaves against the same app run natively.

Linux is the model: each app prints what it sees, and the enclave must print the same (numbers
themselves differ, so the apps print what they mean: "the same offset", "EBADF", the bytes read).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyscone.enclave.iago import EXIT_HOST_VIOLATION
from pyscone.host import fspf_tool as tool

TESTS_DIR = Path(__file__).parent


def _same_as_native(tmp_path: Path, source: str, *args: str, fspf: Path | None = None) -> str:
    app = write_app(tmp_path, source)
    native = run_native(app, *args, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    extra = ("--fspf", str(fspf)) if fspf is not None else ()
    r = run_enclave(*extra, app, *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout, f"enclave:\n{r.stdout}\nnative:\n{native.stdout}\n{r.stderr}"
    return r.stdout


SOCKET_APP = """
    import os, socket
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    d = os.dup(conn.fileno())
    dsock = socket.socket(fileno=d)
    print("a new number", d != conn.fileno(), "inheritable", os.get_inheritable(d))
    cli.sendall(b"one")
    print("recv on the dup", dsock.recv(10))
    cli.sendall(b"two")
    print("recv on the original", conn.recv(10))
    dsock.sendall(b"three")
    print("send on the dup", cli.recv(10))
    conn.close()
    cli.sendall(b"four")
    print("the dup outlives the original", dsock.recv(10))
    s2 = dsock.dup()
    print("socket.dup", s2.family == socket.AF_INET, s2.type == socket.SOCK_STREAM,
          s2.getpeername() == cli.getsockname(), s2.gettimeout())
    f = socket.fromfd(s2.fileno(), socket.AF_INET, socket.SOCK_STREAM)
    dsock.close()
    s2.close()
    cli.sendall(b"five")
    print("fromfd", f.recv(10))
    cli.settimeout(0.3)
    try:
        cli.recv(10)
    except TimeoutError:
        print("no EOF while a name is open")
    f.close()
    print("EOF after the last name closes", cli.recv(10))
    a, b = socket.socketpair()
    n = os.dup(a.fileno())
    os.set_blocking(n, False)
    print("O_NONBLOCK is shared", os.get_blocking(a.fileno()))
    os.close(n)
    print("and outlives the closed dup", os.get_blocking(a.fileno()))
"""


def test_dup_of_a_socket_sends_and_receives_on_every_name(tmp_path: Path) -> None:
    out = _same_as_native(tmp_path, SOCKET_APP)
    assert "EOF after the last name closes b''" in out and "recv on the dup b'one'" in out


CONSOLE_APP = """
    import os, sys, tempfile
    print("before", flush=True)
    saved = os.dup(1)
    tmp = tempfile.TemporaryFile(buffering=0)
    os.dup2(tmp.fileno(), 1)
    os.write(1, b"captured line\\n")
    os.dup2(saved, 1)
    os.close(saved)
    os.write(1, b"back on the console\\n")
    tmp.seek(0)
    print("the file got", tmp.read(), flush=True)
    saved = os.dup(2)
    os.dup2(1, 2)
    os.write(2, b"stderr onto stdout\\n")
    os.dup2(saved, 2, inheritable=False)
    print("dup3 with O_CLOEXEC", os.get_inheritable(2), flush=True)
    os.close(saved)
    os.write(2, b"stderr again\\n")
    os.close(0)
    n = os.dup(tmp.fileno())
    print("the lowest free number", n, os.read(n, 1) == b"", flush=True)
"""


def test_dup2_onto_the_console_and_back_as_pytest_captures(tmp_path: Path) -> None:
    app = write_app(tmp_path, CONSOLE_APP)
    native = run_native(app, cwd=tmp_path)
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout, r.stderr
    assert r.stdout.splitlines() == [
        "before",
        "back on the console",
        "the file got b'captured line\\n'",
        "stderr onto stdout",
        "dup3 with O_CLOEXEC False",
        "the lowest free number 0 True",
    ]
    assert r.stderr.splitlines()[-1] == "stderr again"


PYTEST_SUITE = """
    import os, sys

    def test_capfd(capfd):
        os.write(1, b"fd one\\n")
        os.write(2, b"fd two\\n")
        print("printed")
        out, err = capfd.readouterr()
        assert out == "fd one\\nprinted\\n" and err == "fd two\\n"

    def test_fails_and_shows_its_output():
        os.write(1, b"captured by fd\\n")
        assert False
"""


def test_pytest_fd_capture_in_the_enclave(tmp_path: Path) -> None:
    suite = write_app(tmp_path, PYTEST_SUITE, "test_suite.py")
    r = run_enclave("-m", "pytest", "-q", "-p", "no:cacheprovider", suite, cwd=tmp_path, timeout=120)
    assert r.returncode == 1, r.stderr  # one test fails on purpose
    assert "1 failed, 1 passed" in r.stdout, r.stdout + r.stderr
    # pytest's report shows the failing test's captured output (read back from the dup2'd file).
    assert "Captured stdout call" in r.stdout and "captured by fd" in r.stdout, r.stdout


VFD_APP = """
    import fcntl, os, sys
    where = sys.argv[1]
    fd = os.open(where + "/f", os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    d = os.dup(fd)
    os.write(fd, b"hello ")
    print("the offset is shared", os.lseek(d, 0, os.SEEK_CUR))
    os.write(d, b"world")
    os.close(fd)
    os.lseek(d, 0, 0)
    print("read on the dup", os.read(d, 100))
    with os.fdopen(os.dup(d), "rb") as f:
        f.seek(0)
        print("a file object on a dup", f.read())
    print("the dup still open", os.fstat(d).st_size)
    saved = os.dup(1)
    os.dup2(d, 1)
    os.write(1, b" and more")
    os.dup2(saved, 1)
    os.close(saved)
    os.close(d)
    try:
        os.read(d, 1)
    except OSError as e:
        print("closed", e.errno)
    a = os.open(where + "/g", os.O_CREAT | os.O_WRONLY | os.O_APPEND | os.O_TRUNC)
    b = fcntl.fcntl(a, fcntl.F_DUPFD_CLOEXEC, 0)
    print("O_APPEND is the open file's", bool(fcntl.fcntl(b, fcntl.F_GETFL) & os.O_APPEND), os.get_inheritable(b))
    os.write(a, b"1")
    os.write(b, b"2")
    os.close(a)
    os.close(b)
    print(open(where + "/f", "rb").read(), open(where + "/g", "rb").read())
"""


@pytest.mark.parametrize("kind", ["encrypted", "memory", "host"])
def test_dup_of_a_shield_fd_shares_the_open_file(tmp_path: Path, kind: str) -> None:
    fspf = tmp_path / "fs.fspf"
    paths = tool.Paths.of(str(fspf))
    tool.create(paths)
    (tmp_path / "region").mkdir()
    if kind != "host":
        tool.add_region(paths, str(tmp_path / "region"), kind, 4096)
    out = _same_as_native(tmp_path, VFD_APP, "region", fspf=fspf)
    assert out.splitlines()[-1] == "b'hello world and more' b'12'"
    if kind == "encrypted":
        assert b"hello" not in (tmp_path / "region" / "f").read_bytes()  # it really was the shield's file


SELECT_APP = """
    import os, select, selectors, socket
    r, w = os.pipe()
    r2 = os.dup(r)
    a, b = socket.socketpair()
    a2 = os.dup(a.fileno())
    print("nothing ready", select.select([r2, a2], [], [], 0.1))
    os.write(w, b"x")
    print("select on a pipe's dup", select.select([r2], [], [], 1)[0] == [r2])
    print("and on both names", sorted(select.select([r, r2], [], [], 1)[0]) == sorted([r, r2]))
    b.send(b"y")
    print("select on a socket's dup", select.select([a2], [a2], [], 1)[:2] == ([a2], [a2]))
    p = select.poll()
    p.register(r2, select.POLLIN)
    p.register(a2, select.POLLIN)
    p.register(a.fileno(), select.POLLOUT)
    print("poll", sorted(p.poll(1000)) == sorted([(r2, select.POLLIN), (a2, select.POLLIN), (a.fileno(), select.POLLOUT)]))
    ep = select.epoll()
    ep.register(a2, select.EPOLLIN)
    print("epoll", ep.poll(1) == [(a2, select.EPOLLIN)])
    sel = selectors.DefaultSelector()
    sel.register(r2, selectors.EVENT_READ, "pipe")
    sel.register(a2, selectors.EVENT_READ, "socket")
    print("selectors", sorted(k.data for k, _ in sel.select(1)))
    os.read(r2, 1)
    a.recv(1)
    os.close(r)
    print("the pipe's dup after the original closed", select.select([r2], [], [], 0.1)[0])
    os.close(w)
    print("EOF wakes the dup", select.select([r2], [], [], 1)[0] == [r2], os.read(r2, 1))
    c = os.dup(a2)
    os.dup2(w2 := os.pipe()[1], c)
    print("a number dup2'd onto waits on its new file", select.select([], [c], [], 1)[1] == [c])
"""


def test_select_poll_epoll_and_selectors_wait_on_dups(tmp_path: Path) -> None:
    out = _same_as_native(tmp_path, SELECT_APP)
    assert "False" not in out and "nothing ready ([], [], [])" in out


BAD_APP = """
    import errno, fcntl, os
    def err(call):
        try:
            return call()
        except OSError as e:
            return errno.errorcode[e.errno]
    fd = os.open("f", os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    print("dup of a closed fd", err(lambda: os.dup(999)), err(lambda: os.dup(-1)))
    print("dup2 from a closed fd", err(lambda: os.dup2(999, 1)), err(lambda: os.dup2(999, 999)))
    print("dup2 onto a negative fd", err(lambda: os.dup2(fd, -1)))
    print("dup2 onto itself", os.dup2(fd, fd) == fd)
    d = os.dup(fd)
    os.close(d)
    print("a closed dup", err(lambda: os.write(d, b"x")), err(lambda: os.close(d)), err(lambda: os.fstat(d)))
    print("the original lives on", os.write(fd, b"abc"))
    print("F_DUPFD with a bad arg", err(lambda: fcntl.fcntl(fd, fcntl.F_DUPFD, -1)))
    x = fcntl.fcntl(fd, fcntl.F_DUPFD, 0)
    y = fcntl.fcntl(fd, fcntl.F_DUPFD, x)
    print("F_DUPFD takes the lowest free number >= arg", y == x + 1, os.get_inheritable(x))
    os.close(x)
    print("and a freed one again", fcntl.fcntl(fd, fcntl.F_DUPFD, x) == x)
    z = fcntl.fcntl(fd, fcntl.F_DUPFD, y + 10)
    print("or a higher one", z == y + 10, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, y + 10) == y + 11)
    print("os.dup is not inheritable", os.get_inheritable(os.dup(fd)), "dup2 is", os.get_inheritable(os.dup2(fd, y)))
    print("F_GETFD", fcntl.fcntl(y, fcntl.F_GETFD), fcntl.fcntl(os.dup(fd), fcntl.F_GETFD))
"""


def test_bad_fds_and_numbering_as_linux(tmp_path: Path) -> None:
    out = _same_as_native(tmp_path, BAD_APP)
    assert "dup of a closed fd EBADF EBADF" in out and "a closed dup EBADF EBADF EBADF" in out


REFUSED_APP = """
    import os, sys
    fd = os.open("f", os.O_CREAT | os.O_RDWR)
    other = os.open("g", os.O_CREAT | os.O_RDWR)
    try:
        os.dup2(fd, other)
    except OSError as e:
        print(e.errno, e.strerror)
    print("both still open", os.write(fd, b"a"), os.write(other, b"b"))
    try:
        import numpy
    except ImportError:
        sys.exit(0)
    with open("n.bin", "wb") as f:
        numpy.arange(3).tofile(f)
    print("tofile ok", numpy.fromfile("n.bin", dtype=numpy.arange(3).dtype).tolist())
"""


def test_what_cannot_work_is_one_clear_error(tmp_path: Path) -> None:
    r = run_enclave(write_app(tmp_path, REFUSED_APP), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "38 os.dup2 onto a host fd's number (other than 0-2) is not supported inside a pyscone enclave"
    assert lines[1] == "both still open 1 1"
    # numpy's tofile dups the fd from C, then does C stdio on it: the libc layer covers that.
    assert lines[2:] in ([], ["tofile ok [0, 1, 2]"]), lines
    assert "Traceback" not in r.stderr, r.stderr


LIAR_APP = """
    import os, sys
    if sys.argv[1] == "console-fd":
        os.close(1)  # the app's number; the host's fd 1 stays open
        print("APP-SAW", os.open("x.lie", os.O_CREAT | os.O_RDWR), file=sys.stderr)
    else:
        fd = os.open("a.first", os.O_CREAT | os.O_RDWR)
        d = os.dup(fd)
        os.close(fd)  # a dup still names the host fd: it is still open on the host
        print("APP-SAW", os.open("b.lie", os.O_CREAT | os.O_RDWR), file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("case", "reason"),
    [("console-fd", "one of the console's 0-2"), ("known-fd", "already open in the enclave")],
)
def test_a_host_returning_an_fd_the_enclave_owns_stops_it(tmp_path: Path, case: str, reason: str) -> None:
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:dup_liars:DupLie:{case}"}
    r = run_enclave(write_app(tmp_path, LIAR_APP), case, cwd=tmp_path, env=env)
    assert "pyscone-test: lied" in r.stderr, r.stderr
    assert r.returncode == EXIT_HOST_VIOLATION, r.stderr
    assert "APP-SAW" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pyscone: enclave stopped: host violation: ") and reason in last, last


# -- a model: random programs of dup, dup2, close, read, write and seek, natively and in the enclave --

MODEL_APP = """
    import errno, json, os, sys
    region = sys.argv[1]
    for k, program in enumerate(json.load(open("programs.json"))):
        r, w = os.pipe2(os.O_NONBLOCK)
        files = [f"{region}/a{k}", f"plain{k}"]
        new = os.O_CREAT | os.O_RDWR | os.O_TRUNC  # the native run came first, in the same directory
        slots = [os.open(files[0], new), os.open(files[1], new | os.O_APPEND), r, w]
        first = len(slots)
        live = [True] * first
        out = []
        for op, a, b, data in program:
            alive = [n for n, ok in enumerate(live) if ok]
            dups = [n for n in alive if n >= first]  # dup2's targets: numbers that dups gave out
            if not alive or (op == "dup2" and not dups):
                out.append("skip")
                continue
            i, j = alive[a % len(alive)], dups[b % len(dups)] if dups else -1
            try:
                if op == "dup":
                    slots.append(os.dup(slots[i]))
                    live.append(True)
                    out.append("dup")
                elif op == "dup2":
                    out.append(os.dup2(slots[i], slots[j]) == slots[j])
                elif op == "close":
                    os.close(slots[i])
                    live[i] = False
                    out.append("closed")
                elif op == "write":
                    out.append(os.write(slots[i], data.encode()))
                elif op == "read":
                    out.append(os.read(slots[i], 8).decode())
                elif op == "seek":
                    out.append(os.lseek(slots[i], b % 16, os.SEEK_SET))
                else:
                    out.append(os.lseek(slots[i], 0, os.SEEK_CUR))
            except OSError as e:
                out.append(errno.errorcode[e.errno])
        for fd, alive in zip(slots, live):
            if alive:
                os.close(fd)
        out.append([open(f, "rb").read().decode() for f in files])
        print(json.dumps(out))
"""

_OPS = st.tuples(
    st.sampled_from(["dup", "dup", "dup2", "close", "write", "read", "seek", "tell"]),
    st.integers(0, 30),
    st.integers(0, 30),
    st.sampled_from(["x", "yz", "hello"]),
)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(programs=st.lists(st.lists(_OPS, max_size=25), min_size=8, max_size=8))
def test_random_fd_games_match_linux(tmp_path: Path, programs: list[list[tuple[str, int, int, str]]]) -> None:
    run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    run.mkdir()
    (run / "programs.json").write_text(json.dumps(programs))
    fspf = run / "fs.fspf"
    paths = tool.Paths.of(str(fspf))
    tool.create(paths)
    (run / "enc").mkdir()
    tool.add_region(paths, str(run / "enc"), "encrypted", 4096)
    _same_as_native(run, MODEL_APP, "enc", fspf=fspf)


# -- the other call sites: fsmeta (statvfs, xattrs) and ssl over a dup ------------------------------

META_APP = """
    import os
    fd = os.open("f", os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    d = os.dup(fd)
    os.close(fd)
    print("fstatvfs of a dup", os.fstatvfs(d).f_bsize == os.statvfs(".").f_bsize, os.statvfs(d).f_bsize > 0)
    try:
        print("xattrs", os.listxattr(d) == [])  # natively none, on a file just made
    except OSError as e:
        print("xattrs", e.errno == 95)  # ENOTSUP in the enclave
    os.close(d)
    for name, call in (("fstatvfs", os.fstatvfs), ("listxattr", os.listxattr)):
        try:
            call(d)
        except OSError as e:
            print(name, "of a closed dup", e.errno)
"""


def test_statvfs_and_xattrs_on_a_dup(tmp_path: Path) -> None:
    out = _same_as_native(tmp_path, META_APP).splitlines()
    assert out[0] == "fstatvfs of a dup True True"
    assert out[-2:] == ["fstatvfs of a closed dup 9", "listxattr of a closed dup 9"]


TLS_APP = """
    import os, socket, ssl, sys, threading
    ca, cert, key = sys.argv[1:4]
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv = socket.create_server(("127.0.0.1", 0))
    def serve():
        conn, _ = srv.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(100).upper())
    threading.Thread(target=serve).start()
    raw = socket.create_connection(srv.getsockname())
    dup = socket.socket(fileno=os.dup(raw.fileno()))
    raw.close()
    ctx = ssl.create_default_context(cafile=ca)
    with ctx.wrap_socket(dup, server_hostname="localhost") as tls:
        tls.sendall(b"over a dup")
        print("tls", tls.recv(100), tls.version() is not None)
"""


def test_tls_over_a_dup_of_a_socket(tmp_path: Path) -> None:
    from test_tls_apps import make_pki

    pki = make_pki(tmp_path / "pki")
    out = _same_as_native(tmp_path, TLS_APP, str(pki.ca), str(pki.cert), str(pki.key))
    assert out == "tls b'OVER A DUP' True\n"


ATOMIC_APP = """
    import os, threading, time
    fd2 = os.dup(os.open("first", os.O_CREAT | os.O_WRONLY | os.O_TRUNC))
    done, seen = threading.Event(), {"ok": 0, "EBADF": 0}
    def writer():
        while not done.is_set():
            try:
                os.write(fd2, b"w")
                seen["ok"] += 1
            except OSError:
                seen["EBADF"] += 1
                time.sleep(0.001)  # no host call was made: let the others run
    t = threading.Thread(target=writer)
    t.start()
    for i in range(200):
        x = os.open(f"f{i % 4}", os.O_CREAT | os.O_WRONLY)
        os.dup2(x, fd2)  # closes the file fd2 named last (the host's close makes this lthread wait)
        os.close(x)  # fd2 is now its only name
    done.set()
    t.join()
    print("writes", seen["ok"] > 0, "EBADF", seen["EBADF"])
"""


def test_dup2_onto_an_open_number_is_atomic_for_other_lthreads(tmp_path: Path) -> None:
    out = _same_as_native(tmp_path, ATOMIC_APP)
    assert out == "writes True EBADF 0\n"


def test_print_follows_a_dup2_onto_stdout_and_comes_back(tmp_path: Path) -> None:
    # Python-level output (print, sys.stdout) goes where fd 1 goes, as natively: into the file
    # while it is dup2-ed there, to the console again once the saved fd is put back.
    out = _same_as_native(
        tmp_path,
        """
        import os, sys, tempfile
        f = tempfile.TemporaryFile()
        saved = os.dup(1)
        sys.stdout.flush()
        os.dup2(f.fileno(), 1)
        print("into the file")
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        f.seek(0)
        print("back on the console; the file holds:", f.read())
        """,
    )
    assert out == "back on the console; the file holds: b'into the file\\n'\n"


def test_a_dup_of_a_socket_can_be_the_signal_wakeup_fd(tmp_path: Path) -> None:
    out = _same_as_native(
        tmp_path,
        """
        import os, signal, socket
        a, b = socket.socketpair()
        a.setblocking(False)
        d = os.dup(a.fileno())
        print("old", signal.set_wakeup_fd(d))
        signal.signal(signal.SIGUSR1, lambda *x: None)
        signal.raise_signal(signal.SIGUSR1)
        print("woke", b.recv(10) == bytes([signal.SIGUSR1]))
        try:
            signal.set_wakeup_fd(12345)
        except OSError as e:
            print("bad fd", type(e).__name__)
        """,
    )
    assert out == "old -1\nwoke True\nbad fd OSError\n"
