"""A small Redis-protocol server (PING, SET, GET) for the TLS benchmark (``bench/tls.py``).

    python bench/apps/resp_server.py PORT [HOST] [--cert C.pem --key K.pem]
    pyscone run [--net-shield FILE] bench/apps/resp_server.py PORT [HOST]

Plain asyncio (an ``asyncio.Protocol``), RESP2 arrays of bulk strings as redis-benchmark and
redis-cli send them, plus inline commands (``PING\\r\\n``).  Any other command gets an error reply
(redis-benchmark's start-up ``CONFIG GET`` included: it warns and goes on).  The values live in a
dict.  ``--cert``/``--key``: the same server doing TLS itself with ``ssl``.

Stops on SIGINT (KeyboardInterrupt).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import sys

MAX_ARGS = 1024
MAX_BULK = 512 * 1024 * 1024


class ProtocolError(Exception):
    """The client sent something that is not RESP: the connection is closed."""


def parse(buf: bytes, pos: int) -> tuple[list[bytes], int] | None:
    """One command from ``buf[pos:]``: its arguments and where the next begins, or None if incomplete."""
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    if buf[pos : pos + 1] != b"*":  # inline command
        return buf[pos:eol].split(), eol + 2
    try:
        count = int(buf[pos + 1 : eol])
    except ValueError:
        raise ProtocolError("bad array length") from None
    if not 0 <= count <= MAX_ARGS:
        raise ProtocolError("array length out of range")
    args = []
    pos = eol + 2
    for _ in range(count):
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        if buf[pos : pos + 1] != b"$":
            raise ProtocolError("expected a bulk string")
        try:
            size = int(buf[pos + 1 : eol])
        except ValueError:
            raise ProtocolError("bad bulk length") from None
        if not 0 <= size <= MAX_BULK:
            raise ProtocolError("bulk length out of range")
        start, end = eol + 2, eol + 2 + size
        if len(buf) < end + 2:
            return None
        args.append(buf[start:end])
        pos = end + 2
    return args, pos


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


class Resp(asyncio.Protocol):
    def __init__(self, store: dict[bytes, bytes]) -> None:
        self.store = store
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data
        pos = 0
        out: list[bytes] = []
        try:
            while pos < len(buf) and (cmd := parse(buf, pos)) is not None:
                args, pos = cmd
                if args:
                    out.append(self.execute(args))
        except ProtocolError as e:
            self.transport.write(b"".join(out) + b"-ERR Protocol error: " + str(e).encode() + b"\r\n")
            self.transport.close()
            return
        self.buf = buf[pos:]
        if out:
            self.transport.write(b"".join(out))

    def execute(self, args: list[bytes]) -> bytes:
        name = args[0].upper()
        if name == b"GET" and len(args) == 2:
            return bulk(self.store.get(args[1]))
        if name == b"SET" and len(args) == 3:
            self.store[args[1]] = args[2]
            return b"+OK\r\n"
        if name == b"PING" and len(args) <= 2:
            return bulk(args[1]) if len(args) == 2 else b"+PONG\r\n"
        return b"-ERR unknown command or wrong number of arguments for '" + args[0][:64] + b"'\r\n"


async def serve(host: str, port: int, context: ssl.SSLContext | None) -> None:
    store: dict[bytes, bytes] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Resp(store), host, port, ssl=context, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> int:
    p = argparse.ArgumentParser(description="a Redis-protocol benchmark server: PING, SET, GET")
    p.add_argument("port", type=int)
    p.add_argument("host", nargs="?", default="127.0.0.1")
    p.add_argument("--cert", help="serve TLS with this PEM chain (and --key)")
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
