"""C stdio in the enclave, through the libc layer: numpy's ``tofile``/``fromfile`` and
``np.save``/``np.load`` on open files, and libc's ``fopen`` called from C.

glibc's ``FILE`` calls its own internal ``read``/``write``, which no interposed symbol stands
in front of: before the shim's ``fopen``/``fdopen`` (``fopencookie`` over the enclave fd,
pyscone/enclave/clib/shim_stdio.c) every such call met the barrier, and ``os.dup`` called from C
(numpy's first step) was refused outright (stdlib/dups.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app
from test_clib_sqlite import SHIM
from test_fs_shield import FS

from pyscone.enclave.iago import EXIT_HOST_VIOLATION
from pyscone.protect.pfile import record_offset

TESTS_DIR = Path(__file__).parent
SECRET = "array-bytes-the-host-must-never-read"

# numpy's file I/O by path and on open file objects (np.save/np.load hand the file object to
# tofile/fromfile), with Python-level I/O before and after on the same file: numpy's C stdio
# must start at the Python file's position, and the Python file must continue after its bytes.
NUMPY_APP = f"""
    import os, sys
    import numpy as np
    d = sys.argv[1]
    a = np.arange(100000, dtype=np.float64) * 1.5  # 800 kB: more than one host call carries
    p = os.path.join(d, "a.bin")
    a.tofile(p)
    print("path", np.array_equal(np.fromfile(p), a), os.path.getsize(p))
    print("count+offset", np.fromfile(p, count=3, offset=16).tolist())
    with open(os.path.join(d, "mixed.bin"), "wb") as f:
        f.write(b"HEAD")
        a[:10].tofile(f)
        f.write(b"TAIL")
    with open(os.path.join(d, "mixed.bin"), "rb") as f:
        print("mixed", f.read(4), np.fromfile(f, count=10).tolist() == a[:10].tolist(), f.read())
    secret = np.frombuffer(b"{SECRET}" * 64, dtype=np.uint8)
    with open(os.path.join(d, "s.npy"), "wb") as f:
        np.save(f, secret)
        np.save(f, a)
    with open(os.path.join(d, "s.npy"), "rb") as f:
        print("save/load", np.array_equal(np.load(f), secret), np.array_equal(np.load(f), a))
    a[:4].tofile(os.path.join(d, "t.txt"), sep=",")
    print("text", open(os.path.join(d, "t.txt")).read(), np.fromfile(os.path.join(d, "t.txt"), sep=",").tolist())
    try:
        np.fromfile(os.path.join(d, "missing.bin"))
    except OSError as e:
        print("missing", type(e).__name__, e.errno)
