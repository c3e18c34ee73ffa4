"""``pyscone run``'s command line is python's: everything after the program is the app's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import run_enclave, write_app

from pyscone import cli

SHOW = "import os, sys\nprint(sys.argv[1:], os.environ.get('X'), os.environ.get('Y'))\n"


def native(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_a_modules_options_are_its_own(tmp_path: Path) -> None:
    (tmp_path / "tool.py").write_text(SHOW)
    # Options that pyscone also has (--stats, --env, -c, -h) go to the module once -m has been seen.
    app_args = ["-w", "1", "--stats", "--env", "Y=2", "-c", "x", "-h", "app:app"]
    r = run_enclave("--env", "X=1", "-m", "tool", *app_args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{app_args!r} 1 None\n"
    assert "pyscone: enclave:" not in r.stderr  # --stats was not pyscone's
    assert native("-m", "tool", *app_args, cwd=tmp_path).stdout == f"{app_args!r} None None\n"
    joined = run_enclave("-mtool", "a", cwd=tmp_path)  # python's -mMODULE
    assert joined.stdout == "['a'] None None\n", joined.stderr


def test_a_scripts_options_are_its_own(tmp_path: Path) -> None:
    app = write_app(tmp_path, SHOW)
    r = run_enclave("--env", "X=1", app, "--env", "Y=2", "-m", "z", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "['--env', 'Y=2', '-m', 'z'] 1 None\n"), r.stderr


def test_dash_c_runs_code_like_python(tmp_path: Path) -> None:
    code = "import sys; print(1, sys.argv, repr(sys.path[0]), '__file__' in dir(sys.modules['__main__']), __name__)"
    r = run_enclave("-c", code, "a", "--stats", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1 ['-c', 'a', '--stats'] '' False __main__\n"
    assert r.stdout == native("-c", code, "a", "--stats", cwd=tmp_path).stdout
    failing = run_enclave("-c", "raise SystemExit(3)", cwd=tmp_path)
    assert failing.returncode == 3, failing.stderr
    joined = run_enclave("-cprint(2)", cwd=tmp_path)
    assert joined.stdout == "2\n", joined.stderr


def test_pytest_runs_a_suite_in_the_enclave_with_its_own_options(tmp_path: Path) -> None:
    (tmp_path / "test_small.py").write_text(
        "def test_add():\n    assert 1 + 1 == 2\n\ndef test_str():\n    assert 'a' * 2 == 'aa'\n"
    )
    # -s and no faulthandler: pytest's capture and faulthandler dup file descriptors (issue 10, item 4).
    r = run_enclave("-m", "pytest", "-q", "-s", "-p", "no:faulthandler", "-p", "no:cacheprovider", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout


def test_mistakes_are_one_line(tmp_path: Path) -> None:
    for args, expected in (
        (["-c"], "argument -c: expected one argument"),
        (["-m"], "argument -m: expected one argument"),
        ([], "pyscone run needs a program"),
        (["--nope", "app.py"], "unrecognized arguments: --nope"),
        (["--cas", "https://127.0.0.1:1", "--session", "s/a", "-c", "1"], "with --cas the CAS supplies"),
    ):
        r = run_enclave(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert expected in r.stderr.strip().splitlines()[-1], (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_split_run_stops_at_the_program_and_skips_option_values() -> None:
    run = cli._run_parser(cli.build_parser())
    assert cli.split_run(run, ["--env", "app.py", "x.py", "-q"]) == (["--env", "app.py"], ["x.py", "-q"])
    assert cli.split_run(run, ["--stats", "--heap=1G", "-m", "m", "--stats"]) == (
        ["--stats", "--heap=1G"],
        ["-m", "m", "--stats"],
    )
    assert cli.split_run(run, ["--sig", "s.sig", "-cpass"]) == (["--sig", "s.sig"], ["-cpass"])  # a unique prefix
    assert cli.split_run(run, ["--no-barrier", "--", "-weird.py"]) == (["--no-barrier"], ["-weird.py"])
