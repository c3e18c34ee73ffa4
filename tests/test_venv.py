"""The app's own virtualenv: ``pyscone run --venv DIR`` (or the active one), measured.

Real venvs made with ``python -m venv`` in temporary directories; packages are written
into their site-packages (no network), a C extension is a copy of a real one.
"""

from __future__ import annotations

import ast
import datetime
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PYSCONE, run_enclave, write_app

import pyscone

PY = f"python{sys.version_info[0]}.{sys.version_info[1]}"
RUNTIME_DIR = str(Path(pyscone.__file__).parent)


def make_venv(path: Path, *options: str, python: str = sys.executable) -> Path:
    """A real venv (no pip: nothing is downloaded); returns its site-packages."""
    subprocess.run([python, "-m", "venv", "--without-pip", *options, str(path)], check=True, capture_output=True)
    return path / "lib" / PY / "site-packages"


def pyscone_cmd(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("PYSCONE_TEST_HOSTILE", "VIRTUAL_ENV")}
    full.update(env or {})
    return subprocess.run([*PYSCONE, *map(str, args)], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def measure(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    r = pyscone_cmd("measure", *args, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def no_active_venv() -> dict[str, str]:
    return {"VIRTUAL_ENV": ""}


APP = """\
import importlib.util, sys
import venvpkg, editpkg, venvext._json as fast
print("venvpkg", venvpkg.WHO)
print("editable", editpkg.WHO)
print("extension", fast.__name__, fast.__file__.startswith(sys.prefix), fast.encode_basestring("x"))
print("prefix", sys.prefix)
import site, sysconfig
print("site", site.getsitepackages() == [sysconfig.get_paths()["purelib"]] == [venvpkg.__file__.rpartition("/")[0]])
print("runtime-only package visible", importlib.util.find_spec("pytest") is not None)
print("sitecustomize", getattr(sys, "venv_sitecustomize", None))
"""


@pytest.fixture(scope="module")
def app_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A venv with a module, an editable (``.pth`` path) install and a C extension; and the app."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    site = make_venv(venv)
    (site / "venvpkg.py").write_text("WHO = 'from the app venv'\n")
    src = root / "src"
    src.mkdir()
    (src / "editpkg.py").write_text("WHO = 'from the editable install'\n")
    (site / "__editable__.editpkg-0.1.pth").write_text(f"{src}\n")
    # A C extension of the venv: a copy of a real one, under a package (its PyInit name is _json).
    import _json

    (site / "venvext").mkdir()
    (site / "venvext" / "__init__.py").write_text("")
    shutil.copy(_json.__file__, site / "venvext" / ("_json" + importlib.machinery.EXTENSION_SUFFIXES[0]))
    (site / "sitecustomize.py").write_text("import sys\nsys.venv_sitecustomize = 'ran'\n")
    write_app(root, APP)
    yield root, venv


def test_an_app_runs_with_its_venvs_packages_and_only_those(app_venv: tuple[Path, Path]) -> None:
    root, venv = app_venv
    r = run_enclave("--venv", "venv", "app.py", cwd=root, env=no_active_venv())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "venvpkg from the app venv",
        "editable from the editable install",
        'extension venvext._json True "x"',
        f"prefix {venv}",
        "site True",  # what site and sysconfig say agrees (pip-like code finds the venv)
        "runtime-only package visible False",  # pyscone's own environment is not the app's
        "sitecustomize ran",  # the venv's, as site runs it
    ]
    # Without the venv the app's packages are not there: it is the venv that made the difference.
    bare = run_enclave("app.py", cwd=root, env=no_active_venv())
    assert bare.returncode == 1 and "No module named 'venvpkg'" in bare.stderr


def test_the_venvs_files_are_measured(app_venv: tuple[Path, Path]) -> None:
    root, venv = app_venv
    r = pyscone_cmd("tcb", "--venv", venv, "app.py", cwd=root)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if ":" in line.split(" ")[0]}
    assert rows["venv:pyvenv.cfg"][-1] == str(venv / "pyvenv.cfg")
    assert rows["pth:__editable__.editpkg-0.1.pth"][-1].startswith(str(venv))
    assert rows["module:sitecustomize"][-1] == str(venv / "lib" / PY / "site-packages" / "sitecustomize.py")
    ext = rows["extension:venvext._json"]
    assert ext[-1].startswith(str(venv)) and ext[-2] == "mapped"  # mapped before lockdown, from what was hashed
    config = next(line for line in r.stdout.splitlines() if line.startswith("measured configuration: "))
    assert json.loads(config.partition(": ")[2])["venv"] == str(venv)


def test_an_editable_install_by_setuptools_finder_imports_after_lockdown(tmp_path: Path) -> None:
    # What `pip install -e .` of a flat-layout setuptools project writes: a .pth import line that
    # installs a finder (setuptools' own template), which answers with the stdlib's file loaders.
    editable = pytest.importorskip("setuptools.command.editable_wheel")
    site = make_venv(tmp_path / "venv")
    project = tmp_path / "project" / "flatpkg"
    project.mkdir(parents=True)
    (project / "__init__.py").write_text("WHO = 'from the editable project'\n")
    (project / "sub.py").write_text("X = 42\n")
    finder = "__editable___flatpkg_0_1_finder"
    (site / f"{finder}.py").write_text(editable._finder_template(finder, {"flatpkg": str(project)}, {}))
    (site / "__editable__.flatpkg-0.1.pth").write_text(f"import {finder}; {finder}.install()\n")
    write_app(tmp_path, "import flatpkg, flatpkg.sub\nprint(flatpkg.WHO, flatpkg.sub.X, flatpkg.__file__)")
    r = run_enclave("--venv", "venv", "app.py", cwd=tmp_path, env=no_active_venv())
    assert (r.returncode, r.stdout) == (0, f"from the editable project 42 {project}/__init__.py\n"), r.stderr


def test_the_active_venv_is_used_unless_told_not_to(app_venv: tuple[Path, Path]) -> None:
    root, venv = app_venv
    active = run_enclave("app.py", cwd=root, env={"VIRTUAL_ENV": str(venv)})
    assert active.returncode == 0, active.stderr
    assert active.stdout.startswith("venvpkg from the app venv\n")
    ignored = run_enclave("--no-venv", "app.py", cwd=root, env={"VIRTUAL_ENV": str(venv)})
    assert ignored.returncode == 1 and "No module named 'venvpkg'" in ignored.stderr
    # pyscone's own environment active (a developer's shell): the same as no venv at all.
    own = run_enclave("-c", "import sys; print(sys.prefix)", cwd=root, env={"VIRTUAL_ENV": sys.prefix})
    assert (own.returncode, own.stdout.strip()) == (0, sys.prefix), own.stderr


def _other_python() -> str | None:
    """Another CPython 3 on this machine that works (a pyenv shim may name one that does not)."""
    for minor in (sys.version_info[1] + 1, sys.version_info[1] + 2, sys.version_info[1] - 1):
        found = shutil.which(f"python3.{minor}")
        if found and subprocess.run([found, "-c", "import venv"], capture_output=True).returncode == 0:
            return found
    return None


def test_a_venv_for_another_python_is_one_error_line(tmp_path: Path) -> None:
    write_app(tmp_path, "print('ran')")
    other = _other_python()
    if other is not None:  # a real venv of another Python
        make_venv(tmp_path / "other", python=other)
        version = subprocess.run(
            [other, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
        ).stdout.strip()
    else:  # what such a venv holds
        version = "3.99"
        (tmp_path / "other" / "lib" / "python3.99" / "site-packages").mkdir(parents=True)
        (tmp_path / "other" / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.99.0\n")
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for args, env in ((["--venv", "other"], no_active_venv()), ([], {"VIRTUAL_ENV": str(tmp_path / "other")})):
        r = run_enclave(*args, "app.py", cwd=tmp_path, env=env)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
        assert f"made for Python {version}, but the enclave runs Python {here}" in r.stderr
    # Another implementation (virtualenv and uv say which), of the same version.
    pypy = tmp_path / "pypy"
    make_venv(pypy)
    with (pypy / "pyvenv.cfg").open("a") as f:
        f.write("implementation = PyPy\n")
    r = run_enclave("--venv", pypy, "app.py", cwd=tmp_path, env=no_active_venv())
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"error: --venv {pypy}: it was made for pypy, but the enclave interpreter is {sys.implementation.name}"
    ]


def test_a_directory_that_is_not_a_venv_is_one_error_line(tmp_path: Path) -> None:
    write_app(tmp_path, "print('ran')")
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("")
    cases = {
        "plain": f"error: --venv plain: not a virtualenv (no pyvenv.cfg in {tmp_path / 'plain'})",
        "missing": "error: --venv missing: no such directory",
        "file": "error: --venv file: no such directory",
    }
    for name, line in cases.items():
        r = run_enclave("--venv", name, "app.py", cwd=tmp_path, env=no_active_venv())
        assert (r.returncode, r.stdout, r.stderr.splitlines()) == (2, "", [line])


def test_include_system_site_packages_puts_the_base_after_the_venv(tmp_path: Path) -> None:
    site = make_venv(tmp_path / "venv", "--system-site-packages")
    (site / "venvpkg.py").write_text("")
    base = Path(sys.base_prefix) / "lib" / PY / "site-packages"
    if not base.is_dir():
        pytest.skip(f"the base interpreter has no {base}")
    write_app(tmp_path, "import sys, venvpkg\nprint(repr(sys.path))")
    r = run_enclave("--venv", "venv", "app.py", cwd=tmp_path, env=no_active_venv())
    assert r.returncode == 0, r.stderr
    path = ast.literal_eval(r.stdout)
    assert path.index(str(site)) < path.index(str(base))
    plain = make_venv(tmp_path / "plain")
    (plain / "venvpkg.py").write_text("")
    r = run_enclave("--venv", "plain", "app.py", cwd=tmp_path, env=no_active_venv())
    assert r.returncode == 0 and str(base) not in ast.literal_eval(r.stdout), r.stderr


EVIL = "print('PWNED: the venv replaced the runtime', flush=True)\nraise SystemExit(99)\n"


def test_a_venv_with_its_own_pyscone_and_cryptography_does_not_replace_the_runtime(tmp_path: Path) -> None:
    site = make_venv(tmp_path / "venv")
    for package in ("pyscone", "pyscone/enclave", "cryptography"):
        (site / package).mkdir()
        (site / package / "__init__.py").write_text(EVIL)
    (site / "pyscone" / "enclave" / "boot.py").write_text(EVIL)
    (site / "evil.pth").write_text(f"{site}\n")  # and on sys.path once more, through a .pth
    write_app(tmp_path, "import pyscone, pyscone.enclave.boot as b\nprint(pyscone.__file__)\nprint(b.__file__)\n")
    r = run_enclave("--venv", "venv", "app.py", cwd=tmp_path, env=no_active_venv())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"{RUNTIME_DIR}/__init__.py", f"{RUNTIME_DIR}/enclave/boot.py"]
    # A measured enclave imports cryptography at boot: the runtime's own, never the app's.
    t = pyscone_cmd("tcb", "--venv", "venv", "app.py", cwd=tmp_path)
    assert t.returncode == 0 and "PWNED" not in t.stdout + t.stderr, t.stdout + t.stderr
    paths = {line.split()[0]: line.split()[-1] for line in t.stdout.splitlines() if line.startswith("module:")}
    assert not paths["module:cryptography"].startswith(str(site)), paths["module:cryptography"]
    assert paths["module:pyscone"] == f"{RUNTIME_DIR}/__init__.py"


def test_mrenclave_depends_on_the_venv_and_a_signature_pins_it(tmp_path: Path) -> None:
    write_app(tmp_path, "import venvpkg\nprint(venvpkg.WHO)")
    (make_venv(tmp_path / "a") / "venvpkg.py").write_text("WHO = 'genuine'\n")
    # b is a copy of a (the same pyvenv.cfg, .pth files and extensions) in another place, with its
    # own module: only the venv's path tells them apart in MRENCLAVE.
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    (tmp_path / "b" / "lib" / PY / "site-packages" / "venvpkg.py").write_text("WHO = 'HOST CODE RAN'\n")
    env = no_active_venv()
    none = measure("app.py", cwd=tmp_path, env=env)
    a = measure("--venv", "a", "app.py", cwd=tmp_path, env=env)
    assert measure("--venv", str(tmp_path / "a"), "app.py", cwd=tmp_path, env=env) == a  # stable
    assert measure("app.py", cwd=tmp_path, env={"VIRTUAL_ENV": str(tmp_path / "a")}) == a  # the active one
    b = measure("--venv", "b", "app.py", cwd=tmp_path, env=env)
    with (tmp_path / "a" / "pyvenv.cfg").open("a") as f:
        f.write("include-system-site-packages = true\n")
    a_system = measure("--venv", "a", "app.py", cwd=tmp_path, env=env)
    assert len({none, a, b, a_system}) == 4
    (tmp_path / "a" / "pyvenv.cfg").write_text((tmp_path / "a" / "pyvenv.cfg").read_text().replace("true", "false"))

    # Signed for venv a; a host that starts it with its own venv b is refused before any app code.
    assert pyscone_cmd("keygen", "signer.pem", cwd=tmp_path).returncode == 0
    r = pyscone_cmd("sign", "--key", "signer.pem", "--venv", "a", "-o", "app.sig", "app.py", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    good = pyscone_cmd("run", "--venv", "a", "--signature", "app.sig", "app.py", cwd=tmp_path, env=env)
    assert (good.returncode, good.stdout) == (0, "genuine\n"), good.stderr
    swapped = pyscone_cmd("run", "--venv", "b", "--signature", "app.sig", "app.py", cwd=tmp_path, env=env)
    assert swapped.returncode == 70 and "HOST CODE RAN" not in swapped.stdout, swapped.stdout + swapped.stderr
    assert "the enclave signature is for MRENCLAVE" in swapped.stderr


# A launcher that skips the CLI's check of the venv and starts the enclave with one that
# another Python made: the enclave reads pyvenv.cfg itself and stops (a host violation).
LYING_LAUNCHER = """
import sys
from pyscone import cli

LIE = sys.argv.pop(1)
cli._venv = lambda a, attested: LIE
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_launcher_that_lies_about_the_venv_is_a_host_violation(tmp_path: Path) -> None:
    write_app(tmp_path, "print('APP RAN')")
    (tmp_path / "other" / "lib" / "python3.99" / "site-packages").mkdir(parents=True)
    (tmp_path / "other" / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.99.1\n")
    (tmp_path / "driver.py").write_text(LYING_LAUNCHER)
    for venv in (tmp_path / "other", tmp_path / "missing"):
        r = subprocess.run(
            [sys.executable, "driver.py", str(venv), "run", "app.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 86 and "APP RAN" not in r.stdout, r.stdout + r.stderr
        assert f"host violation: the app's virtualenv {venv}" in r.stderr


def _self_signed(path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cas.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_with_a_cas_the_hosts_active_venv_chooses_nothing(tmp_path: Path) -> None:
    write_app(tmp_path, "print('ran')")
    make_venv(tmp_path / "venv")
    _self_signed(tmp_path / "cas.pem")
    pin = ["--cas", "https://127.0.0.1:1", "--cas-cert", "cas.pem"]
    plain = measure(*pin, "app.py", cwd=tmp_path, env=no_active_venv())
    r = pyscone_cmd("measure", *pin, "app.py", cwd=tmp_path, env={"VIRTUAL_ENV": str(tmp_path / "venv")})
    assert r.returncode == 0 and r.stdout.strip() == plain, r.stderr
    assert "with --cas the active virtualenv" in r.stderr and "pass --venv DIR" in r.stderr
    assert measure(*pin, "--venv", "venv", "app.py", cwd=tmp_path, env=no_active_venv()) != plain


def test_an_attested_enclave_runs_only_with_the_venv_its_policy_admits(tmp_path: Path) -> None:
    from test_cas import World

    world = World(tmp_path)
    try:
        write_app(world.root, "import venvpkg\nprint(venvpkg.WHO)")
        (make_venv(world.root / "venv") / "venvpkg.py").write_text("WHO = 'genuine'\n")
        shutil.copytree(world.root / "venv", world.root / "evil", symlinks=True)  # only its place differs
        (world.root / "evil" / "lib" / PY / "site-packages" / "venvpkg.py").write_text("WHO = 'HOST CODE RAN'\n")
        mre = world.measure("--venv", "venv")
        policy = world.policy("venvs", f"    mrenclaves: [{mre}]\n    argv: [app.py]\n")
        assert world.owner("session", "create", str(policy)).returncode == 0
        good = world.run("venvs/app", "--venv", "venv")
        assert (good.returncode, good.stdout) == (0, "genuine\n"), good.stderr
        for options, env in ((["--venv", "evil"], {}), ([], {"VIRTUAL_ENV": str(world.root / "venv")})):
            r = subprocess.run(
                [*PYSCONE, "run", *world.pin, "--session", "venvs/app", "--las", f"127.0.0.1:{world.las.port}",
                 *options],
                cwd=world.root,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=120,
            )  # fmt: skip
            assert r.returncode == 70 and "genuine" not in r.stdout and "HOST CODE" not in r.stdout, r.stderr
            assert "attestation failed" in r.stderr, r.stderr
    finally:
        world.stop()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # python -m venv
        (b"home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11.7\n", ((3, 11), None, False)),
        # virtualenv
        (
            b"home = /usr/bin\nimplementation = CPython\nversion_info = 3.12.1.final.0\nvirtualenv = 20.25.0\n"
            b"include-system-site-packages = true\nbase-prefix = /usr\n",
            ((3, 12), "cpython", True),
        ),
        # uv
        (
            b"home = /opt/py/bin\nimplementation = CPython\nuv = 0.4.0\nversion_info = 3.13.0\n",
            ((3, 13), "cpython", False),
        ),
        # no version at all (then the site-packages directory decides)
        (b"home = /usr/bin\n", (None, None, False)),
    ],
)
def test_pyvenv_cfg_as_venv_virtualenv_and_uv_write_it(text: bytes, expected: tuple[object, ...]) -> None:
    from pyscone.enclave import venv

    spec = venv.parse_cfg("/srv/app/venv/", text)
    assert (spec.path, (spec.version, spec.implementation, spec.include_system)) == ("/srv/app/venv", expected)


def test_a_pyvenv_cfg_with_a_bad_version_is_one_error_line(tmp_path: Path) -> None:
    write_app(tmp_path, "print('ran')")
    make_venv(tmp_path / "venv")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\nversion = eleven\n")
    r = run_enclave("--venv", "venv", "app.py", cwd=tmp_path, env=no_active_venv())
    assert (r.returncode, r.stderr.splitlines()) == (
        2,
        [f"error: --venv venv: {tmp_path / 'venv'}/pyvenv.cfg: version 'eleven' is not a Python version"],
    )
