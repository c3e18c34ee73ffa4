"""The file-system shield end to end: real enclaves, real host files, a hostile host played by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PYSCONE, run_enclave, write_app

from pyscone.host import fspf_tool as tool
from pyscone.protect.chunks import OVERHEAD
from pyscone.protect.pfile import record_offset

SECRET = "the-plaintext-the-host-must-never-see"


class FS:
    """An FSPF in a temporary directory with one region of each protected kind."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fspf = root / "fs.fspf"
        self.paths = tool.Paths.of(str(self.fspf))
        self.enc = root / "enc"
        self.auth = root / "auth"
        self.mem = root / "mem"
        self.enc.mkdir()
        self.auth.mkdir()
        tool.create(self.paths)
        tool.add_region(self.paths, str(self.enc), "encrypted", 4096)
        tool.add_region(self.paths, str(self.auth), "authenticated", 4096)
        tool.add_region(self.paths, str(self.mem), "memory", 4096)

    def run(self, app: Path, *args: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return run_enclave("--fspf", self.fspf, *extra, app, *args, cwd=self.root)

    def put_back_fspf(self, old: bytes) -> None:
        """The host puts back an old disk's FSPF: its one copy (the enclave's second copy,
        ``FSPF.1``, written at its commits, did not exist yet)."""
        self.fspf.write_bytes(old)
        Path(f"{self.fspf}.1").unlink(missing_ok=True)

    def add(self, dest: Path, content: bytes) -> None:
        src = self.root / "plain.tmp"
        src.write_bytes(content)
        tool.add_files(self.paths, str(dest), str(src))
        src.unlink()


@pytest.fixture
def fs(tmp_path: Path) -> FS:
    return FS(tmp_path)


READER = """
    import errno, os, sys
    for p in sys.argv[1:]:
        try:
            with open(p, "rb") as f:
                print("OK", p, f.read().decode(errors="replace"))
        except OSError as e:
            print("ERR", p, errno.errorcode[e.errno])
"""


def test_the_app_reads_and_writes_normally_and_the_host_sees_only_ciphertext(fs: FS) -> None:
    app = write_app(
        fs.root,
        f"""
        import os
        d = {str(fs.enc)!r}
        with open(os.path.join(d, "log.txt"), "w") as f:
            for i in range(2000):
                f.write("{SECRET} %d\\n" % i)
        with open(os.path.join(d, "log.txt")) as f:
            lines = f.read().splitlines()
        assert lines[1999] == "{SECRET} 1999", lines[-1]
        os.makedirs(os.path.join(d, "sub/deeper"))
        with open(os.path.join(d, "sub/deeper/k.bin"), "wb") as f:
            f.write(b"{SECRET}" * 3)
        print(sorted(os.listdir(d)), os.path.getsize(os.path.join(d, "log.txt")), os.path.isdir(os.path.join(d, "sub")))
        print(sorted(os.walk(d))[-1])
        """,
    )
    r = fs.run(app)
    assert r.returncode == 0, r.stderr
    assert "['log.txt', 'sub'] " in r.stdout and " True" in r.stdout
    assert "'k.bin'" in r.stdout
    # The host's copy: nothing of the plaintext in the region or the FSPF files.
    host_files = [p for p in fs.enc.rglob("*") if p.is_file()] + list(fs.root.glob("fs.fspf*"))
    assert len(host_files) >= 5
    for path in host_files:
        assert SECRET.encode() not in path.read_bytes(), path
    assert tool.show(fs.paths).count("encrypted") >= 3
    # A second run sees what the first committed (reopening verifies every chunk).
    again = write_app(fs.root, f"print(open({str(fs.enc / 'log.txt')!r}).read().count('{SECRET}'))", "again.py")
    r = fs.run(again)
    assert r.returncode == 0 and r.stdout.strip() == "2000", r.stderr


def test_the_owner_can_read_back_what_the_enclave_wrote(fs: FS, tmp_path: Path) -> None:
    app = write_app(fs.root, f"open({str(fs.enc / 'out.txt')!r}, 'w').write('{SECRET}')")
    assert fs.run(app).returncode == 0
    r = subprocess.run([*PYSCONE, "fspf", "cat", fs.fspf, fs.enc / "out.txt"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == SECRET, r.stderr


def test_authenticated_region_keeps_plaintext_but_refuses_changes(fs: FS) -> None:
    fs.add(fs.auth / "config.txt", b"mode=strict\n")
    app = write_app(fs.root, READER)
    assert "mode=strict" in (fs.root / "auth/config.txt").read_bytes().decode(errors="replace")
    r = fs.run(app, str(fs.auth / "config.txt"))
    assert r.returncode == 0 and "OK" in r.stdout and "mode=strict" in r.stdout, r.stderr
    data = bytearray((fs.auth / "config.txt").read_bytes())
    data[data.index(b"strict")] = ord("S")  # the host edits the plaintext
    (fs.auth / "config.txt").write_bytes(bytes(data))
    r = fs.run(app, str(fs.auth / "config.txt"))
    assert r.stdout.split() == ["ERR", str(fs.auth / "config.txt"), "EIO"]
    assert "refused" in r.stderr and "config.txt" in r.stderr


def test_app_code_is_imported_from_an_encrypted_region_and_verified(fs: FS) -> None:
    pkg = fs.root / "plainpkg"
    (pkg / "secretpkg").mkdir(parents=True)
    (pkg / "secretpkg/__init__.py").write_text("from .core import answer\n")
    (pkg / "secretpkg/core.py").write_text(f"def answer():\n    return '{SECRET}'\n")
    (pkg / "main.py").write_text("import secretpkg\nprint(secretpkg.answer())\n")
    code = fs.enc / "code"
    tool.add_files(fs.paths, str(code), str(pkg))
    shutil.rmtree(pkg)
    assert SECRET.encode() not in (code / "secretpkg/core.py").read_bytes()
    r = run_enclave("--fspf", fs.fspf, code / "main.py", cwd=fs.root)
    assert r.returncode == 0 and r.stdout.strip() == SECRET, r.stderr
    # One flipped bit in the module's record: the import fails, nothing runs.
    core = code / "secretpkg/core.py"
    data = bytearray(core.read_bytes())
    data[20] ^= 1
    core.write_bytes(bytes(data))
    r = run_enclave("--fspf", fs.fspf, code / "main.py", cwd=fs.root)
    assert r.returncode == 1 and SECRET not in r.stdout
    assert "Errno 5" in r.stderr and "refused" in r.stderr


def test_memory_region_never_reaches_the_host(fs: FS) -> None:
    app = write_app(
        fs.root,
        f"""
        import os
        m = {str(fs.mem)!r}
        os.mkdir(m + "/d")
        with open(m + "/d/x", "w") as f:
            f.write("{SECRET}")
        os.rename(m + "/d/x", m + "/y")
        print(open(m + "/y").read(), sorted(os.listdir(m)), os.path.basename(m) in os.listdir({str(fs.root)!r}))
        """,
    )
    r = fs.run(app)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [SECRET, "['d',", "'y']", "True"]
    assert not fs.mem.exists()
    for path in fs.root.rglob("*"):
        if path.is_file() and path != app:
            assert SECRET.encode() not in path.read_bytes(), path


# -- a hostile host: every kind of tampering is refused with EIO and a log line ---------------


def _two_files(fs: FS) -> tuple[Path, Path]:
    a, b = fs.enc / "a.bin", fs.enc / "b.bin"
    fs.add(a, b"A" * 4096 + b"a" * 4096 + b"end-of-a")
    fs.add(b, b"B" * 4096 + b"b" * 4096 + b"end-of-b")
    return a, b


def _record(path: Path, index: int, slot: int = 0, size: int = 4096) -> tuple[int, int]:
    start = record_offset(4096, index, slot)
    return start, start + size + OVERHEAD


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[5000] ^= 0x10
    path.write_bytes(bytes(data))


def _swap_within(path: Path) -> None:
    data = bytearray(path.read_bytes())
    (a0, a1), (b0, b1) = _record(path, 0), _record(path, 1)
    data[a0:a1], data[b0:b1] = data[b0:b1], data[a0:a1]
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-10])


@pytest.mark.parametrize(
    "attack",
    ["flipped-bit", "swap-within", "swap-between", "truncated", "swapped-file", "rolled-back-file", "host-deleted"],
)
def test_tampering_is_refused_with_eio(fs: FS, attack: str) -> None:
    a, b = _two_files(fs)
    app = write_app(fs.root, READER)
    if attack == "flipped-bit":
        _flip(a)
    elif attack == "swap-within":
        _swap_within(a)
    elif attack == "swap-between":
        data_a, data_b = bytearray(a.read_bytes()), b.read_bytes()
        s, e = _record(a, 0)
        data_a[s:e] = data_b[s:e]
        a.write_bytes(bytes(data_a))
    elif attack == "truncated":
        _truncate(a)
    elif attack == "swapped-file":
        shutil.copy(b, a)
    elif attack == "rolled-back-file":
        old = a.read_bytes()
        writer = write_app(fs.root, f"open({str(a)!r}, 'r+b').write(b'NEW!')", "writer.py")
        assert fs.run(writer).returncode == 0
        a.write_bytes(old + bytes(len(a.read_bytes()) - len(old)))  # the host restores the old records
    elif attack == "host-deleted":
        a.unlink()
    r = fs.run(app, str(a), str(b))
    assert r.stdout.splitlines()[0].split() == ["ERR", str(a), "EIO"], (r.stdout, r.stderr)
    assert r.stdout.splitlines()[1].startswith(f"OK {b} BBBB"), r.stdout  # the untouched file still reads
    assert f"pyscone: fs shield: {a}: refused" in r.stderr


def test_an_extended_file_reads_as_its_committed_length(fs: FS) -> None:
    a, _ = _two_files(fs)
    with open(a, "ab") as f:
        f.write(b"host-appended-garbage" * 1000)
    app = write_app(fs.root, READER)
    r = fs.run(app, str(a))
    assert r.returncode == 0 and r.stdout.endswith("end-of-a\n") and "garbage" not in r.stdout


def test_a_file_added_by_the_host_does_not_exist_for_the_app(fs: FS) -> None:
    (fs.enc / "planted.py").write_text("print('pwned')")
    app = write_app(
        fs.root,
        f"""
        import os
        print(os.listdir({str(fs.enc)!r}), os.path.exists({str(fs.enc / "planted.py")!r}))
        try:
            open({str(fs.enc / "planted.py")!r})
        except FileNotFoundError:
            print("ENOENT")
        """,
    )
    r = fs.run(app)
    assert r.returncode == 0 and r.stdout.split() == ["[]", "False", "ENOENT"], r.stderr
    assert "ignored" in r.stderr and "planted.py" in r.stderr


def test_an_old_fspf_is_refused_when_its_tag_is_pinned(fs: FS) -> None:
    fs.add(fs.enc / "balance", b"100")
    old_fspf, old_data = fs.fspf.read_bytes(), (fs.enc / "balance").read_bytes()
    app = write_app(fs.root, f"open({str(fs.enc / 'balance')!r}, 'w').write('0')")
    r = fs.run(app)
    assert r.returncode == 0, r.stderr
    reader = write_app(fs.root, READER, "reader.py")
    # Only the FSPF's first copy and the data put back: the newer, pinned copy is mounted, and
    # the old data does not open under it.
    fs.fspf.write_bytes(old_fspf)
    (fs.enc / "balance").write_bytes(old_data)
    r = fs.run(reader, str(fs.enc / "balance"))
    assert "OK" not in r.stdout and "refused" in r.stderr, r.stdout + r.stderr
    # The host rolls back the whole file system: FSPF and data, consistently.
    fs.put_back_fspf(old_fspf)
    r = fs.run(reader, str(fs.enc / "balance"))
    assert r.returncode == 70 and "OK" not in r.stdout
    assert "cannot mount the file-system shield" in r.stderr and "not the pinned version" in r.stderr
    # Without a pinned tag (no tag file) the old state would be accepted: the pin is what catches it.
    (fs.root / "fs.fspf.tag").unlink()
    r = fs.run(reader, str(fs.enc / "balance"))
    assert r.stdout.strip() == f"OK {fs.enc / 'balance'} 100"


def test_a_wrong_key_is_refused_at_mount(fs: FS, tmp_path: Path) -> None:
    key = tmp_path / "other.key"
    key.write_text(os.urandom(32).hex())
    app = write_app(fs.root, "print('ran')")
    r = fs.run(app, extra=("--fspf-key-file", str(key)))
    assert r.returncode == 70 and "ran" not in r.stdout and "failed verification" in r.stderr


# -- POSIX behaviour in protected regions ---------------------------------------------------------


def test_rename_unlink_truncate_and_open_fds(fs: FS) -> None:
    app = write_app(
        fs.root,
        f"""
        import os
        d = {str(fs.enc)!r}
        p, q = d + "/p", d + "/q"
        open(p, "w").write("first")
        open(q, "w").write("second")
        os.replace(p, q)                       # atomic save: q now holds p's data
        print(open(q).read(), os.path.exists(p))
        f = open(q, "r+")
        os.unlink(q)                           # still readable through the open fd
        f.seek(0, 2); f.write("+more"); f.seek(0)
        print(f.read(), os.path.exists(q))
        f.close()
        with open(p, "w") as g:
            g.write("x" * 10000)
            g.truncate(5000)
        print(os.path.getsize(p), open(p).read() == "x" * 5000)
        os.mkdir(d + "/dir"); os.rename(p, d + "/dir/p"); os.rename(d + "/dir", d + "/dir2")
        print(os.listdir(d), os.listdir(d + "/dir2"), len(open(d + "/dir2/p").read()))
        try:
            os.rename(d + "/dir2/p", {str(fs.root / "outside")!r})
        except OSError as e:
            print("EXDEV" if e.errno == 18 else e)
        os.remove(d + "/dir2/p"); os.rmdir(d + "/dir2"); print(os.listdir(d))
        """,
    )
    r = fs.run(app)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "first False",
        "first+more False",
        "5000 True",
        "['dir2'] ['p'] 5000",
        "EXDEV",
        "[]",
    ]
    assert sorted(os.listdir(fs.enc)) == []


