"""The host against the network shield: a relay that flips, cuts and replays TLS records.

The host carries every byte between the enclave and its peers.  Whatever it does to them, the
app in the enclave sees either the peer's authentic bytes or an error on that connection --
never bytes the peer did not send -- and the enclave goes on serving the next connection.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import PYSCONE, free_port, wait_port
from netshield_pki import make_pki

ECHO = """
import socketserver, sys
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        try:
            for line in self.rfile:
                print("got", line.decode(errors="replace").strip(), flush=True)
                self.wfile.write(b"echo:" + line)
        except OSError as e:
            print("error", type(e).__name__, e, flush=True)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"""


def _pki(d: Path) -> None:
    """ca.pem, and server.pem/server.key for localhost, in ``d`` (tests/netshield_pki.py)."""
    make_pki(d)


class Relay:
    """A TCP relay run by the host; ``tamper(direction, index, data)`` rewrites each chunk it
    carries (direction "up": client to enclave)."""

    def __init__(self, target: int, tamper: Callable[[str, int, bytes], bytes]) -> None:
        self.target = target
        self.tamper = tamper
        self.armed = threading.Event()  # set once the handshake is over: tamper with data only
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for src, dst, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        index = 0
        try:
            while data := src.recv(65536):
                if self.armed.is_set():
                    data = self.tamper(direction, index, data)
                    index += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def enclave(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int, subprocess.Popen[str]]]:
    d = tmp_path_factory.mktemp("net-hostile")
    _pki(d)
    port = free_port()
    (d / "echo.py").write_text(ECHO)
    (d / "net.yaml").write_text(f"listen:\n  - port: {port}\n    cert: server.pem\n    key: server.key\n")
    proc = subprocess.Popen(
        [*PYSCONE, "run", "--net-shield", "net.yaml", "echo.py", str(port)],
        cwd=d,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_port(port, proc=proc)
    yield d, port, proc
    proc.terminate()
    proc.communicate(timeout=30)


def _talk(d: Path, port: int, lines: list[bytes]) -> bytes:
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    got = b""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        for line in lines:
            s.sendall(line)
        try:
            while len(got) < sum(len(b"echo:") + len(x) for x in lines):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (OSError, ssl.SSLError):
            pass
    return got


def _untouched(direction: str, index: int, data: bytes) -> bytes:
    return data


def _flip_app_data(direction: str, index: int, data: bytes) -> bytes:
    # Every record the client sends after the handshake: a byte of its body flipped.
    if direction == "up" and len(data) > 10:
        return data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:]
    return data


def _readline(proc: subprocess.Popen[str], want: str) -> list[str]:
    seen = []
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, f"the enclave stopped; saw {seen}"
        seen.append(line.strip())
        if line.startswith(want):
            return seen


def test_flipped_records_never_reach_the_app_and_the_next_connection_is_served(
    enclave: tuple[Path, int, subprocess.Popen[str]],
) -> None:
    d, port, proc = enclave
    relay = Relay(port, _flip_app_data)
    try:
        import time

        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        with (
            socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            time.sleep(0.3)  # the client's Finished has gone through
            relay.armed.set()
            s.sendall(b"SECRET-TAMPERED-LINE\n")
            with pytest.raises((OSError, ssl.SSLError)):
                if not s.recv(100):
                    raise ConnectionResetError("closed")
        seen = _readline(proc, "error")
        assert not any("SECRET" in line for line in seen), seen
        assert "ConnectionResetError" in seen[-1] and "bad record mac" in seen[-1], seen
    finally:
        relay.close()
    assert _talk(d, port, [b"after\n"]) == b"echo:after\n"
    assert _readline(proc, "got after")


def test_a_replayed_record_is_refused(enclave: tuple[Path, int, subprocess.Popen[str]]) -> None:
    d, port, proc = enclave
    sent: list[bytes] = []

    def replay(direction: str, index: int, data: bytes) -> bytes:
        if direction == "up":
            sent.append(data)
            if len(sent) == 2:
                return sent[0] + data  # the first data record again, before the second
        return data

    relay = Relay(port, replay)
    try:
        import time

        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        with (
            socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            time.sleep(0.3)
            relay.armed.set()
            s.sendall(b"once-A\n")
            assert s.recv(100) == b"echo:once-A\n"
            s.sendall(b"once-B\n")
            with pytest.raises((OSError, ssl.SSLError)):
                if not s.recv(100):
                    raise ConnectionResetError("closed")
        seen = _readline(proc, "error")
        assert [x for x in seen if x.startswith("got")] == ["got once-A"], seen
    finally:
        relay.close()


def test_the_host_relays_only_ciphertext(enclave: tuple[Path, int, subprocess.Popen[str]]) -> None:
    d, port, _ = enclave
    carried: list[bytes] = []

    def record(direction: str, index: int, data: bytes) -> bytes:
        carried.append(data)
        return data

    relay = Relay(port, record)
    relay.armed.set()
    try:
        assert _talk(d, relay.port, [b"PLAINTEXT-MARKER-91\n"]) == b"echo:PLAINTEXT-MARKER-91\n"
    finally:
        relay.close()
    assert carried and b"PLAINTEXT-MARKER-91" not in b"".join(carried)
    assert sys.platform.startswith("linux")
