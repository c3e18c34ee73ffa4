"""A lying host (Iago attacks): the enclave stops before the app sees bad data."""

from __future__ import annotations

import subprocess
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


# -- lies of a valid shape: only a check of the value catches them -------------------------------
#
# Each case is a plug-in liar (tests/liars.py, loaded by the launcher as py:liars:Lie:CASE) that
# tells one lie about one call of a small app.  The app prints what it saw after the call; the
# enclave must stop first (exit 86), so neither that line nor the forged value reaches the output.

TESTS_DIR = Path(__file__).parent

UDP = """
import socket
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(("127.0.0.1", 0))
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.sendto(b"x", a.getsockname())
print("APP-SAW", a.recvfrom(100))
"""
TCP = """
import socket
srv = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(srv.getsockname())
s, _ = srv.accept()
c.sendall(b"x")
{}
"""
DATA = """
import os, stat
with open("data.txt", "w") as f:
    f.write("0123456789")
{}
"""
BIG_DIR = """
import os
os.mkdir("big")
for i in range(400):
    open(f"big/entry-{i:04d}-xxxxxxxx", "w").close()
names = os.listdir("big")
print("APP-SAW", len(names), len(set(names)))
"""

CHECKS = {
    # case: (app, what the stop reason says, what the lie forged)
    "gai-family": (
        'import socket\nprint("APP-SAW", socket.getaddrinfo("localhost", 80, socket.AF_INET))',
        "family",
        "10.6.6.6",
    ),
    "gai-socktype": (
        'import socket\nprint("APP-SAW", socket.getaddrinfo("localhost", 80, 0, socket.SOCK_STREAM))',
        "socket type",
        "SOCK_DGRAM",
    ),
    "gai-numeric-host": (
        'import socket\nprint("APP-SAW", socket.getaddrinfo("127.0.0.1", 8080))',
        "numeric host",
        "10.6.6.6",
    ),
    "gai-port": ('import socket\nprint("APP-SAW", socket.getaddrinfo("localhost", 8080))', "port 8080", "6666"),
    "gai-canonname": (
        'import socket\nprint("APP-SAW", socket.getaddrinfo("localhost", 80))',
        "canonical name",
        "evil.example",
    ),
    "gai-no-host": ('import socket\nprint("APP-SAW", socket.getaddrinfo(None, 8080))', "no host", "10.6.6.6"),
    "gai-numerichost-flag": (
        'import socket\ntry:\n    print("APP-SAW", socket.getaddrinfo("localhost", 80, flags=socket.AI_NUMERICHOST))\nexcept OSError as e:\n    print("refused", e)',
        "AI_NUMERICHOST",
        "10.6.6.6",
    ),
    "gai-empty": ('import socket\nprint("APP-SAW", socket.getaddrinfo("localhost", 80))', "no address", "APP-SAW []"),
    "nameinfo-numeric": (
        'import socket\nprint("APP-SAW", socket.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV))',
        "NI_NUMERICHOST",
        "10.6.6.6",
    ),
    "nameinfo-not-numeric": (
        'import socket\ntry:\n    print("APP-SAW", socket.getnameinfo(("localhost", 80), 0))\nexcept OSError as e:\n    print("refused", e)',
        "not numeric",
        "evil.example",
    ),
    "hostname-long": ('import socket\nprint("APP-SAW", socket.gethostname())', "HOST_NAME_MAX", "forged"),
    "recvfrom-no-sender": (UDP, "without a sender", "None"),
    "recvfrom-stream-sender": (
        TCP.format('print("APP-SAW", s.recvfrom(10))'),
        "TCP data arrived with a sender",
        "10.6.6.6",
    ),
    "so-type": (
        TCP.format('print("APP-SAW", s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))'),
        "option 3 is 2",
        "APP-SAW 2",
    ),
    "so-domain": (
        TCP.format('print("APP-SAW", s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN))'),
        "option 39 is 10",
        "APP-SAW 10",
    ),
    "so-protocol": (
        TCP.format('print("APP-SAW", s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))'),
        "option 38 is 17",
        "APP-SAW 17",
    ),
    "so-error": (
        TCP.format('print("APP-SAW", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))'),
        "not an errno",
        "99999",
    ),
    "so-bool": (
        TCP.format('print("APP-SAW", s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR))'),
        "boolean socket option",
        "APP-SAW 7",
    ),
    "isatty-socket": (
        TCP.format('import os\nprint("APP-SAW", os.isatty(s.fileno()))'),
        "not a character device",
        "APP-SAW True",
    ),
    "fstat-socket-kind": (
        TCP.format('import os, stat\nprint("APP-SAW", stat.S_ISREG(os.fstat(s.fileno()).st_mode))'),
        "fstat of a socket",
        "APP-SAW True",
    ),
    "dirent-repeat": (BIG_DIR, "listed again on a later page", "APP-SAW 400 399"),
    "stat-followed-link": (
        DATA.format('print("APP-SAW", stat.S_ISLNK(os.stat("data.txt").st_mode))'),
        "followed a symbolic link",
        "APP-SAW True",
    ),
    "stat-root-not-dir": ('import os\nprint("APP-SAW", os.path.isdir("/"))', "root directory", "APP-SAW False"),
    "stat-owner": (DATA.format('print("APP-SAW", os.stat("data.txt").st_uid)'), "does not fit uid_t", str(1 << 40)),
    "stat-blksize": (DATA.format('print("APP-SAW", os.stat("data.txt").st_blksize)'), "block size 0", "APP-SAW 0"),
    "fstat-created-kind": (
        DATA.format('fd = os.open("data.txt", os.O_RDONLY)\nprint("APP-SAW", stat.S_ISLNK(os.fstat(fd).st_mode))'),
        "cannot return an fd of file type",
        "APP-SAW True",
    ),
    "lseek-set": (
        DATA.format('fd = os.open("data.txt", os.O_RDONLY)\nprint("APP-SAW", os.lseek(fd, 5, os.SEEK_SET))'),
        "landed at 8",
        "APP-SAW 8",
    ),
    "lseek-end": (
        DATA.format('fd = os.open("data.txt", os.O_RDONLY)\nprint("APP-SAW", os.lseek(fd, 100, os.SEEK_END))'),
        "from end landed at 50",
        "APP-SAW 50",
    ),
    "lseek-whence": (
        DATA.format(
            'fd = os.open("data.txt", os.O_RDONLY)\ntry:\n    print("APP-SAW", os.lseek(fd, 0, 7))\nexcept OSError as e:\n    print("refused", e)'
        ),
        "whence 7",
        "APP-SAW 0",
    ),
    "lseek-socket": (
        TCP.format(
            'import os\ntry:\n    print("APP-SAW", os.lseek(s.fileno(), 0, os.SEEK_CUR))\nexcept OSError as e:\n    print("refused", e)'
        ),
        "pipe or socket",
        "APP-SAW 0",
    ),
    "readlink-empty": (
        'import os\nos.symlink("target", "lnk")\nprint("APP-SAW", repr(os.readlink("lnk")))',
        "empty target",
        "APP-SAW ''",
    ),
}


