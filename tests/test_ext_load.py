"""C extensions outside the standard library load in the enclave without flags, measured.

Before lockdown boot maps (dlopen, no initialization) every extension the app could import:
its directory and site-packages.  The later ``import`` only initializes the mapped object.
"""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sysconfig
from pathlib import Path

import pytest
from conftest import PYSCONE, run_enclave, run_native, write_app

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

EXT = r"""
#include <Python.h>
extern int helper_value(void);
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(ANSWER); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "NAME", NULL, -1, methods};
PyMODINIT_FUNC PyInit_NAME(void) { return PyModule_Create(&mod); }
"""


def build(where: Path, name: str, answer: str = "42", extra: tuple[str, ...] = ()) -> Path:
    """A real one-function C extension ``name`` (its ``answer()`` returns ``answer``), built by cc."""
    where.mkdir(parents=True, exist_ok=True)
    src = where / f"{name}.c"
    src.write_text(EXT.replace("NAME", name).replace("ANSWER", answer))
    out = where / f"{name}{SUFFIX}"
    include = sysconfig.get_paths()["include"]
    subprocess.run(["cc", "-shared", "-fPIC", f"-I{include}", "-o", str(out), str(src), *extra], check=True)
    return out


def test_an_extension_in_the_app_and_in_a_subpackage_loads_without_flags(tmp_path: Path) -> None:
    build(tmp_path, "tinyext")
    build(tmp_path / "pkg" / "sub", "_speedups", answer="7")
    (tmp_path / "pkg" / "__init__.py").write_text("")  # pkg.sub is a namespace portion
    app = write_app(
        tmp_path,
        """
        import tinyext
        from pkg.sub import _speedups
        print(tinyext.answer(), _speedups.answer(), _speedups.__name__, _speedups.__file__.endswith("_speedups" + SUFFIX))
        """.replace("SUFFIX", repr(SUFFIX)),
    )
    r = run_enclave(app, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "42 7 pkg.sub._speedups True\n"), r.stderr
    assert r.stdout == run_native(app, cwd=tmp_path).stdout


