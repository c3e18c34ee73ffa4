"""Descriptors passed between the enclaves of a family with ``SCM_RIGHTS`` (stdlib/fdpass.py,
protect/fdseal.py): multiprocessing's forkserver, and the same calls made directly."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscone.protect import fdseal

TESTS_DIR = Path(__file__).parent
MARKER = "fd-passing-marker-8c1e"

# A parent and a forked child over a Unix socket at a path: the child passes a host file, a pipe
# end it made after the fork (which moves to the host as it goes), the write end of a pipe the
# parent holds already, and a socketpair end; then writes through them.
PASSING_APP = r"""
import os, socket, sys, tempfile
from multiprocessing import reduction

d = tempfile.mkdtemp(dir=sys.argv[1])
path = os.path.join(d, "s")
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen()
with open(os.path.join(d, "file"), "w") as f:
    f.write("from a host file")
r0, w0 = os.pipe()
pid = os.fork()
if pid == 0:
    listener.close()
    os.close(r0)
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    f = os.open(os.path.join(d, "file"), os.O_RDONLY)
    r2, w2 = os.pipe()
    a, b = socket.socketpair()
    reduction.sendfds(c, [f, r2, w0, b.fileno()])
    os.close(f); os.close(r2); b.close(); os.close(w0)
    os.write(w2, sys.argv[2].encode() + b" through a passed pipe")
    os.close(w2)
    a.sendall(b"through a passed socketpair")
    a.close()
    c.close()
    os._exit(0)
os.close(w0)
conn, _ = listener.accept()
f, r2, w0b, pair = reduction.recvfds(conn, 8)
print("file", os.read(f, 100).decode())
got = b""
while chunk := os.read(r2, 100):
    got += chunk
print("pipe", got.decode().replace(sys.argv[2], "MARKER"))
os.write(w0b, b"back to the parent")
os.close(w0b)
print("own pipe", os.read(r0, 100).decode())
with socket.socket(fileno=pair) as s:
    print("pair", s.recv(100).decode(), s.family.name, s.type.name)
