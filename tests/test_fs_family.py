"""The FS shield across a process family: parent and forked children write protected files
(docs/fs-shield.md, "Processes"; pyscone/enclave/shields/fsfamily.py).

Every test forks real child enclaves with ``os.fork`` inside ``pyscone run --fspf`` (dev mode,
the tag file pins the FSPF) and checks the result in a new run, which mounts only the pinned
FSPF.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYSCONE, run_enclave, write_app

from pyscone.host import fspf_tool as tool


class Region:
    """An FSPF with one encrypted region, in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fspf = root / "fs.fspf"
        self.enc = root / "enc"
        self.enc.mkdir()
        paths = tool.Paths.of(str(self.fspf))
        tool.create(paths)
        tool.add_region(paths, str(self.enc), "encrypted", 4096)

    def run(self, source: str, *args: str, name: str = "app.py", timeout: float = 90) -> tuple[int, str, str]:
        app = write_app(self.root, source, name)
        r = run_enclave("--fspf", self.fspf, app, str(self.enc), *args, cwd=self.root, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    def read_all(self) -> dict[str, str]:
        """Every protected file, read in a new run (which mounts the pinned FSPF only)."""
        code, out, err = self.run(READ_ALL, name="read_all.py")
        assert code == 0, err
        files: dict[str, str] = {}
        for line in out.splitlines():
            name, _, content = line.partition(" ")
            files[name] = content.encode("latin-1").decode("unicode_escape")
        return files


@pytest.fixture
def region(tmp_path: Path) -> Region:
    return Region(tmp_path)


READ_ALL = """
    import os, sys
    d = sys.argv[1]
    for name in sorted(os.listdir(d)):
        try:
            with open(os.path.join(d, name), "rb") as f:
                print(name, f.read().decode().encode("unicode_escape").decode())
        except OSError as e:
            print(name, "ERROR", e.errno)
"""

DISTINCT = """
    import os, sys
    d = sys.argv[1]

    def write(name, rounds):
        for k in range(rounds):
            with open(os.path.join(d, name), "w") as f:
                f.write(f"{name} version {k}\\n" * (k + 1))
            os.makedirs(os.path.join(d, f"dir-{name}"), exist_ok=True)

    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            write(f"child{i}", 12)
            os._exit(0)
        pids.append(pid)
    write("parent", 12)
    print("statuses", [os.waitpid(pid, 0)[1] for pid in pids])
    print("seen by the parent", sorted(os.listdir(d)))
    with open(os.path.join(d, "child1")) as f:
        print("child1 in the parent", f.read().splitlines()[0])
"""


@pytest.mark.parametrize("pin", ["tag file", "none"])
def test_parent_and_two_children_write_distinct_files_and_every_commit_survives(region: Region, pin: str) -> None:
    if pin == "none":  # nothing pins the FSPF (dev mode warns): the newest copy that opens wins
        (region.root / "fs.fspf.tag").unlink()
    code, out, err = region.run(DISTINCT)
    assert code == 0, err
    names = ["child0", "child1", "dir-child0", "dir-child1", "dir-parent", "parent"]
    assert out.splitlines() == [
        "statuses [0, 0]",
        f"seen by the parent {names}",
        "child1 in the parent child1 version 11",
    ], err
    assert "refused" not in err and "ignored" not in err, err
    assert ("rollback protection is OFF" in err) == (pin == "none"), err
    files = region.read_all()
    for name in ("child0", "child1", "parent"):
        assert files[name] == f"{name} version 11\n" * 12, files
    assert sorted(files) == names


SHARED = """
    import fcntl, os, sys
    d = sys.argv[1]
    shared = os.path.join(d, "shared.log")
    ROUNDS = 15

    def append_reopening(who):
        # Each record: open, lock, append, close (the close commits, then drops the lock).
        for k in range(ROUNDS):
            with open(shared, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(f"{who} open {k}\\n")

    def append_keeping_open(who):
        # One open for all records: lock, append, flush, unlock (the unlock commits).
        with open(shared, "a") as f:
            for k in range(ROUNDS):
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(f"{who} kept {k}\\n")
                f.flush()
                fcntl.flock(f, fcntl.LOCK_UN)

    open(shared, "w").close()
    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            append_reopening(f"child{i}")
            append_keeping_open(f"child{i}")
            os._exit(0)
        pids.append(pid)
    append_keeping_open("parent")
    append_reopening("parent")
    print("statuses", [os.waitpid(pid, 0)[1] for pid in pids])
    with open(shared) as f:
        print("records seen by the parent", len(f.read().splitlines()))
"""


def test_a_shared_file_appended_under_flock_loses_no_record(region: Region) -> None:
    code, out, err = region.run(SHARED)
    assert code == 0, err
    assert out.splitlines() == ["statuses [0, 0]", "records seen by the parent 90"], err
    records = region.read_all()["shared.log"].splitlines()
    expected = {
        f"{who} {how} {k}" for who in ("parent", "child0", "child1") for how in ("open", "kept") for k in range(15)
    }
    assert len(records) == len(expected) and set(records) == expected, records
    for who in ("parent", "child0", "child1"):  # each writer's records in its own order
        mine = [r for r in records if r.startswith(who + " ")]
        assert mine == sorted(mine, key=lambda r: (r.split()[1] != mine[0].split()[1], int(r.split()[2])))


UNCOORDINATED = """
    import errno, os, sys, time
    d = sys.argv[1]
    path = os.path.join(d, "f")
    with open(path, "w") as f:
        f.write("committed\\n")
    fd = os.open(path, os.O_RDWR)
    marker = os.path.join(os.path.dirname(d), "parent-wrote")  # (an unprotected path)
    pid = os.fork()
    if pid == 0:
        while not os.path.exists(marker):  # until the parent has written (not committed)
            time.sleep(0.01)
        try:
            os.pwrite(fd, b"child\\n", 0)
            print("child wrote", flush=True)
        except OSError as e:
            print("child", errno.errorcode[e.errno], e.strerror, flush=True)
        os._exit(0)
    os.pwrite(fd, b"parent\\n", 0)
    open(marker, "w").close()
    os.waitpid(pid, 0)
    os.close(fd)  # the parent's commit
    print(open(path).read().splitlines())
"""


def test_a_second_uncoordinated_writer_of_one_file_is_refused_not_lost(region: Region) -> None:
    code, out, err = region.run(UNCOORDINATED)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("child EBUSY another process of this family has uncommitted writes"), out
    assert lines[1:] == ["['parent', 'ed']"], out
    assert region.read_all()["f"] == "parent\ned\n"


KILLED = """
    import os, signal, sys, time
    d = sys.argv[1]
    def rewrite(name, k):
        with open(os.path.join(d, name), "w") as f:
            f.write(f"{name} {k}\\n" * 3000)  # several chunks: a kill may fall inside a commit
    pid = os.fork()
    if pid == 0:
        k = 0
        while True:
            rewrite("victim", k)
            with open(os.path.join(d, "victim.log"), "a") as f:
                f.write(f"{k}\\n")
            k += 1
    time.sleep(float(sys.argv[2]))
    os.kill(pid, signal.SIGKILL)
    print("child", os.waitpid(pid, 0)[1])
    # The family goes on: the commit lock and the victim's lease went with the child.
    for k in range(3):
        rewrite("parent", k)
    with open(os.path.join(d, "victim.log")) as f:
        print("victim.log readable", len(f.read().splitlines()) > 0)
    rewrite("victim", "parent")
"""


@pytest.mark.parametrize("delay", ["0.9", "1.3", "1.7"])
def test_sigkill_of_a_child_mid_write_leaves_every_file_committed(region: Region, delay: str) -> None:
    code, out, err = region.run(KILLED, delay)
    assert code == 0, err
    assert out.splitlines() == ["child 9", "victim.log readable True"], err
    files = region.read_all()
    assert files["parent"] == "parent 2\n" * 3000
    assert files["victim"] == "victim parent\n" * 3000
    log = files["victim.log"].splitlines()
    assert log == [str(k) for k in range(len(log))], log  # whole records, in order, a prefix


SAVE = """
    import os, sys, time
    d = sys.argv[1]
    def write(name, text):
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    pid = os.fork()
    if pid == 0:
        write("child", "child v1")
        os._exit(0)
    os.waitpid(pid, 0)
    write("parent", "parent v1")
    # The host saves the FSPF now; then the family commits again.
    open(sys.argv[2], "w").close()
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.02)
    pid = os.fork()
    if pid == 0:
        write("child", "child v2")
        os._exit(0)
    os.waitpid(pid, 0)
    write("parent", "parent v2")
    print("written", flush=True)
    # The host restores what it saved (the FSPF's copies and the tag file): this process still
    # knows the newest generation, and so does a child forked before the restore.
    pid = os.fork()
    if pid == 0:
        while not os.path.exists(sys.argv[5]):
            time.sleep(0.02)
        try:
            open(os.path.join(d, "child")).read()
            print("child read the rolled-back FSPF", flush=True)
        except OSError as e:
            print("child", e.errno, flush=True)
        os._exit(0)
    open(sys.argv[4], "w").close()
    while not os.path.exists(sys.argv[5]):
        time.sleep(0.02)
    for what in ("stat", "write"):
        try:
            if what == "stat":
                os.stat(os.path.join(d, "parent"))
            else:
                write("parent", "parent v3")
            print(what, "went through")
        except OSError as e:
            print(what, e.errno)
    os.waitpid(pid, 0)
"""


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_rollback_of_the_fspf_in_a_run_is_caught_by_every_member(region: Region) -> None:
    flags = [region.root / n for n in ("saved", "go", "restore", "restored")]
    app = write_app(region.root, SAVE)
    proc = subprocess.Popen(
        [*PYSCONE, "run", "--fspf", str(region.fspf), str(app), str(region.enc), *map(str, flags)],
        cwd=region.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(flags[0])
        saved = _save(region)
        flags[1].touch()
        _wait_for(flags[2])
        _restore(region, saved, tag_file=True)  # the whole file system's pin, rolled back
        flags[3].touch()
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert sorted(out.splitlines()) == ["child 5", "stat 5", "write 5", "written"], err  # (5: EIO)
    assert "rolled back on the host" in err, err


def test_a_rollback_of_the_fspf_copies_is_refused_at_mount_after_family_commits(region: Region) -> None:
    assert region.run(DISTINCT)[0] == 0
    saved = _save(region)
    assert region.run(DISTINCT)[0] == 0
    _restore(region, saved, tag_file=False)
    code, out, err = region.run(READ_ALL, name="read_all.py")
    assert code != 0 and "cannot mount the file-system shield" in err and "not the pinned version" in err, (out, err)


def _save(region: Region) -> Path:
    saved = region.root / f"saved-{time.monotonic_ns()}"
    saved.mkdir()
    for p in region.root.glob("fs.fspf*"):
        if not p.name.endswith((".key", ".lock")):
            shutil.copy2(p, saved / p.name)
    return saved


def _restore(region: Region, saved: Path, tag_file: bool) -> None:
    for p in region.root.glob("fs.fspf*"):
        if not p.name.endswith((".key", ".lock", ".tag")):
            p.unlink()
    for p in saved.iterdir():
        if tag_file or not p.name.endswith(".tag"):
            shutil.copy2(p, region.root / p.name)


STALE_READER = """
    import os, sys
    d = sys.argv[1]
    path = os.path.join(d, "f")
    with open(path, "w") as f:
        f.write("v0 " * 5000)
    reader = open(path)
    print("before", reader.read(6))
    pid = os.fork()
    if pid == 0:
        for v in ("v1 ", "v2 "):  # the second commit writes the slots the reader's version names
            with open(path, "w") as f:
                f.write(v * 5000)
        os._exit(0)
    os.waitpid(pid, 0)
    reader.seek(0)
    print("after", reader.read(6), len(reader.read()))
"""


def test_an_open_reader_moves_on_to_what_another_member_committed(region: Region) -> None:
    code, out, err = region.run(STALE_READER)
    assert (code, out) == (0, "before v0 v0 \nafter v2 v2  14994\n"), err
    assert "refused" not in err, err


RACES = """
    import errno, os, sys, time
    d = sys.argv[1]
    with open(os.path.join(d, "moved"), "w") as f:
        f.write("first\\n")
    follower = open(os.path.join(d, "moved"), "a")  # an open file follows its file, as natively
    start = time.time() + 1.0
    pids = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:
            time.sleep(max(0.0, start - time.time()))
            try:
                with open(os.path.join(d, "new"), "x") as f:
                    f.write(f"made by {i}")
                print("made", i, flush=True)
            except FileExistsError:
                print("exists", i, flush=True)
            if i == 0:
                os.rename(os.path.join(d, "moved"), os.path.join(d, "renamed"))
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    follower.write("written through the open file\\n")
    follower.close()
    print(sorted(os.listdir(d)))
"""


def test_creates_race_once_and_an_open_file_follows_another_members_rename(region: Region) -> None:
    code, out, err = region.run(RACES)
    assert code == 0, err
    lines = out.splitlines()
    made = [line for line in lines if line.startswith("made")]
    assert len(made) == 1 and len([line for line in lines if line.startswith("exists")]) == 2, out
    assert lines[-1] == "['new', 'renamed']", out
    files = region.read_all()
    assert files == {"new": f"made by {made[0].split()[1]}", "renamed": "first\nwritten through the open file\n"}


KILL_ALL = """
    import os, signal, sys, time
    d = sys.argv[1]
    def rewrite(name, k):
        with open(os.path.join(d, name), "w") as f:
            f.write(f"{name} {k}\\n" * 2000)
    for i in range(2):
        if os.fork() == 0:
            k = 0
            while True:
                rewrite(f"child{i}", k)
                k += 1
    for k in range(int(float(sys.argv[2]) * 40)):
        rewrite("parent", k)
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)  # the children die with it (as on Linux with PDEATHSIG)
"""


def test_sigkill_of_the_parent_leaves_every_members_files_committed(region: Region) -> None:
    code, _, err = region.run(KILL_ALL, "1.0")
    assert code != 0, err
    files = region.read_all()
    assert sorted(files) == ["child0", "child1", "parent"], files
    for name, content in files.items():
        first = content.splitlines()[0]
        assert first.startswith(f"{name} ") and content == f"{first}\n" * 2000, (name, content[:80])


CAS_APP = """
    import errno, os, sys
    d = DATA
    if os.path.exists(os.path.join(d, "parent")):  # the next run of the session
        print(sorted(os.listdir(d)), open(os.path.join(d, "parent")).read())
        sys.exit(0)
    with open(os.path.join(d, "parent"), "w") as f:
        f.write("before the fork")
    pid = os.fork()
    if pid == 0:
        for what in ("write", "create"):
            try:
                with open(os.path.join(d, "parent" if what == "write" else "child"), "w") as f:
                    f.write("child")
                print("child", what, "went through", flush=True)
            except OSError as e:
                print("child", what, errno.errorcode[e.errno], flush=True)
        with open(os.path.join(d, "parent")) as f:
            print("child reads", f.read(), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    with open(os.path.join(d, "parent"), "a") as f:
        f.write(", after it")
    print("parent committed", flush=True)
"""


def test_with_the_cas_pinning_only_the_first_process_writes(tmp_path: Path) -> None:
    from test_cas import World, _service, cli

    world = World(tmp_path)
    try:
        data = world.root / "data"
        data.mkdir()
        fspf = world.root / "app.fspf"
        assert cli("fspf", "create", fspf, cwd=world.root).returncode == 0
        assert cli("fspf", "addr", fspf, str(data), "--kind", "encrypted", cwd=world.root).returncode == 0
        tag = cli("fspf", "tag", fspf, cwd=world.root).stdout.strip()
        key = (world.root / "app.fspf.key").read_text().strip()
        write_app(world.root, CAS_APP.replace("DATA", repr(str(data))), "app.py")
        fs = f"    fspf: {{path: {fspf}, key: {key}, tag: {tag}}}\n"
        policy = world.policy("fam", _service(world.measure(), "[app.py]", fs))
        assert world.owner("session", "create", str(policy)).returncode == 0
        r = world.run("fam/app")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [
            "child write EROFS",
            "child create EROFS",
            "child reads before the fork",
            "parent committed",
        ], r.stderr
        r = world.run("fam/app")  # the CAS gives it the FSPF that the parent's last commit pinned
        assert (r.returncode, r.stdout) == (0, "['parent'] before the fork, after it\n"), r.stderr
    finally:
        world.stop()


SQLITE = """
    import os, sqlite3, sys
    db = os.path.join(sys.argv[1], "family.db")
    with sqlite3.connect(db) as con:
        con.execute("create table t (who text, k integer)")
    con.close()  # (SQLite: never carry a connection across a fork)

    def insert(who):
        con = sqlite3.connect(db, timeout=60, isolation_level=None)
        for k in range(20):  # one transaction a row: the members' transactions interleave
            con.execute("begin immediate")
            n = con.execute("select count(*) from t").fetchone()[0]
            con.execute("insert into t values (?, ?)", (who, n))
            con.execute("commit")
        con.close()

    pids = []
    for i in range(2):
        pid = os.fork()
        if pid == 0:
            insert(f"child{i}")
            os._exit(0)
        pids.append(pid)
    insert("parent")
    print("statuses", [os.waitpid(pid, 0)[1] for pid in pids])
"""

SQLITE_READ = """
    import os, sqlite3, sys
    con = sqlite3.connect(os.path.join(sys.argv[1], "family.db"))
    print(con.execute("select count(*), count(distinct k), min(k), max(k) from t").fetchall())
    print(con.execute("select who, count(*) from t group by who order by who").fetchall())
"""


def test_sqlite_connections_of_three_members_serialize_their_transactions(region: Region) -> None:
    # SQLite's POSIX locks (from C, through the libc layer) on a database opened after the fork
    # are the host's: each transaction sees the rows the others committed.
    code, out, err = region.run(SQLITE)
    assert (code, out) == (0, "statuses [0, 0]\n"), err
    code, out, err = region.run(SQLITE_READ, name="read.py")
    assert code == 0, err
    assert out.splitlines() == [
        "[(60, 60, 0, 59)]",
        "[('child0', 20), ('child1', 20), ('parent', 20)]",
    ], err
