"""Reports, quotes and their verification (sans-IO).

A *report* says who an enclave is (MRENCLAVE, MRSIGNER, product id, security version,
debug flag) and carries 64 bytes of *report data* the enclave chose: pyscone puts
there a hash of the enclave's ephemeral public key and the verifier's nonce
(:func:`report_data`), which binds the quote to one key and one challenge.

A *quote* is a report signed by a platform attestation key.  With SGX the CPU makes
the report and a quoting enclave signs it; in simulation ``pyscone las`` stands in
for both (it signs the report the enclave hands it, as SCONE's simulation mode does).
The format has a version field so that a DCAP quote verifier can sit beside this one.

Wire format (big-endian)::

    magic "PSQ1" | report (135 bytes) | platform id (32) | signature length (2) | signature

    report = version (2) | mrenclave (32) | mrsigner (32) | product id (2) | svn (2)
             | flags (1, bit 0: debug) | report data (64)

The platform id is SHA-256 of the platform's public key (DER); the verifier looks
the key up among the platforms it trusts.  :class:`Expected` is what a verifier
requires of the enclave, and :meth:`Expected.check` says why a report fails it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from pyscone.platform import keys

MAGIC = b"PSQ1"
REPORT_VERSION = 1
REPORT_DATA_SIZE = 64
_REPORT = struct.Struct(">H32s32sHHB64s")
_SIGLEN = struct.Struct(">H")
REPORT_SIZE = _REPORT.size
_FLAG_DEBUG = 1
_SIGNED_DOMAIN = b"pyscone-quote-v1\0"
_REPORT_DATA_DOMAIN = b"pyscone-report-data-v1\0"
MAX_QUOTE_SIZE = 4096


class QuoteError(Exception):
    """A quote is malformed, forged, from an untrusted platform, or not what is expected.

    The message is for the verifier's operator; an enclave must not be told it.
    """


@dataclass(frozen=True, slots=True)
class Report:
    mrenclave: bytes
    mrsigner: bytes
    product_id: int
    svn: int
    debug: bool
    report_data: bytes

    def pack(self) -> bytes:
        """Raises ValueError if a field is out of range."""
        if len(self.mrenclave) != 32 or len(self.mrsigner) != 32:
            raise ValueError("MRENCLAVE and MRSIGNER are 32 bytes")
        if len(self.report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report data is {REPORT_DATA_SIZE} bytes")
        flags = _FLAG_DEBUG if self.debug else 0
        try:
            return _REPORT.pack(
                REPORT_VERSION, self.mrenclave, self.mrsigner, self.product_id, self.svn, flags, self.report_data
            )
        except struct.error as e:
            raise ValueError(f"report field out of range: {e}") from None

    @classmethod
    def unpack(cls, blob: bytes) -> Report:
        """Raises QuoteError if ``blob`` is not a well-formed report."""
        if len(blob) != REPORT_SIZE:
            raise QuoteError("malformed report (size)")
        version, mrenclave, mrsigner, product_id, svn, flags, data = _REPORT.unpack(blob)
        if version != REPORT_VERSION:
            raise QuoteError(f"unknown report version {version}")
        if flags & ~_FLAG_DEBUG:
            raise QuoteError("malformed report (unknown flags)")
        return cls(mrenclave, mrsigner, product_id, svn, bool(flags & _FLAG_DEBUG), data)


def report_data(enclave_public_key: bytes, nonce: bytes) -> bytes:
    """What an enclave puts in its report: binds the quote to its key and the verifier's nonce."""
    h = hashlib.sha512()
    for part in (_REPORT_DATA_DOMAIN, len(enclave_public_key).to_bytes(4, "big"), enclave_public_key, nonce):
        h.update(part)
    return h.digest()


def platform_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return hashlib.sha256(keys.public_der(public_key)).digest()


def sign_quote(report: Report, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The platform's side: sign ``report`` (the LAS does this)."""
    body = report.pack()
    pid = platform_id(key.public_key())
    signature = key.sign(_SIGNED_DOMAIN + body + pid, ec.ECDSA(hashes.SHA256()))
    return MAGIC + body + pid + _SIGLEN.pack(len(signature)) + signature


def verify_quote(blob: bytes, trusted: Mapping[bytes, ec.EllipticCurvePublicKey]) -> Report:
    """Check a quote's form and signature; return its report.

    Args:
        blob: the quote as received.
        trusted: the platforms the verifier trusts, by platform id.

    Raises:
        QuoteError: malformed, from a platform not in ``trusted``, or the signature fails.
    """
    if len(blob) > MAX_QUOTE_SIZE or len(blob) < len(MAGIC) + REPORT_SIZE + 32 + _SIGLEN.size:
        raise QuoteError("malformed quote (size)")
    if blob[:4] != MAGIC:
        raise QuoteError("not a pyscone quote")
    pos = len(MAGIC)
    body = blob[pos : pos + REPORT_SIZE]
    pid = blob[pos + REPORT_SIZE : pos + REPORT_SIZE + 32]
    pos += REPORT_SIZE + 32
    (n,) = _SIGLEN.unpack_from(blob, pos)
    signature = blob[pos + _SIGLEN.size :]
    if len(signature) != n:
        raise QuoteError("malformed quote (signature length)")
    report = Report.unpack(body)
    key = trusted.get(pid)
    if key is None:
        raise QuoteError(f"quote from an untrusted platform {pid.hex()[:16]}")
    try:
        key.verify(signature, _SIGNED_DOMAIN + body + pid, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise QuoteError("the quote's signature does not verify") from None
    return report


@dataclass(frozen=True)
class Expected:
    """What a verifier requires of an enclave: an allowed MRENCLAVE, or a signer.

    A report passes if its MRENCLAVE is in ``mrenclaves``, or if ``mrsigner`` is set
    and the report has that MRSIGNER, that product id and at least ``min_svn``.  Debug
    enclaves pass only if ``allow_debug``.
    """

    mrenclaves: frozenset[bytes] = field(default_factory=frozenset)
    mrsigner: bytes | None = None
    product_id: int = 0
    min_svn: int = 0
    allow_debug: bool = False

    def check(self, report: Report) -> None:
        """Raises QuoteError saying why ``report`` is not acceptable."""
        if report.debug and not self.allow_debug:
            raise QuoteError("debug enclave, and the policy requires a production enclave")
        if report.mrenclave in self.mrenclaves:
            return
        if self.mrsigner is None:
            raise QuoteError(f"MRENCLAVE {report.mrenclave.hex()} is not allowed")
        if report.mrsigner != self.mrsigner:
            raise QuoteError(f"MRSIGNER {report.mrsigner.hex()} is not the expected signer")
        if report.product_id != self.product_id:
            raise QuoteError(f"product id {report.product_id} is not {self.product_id}")
        if report.svn < self.min_svn:
            raise QuoteError(f"security version {report.svn} is below the minimum {self.min_svn}")