print("exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def _run(
    tmp_path: Path, source: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    app = write_app(tmp_path, source)
    return run_enclave(app, *args, cwd=tmp_path, env=env, timeout=90)


def test_descriptors_pass_between_a_parent_and_its_child_as_natively(tmp_path: Path) -> None:
    app = write_app(tmp_path, PASSING_APP)
    native = run_native(app, str(tmp_path), MARKER)
    assert native.returncode == 0, native.stderr
    got = run_enclave(app, str(tmp_path), MARKER, cwd=tmp_path, timeout=90)
    assert got.returncode == 0, got.stderr
    assert got.stdout == native.stdout
    assert "pipe MARKER through a passed pipe" in got.stdout and "exit 0" in got.stdout


def test_the_host_relays_no_plaintext_of_a_passed_pipe(tmp_path: Path) -> None:
    seen = tmp_path / "relayed"
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:fdpass_liars:Recorder:{seen}"}
    got = _run(tmp_path, PASSING_APP, str(tmp_path), MARKER, env=env)
    assert got.returncode == 0, got.stderr
    assert "pipe MARKER through a passed pipe" in got.stdout
    relayed = seen.read_bytes()
    assert b"PSFD" in relayed  # the recorder saw the notices go by (so it saw what passed)
    for secret in (MARKER.encode(), b"through a passed socketpair", b"back to the parent"):
        assert secret not in relayed


FORKSERVER_APP = r"""
import multiprocessing as mp, os, sys

def square(x):
    return x * x

def report(q, text):
    q.put((text, os.getpid() != os.getppid()))

if __name__ == "__main__":
    ctx = mp.get_context("forkserver")
    with ctx.Pool(2) as pool:
        print("pool", sum(pool.map(square, range(50))), sum(pool.imap_unordered(square, range(10))))
    q = ctx.Queue()
    lock = ctx.Lock()
    ps = [ctx.Process(target=report, args=(q, f"child {i}")) for i in range(3)]
    for p in ps:
        p.start()
    got = sorted(q.get(timeout=30) for _ in ps)
    for p in ps:
        p.join()
    print("processes", got, [p.exitcode for p in ps])
    bad = ctx.Process(target=os._exit, args=(7,))
    bad.start()
    bad.join()
    print("exitcode", bad.exitcode)
"""


def test_multiprocessing_forkserver_runs_as_natively(tmp_path: Path) -> None:
    app = write_app(tmp_path, FORKSERVER_APP)
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    got = run_enclave(app, cwd=tmp_path, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout == native.stdout
    assert "exitcode 7" in got.stdout


# Two messages with one fd each, read with room for the whole notice (so a lie sees all of it).
LIAR_APP = r"""
import array, os, socket, sys, tempfile
d = tempfile.mkdtemp(dir=sys.argv[1])
path = os.path.join(d, "s")
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen()
pid = os.fork()
if pid == 0:
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    for i in range(2):
        r, w = os.pipe()
        c.sendmsg([b"m%d" % i], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        os.write(w, b"pipe %d" % i)
        os.close(w)
    c.recv(1)
    os._exit(0)
conn, _ = listener.accept()
for i in range(2):
    msg, anc, flags, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
    fds = array.array("i", anc[0][2]) if anc else []
    print(msg, len(fds), [os.read(fd, 100) for fd in fds], flush=True)
conn.send(b"x")
print("exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_the_lie_free_run_of_the_liars_app(tmp_path: Path) -> None:
    """The control: without a lie, both messages come with their pipes."""
    got = _run(tmp_path, LIAR_APP, str(tmp_path))
    assert got.returncode == 0, got.stderr
    assert got.stdout.splitlines() == ["b'm0' 1 [b'pipe 0']", "b'm1' 1 [b'pipe 1']", "exit 0"]


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("flip", "a notice that does not open"),
        ("replay", "a replayed notice"),
        ("extra", "handed over 2 descriptors for a notice of 1"),
    ],
)
def test_a_host_that_lies_about_passed_descriptors_stops_the_enclave(tmp_path: Path, case: str, says: str) -> None:
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:fdpass_liars:Tamper:{case}"}
    got = _run(tmp_path, LIAR_APP, str(tmp_path), env=env)
    assert f"lied about RECVMSG_FDS: {case}" in got.stderr
    assert got.returncode == 86, (got.returncode, got.stdout, got.stderr)
    assert says in got.stderr
    assert "pipe 1" not in got.stdout  # nothing after the lie was acted on


# The enclave listens; a process outside the family (the test) connects and passes it an fd.
FOREIGN_APP = r"""
import os, socket, sys
path = os.path.join(sys.argv[1], "s")
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen()
print("listening", flush=True)
conn, _ = listener.accept()
msg, anc, flags, _ = conn.recvmsg(100, socket.CMSG_SPACE(4))
print("got", msg, len(anc), bool(flags & socket.MSG_CTRUNC), flush=True)
print("then", conn.recv(100), flush=True)
"""


def test_descriptors_from_outside_the_family_are_refused_and_the_data_still_comes(tmp_path: Path) -> None:
    app = write_app(tmp_path, FOREIGN_APP)
    cmd = [sys.executable, "-m", "pyscone.cli", "run", str(app), str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "listening"
        with socket.socket(socket.AF_UNIX) as c:
            deadline = time.monotonic() + 10
            while True:
                try:
                    c.connect(str(tmp_path / "s"))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            with open(os.devnull) as dev:
                c.sendmsg([b"hello"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dev.fileno()]))])
            c.sendall(b"more")
            out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["got b'hello' 0 True", "then b'more'"]
    assert "descriptors from a process outside the enclave's family refused" in err


REFUSALS_APP = r"""
import array, os, socket
a, b = socket.socketpair()
for what, anc in [
    ("console", [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [1]))]),
    ("credentials", [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, array.array("i", [os.getpid(), 0, 0]))]),
]:
    try:
        a.sendmsg([b"x"], anc)
        print(what, "sent")
    except OSError as e:
        print(what, e.errno == 38, e.strerror)
