"""A minimal asyncio HTTP/1.1 server with keep-alive, for the TLS benchmark (``bench/tls.py``).

    python bench/apps/aio_keepalive.py PORT [HOST]                         # plain HTTP
    python bench/apps/aio_keepalive.py PORT [HOST] --cert C.pem --key K.pem  # HTTPS with ``ssl``
    pyscone run [--net-shield FILE] bench/apps/aio_keepalive.py PORT [HOST]

Every GET gets the same 100-byte body.  A connection stays open (HTTP/1.1 keep-alive) unless the
request says ``Connection: close`` or is HTTP/1.0 without ``Connection: keep-alive`` (as ab's are):
that is how the benchmark makes its clients open a new connection, and so do a new TLS handshake,
per request.  It is an ``asyncio.Protocol`` on the default event loop
rather than a streams server (``aio_http.py``) because it is the fastest server the stdlib has:
what the benchmark compares is the TLS layer under it, and a slower app would dilute that cost and
flatter every ratio.  ``--cert``/``--key`` pass ``ssl=`` to ``loop.create_server``: the same app
doing TLS itself (asyncio's TLS runs ``ssl.SSLObject`` over memory BIOs, in Python).

Stops on SIGINT (KeyboardInterrupt).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys

BODY = (b"pyscone TLS benchmark " * 5)[:99] + b"\n"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: " + str(len(BODY)).encode() + b"\r\n"
KEEP = HEAD + b"\r\n" + BODY
CLOSE = HEAD + b"Connection: close\r\n\r\n" + BODY
BAD = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 64 * 1024


class Http(asyncio.Protocol):
    """One connection: answers each complete request head; bodies are not expected (GET only)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data
        out: list[bytes] = []
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head, buf = buf[:end].lower(), buf[end + 4 :]
            http10 = head.split(b"\r\n", 1)[0].endswith(b"http/1.0")
            if b"connection: close" in head or (http10 and b"connection: keep-alive" not in head):
                self.transport.write(b"".join(out) + CLOSE)
                self.transport.close()
                self.buf = b""
                return
            out.append(KEEP)
        if out:
            self.transport.write(b"".join(out))
        if len(buf) > MAX_HEAD:
            self.transport.write(BAD)
            self.transport.close()
            buf = b""
        self.buf = buf


async def serve(host: str, port: int, context: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Http, host, port, ssl=context, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser(description="asyncio HTTP/1.1 keep-alive benchmark server")
    p.add_argument("port", type=int)
    p.add_argument("host", nargs="?", default="127.0.0.1")
    p.add_argument("--cert", help="serve HTTPS with this PEM chain (and --key)")
    p.add_argument("--key")
    a = p.parse_args()
    context = None
    if a.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(a.cert, a.key)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(a.host, a.port, context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
