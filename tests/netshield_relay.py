"""Host-side machinery for the network shield's tests: what the untrusted host sees and runs.

- ``Relay``: a recording TCP relay (the host's view of the wire). It sits between a real client
  and the enclave, or between the enclave and a real server, and keeps every byte of both
  directions per connection, so a test can say "the host never saw this plaintext".
- ``NativeServer``: a line server run by the test itself, with Python's ``ssl`` (optionally
  requiring a client certificate) or plaintext, on TCP or a Unix socket; it records what each
  client sent and who it was.
- ``Enclave``: a ``pyscone run`` server process. Unlike conftest's ``Server`` it waits for the
  port in the kernel's socket table instead of connecting to it: a probe connection would be a
  failed TLS handshake of its own and put extra lines in exactly the log the tests read.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from conftest import PYSCONE

Address = tuple[str, int] | str  # (host, port) on TCP, or a Unix socket path


def _connect(target: Address, timeout: float = 10.0) -> socket.socket:
    if isinstance(target, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(target)
        return s
    return socket.create_connection(target, timeout=timeout)


@dataclass
class Recorded:
    """One relayed connection: what the client sent (up) and what the far side sent (down)."""

    up: bytearray = field(default_factory=bytearray)
    down: bytearray = field(default_factory=bytearray)


class Relay:
    """A recording TCP relay on 127.0.0.1 to ``target``; ``port`` is where clients connect."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.connections: list[Recorded] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            rec = Recorded()
            with self._lock:
                self.connections.append(rec)
                self._sockets.append(client)
            try:
                far = _connect(self.target)
                far.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.append(far)
            threading.Thread(target=self._pump, args=(client, far, rec.up), daemon=True).start()
            threading.Thread(target=self._pump, args=(far, client, rec.down), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, into: bytearray) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    into += data
                dst.sendall(data)
        except OSError:
            pass
        # Pass the end on (a half-close stays a half-close: TLS close_notify and EOF both matter).
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def up(self) -> bytes:
        """Everything every client sent through the relay."""
        with self._lock:
            return b"".join(bytes(c.up) for c in self.connections)

    def down(self) -> bytes:
        """Everything the far side sent back."""
        with self._lock:
            return b"".join(bytes(c.down) for c in self.connections)

    def assert_hidden(self, *secrets: bytes) -> None:
        """The host saw bytes in both directions, they were TLS records, and no secret among them."""
        with self._lock:
            conns = [(bytes(c.up), bytes(c.down)) for c in self.connections]
        assert conns, "nothing went through the relay"
        for up, down in conns:
            # A TLS record: type 22 (handshake), then major version 3 (TLS 1.x).
            assert up[:2] == b"\x16\x03", f"the client's first bytes are not a TLS handshake record: {up[:40]!r}"
            assert down[:2] == b"\x16\x03", f"the server's first bytes are not a TLS handshake record: {down[:40]!r}"
        for secret in secrets:
            for direction, data in (("client -> server", self.up()), ("server -> client", self.down())):
                assert secret not in data, f"the host saw {secret!r} in cleartext ({direction})"

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()


@dataclass
class Seen:
    """What a NativeServer learned from one client."""

    line: bytes = b""
    peer_cn: str | None = None
    sni: str | None = None  # the server name the client sent
    error: str | None = None


