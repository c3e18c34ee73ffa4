"""Imports after lockdown go through the enclave importer and are measured."""

from __future__ import annotations

import importlib.machinery
import subprocess
import sysconfig
from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app


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


def test_extension_in_the_app_directory_loads_with_or_without_preload(tmp_path: Path) -> None:
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
    # Mapped before lockdown because it is on the app's sys.path (tests/test_ext_load.py).
    r = run_enclave(app, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "loaded 42\n"), r.stderr
    # --preload still imports it before lockdown, from the app directory as python would.
    ok = run_enclave("--preload", "tinyext", app, cwd=tmp_path)
    assert ok.stdout == "loaded 42\n", ok.stderr


def test_bad_preload_is_a_one_line_boot_error(tmp_path: Path) -> None:
    app = write_app(tmp_path, "print(1)\n")
    r = run_enclave("--preload", "no_such_module_xyz", app, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "pyscone: enclave boot failed: --preload no_such_module_xyz: ModuleNotFoundError: No module named 'no_such_module_xyz'"
    ]


def test_importlib_metadata_finds_distributions_and_entry_points(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import importlib.metadata as md
        print(md.version("cryptography"), md.distribution("greenlet").metadata["Name"])
        print(sorted(e.name for e in md.entry_points(group="console_scripts") if e.name == "pyscone"))
        print(len({d.metadata["Name"] for d in md.distributions()}) > 5)
        try:
            md.version("no-such-distribution-xyz")
        except md.PackageNotFoundError as e:
            print("PackageNotFoundError", e)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == run_native(app, cwd=tmp_path).stdout
    assert r.stdout.splitlines()[1:] == [
        "['pyscone']",
        "True",
        "PackageNotFoundError No package metadata was found for no-such-distribution-xyz",
    ]


def test_pkgutil_iter_modules_lists_a_package_and_sys_path(tmp_path: Path) -> None:
    pkg = tmp_path / "plugins"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "notpkg").mkdir()
    (pkg / "0002_data").mkdir()
    (pkg / "has.dot").mkdir()
    names = ("__init__.py", "alpha.py", "sub/__init__.py", "notpkg/x.py", "data.txt", "0001_initial.py")
    # pkgutil's rules, not import's: Django's migrations are named like 0001_initial.
    for rel in (*names, "a.b.py", "0002_data/__init__.py", "has.dot/__init__.py"):
        (pkg / rel).write_text("")
    _build_extension(pkg)
    app = write_app(
        tmp_path,
        """
        import pkgutil, plugins
        print([(m.name, m.ispkg) for m in pkgutil.iter_modules(plugins.__path__, "plugins.")])
        print([m.name for m in pkgutil.iter_modules() if m.name in ("plugins", "app", "json", "cryptography")])
        print(sorted(m.name for m in pkgutil.walk_packages(plugins.__path__, "plugins.")))
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == run_native(app, cwd=tmp_path).stdout
    first = r.stdout.splitlines()[0]
    assert first == (
        "[('plugins.0001_initial', False), ('plugins.0002_data', True), ('plugins.alpha', False), "
        "('plugins.sub', True), ('plugins.tinyext', False)]"
    )


def test_django_finds_its_management_commands_and_flask_its_version(tmp_path: Path) -> None:
    pytest.importorskip("django")
    pytest.importorskip("flask")
    app = write_app(
        tmp_path,
        """
        import importlib.metadata
        from django.core.management import get_commands
        commands = get_commands()
        print("migrate" in commands, "runserver" in commands, len(commands) > 10)
        print(importlib.metadata.version("flask"), [e.name for e in importlib.metadata.entry_points(group="console_scripts", name="flask")])
        """,
    )
    r = run_enclave(app, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == run_native(app, cwd=tmp_path).stdout
    assert r.stdout.startswith("True True True\n")
