"""C code's own sockets under the network shield: the libc layer's calls share its engine.

The C client of ``test_clib_sockets`` (blocking and non-blocking ``connect``, ``poll``,
``select``, ``send``/``recv``/``read``/``write`` from C, and a Python socket made on its fd)
talks to a native echo server that speaks only TLS.  Natively, against a plain echo server, it
prints what it saw; in the enclave, through a ``connect`` rule, it must print the same: the
shield is beneath libc's calls too, and the host relays ciphertext.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_enclave, run_native
from test_clib_sockets import _client_app, client_lib, echo_port  # noqa: F401 - fixtures
from test_net_shield_hostile import _pki


@pytest.fixture
def tls_echo(tmp_path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """A native echo server that speaks TLS only, and what came in on the wire."""
    _pki(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    srv = socket.create_server(("127.0.0.1", 0))
    wire: list[bytes] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(inc, out, server_side=True)
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                wire.append(data)
                inc.write(data)
                try:
                    tls.do_handshake()
                    while plain := tls.read(65536):
                        tls.write(plain)
                except ssl.SSLWantReadError:
                    pass
                conn.sendall(out.read())

    def loop() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1], wire
    stop.set()
    t.join()
    srv.close()


def test_a_c_client_reaches_a_tls_only_server_through_a_connect_rule(
    tmp_path: Path,
    client_lib: Path,  # noqa: F811
    echo_port: int,  # noqa: F811
    tls_echo: tuple[int, list[bytes]],
) -> None:
    app = _client_app(tmp_path, client_lib)
    native = run_native(app, str(echo_port), cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    port, wire = tls_echo
    (tmp_path / "net.yaml").write_text(
        f"connect:\n  - to: 127.0.0.1:{port}\n    ca: ca.pem\n    server_name: localhost\n"
    )
    r = run_enclave("--net-shield", "net.yaml", "--preload", "cclient", app, str(port), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout.replace(f":{echo_port} ", f":{port} "), (r.stdout, native.stdout)
    carried = b"".join(wire)
    assert carried.startswith(b"\x16\x03") and b"ping" not in carried and b"from python" not in carried
