"""A hostile host against the *shape* of the protected regions: planted directories, lying
``STAT`` answers, symlinks at, above and inside a region, a missing tag file.

Every test runs real enclaves (``pyscone run --fspf``) over real files; where the host lies, its
executor is the real one with a few handlers overridden (``fs_lying_host.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app

from pyscone.abi import DT_DIR
from pyscone.host import fspf_tool as tool
from pyscone.protect import fspf as fspf_mod
from pyscone.protect import namespace

SECRET = "the-plaintext-the-host-must-never-see"
LYING_HOST = Path(__file__).parent / "fs_lying_host.py"
HOST_CODE = "import sys; print('HOST CODE RAN'); sys.stdout.flush()\ndef hello():\n    print('HOST HELLO')\n"


class Srv:
    """``ROOT/srv/code`` (authenticated: the app) and ``ROOT/srv/data`` (encrypted)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.srv = root / "srv"
        self.code = self.srv / "code"
        self.data = self.srv / "data"
        self.fspf = root / "fs.fspf"
        self.paths = tool.Paths.of(str(self.fspf))
        tool.create(self.paths)
        tool.add_region(self.paths, str(self.code), "authenticated", 4096)
        tool.add_region(self.paths, str(self.data), "encrypted", 4096)

    def protect(self, files: dict[str, str]) -> None:
        """Protect ``files`` (paths relative to ``srv``) in place, as the owner's build would."""
        for rel, text in files.items():
            p = self.srv / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
            tool.add_files(self.paths, str(p), str(p))

    def run(self, script: Path, *args: str, lies: dict[str, object] | None = None) -> subprocess.CompletedProcess[str]:
        if lies is None:
            return run_enclave("--fspf", self.fspf, script, *args, cwd=self.root)
        env = {k: v for k, v in os.environ.items() if k != "PYSCONE_TEST_HOSTILE"}
        env["PYSCONE_FS_LIES"] = json.dumps(lies)
        cmd = [sys.executable, str(LYING_HOST), "--fspf", str(self.fspf), str(script), *args]
        r = subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True, timeout=60)
        assert "lying-host: serving the enclave" in r.stderr, r.stderr  # the liar, not the real executor
        return r

    def plaintext_on_disk(self) -> list[str]:
        """Every host file (symlinks not followed) that holds the secret in the clear."""
        found = []
        for d, _, names in os.walk(self.root):
            for name in names:
                p = os.path.join(d, name)
                if not os.path.islink(p) and SECRET.encode() in Path(p).read_bytes():
                    found.append(p)
        return found


@pytest.fixture
def srv(tmp_path: Path) -> Srv:
    return Srv(tmp_path)


# -- item 2: what exists in a protected region is what the FSPF says ---------------------------

MAIN = """
import helper
helper.hello()
"""


@pytest.mark.parametrize("host", ["symlink-and-one-lie", "forged-listing", "race-without-a-lie"])
def test_a_package_planted_next_to_a_protected_module_never_runs(srv: Srv, host: str) -> None:
    # The importer prefers a package directory to a module: the host plants code/helper/ with
    # an __init__.py beside the protected helper.py, and makes the enclave believe in it.
    srv.protect({"code/main.py": MAIN, "code/helper.py": "def hello():\n    print('PROTECTED HELLO')\n"})
    planted = srv.code / "helper"
    planted.mkdir()
    evil = srv.root / "evil.py"
    evil.write_text(HOST_CODE)
    init = planted / "__init__.py"
    lies: dict[str, object]
    if host == "symlink-and-one-lie":
        # A real symlink (listed: it is not a regular file) and one STAT that says "directory".
        init.symlink_to(evil)
        lies = {"stat_dir": [str(init)]}
    elif host == "forged-listing":
        # A real regular file that the listing calls a directory, and so does STAT.
        init.write_text(HOST_CODE)
        lies = {"dirent_dir": ["__init__.py"], "stat_dir": [str(init)]}
    else:
        # No answer is false: __init__.py is a symlink to a directory when the enclave asks,
        # and to the host's code when it opens (the host owns the disk and races the enclave).
        (srv.root / "a-dir").mkdir()
        init.symlink_to(srv.root / "a-dir")
        lies = {"race": [[str(init), str(evil)]]}
    r = srv.run(srv.code / "main.py", lies=lies)
    assert "HOST CODE RAN" not in r.stdout and "HOST HELLO" not in r.stdout, (r.stdout, r.stderr)
    assert r.returncode == 0 and r.stdout == "PROTECTED HELLO\n", (r.stdout, r.stderr)


