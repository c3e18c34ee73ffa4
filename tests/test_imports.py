"""Imports after lockdown go through the enclave importer and are measured."""

from __future__ import annotations

import importlib.machinery
import subprocess
import sysconfig
from pathlib import Path

from conftest import run_enclave, write_app


def test_app_modules_and_stdlib_are_imported_and_measured(tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "ns" / "inner").mkdir(parents=True)  # a namespace package
    (tmp_path / "ns" / "inner" / "mod.py").write_text("X = 'ns'\n")
    app = write_app(
        tmp_path,
        """
        import helper, email.mime.text, ns.inner.mod
        from pyscone.enclave import importer
        paths = {m.path: m for m in importer.measured}
        h = paths[helper.__file__]
        import hashlib
        print(helper.double(21), ns.inner.mod.X, h.size, h.sha256 == hashlib.sha256(open(helper.__file__, "rb").read()).hexdigest())
        print(any(p.endswith("email/mime/text.py") for p in paths), all(m.kind in ("source", "extension") for m in importer.measured))
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "42 ns 32 True\nTrue True\n"


def test_stdlib_c_extension_loads_after_lockdown(tmp_path: Path) -> None:
    app = write_app(tmp_path, "import _decimal, array, _csv\nprint(array.array('i', [1, 2]).tolist())\n")
    r = run_enclave(app, cwd=tmp_path)
    assert r.stdout == "[1, 2]\n", r.stderr


EXT_SOURCE = r"""
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "tinyext", NULL, -1, methods};
PyMODINIT_FUNC PyInit_tinyext(void) { return PyModule_Create(&mod); }
"""


def _build_extension(where: Path) -> None:
    """Compile a one-function C extension next to the app (a real .so, built by cc)."""
    src = where / "tinyext.c"
    src.write_text(EXT_SOURCE)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        ["cc", "-shared", "-fPIC", f"-I{include}", "-o", str(where / f"tinyext{suffix}"), str(src)], check=True
    )


def test_extension_not_preloaded_is_a_clear_import_error(tmp_path: Path) -> None:
    _build_extension(tmp_path)
    app = write_app(
        tmp_path,
        """
        try:
            import tinyext
            print("loaded", tinyext.answer())
        except ImportError as e:
            print("ImportError:", e)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ImportError:") and "run with --preload tinyext" in r.stdout
    # --preload imports it before lockdown, from the app directory as python would.
    ok = run_enclave("--preload", "tinyext", app, cwd=tmp_path)
    assert ok.stdout == "loaded 42\n", ok.stderr


def test_bad_preload_is_a_one_line_boot_error(tmp_path: Path) -> None:
    app = write_app(tmp_path, "print(1)\n")
    r = run_enclave("--preload", "no_such_module_xyz", app, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "pyscone: enclave boot failed: --preload no_such_module_xyz: ModuleNotFoundError: No module named 'no_such_module_xyz'"
    ]
