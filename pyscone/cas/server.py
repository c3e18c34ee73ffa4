"""``pyscone cas serve``: the CAS over HTTPS (Starlette on uvicorn).

On first start the CAS makes, in its directory (mode 0700): a TLS key and a
self-signed certificate (enclaves pin its SHA-256, which is part of their measured
configuration; owners' clients verify it), and a master key that encrypts secrets
at rest.  The database is ``DIR/cas.db`` (SQLite) unless ``--db`` names another.

API (JSON unless noted; owner requests are signed, see ``protocol.py``; an enclave
request's fields are checked by :data:`FIELDS`, and a body is at most :data:`MAX_BODY`
bytes, refused as it streams in)::

    POST /v1/platforms              admin   {public_key, note} -> {platform_id}
    DELETE /v1/platforms/{id}       admin   -> {platform_id}
    POST /v1/sessions               owner   body: the policy YAML -> {name, version}
    GET  /v1/sessions/{name}        owner   -> {name, version, policy}
    GET  /v1/sessions/{name}/audit  owner   -> {name, events}
    POST /v1/challenge              enclave {session, service} -> {nonce}
    POST /v1/attest                 enclave {session, service, nonce, quote, public_key} -> {sealed}
    POST /v1/join                   a spawned child {the same} -> {sealed: its spawn key} (no run starts)
    POST /v1/tags                   enclave {session, service, run, seq, tags, after?, mac} -> {tags}
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pyscone.cas import protocol
from pyscone.cas.integrity import Tampered
from pyscone.cas.protocol import cert_fingerprint
from pyscone.cas.service import Answer, Cas
from pyscone.cas.store import Store, StoreError
from pyscone.platform import keys

KEY_FILE, CERT_FILE, MASTER_FILE, ADMIN_FILE = "cas-key.pem", "cas-cert.pem", "master.key", "admin.pem"
ANCHOR_FILE = "anchor.json"  # the newest generation of each record this CAS has seen (integrity.py)
MAX_BODY = 512 * 1024


class CasError(Exception):
    """The CAS cannot start; reported as one line."""


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def ensure_identity(directory: Path, names: list[str]) -> tuple[Path, Path, bytes]:
    """The CAS's TLS key and certificate, and its master key: read, or made on first start.

    Returns:
        (key file, certificate file, master key)
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path, master_path = directory / KEY_FILE, directory / CERT_FILE, directory / MASTER_FILE
        if not master_path.exists():
            _write_private(master_path, os.urandom(32).hex().encode())
        master = bytes.fromhex(master_path.read_text().strip())
        if not cert_path.exists():
            key = keys.generate()
            _write_private(key_path, keys.private_pem(key))
            cert_path.write_bytes(_self_signed(key, names).public_bytes(serialization.Encoding.PEM))
    except (OSError, ValueError) as e:
        raise CasError(f"{directory}: cannot set up the CAS's keys: {e}") from None
    if len(master) != 32:
        raise CasError(f"{directory / MASTER_FILE}: not a 32-byte master key")
    return key_path, cert_path, master


def _admin(directory: Path, pem: bytes | None) -> str | None:
    """The CAS admin's owner id: from ``pem`` (then kept in the directory), or as kept before."""
    path = directory / ADMIN_FILE
    if pem is not None:
        try:
            key = keys.load_private(pem) if b"PRIVATE KEY" in pem else keys.load_public(pem)
        except ValueError as e:
            raise CasError(f"--admin: {e}") from None
        path.write_bytes(keys.public_pem(key))
    if not path.exists():
        return None
    try:
        return protocol.owner_id(keys.public_der(keys.load_public(path.read_bytes())))
    except (OSError, ValueError) as e:
        raise CasError(f"{path}: {e}") from None


