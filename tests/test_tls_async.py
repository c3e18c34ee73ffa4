"""TLS in the enclave beyond one request: httpx for plain HTTP, asyncio's TLS both ways, uvicorn
over HTTPS, and the blocking SSLSocket's details (timeouts, unwrap, a server's accept)."""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server, free_port, run_enclave, write_app
from test_tls_apps import Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def native_http() -> Iterator[int]:
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"plain http"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield int(srv.server_address[1])
    srv.shutdown()
    srv.server_close()


HTTPX_PLAIN = """
    import sys, httpx
    with httpx.Client(timeout=10) as client:  # builds its default SSL context eagerly
        print(client.get(f"http://127.0.0.1:{sys.argv[1]}/").text)
"""


def test_an_httpx_client_starts_and_does_plain_http(tmp_path: Path, native_http: int) -> None:
    pytest.importorskip("httpx")
    app = write_app(tmp_path, HTTPX_PLAIN)
    r = run_enclave(app, str(native_http), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "plain http\n"


ASYNCIO_TLS = """
    import asyncio, ssl, sys
    cert, key, ca = sys.argv[1:4]
    async def handle(reader, writer):
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        writer.close()
    async def main():
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(cert, key)
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        cctx = ssl.create_default_context(cafile=ca)
        for i in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=cctx, server_hostname="localhost")
            writer.write(b"hello %d\\n" % i)
            await writer.drain()
            print((await reader.readline()).decode().strip(), writer.get_extra_info("ssl_object").version())
            writer.close()
            await writer.wait_closed()
        try:
            await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context(), server_hostname="localhost")
        except ssl.SSLCertVerificationError as e:
            print("refused", e.verify_message)
        server.close()
        await server.wait_closed()
    asyncio.run(main())
"""


def test_asyncio_tls_client_and_server(tmp_path: Path, pki: Pki) -> None:
    app = write_app(tmp_path, ASYNCIO_TLS)
    r = run_enclave(app, pki.cert, pki.key, pki.ca, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "HELLO 0 TLSv1.3",
        "HELLO 1 TLSv1.3",
        "HELLO 2 TLSv1.3",
        "refused unable to get local issuer certificate",
    ]


SSLSOCKET = """
    import socket, ssl, sys, threading, time
    cert, key, ca = sys.argv[1:4]
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    listener = sctx.wrap_socket(socket.create_server(("127.0.0.1", 0)), server_side=True)
    port = listener.getsockname()[1]
    def serve():
        conn, _ = listener.accept()  # the handshake runs here, on the accepted enclave socket
        with conn:
            f = conn.makefile("rwb")
            f.write(f.readline()[::-1].strip() + b"\\n")
            f.flush()
            time.sleep(1.0)  # the client's read times out meanwhile
            f.write(b"late\\n")
            f.flush()
            assert conn.recv(100) == b"bye"
            conn.unwrap()  # answers the client's close_notify: plain TCP again
            conn.sendall(b"plain")
    t = threading.Thread(target=serve)
    t.start()
    cctx = ssl.create_default_context(cafile=ca)
    tls = cctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    print(tls.version(), tls.getpeercert()["subjectAltName"], isinstance(tls, ssl.SSLSocket))
    tls.sendall(b"olleh\\n")
    buf = bytearray(64)
    n = tls.recv_into(buf)
    print(bytes(buf[:n]).decode().strip())
    tls.settimeout(0.2)
    try:
        tls.recv(10)
    except TimeoutError:
        print("timed out")
    tls.settimeout(5)
    print(tls.recv(10).decode().strip())
    tls.sendall(b"bye")
    raw = tls.unwrap()
    data = b""
    while len(data) < 5:
        data += raw.recv(5 - len(data))
    print(data.decode())
    raw.close()
    t.join()
"""


def test_a_blocking_sslsocket_on_enclave_sockets(tmp_path: Path, pki: Pki) -> None:
    app = write_app(tmp_path, SSLSOCKET)
    r = run_enclave(app, pki.cert, pki.key, pki.ca, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "TLSv1.3 (('DNS', 'localhost'), ('IP Address', '127.0.0.1')) True",
        "hello",
        "timed out",
        "late",
        "plain",
    ]


ASGI_APP = """
    async def app(scope, receive, send):
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"uvicorn over TLS in the enclave"})
"""


def test_uvicorn_serves_https_from_the_enclave(tmp_path: Path, pki: Pki, server: list[Server]) -> None:
    pytest.importorskip("uvicorn")
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed: run scripts/setup.sh")
    write_app(tmp_path, ASGI_APP, name="asgi.py")
    port = free_port()
    args = ["-m", "uvicorn", "asgi:app", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--ssl-certfile", str(pki.cert), "--ssl-keyfile", str(pki.encrypted_key), "--ssl-keyfile-password"]
    server.append(Server([*args, "s3cret-pass"], tmp_path, port))
    url = f"https://localhost:{port}/"
    r = subprocess.run(
        ["curl", "-sS", "--cacert", str(pki.ca), "--resolve", f"localhost:{port}:127.0.0.1", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.stdout == "uvicorn over TLS in the enclave", r.stderr


class _RawTlsServer:
    """A native TLS server on an ``SSLObject``, so the test decides what one TCP write carries:
    several records at once, or a close_notify and plain bytes after it."""

    def __init__(self, pki: Pki, script: str) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki.cert, pki.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.script = script
        self.errors: list[BaseException] = []
        self.done = threading.Event()  # the connection stays open (no EOF to wake a select) until then
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(20)
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = self.ctx.wrap_bio(inc, out, server_side=True)
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    conn.sendall(out.read())
                    inc.write(conn.recv(65536))
            conn.sendall(out.read())
            if self.script == "records":  # three records in one TCP write
                for word in (b"one\n", b"two\n", b"three\n"):
                    obj.write(word)
                conn.sendall(out.read())
            else:  # close_notify and, in the same write, plain bytes after it
                try:
                    obj.unwrap()
                except ssl.SSLWantReadError:
                    pass
                conn.sendall(out.read() + b"plain after TLS")
            self.done.wait(60)
            conn.close()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)


RECORDS_CLIENT = """
    import select, socket, ssl, sys
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10), server_hostname="localhost")
    tls.setblocking(False)
    lines = []
    while len(lines) < 3:
        # What a select() loop does: wait for the fd, read what is there (one record a recv).
        if not select.select([tls], [], [], 3)[0] and not tls.pending():
            print("stuck: select says nothing is readable")
            break
        try:
            lines += tls.recv(100).decode().split()
        except ssl.SSLWantReadError:
            continue  # a record that is not data (a session ticket)
    print(*lines, sep="\\n")
"""


UNWRAP_CLIENT = """
    import socket, ssl, sys
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10), server_hostname="localhost")
    raw = tls.unwrap()
    print(raw.recv(100).decode())
"""


@pytest.mark.parametrize("script", ["records", "unwrap"])
def test_the_engine_takes_from_the_socket_only_whole_records(tmp_path: Path, pki: Pki, script: str) -> None:
    srv = _RawTlsServer(pki, script)
    app = write_app(tmp_path, RECORDS_CLIENT if script == "records" else UNWRAP_CLIENT)
    r = run_enclave(app, str(srv.port), pki.ca, cwd=tmp_path)
    srv.done.set()
    srv.thread.join(10)
    assert not srv.errors, srv.errors
    assert r.returncode == 0, r.stderr
    expected = ["one", "two", "three"] if script == "records" else ["plain after TLS"]
    assert r.stdout.splitlines() == expected


DUPLEX = """
    import socket, ssl, sys, threading
    cert, key, ca = sys.argv[1:4]
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    N, SIZE = 200, 20000
    def echo():
        conn = sctx.wrap_socket(listener.accept()[0], server_side=True)
        with conn, conn.makefile("rb") as r:
            for _ in range(N):
                conn.sendall(r.readline())
    threading.Thread(target=echo, daemon=True).start()
    tls = ssl.create_default_context(cafile=ca).wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    got = []
    def reader():  # one lthread reads while the main one writes, on the same SSLSocket
        with tls.makefile("rb") as r:
            for _ in range(N):
                got.append(r.readline())
    t = threading.Thread(target=reader)
    t.start()
    sent = [(b"%05d" % i) * (SIZE // 5) + b"\\n" for i in range(N)]
    for line in sent:
        tls.sendall(line)
    t.join(60)
    print(got == sent, len(got))
"""


def test_one_lthread_reads_while_another_writes(tmp_path: Path, pki: Pki) -> None:
    app = write_app(tmp_path, DUPLEX)
    r = run_enclave(app, pki.cert, pki.key, pki.ca, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "True 200\n"


TWO_WRITERS = """
    import socket, ssl, sys, threading
    cert, key, ca = sys.argv[1:4]
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    SIZE = 300_000
    got = bytearray()
    def sink():
        with sctx.wrap_socket(listener.accept()[0], server_side=True) as conn:
            while len(got) < 2 * SIZE:
                data = conn.recv(65536)
                if not data:
                    break
                got.extend(data)
    server = threading.Thread(target=sink)
    server.start()
    tls = ssl.create_default_context(cafile=ca).wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    # Two lthreads send at once on one SSLSocket: each sendall's records leave in one piece.
    writers = [threading.Thread(target=tls.sendall, args=(c * SIZE,)) for c in (b"a", b"b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    server.join(60)
    print(sorted((bytes(got[:SIZE]), bytes(got[SIZE:]))) == [b"a" * SIZE, b"b" * SIZE])
"""


def test_two_lthreads_sending_on_one_sslsocket_do_not_tear_records(tmp_path: Path, pki: Pki) -> None:
    app = write_app(tmp_path, TWO_WRITERS)
    r = run_enclave(app, pki.cert, pki.key, pki.ca, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "True\n"


TWO_READERS = """
    import socket, ssl, sys, threading
    cert, key, ca = sys.argv[1:4]
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    N = 300
    def source():
        with sctx.wrap_socket(listener.accept()[0], server_side=True) as conn:
            for i in range(N):
                conn.sendall(b"%06d" % i)
    threading.Thread(target=source, daemon=True).start()
    tls = ssl.create_default_context(cafile=ca).wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    got, errors = [], []
    def reader():  # two lthreads receive at once from one SSLSocket
        try:
            while data := tls.recv(6):
                got.append(data)
        except Exception as e:
            errors.append(repr(e))
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(20)
    # Each record is whole and in order (the lthreads may split them between them).
    print(errors or b"".join(got) == b"".join(b"%06d" % i for i in range(N)))
"""


def test_two_lthreads_receiving_on_one_sslsocket_keep_the_stream(tmp_path: Path, pki: Pki) -> None:
    app = write_app(tmp_path, TWO_READERS)
    r = run_enclave(app, pki.cert, pki.key, pki.ca, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "True\n"