"""


@pytest.fixture
def fs(tmp_path: Path) -> FS:
    return FS(tmp_path)


def test_the_shim_exports_the_stdio_entry_points() -> None:
    nm = subprocess.run(["nm", "-D", "--defined-only", SHIM], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in nm.splitlines()}
    assert {"fopen", "fopen64", "fdopen", "fileno", "pyscone_shim_console"} <= exported, exported


def _native(tmp_path: Path) -> str:
    d = tmp_path / "native"
    d.mkdir()
    r = run_native(write_app(tmp_path, NUMPY_APP, "native_app.py"), str(d), cwd=tmp_path)
    assert r.returncode == 0 and "path True 800000" in r.stdout, r.stderr
    return r.stdout


def test_numpy_file_io_on_an_unprotected_path_is_as_native(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    native = _native(tmp_path)
    d = tmp_path / "enclave"
    d.mkdir()
    r = run_enclave(write_app(tmp_path, NUMPY_APP), str(d), cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, native), r.stderr
    # The host files are what numpy writes natively, byte for byte.
    for name in ("a.bin", "mixed.bin", "s.npy", "t.txt"):
        assert (d / name).read_bytes() == (tmp_path / "native" / name).read_bytes(), name


def test_numpy_file_io_in_an_encrypted_region_is_sealed(fs: FS) -> None:
    pytest.importorskip("numpy")
    native = _native(fs.root)
    r = fs.run(write_app(fs.root, NUMPY_APP), str(fs.enc))
    assert (r.returncode, r.stdout) == (0, native), r.stderr
    host_files = {p.name: p.read_bytes() for p in fs.enc.iterdir() if p.is_file()}
    assert {"a.bin", "mixed.bin", "s.npy", "t.txt"} <= set(host_files)
    plain = (fs.root / "native" / "s.npy").read_bytes()
    for name, data in host_files.items():
        assert SECRET.encode() not in data and b"NUMPY" not in data and b"HEAD" not in data, name
        assert data != plain
    assert host_files["a.bin"] != (fs.root / "native" / "a.bin").read_bytes()


def test_a_tampered_array_file_never_reaches_c_as_data(fs: FS) -> None:
    # The host flips a byte in both slots of one chunk's record: the FS shield refuses the
    # chunk (EIO), so C's fread stops there with ferror set, as at a disk error natively.
    # numpy's fromfile ignores that short read: it never asks ferror, and with count=-1 it
    # keeps the full-size array (the rest zero-filled), natively too.  What it does check is
    # the lseek that restores the Python file's position, which the shield fails on an open
    # file whose read was refused: so numpy raises instead of returning a wrong array.
    pytest.importorskip("numpy")
    app = write_app(
        fs.root,
        """
        import ctypes, errno, sys
        import numpy as np
        p, want = sys.argv[1], np.arange(1, 100001, dtype=np.int64)
        if sys.argv[2] == "write":
            want.tofile(p)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.fread.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
        libc.fread.restype = ctypes.c_size_t
        libc.ferror.argtypes = libc.fclose.argtypes = [ctypes.c_void_p]
        fp = libc.fopen(p.encode(), b"rb")
        buf = (ctypes.c_int64 * 100000)()
        n = libc.fread(buf, 8, 100000, fp)
        print("fread", n, libc.ferror(fp) != 0, errno.errorcode.get(ctypes.get_errno()) if n < 100000 else "-")
        libc.fclose(fp)
        try:
            got = np.fromfile(p, dtype=np.int64)
            good = int(np.argmin(got == want)) if not np.array_equal(got, want) else len(got)
            print("numpy", good, not got[good:].any())
        except OSError as e:
            print("numpy refused", e)
        """,
    )
    p = fs.enc / "a.bin"
    r = fs.run(app, str(p), "write")
    assert r.stdout.splitlines() == ["fread 100000 False -", "numpy 100000 True"], r.stderr
    data = bytearray(p.read_bytes())
    for slot in (0, 1):  # both slots of the record of the file's 11th chunk
        data[record_offset(4096, 10, slot) + 100] ^= 0x01
    p.write_bytes(bytes(data))
    r = fs.run(app, str(p), "read")
    # 10 chunks of 4096 bytes verified: 5120 int64; nothing from the 11th chunk on.
    assert r.stdout.splitlines() == ["fread 5120 True EIO", "numpy refused seeking file failed"], (r.stdout, r.stderr)
    assert "pyscone: fs shield:" in r.stderr and "refused" in r.stderr, r.stderr


@pytest.mark.parametrize("lie", ["read-overflow", "write-overcount"])
def test_a_host_lying_about_c_stdio_stops_the_enclave(tmp_path: Path, lie: str) -> None:
    # The lies are about reads and writes that glibc's FILE made (numpy's fromfile; an
    # fwrite from C): they reach the same Iago checks as Python's own.
    pytest.importorskip("numpy")
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 160)
    app = write_app(
        tmp_path,
        """
        import ctypes, sys
        import numpy as np
        if sys.argv[1] == "read-overflow":
            print("read", len(np.fromfile("a.bin", dtype=np.uint8)))
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fopen.restype = ctypes.c_void_p
            libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            libc.fwrite.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
            libc.fclose.argtypes = [ctypes.c_void_p]
            fp = libc.fopen(b"a.bin", b"wb")
            print("wrote", fp is not None and libc.fwrite(b"x" * 100000, 1, 100000, fp), libc.fclose(fp))
        """,
    )
    honest = run_enclave(app, lie, cwd=tmp_path)
    assert honest.stdout == ("read 40960\n" if lie == "read-overflow" else "wrote 100000 0\n"), honest.stderr
    hostile = {"PYSCONE_TEST_HOSTILE": f"py:stdio_liars:BinLie:{lie}", "PYTHONPATH": str(TESTS_DIR)}
    r = run_enclave(app, lie, cwd=tmp_path, env=hostile)
    assert "pyscone-test: lied about" in r.stderr, r.stderr  # (not a vacuous pass)
    assert r.returncode == EXIT_HOST_VIOLATION, (r.stdout, r.stderr)
    assert "pyscone: enclave stopped: host violation:" in r.stderr
    assert "read" not in r.stdout and "wrote" not in r.stdout


def test_libc_stdio_called_from_c_goes_through_the_layer(fs: FS) -> None:
    # ctypes calls libc through libffi, which is not the interpreter's own code: to the shim
    # this is a C caller, like numpy (the same classification test_clib_sqlite.py relies on).
    app = write_app(
        fs.root,
        f"""
        import ctypes, errno, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fopen.restype = libc.fdopen.restype = ctypes.c_void_p
        libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
        for f in ("fputs", "fgets", "fclose", "fileno", "fflush", "fseek", "ftell", "fprintf"):
            getattr(libc, f).argtypes = {{"fputs": [ctypes.c_char_p, ctypes.c_void_p],
                "fgets": [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p],
                "fseek": [ctypes.c_void_p, ctypes.c_long, ctypes.c_int],
                "fprintf": [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]}}.get(f, [ctypes.c_void_p])
        libc.ftell.restype = ctypes.c_long
        def err():
            return errno.errorcode[ctypes.get_errno()]
        for d in ({str(fs.root)!r}, {str(fs.enc)!r}):
            print("missing", libc.fopen(f"{{d}}/missing.txt".encode(), b"r"), err())
            fp = libc.fopen(f"{{d}}/c.txt".encode(), b"w")
            print("fputs", libc.fputs(b"from C, ", fp) >= 0, libc.fprintf(fp, b"n=%d\\n", 42))
            print("fileno", os.fstat(libc.fileno(fp)).st_size, libc.fflush(fp), os.fstat(libc.fileno(fp)).st_size)
            print("fclose", libc.fclose(fp))
            print("python reads", open(f"{{d}}/c.txt").read().strip())
            fp = libc.fopen(f"{{d}}/c.txt".encode(), b"r+")
            buf = ctypes.create_string_buffer(64)
            libc.fseek(fp, 8, 0)
            print("fgets", libc.fgets(buf, 64, fp) is not None, buf.value, libc.ftell(fp))
            libc.fclose(fp)
            fd = os.open(f"{{d}}/c.txt", os.O_RDONLY)
            fp = libc.fdopen(fd, b"r")
            print("fdopen", libc.fgets(buf, 64, fp) is not None, buf.value, libc.fclose(fp))
            try:
                os.fstat(fd)
            except OSError as e:
                print("fclose closed the fd", errno.errorcode[e.errno])
        print("fdopen bad fd", libc.fdopen(987, b"r"), err())
        out = libc.fdopen(1, b"w")  # the console fd: the console shield's, not C's
        print("console", libc.fputs(b"leak\\n", out) >= 0 and libc.fflush(out), err())
        """,
    )
    r = fs.run(app)
    stanza = [
        "fputs True 5",
        "fileno 0 0 13",
        "fclose 0",
        "python reads from C, n=42",
        "fgets True b'n=42\\n' 13",
        "fdopen True b'from C, n=42\\n' 0",
        "fclose closed the fd EBADF",
    ]
    assert r.stdout.splitlines() == [
        "missing None ENOENT",
        *stanza,
        "missing None ENOENT",
        *stanza,
        "fdopen bad fd None EBADF",
        "console -1 EPERM",
    ], r.stderr
    assert "leak" not in r.stdout + r.stderr
    assert b"from C" not in (fs.enc / "c.txt").read_bytes()


STDIO_C = r"""
#include <errno.h>
#include <pthread.h>
#include <stdio.h>

