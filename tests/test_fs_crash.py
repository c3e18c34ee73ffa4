"""Crash consistency: SIGKILL the enclave at random points while it writes and fsyncs; every
file must then open and hold its last committed version (or the one being committed)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

from conftest import PYSCONE

from pyscone.host import fspf_tool as tool

APP = Path(__file__).parent / "apps" / "fs_crash_app.py"


def _versions(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in line.split())}


def _enclave_pid(launcher: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher)], capture_output=True, text=True).stdout
        if out.split():
            return int(out.split()[0])
        time.sleep(0.02)
    raise AssertionError("no enclave process")


def test_sigkill_at_random_points_loses_nothing_committed(tmp_path: Path) -> None:
    region = tmp_path / "data"
    region.mkdir()
    paths = tool.Paths.of(str(tmp_path / "fs.fspf"))
    tool.create(paths)
    tool.add_region(paths, str(region), "encrypted", 4096)
    rng = random.Random(1234)
    committed = {"inplace0": 0, "inplace1": 0, "renamed": 0}
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen(
            [*PYSCONE, "run", "--fspf", paths.fspf, APP, "write", str(region)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        start = proc.stdout.readline()
        assert start, proc.communicate()[1]
        found = _versions(start)
        for name, v in committed.items():
            # What a restart finds: the last version reported committed, or the one in flight.
            assert found[name] in (v, v + 1), (name, found, committed)
        committed = found
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True)
        reader.start()
        time.sleep(rng.uniform(0.3, 1.2))
        os.kill(_enclave_pid(proc.pid), signal.SIGKILL)
        proc.wait(timeout=30)
        reader.join(timeout=10)
        kills += 1
        for line in lines:
            _, name, v = line.split()
            committed[name] = int(v)
    check = subprocess.run(
        [*PYSCONE, "run", "--fspf", paths.fspf, APP, "check", str(region)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stderr
    final = _versions(check.stdout.splitlines()[0])
    for name, v in committed.items():
        assert final[name] in (v, v + 1), (name, final, committed)
    assert kills == 6 and sum(committed.values()) > 20, committed  # the writer made real progress