SHAPE = """
import errno, os, stat, sys
code = sys.argv[1]
def show(what, f):
    try:
        print(what, f())
    except OSError as e:
        print(what, errno.errorcode[e.errno])
show("listdir", lambda: sorted(os.listdir(code)))
show("walk", lambda: sorted((os.path.relpath(d, code), sorted(ds), sorted(fs)) for d, ds, fs in os.walk(code)))
show("isdir-planted", lambda: os.path.isdir(code + "/planted"))
show("stat-planted", lambda: os.stat(code + "/planted"))
show("open-planted", lambda: os.open(code + "/planted", os.O_RDONLY))
show("open-planted-file", lambda: open(code + "/planted/x.py").read())
show("readlink-link", lambda: os.readlink(code + "/link"))
show("lstat-link", lambda: os.lstat(code + "/link"))
show("readlink-file", lambda: os.readlink(code + "/pkg/mod.py"))
show("readlink-dir", lambda: os.readlink(code + "/pkg"))
show("fifo", lambda: os.path.exists(code + "/fifo"))
show("isdir-pkg", lambda: os.path.isdir(code + "/pkg"))
fd = os.open(code + "/pkg", os.O_RDONLY)
st = os.fstat(fd)
os.fsync(fd)
print("pkg-fd", fd >= 1 << 20, stat.S_ISDIR(st.st_mode))
show("read-dir-fd", lambda: os.read(fd, 10))
os.close(fd)
show("open-dir-for-write", lambda: os.open(code + "/pkg", os.O_WRONLY))
show("symlink-in-region", lambda: os.symlink("/etc", code + "/new-link"))
"""


def test_a_protected_region_shows_only_what_the_fspf_lists(srv: Srv) -> None:
    srv.protect({"code/main.py": "print('main')\n", "code/pkg/mod.py": "x = 1\n"})
    (srv.code / "planted").mkdir()
    (srv.code / "planted/x.py").write_text(HOST_CODE)
    (srv.code / "link").symlink_to("/etc")
    os.mkfifo(srv.code / "fifo")
    app = write_app(srv.root, SHAPE, "shape.py")
    r = srv.run(app, str(srv.code))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "listdir ['main.py', 'pkg']",
        "walk [('.', ['pkg'], ['main.py']), ('pkg', [], ['mod.py'])]",
        "isdir-planted False",
        "stat-planted ENOENT",
        "open-planted ENOENT",
        "open-planted-file ENOENT",
        "readlink-link ENOENT",
        "lstat-link ENOENT",
        "readlink-file EINVAL",
        "readlink-dir EINVAL",
        "fifo False",
        "isdir-pkg True",
        "pkg-fd True True",  # a virtual fd: no host fd of the region reaches the app
        "read-dir-fd EISDIR",
        "open-dir-for-write EISDIR",
        "symlink-in-region EPERM",
    ]
    assert "HOST CODE RAN" not in r.stdout


def test_a_lying_stat_does_not_make_a_directory_in_a_protected_region(srv: Srv) -> None:
    srv.protect({"data/seed.txt": "seed\n"})
    (srv.data / "host.txt").write_text("host data")
    app = write_app(
        srv.root,
        """
        import errno, os, sys
        for p in sys.argv[1:]:
            try:
                fd = os.open(p, os.O_RDONLY)
                print("opened", p, fd, os.read(fd, 100))
            except OSError as e:
                print("ERR", os.path.basename(p), errno.errorcode[e.errno], os.path.isdir(p))
        """,
    )
    ghost, host_file = srv.data / "ghost", srv.data / "host.txt"
    r = srv.run(app, str(ghost), str(host_file), lies={"stat_dir": [str(ghost), str(host_file)]})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ERR ghost ENOENT False", "ERR host.txt ENOENT False"], r.stdout