def _self_signed(key: ec.EllipticCurvePrivateKey, names: list[str]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyscone CAS")])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )


def _json(answer: Answer) -> Response:
    return JSONResponse(answer.body, status_code=answer.status)


async def _body(request: Request) -> bytes | None:
    """The request's body, or None if it is larger than :data:`MAX_BODY`: refused from its
    Content-Length, or as soon as the stream passes the limit (never read whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and (len(declared) > 12 or not declared.isdigit() or int(declared) > MAX_BODY):
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a session or service name (policy.NAME)
Check = Callable[[Any], bool]


def _hex(low: int, high: int) -> Check:
    pattern = re.compile(r"^(?:[0-9a-fA-F]{2})*$")
    return lambda v: isinstance(v, str) and low <= len(v) <= high and bool(pattern.match(v))


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and bool(NAME.match(v))


def _is_seq(v: Any) -> bool:
    return type(v) is int and 0 < v < 1 << 62


def _is_tags(v: Any) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= 2 and all(_hex(32, 32)(t) for t in v)


# What each enclave request must hold: field -> (check, what the field is).
FIELDS: dict[str, dict[str, tuple[Check, str]]] = {
    "challenge": {"session": (_is_name, "a session name"), "service": (_is_name, "a service name")},
    "attest": {
        "session": (_is_name, "a session name"),
        "service": (_is_name, "a service name"),
        "nonce": (_hex(64, 64), "the 64-hex-digit nonce"),
        "quote": (_hex(2, MAX_BODY), "the quote, in hex"),
        "public_key": (_hex(2, 1024), "the public key (DER), in hex"),
    },
    "tags": {
        "session": (_is_name, "a session name"),
        "service": (_is_name, "a service name"),
        "run": (_hex(32, 32), "the 32-hex-digit run id"),
        "seq": (_is_seq, "a positive integer"),
        "tags": (_is_tags, "a list of one or two 32-hex-digit FSPF tags"),
        "mac": (_hex(64, 64), "the 64-hex-digit MAC"),
    },
}


FIELDS["join"] = FIELDS["attest"]


def parse_request(body: bytes, fields: dict[str, tuple[Check, str]]) -> dict[str, Any] | str:
    """An enclave's JSON request, checked field by field (sans-IO): the object, or why not."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return f"expected a JSON object with {', '.join(fields)}"
    for name, (check, what) in fields.items():
        if name not in doc:
            return f"missing {name!r}"
        if not check(doc[name]):
            return f"{name}: expected {what}"
    return doc


def build_app(cas: Cas) -> Starlette:
    def owned(handler: Callable[[str, Request, bytes], Answer]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            body = await _body(request)
            if body is None:
                return _json(Answer(413, {"error": f"request too large (at most {MAX_BODY} bytes)"}))

            def call() -> Answer:
                try:
                    owner = cas.owner(request.headers, request.method, request.url.path, body)
                except protocol.AuthError as e:
                    return Answer(401, {"error": str(e)})
                try:
                    return handler(owner, request, body)
                except Tampered as e:
                    return cas.tampered(e)

            return _json(await run_in_threadpool(call))

        return endpoint

    def enclave(handler: Callable[[dict[str, Any]], Answer], kind: str) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            body = await _body(request)
            if body is None:
                return _json(Answer(413, {"error": f"request too large (at most {MAX_BODY} bytes)"}))
            doc = parse_request(body, FIELDS[kind])
            if isinstance(doc, str):
                return _json(Answer(400, {"error": doc}))
            return _json(await run_in_threadpool(handler, doc))

        return endpoint

    def put(owner: str, request: Request, body: bytes) -> Answer:
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return Answer(400, {"error": "the policy is not UTF-8 text"})
        return cas.put_session(owner, text)

    def trust(owner: str, request: Request, body: bytes) -> Answer:
        doc = parse_request(body, {"public_key": (lambda v: isinstance(v, str), "a PEM public key")})
        if isinstance(doc, str):
            return Answer(400, {"error": doc})
        note = doc.get("note", "")
        if not isinstance(note, str):
            return Answer(400, {"error": "note: expected a string"})
        return cas.trust_platform(owner, doc["public_key"], note)

    routes = [
        Route("/v1/sessions", owned(put), methods=["POST"]),
        Route("/v1/platforms", owned(trust), methods=["POST"]),
        Route(
            "/v1/platforms/{pid}",
            owned(lambda o, r, b: cas.distrust_platform(o, r.path_params["pid"])),
            methods=["DELETE"],
        ),
        Route(
            "/v1/sessions/{name}",
            owned(lambda o, r, b: cas.get_session(o, r.path_params["name"])),
            methods=["GET"],
        ),
        Route(
            "/v1/sessions/{name}/audit",
            owned(lambda o, r, b: cas.audit(o, r.path_params["name"])),
            methods=["GET"],
        ),
        Route(
            "/v1/challenge", enclave(lambda d: cas.challenge(d["session"], d["service"]), "challenge"), methods=["POST"]
        ),
        Route(
            "/v1/attest",
            enclave(
                lambda d: cas.attest(d["session"], d["service"], d["nonce"], d["quote"], d["public_key"]), "attest"
            ),
            methods=["POST"],
        ),
        Route(
            "/v1/join",
            enclave(lambda d: cas.join(d["session"], d["service"], d["nonce"], d["quote"], d["public_key"]), "join"),
            methods=["POST"],
        ),
        Route(
            "/v1/tags",
            enclave(
                lambda d: cas.report_tags(
                    d["session"],
                    d["service"],
                    d["run"].lower(),
                    d["seq"],
                    [t.lower() for t in d["tags"]],
                    d["mac"],
                    d["after"].lower() if isinstance(d.get("after"), str) else None,
                ),
                "tags",
            ),
            methods=["POST"],
        ),
    ]
    return Starlette(routes=routes)


def serve(directory: Path, listen: str, db: str | None, names: list[str], admin_pem: bytes | None = None) -> int:
    """``pyscone cas serve``.

    Raises:
        CasError: a mistake or an unusable directory, database or address.
    """
    import uvicorn

    host, _, port_text = listen.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise CasError(f"--listen {listen!r}: expected HOST:PORT")
    key_path, cert_path, master = ensure_identity(directory, sorted({host, "localhost", "127.0.0.1", *names}))
    admin = _admin(directory, admin_pem)
    url = db or f"sqlite:///{directory / 'cas.db'}"
    try:
        store = Store(url, master, directory / ANCHOR_FILE)
    except (StoreError, Tampered) as e:
        raise CasError(f"{url.split('@')[-1]}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any driver's error, reported in one line
        why = " ".join(str(getattr(e, "orig", None) or e).split())
        raise CasError(f"cannot open the database {url.split('@')[-1]}: {why}") from None
    try:
        sock = socket.create_server((host, int(port_text)), reuse_port=False)
    except OSError as e:
        raise CasError(f"cannot listen on {listen}: {e.strerror}") from None
    # Accepted connections inherit TCP_NODELAY.  Without it every keep-alive response waited
    # about 40 ms for a delayed ACK (Nagle): asyncio sets it only on sockets it made itself.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port = sock.getsockname()[1]
    fingerprint = cert_fingerprint(cert_path.read_bytes())
    print(f"pyscone cas: listening on https://{host}:{port}; certificate {cert_path} sha256 {fingerprint}", flush=True)
    config = uvicorn.Config(
        build_app(Cas(store, fingerprint, admin=admin)),
        ssl_keyfile=str(key_path),
        ssl_certfile=str(cert_path),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    uvicorn.Server(config).run(sockets=[sock])
    sock.close()
    print("pyscone cas: stopped", file=sys.stderr, flush=True)
    return 0
