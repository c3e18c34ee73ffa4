"""Failure modes: a killed host, a killed enclave, a full disk, a vanished file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import PYSCONE, run_enclave, write_app

SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(60)\n"


def _start(app: Path, cwd: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen([*PYSCONE, "run", str(app)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"up\n"
    (enclave,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return proc, int(enclave)


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_killing_the_host_kills_the_enclave(tmp_path: Path) -> None:
    proc, enclave = _start(write_app(tmp_path, SLEEPER), tmp_path)
    proc.kill()
    proc.wait()
    assert _gone(enclave, 5), "the enclave outlived its host"


def test_killing_the_enclave_is_reported_by_the_host(tmp_path: Path) -> None:
    proc, enclave = _start(write_app(tmp_path, SLEEPER), tmp_path)
    os.kill(enclave, signal.SIGKILL)
    assert proc.wait(timeout=10) == 128 + signal.SIGKILL


def test_full_disk_is_enospc_to_the_app(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import errno
        try:
            with open("/dev/full", "w") as f:
                f.write("x" * 100)
        except OSError as e:
            print("write failed:", errno.errorcode[e.errno])
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "write failed: ENOSPC\n"


def test_file_removed_by_the_host_mid_run(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, sys
        open("data.txt", "w").write("v1")
        print("written", flush=True)
        sys.stdin.readline()  # the host deletes the file meanwhile
        try:
            open("data.txt").read()
        except FileNotFoundError as e:
            print("gone:", e.filename)
        """,
    )
    proc = subprocess.Popen([*PYSCONE, "run", str(app)], cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == b"written\n"
    (tmp_path / "data.txt").unlink()
    out, _ = proc.communicate(b"\n", timeout=20)
    assert out == b"gone: data.txt\n"