def test_an_interrupted_rename_is_finished_at_the_next_mount(fs: FS) -> None:
    # The state a kill leaves between the FSPF update and the host rename.
    fs.add(fs.enc / "src", b"payload")
    table, key, _ = tool.load(fs.paths)
    import dataclasses

    entry = table.files.pop(str(fs.enc / "src"))
    table.files[str(fs.enc / "dst")] = dataclasses.replace(entry, store=str(fs.enc / "src"))
    tool.save(fs.paths, table, key)
    app = write_app(
        fs.root, "import os, sys; print(sorted(os.listdir(sys.argv[1])), open(sys.argv[1] + '/dst').read())"
    )
    r = fs.run(app, str(fs.enc))
    assert r.returncode == 0 and r.stdout.strip() == "['dst'] payload", r.stderr
    assert sorted(os.listdir(fs.enc)) == ["dst"]
    assert "store" not in tool.show(fs.paths)


def test_cli_mistakes_are_one_line_errors(fs: FS, tmp_path: Path) -> None:
    def cli(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PYSCONE, *map(str, args)], capture_output=True, text=True, cwd=tmp_path)

    (tmp_path / "plain.txt").write_text("x")
    cases = [
        (("fspf", "addf", fs.fspf, fs.enc / "x", tmp_path / "empty-dir"), "no such file"),
        (("fspf", "addr", fs.fspf, "relative/dir", "--kind", "encrypted"), "absolute path"),
        (("fspf", "addf", fs.fspf, tmp_path / "elsewhere", tmp_path / "plain.txt"), "unprotected region"),
        (("fspf", "create", fs.fspf), "exists"),
        (("fspf", "show", tmp_path / "missing.fspf"), "cannot read the FSPF key"),
        (("fspf", "cat", fs.fspf, "/nope"), "not a protected file"),
        (("run", "--fspf", tmp_path / "missing.fspf", "x.py"), "no such file"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "bad.key").write_text("zz")
    r = cli("fspf", "show", fs.fspf, "--key-file", tmp_path / "bad.key")
    assert r.returncode == 2 and "64 hex digits" in r.stderr


def test_files_left_open_are_committed_at_exit(fs: FS) -> None:
    app = write_app(
        fs.root,
        f"""
        import sys
        f = open({str(fs.enc / "left-open.txt")!r}, "w")
        f.write("written, never closed")
        g = open({str(fs.enc / "exits.txt")!r}, "w")
        g.write("sys.exit with a buffered write")
        sys.exit(3)
        """,
    )
    r = fs.run(app)
    assert r.returncode == 3, r.stderr
    reader = write_app(fs.root, READER, "reader.py")
    r = fs.run(reader, str(fs.enc / "left-open.txt"), str(fs.enc / "exits.txt"))
    assert r.stdout.splitlines() == [
        f"OK {fs.enc / 'left-open.txt'} written, never closed",
        f"OK {fs.enc / 'exits.txt'} sys.exit with a buffered write",
    ]


def test_lthreads_writing_concurrently(fs: FS) -> None:
    app = write_app(
        fs.root,
        f"""
        import os, threading
        d = {str(fs.enc)!r}
        shared = open(d + "/shared.bin", "w+b")
        def worker(n):
            with open(d + f"/own{{n}}.txt", "w") as f:
                for i in range(300):
                    f.write(f"{{n}}:{{i}}\\n")
                    if i % 100 == 0:
                        f.flush(); os.fsync(f.fileno())
            for i in range(50):
                os.pwrite(shared.fileno(), bytes([65 + n]) * 1000, (n * 50 + i) * 1000)
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        shared.close()
        data = open(d + "/shared.bin", "rb").read()
        ok = all(data[(n * 50 + i) * 1000:(n * 50 + i + 1) * 1000] == bytes([65 + n]) * 1000
                 for n in range(8) for i in range(50))
        own = all(open(d + f"/own{{n}}.txt").read().splitlines()[299] == f"{{n}}:299" for n in range(8))
        print(len(data), ok, own, len(os.listdir(d)))
        """,
    )
    r = fs.run(app)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["400000", "True", "True", "9"]


def test_permissions_times_and_access(fs: FS) -> None:
    app = write_app(
        fs.root,
        f"""
        import os
        for p in ({str(fs.enc / "f")!r}, {str(fs.mem / "f")!r}):
            open(p, "w").write("x")
            os.chmod(p, 0o600)
            os.utime(p, ns=(1_000_000_000, 2_000_000_000))
            st = os.stat(p)
            print(oct(st.st_mode & 0o777), st.st_mtime_ns, os.access(p, os.R_OK), os.access(p + "-no", os.F_OK))
        """,
    )
    r = fs.run(app)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["0o600 2000000000 True False"] * 2
    assert (fs.enc / "f").stat().st_mode & 0o777 == 0o600  # permissions are host metadata


def test_small_slots_and_orphans_left_by_a_crash(fs: FS) -> None:
    # Slots smaller than the FSPF (5 KB) and a record (4,124 bytes): both move in several host calls.
    fs.add(fs.enc / "d/big", bytes(range(256)) * 4096)
    (fs.enc / "d/orphan").write_bytes(b"created, never committed")  # what a kill before a first commit leaves
    app = write_app(
        fs.root,
        f"""
        import os
        d = {str(fs.enc / "d")!r}
        print(open(d + "/big", "rb").read() == bytes(range(256)) * 4096, os.listdir(d))
        os.remove(d + "/big")
        os.rmdir(d)
        print(os.path.exists(d))
        """,
    )
    r = fs.run(app, extra=("--slot-size", "4K"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["True ['big']", "False"]
    assert not (fs.enc / "d").exists()


def test_a_full_disk_fails_the_writer_and_keeps_the_last_commit(fs: FS) -> None:
    # The host may grow no file past 2 MiB (RLIMIT_FSIZE on pyscone run: host writes past it
    # fail with EFBIG, as on a full disk; 16 slots keep the shared region under it too).  The write-behind error reaches the app, the commit
    # fails, and the file keeps its last committed contents, in this run and the next.
    import resource

    original = bytes(range(256)) * 800  # 200 KiB: its records fit under the limit
    app = write_app(
        fs.root,
        f"""
        import errno, os
        p = os.path.join({str(fs.enc)!r}, "kept.bin")
        with open(p, "wb") as f:
            f.write({original!r})
        try:
            with open(p, "r+b") as f:
                for _ in range(64):
                    f.write(os.urandom(65536))  # 4 MiB: its records cannot fit
            print("no error")
        except OSError as e:
            print("write failed:", errno.errorcode[e.errno])
        with open(p, "rb") as f:
            print("kept" if f.read() == {original!r} else "changed")
        """,
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    cmd = [*PYSCONE, "run", "--slots", "16", "--fspf", str(fs.fspf), str(app)]
    r = subprocess.run(cmd, cwd=fs.root, capture_output=True, text=True, timeout=60, preexec_fn=limit)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["write failed: EFBIG", "kept"], r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    check = f"""
        with open({str(fs.enc / "kept.bin")!r}, "rb") as f:
            print("kept" if f.read() == {original!r} else "changed")
        """
    again = fs.run(write_app(fs.root, check, name="check.py"))
    assert (again.returncode, again.stdout) == (0, "kept\n"), again.stderr
    # With the default 1024 slots the shared region itself cannot be made: one error line.
    cmd = [*PYSCONE, "run", "--fspf", str(fs.fspf), str(app)]
    r = subprocess.run(cmd, cwd=fs.root, capture_output=True, text=True, timeout=60, preexec_fn=limit)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("error: cannot create the 64 MiB shared-memory region"), r.stderr
    assert "Traceback" not in r.stderr


def test_buffered_random_reads_return_exactly_what_was_written(fs: FS) -> None:
    # After a seek the shield gives a buffered reader only the rest of one chunk (a short raw
    # read), so a small random read opens one chunk, not a buffer's worth: the reader must still
    # return exactly the bytes asked for, however they straddle chunks and buffers.
    app = write_app(
        fs.root,
        f"""
        import io, os, random
        p = os.path.join({str(fs.enc)!r}, "random.bin")
        rng = random.Random(7)
        data = rng.randbytes(300_000)
        with open(p, "wb") as f:
            f.write(data)
        bad = 0
        for mode in ("rb", "r+b"):
            with open(p, mode) as f:
                for _ in range(300):
                    off, size = rng.randrange(len(data)), rng.choice([1, 100, 4095, 4096, 4097, 70_000])
                    f.seek(off)
                    how = rng.choice(["read", "readinto", "read1", "peek"])
                    if how == "read":
                        got = f.read(size)
                    elif how == "readinto":
                        buf = bytearray(size)
                        got = bytes(buf[: f.readinto(buf)])
                    elif how == "read1":
                        got = f.read1(size)
                    else:
                        got = f.peek(size)[:size]
                    want = data[off : off + size]
                    ok = got == want if how in ("read", "readinto") else (got and want.startswith(got))
                    bad += not ok
        print("mismatches", bad)
        """,
    )
    r = fs.run(app)
    assert (r.returncode, r.stdout) == (0, "mismatches 0\n"), r.stderr


def _copies(fs: FS) -> tuple[Path, Path]:
    """(the pinned copy of the FSPF, the other one): the tag file names the pinned one."""
    pinned = (fs.root / "fs.fspf.tag").read_text().split()[0]
    both = [fs.fspf, Path(f"{fs.fspf}.1")]
    current = [c for c in both if c.exists() and c.read_bytes()[-16:].hex() == pinned]
    assert len(current) == 1, pinned
    return current[0], next(c for c in both if c != current[0])


def test_commits_write_the_fspf_copy_that_is_not_pinned_and_a_torn_copy_is_never_mounted(fs: FS) -> None:
    """The FSPF has two copies on the host (``enclave/shields/fspfcopies.py``): each commit is
    written over the one not pinned, so a torn or altered write there costs nothing."""
    fs.add(fs.enc / "n", b"0")
    app = write_app(fs.root, f"import sys\nopen({str(fs.enc / 'n')!r}, 'w').write(sys.argv[1])")
    reader = write_app(fs.root, READER, "reader.py")
    seen = set()
    for i in range(1, 4):
        assert fs.run(app, str(i)).returncode == 0
        current, other = _copies(fs)
        seen.add(current.name)
        r = fs.run(reader, str(fs.enc / "n"))
        assert r.stdout.strip() == f"OK {fs.enc / 'n'} {i}", r.stderr
    assert seen == {"fs.fspf", "fs.fspf.1"}  # they take turns
    # A kill in the middle of a commit's write: the unpinned copy torn, or garbage.
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:]):
        other.write_bytes(damage(other.read_bytes()))
        r = fs.run(reader, str(fs.enc / "n"))
        assert (r.returncode, r.stdout.strip()) == (0, f"OK {fs.enc / 'n'} 3"), r.stderr
    # The pinned copy altered: nothing else may stand in for it.
    current.write_bytes(damage(current.read_bytes()))
    r = fs.run(reader, str(fs.enc / "n"))
    assert r.returncode == 70 and "cannot mount the file-system shield" in r.stderr, r.stdout + r.stderr
