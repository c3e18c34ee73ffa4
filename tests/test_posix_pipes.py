"""Pipes and dups in enclave memory, waited on with sockets: real enclaves, real apps, real clients."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import Server, free_port, run_enclave, run_native, write_app

PIPES_APP = """
    import asyncio, errno, os, select, selectors, socket, stat, threading, time
    r, w = os.pipe()
    print("flags", os.get_inheritable(r), stat.S_ISFIFO(os.fstat(r).st_mode), os.isatty(r))
    def writer():
        time.sleep(0.1)
        os.write(w, b"hello")
        time.sleep(0.1)
        os.close(w)
    threading.Thread(target=writer).start()
    print("read parks until written", os.read(r, 100))
    print("eof when the write end closes", os.read(r, 100))
    os.close(r)
    r, w = os.pipe()
    os.close(r)
    try:
        os.write(w, b"x")
    except BrokenPipeError as e:
        print("epipe", e.errno)
    os.close(w)
    srv = socket.create_server(("127.0.0.1", 0))
    r, w = os.pipe()
    def poke():
        time.sleep(0.2)
        os.write(w, b"!")
    threading.Thread(target=poke).start()
    t0 = time.monotonic()
    rl, _, _ = select.select([srv, r], [], [], 5)
    print("select on a socket and a pipe wakes for the pipe", rl == [r], 0.15 < time.monotonic() - t0 < 2)
    print(os.read(r, 10))
    c = socket.create_connection(srv.getsockname())
    rl, _, _ = select.select([srv, r], [], [], 5)
    print("and for the socket", rl == [srv])
    p = select.poll()
    p.register(r, select.POLLIN)
    p.register(w, select.POLLOUT)
    print("poll", p.poll(0) == [(w, select.POLLOUT)])
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ)
    print("timeout", sel.select(0.1))
    os.write(w, b"z")
    print("selector", [k.fd == r for k, ev in sel.select(1)])
    os.read(r, 1)
    os.set_blocking(r, False)
    try:
        os.read(r, 1)
    except BlockingIOError as e:
        print("eagain", e.errno)
    big = os.pipe2(os.O_NONBLOCK)
    n = 0
    try:
        while True:
            n += os.write(big[1], b"x" * 4096)
    except BlockingIOError:
        print("a full pipe holds", n)
    d = os.dup(w)
    os.write(d, b"dup")
    os.close(w)
    print("dup", os.read(r, 10))
    e = os.dup2(d, big[0], inheritable=False)
    print("dup2", e == big[0], os.get_inheritable(e))
    os.close(d)
    os.close(e)
    print("eof after the last dup closes", os.read(r, 10))
    async def main():
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        fut = loop.create_future()
        loop.add_reader(r, lambda: fut.set_result(os.read(r, 10)))
        loop.call_later(0.1, os.write, w, b"async")
        print("asyncio", await asyncio.wait_for(fut, 5))
        loop.remove_reader(r)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb"))
        with os.fdopen(w, "wb", buffering=0) as f:
            f.write(b"line\\n")
        print("stream", await reader.readline(), await reader.read())
    asyncio.run(main())
    import multiprocessing
    mr, mw = multiprocessing.Pipe(duplex=False)  # os.pipe under multiprocessing's Connection
    threading.Thread(target=lambda: mw.send({"a": [1, 2, 3]})).start()
    print("multiprocessing", mr.poll(5), mr.recv())
"""


def test_pipes_behave_as_natively_and_wake_selects_on_sockets(tmp_path: Path) -> None:
    app = write_app(tmp_path, PIPES_APP)
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout
    assert "and for the socket True" in r.stdout and "a full pipe holds 65536" in r.stdout


WAITRESS_APP = """
    import sys
    from flask import Flask
    from waitress import serve
    app = Flask(__name__)
    @app.route("/")
    def hello():
        return "hello from flask on waitress\\n"
    @app.route("/big")
    def big():
        return "x" * 200000
    serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=4)
"""


def test_flask_on_waitress_serves_curl(tmp_path: Path, server: list[Server]) -> None:
    """waitress wakes its select loop through a trigger pipe each time a worker has a response."""
    pytest.importorskip("flask")
    pytest.importorskip("waitress")
    port = free_port()
    server.append(Server([str(write_app(tmp_path, WAITRESS_APP)), str(port)], tmp_path, port))
    url = f"http://127.0.0.1:{port}"
    for _ in range(3):
        out = subprocess.run(["curl", "-s", "-m", "10", url + "/"], capture_output=True, text=True, check=True)
        assert out.stdout == "hello from flask on waitress\n"
    big = subprocess.run(["curl", "-s", "-m", "10", url + "/big"], capture_output=True, check=True)
    assert big.stdout == b"x" * 200000
    # Several clients at once, each a separate keep-alive connection.
    many = subprocess.run(
        ["curl", "-s", "-m", "20", "--parallel", "--parallel-max", "8", *[url + "/"] * 16],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert many.stdout == "hello from flask on waitress\n" * 16
    _code, _out, err = server[0].stop()
    assert "Traceback" not in err, err


INTERRUPT_APP = """
    import os, sys, threading, time
    r, w = os.pipe()
    try:
        print("ready", flush=True)
        os.read(r, 10)  # nobody writes: only ^C ends this wait
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    ev = threading.Event()
    lock = threading.Lock()
    lock.acquire()
    def later():
        time.sleep(0.1)
        os.write(w, b"later")
        time.sleep(0.3)
        lock.release()
    threading.Thread(target=later).start()
    t0 = time.monotonic()
    got = lock.acquire(timeout=5)
    print("lock", got, time.monotonic() - t0 > 0.3, flush=True)
    print("then", os.read(r, 10), flush=True)
"""


def test_ctrl_c_interrupts_a_blocked_pipe_read(tmp_path: Path) -> None:
    import signal

    from conftest import PYSCONE

    app = write_app(tmp_path, INTERRUPT_APP)
    proc = subprocess.Popen([*PYSCONE, "run", str(app)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(0.3)  # into the read (a ^C that cuts the console write short reprints the line)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out.decode().splitlines() == ["interrupted", "lock True True", "then b'later'"]
