"""A lying host (Iago attacks): the enclave stops before the app sees bad data."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_enclave, write_app

from pyscone.enclave.iago import EXIT_HOST_VIOLATION

# The app touches every kind of call; whichever the host lies about first stops it.
APP = """
import os, select, socket, sys
with open("data.txt", "w") as f:
    f.write("0123456789")
fd = os.open("data.txt", os.O_RDONLY)
got = os.read(fd, 4)
print("APP-SAW", got, os.stat("data.txt").st_size, os.listdir("."))
try:
    open("missing.txt")
except OSError as e:
    print("APP-SAW errno", e.errno)
srv = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(srv.getsockname())
s, addr = srv.accept()
c.sendall(b"hi")
print("APP-SAW", select.select([s], [], [], 5)[0] == [s], s.recv(10), addr)
sys.stdout.flush()
"""

MODES = {
    "read-overflow": "READ",
    "write-overcount": "WRITE",
    "fd-alias": "already open in the enclave",
    "bad-errno": "errno 99999",
    "bad-stat": "not a valid file mode",
    "bad-dirent": "not a valid file name",
    "bad-sockaddr": "not a numeric IP address",
    "bad-poll": "different file descriptor",
    "forged-slot": "not outstanding",
    "duplicate-slot": "not outstanding",
    "slot-out-of-range": "out of range",
    "ring-overrun": "response ring claims",
}


def test_the_app_runs_cleanly_on_an_honest_host(tmp_path: Path) -> None:
    app = write_app(tmp_path, APP)
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("APP-SAW") == 3


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_lie_is_a_fail_stop(tmp_path: Path, mode: str) -> None:
    app = write_app(tmp_path, APP)
    r = run_enclave(app, cwd=tmp_path, env={"PYSCONE_TEST_HOSTILE": mode})
    assert r.returncode == EXIT_HOST_VIOLATION, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pyscone: enclave stopped: host violation: "), r.stderr
    assert MODES[mode] in last, last
    # Nothing the host forged reached the app's output.
    assert "FORGED" not in r.stdout
    assert "99999" not in r.stdout and "../etc" not in r.stdout


@pytest.mark.parametrize("spec", ["read-overflow:2", "bad-stat:1", "fd-alias:1", "duplicate-slot:20"])
def test_lies_later_in_the_run_also_stop(tmp_path: Path, spec: str) -> None:
    # The host is honest for a while (the app is already running), then lies.
    app = write_app(tmp_path, APP)
    r = run_enclave(app, cwd=tmp_path, env={"PYSCONE_TEST_HOSTILE": spec})
    assert r.returncode == EXIT_HOST_VIOLATION, r.stderr
    assert "host violation" in r.stderr
