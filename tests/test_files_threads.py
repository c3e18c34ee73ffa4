"""Files and threads: unmodified programs print exactly what they print natively."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import run_enclave, run_native, write_app

APPS = Path(__file__).parent / "apps"


def _same_as_native(tmp_path: Path, name: str, *extra: str) -> str:
    app = tmp_path / name
    shutil.copy(APPS / name, app)
    native = run_native(app, cwd=tmp_path)
    enclave = run_enclave(*extra, app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    assert enclave.returncode == 0, enclave.stderr
    assert enclave.stdout == native.stdout
    return enclave.stdout


def test_file_io_open_pathlib_os_shutil_tempfile(tmp_path: Path) -> None:
    out = _same_as_native(tmp_path, "files_app.py")
    assert "exists after rmtree: False" in out


def test_file_io_in_sync_mode(tmp_path: Path) -> None:
    _same_as_native(tmp_path, "files_app.py", "--syscalls", "sync")


def test_threading_locks_conditions_queues_events_timers(tmp_path: Path) -> None:
    out = _same_as_native(tmp_path, "threads_app.py")
    assert "order [4, 3, 2, 1, 0]" in out


def test_threads_run_concurrently_while_one_waits_for_the_host(tmp_path: Path) -> None:
    # 20 threads each sleep 0.2 s: as lthreads they overlap, so the whole run takes ~0.2 s.
    app = write_app(
        tmp_path,
        """
        import threading, time
        t0 = time.monotonic()
        ts = [threading.Thread(target=time.sleep, args=(0.2,)) for _ in range(20)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(round(time.monotonic() - t0, 1) < 1.0)
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.stdout == "True\n", r.stderr


def test_concurrent_writers_to_one_buffered_file(tmp_path: Path) -> None:
    # Two lthreads writing to the same buffered file must not trip the C buffer's
    # OS-thread reentrancy check while one of them waits for the host.
    app = write_app(
        tmp_path,
        """
        import threading, sys
        f = open("shared.log", "w", buffering=64)
        def w(tag):
            for i in range(200):
                f.write(f"{tag}{i:04d}\\n")
                print(tag, i, file=sys.stderr)
        ts = [threading.Thread(target=w, args=(t,)) for t in "ab"]
        [t.start() for t in ts]; [t.join() for t in ts]
        f.close()
        lines = open("shared.log").read().split()
        print(len(lines), len(set(lines)))
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "400 400\n"


def test_bad_fd_is_ebadf_without_asking_the_host(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import os
        for fn in (lambda: os.read(4242, 1), lambda: os.write(4242, b"x"), lambda: os.fstat(4242), lambda: os.close(4242)):
            try:
                fn()
            except OSError as e:
                print(e.errno)
        """,
    )
    r = run_enclave("--stats", app, cwd=tmp_path)
    assert r.stdout == "9\n9\n9\n9\n", r.stderr


def test_more_lthreads_than_slots_wait_for_a_free_slot(tmp_path: Path) -> None:
    # 8 lthreads share 2 slots: each call waits for a free slot and is woken when one returns.
    app = write_app(
        tmp_path,
        """
        import os, threading
        def work(i):
            for j in range(30):
                with open(f"f{i}.txt", "a") as f:
                    f.write(f"{j}\\n")
        ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(sorted(len(open(f"f{i}.txt").read().split()) for i in range(8)))
        """,
    )
    for extra in (["--slots", "2"], ["--slots", "2", "--sthreads", "1"], ["--sthreads", "1", "--syscalls", "sync"]):
        r = run_enclave(*extra, app, cwd=tmp_path)
        assert r.returncode == 0, (extra, r.stderr)
        assert r.stdout == "[30, 30, 30, 30, 30, 30, 30, 30]\n", extra
        for f in tmp_path.glob("f*.txt"):
            f.unlink()