def _run_lie(tmp_path: Path, case: str, hostile: bool) -> subprocess.CompletedProcess[str]:
    app = write_app(tmp_path, CHECKS[case][0])
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_SLOT_SIZE": "4096"}  # small slots: BIG_DIR takes pages
    if hostile:
        env["PYSCONE_TEST_HOSTILE"] = f"py:liars:Lie:{case}"
    return run_enclave(app, cwd=tmp_path, env=env)


@pytest.mark.parametrize("case", sorted(CHECKS))
def test_each_value_check_stops_its_lie_end_to_end(tmp_path: Path, case: str) -> None:
    _app, reason, forged = CHECKS[case]
    r = _run_lie(tmp_path, case, hostile=True)
    assert "pyscone-test: lied about" in r.stderr, r.stderr  # the liar did tell its lie
    assert r.returncode == EXIT_HOST_VIOLATION, (r.returncode, r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pyscone: enclave stopped: host violation: "), r.stderr
    assert reason in last, last
    assert "APP-SAW" not in r.stdout and forged not in r.stdout, r.stdout


@pytest.mark.parametrize("case", sorted(CHECKS))
def test_each_value_check_app_runs_on_an_honest_host(tmp_path: Path, case: str) -> None:
    # The same app with no lie: the check refuses nothing an honest host says.
    r = _run_lie(tmp_path, case, hostile=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "APP-SAW" in r.stdout or "refused" in r.stdout, r.stdout
    assert CHECKS[case][2] not in r.stdout or case == "recvfrom-no-sender", r.stdout


def test_a_plugin_that_is_not_a_liar_is_a_clear_error(tmp_path: Path) -> None:
    app = write_app(tmp_path, "print('never')")
    r = run_enclave(app, cwd=tmp_path, env={"PYSCONE_TEST_HOSTILE": "py:liars:CASES", "PYTHONPATH": str(TESTS_DIR)})
    assert r.returncode == 2 and r.stderr.startswith("error: liars:CASES is not a pyscone.host.hostile.Liar"), r.stderr


def test_a_directory_that_changes_while_it_is_listed_is_no_violation(tmp_path: Path) -> None:
    # The repeated-name check must not stop an honest host: files made and removed between
    # the pages of one listing neither repeat a name nor make the app see one twice.
    app = write_app(
        tmp_path,
        """
        import os
        os.mkdir("big")
        for i in range(400):
            open(f"big/old-{i:04d}-xxxxxxxx", "w").close()
        seen = []
        for i, entry in enumerate(os.scandir("big")):
            seen.append(entry.name)
            if i == 10:
                for j in range(100):
                    open(f"big/new-{j:04d}-xxxxxxxx", "w").close()
                os.unlink("big/" + seen[0])
        print("listed", len(seen), len(set(seen)))
        """,
    )
    r = run_enclave(app, cwd=tmp_path, env={"PYSCONE_SLOT_SIZE": "4096"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "listed 400 400"