def test_a_missing_module_is_module_not_found_and_a_broken_extension_says_why(tmp_path: Path) -> None:
    # libdep.so exists when the extension is linked and is gone when the enclave starts:
    # dlopen fails, exactly as it would natively, and the import error carries glibc's reason.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "dep.c").write_text("int helper_value(void) { return 5; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib / "libdep.so"), str(lib / "dep.c")], check=True)
    build(tmp_path, "broken", answer="helper_value()", extra=(f"-L{lib}", "-ldep", f"-Wl,-rpath,{lib}"))
    (lib / "libdep.so").unlink()
    app = write_app(
        tmp_path,
        """
        for name in ("orjson_that_is_not_installed", "broken"):
            try:
                __import__(name)
            except ImportError as e:
                print(type(e).__name__, e.name, "libdep.so" in str(e))
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = "ModuleNotFoundError orjson_that_is_not_installed False\nImportError broken True\n"
    assert r.stdout == expected
    assert run_native(app, cwd=tmp_path).stdout == expected


def test_an_extension_written_after_the_start_is_a_clear_import_error(tmp_path: Path) -> None:
    # Only what was there at the start can be mapped; the message names the full module.
    built = build(tmp_path / "src", "late")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    app = write_app(
        tmp_path,
        f"""
        import shutil
        shutil.copyfile({str(built)!r}, "pkg/late{SUFFIX}")
        try:
            import pkg.late
        except ImportError as e:
            print(type(e).__name__, e)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ImportError: C extension 'pkg.late'") or r.stdout.startswith("ImportError C extension")
    assert "--preload pkg.late" in r.stdout and "could not be mapped before lockdown" in r.stdout


def _measure(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYSCONE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_app_extensions_are_measured_from_what_was_mapped(tmp_path: Path) -> None:
    build(tmp_path / "pkg", "_fast")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    write_app(tmp_path, "from pkg import _fast\nprint(_fast.answer())\n")
    tcb = _measure(tmp_path, "tcb", "app.py")
    assert tcb.returncode == 0, tcb.stderr
    rows = [line.split() for line in tcb.stdout.splitlines() if line.startswith("extension:pkg._fast ")]
    assert len(rows) == 1 and "mapped" in rows[0], tcb.stdout[-2000:]
    first = _measure(tmp_path, "measure", "app.py").stdout.strip()
    assert first and _measure(tmp_path, "measure", "app.py").stdout.strip() == first
    build(tmp_path / "pkg", "_fast", answer="43")  # another extension in its place: another MRENCLAVE
    assert _measure(tmp_path, "measure", "app.py").stdout.strip() != first


def test_preload_asyncio_leaves_asyncio_working(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import asyncio

        async def main():
            async def echo(reader, writer):
                writer.write(await reader.read(100))
                await writer.drain()
                writer.close()
            server = await asyncio.start_server(echo, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            await writer.drain()
            print((await reader.read(100)).decode())
            writer.close()
            server.close()

        asyncio.run(main())
        """,
    )
    r = run_enclave("--preload", "asyncio", app, cwd=tmp_path, timeout=60)
    assert (r.returncode, r.stdout) == (0, "ping\n"), r.stderr


# -- real packages: their optional speedups are the C ones, as natively -------------------------


def _same_as_native(tmp_path: Path, source: str) -> str:
    app = write_app(tmp_path, source)
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave(app, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout
    return r.stdout


def test_markupsafe_uses_its_speedups(tmp_path: Path) -> None:
    pytest.importorskip("markupsafe._speedups")
    out = _same_as_native(
        tmp_path,
        "import markupsafe, sys\nprint(markupsafe.escape('<a>'), 'markupsafe._speedups' in sys.modules)\n",
    )
    assert out == "&lt;a&gt; True\n"


def test_yaml_has_its_c_loader(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    if not yaml.__with_libyaml__:
        pytest.skip("this PyYAML was built without libyaml")
    out = _same_as_native(
        tmp_path, "import yaml\nprint(yaml.__with_libyaml__, yaml.load('a: [1, 2]', Loader=yaml.CLoader))\n"
    )
    assert out == "True {'a': [1, 2]}\n"


def test_orjson_and_numpy(tmp_path: Path) -> None:
    pytest.importorskip("orjson")
    pytest.importorskip("numpy")
    out = _same_as_native(
        tmp_path,
        """
        import orjson, numpy as np
        a = np.arange(12, dtype=np.float64).reshape(3, 4)
        print(orjson.dumps({"sum": float(a.sum()), "det": round(float(np.linalg.det(a[:, :3] @ a[:, :3].T + np.eye(3))), 3)}).decode())
        """,
    )
    assert json.loads(out)["sum"] == 66.0


def test_the_walk_finds_importable_extensions_only_and_stops_at_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyscone.enclave import importer

    for rel in ("a/b/_c", "top", "a/__pycache__/_no", "x.libs/_no", "not-a-pkg/_no", "a/b-c/_no"):
        p = tmp_path / f"{rel}{SUFFIX}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    found, stopped = importer.find_extensions([str(tmp_path)])
    assert sorted(m for _, m in found) == ["a.b._c", "top"] and stopped == []
    small = tmp_path / "small"
    (small / "p").mkdir(parents=True)
    (small / "p" / f"_x{SUFFIX}").write_bytes(b"")
    monkeypatch.setattr(importer, "WALK_BUDGET", 3)
    found, stopped = importer.find_extensions([str(tmp_path), str(small)])
    # The big root is cut short (and named); the next root has its own budget.
    assert stopped == [str(tmp_path)] and [m for _, m in found] == ["p._x"]


def test_what_runs_is_what_was_mapped_even_if_the_disk_changes_after(tmp_path: Path) -> None:
    # The extension is mapped (and would be hashed) at boot from one descriptor; a file swapped
    # in on disk later (through the host, as the host itself could) is not what the import runs.
    build(tmp_path, "_fast", answer="42")
    other = build(tmp_path / "other", "_fast", answer="43")
    app = write_app(
        tmp_path,
        f"""
        import os, shutil
        shutil.copyfile({str(other)!r}, "_fast.new")
        os.replace("_fast.new", "_fast{SUFFIX}")
        import _fast
        print(_fast.answer())
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "42\n"), r.stderr
    build(tmp_path, "_fast", answer="42")
    assert run_native(app, cwd=tmp_path).stdout == "43\n"  # natively the new file is loaded
