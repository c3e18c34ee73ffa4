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
from conftest import run_enclave, write_app

from pyscone.host import fspf_tool as tool

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
        return subprocess.run(cmd, cwd=self.root, env=env, capture_output=True, text=True, timeout=60)

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
