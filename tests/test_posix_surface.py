"""Every public callable of the POSIX modules is interposed, refused by name, or harmless, by a list."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from conftest import run_enclave, write_app

from pyscone.enclave.stdlib import surface


@pytest.mark.parametrize("module", [*surface.MODULES, "posix"])
def test_every_public_callable_is_in_exactly_one_list(module: str) -> None:
    lists = "os" if module == "posix" else module
    listed = [surface.INTERPOSED[lists], surface.REFUSED[lists], surface.HARMLESS[lists]]
    found = surface.public_callables(importlib.import_module(module))
    missing = found - set().union(*listed)
    assert not missing, f"{module}: in no list of pyscone/enclave/stdlib/surface.py: {sorted(missing)}"
    for i, a in enumerate(listed):
        for b in listed[i + 1 :]:
            assert not a & b, f"{module}: listed twice: {sorted(a & b)}"


SURFACE_APP = """
    import errno, importlib, json, sys
    from pyscone.enclave.stdlib import surface
    report = {"refused": {}, "not-interposed": [], "interposed-harmless": []}
    for module in (*surface.MODULES, "posix"):
        mod = importlib.import_module(module)
        lists = "os" if module == "posix" else module
        for name in sorted(surface.REFUSED[lists]):
            if not hasattr(mod, name):
                continue
            try:
                getattr(mod, name)(*([0] * 3))
                report["refused"][f"{module}.{name}"] = "ran"
            except OSError as e:
                report["refused"][f"{module}.{name}"] = [e.errno, e.strerror]
            except TypeError as e:
                report["refused"][f"{module}.{name}"] = "TypeError: " + str(e)
        for name in sorted(surface.INTERPOSED[lists]):
            if hasattr(mod, name) and not getattr(getattr(mod, name), "__module__", "").startswith("pyscone"):
                report["not-interposed"].append(f"{module}.{name}")
        for name in sorted(surface.HARMLESS[lists]):
            if getattr(getattr(mod, name, None), "__module__", "").startswith("pyscone"):
                report["interposed-harmless"].append(f"{module}.{name}")
    print(json.dumps(report))
"""


def test_refusals_are_real_and_interposed_means_replaced(tmp_path: Path) -> None:
    r = run_enclave(write_app(tmp_path, SURFACE_APP), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["not-interposed"] == []
    assert report["interposed-harmless"] == []
    assert len(report["refused"]) > 100
    for what, outcome in report["refused"].items():
        # "os.fork" in os and in posix alike: posix gets os's replacement
        name = what.replace("posix.", "os.", 1)
        assert outcome == [38, f"{name} is not supported inside a pyscone enclave"], (what, outcome)


HARMLESS_APP = """
    import os, resource, shutil, signal, time, mmap
    print("ids", os.getpid() > 0, os.getuid() >= 0, os.uname().sysname, len(os.urandom(8)))
    print("time", time.time() > 0, time.monotonic() > 0, time.localtime().tm_year > 2000, time.process_time() >= 0)
    print("signal", signal.strsignal(signal.SIGINT), signal.SIGINT in signal.valid_signals())
    signal.pthread_sigmask(signal.SIG_BLOCK, [])
    print("resource", resource.getpagesize(), resource.getrlimit(resource.RLIMIT_NOFILE) == tuple(map(int, os.environ.get("X", "0 0").split())) or True)
    print("affinity", len(os.sched_getaffinity(0)) == os.cpu_count(), os.times().user >= 0)
    print("terminal", shutil.get_terminal_size((81, 25)))
    m = mmap.mmap(-1, 4096)
    m[:5] = b"hello"
    print("mmap", m[:5])
    try:
        mmap.mmap(os.open("f", os.O_CREAT | os.O_RDWR), 0)
    except OSError as e:
        print("mmap file", e.errno)
    print("disk", shutil.disk_usage(".").total > 0, os.device_encoding(5), os.confstr("CS_PATH") is not None)
    print("walk", sorted(list(os.walk("."))[0][2]))
    bad = []
    for name in os.sysconf_names:
        try:
            os.sysconf(name)
        except OSError as e:
            bad.append((name, e.errno))
    print("sysconf", bad, os.sysconf("SC_OPEN_MAX") == resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    print("confstr", all(os.confstr(n) is not None or True for n in os.confstr_names))
"""


def test_what_is_harmless_works(tmp_path: Path) -> None:
    r = run_enclave(write_app(tmp_path, HARMLESS_APP), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "ids True True Linux 8",
        "time True True True True",
        "signal Interrupt True",
        "resource 4096 True",
        "affinity True True",
        "terminal os.terminal_size(columns=81, lines=25)",
        "mmap b'hello'",
        "mmap file 38",
        "disk True None True",
        "walk ['app.py', 'f']",
        "sysconf [('SC_EQUIV_CLASS_MAX', 22)] True",  # EINVAL natively too
        "confstr True",
    ]
