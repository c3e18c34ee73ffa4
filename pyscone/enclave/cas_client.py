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

import contextlib
import errno
import hashlib
import json
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from pyscone.cas import protocol
from pyscone.enclave import attest
from pyscone.enclave.attest import AttestationError
from pyscone.enclave.stdlib import sockets
from pyscone.platform import keys, quote

TIMEOUT = 30.0
MAX_RESPONSE = 4 << 20


class CasConnection:
    """One pinned TLS connection to the CAS (in the enclave, over its sockets), for one or more
    JSON requests (HTTP/1.1 keep-alive).

    Raises (from the constructor and :meth:`post`):
        AttestationError: unreachable, not the pinned certificate, or not an HTTP/JSON reply.
    """

    def __init__(self, url: str, pin_sha256: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise AttestationError(f"the CAS URL {url!r} is not https://HOST[:PORT]")
        self.url, self.netloc = url, parts.netloc
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # the certificate itself is pinned below, which is stricter
        ctx.verify_mode = ssl.CERT_NONE
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_hostname=parts.hostname)
        self._buffer = bytearray()
        with self._errors():
            self._sock = sockets.runtime_connection(parts.hostname, parts.port or 443, TIMEOUT)
            # Small records each way: without this, Nagle holds a request behind the ACK of the
            # handshake's last record, which the CAS delays (about 40 ms a request).
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._io(self._tls.do_handshake)
                peer = self._tls.getpeercert(binary_form=True)
                if peer is None or hashlib.sha256(peer).hexdigest() != pin_sha256.lower():
                    raise AttestationError("the CAS's certificate is not the one this enclave pins")
            except BaseException:
                self._sock.close()
                raise

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise AttestationError(f"the CAS at {self.url} cannot be reached: {e.strerror or e}") from None
        except ssl.SSLError as e:
            raise AttestationError(f"TLS with the CAS at {self.url} failed: {e.reason or e}") from None

    def _io(self, step: Callable[[], Any]) -> Any:
        """Run a TLS step, moving records between the memory BIOs and the socket as it needs."""
        while True:
            try:
                result = step()
            except ssl.SSLWantReadError:
                self._flush()
                data = self._sock.recv(65536)
                if not data:
                    raise AttestationError("the CAS closed the connection") from None
                self._in.write(data)
                continue
            self._flush()
            return result

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self._sock.sendall(data)

    def post(self, path: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST ``doc`` as JSON; return the status and the JSON reply."""
        body = json.dumps(doc).encode()
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with self._errors():
            self._io(lambda: self._tls.write(request))
            while b"\r\n\r\n" not in self._buffer:
                self._read()
            head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
            status, length = _parse_head(head)
            while len(rest) < length:
                self._read()
                rest = bytes(self._buffer).partition(b"\r\n\r\n")[2]
            self._buffer = bytearray(rest[length:])
        try:
            reply = json.loads(rest[:length])
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise AttestationError("the CAS's reply is not JSON")
        return status, reply

    def _read(self) -> None:
        if len(self._buffer) > MAX_RESPONSE:
            raise AttestationError("the CAS's reply is too large")
        chunk = self._io(lambda: self._tls.read(65536))
        if not chunk:
            raise AttestationError("the CAS closed the connection")
        self._buffer += chunk

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> CasConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_head(head: bytes) -> tuple[int, int]:
    """(status, content length) of an HTTP/1.1 response head."""
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
    except (IndexError, ValueError, KeyError):
        raise AttestationError("the CAS's reply is not HTTP with a Content-Length") from None
    if not 0 <= length <= MAX_RESPONSE:
        raise AttestationError("the CAS's reply is too large")
    return status, length


def https_post(url: str, pin_sha256: str, path: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One request on its own connection."""
    with CasConnection(url, pin_sha256) as cas:
        return cas.post(path, doc)


def attest_to(
    cas: dict[str, str], session: str, service: str, las: tuple[str, int], *, join: bool = False
) -> dict[str, Any]:
    """Attest to the CAS and return the configuration it releases to this enclave.

    ``join``: as a spawned child of an enclave of the service (``/v1/join``): the CAS answers
    only the service's spawn key, and starts no run.

    Raises:
        AttestationError: any step failed or the CAS refused (the CAS's log says why).
    """
    with CasConnection(cas["url"], cas["cert_sha256"]) as conn:
        return _attest(conn, session, service, las, "/v1/join" if join else "/v1/attest")


def _attest(conn: CasConnection, session: str, service: str, las: tuple[str, int], path: str) -> dict[str, Any]:
    status, reply = conn.post("/v1/challenge", {"session": session, "service": service})
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
    status, reply = conn.post(
        path,
        {"session": session, "service": service, "nonce": nonce_hex, "quote": blob.hex(), "public_key": public.hex()},
    )
    sealed = reply.get("sealed")
    if status != 200 or not isinstance(sealed, str):
        raise AttestationError(f"the CAS refused this enclave ({reply.get('error', status)})")
    try:
        config = protocol.open_config(key, nonce, bytes.fromhex(sealed))
    except (ValueError, protocol.SealError) as e:
        raise AttestationError(f"the CAS's configuration does not open: {e}") from None
    attest.accepted_quote = blob  # its platform is one the CAS trusts (spawned children must quote there)
    return config


class CasPin:
    """The FS shield's tag pin in production: each commit is reported to the CAS, MAC'd with
    the run key the attested configuration carried.

    One report per commit, after the new FSPF is written over the unpinned copy: "from
    ``old``, accept ``new`` only".  The CAS takes it only if ``old`` is what it pins (the chain
    of commits).  A commit is durable for the app only once the CAS has acknowledged it: a
    report the CAS did not take (unreachable, refused, or dropped by the host, whose network
    it is) fails the commit (``OSError(EIO)`` from the app's ``fsync``/``close``), and the next
    start is given the old FSPF, whose copy was not written."""

    def __init__(self, cas: dict[str, str], run: dict[str, str]) -> None:
        self.cas = cas
        self.run = run
        self.seq = 0
        # Reports go over one kept-alive connection (a TLS handshake per commit cost more than
        # the commit).  One the CAS closed meanwhile (its idle timeout) is opened again and the
        # same report, same number, sent once more: if the first one did reach the CAS, the
        # repeat is refused as stale and the commit fails (EIO), never counted twice.
        self._conn: CasConnection | None = None

    def _post(self, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        for attempt in (1, 2):
            fresh = self._conn is None
            if self._conn is None:
                self._conn = CasConnection(self.cas["url"], self.cas["cert_sha256"])
            try:
                return self._conn.post("/v1/tags", doc)
            except AttestationError:
                self._conn.close()
                self._conn = None
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _report(self, tags: list[str], after: str) -> None:
        """Raises:
        OSError(EIO): the CAS did not acknowledge the report (unreachable, or refused it)."""
        self.seq += 1
        s, svc, key = self.run["session"], self.run["service"], bytes.fromhex(self.run["key"])
        doc = {
            "session": s,
            "service": svc,
            "run": self.run["id"],
            "seq": self.seq,
            "tags": tags,
            "after": after,
            "mac": protocol.tag_mac(key, s, svc, self.seq, tags, after),
        }
        try:
            status, reply = self._post(doc)
        except AttestationError as e:
            raise OSError(errno.EIO, f"the CAS did not take the new FSPF tag: {e}") from None
        if status != 200:
            raise OSError(errno.EIO, f"the CAS did not take the new FSPF tag ({reply.get('error', status)})")

    def commit(self, old: str, new: str) -> None:
        self._report([new], old)  # on failure the commit is not durable: the caller reports EIO