a.sendmsg([b"plain ", b"buffers"])
print(b.recvmsg(100))
buf = bytearray(5)
a.send(b"12345678")
print(b.recvmsg_into([buf, bytearray(10)])[0], bytes(buf))
"""


def test_what_cannot_be_passed_is_one_clear_error(tmp_path: Path) -> None:
    got = _run(tmp_path, REFUSALS_APP)
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    assert lines[0] == "console True passing the console to another process is not supported inside a pyscone enclave"
    assert lines[1].startswith("credentials True ancillary data of level 1 type 2 is not supported")
    assert lines[2:] == ["(b'plain buffers', [], 0, None)", "8 b'12345'"]


# -- the notice format (sans-IO) ------------------------------------------------------------------

KEY = fdseal.notice_key(b"k" * 32)
ENTRIES = st.lists(
    st.one_of(
        st.tuples(st.just("socket"), st.integers(0, 50), st.integers(0, 10), st.integers(0, 300), st.booleans()),
        st.tuples(st.just("file"), st.integers(0, 2**20), st.booleans()),
        st.tuples(st.just("pipe"), st.binary(min_size=16, max_size=16).map(bytes.hex), st.booleans(), st.booleans()),
    ).map(list),
    min_size=1,
    max_size=20,
)


def _notice(entries: list[list[object]], seq: int = 1) -> fdseal.Notice:
    return fdseal.Notice(b"m" * 8, seq, 3, entries)


def _split(sealed: bytes) -> tuple[bytes, bytes]:
    return sealed[: fdseal.HEAD.size], sealed[fdseal.HEAD.size :]


@settings(max_examples=100, deadline=None)
@given(entries=ENTRIES)
def test_a_notice_opens_as_it_was_sealed(entries: list[list[object]]) -> None:
    head, body = _split(fdseal.seal(KEY, _notice(entries)))
    assert fdseal.starts_notice(head[:2]) and len(body) == fdseal.body_size(head)
    assert fdseal.open_notice(KEY, head, body) == _notice(entries)


@settings(max_examples=100, deadline=None)
@given(entries=ENTRIES, data=st.data())
def test_a_changed_or_cut_notice_does_not_open(entries: list[list[object]], data: st.DataObject) -> None:
    sealed = bytearray(fdseal.seal(KEY, _notice(entries)))
    at = data.draw(st.integers(0, len(sealed) - 1))
    if data.draw(st.booleans()):
        sealed[at] ^= data.draw(st.integers(1, 255))
        raw = bytes(sealed)
    else:
        raw = bytes(sealed[:at])
    with pytest.raises(fdseal.NoticeError):
        head, body = _split(raw)
        fdseal.open_notice(KEY, head, body)


def test_a_notice_of_another_family_or_replayed_is_refused() -> None:
    head, body = _split(fdseal.seal(KEY, _notice([["file", 0, False]])))
    with pytest.raises(fdseal.NoticeError, match="does not open"):
        fdseal.open_notice(fdseal.notice_key(b"o" * 32), head, body)
    seen = fdseal.Replays()
    seen.check(fdseal.open_notice(KEY, head, body))
    with pytest.raises(fdseal.NoticeError, match="replayed"):
        seen.check(fdseal.open_notice(KEY, head, body))
    seen.check(_notice([["file", 0, False]], seq=2))
    with pytest.raises(fdseal.NoticeError, match="replayed"):
        seen.check(_notice([["file", 0, False]], seq=1))
    with pytest.raises(fdseal.NoticeError, match="malformed"):
        head, body = _split(fdseal.seal(KEY, _notice([["pipe", "00"]])))
        fdseal.open_notice(KEY, head, body)