def test_directories_the_app_makes_in_a_region_are_in_the_fspf(srv: Srv) -> None:
    mk = write_app(
        srv.root,
        f"""
        import errno, os
        d = {str(srv.data)!r}
        os.makedirs(d + "/empty/deeper")
        os.makedirs(d + "/full")
        open(d + "/full/f", "w").write("x")
        os.makedirs(d + "/gone"); os.rmdir(d + "/gone")
        os.makedirs(d + "/old/inner"); os.rename(d + "/old", d + "/renamed")
        print(sorted(os.listdir(d)))
        for p in (d, os.path.dirname(d)):  # the region's prefix, and the way to it
            try:
                os.rmdir(p)
            except OSError as e:
                print(errno.errorcode[e.errno])
        """,
        "mk.py",
    )
    r = srv.run(mk)
    assert (r.returncode, r.stdout) == (0, "['empty', 'full', 'renamed']\nEBUSY\nEBUSY\n"), r.stderr
    # The host removes the empty directories, and plants one: the next run sees the FSPF's tree.
    os.rmdir(srv.data / "empty/deeper")
    os.rmdir(srv.data / "empty")
    (srv.data / "planted").mkdir()
    check = write_app(
        srv.root,
        f"""
        import os
        d = {str(srv.data)!r}
        print(sorted(os.walk(d)))
        open(d + "/empty/deeper/new", "w").write("made where the host had removed the directory")
        os.unlink(d + "/full/f")
        print(sorted(os.listdir(d + "/full")), open(d + "/empty/deeper/new").read())
        """,
        "check.py",
    )
    r = srv.run(check)
    assert r.returncode == 0, r.stderr
    d = str(srv.data)
    assert r.stdout.splitlines() == [
        str(sorted([(d, ["empty", "full", "renamed"], []), (d + "/empty", ["deeper"], []),
                    (d + "/empty/deeper", [], []), (d + "/full", [], ["f"]), (d + "/renamed", ["inner"], []),
                    (d + "/renamed/inner", [], [])])),
        "[] made where the host had removed the directory",
    ]  # fmt: skip


DIR_OPS = """
import errno, os, shutil, sys, tempfile
d = sys.argv[1]
def t(what, f):
    try:
        r = f()
        print(what, "ok" if r is None else r)
    except OSError as e:
        print(what, errno.errorcode.get(e.errno, e))
t("mkdir a", lambda: os.mkdir(d + "/a"))
t("mkdir a again", lambda: os.mkdir(d + "/a"))
t("mkdir x/y", lambda: os.mkdir(d + "/x/y"))
t("write a/f", lambda: open(d + "/a/f", "w").write("1") and None)
t("mkdir a/f/z", lambda: os.mkdir(d + "/a/f/z"))
t("open a/f/z", lambda: open(d + "/a/f/z"))
t("open a/f/z w", lambda: open(d + "/a/f/z", "w"))
t("O_DIRECTORY file", lambda: os.open(d + "/a/f", os.O_RDONLY | os.O_DIRECTORY))
t("open dir", lambda: open(d + "/a"))
t("open dir w", lambda: open(d + "/a", "w"))
t("unlink dir", lambda: os.unlink(d + "/a"))
t("rmdir nonempty", lambda: os.rmdir(d + "/a"))
t("rmdir file", lambda: os.rmdir(d + "/a/f"))
t("mkdir b", lambda: os.mkdir(d + "/b"))
t("rename file onto dir", lambda: os.rename(d + "/a/f", d + "/b"))
t("rename dir onto nonempty", lambda: os.rename(d + "/b", d + "/a"))
t("rename dir onto empty", lambda: os.rename(d + "/a", d + "/b"))
t("listdir", lambda: sorted(os.listdir(d)))
t("listdir b", lambda: sorted(os.listdir(d + "/b")))
t("rename into missing", lambda: os.rename(d + "/b/f", d + "/nope/f"))
t("rename dir into itself", lambda: os.rename(d + "/b", d + "/b/c"))
t("rename file to new dir", lambda: (os.mkdir(d + "/c"), os.rename(d + "/b/f", d + "/c/g"))[1])
t("listdir b after", lambda: sorted(os.listdir(d + "/b")))
t("isdir b", lambda: os.path.isdir(d + "/b"))
t("makedirs deep", lambda: os.makedirs(d + "/t/u/v", exist_ok=True))
t("makedirs again", lambda: os.makedirs(d + "/t/u/v", exist_ok=True))
t("write deep", lambda: open(d + "/t/u/v/w", "w").write("x") and None)
t("rmtree t", lambda: shutil.rmtree(d + "/t"))
t("exists t", lambda: os.path.exists(d + "/t"))
def tmpd():
    with tempfile.TemporaryDirectory(dir=d) as td:
        open(td + "/q", "w").write("q")
        return len(os.listdir(td))
t("tempdir", tmpd)
t("walk", lambda: sorted((os.path.relpath(a, d), sorted(b), sorted(c)) for a, b, c in os.walk(d)))
t("move dir", lambda: shutil.move(d + "/c", d + "/c2") and None)
t("dir fd", lambda: (os.fsync(fd := os.open(d + "/c2", os.O_RDONLY)), os.close(fd)) and None)
t("walk2", lambda: sorted((os.path.relpath(a, d), sorted(b), sorted(c)) for a, b, c in os.walk(d)))
t("chmod dir", lambda: os.chmod(d + "/b", 0o755))
t("access dir", lambda: os.access(d + "/b", os.W_OK))
t("utime dir", lambda: os.utime(d + "/b"))
t("rename over self", lambda: os.rename(d + "/b", d + "/b"))
t("rmdir b", lambda: os.rmdir(d + "/b"))
t("rmdir b again", lambda: os.rmdir(d + "/b"))
t("final", lambda: sorted(os.listdir(d)))
"""


