"""An enclave's identity end to end: pyscone measure, tcb, keygen, sign, and run --signature."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import PYSCONE, run_enclave, write_app

from pyscone.platform import keys, sigstruct


def pyscone(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYSCONE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a signer key, a signature for the default enclave, and an app."""
    d = tmp_path_factory.mktemp("signed")
    assert pyscone("keygen", "signer.pem", cwd=d).returncode == 0
    r = pyscone("sign", "--key", "signer.pem", "--product-id", "7", "--svn", "2", "-o", "app.sig", cwd=d)
    assert r.returncode == 0, r.stderr
    write_app(d, "print('admitted')")
    return d


def test_measure_is_stable_and_covers_the_identity_options(tmp_path: Path) -> None:
    first = pyscone("measure", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    mrenclave = first.stdout.strip()
    assert len(bytes.fromhex(mrenclave)) == 32
    assert pyscone("measure", cwd=tmp_path).stdout.strip() == mrenclave
    assert pyscone("measure", "--no-barrier", cwd=tmp_path).stdout.strip() == mrenclave  # an attribute, not identity
    for option in (["--heap", "512M"], ["--syscalls", "sync"], ["--slots", "64"], ["--preload", "json"]):
        other = pyscone("measure", *option, cwd=tmp_path)
        assert other.returncode == 0, other.stderr
        assert other.stdout.strip() != mrenclave, option


def test_tcb_lists_what_is_measured(tmp_path: Path) -> None:
    r = pyscone("tcb", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "MRENCLAVE " + pyscone("measure", cwd=tmp_path).stdout.strip()
    names = {
        line.split()[0] for line in lines if line.startswith(("interpreter", "bootstrap", "module:", "ext", "map"))
    }
    for expected in ("interpreter", "bootstrap", "module:pyscone.enclave.boot", "module:pyscone.enclave.shields.fs"):
        assert expected in names
    assert "module:pyscone.enclave.loader" in names and "module:encodings" in names
    assert "extension:cryptography.hazmat.bindings._rust" in names  # cryptography's backend
    # Every extension the app could import is mapped and measured, imported or not (psycopg's
    # binary build is a dependency of pyscone's CAS; no enclave code imports it).
    assert any(n.startswith("extension:psycopg_binary.") for n in names)
    assert any(n.startswith("mapped:libc.so") for n in names)  # the libraries the process maps
    assert any(line.endswith("files,") or " files, " in line for line in lines) and "Not measured" in lines[-1]


def test_a_signed_enclave_runs_and_a_changed_one_does_not(signed: Path) -> None:
    ok = run_enclave("--signature", "app.sig", "app.py", cwd=signed)
    assert (ok.returncode, ok.stdout) == (0, "admitted\n"), ok.stderr
    changed = run_enclave("--signature", "app.sig", "--heap", "512M", "app.py", cwd=signed)
    assert changed.returncode == 70
    assert "refused to start: the enclave signature is for MRENCLAVE" in changed.stderr
    assert "admitted" not in changed.stdout


def test_a_production_signature_refuses_a_debug_enclave(signed: Path) -> None:
    debug = run_enclave("--signature", "app.sig", "--no-barrier", "app.py", cwd=signed)
    assert debug.returncode == 70
    assert "does not allow a debug enclave" in debug.stderr
    r = pyscone("sign", "--key", "signer.pem", "--debug", "-o", "debug.sig", cwd=signed)
    assert r.returncode == 0 and "debug allowed" in r.stdout
    allowed = run_enclave("--signature", "debug.sig", "--no-barrier", "app.py", cwd=signed)
    assert (allowed.returncode, allowed.stdout) == (0, "admitted\n"), allowed.stderr


def test_a_tampered_or_foreign_signature_is_refused(signed: Path) -> None:
    doc = json.loads((signed / "app.sig").read_text())
    doc["svn"] = 9  # a higher security version than was signed
    (signed / "tampered.sig").write_text(json.dumps(doc))
    r = run_enclave("--signature", "tampered.sig", "app.py", cwd=signed)
    assert r.returncode == 70 and "does not verify" in r.stderr
    (signed / "garbage.sig").write_bytes(b"\x00garbage")
    r = run_enclave("--signature", "garbage.sig", "app.py", cwd=signed)
    assert r.returncode == 70 and "malformed" in r.stderr


def test_keygen_and_sign_mistakes_are_one_line(signed: Path) -> None:
    r = pyscone("keygen", "signer.pem", cwd=signed)
    assert r.returncode == 2 and r.stderr == "error: signer.pem exists (--force replaces it)\n"
    r = pyscone("sign", "--key", "missing.pem", "-o", "x.sig", cwd=signed)
    assert r.returncode == 2 and r.stderr.startswith("error: missing.pem: No such file")
    (signed / "bad.pem").write_text("not a key")
    r = pyscone("sign", "--key", "bad.pem", "-o", "x.sig", cwd=signed)
    assert r.returncode == 2 and r.stderr.startswith("error: bad.pem: not an unencrypted PEM private key")
    r = pyscone("sign", "--key", "signer.pem", "--svn", "70000", "-o", "x.sig", cwd=signed)
    assert r.returncode == 2 and r.stderr == "error: security version must be between 0 and 65535\n"
    r = run_enclave("--signature", "nope.sig", "app.py", cwd=signed)
    assert r.returncode == 2 and r.stderr.startswith("error: --signature nope.sig: No such file")
    key = keys.load_private((signed / "signer.pem").read_bytes())
    assert (signed / "signer.pem").stat().st_mode & 0o777 == 0o600
    assert sigstruct.decode((signed / "app.sig").read_bytes()).mrsigner == sigstruct.mrsigner_of(key)