/* A C library's own stdio: no ctypes between it and libc. */
int write_file(const char *path, const char *text) {
    FILE *fp = fopen(path, "w");
    if (fp == NULL) return errno;
    if (fprintf(fp, "%s:%d\n", text, 42) < 0) return errno;
    return fclose(fp) == 0 ? 0 : errno;
}

int read_file(const char *path, char *buf, int n) {
    FILE *fp = fopen(path, "re");
    if (fp == NULL) return -errno;
    int got = (int)fread(buf, 1, (size_t)n, fp);
    fclose(fp);
    return got;
}

/* A thread started before lockdown, which flushes a FILE the enclave's thread opened. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static FILE *target;
static int asked, answered, error;

static void *worker(void *arg) {
    (void)arg;
    pthread_mutex_lock(&mu);
    while (!asked) pthread_cond_wait(&cv, &mu);
    errno = 0;
    fputs("from the library's thread\n", target);
    error = fflush(target) == 0 ? 0 : errno;
    answered = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return NULL;
}

int start(void) { pthread_t t; return pthread_create(&t, NULL, worker, NULL); }

int flush_in_worker(const char *path) {
    FILE *fp = fopen(path, "w");
    if (fp == NULL) return -errno;
    pthread_mutex_lock(&mu);
    target = fp;
    asked = 1;
    pthread_cond_broadcast(&cv);
    while (!answered) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    clearerr(fp);
    fclose(fp);  /* (on this thread: what is still buffered may be written now) */
    return error;
}
"""


def test_a_c_librarys_own_stdio_goes_through_the_shield_and_its_threads_are_refused(fs: FS) -> None:
    src = fs.root / "cstdio.c"
    src.write_text(STDIO_C)
    lib = fs.root / "libcstdio.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-o", str(lib), str(src), "-lpthread"], check=True)
    (fs.root / "cstdio.py").write_text(f"import ctypes\nlib = ctypes.CDLL({str(lib)!r})\nassert lib.start() == 0\n")
    app = write_app(
        fs.root,
        f"""
        import ctypes, errno
        import cstdio
        from pyscone.enclave.stdlib import clib
        enc = {str(fs.enc)!r}
        print("write", cstdio.lib.write_file(f"{{enc}}/c.txt".encode(), b"{SECRET}"))
        buf = ctypes.create_string_buffer(128)
        print("read", cstdio.lib.read_file(f"{{enc}}/c.txt".encode(), buf, 128), buf.value)
        print("python", open(f"{{enc}}/c.txt").read().strip())
        print("missing", errno.errorcode[-cstdio.lib.read_file(f"{{enc}}/none.txt".encode(), buf, 128)])
        before = clib.foreign_calls()
        print("library's thread", errno.errorcode[cstdio.lib.flush_in_worker(f"{{enc}}/w.txt".encode())])
        print("refused", clib.foreign_calls() - before)
        """,
    )
    r = fs.run(app, extra=("--preload", "cstdio"))
    assert r.stdout.splitlines() == [
        "write 0",
        f"read {len(SECRET) + 4} b'{SECRET}:42\\n'",
        f"python {SECRET}:42",
        "missing ENOENT",
        "library's thread EPERM",
        "refused 1",
    ], r.stderr
    assert SECRET.encode() not in (fs.enc / "c.txt").read_bytes()
