"""The CAS's message formats (sans-IO): owner-signed requests, sealed configurations, tag reports.

**Owner requests.**  A session belongs to the key that created it.  Every owner
request carries that key's public half, a random request nonce and an ECDSA signature
over the method, the path, a timestamp, the nonce, the owner key, the CAS it is for
(the SHA-256 of the CAS's certificate, which the client already holds to verify TLS)
and the SHA-256 of the body.  The CAS accepts it within :data:`MAX_SKEW` seconds of
its clock, only if it names this CAS, and only once: it remembers *what was signed*
(the digest of the signed message) for that long, not the signature bytes.  An ECDSA
signature ``(r, s)`` has a twin ``(r, n - s)`` that verifies the same message, so a
replay memory keyed by the signature let a captured request be replayed with its
twin; signatures must also be canonical (low ``s``, strict DER), which the signer
ensures.  A captured request cannot be replayed, sent to another CAS, or reused for
another body.

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
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pyscone.platform import keys

MAX_SKEW = 300  # seconds an owner request's timestamp may differ from the CAS's clock
H_OWNER, H_TIME, H_NONCE, H_SIGNATURE = "x-pyscone-owner", "x-pyscone-time", "x-pyscone-nonce", "x-pyscone-signature"
_REQUEST_DOMAIN = b"pyscone-owner-request-v2\n"
_SEAL_INFO = b"pyscone-sealed-config-v1"
_TAG_DOMAIN = b"pyscone-tag-report-v1\n"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


class AuthError(Exception):
    """An owner request is not authentic (or is stale, or replayed, or for another CAS)."""


class SealError(Exception):
    """A sealed configuration does not open."""


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of a certificate (DER): how an enclave pins its CAS, and how an owner's
    request names the CAS it is for.

    Raises:
        ValueError: not a PEM certificate.
    """
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def owner_id(public_der: bytes) -> str:
    return hashlib.sha256(public_der).hexdigest()


def _request_message(
    method: str, path: str, timestamp: str, nonce: str, owner: str, audience: str, body: bytes
) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    fields = (method.upper(), path, timestamp, nonce, owner, audience.lower(), digest)
    return _REQUEST_DOMAIN + "\n".join(fields).encode()


def canonical_signature(signature: bytes) -> bytes:
    """The low-``s`` form of a DER ECDSA P-256 signature (the one the CAS accepts)."""
    r, s = decode_dss_signature(signature)
    return encode_dss_signature(r, min(s, _P256_ORDER - s))


def sign_request(
    key: ec.EllipticCurvePrivateKey, method: str, path: str, body: bytes, now: float, audience: str
) -> dict[str, str]:
    """The headers that make a request the owner's, for the CAS whose certificate has the
    SHA-256 ``audience``."""
    timestamp, nonce = str(int(now)), os.urandom(16).hex()
    der = keys.public_der(key)
    message = _request_message(method, path, timestamp, nonce, owner_id(der), audience, body)
    signature = canonical_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return {
        H_OWNER: base64.b64encode(der).decode(),
        H_TIME: timestamp,
        H_NONCE: nonce,
        H_SIGNATURE: base64.b64encode(signature).decode(),
    }


def verify_request(
    headers: Mapping[str, str], method: str, path: str, body: bytes, now: float, audience: str
) -> tuple[str, str]:
    """Check an owner request made for the CAS whose certificate has the SHA-256 ``audience``.

    Returns:
        the owner's id, and the request's id for the caller's replay memory: the SHA-256 of
        the signed message, so every signature of one request has the same id.

    Raises:
        AuthError: missing, malformed, stale, forged, not canonical, or for another CAS.
    """
    try:
        der = base64.b64decode(headers[H_OWNER], validate=True)
        timestamp, nonce = headers[H_TIME], headers[H_NONCE]
        signature = base64.b64decode(headers[H_SIGNATURE], validate=True)
        public = serialization.load_der_public_key(der)
    except (KeyError, ValueError, TypeError):
        raise AuthError("the request is not signed by an owner key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise AuthError("an owner key is an ECDSA P-256 key")
    if (
        not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12)
        or abs(int(timestamp) - now) > MAX_SKEW
    ):
        raise AuthError("the request's time is too far from the CAS's clock (or replayed late)")
    if not _HEX32.match(nonce):
        raise AuthError("the request has no valid nonce")
    try:
        canonical = canonical_signature(signature) == signature
    except ValueError:
        canonical = False
    if not canonical:
        raise AuthError("the request's signature is not in canonical form (DER, low s)")
    owner = owner_id(der)
    message = _request_message(method, path, timestamp, nonce, owner, audience, body)
    try:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AuthError("the request's signature does not verify (forged, altered, or for another CAS)") from None
    return owner, hashlib.sha256(message).hexdigest()


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


def tag_mac(run_key: bytes, session: str, service: str, seq: int, tags: list[str], after: str | None = None) -> str:
    """The MAC of a tag report: the ``seq``-th report of this run pins ``tags`` (following the
    pinned tag ``after``, if it names one; else ``tags[0]`` must be pinned)."""
    fields: list[object] = [session, service, seq, tags]
    if after is not None:
        fields.append(after)
    message = _TAG_DOMAIN + json.dumps(fields).encode()
    return hmac.new(run_key, message, hashlib.sha256).hexdigest()


def check_tag_mac(
    run_key: bytes, session: str, service: str, seq: int, tags: list[str], mac: str, after: str | None = None
) -> bool:
    return hmac.compare_digest(tag_mac(run_key, session, service, seq, tags, after), mac)
