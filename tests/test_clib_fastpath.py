"""The libc layer's answers from memory (shim.c, "Answers from the enclave's own memory").

For an FS-shield file the shim grants record locks itself and gives again the runtime's
last fstat, small pread and ENOENT, until anything changes a file.  These tests check that
it does answer (a read transaction of SQLite never reaches Python), that it never does for a
host file, and that every kind of change, made from C or from Python, ends the answers:
the same app natively and in the enclave must print the same thing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app
from test_fs_shield import FS

# Each line is one observation by C (through ctypes: libffi's calls are a C library's, so
# they go through the shim) after a change by Python or by C.
CHANGES_APP = """
    import ctypes, errno, fcntl, os, struct, sys
    libc = ctypes.CDLL(None, use_errno=True)
    d = sys.argv[1]
    path = os.path.join(d, "f.bin").encode()
    st = ctypes.create_string_buffer(144)  # struct stat on x86-64; st_size at 48

    def size(fd):
        return struct.unpack_from("q", st.raw, 48)[0] if libc.fstat(fd, st) == 0 else -ctypes.get_errno()

    def head(fd):
        b = ctypes.create_string_buffer(16)
        n = libc.pread(fd, b, 16, 0)
        return b.raw[:n] if n >= 0 else -ctypes.get_errno()

    def exists(p):
        return libc.stat(p, st) == 0 or -ctypes.get_errno()

    def lock(fd, cmd, kind, start=0):
        fl = ctypes.create_string_buffer(struct.pack("hhqqi", kind, 0, start, 1, 0), 32)
        r = libc.fcntl(fd, cmd, fl)
        return (r if r >= 0 else -ctypes.get_errno(), struct.unpack_from("h", fl.raw, 0)[0])

    fd = libc.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    print("empty", size(fd), head(fd), size(fd), head(fd))
    with open(path, "r+b") as f:  # Python, through another fd
        f.write(b"python wrote this")
    print("python write", size(fd), head(fd))
    print("C write", libc.pwrite(fd, b"C", 1, 0), size(fd), head(fd))
    os.truncate(path, 3)
    print("python truncate", size(fd), head(fd))
    print("C truncate", libc.ftruncate(fd, 1), size(fd), head(fd))
    other = libc.open(path, os.O_RDWR)
    print("C write, other fd", libc.pwrite(other, b"xyz", 3, 1), size(fd), head(fd), libc.close(other))
    g = os.path.join(d, "g").encode()
    print("absent", exists(g), exists(g))
    open(g, "wb").close()
    print("python create", exists(g))
    os.rename(g, g + b"2")
    print("python rename", exists(g), exists(g + b"2"))
    os.unlink(g + b"2")
    print("python unlink", exists(g + b"2"), exists(g + b"2"))
    os.mkdir(g)
    print("python mkdir", exists(g))
    os.rmdir(g)
    print("python rmdir", exists(g))
    h = libc.open(g, os.O_WRONLY | os.O_CREAT, 0o600)
    print("C create", exists(g), libc.close(h))
    print("C unlink", libc.unlink(g), exists(g))
    print("locks", lock(fd, fcntl.F_SETLK, fcntl.F_WRLCK), lock(fd, fcntl.F_GETLK, fcntl.F_RDLCK, 5),
          lock(fd, fcntl.F_SETLK, fcntl.F_UNLCK), lock(fd, fcntl.F_SETLK, 99), lock(fd, fcntl.F_GETLK, fcntl.F_UNLCK))
    print("close", libc.close(fd), lock(fd, fcntl.F_SETLK, fcntl.F_WRLCK), size(fd), head(fd))
