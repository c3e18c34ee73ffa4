"""The host's console learns nothing of encrypted code from the runtime's own reports.

The host sends the signals (SIGUSR2 to the enclave process, SIGINT to the launcher)
and reads stderr; the code lives in an encrypted region of the FS shield.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

from conftest import PYSCONE

from pyscone.host import fspf_tool as tool

MODULE = """
import sys, time

def compute_the_secret_formula(fail):
    if fail:
        raise ValueError("the-secret-value")  # SOURCE-MARKER
    print("ready", flush=True)
    time.sleep(60)  # SOURCE-MARKER
"""
MAIN = "import sys, secretmod\nsecretmod.compute_the_secret_formula(sys.argv[1:] == ['fail'])\n"
LEAKS = ("secretmod", "compute_the_secret_formula", "SOURCE-MARKER", "the-secret-value", "main.py")


def _protected_app(root: Path) -> tuple[Path, Path]:
    fspf = root / "app.fspf"
    paths = tool.Paths.of(str(fspf))
    code = root / "code"
    code.mkdir()
    tool.create(paths)
    tool.add_region(paths, str(code), "encrypted", 4096)
    for name, source in (("secretmod.py", MODULE), ("main.py", MAIN)):
        plain = root / name
        plain.write_text(textwrap.dedent(source))
        tool.add_files(paths, str(code / name), str(plain))
        plain.unlink()
    return fspf, code / "main.py"


def _start(root: Path, *options: str) -> subprocess.Popen[str]:
    fspf, main = _protected_app(root)
    proc = subprocess.Popen(
        [*PYSCONE, "run", *options, "--fspf", str(fspf), str(main)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n", proc.communicate(timeout=30)
    return proc


def _enclave_pid(launcher: int) -> int:
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_sigusr2_dumps_no_state_of_a_production_enclave(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    os.kill(_enclave_pid(proc.pid), signal.SIGUSR2)
    _, err = proc.communicate(timeout=30)
    assert "lthread" not in err and not any(leak in err for leak in LEAKS), err


def test_a_host_sigint_shows_no_protected_frame_or_source(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # forwarded once by the launcher, as ^C is
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "KeyboardInterrupt" in err and "[protected code" in err, err
    assert not any(leak in err for leak in LEAKS), err


def test_an_uncaught_exception_in_protected_code_withholds_names_lines_and_message(tmp_path: Path) -> None:
    fspf, main = _protected_app(tmp_path)
    r = subprocess.run(
        [*PYSCONE, "run", "--fspf", str(fspf), str(main), "fail"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert "ValueError: (message withheld: raised in protected code)" in r.stderr, r.stderr
    assert not any(leak in r.stderr for leak in LEAKS), r.stderr


def test_a_debug_enclave_shows_everything_and_says_it_is_one(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--no-barrier")
    os.kill(_enclave_pid(proc.pid), signal.SIGUSR2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert "pyscone: debug enclave: lthread dump" in err, err
    assert "compute_the_secret_formula" in err and "SOURCE-MARKER" in err, err


CRASHES = """
import threading
def boom(i):
    raise ValueError(f"boom {i} " + "x" * 200)
ts = [threading.Thread(target=boom, args=(i,)) for i in range(20)]
[t.start() for t in ts]; [t.join() for t in ts]
print("done")
"""


def test_reports_of_many_lthreads_at_once_are_whole_and_show_no_runtime_frames(tmp_path: Path) -> None:
    # Twenty threads crash together: each report is one piece (no interleaving mid-line), and
    # like python's own it shows the app's and the stdlib's frames, not pyscone's.
    (tmp_path / "app.py").write_text(CRASHES)
    r = subprocess.run([*PYSCONE, "run", "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "done\n", r.stderr
    reports = r.stderr.split("Exception in thread ")[1:]
    assert len(reports) == 20, r.stderr
    for report in reports:
        lines = report.splitlines()
        assert lines[1] == "Traceback (most recent call last):" and lines[-1].startswith("ValueError: boom "), report
        assert lines[-1].endswith("x" * 200), report
    assert "pyscone" not in r.stderr, r.stderr


def test_a_sigint_traceback_shows_the_apps_frames_not_the_runtimes(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen(
        [*PYSCONE, "run", "app.py"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.splitlines()[-3:] == [
        '  File "app.py", line 3, in <module>',
        "    time.sleep(60)",
        "KeyboardInterrupt",
    ], err
    assert "pyscone" not in err, err
