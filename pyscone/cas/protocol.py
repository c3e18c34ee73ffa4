"""The CAS's message formats (sans-IO): owner-signed requests, sealed configurations, tag reports.

**Owner requests.**  A session belongs to the key that created it.  Every owner
request carries that key's public half and an ECDSA signature over the method, the
path, a timestamp and the SHA-256 of the body; the CAS accepts it within
:data:`MAX_SKEW` seconds of its clock and only once (it remembers signatures for
that long), so a captured request cannot be replayed or reused for another body.

**Sealed configuration.**  An attested enclave's start-up configuration is encrypted
to the ephemeral public key its quote vouches for: ECDH (P-256) with a fresh CAS key,
HKDF-SHA256 bound to the attestation nonce, AES-256-GCM.  Only that enclave, in that
attestation, can open it.

**Tag reports.**  The configuration carries a random *run key*; the enclave MACs each
report of the FSPF tags it accepts with it (HMAC-SHA256 over session, service, a
sequence number and the tags), so only the latest attested run can move the
session's pin, and an old report cannot be replayed to move it back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pyscone.platform import keys

MAX_SKEW = 300  # seconds an owner request's timestamp may differ from the CAS's clock
H_OWNER, H_TIME, H_SIGNATURE = "x-pyscone-owner", "x-pyscone-time", "x-pyscone-signature"
_REQUEST_DOMAIN = b"pyscone-owner-request-v1\n"
_SEAL_INFO = b"pyscone-sealed-config-v1"
_TAG_DOMAIN = b"pyscone-tag-report-v1\n"


class AuthError(Exception):
    """An owner request is not authentic (or is stale, or replayed)."""


class SealError(Exception):
    """A sealed configuration does not open."""


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of a certificate (DER): how an enclave pins its CAS.

    Raises:
        ValueError: not a PEM certificate.
    """
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def owner_id(public_der: bytes) -> str:
    return hashlib.sha256(public_der).hexdigest()


def _request_message(method: str, path: str, timestamp: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return _REQUEST_DOMAIN + f"{method.upper()}\n{path}\n{timestamp}\n{digest}".encode()


def sign_request(key: ec.EllipticCurvePrivateKey, method: str, path: str, body: bytes, now: float) -> dict[str, str]:
    """The headers that make a request the owner's."""
    timestamp = str(int(now))
    signature = key.sign(_request_message(method, path, timestamp, body), ec.ECDSA(hashes.SHA256()))
    return {
        H_OWNER: base64.b64encode(keys.public_der(key)).decode(),
        H_TIME: timestamp,
        H_SIGNATURE: base64.b64encode(signature).decode(),
    }


def verify_request(headers: Mapping[str, str], method: str, path: str, body: bytes, now: float) -> tuple[str, bytes]:
    """Check an owner request.

    Returns:
        the owner's id and the signature (for the caller's replay memory).

    Raises:
        AuthError: missing, malformed, stale or forged.
    """
    try:
        der = base64.b64decode(headers[H_OWNER], validate=True)
        timestamp = headers[H_TIME]
        signature = base64.b64decode(headers[H_SIGNATURE], validate=True)
        public = serialization.load_der_public_key(der)
    except (KeyError, ValueError, TypeError):
        raise AuthError("the request is not signed by an owner key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise AuthError("an owner key is an ECDSA P-256 key")
    if not timestamp.isdigit() or abs(int(timestamp) - now) > MAX_SKEW:
        raise AuthError("the request's time is too far from the CAS's clock (or replayed late)")
    try:
        public.verify(signature, _request_message(method, path, timestamp, body), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AuthError("the request's signature does not verify") from None
    return owner_id(der), signature


def _seal_key(shared: bytes, nonce: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce, info=_SEAL_INFO).derive(shared)


def seal_config(enclave_public_der: bytes, nonce: bytes, config: Mapping[str, Any]) -> bytes:
    """Encrypt ``config`` so that only the holder of the enclave's key can read it.

    Raises:
        ValueError: the enclave's public key is not a P-256 key.
    """
    peer = serialization.load_der_public_key(enclave_public_der)
    if not isinstance(peer, ec.EllipticCurvePublicKey) or not isinstance(peer.curve, ec.SECP256R1):
        raise ValueError("the enclave's key is not an ECDSA P-256 key")
    mine = keys.generate()
    key = _seal_key(mine.exchange(ec.ECDH(), peer), nonce)
    iv = os.urandom(12)
    body = AESGCM(key).encrypt(iv, json.dumps(config, sort_keys=True).encode(), nonce)
    mine_der = keys.public_der(mine)
    return len(mine_der).to_bytes(2, "big") + mine_der + iv + body


def open_config(enclave_key: ec.EllipticCurvePrivateKey, nonce: bytes, blob: bytes) -> dict[str, Any]:
    """The enclave's side of :func:`seal_config`.

    Raises:
        SealError: the blob was not sealed to this key and nonce, or was altered.
    """
    try:
        n = int.from_bytes(blob[:2], "big")
        peer = serialization.load_der_public_key(blob[2 : 2 + n])
        if not isinstance(peer, ec.EllipticCurvePublicKey) or not isinstance(peer.curve, ec.SECP256R1):
            raise SealError("not a sealed configuration")
        key = _seal_key(enclave_key.exchange(ec.ECDH(), peer), nonce)
        iv, body = blob[2 + n : 14 + n], blob[14 + n :]
        config: dict[str, Any] = json.loads(AESGCM(key).decrypt(iv, body, nonce))
    except (ValueError, InvalidTag, TypeError):
        raise SealError("the sealed configuration does not open") from None
    return config


def tag_mac(run_key: bytes, session: str, service: str, seq: int, tags: list[str]) -> str:
    """The MAC of a tag report: the ``seq``-th report of this run pins ``tags``."""
    message = _TAG_DOMAIN + json.dumps([session, service, seq, tags]).encode()
    return hmac.new(run_key, message, hashlib.sha256).hexdigest()


def check_tag_mac(run_key: bytes, session: str, service: str, seq: int, tags: list[str], mac: str) -> bool:
    return hmac.compare_digest(tag_mac(run_key, session, service, seq, tags), mac)
