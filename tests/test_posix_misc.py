"""Stdlib functions that used to meet the barrier: umask, statvfs, xattrs (shutil), raise_signal."""

from __future__ import annotations

from pathlib import Path

from conftest import run_enclave, write_app
from test_fs_shield import FS

MISC_APP = """
    import os, shelve, shutil, signal, stat, sys
    old = os.umask(0o077)
    print("umask", oct(old), oct(os.umask(old)))
    os.umask(0o027)
    with open("u.txt", "w") as f:
        f.write("x")
    os.mkdir("udir")
    print("modes", oct(stat.S_IMODE(os.stat("u.txt").st_mode)), oct(stat.S_IMODE(os.stat("udir").st_mode)))
    os.umask(0o022)
    v = os.statvfs(".")
    fv = os.fstatvfs(os.open("u.txt", os.O_RDONLY))
    print("statvfs", v.f_bsize > 0, v.f_blocks >= v.f_bfree >= v.f_bavail, v.f_namemax, fv.f_fsid == v.f_fsid)
    with shelve.open("db") as db:
        db["k"] = {"v": 1}
    with shelve.open("db") as db:
        print("shelve", db["k"])
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    signal.raise_signal(signal.SIGUSR1)
    print("handler ran at once", got)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.raise_signal(signal.SIGUSR1)
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
    sys.stdout.flush()
    signal.raise_signal(signal.SIGTERM)
    print("not reached")
"""


def test_umask_statvfs_shelve_and_raise_signal(tmp_path: Path) -> None:
    r = run_enclave(write_app(tmp_path, MISC_APP), cwd=tmp_path)
    assert r.returncode == 128 + 15, (r.returncode, r.stderr)  # SIGTERM's default action ends the enclave
    assert r.stdout.splitlines() == [
        "umask 0o22 0o77",
        "modes 0o640 0o750",
        "statvfs True True 255 True",
        "shelve {'v': 1}",
        "handler ran at once [10]",
        "KeyboardInterrupt",
    ], r.stderr
    assert (tmp_path / "u.txt").stat().st_mode & 0o777 == 0o640  # the host file got the enclave's umask


SHUTIL_APP = """
    import os, shutil, sys
    enc, mem = sys.argv[1], sys.argv[2]
    os.makedirs("tree/sub")
    for n in ("tree/a.txt", "tree/sub/b.txt"):
        with open(n, "w") as f:
            f.write("secret " + n)
    os.utime("tree/a.txt", (1_000_000_000, 1_000_000_000))
    try:
        os.listxattr("tree/a.txt")
    except OSError as e:
        print("xattr", e.errno, e.strerror)
    for dest in (enc, mem, "."):
        shutil.copy2("tree/a.txt", os.path.join(dest, "a2.txt"))
        with open(os.path.join(dest, "a2.txt")) as f:
            print("copy2", f.read(), os.stat(os.path.join(dest, "a2.txt")).st_mtime == 1_000_000_000)
        t = os.path.join(dest, "tree2")
        shutil.copytree("tree", t)
        print("copytree", sorted(os.path.relpath(os.path.join(d, f), t) for d, _, fs in os.walk(t) for f in fs))
        shutil.copytree(t, os.path.join(dest, "tree3"))  # from the region too
        shutil.rmtree(t)
        print("rmtree", os.path.exists(t))
    shutil.copy2(os.path.join(enc, "a2.txt"), "back.txt")
    print("back", open("back.txt").read())
    print("statvfs", os.statvfs(enc).f_bsize > 0, os.statvfs(os.path.join(mem, "a2.txt")).f_namemax)
"""


def test_shutil_copies_trees_to_from_and_within_protected_regions(tmp_path: Path) -> None:
    fs = FS(tmp_path)
    r = fs.run(write_app(tmp_path, SHUTIL_APP), str(fs.enc), str(fs.mem))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "xattr 95 extended attributes are not supported inside a pyscone enclave"
    assert (
        lines[1:10]
        == [
            "copy2 secret tree/a.txt True",
            "copytree ['a.txt', 'sub/b.txt']",
            "rmtree False",
        ]
        * 3
    )
    assert lines[10:] == ["back secret tree/a.txt", "statvfs True 255"]
    assert b"secret" not in (fs.enc / "a2.txt").read_bytes()  # it was sealed on the way in
