"""Sockets: real servers in the enclave, real clients outside (curl, plain TCP), and back."""

from __future__ import annotations

import json
import resource
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Server, free_port, run_enclave, write_app

ECHO_SERVER = """
import socketserver, sys
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())
class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 2048
Server(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"""


def test_http_server_module_serves_curl(tmp_path: Path, server: list[Server]) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: run scripts/setup.sh")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("<h1>inside the enclave</h1>\n")
    port = free_port()
    srv = Server(["-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", "www"], tmp_path, port)
    server.append(srv)
    url = f"http://127.0.0.1:{port}"
    ok = subprocess.run(["curl", "-sS", f"{url}/index.html"], capture_output=True, text=True, timeout=20)
    assert ok.stdout == "<h1>inside the enclave</h1>\n", ok.stderr
    missing = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{url}/nope"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert missing.stdout == "404"
    # Several clients at once.
    procs = [subprocess.Popen(["curl", "-s", f"{url}/index.html"], stdout=subprocess.PIPE) for _ in range(8)]
    assert all(p.communicate(timeout=20)[0] == b"<h1>inside the enclave</h1>\n" for p in procs)
    code, out, err = srv.stop()
    assert 'GET /index.html HTTP/1.1" 200' in err
    assert "Keyboard interrupt received, exiting." in out
    assert code == 0


def test_threading_tcp_server_with_plain_tcp_clients(tmp_path: Path, server: list[Server]) -> None:
    app = write_app(tmp_path, ECHO_SERVER)
    port = free_port()
    server.append(Server([str(app), str(port)], tmp_path, port))
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    for i, c in enumerate(clients):
        c.sendall(f"hello {i}\n".encode())
    for i, c in enumerate(clients):
        f = c.makefile("rb")
        assert f.readline() == f"HELLO {i}\n".encode()
        c.close()


def test_thousand_blocked_connections_on_four_sthreads(tmp_path: Path, server: list[Server]) -> None:
    n = 1000
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * n + 100:
        pytest.skip(f"needs {2 * n + 100} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app = write_app(tmp_path, ECHO_SERVER)
    port = free_port()
    srv = Server(["--sthreads", "4", "--stats", str(app), str(port)], tmp_path, port)
    server.append(srv)
    clients = []
    try:
        for _ in range(n):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        # Every connection now has an lthread blocked in recv inside the enclave.
        time.sleep(0.5)
        threads = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines()
                if line.startswith("Threads:")
            )
        )
        assert threads == 1 + 4, f"launcher has {threads} threads: main + 4 S-threads expected"
        for i, c in enumerate(clients):
            c.sendall(f"c{i}\n".encode())
        for i, c in enumerate(clients):
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = c.recv(64)
                assert chunk, f"connection {i} closed"
                buf += chunk
            assert buf == f"C{i}\n".encode()
    finally:
        for c in clients:
            c.close()
    _, _, err = srv.stop()
    host = next(line for line in err.splitlines() if line.startswith("pyscone: host:"))
    parked = int(host.split(",")[1].split()[0])
    assert parked >= n, host


