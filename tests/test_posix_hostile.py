"""A lying host against the POSIX layer's new calls, in real enclaves (plug-ins in posix_liars.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_enclave, write_app

from pyscone.enclave.iago import EXIT_HOST_VIOLATION

TESTS_DIR = Path(__file__).parent

APP = """
    import fcntl, os, select, socket, sys, time
    what = sys.argv[1]
    if what == "statvfs":
        v = os.statvfs(".")
        print("APP-SAW", v.f_bfree, v.f_blocks)
    elif what == "lock":
        f = open("l.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("APP-SAW locked")
        except BlockingIOError as e:
            print("APP-SAW busy", e.errno)
    else:
        r, w = os.pipe()
        srv = socket.create_server(("127.0.0.1", 0))
        t0 = time.monotonic()
        ready = select.select([r, srv], [], [], 0.5)[0]
        print("APP-SAW", ready, time.monotonic() - t0 >= 0.45)
        os.write(w, b"x")
        print("APP-SAW then", select.select([r, srv], [], [], 5)[0] == [r])
"""


def _run(tmp_path: Path, case: str, what: str) -> tuple[int, str, str]:
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:posix_liars:PosixLie:{case}"}
    r = run_enclave(write_app(tmp_path, APP), what, cwd=tmp_path, env=env)
    assert "pyscone-test: lied" in r.stderr, r.stderr
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize(
    ("case", "what", "reason"),
    [
        ("statvfs-free", "statvfs", "statvfs counts more free than there is"),
        ("lock-payload", "lock", "expected an empty success"),
    ],
)
def test_a_lie_about_statvfs_or_a_lock_stops_the_enclave(tmp_path: Path, case: str, what: str, reason: str) -> None:
    code, out, err = _run(tmp_path, case, what)
    assert code == EXIT_HOST_VIOLATION, err
    assert "APP-SAW" not in out
    last = err.strip().splitlines()[-1]
    assert last.startswith("pyscone: enclave stopped: host violation: ") and reason in last, last


def test_a_host_that_refuses_every_lock_is_an_oserror(tmp_path: Path) -> None:
    code, out, err = _run(tmp_path, "lock-refused", "lock")
    assert code == 0, err
    assert out.splitlines() == ["APP-SAW busy 11"]


def test_a_host_ringing_the_bell_cannot_make_a_pipe_look_ready(tmp_path: Path) -> None:
    """The bell only makes the enclave look again: readiness of a pipe is the enclave's own."""
    code, out, err = _run(tmp_path, "bell-always", "pipe")
    assert code == 0, err
    assert out.splitlines() == ["APP-SAW [] True", "APP-SAW then True"]
