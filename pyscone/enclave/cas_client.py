"""The enclave's side of the CAS (TRUSTED): attest, receive the configuration, report FSPF tags.

The enclave speaks HTTPS to the CAS over its own sockets (through host calls): TLS
runs inside the enclave on ``ssl.MemoryBIO``, so the host carries only ciphertext,
and the CAS is authenticated by the SHA-256 of its certificate, which is part of
the enclave's measured configuration (a host that points the enclave at another
CAS changes its MRENCLAVE, and the real CAS then refuses it).

The handshake, in order::

    enclave -> CAS  POST /v1/challenge {session, service}           <- {nonce}
    enclave -> LAS  report(MRENCLAVE, …, H(ephemeral public key || nonce))  <- quote
    enclave -> CAS  POST /v1/attest {…, nonce, quote, public key}   <- {sealed configuration}

and the configuration opens only with the ephemeral key, which never leaves the enclave.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import urllib.parse
from typing import Any

from pyscone.cas import protocol
from pyscone.enclave import attest
from pyscone.enclave.attest import AttestationError
from pyscone.platform import keys, quote

TIMEOUT = 30.0
MAX_RESPONSE = 4 << 20


def https_post(url: str, pin_sha256: str, path: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``doc`` as JSON to the pinned server at ``url``; return the status and the JSON reply.

    Raises:
        AttestationError: unreachable, not the pinned certificate, or not an HTTP/JSON reply.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise AttestationError(f"the CAS URL {url!r} is not https://HOST[:PORT]")
    host, port = parts.hostname, parts.port or 443
    body = json.dumps(doc).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the certificate itself is pinned below, which is stricter
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:

            def flush() -> None:
                data = outgoing.read()
                if data:
                    sock.sendall(data)

            def feed() -> bool:
                data = sock.recv(65536)
                if data:
                    incoming.write(data)
                else:
                    incoming.write_eof()
                return bool(data)

            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    flush()
                    if not feed():
                        raise AttestationError("the CAS closed the connection during the TLS handshake") from None
            flush()
            peer = tls.getpeercert(binary_form=True)
            if peer is None or hashlib.sha256(peer).hexdigest() != pin_sha256.lower():
                raise AttestationError("the CAS's certificate is not the one this enclave pins")
            tls.write(request)
            flush()
            response = bytearray()
            while len(response) <= MAX_RESPONSE:
                try:
                    chunk = tls.read(65536)
                    if not chunk:
                        break
                    response += chunk
                except ssl.SSLWantReadError:
                    flush()
                    if not feed():
                        break
                except ssl.SSLZeroReturnError:
                    break
    except OSError as e:
        raise AttestationError(f"the CAS at {url} cannot be reached: {e.strerror or e}") from None
    except ssl.SSLError as e:
        raise AttestationError(f"TLS with the CAS at {url} failed: {e.reason or e}") from None
    return _parse_response(bytes(response))


def _parse_response(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            body = body[: int(headers["content-length"])]
        doc: dict[str, Any] = json.loads(body)
    except (IndexError, ValueError):
        raise AttestationError("the CAS's reply is not HTTP with a JSON body") from None
    if not sep or not isinstance(doc, dict):
        raise AttestationError("the CAS's reply is not HTTP with a JSON body")
    return status, doc


def attest_to(cas: dict[str, str], session: str, service: str, las: tuple[str, int]) -> dict[str, Any]:
    """Attest to the CAS and return the configuration it releases to this enclave.

    Raises:
        AttestationError: any step failed or the CAS refused (the CAS's log says why).
    """
    url, pin = cas["url"], cas["cert_sha256"]
    status, reply = https_post(url, pin, "/v1/challenge", {"session": session, "service": service})
    nonce_hex = reply.get("nonce")
    if status != 200 or not isinstance(nonce_hex, str):
        raise AttestationError(f"the CAS gave no challenge ({status}: {reply.get('error', '')})")
    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError:
        raise AttestationError("the CAS's challenge is not hex") from None
    key = keys.generate()
    public = keys.public_der(key)
    blob = attest.request_quote(las, attest.my_report(quote.report_data(public, nonce)))
    status, reply = https_post(
        url,
        pin,
        "/v1/attest",
        {"session": session, "service": service, "nonce": nonce_hex, "quote": blob.hex(), "public_key": public.hex()},
    )
    sealed = reply.get("sealed")
    if status != 200 or not isinstance(sealed, str):
        raise AttestationError(f"the CAS refused this enclave ({reply.get('error', status)})")
    try:
        return protocol.open_config(key, nonce, bytes.fromhex(sealed))
    except (ValueError, protocol.SealError) as e:
        raise AttestationError(f"the CAS's configuration does not open: {e}") from None


class CasPin:
    """The FS shield's tag pin in production: each change is reported to the CAS, MAC'd with
    the run key the attested configuration carried."""

    def __init__(self, cas: dict[str, str], run: dict[str, str]) -> None:
        self.cas = cas
        self.run = run
        self.seq = 0

    def _report(self, tags: list[str]) -> None:
        self.seq += 1
        s, svc, key = self.run["session"], self.run["service"], bytes.fromhex(self.run["key"])
        doc = {
            "session": s,
            "service": svc,
            "run": self.run["id"],
            "seq": self.seq,
            "tags": tags,
            "mac": protocol.tag_mac(key, s, svc, self.seq, tags),
        }
        status, reply = https_post(self.cas["url"], self.cas["cert_sha256"], "/v1/tags", doc)
        if status != 200:
            raise OSError(f"the CAS did not take the new FSPF tag ({reply.get('error', status)})")

    def prepare(self, old: str, new: str) -> None:
        try:
            self._report([old, new])
        except AttestationError as e:
            raise OSError(str(e)) from None  # the commit fails; the old FSPF stays in force

    def commit(self, new: str) -> None:
        try:
            self._report([new])
        except (AttestationError, OSError):
            pass  # the CAS still accepts both: safe; the next commit narrows it again
