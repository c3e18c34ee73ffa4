"""What is measured is what runs: a host that serves other code, plants a cache or adds site
hooks before lockdown either has no effect or changes MRENCLAVE (issue 9, items 4 and 5).

The host is played the way it would play: a lying executor (a ``Liar`` plug-in of
``host/executor.py``, ``tests/measure_liars.py``), real files planted on disk, a real venv whose site-packages carry a
``.pth`` and a ``sitecustomize``, and a launcher that starts the interpreter differently.
"""

from __future__ import annotations

import importlib._bootstrap_external as bootstrap_external
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from conftest import PYSCONE, run_enclave, write_app

import pyscone
from pyscone.enclave.iago import EXIT_HOST_VIOLATION

ATTEST = Path(pyscone.__file__).parent / "enclave" / "attest.py"
SHIM = str(Path(pyscone.__file__).parent / "enclave" / "clib" / "libpyscone-shim.so")

TESTS_DIR = Path(__file__).parent

# A lying host, as a plug-in of the executor (PYSCONE_TEST_HOSTILE=py:measure_liars:ServeOther:JSON,
# tests/measure_liars.py): it answers OPEN of a path ending in a given suffix with another file.


def lying(lies: dict[str, Path]) -> dict[str, str]:
    """The environment that makes ``pyscone`` run with the lying host serving ``lies``."""
    spec = json.dumps({suffix: str(other) for suffix, other in lies.items()})
    return {"PYSCONE_TEST_HOSTILE": f"py:measure_liars:ServeOther:{spec}", "PYTHONPATH": str(TESTS_DIR)}


# A launcher that starts the enclave interpreter otherwise (argv[1] is a JSON spec):
#   flag: an interpreter option it adds; env: variables it starts the enclave with.
DRIVER = """
import json, subprocess, sys

SPEC = json.loads(sys.argv.pop(1))
_popen = subprocess.Popen


def popen(args, **kw):
    if SPEC.get("flag"):
        args = [args[0], SPEC["flag"], *args[1:]]
    if SPEC.get("env"):
        kw["env"] = {**(kw.get("env") or {}), **SPEC["env"]}
    return _popen(args, **kw)


subprocess.Popen = popen
from pyscone import cli

sys.exit(cli.main(sys.argv[1:]))
"""


