"""``pyscone las``: the local attestation service, one per host (simulated platform).

With SGX the CPU writes an enclave's report and the platform's quoting enclave signs
it with a key that Intel's certificates vouch for.  The simulated platform is this
service: it holds a platform attestation key (ECDSA P-256, made on first start and
kept in its directory, mode 0600) and signs the reports enclaves hand it.  A CAS
trusts a host by trusting that key's public half (``pyscone las --show``).

Protocol: TCP on loopback, one JSON object per line each way.

    {"op": "quote", "report": "<hex>"}   ->  {"quote": "<hex>"}
    {"op": "platform"}                    ->  {"platform_id": "<hex>", "public_key": "<PEM>"}
    anything else                         ->  {"error": "<why>"}   (the connection stays usable)

Discussion: in simulation the LAS cannot check that a report comes from a real
enclave (there is no CPU to ask), so it signs any well-formed report, exactly as
SCONE's simulation mode does.  What the simulation keeps real is everything around
it: the key's life cycle, the quote format, and every check a verifier makes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from pyscone.platform import keys, quote

DEFAULT_PORT = 18766
KEY_FILE = "platform-key.pem"
MAX_LINE = 64 * 1024


class LasError(Exception):
    """The service cannot start; reported as one line."""


def default_dir() -> Path:
    env = os.environ.get("PYSCONE_LAS_DIR")
    return Path(env) if env else Path.home() / ".pyscone" / "las"


def load_or_create_key(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The platform key in ``directory``: read it, or make it on first start.

    Returns:
        the key, and whether it was just made.

    Raises:
        LasError: the directory or the key file is unusable.
    """
    path = directory / KEY_FILE
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = path.read_bytes()
    except FileNotFoundError:
        key = keys.generate()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise LasError(f"{path}: {e.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(keys.private_pem(key))
            f.flush()
            os.fsync(f.fileno())
        return key, True
    except OSError as e:
        raise LasError(f"{e.filename or path}: {e.strerror}") from None
    try:
        return keys.load_private(pem), False
    except ValueError as e:
        raise LasError(f"{path}: {e}") from None


@dataclass
class Platform:
    key: ec.EllipticCurvePrivateKey

    @property
    def platform_id(self) -> bytes:
        return quote.platform_id(self.key.public_key())

    def answer(self, line: bytes) -> dict[str, Any]:
        """One request line -> one response object (sans-IO: the server only moves lines)."""
        try:
            request = json.loads(line)
        except ValueError:
            return {"error": "not a JSON request"}
        if not isinstance(request, dict):
            return {"error": "not a JSON object"}
        op = request.get("op")
        if op == "platform":
            return {
                "platform_id": self.platform_id.hex(),
                "public_key": keys.public_pem(self.key.public_key()).decode(),
            }
        if op != "quote":
            return {"error": f"unknown op {op!r}"}
        try:
            report = quote.Report.unpack(bytes.fromhex(str(request.get("report", ""))))
        except (ValueError, quote.QuoteError) as e:
            return {"error": f"bad report: {e}"}
        return {"quote": quote.sign_quote(report, self.key).hex()}


async def _serve_connection(platform: Platform, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                writer.write(b'{"error": "request too long"}\n')
                break
            except asyncio.IncompleteReadError:
                break  # the client went away
            writer.write(json.dumps(platform.answer(line)).encode() + b"\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(platform: Platform, host: str, port: int, ready: asyncio.Future[int] | None = None) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(platform, r, w), host, port, limit=MAX_LINE, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"pyscone las: platform {platform.platform_id.hex()} listening on {host}:{bound}", flush=True)
    if ready is not None:
        ready.set_result(bound)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(directory: Path, listen: str, show: bool) -> int:
    """``pyscone las``: returns the exit status.

    Raises:
        LasError: a mistake or an unusable key directory.
    """
    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise LasError(f"--listen {listen!r}: expected HOST:PORT")
    key, made = load_or_create_key(directory)
    platform = Platform(key)
    if made:
        print(f"pyscone las: made a new platform key in {directory / KEY_FILE}", file=sys.stderr)
    if show:
        sys.stdout.write(keys.public_pem(key.public_key()).decode())
        print(f"platform id {platform.platform_id.hex()}", file=sys.stderr)
        return 0
    try:
        asyncio.run(serve(platform, host, int(port_text)))
    except OSError as e:
        raise LasError(f"cannot listen on {listen}: {e.strerror}") from None
    return 0
