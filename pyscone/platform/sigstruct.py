"""The enclave signature (a SIGSTRUCT analogue) and signer keys (sans-IO).

An enclave's author signs its MRENCLAVE together with a product id, a security
version (SVN) and whether the enclave may run in debug mode.  The enclave refuses to
start unless its own measurement is the one signed (SGX's EINIT check), and it then
reports MRSIGNER = SHA-256 of the signer's public key, so a CAS policy can trust
"every enclave this author signed for product P with SVN ≥ n" instead of a list of
MRENCLAVEs that changes with every release.

Signer keys are ECDSA P-256 (SGX uses RSA-3072; the verifier does not care which,
and P-256 keys are small).  The signature is stored as a small JSON document.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from pyscone.platform import keys
from pyscone.platform.measure import MRENCLAVE_SIZE

_DOMAIN = b"pyscone-sigstruct-v1\0"
_BODY = struct.Struct(">32sHH?")  # mrenclave, product id, svn, debug allowed
MAX_U16 = 0xFFFF


class SignatureError(Exception):
    """An enclave signature is malformed, altered, or not for this enclave."""


@dataclass(frozen=True, slots=True)
class SigStruct:
    mrenclave: bytes
    product_id: int
    svn: int
    debug: bool  # True: the enclave may also run as a debug enclave
    signer: bytes  # the signer's public key, DER SubjectPublicKeyInfo
    signature: bytes  # ECDSA over _DOMAIN || body, DER

    @property
    def mrsigner(self) -> bytes:
        return hashlib.sha256(self.signer).digest()

    def body(self) -> bytes:
        return _DOMAIN + _BODY.pack(self.mrenclave, self.product_id, self.svn, self.debug)

    def encode(self) -> bytes:
        doc = {
            "version": 1,
            "mrenclave": self.mrenclave.hex(),
            "product_id": self.product_id,
            "svn": self.svn,
            "debug": self.debug,
            "signer": base64.b64encode(self.signer).decode(),
            "signature": base64.b64encode(self.signature).decode(),
        }
        return (json.dumps(doc, indent=2) + "\n").encode()


def _check_fields(mrenclave: bytes, product_id: int, svn: int) -> None:
    if len(mrenclave) != MRENCLAVE_SIZE:
        raise ValueError(f"MRENCLAVE is {MRENCLAVE_SIZE} bytes")
    for name, value in (("product id", product_id), ("security version", svn)):
        if not 0 <= value <= MAX_U16:
            raise ValueError(f"{name} must be between 0 and {MAX_U16}")


def sign(mrenclave: bytes, key: ec.EllipticCurvePrivateKey, *, product_id: int, svn: int, debug: bool) -> SigStruct:
    """Sign an enclave.

    Raises:
        ValueError: a field is out of range.
    """
    _check_fields(mrenclave, product_id, svn)
    signer = keys.public_der(key)
    unsigned = SigStruct(mrenclave, product_id, svn, debug, signer, b"")
    signature = key.sign(unsigned.body(), ec.ECDSA(hashes.SHA256()))
    return SigStruct(mrenclave, product_id, svn, debug, signer, signature)


def decode(blob: bytes) -> SigStruct:
    """Parse and verify an encoded signature (its own signature; not yet the enclave's match).

    Raises:
        SignatureError: malformed, or the signature does not verify.
    """
    try:
        doc: dict[str, Any] = json.loads(blob)
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise SignatureError("not a version 1 enclave signature")
        product_id, svn, debug = doc["product_id"], doc["svn"], doc["debug"]
        if type(product_id) is not int or type(svn) is not int or type(debug) is not bool:
            raise SignatureError("malformed enclave signature (field types)")
        s = SigStruct(
            bytes.fromhex(doc["mrenclave"]),
            product_id,
            svn,
            debug,
            base64.b64decode(doc["signer"], validate=True),
            base64.b64decode(doc["signature"], validate=True),
        )
        _check_fields(s.mrenclave, s.product_id, s.svn)
        public = keys.load_public_der(s.signer)
    except SignatureError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise SignatureError(f"malformed enclave signature ({type(e).__name__})") from None
    try:
        public.verify(s.signature, s.body(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError("the enclave signature does not verify") from None
    return s


def mrsigner_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    return hashlib.sha256(keys.public_der(key)).digest()
