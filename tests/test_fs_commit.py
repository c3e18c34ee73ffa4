"""The FS shield's commit path: which host steps run side by side, which in order, and what a
host that lies about one of them gets (docs/fs-shield.md, "Commit protocol").

A commit's data sync and its FSPF copy's write may overlap, but the pin (here the dev-mode tag
file) comes only after both are durable; an FSPF copy's write and the tag file's write are each
one ``PWRITE_SYNC`` host call.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_enclave, write_app

from pyscone.host import fspf_tool as tool

TESTS_DIR = Path(__file__).parent


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

    def run(self, app: Path, *args: str, lie: str | None = None, stats: bool = False) -> tuple[int, str, str]:
        env = {"PYSCONE_TEST_HOSTILE": f"py:commit_liars:CommitLie:{lie}", "PYTHONPATH": str(TESTS_DIR)} if lie else {}
        extra = ("--stats",) if stats else ()
        r = run_enclave("--fspf", self.fspf, *extra, app, *args, cwd=self.root, env=env)
        return r.returncode, r.stdout, r.stderr


@pytest.fixture
def region(tmp_path: Path) -> Region:
    return Region(tmp_path)


# Two commits of the victim, then one of another file (a new FSPF, pinned).
WRITER = """
    import errno, os, sys
    d = sys.argv[1]
    fd = os.open(os.path.join(d, "victim"), os.O_RDWR | os.O_CREAT, 0o600)
    for version in (b"v1", b"v2"):
        os.pwrite(fd, version, 0)
        try:
            os.fsync(fd)
            print(version.decode(), "committed")
        except OSError as e:
            print(version.decode(), "failed", errno.errorcode[e.errno])
    with open(os.path.join(d, "other"), "w") as f:
        f.write("other")
    os.close(fd)
"""

READER = """
    import errno, sys
    for p in sys.argv[1:]:
        try:
            with open(p, "rb") as f:
                print("OK", f.read().decode())
        except OSError as e:
            print("ERR", errno.errorcode[e.errno])