def test_directory_operations_in_a_region_behave_as_in_a_plain_directory(srv: Srv, tmp_path: Path) -> None:
    # The same script natively on a plain directory and in the enclave on an encrypted region.
    app = write_app(srv.root, DIR_OPS, "dirops.py")
    plain = tmp_path / "plain"
    plain.mkdir()
    native = run_native(app, str(plain))
    assert native.returncode == 0, native.stderr
    r = srv.run(app, str(srv.data))
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout
    assert "ENOTDIR" in r.stdout and "EISDIR" in r.stdout and "ENOTEMPTY" in r.stdout


# -- item 3: host symlinks do not move a path across a region boundary -----------------------

RESOLVER = """
import os, sys
from pathlib import Path
CODE = Path(__file__).resolve().parent            # Django's BASE_DIR idiom
LIB = (CODE / "lib").resolve()
DATA = (CODE.parent / "data" / "sub").resolve()
print("CODE", CODE)
print("LIB", LIB)
print("DATA", DATA)
print("islink", [os.path.islink(p) for p in (CODE.parent, CODE, LIB, DATA)])
sys.path.insert(0, str(LIB))
import helper
helper.hello()
(DATA / "secret.txt").write_text("REVERSED"[::-1])  # (this source is plaintext on the host)
print("seed", (DATA / "seed.txt").read_text().strip())
""".replace("REVERSED", SECRET[::-1])


@pytest.mark.parametrize("where", ["above-the-regions", "at-the-regions", "inside-the-regions"])
def test_host_symlinks_do_not_lead_out_of_a_protected_region(srv: Srv, where: str) -> None:
    srv.protect(
        {
            "code/main.py": RESOLVER,
            "code/lib/helper.py": "def hello():\n    print('PROTECTED HELLO')\n",
            "data/sub/seed.txt": "seed\n",
        }
    )
    # The host moves a directory away and leaves a symlink in its place, then plants a
    # package where the moved code now lives (an unprotected path, if the app follows the link).
    root = srv.root
    if where == "above-the-regions":
        (root / "srv").rename(root / "real-srv")
        (root / "srv").symlink_to("real-srv")
        lib = root / "real-srv/code/lib"
    elif where == "at-the-regions":
        for name in ("code", "data"):
            (srv.srv / name).rename(root / f"real-{name}")
            (srv.srv / name).symlink_to(f"../real-{name}")
        lib = root / "real-code/lib"
    else:
        (srv.code / "lib").rename(root / "real-lib")
        (srv.code / "lib").symlink_to("../../real-lib")
        (srv.data / "sub").rename(root / "real-sub")
        (srv.data / "sub").symlink_to("../../real-sub")
        lib = root / "real-lib"
    (lib / "helper").mkdir()
    (lib / "helper/__init__.py").write_text(HOST_CODE)
    r = srv.run(srv.code / "main.py")
    assert "HOST CODE RAN" not in r.stdout, r.stdout
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f"CODE {srv.code}",
        f"LIB {srv.code / 'lib'}",
        f"DATA {srv.data / 'sub'}",
        "islink [False, False, False, False]",
        "PROTECTED HELLO",
        "seed seed",
    ]
    assert srv.plaintext_on_disk() == []  # the secret went to the encrypted region