def other_launcher(spec: dict[str, object], *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``pyscone ARGS`` with a launcher that starts the interpreter as ``spec`` says."""
    driver = cwd / "launcher_driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "PYSCONE_TEST_HOSTILE"}
    return subprocess.run(
        [sys.executable, str(driver), json.dumps(spec), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def pyscone_cmd(
    *args: str | Path, cwd: Path, python: str = sys.executable, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if k != "PYSCONE_TEST_HOSTILE"}, **(env or {})}
    return subprocess.run(
        [python, *PYSCONE[1:], *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def measure(*args: str | Path, cwd: Path, python: str = sys.executable) -> str:
    r = pyscone_cmd("measure", *args, cwd=cwd, python=python)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def tcb(*args: str | Path, cwd: Path, python: str = sys.executable) -> dict[str, list[str]]:
    """``pyscone tcb``'s rows by name: [bytes, sha256, code, how, path]."""
    r = pyscone_cmd("tcb", *args, cwd=cwd, python=python)
    assert r.returncode == 0, r.stderr
    rows = {}
    for line in r.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[0].split(":")[0] in ("module", "pth", "extension", "mapped", "bootstrap"):
            rows[fields[0]] = fields[1:]
    return rows


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("signer")
    r = pyscone_cmd("keygen", "signer.pem", cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "signer.pem"


def sign(d: Path, signer: Path, *options: str, out: str = "app.sig") -> Path:
    r = pyscone_cmd("sign", "--key", signer, *options, "-o", out, "app.py", cwd=d)
    assert r.returncode == 0, r.stderr
    return d / out


# -- item 4: a module imported before the measurement, served by a lying host ---------------------

EVIL_ATTEST = """

# -- served by the host instead of the file on disk --
print("PWNED: the host's attest.py runs in the enclave", flush=True)


def admit(mrenclave, signature, debug):
    print("PWNED: admitted without checking the signature", flush=True)
    return Identity(mrenclave, bytes(32), 0, 0, debug)
"""


def test_a_host_that_serves_its_own_attest_py_does_not_get_it_run(tmp_path: Path, signer: Path) -> None:
    write_app(tmp_path, "print('the app runs')\n")
    good = sign(tmp_path, signer)
    other = sign(tmp_path, signer, "--heap", "512M", out="other.sig")  # a signature for another enclave
    evil = tmp_path / "evil_attest.py"
    evil.write_text(ATTEST.read_text() + EVIL_ATTEST)
    lies = lying({"pyscone/enclave/attest.py": evil})

    r = run_enclave("--signature", good, "app.py", cwd=tmp_path, env=lies)
    assert "pyscone-test: the lying host serves this enclave" in r.stderr  # (not a vacuous pass)
    assert "PWNED" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert (r.returncode, r.stdout) == (0, "the app runs\n"), r.stderr
    # The host's admit() would take any signature; the enclave's own refuses this one.
    r = run_enclave("--signature", other, "app.py", cwd=tmp_path, env=lies)
    assert "PWNED" not in r.stdout + r.stderr
    assert r.returncode == 70 and "refused to start: the enclave signature is for MRENCLAVE" in r.stderr, r.stderr
    assert "the app runs" not in r.stdout
    # And the measurement it reports is the honest one.
    assert pyscone_cmd("measure", cwd=tmp_path, env=lies).stdout.strip() == measure(cwd=tmp_path)


def test_nothing_loads_between_the_measurement_and_the_app(tmp_path: Path, signer: Path) -> None:
    # A runtime path that imported a module only after the measurement (here: a preloaded
    # module makes admit() do so) would run code that MRENCLAVE does not cover, read through
    # the host: the enclave refuses to load it at all.
    write_app(tmp_path, "print('the app runs')\n")
    (tmp_path / "lazy.py").write_text(
        textwrap.dedent(
            """
            import pyscone.enclave.attest as attest
            _admit = attest.admit
            def admit(*args, **kwargs):
                import colorsys  # first imported here, after the measurement
                return _admit(*args, **kwargs)
            attest.admit = admit
            """
        )
    )
    good = sign(tmp_path, signer, "--preload", "lazy")
    evil = tmp_path / "evil_colorsys.py"
    evil.write_text("print('PWNED: the host chose colorsys', flush=True)\n")
    lies = lying({"/colorsys.py": evil})
    r = run_enclave("--signature", good, "--preload", "lazy", "app.py", cwd=tmp_path, env=lies)
    assert "pyscone-test: the lying host serves this enclave" in r.stderr  # (not a vacuous pass)
    assert "PWNED" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.returncode == 70, (r.stdout, r.stderr)
    assert "the runtime imports colorsys after the enclave was measured" in r.stderr
    assert "the app runs" not in r.stdout
    # Once the app runs, its imports are its own (and may come through the host, as always).
    app = write_app(tmp_path, "import colorsys\nprint('app imported', colorsys.__name__)\n", name="app2.py")
    ok = run_enclave("--signature", sign(tmp_path, signer, out="plain.sig"), app, cwd=tmp_path)
    assert (ok.returncode, ok.stdout) == (0, "app imported colorsys\n"), ok.stderr


# -- item 5: a bytecode cache planted beside a measured module ------------------------------------


def _plant_pyc(source: Path, evil_source: str) -> Path:
    """A .pyc of other code whose header matches ``source`` (mtime and size): the stdlib runs it."""
    st = source.stat()
    code = compile(evil_source, str(source), "exec", dont_inherit=True)
    cache = Path(bootstrap_external.cache_from_source(str(source)))
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(bootstrap_external._code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size))  # type: ignore[attr-defined]
    return cache


def test_a_planted_pyc_changes_mrenclave_and_a_signed_enclave_refuses_it(tmp_path: Path, signer: Path) -> None:
    write_app(tmp_path, "import helper\nprint('helper says', helper.VALUE)\n")
    (tmp_path / "helper.py").write_text("VALUE = 'genuine'\n")
    preload = ("--preload", "helper")
    honest = measure(*preload, "app.py", cwd=tmp_path)
    sig = sign(tmp_path, signer, *preload)
    ok = run_enclave("--signature", sig, *preload, "app.py", cwd=tmp_path)
    assert (ok.returncode, ok.stdout) == (0, "helper says genuine\n"), ok.stderr
    honest_rows = tcb(*preload, "app.py", cwd=tmp_path)

    _plant_pyc(tmp_path / "helper.py", "VALUE = 'from a planted .pyc'\n")
    assert measure(*preload, "app.py", cwd=tmp_path) != honest
    bad = run_enclave("--signature", sig, *preload, "app.py", cwd=tmp_path)
    assert bad.returncode == 70 and "refused to start" in bad.stderr, (bad.stdout, bad.stderr)
    assert "helper says" not in bad.stdout
    # The source is the same; the code that ran is not, and tcb says where it came from.
    rows = tcb(*preload, "app.py", cwd=tmp_path)
    assert rows["module:helper"][1] == honest_rows["module:helper"][1]
    assert rows["module:helper"][2] != honest_rows["module:helper"][2]
    assert rows["module:helper"][3] == "cached"


def test_an_honest_cache_measures_as_its_source_does(tmp_path: Path) -> None:
    write_app(tmp_path, "import helper\n")
    (tmp_path / "helper.py").write_text("VALUES = {'a', 'b', 'c', 'd'}\ndef f(x):\n    return x in {'e', 'f', 'g'}\n")
    cold = tcb("--preload", "helper", "app.py", cwd=tmp_path)  # compiles, and writes the cache
    assert cold["module:helper"][3] == "compiled"
    assert (tmp_path / "__pycache__").is_dir()
    warm = tcb("--preload", "helper", "app.py", cwd=tmp_path)  # another process, another hash seed
    assert warm["module:helper"][3] == "cached"
    assert {k: v[:3] for k, v in warm.items()} == {k: v[:3] for k, v in cold.items()}
    assert measure("--preload", "helper", "app.py", cwd=tmp_path) == measure(
        "--preload", "helper", "app.py", cwd=tmp_path
    )


def test_bytecode_without_source_is_not_loaded_before_lockdown(tmp_path: Path) -> None:
    write_app(tmp_path, "print('app')\n")
    code = compile("print('PWNED: sourceless bytecode')", "helper.py", "exec")
    (tmp_path / "helper.pyc").write_bytes(bootstrap_external._code_to_timestamp_pyc(code, 0, 0))  # type: ignore[attr-defined]
    r = run_enclave("--preload", "helper", "app.py", cwd=tmp_path)
    assert "PWNED" not in r.stdout + r.stderr
    assert r.returncode == 70 and "is bytecode without its source" in r.stderr, r.stderr


# -- item 5: site hooks in a site-packages the enclave uses ---------------------------------------


@pytest.fixture
def venv(tmp_path: Path) -> tuple[str, Path]:
    """A fresh venv that sees pyscone and its dependencies (path lines), and its site-packages."""
    root = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = str(root / "bin" / "python")
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    project = Path(pyscone.__file__).parent.parent
    (site / "pyscone-dev.pth").write_text(f"{project}\n{sysconfig.get_paths()['purelib']}\n")
    return python, site


SITECUSTOMIZE = """\
import os, sys
sys.pyscone_sitecustomize = "ran"
if sys.flags.isolated:  # the enclave's interpreter, not the host's CLI
    os.remove(__file__)  # and no trace left for a second read to find
"""


def test_pth_import_lines_and_a_self_deleting_sitecustomize_are_measured(
    tmp_path: Path, venv: tuple[str, Path]
) -> None:
    python, site = venv
    write_app(
        tmp_path, "import sys\nprint(getattr(sys, 'pyscone_pth', None), getattr(sys, 'pyscone_sitecustomize', None))\n"
    )
    clean = measure("app.py", cwd=tmp_path, python=python)

    (site / "zz-hook.pth").write_text("import sys; sys.pyscone_pth = 'ran'\n")
    with_pth = measure("app.py", cwd=tmp_path, python=python)
    assert with_pth != clean

    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    with_both = measure("app.py", cwd=tmp_path, python=python)
    assert not (site / "sitecustomize.py").exists()  # it ran in the enclave, and deleted itself
    assert with_both not in (clean, with_pth)

    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    rows = tcb("app.py", cwd=tmp_path, python=python)
    assert "pth:zz-hook.pth" in rows and rows["pth:zz-hook.pth"][3] == "read"
    assert "pth:pyscone-dev.pth" in rows
    assert "module:sitecustomize" in rows and rows["module:sitecustomize"][4].endswith("sitecustomize.py")
    # They do run (site's semantics are kept), measured.
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    r = pyscone_cmd("run", "app.py", cwd=tmp_path, python=python)
    assert (r.returncode, r.stdout) == (0, "ran ran\n"), r.stderr


# -- the interpreter's start-up is pyscone's -------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"flag": "-O"}, "not with pyscone's flags"),  # asserts stripped from the runtime
        ({"flag": "-Xfrozen_modules=off"}, "not with pyscone's flags"),  # the import system from disk
        ({"env": {"LD_PRELOAD": "libm.so.6"}}, "started with LD_PRELOAD set"),
        # The libc layer's shim is the one library the enclave accepts preloaded, and only alone,
        # only from its own package, and with nothing else in the environment.
        ({"env": {"LD_PRELOAD": f"{SHIM}:libm.so.6"}}, "started with LD_PRELOAD set"),
        ({"env": {"LD_PRELOAD": f"libm.so.6 {SHIM}"}}, "started with LD_PRELOAD set"),
        ({"env": {"LD_PRELOAD": "/tmp/libpyscone-shim.so"}}, "started with LD_PRELOAD set"),
        ({"env": {"LD_PRELOAD": SHIM, "LD_LIBRARY_PATH": "/tmp"}}, "started with LD_LIBRARY_PATH set"),
        ({"env": {"OPENSSL_CONF": "/dev/null"}}, "started with OPENSSL_CONF set"),
    ],
)
def test_an_interpreter_started_otherwise_is_a_host_violation(
    tmp_path: Path, spec: dict[str, object], reason: str
) -> None:
    write_app(tmp_path, "print('the app runs')\n")
    r = other_launcher(spec, "run", "app.py", cwd=tmp_path)
    assert r.returncode == EXIT_HOST_VIOLATION, (r.stdout, r.stderr)
    assert "pyscone: enclave stopped: host violation: " in r.stderr and reason in r.stderr, r.stderr
    assert "the app runs" not in r.stdout


def test_the_tcb_names_every_mapped_library_and_how_each_file_was_loaded(tmp_path: Path) -> None:
    rows = tcb(cwd=tmp_path)
    assert rows["bootstrap"][3] == "read"
    assert rows["module:pyscone.enclave.loader"][3] == "compiled"
    assert rows["module:encodings"][3] == "re-read"  # the interpreter's start-up imported it
    assert rows["extension:_ssl"][3] == "mapped" and rows["extension:_ssl"][2] == "-"
    assert rows["mapped:libc.so.6"][3] == "re-read"
    assert any(name.startswith("mapped:libseccomp") for name in rows)  # the barrier's library
    assert all(row[2] != "-" for name, row in rows.items() if name.startswith("module:") and row[3] != "re-read"
               and name != "module:pyscone.enclave.loader")  # fmt: skip
