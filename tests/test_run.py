"""``pyscone run``: an unmodified program behaves as under plain ``python``."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import run_enclave, run_native, write_app


def test_hello_argv_env_exit_code(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, sys
        print("hello", sys.argv[1:], os.environ.get("GREETING"), os.environ.get("HOME"))
        sys.exit(3)
        """,
    )
    r = run_enclave("--env", "GREETING=hi", app, "a", "b c", cwd=tmp_path, env={"HOME": "/host-home"})
    assert r.returncode == 3, r.stderr
    # The host's environment (HOME here) never reaches the app: only --env does.
    assert r.stdout == "hello ['a', 'b c'] hi None\n"


def test_module_mode_runs_like_python_m(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("VALUE = 42\n")
    (tmp_path / "pkg" / "__main__.py").write_text(
        "import sys\nfrom pkg import VALUE\nprint(__name__, VALUE, sys.argv)\n"
    )
    r = run_enclave("-m", "pkg", "x", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("__main__ 42 [")
    assert r.stdout.rstrip().endswith("'x']")


def test_uncaught_exception_traceback_and_status(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        def fail():
            raise ValueError("boom")
        fail()
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    n = run_native(app, cwd=tmp_path)
    assert r.returncode == n.returncode == 1
    assert "ValueError: boom" in r.stderr
    # Source lines are shown, read through the interposed open.
    assert 'raise ValueError("boom")' in r.stderr


def test_system_exit_message(tmp_path: Path) -> None:
    app = write_app(tmp_path, "raise SystemExit('fatal: bad config')\n")
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().endswith("fatal: bad config")


def test_stdin_is_relayed(tmp_path: Path) -> None:
    app = write_app(tmp_path, "import sys\nprint(sys.stdin.read().upper(), end='')\n")
    r = run_enclave(app, cwd=tmp_path, input=b"line one\nline two\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "LINE ONE\nLINE TWO\n"


def test_atexit_and_nondaemon_threads_finish(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import atexit, threading, time
        atexit.register(lambda: print("atexit ran"))
        def late():
            time.sleep(0.05)
            print("thread finished")
        threading.Thread(target=late).start()
        print("main done")
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.stdout == "main done\nthread finished\natexit ran\n"


def test_same_output_as_native_for_a_mixed_program(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import json, hashlib, collections, decimal, datetime, re, random, struct, zlib
        random.seed(7)
        data = {"n": [random.randint(0, 99) for _ in range(10)], "d": str(decimal.Decimal("1.1") * 3)}
        blob = json.dumps(data, sort_keys=True).encode()
        print(hashlib.sha256(zlib.compress(blob)).hexdigest()[:16], collections.Counter("enclave").most_common(2))
        print(re.sub(r"\\d", "#", "a1b22"), struct.pack("<I", 7).hex(), datetime.date(2026, 1, 2).isoformat())
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    n = run_native(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == n.stdout


def test_sync_mode_runs_the_same_program(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os, threading
        with open("f.txt", "w") as f:
            f.write("sync\\n" * 3)
        out = []
        ts = [threading.Thread(target=lambda i=i: out.append(open("f.txt").read().count("sync") + i)) for i in range(3)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(sorted(out), os.path.getsize("f.txt"))
        """,
    )
    r = run_enclave("--syscalls", "sync", "--stats", app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[3, 4, 5] 15\n"
    assert "host calls" in r.stderr


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        (["missing.py"], "can't open file"),
        (["--env", "NOEQUALS", "x.py"], "expected KEY=VALUE"),
        (["--heap", "lots", "x.py"], "is not a size"),
        (["--slots", "0", "x.py"], "slots must be"),
        ([], "needs a program"),
    ]
    write_app(tmp_path, "print(1)\n", "x.py")
    for args, message in cases:
        r = run_enclave(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.stderr)


def test_bad_hostile_mode_is_a_clear_error(tmp_path: Path) -> None:
    app = write_app(tmp_path, "print(1)\n")
    r = run_enclave(app, cwd=tmp_path, env={"PYSCONE_TEST_HOSTILE": "nonsense"})
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown hostile mode")


def test_python_is_the_same_interpreter(tmp_path: Path) -> None:
    app = write_app(tmp_path, "import sys\nprint(sys.version_info[:2])\n")
    r = run_enclave(app, cwd=tmp_path)
    assert r.stdout.strip() == str(sys.version_info[:2])


def test_a_heap_too_small_for_the_enclave_is_one_line(tmp_path: Path) -> None:
    app = write_app(tmp_path, "print(1)\n")
    need = 0
    for heap in ("1K", "20M"):
        r = run_enclave("--heap", heap, app, cwd=tmp_path)
        assert r.returncode == 70, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"--heap {heap} is too small: the enclave needs at least" in lines[0], r.stderr
        need = int(lines[0].rpartition("at least ")[2].split("M")[0])
    # What it needs depends on the extensions the venv holds (each is mapped before lockdown).
    assert run_enclave("--heap", f"{need + 32}M", app, cwd=tmp_path).stdout == "1\n"


def test_multiprocessing_locks_work_and_rlock_counts_recursion(tmp_path: Path) -> None:
    # hypercorn's CLI makes a multiprocessing lock even for one worker: a bare EPERM from the
    # barrier once, then ENOSYS; now a lock on a host semaphore (tests/test_semlock.py).
    app = write_app(
        tmp_path,
        "import multiprocessing, threading\nr = threading.RLock()\nwith r:\n    with r:\n        print(r._recursion_count())\n"
        "lock = multiprocessing.Lock()\nwith lock:\n    print(lock)\n",
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["2", "<Lock(owner=MainProcess)>"]