"""


def test_an_honest_host_commits_both_versions(region: Region) -> None:
    code, out, err = region.run(write_app(region.root, WRITER), str(region.enc))
    assert (code, out) == (0, "v1 committed\nv2 committed\n"), err
    reader = write_app(region.root, READER, "reader.py")
    code, out, err = region.run(reader, str(region.enc / "victim"), str(region.enc / "other"))
    assert (code, out) == (0, "OK v2\nOK other\n"), err


def test_a_failed_data_sync_is_never_pinned_though_the_fspf_copy_was_written(region: Region) -> None:
    """The data sync and the FSPF copy's write run side by side; the host completes the copy
    and fails the sync.  The app's fsync fails, and no pin names the records the host did not
    make durable: the next commit ("other"'s) names v1, and v2 is committed only by the close,
    whose own sync of the records (honest this time) comes first.  A pin of v2's records
    without that sync would read back torn or refused, never "OK v2"."""
    code, out, err = region.run(write_app(region.root, WRITER), str(region.enc), lie="data-sync-fails", stats=True)
    assert "failed the victim's data sync" in err
    assert (code, out) == (0, "v1 committed\nv2 failed EIO\n"), err
    reader = write_app(region.root, READER, "reader.py")
    code, out, err = region.run(reader, str(region.enc / "victim"), str(region.enc / "other"))
    assert (code, out) == (0, "OK v2\nOK other\n"), err


RETRY = """
    import errno, os, sys
    d = sys.argv[1]
    fd = os.open(os.path.join(d, "victim"), os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, b"v1", 0)
    os.fsync(fd)
    os.pwrite(fd, b"v2", 0)
    for attempt in ("first", "retried"):
        try:
            os.fsync(fd)
            print(attempt, "fsync committed")
        except OSError as e:
            print(attempt, "fsync failed", errno.errorcode[e.errno])
    os.close(fd)
"""


def test_a_retried_fsync_after_a_failed_data_sync_commits_for_real(region: Region) -> None:
    """After a failed fsync the file's new records are still to commit: the retry makes them
    durable and pinned (it used to return at once, having committed nothing, and the next start
    read v1)."""
    code, out, err = region.run(write_app(region.root, RETRY), str(region.enc), lie="data-sync-fails")
    assert "failed the victim's data sync" in err
    assert (code, out) == (0, "first fsync failed EIO\nretried fsync committed\n"), err
    reader = write_app(region.root, READER, "reader.py")
    code, out, err = region.run(reader, str(region.enc / "victim"))
    assert (code, out) == (0, "OK v2\n"), err


def test_a_short_write_of_the_fspf_copy_fails_the_commit_and_is_not_pinned(region: Region) -> None:
    app = write_app(region.root, WRITER)
    code, out, err = region.run(app, str(region.enc), lie="copy-short")
    assert "a short write of an FSPF copy" in err
    assert (code, out) == (0, "v1 committed\nv2 failed ENOSPC\n"), err
    # The pinned copy was never touched, and the next commit (of "other") wrote the whole
    # FSPF again, with v2's records, which were durable: both are there, nothing is torn.
    reader = write_app(region.root, READER, "reader.py")
    code, out, err = region.run(reader, str(region.enc / "victim"), str(region.enc / "other"))
    assert (code, out) == (0, "OK v2\nOK other\n"), err


def test_a_write_count_beyond_what_was_given_stops_the_enclave(region: Region) -> None:
    code, out, err = region.run(write_app(region.root, WRITER), str(region.enc), lie="copy-overcount")
    assert "claims one byte more" in err
    assert code == 86 and "committed" not in out, (code, out, err)
    assert "PWRITE_SYNC" in err and "host violation" in err.lower(), err


LOOP = """
    import os, sys
    d = sys.argv[1]
    for i in range(int(sys.argv[2])):
        fd = os.open(os.path.join(d, f"f{i % 3}"), os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(fd, b"%d" % i, 0)
        os.fsync(fd)
        os.close(fd)
        if i % 4 == 3:
            os.unlink(os.path.join(d, f"f{i % 3}"))
    print("done")
"""


def test_the_pin_waits_for_every_durable_step_and_the_steps_overlap(region: Region) -> None:
    """Each sync takes the host 30 ms: the data sync and the FSPF copy's write are seen running
    at once, and the tag file (the pin) is never written while either still runs."""
    code, out, err = region.run(write_app(region.root, LOOP), str(region.enc), "12", lie="slow-syncs")
    assert (code, out) == (0, "done\n"), err
    assert "two durable steps of a commit ran at once" in err, err
    assert "the tag file was written while" not in err, err


def test_sqlites_commits_overlap_too_though_its_calls_wait_in_place(region: Region) -> None:
    """A call from C waits for the host in place (sync mode, docs/runtime.md); a commit that
    SQLite's fsync makes still runs its data sync beside the FSPF copy's write."""
    app = write_app(
        region.root,
        """
        import sqlite3, sys
        con = sqlite3.connect(sys.argv[1] + "/app.db")
        con.execute("create table t (v)")
        for i in range(4):
            with con:
                con.execute("insert into t values (?)", (i,))
        print(con.execute("select count(*) from t").fetchone()[0])
        """,
    )
    code, out, err = region.run(app, str(region.enc), lie="slow-syncs")
    assert (code, out) == (0, "4\n"), err
    assert "two durable steps of a commit ran at once" in err, err
    assert "the tag file was written while" not in err, err


def _by_kind(stderr: str) -> dict[str, int]:
    line = next(x for x in stderr.splitlines() if "host calls by kind:" in x)
    return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", line.split("host calls by kind:", 1)[1])}


def test_a_commit_is_three_syncing_host_calls_and_no_separate_writes_or_cuts(region: Region) -> None:
    """Per commit of a small file: the data's fdatasync, the FSPF copy's write-and-sync, the tag
    file's write-and-sync.  No separate ``ftruncate`` (the FSPF's size does not change here)."""
    app = write_app(
        region.root,
        """
        import os, sys
        fd = os.open(os.path.join(sys.argv[1], "counter"), os.O_RDWR | os.O_CREAT, 0o600)
        for i in range(60):
            os.pwrite(fd, b"%08d" % i, 0)
            os.fsync(fd)
        os.close(fd)
        """,
    )
    code, _, err = region.run(app, str(region.enc), stats=True)
    assert code == 0, err
    kinds = _by_kind(err)
    commits = int(re.search(r"fs shield: (\d+) commits", err).group(1))  # type: ignore[union-attr]
    assert commits >= 60, err
    assert kinds.get("ftruncate", 0) == 0, kinds
    assert kinds.get("pwrite_sync", 0) <= 2 * commits + 2, kinds
    assert kinds.get("fsync", 0) <= commits + 4, kinds
    assert kinds.get("pwrite", 0) <= commits + 4, kinds  # the data's own records only
