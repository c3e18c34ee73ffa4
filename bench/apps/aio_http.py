"""A minimal asyncio HTTP/1.0 server for benchmarks: every request gets the same
100-byte body and ``Connection: close``.

    python bench/apps/aio_http.py PORT [HOST]
    pyscone run bench/apps/aio_http.py PORT [HOST]

Stops on SIGINT (KeyboardInterrupt).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

BODY = (b"pyscone asyncio benchmark " * 4)[:99] + b"\n"
assert len(BODY) == 100
RESPONSE = (
    b"HTTP/1.0 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + BODY
)
MAX_HEAD = 64 * 1024


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) <= MAX_HEAD:
                writer.write(RESPONSE)
                await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, limit=MAX_HEAD, backlog=512)
    async with server:
        await server.serve_forever()


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print("usage: aio_http.py PORT [HOST]", file=sys.stderr)
        return 2
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) == 3 else "127.0.0.1"
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
