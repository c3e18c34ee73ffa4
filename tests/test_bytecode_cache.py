"""The enclave's verified bytecode cache: imports reuse what the enclave sealed, and nothing else.

The host owns the cache directory, so every test here is something the host can do to it:
flip a byte of an entry, swap two entries, put back an old one, plant one of its own,
change a source behind the cache's back, fill the disk.  In each case the code that runs
is what the measured source compiles to, and the app's output says so.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_enclave, write_app
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscone.host import bytecode
from pyscone.protect.codecache import CacheIntegrityError, CacheKey, interpreter_tag

STATS = re.compile(r"bytecode cache: (\d+) hits, (\d+) misses, (\d+) stored, (\d+) refused")


def _run(app: Path, cache: Path, *extra: str) -> tuple[str, str, tuple[int, ...]]:
    r = run_enclave("--stats", "--bytecode-cache", str(cache), *extra, app, cwd=app.parent)
    assert r.returncode == 0, r.stderr
    m = STATS.search(r.stderr)
    assert m is not None, r.stderr
    return r.stdout, r.stderr, tuple(int(g) for g in m.groups())


def _dev_key(cache: Path) -> CacheKey:
    key = bytes.fromhex((cache / bytecode.KEY_FILE).read_text().strip())
    return CacheKey(key, interpreter_tag())


@pytest.fixture
def app(tmp_path: Path) -> Path:
    write_app(tmp_path, "def who():\n    return 'genuine a'\n", "mod_a.py")
    write_app(tmp_path, "def who():\n    return 'genuine b'\n", "mod_b.py")
    return write_app(tmp_path, "import mod_a, mod_b\nprint(mod_a.who(), '|', mod_b.who())\n")


def test_a_second_start_runs_the_cached_code_and_compiles_nothing(app: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out1, _, (hits1, misses1, stored1, refused1) = _run(app, cache)
    out2, _, (hits2, misses2, stored2, refused2) = _run(app, cache)
    assert out1 == out2 == "genuine a | genuine b\n"
    assert misses1 >= 2 and stored1 == misses1 and hits1 == 0 and refused1 == 0
    assert hits2 >= 2 and misses2 == 0 and stored2 == 0 and refused2 == 0
    key = _dev_key(cache)
    names = {key.name(str(app.parent / m)) for m in ("mod_a.py", "mod_b.py")}
    assert names <= {p.name for p in cache.iterdir()}
    for name in names:  # sealed: the host reads neither the code nor the source's strings
        assert b"genuine" not in (cache / name).read_bytes()


def test_a_changed_source_is_compiled_again_never_served_stale(app: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _run(app, cache)
    (app.parent / "mod_a.py").write_text("def who():\n    return 'edited a'\n")
    out, _, (_, misses, stored, refused) = _run(app, cache)
    assert out == "edited a | genuine b\n"
    assert misses >= 1 and stored >= 1 and refused == 0


def test_an_old_entry_put_back_is_not_used(app: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _run(app, cache)
    name = _dev_key(cache).name(str(app.parent / "mod_a.py"))
    old = (cache / name).read_bytes()
    (app.parent / "mod_a.py").write_text("def who():\n    return 'edited a'\n")
    _run(app, cache)
    (cache / name).write_bytes(old)  # the host rolls the entry back to the old source's
    out, _, (_, misses, _, refused) = _run(app, cache)
    assert out == "edited a | genuine b\n" and misses >= 1 and refused == 0


@pytest.mark.parametrize("attack", ["flip", "swap", "truncate", "garbage"])
def test_an_entry_the_host_altered_is_refused_and_the_source_compiled(app: Path, tmp_path: Path, attack: str) -> None:
    cache = tmp_path / "cache"
    _run(app, cache)
    key = _dev_key(cache)
    a, b = (cache / key.name(str(app.parent / m)) for m in ("mod_a.py", "mod_b.py"))
    if attack == "flip":
        data = bytearray(a.read_bytes())
        data[len(data) // 2] ^= 0x01
        a.write_bytes(bytes(data))
    elif attack == "swap":  # each entry is genuine, under the other's name
        blob_a, blob_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(blob_b)
        b.write_bytes(blob_a)
    elif attack == "truncate":
        a.write_bytes(a.read_bytes()[:40])
    else:
        a.write_bytes(os.urandom(300))
    out, err, (_, _, stored, refused) = _run(app, cache)
    assert out == "genuine a | genuine b\n"
    assert refused >= 1 and stored >= 1
    assert err.count("pyscone: bytecode cache: an entry") == 1 and "compiling from source instead" in err
    again, err2, (hits, _, _, refused2) = _run(app, cache)  # the good entry written over the bad one
    assert again == out and refused2 == 0 and "refused (" not in err2 and hits >= 2


def test_an_entry_sealed_under_another_key_never_runs(app: Path, tmp_path: Path) -> None:
    # What a host without the key can plant: a well-formed entry, of its own code, under the
    # right name (names are keyed, so it must even guess that; here it is handed the name).
    cache = tmp_path / "cache"
    _run(app, cache)
    real = _dev_key(cache)
    forger = CacheKey(os.urandom(32), interpreter_tag())
    target = str(app.parent / "mod_a.py")
    name = real.name(target)
    evil = compile("def who():\n    return 'HOST CODE'\n", target, "exec")
    digest = hashlib.sha256((app.parent / "mod_a.py").read_bytes()).digest()
    (cache / name).write_bytes(forger.pack(name, digest, marshal.dumps(evil)))
    out, err, (_, _, _, refused) = _run(app, cache)
    assert out == "genuine a | genuine b\n" and "HOST CODE" not in out and refused >= 1, err


def test_off_and_unusable_directories(app: Path, tmp_path: Path) -> None:
    r = run_enclave("--stats", "--bytecode-cache", "off", app, cwd=app.parent)
    assert r.returncode == 0 and r.stdout == "genuine a | genuine b\n"
    assert "bytecode cache:" not in r.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for bad_dir, why in ((blocker / "sub", "Not a directory"), (blocker, "not a directory")):
        bad = run_enclave("--bytecode-cache", str(bad_dir), app, cwd=app.parent)
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.splitlines() == [f"error: --bytecode-cache {bad_dir}: {why}"], bad.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / bytecode.KEY_FILE).write_text("not hex\n")
    dk = run_enclave("--bytecode-cache", str(damaged), app, cwd=app.parent)
    assert dk.returncode == 2 and len(dk.stderr.splitlines()) == 1
    assert dk.stderr.startswith(f"error: --bytecode-cache {damaged}: dev.key: not a key"), dk.stderr


def test_a_full_disk_costs_only_compiles(app: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {"PYTHONPATH": str(Path(__file__).parent), "PYSCONE_TEST_HOSTILE": "py:cache_liars:FullDisk"}
    r = run_enclave("--stats", "--bytecode-cache", str(cache), app, cwd=app.parent, env=env)
    assert r.returncode == 0 and r.stdout == "genuine a | genuine b\n", r.stderr
    assert "pyscone-test: lied write: ENOSPC" in r.stderr
    m = STATS.search(r.stderr)
    assert m is not None and int(m[3]) == 0 and int(m[2]) >= 2  # nothing stored, all compiled
    assert [p.name for p in cache.iterdir()] == [bytecode.KEY_FILE]  # no partial entry left behind
    out, _, (hits, _, stored, _) = _run(app, cache)  # the disk has room again
    assert out == "genuine a | genuine b\n" and hits == 0 and stored >= 2


def test_the_import_manifest_is_sealed_and_only_a_hint(app: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _run(app, cache)
    _run(app, cache)
    key = _dev_key(cache)
    manifest = cache / key.name(f"manifest:{app}\0{app.parent}")  # the app: its program and cwd
    assert str(app.parent).encode() not in manifest.read_bytes()  # sealed: the host reads no paths
    manifest.write_bytes(manifest.read_bytes()[:-1] + b"\x00")
    out, err, _ = _run(app, cache)
    assert out == "genuine a | genuine b\n" and "the import manifest" in err


def test_a_module_imported_from_a_protected_region_is_cached_sealed(tmp_path: Path) -> None:
    # Source in an encrypted region: its bytecode is as secret as it is, on the host's disk.
    from pyscone.host import fspf_tool as tool

    work = tmp_path / "work"
    work.mkdir()
    paths = tool.Paths.of(str(tmp_path / "vol.fspf"))
    tool.create(paths)
    tool.add_region(paths, str(work / "secret"), "encrypted", 4096)
    plain = tmp_path / "plain.py"
    plain.write_text("WORD = 'unguessable-' + 'literal'\nOTHER = 'another-secret-constant'\n")
    tool.add_files(paths, str(work / "secret" / "hidden.py"), str(plain))
    plain.unlink()
    app = write_app(work, "import sys\nsys.path.insert(0, 'secret')\nimport hidden\nprint(hidden.WORD)\n")
    cache = tmp_path / "cache"
    hits = []
    for _ in range(2):
        r = run_enclave("--stats", "--fspf", str(tmp_path / "vol.fspf"), "--bytecode-cache", str(cache), app, cwd=work)
        assert r.returncode == 0 and r.stdout == "unguessable-literal\n", r.stderr
        m = STATS.search(r.stderr)
        assert m is not None
        hits.append(int(m[1]))
    assert hits[1] > hits[0]
    name = _dev_key(cache).name(str(work / "secret" / "hidden.py"))
    assert (cache / name).exists()  # cached (through the shield's verified read) ...
    for entry in cache.iterdir():  # ... and sealed: no constant of the protected source shows
        assert b"another-secret-constant" not in entry.read_bytes() and b"unguessable" not in entry.read_bytes()


# -- the recipes (sans-IO) ------------------------------------------------------------------


def test_recipes_round_trip_and_bind_the_name() -> None:
    key = CacheKey(b"k" * 32, interpreter_tag())
    other = CacheKey(b"j" * 32, interpreter_tag())
    digest = bytes(range(32))
    name = key.name("/app/x.py")
    assert name != key.name("/app/y.py") and name != other.name("/app/x.py")
    assert name != CacheKey(b"k" * 32, b"another interpreter").name("/app/x.py")
    blob = key.pack(name, digest, b"code bytes")
    assert key.unpack(name, blob, digest) == b"code bytes"
    assert key.unpack(name, blob, bytes(32)) is None  # of another source
    with pytest.raises(CacheIntegrityError):
        key.unpack(key.name("/app/y.py"), blob, digest)
    with pytest.raises(CacheIntegrityError):
        other.unpack(name, blob, digest)
    with pytest.raises(ValueError):
        CacheKey(b"short", interpreter_tag())


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_altered_byte_of_an_entry_is_refused(data: st.DataObject) -> None:
    key = CacheKey(b"k" * 32, interpreter_tag())
    name = key.name("/app/x.py")
    blob = bytearray(key.pack(name, b"\x07" * 32, data.draw(st.binary(max_size=64))))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CacheIntegrityError):
        key.unpack(name, bytes(blob), b"\x07" * 32)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(CacheIntegrityError):
        key.unpack(name, bytes(blob[:cut]), b"\x07" * 32)


def test_the_dev_key_is_made_once_and_kept(tmp_path: Path) -> None:
    first = bytecode.prepare(str(tmp_path / "c"), dev=True)
    second = bytecode.prepare(str(tmp_path / "c"), dev=True)
    assert first == second and len(bytes.fromhex(first["key"])) == 32
    assert ((tmp_path / "c" / bytecode.KEY_FILE).stat().st_mode & 0o777) == 0o600
    assert "key" not in bytecode.prepare(str(tmp_path / "c"), dev=False)  # with a CAS: the CAS's key
    shutil.rmtree(tmp_path / "c")