"""


@pytest.fixture
def fs(tmp_path: Path) -> FS:
    return FS(tmp_path)


def _fast_answers(stderr: str) -> int:
    m = re.search(r"libc layer: (\d+) calls from C libraries, (\d+) answered by the shim from memory", stderr)
    assert m, stderr
    return int(m.group(2))


@pytest.mark.parametrize("region", ["enc", "auth", "mem"])
def test_every_change_from_c_or_python_ends_the_shims_answers(fs: FS, tmp_path: Path, region: str) -> None:
    app = write_app(tmp_path, CHANGES_APP)
    plain = tmp_path / "plain"
    plain.mkdir()
    native = run_native(app, str(plain))
    assert native.returncode == 0, native.stderr
    r = fs.run(app, str(getattr(fs, region)), extra=("--stats",))
    assert (r.returncode, r.stdout) == (0, native.stdout), r.stderr
    assert _fast_answers(r.stderr) > 0  # the answers above were (partly) the shim's own


READS_APP = """
    import sqlite3, sys
    con = sqlite3.connect(sys.argv[1])
    con.execute("create table if not exists t (k integer primary key, v text)")
    with con:
        con.executemany("insert into t values (?, ?)", [(i, "v%d" % i) for i in range(100)])
    for i in range(500):
        assert con.execute("select v from t where k = ?", (i % 100,)).fetchone() == ("v%d" % (i % 100),)
    print("ok")
"""


def test_a_read_transaction_on_a_shield_file_is_answered_by_the_shim(fs: FS, tmp_path: Path) -> None:
    app = write_app(tmp_path, READS_APP)
    r = fs.run(app, str(fs.enc / "r.db"), extra=("--stats",))
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    # Each select's eight calls (4 locks, 2 stats of absent files, 1 pread, 1 fstat) from memory.
    assert _fast_answers(r.stderr) >= 7 * 500, r.stderr


def test_a_host_file_is_never_answered_from_memory(tmp_path: Path) -> None:
    app = write_app(tmp_path, READS_APP)
    r = run_enclave("--stats", app, str(tmp_path / "r.db"), cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "ok\n"), r.stderr
    assert _fast_answers(r.stderr) == 0  # another process may lock or change it at any time


TWO_CONNECTIONS_APP = """
    import sqlite3, sys
    a, b = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[1])
    a.execute("create table t (k integer primary key, v text)")
    a.commit()
    seen = []
    for i in range(30):
        seen.append(a.execute("select count(*), max(k) from t").fetchone())
        with b:  # the other connection changes the database between a's read transactions
            b.execute("insert into t (v) values (?)", ("row %d" % i,))
    seen.append(a.execute("select count(*) from t").fetchone())
    print(seen == [(i, i or None) for i in range(30)] + [(30,)], seen[-3:])
"""


def test_a_second_connection_s_commit_is_seen_by_the_first(fs: FS, tmp_path: Path) -> None:
    """SQLite keeps its page cache across transactions while the change counter it reads at
    each one is unchanged: a stale counter from the shim would show old rows."""
    app = write_app(tmp_path, TWO_CONNECTIONS_APP)
    native = run_native(app, str(tmp_path / "n.db"))
    assert native.stdout.startswith("True"), native.stderr
    r = fs.run(app, str(fs.enc / "two.db"))
    assert (r.returncode, r.stdout) == (0, native.stdout), r.stderr


METADATA_APP = """
    import os, sys
    p = os.path.join(sys.argv[1], "m.txt")
    with open(p, "w") as f:
        f.write("x")
    fd = os.open(p, os.O_RDONLY)
    before = os.fstat(fd)
    os.chmod(p, 0o600)
    os.utime(p, ns=(10**18, 10**18))
    after = os.fstat(fd)
    print(oct(before.st_mode & 0o777) != oct(after.st_mode & 0o777), oct(after.st_mode & 0o777), after.st_mtime_ns)
"""


def test_an_open_files_stat_follows_chmod_and_utime(fs: FS, tmp_path: Path) -> None:
    """The shield keeps the host's part of an open file's stat until the file changes: a chmod
    or utime by path changes it too."""
    app = write_app(tmp_path, METADATA_APP)
    r = fs.run(app, str(fs.enc))
    assert (r.returncode, r.stdout) == (0, f"True 0o600 {10**18}\n"), r.stderr
