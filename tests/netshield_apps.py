"""What the network shield's tests share: the enclave apps (plain TCP, never ssl), the host's TLS
clients, and readers for the apps' output and the shield's log lines."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from netshield_pki import Identity, Pki
from netshield_relay import Address, Enclave, NativeServer, Relay


def fresh_secret(what: str) -> bytes:
    """A marker the host must never see: long and random, so no ciphertext contains it by chance."""
    return f"{what}-{uuid.uuid4().hex}".encode()


class Host:
    """What the untrusted host runs for one test; everything is stopped at the end."""

    def __init__(self) -> None:
        self._relays: list[Relay] = []
        self._natives: list[NativeServer] = []
        self._enclaves: list[Enclave] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    def relay(self, target: Address) -> Relay:
        self._relays.append(Relay(target))
        return self._relays[-1]

    def native(self, where: Address = ("127.0.0.1", 0), ident: Identity | None = None, **kw: Any) -> NativeServer:
        cert, key = (ident.cert, ident.key) if ident else (None, None)
        self._natives.append(NativeServer(where, cert, key, **kw))
        return self._natives[-1]

    def enclave(self, args: list[Any], cwd: Path, port: int | None = None, path: str | None = None) -> Enclave:
        self._enclaves.append(Enclave([str(a) for a in args], cwd, port, path))
        return self._enclaves[-1]

    def process(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for e in self._enclaves:
            e.stop()
        for p in self._procs:
            p.terminate()
            p.wait(10)
        for r in self._relays:
            r.close()
        for n in self._natives:
            n.close()


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run scripts/setup.sh")


def tls_ctx(pki: Pki, ident: Identity | None = None, ca: Path | None = None) -> ssl.SSLContext:
    """A host-side TLS client context trusting ``ca`` (the good CA), optionally with an identity."""
    ctx = ssl.create_default_context(cafile=ca or pki.ca)
    if ident is not None:
        ctx.load_cert_chain(ident.cert, ident.key)
    return ctx


def tls_line(target: Address, ctx: ssl.SSLContext, line: bytes) -> tuple[int, bytes | str]:
    """Connect, handshake, send a line, read one back: (our local port, the reply) or, if anything
    failed, (our local port, "ErrorType: message"). A refused connection must end, not hang."""
    if isinstance(target, str):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(15)
        raw.connect(target)
        cport = 0
    else:
        raw = socket.create_connection(target, timeout=15)
        cport = int(raw.getsockname()[1])
    try:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(line)
            return cport, s.makefile("rb").readline()
    except OSError as e:
        return cport, f"{type(e).__name__}: {e}"
    finally:
        raw.close()


def handshake_failure(err: str, cport: int, port: int) -> str:
    """The shield's log line for the failed handshake of our client on ``cport``; returns its reason."""
    pattern = re.compile(rf"^pyscone: network shield: (\S+) -> port {port}: TLS handshake failed: (.+)$", re.M)
    reasons = [m.group(2) for m in pattern.finditer(err) if re.search(rf"\b{cport}\b", m.group(1))]
    assert len(reasons) == 1, f"expected one handshake-failure line for peer port {cport}:\n{err[-3000:]}"
    return reasons[0]


ECHO_SERVER = """
    import errno, socketserver, sys
    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            peer = self.client_address[1] if self.client_address else "unix"
            try:
                for line in self.rfile:
                    self.wfile.write(line.upper())
            except OSError as e:
                print(f"peer {peer}: {type(e).__name__} {errno.errorcode.get(e.errno, e.errno)}", flush=True)
            else:
                print(f"peer {peer}: served", flush=True)
    base = socketserver.ThreadingUnixStreamServer if sys.argv[1].startswith("/") else socketserver.ThreadingTCPServer
    class Server(base):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 1024
    srv = Server(sys.argv[1] if sys.argv[1].startswith("/") else ("127.0.0.1", int(sys.argv[1])), Echo)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
"""

# One app for every outbound case: each argument is a step, each step prints one line, "ok ..."
# or where it failed ("connect", "send", "recv", ...) with the exception's type, errno and text.
# Steps: tcp:HOST:PORT (a request line, one reply line), tcp-eof:HOST:PORT (the same with
# shutdown(SHUT_WR) after the request), unix:PATH, bind:PORT, udp-bind:PORT, udp-connect:HOST:PORT,
# udp-sendto:HOST:PORT.
STEPS = """
    import errno, socket, sys
    secret = sys.argv[1].encode()
    stage = ""
    def addr(text):
        host, _, port = text.rpartition(":")
        return host, int(port)
    def talk(s, where, half_close=False):
        global stage
        stage = "connect"
        s.connect(where)
        stage = "send"
        s.sendall(b"request " + secret + b"\\n")
        if half_close:  # "that is all": the server answers once it has seen our end
            stage = "shutdown"
            s.shutdown(socket.SHUT_WR)
        stage = "recv"
        return "reply " + s.makefile("rb").readline().decode().strip()
    def run(kind, arg):
        global stage
        if kind in ("tcp", "tcp-eof"):
            with socket.socket() as s:
                return talk(s, addr(arg), kind == "tcp-eof")
        if kind == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                return talk(s, arg)
        if kind == "bind":
            stage = "bind"
            s = socket.socket()
            s.bind(("127.0.0.1", int(arg)))
            s.listen()
            return f"bound {s.getsockname()[1]}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            stage = kind
            if kind == "udp-bind":
                u.bind(("127.0.0.1", int(arg)))
            elif kind == "udp-connect":
                u.connect(addr(arg))
            elif kind == "udp-sendto":
                u.sendto(b"datagram " + secret, addr(arg))
            return "done"
    for step in sys.argv[2:]:
        kind, _, arg = step.partition(":")
        try:
            print(step, "ok", run(kind, arg), flush=True)
        except OSError as e:
            print(step, stage, type(e).__name__, errno.errorcode.get(e.errno, e.errno), e, flush=True)
    print("still running", flush=True)
"""


def steps_of(r: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The STEPS app's output: step -> what happened (the rest of its line)."""
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines and lines[-1] == "still running", r.stdout + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in lines[:-1]}


def plaintext_client(port: int) -> tuple[int, bytes | str]:
    """A client that speaks no TLS: it sends a line and reads until the shield closes on it."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        cport = int(s.getsockname()[1])
        s.sendall(b"bad client\n")
        got = b""
        try:
            while data := s.recv(4096):
                got += data
        except ConnectionResetError:
            pass
        except TimeoutError:
            return cport, "TimeoutError: the shield left the connection open"
    return cport, got