class NativeServer:
    """A line server of the test's own: it answers each line with ``reply`` + the line.

    Args:
        where: ("127.0.0.1", 0) for a fresh TCP port, or a Unix socket path.
        cert, key: its TLS identity; None for plaintext.
        client_ca: if given, a client certificate signed by it is required.
        until_eof: read everything up to the client's end (a TLS close_notify, or EOF) before
            answering, instead of one line.
    """

    def __init__(
        self,
        where: Address = ("127.0.0.1", 0),
        cert: Path | None = None,
        key: Path | None = None,
        client_ca: Path | None = None,
        reply: bytes = b"reply ",
        until_eof: bool = False,
    ) -> None:
        self.reply = reply
        self.until_eof = until_eof
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._ctx: ssl.SSLContext | None = None
        if cert is not None:
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ctx.load_cert_chain(cert, key)
            if client_ca is not None:
                self._ctx.verify_mode = ssl.CERT_REQUIRED
                self._ctx.load_verify_locations(client_ca)
            self._ctx.sni_callback = _note_sni
        if isinstance(where, str):
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(where)
            self._listener.listen(128)
            self.address: Address = where
        else:
            self._listener = socket.create_server(where, backlog=128)
            self.address = ("127.0.0.1", int(self._listener.getsockname()[1]))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        assert isinstance(self.address, tuple)
        return self.address[1]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        seen = Seen()
        with self._lock:
            self.seen.append(seen)
        conn.settimeout(20)
        try:
            if self._ctx is not None:
                conn = self._ctx.wrap_socket(conn, server_side=True)
                seen.sni = getattr(conn, "sni", None)
                cert = conn.getpeercert()
                if cert:
                    seen.peer_cn = dict(x[0] for x in cert["subject"])["commonName"]
            with conn.makefile("rwb") as f:
                seen.line = f.read() if self.until_eof else f.readline()
                if seen.line:
                    f.write(self.reply + seen.line)
                    f.flush()
        except (OSError, ValueError) as e:
            seen.error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()

    def lines(self) -> list[bytes]:
        with self._lock:
            return [s.line for s in self.seen if s.line]

    def close(self) -> None:
        self._stop.set()
        self._listener.close()


def _note_sni(sock: ssl.SSLSocket | ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
    sock.sni = name  # type: ignore[union-attr]


def is_listening(port: int | None, path: str | None) -> bool:
    """Is a socket listening on this TCP port / Unix path? Read from /proc, without connecting."""
    if port is not None:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                rows = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                cols = row.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    return True
        return False
    for row in Path("/proc/net/unix").read_text().splitlines()[1:]:
        cols = row.split()
        # Flags 00010000 is __SO_ACCEPTCON: the socket listens.
        if len(cols) >= 8 and cols[-1] == path and cols[3] == "00010000":
            return True
    return False


class Enclave:
    """``pyscone run ARGS`` as a server: started, waited for (port or Unix path), stopped with SIGINT."""

    def __init__(self, args: list[str], cwd: Path, port: int | None = None, path: str | None = None) -> None:
        self.port = port
        self._result: tuple[int, str, str] | None = None
        env = dict(os.environ)
        env.pop("PYSCONE_TEST_HOSTILE", None)
        self.proc = subprocess.Popen(
            [*PYSCONE, "run", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        # Read both pipes as the enclave writes them, so that a test can wait for a line.
        self._out, self._err = bytearray(), bytearray()
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for t in self._readers:
            t.start()
        deadline = time.monotonic() + 20
        while not is_listening(port, path):
            if self.proc.poll() is not None:
                code, _, err = self.stop()
                raise AssertionError(f"the enclave exited with {code} before listening: {err[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the enclave is not listening on {port or path} after 20 s")
            time.sleep(0.05)

    def _read(self, pipe: IO[bytes] | None, into: bytearray) -> None:
        assert pipe is not None
        while data := pipe.read1(65536):  # type: ignore[attr-defined]
            with self._changed:
                into += data
                self._changed.notify_all()

    def wait_stdout(self, text: str, count: int = 1, timeout: float = 20.0) -> str:
        """Wait until the app has printed ``text`` ``count`` times (its output is its own pace:
        a handler prints after the peer's end reached it); returns stdout so far."""
        with self._changed:
            self._changed.wait_for(lambda: self._out.decode(errors="replace").count(text) >= count, timeout)
            return self._out.decode(errors="replace")

    def stop(self) -> tuple[int, str, str]:
        """Stop it (if it still runs) and return (exit code, stdout, stderr); again: the same."""
        if self._result is not None:
            return self._result
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(10)
        out, err = self._out.decode(errors="replace"), self._err.decode(errors="replace")
        self._result = (self.proc.returncode, out, err)
        return self._result