def test_readlink_at_or_above_a_region_never_names_a_host_target(srv: Srv) -> None:
    srv.protect({"code/main.py": "print('main')\n"})
    (srv.root / "srv").rename(srv.root / "real-srv")
    (srv.root / "srv").symlink_to("real-srv")
    (srv.root / "other").symlink_to("real-srv")  # not on the way to a region: host metadata
    app = write_app(
        srv.root,
        f"""
        import errno, os, stat
        for p in ({str(srv.srv)!r}, {str(srv.code)!r}, {str(srv.root / "other")!r}):
            try:
                print(os.path.basename(p), os.readlink(p))
            except OSError as e:
                print(os.path.basename(p), errno.errorcode[e.errno], stat.S_ISDIR(os.lstat(p).st_mode))
        print(sorted((e.name, e.is_symlink(), e.is_dir()) for e in os.scandir({str(srv.root)!r}) if e.name != "app.py"))
        """,
    )
    r = srv.run(app)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:3] == ["srv EINVAL True", "code EINVAL True", "other real-srv"]
    listing = r.stdout.splitlines()[3]
    assert "('srv', False, True)" in listing and "('other', True, True)" in listing, listing


# -- the dev-mode tag file ------------------------------------------------------------------


@pytest.mark.parametrize("tag_file", ["missing", "empty", "blank"])
def test_a_missing_or_empty_tag_file_warns_loudly_every_run(srv: Srv, tag_file: str) -> None:
    app = write_app(srv.root, "print('ran')")
    r = srv.run(app)
    assert r.returncode == 0 and "rollback" not in r.stderr, r.stderr  # the tag file pins: no warning
    for _ in range(2):  # every run, not once
        tag = Path(srv.paths.tag)
        if tag_file == "missing":
            tag.unlink(missing_ok=True)
        else:
            tag.write_text("" if tag_file == "empty" else "  \n\n")
        r = srv.run(app)
        assert r.returncode == 0 and r.stdout == "ran\n", r.stderr
        warning = [line for line in r.stderr.splitlines() if "rollback protection is OFF" in line]
        assert len(warning) == 1 and warning[0].startswith("pyscone: WARNING:"), r.stderr
        assert srv.paths.tag in warning[0]


# -- the FSPF's directory list (sans-IO) -------------------------------------------------------


def test_the_fspf_records_directories_and_keeps_old_encodings() -> None:
    table = fspf_mod.FSPF()
    table.add_region("/data", "encrypted")
    old = table.to_json()
    assert b"dirs" not in old  # an FSPF without directories encodes as before
    table.dirs.add("/data/a/b")
    key = fspf_mod.generate_fspf_key()
    blob, _ = fspf_mod.seal(table, key)
    assert fspf_mod.open_sealed(blob, key).dirs == {"/data/a/b"}
    for bad in ("/elsewhere/x", "relative", "/data/../etc"):
        table.dirs = {bad}
        with pytest.raises(ValueError):
            table.validate()


def test_the_tree_of_an_fspf_comes_from_the_fspf_alone() -> None:
    table = fspf_mod.FSPF()
    table.add_region("/srv/data", "encrypted")
    table.add_region("/srv/data/a/b/code", "authenticated")  # nested: the way to it exists
    table.add_region("/srv/data/tmp", "memory")
    table.add_region("/srv/data/cache", "unprotected")
    table.dirs.add("/srv/data/made/by/app")
    tree = namespace.Tree(table)
    assert tree.listing("/srv/data") == {"a": DT_DIR, "tmp": DT_DIR, "cache": DT_DIR, "made": DT_DIR}
    assert tree.listing("/srv/data/a/b") == {"code": DT_DIR}
    assert tree.listing("/srv/data/a/b/code") == {} and tree.listing("/srv/data/made/by/app") == {}
    assert not tree.is_dir("/srv/data/elsewhere") and not tree.is_dir("/srv") and not tree.is_dir("/srv/data/cache")
    assert namespace.anchors(table) == {"/", "/srv", "/srv/data", "/srv/data/a", "/srv/data/a/b",
                                        "/srv/data/a/b/code", "/srv/data/tmp"}  # fmt: skip