def test_asyncio_server_and_client_inside_the_enclave(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import asyncio, socket
        async def handle(r, w):
            while data := await r.read(4096):
                w.write(data)
                await w.drain()
            w.close()
        async def main():
            srv = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            async def client(i):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(f"ping {i}\\n".encode())
                await w.drain()
                line = await r.readline()
                w.close()
                await w.wait_closed()
                return line
            out = await asyncio.gather(*(client(i) for i in range(100)))
            print(len(out), out[0], out[-1])
            try:
                await asyncio.wait_for(asyncio.sleep(10), 0.05)
            except asyncio.TimeoutError:
                print("wait_for timed out")
            infos = await asyncio.get_running_loop().getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
            print("resolved", "127.0.0.1" in {i[4][0] for i in infos})
            srv.close()
            await srv.wait_closed()
        asyncio.run(main())
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "100 b'ping 0\\n' b'ping 99\\n'\nwait_for timed out\nresolved True\n"


def test_asyncio_server_with_outside_clients(tmp_path: Path, server: list[Server]) -> None:
    app = write_app(
        tmp_path,
        """
        import asyncio, sys
        async def handle(r, w):
            data = await r.readline()
            w.write(b"got " + data)
            await w.drain()
            w.close()
        async def main():
            srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
            async with srv:
                await srv.serve_forever()
        asyncio.run(main())
        """,
    )
    port = free_port()
    server.append(Server([str(app), str(port)], tmp_path, port))
    for i in range(10):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(f"{i}\n".encode())
            assert c.makefile("rb").read() == f"got {i}\n".encode()


def test_socket_timeouts_select_and_client_connections(tmp_path: Path) -> None:
    app = write_app(
        tmp_path,
        """
        import json, select, selectors, socket, time
        out = {}
        lsock = socket.create_server(("127.0.0.1", 0))
        port = lsock.getsockname()[1]
        lsock.settimeout(0.2)
        t0 = time.monotonic()
        try:
            lsock.accept()
        except TimeoutError as e:
            out["accept_timeout"] = [str(e), 0.15 <= time.monotonic() - t0 < 2.0]
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        s, addr = lsock.accept()
        out["peer_is_client"] = addr == c.getsockname()
        out["accepted_blocking"] = s.gettimeout()
        s.settimeout(0.1)
        try:
            s.recv(10)
        except TimeoutError:
            out["recv_timeout"] = True
        out["select_idle"] = select.select([s], [], [], 0.05)[0] == []
        c.sendall(b"ping")
        out["select_ready"] = select.select([s], [], [], 5)[0] == [s]
        out["data"] = s.recv(10).decode()
        s.setblocking(False)
        try:
            s.recv(10)
        except BlockingIOError:
            out["nonblocking_eagain"] = True
        sel = selectors.DefaultSelector()
        sel.register(s, selectors.EVENT_READ, "server-side")
        c.sendall(b"x")
        out["selector"] = [k.data for k, _ in sel.select(5)]
        c.close()
        s.setblocking(True)
        out["eof_after_close"] = s.recv(10) + s.recv(10) == b"x"
        a, b = socket.socketpair()
        a.sendall(b"pair")
        out["socketpair"] = b.recv(4).decode()
        try:
            socket.create_connection(("127.0.0.1", 1), timeout=2)
        except ConnectionRefusedError:
            out["refused"] = True
        print(json.dumps(out, sort_keys=True))
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "accept_timeout": ["timed out", True],
        "peer_is_client": True,
        "accepted_blocking": None,
        "recv_timeout": True,
        "select_idle": True,
        "select_ready": True,
        "data": "ping",
        "nonblocking_eagain": True,
        "selector": ["server-side"],
        "eof_after_close": True,
        "socketpair": "pair",
        "refused": True,
    }


def test_closing_a_socket_fails_the_calls_parked_on_it(tmp_path: Path) -> None:
    # An lthread blocked in recv must not stay parked on the host for a closed socket:
    # the host fails the parked call with EBADF when the fd is closed.
    app = write_app(
        tmp_path,
        """
        import socket, threading, time
        a, b = socket.socketpair()
        out = []
        def reader():
            try:
                a.recv(10)
                out.append("returned")
            except OSError as e:
                out.append(f"errno {e.errno}")
        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.2)
        a.close()
        t.join(5)
        print(out, t.is_alive())
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "['errno 9'] False\n"


BURST = """
import socket, socketserver, threading
class H(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.recv(100)
        self.request.sendall(b"ok")
srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), H)  # the default backlog: 5
threading.Thread(target=srv.serve_forever, daemon=True).start()
ok, bad = [], []
def client():
    try:
        with socket.create_connection(srv.server_address, timeout=20) as c:
            c.sendall(b"hi")
            ok.append(c.recv(10))
    except OSError as e:
        bad.append(repr(e))
ts = [threading.Thread(target=client) for _ in range(200)]
[t.start() for t in ts]; [t.join() for t in ts]
print(len(ok), bad[:3])
srv.shutdown()
"""


def test_a_burst_of_clients_on_a_default_backlog_is_served(tmp_path: Path) -> None:
    # 200 client lthreads connect at once to a ThreadingTCPServer in the same enclave: with the
    # app's backlog of 5 the kernel dropped handshakes and most clients timed out after 20 s.
    r = run_enclave(write_app(tmp_path, BURST), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "200 []\n", r.stdout
