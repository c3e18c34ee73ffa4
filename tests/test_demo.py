"""The README's first command runs examples/demo.py: it must keep working and keep its promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_the_main_demo_runs_and_shows_each_property() -> None:
    r = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "'notes': ['buy milk', 'attest the CAS', 'ship pyscone']" in out
    assert "host files containing 'milk': none" in out
    assert "'errno': 'Operation not permitted'" in out
    assert "Seccomp=2" in out and "environment=b''" in out
    assert "buy milk\n" in out.split("reads a note back")[1]
    assert "the app sees: [Errno 5] Input/output error" in out and "refused: chunk failed verification" in out
    assert "exit status 86" in out
