"""Signals: ^C stops servers (async and sync mode, asyncio under load); handlers run safely."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from conftest import PYSCONE, free_port, wait_port, write_app

AIO_SERVER = """
import asyncio, sys
async def handle(r, w):
    await r.readline()
    w.write(b"ok\\n")
    await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with srv:
        await srv.serve_forever()
try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("stopped by ^C", flush=True)
"""


def _hammer(port: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                c.sendall(b"x\n")
                c.recv(10)
        except OSError:
            pass


def test_sigint_stops_an_asyncio_server_under_load(tmp_path: Path) -> None:
    # Regression: a signal handler's host call, made while replies for the main lthread
    # were in the same batch, dropped them and hung the loop (about one run in two).
    app = write_app(tmp_path, AIO_SERVER)
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [*PYSCONE, "run", str(app), str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        wait_port(port, proc=proc)
        stop = threading.Event()
        clients = [threading.Thread(target=_hammer, args=(port, stop)) for _ in range(4)]
        for c in clients:
            c.start()
        time.sleep(0.7)
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=15)
        finally:
            stop.set()
            for c in clients:
                c.join()
            proc.kill()
        assert b"stopped by ^C" in out, err.decode()[-2000:]


def test_sigint_stops_a_server_in_sync_mode(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*PYSCONE, "run", "--syscalls", "sync", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_port(port, proc=proc)
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert b"Keyboard interrupt received" in out
    assert proc.returncode == 0


def test_app_signal_handlers_and_asyncio_add_signal_handler(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import asyncio, signal, time, os
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append("sigterm handler"))
        print("getsignal is ours", signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, flush=True)
        async def main():
            loop = asyncio.get_running_loop()
            done = asyncio.Event()
            loop.add_signal_handler(signal.SIGHUP, lambda: (got.append("asyncio SIGHUP"), done.set()))
            print("ready", flush=True)
            await asyncio.wait_for(done.wait(), 10)
        asyncio.run(main())
        deadline = time.monotonic() + 10
        while "sigterm handler" not in got and time.monotonic() < deadline:
            time.sleep(0.05)
        print(sorted(got), flush=True)
        """,
    )
    proc = subprocess.Popen([*PYSCONE, "run", str(app)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"getsignal is ours True\n"
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert out == b"['asyncio SIGHUP', 'sigterm handler']\n", err.decode()
    assert proc.returncode == 0
