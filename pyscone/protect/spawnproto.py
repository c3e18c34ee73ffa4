"""The spawn channel's messages (sans-IO): how a parent enclave gives a fresh child its configuration.

A spawned child boots with no secrets: the host tells it only "your parent is on
fd N".  Everything the app's configuration holds (argv, env, cwd, the FS shield's
FSPF key, the network shield's rules, the console key, the family key) reaches
it over this channel, which the host relays and can neither read nor change:

1. ``HELLO`` parent -> child: a fresh nonce, the parent's ephemeral X25519 key,
   and whether the child must bring a platform quote (the parent knows a
   platform key it trusts) or may bring its bare report.
2. ``EVIDENCE`` child -> parent: the child's ephemeral X25519 key and its
   evidence: its report (MRENCLAVE, MRSIGNER, product id, svn, debug flag) with
   report data ``H(child key, H(HELLO))`` (:func:`pyscone.platform.quote.report_data`),
   as a LAS-signed quote or bare; or "unmeasured" for an unmeasured enclave.
3. The parent checks it (:func:`check_evidence`): the child's identity must be
   the parent's own, bound to this hello.  Both derive one key:
   ``HKDF-SHA256(X25519, salt=nonce, info=domain || H(HELLO || EVIDENCE))``.
4. ``CONFIG`` parent -> child: the configuration, AES-GCM sealed under that key, after the
   parent's proof (:func:`parent_proof`): with a CAS, an HMAC of the transcript under the
   service's spawn key, which a child started with a CAS gets from the CAS (``/v1/join``)
   and checks, so that a host cannot play the parent of a CAS-mode enclave.
5. ``READY`` child -> parent: a sealed acknowledgement; only then does the
   parent's ``Popen`` return (a child that got nothing is reported to the parent).

Why each rule: a replayed ``CONFIG`` is sealed under another run's key and does not
open; a changed ``HELLO`` or ``EVIDENCE`` changes the transcript, so the two sides
derive different keys; a child of another MRENCLAVE is refused before anything is
sealed to it.  Dev mode's limit (see docs/processes.md, "Spawned children"): a bare
report is not signed by anyone the parent trusts, so a host that *forges* one
(rather than starting a different, honest runtime) passes -- exactly the trust dev
mode already places in the host, which hands the enclave its keys in the clear.

Frames on the stream are a u32 big-endian length and the message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pyscone.platform import quote

MAGIC = b"PSSP"
VERSION = 1
NONCE_SIZE = 32
KEY_SIZE = 32
MAX_FRAME = 4 << 20
_HELLO = struct.Struct(">4sBB32s32s")
_EVIDENCE = struct.Struct(">32sBH")
_FRAME = struct.Struct(">I")
_FLAG_QUOTE = 1
_KDF_INFO = b"pyscone-spawn-channel-v1\0"
_CONFIG_AAD = b"pyscone-spawn-config-v1\0"
_READY_AAD = b"pyscone-spawn-ready-v1\0"
_PARENT_DOMAIN = b"pyscone-spawn-parent-v1\0"
_CONFIG_IV = bytes(11) + b"\x01"
_READY_IV = bytes(11) + b"\x02"

#: Evidence kinds.
UNMEASURED, REPORT, QUOTE = 0, 1, 2


class ChannelError(Exception):
    """The other side (or the host between) broke the protocol; nothing is given or taken."""


@dataclass(frozen=True)
class Hello:
    nonce: bytes
    parent_key: bytes
    quote_required: bool

    def pack(self) -> bytes:
        return _HELLO.pack(MAGIC, VERSION, _FLAG_QUOTE if self.quote_required else 0, self.nonce, self.parent_key)

    @classmethod
    def unpack(cls, msg: bytes) -> Hello:
        if len(msg) != _HELLO.size:
            raise ChannelError("malformed hello")
        magic, version, flags, nonce, key = _HELLO.unpack(msg)
        if magic != MAGIC or version != VERSION or flags & ~_FLAG_QUOTE:
            raise ChannelError("not a pyscone spawn hello of this version")
        return cls(nonce, key, bool(flags & _FLAG_QUOTE))


@dataclass(frozen=True)
class Evidence:
    child_key: bytes
    kind: int
    blob: bytes  # the packed report, the quote, or b"" (unmeasured)

    def pack(self) -> bytes:
        return _EVIDENCE.pack(self.child_key, self.kind, len(self.blob)) + self.blob

    @classmethod
    def unpack(cls, msg: bytes) -> Evidence:
        if len(msg) < _EVIDENCE.size:
            raise ChannelError("malformed evidence")
        key, kind, n = _EVIDENCE.unpack_from(msg)
        blob = msg[_EVIDENCE.size :]
        if len(blob) != n or kind not in (UNMEASURED, REPORT, QUOTE) or (kind == UNMEASURED and n):
            raise ChannelError("malformed evidence")
        return cls(key, kind, blob)


def frame(msg: bytes) -> bytes:
    if len(msg) > MAX_FRAME:
        raise ValueError("message too large for the spawn channel")
    return _FRAME.pack(len(msg)) + msg


class Deframer:
    """Bytes in, whole messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> bytes | None:
        if len(self._buf) < _FRAME.size:
            return None
        (n,) = _FRAME.unpack_from(self._buf)
        if n > MAX_FRAME:
            raise ChannelError("oversized frame")
        if len(self._buf) < _FRAME.size + n:
            return None
        msg = bytes(self._buf[_FRAME.size : _FRAME.size + n])
        del self._buf[: _FRAME.size + n]
        return msg


def new_key() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def hello(quote_required: bool) -> tuple[X25519PrivateKey, Hello]:
    """The parent's first message (and its private key)."""
    private, public = new_key()
    return private, Hello(os.urandom(NONCE_SIZE), public, quote_required)


def report_data(child_key: bytes, hello_msg: bytes) -> bytes:
    """What the child's report carries: its key, bound to this hello (nonce and parent key)."""
    return quote.report_data(child_key, hashlib.sha256(hello_msg).digest())


def derive(private: X25519PrivateKey, peer_key: bytes, hello_msg: bytes, evidence_msg: bytes) -> bytes:
    """The channel key both sides derive from the whole transcript."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_key))
    except ValueError:
        raise ChannelError("malformed key") from None
    nonce = Hello.unpack(hello_msg).nonce
    info = _KDF_INFO + hashlib.sha256(hello_msg + evidence_msg).digest()
    return HKDF(hashes.SHA256(), KEY_SIZE, nonce, info).derive(shared)


def check_evidence(
    hello_msg: bytes,
    evidence: Evidence,
    parent: quote.Report | None,
    trusted: Mapping[bytes, ec.EllipticCurvePublicKey] | None,
) -> None:
    """The parent's check: the child is an enclave of the parent's own identity, bound to this hello.

    Args:
        hello_msg: the hello the parent sent (packed).
        evidence: what came back.
        parent: the parent's own report (its identity; the report data is ignored), or
            ``None`` for an unmeasured parent (dev mode: any well-formed evidence passes).
        trusted: platform keys the parent trusts: a quote signed by one is required.

    Raises:
        ChannelError: saying why the child gets nothing.
    """
    if parent is None:
        return
    if evidence.kind == UNMEASURED:
        raise ChannelError("the child is not measured, and the parent is")
    if trusted is not None and evidence.kind != QUOTE:
        raise ChannelError("the child brought no platform quote")
    try:
        if evidence.kind == QUOTE:
            report = quote.verify_quote(evidence.blob, trusted or {})
        else:
            report = quote.Report.unpack(evidence.blob)
    except quote.QuoteError as e:
        raise ChannelError(f"the child's evidence does not verify: {e}") from None
    mine = (parent.mrenclave, parent.mrsigner, parent.product_id, parent.svn, parent.debug)
    theirs = (report.mrenclave, report.mrsigner, report.product_id, report.svn, report.debug)
    if theirs != mine:
        raise ChannelError(
            f"the child is enclave {report.mrenclave.hex()}, not the parent's {parent.mrenclave.hex()}"
            if report.mrenclave != parent.mrenclave
            else "the child's signer, product, version or debug flag is not the parent's"
        )
    if report.report_data != report_data(evidence.child_key, hello_msg):
        raise ChannelError("the child's evidence is not bound to this channel (replayed or relayed)")


def trusted_platform(
    accepted_quote: bytes, public_key: ec.EllipticCurvePublicKey
) -> dict[bytes, ec.EllipticCurvePublicKey]:
    """The platform a CAS-attested parent trusts: the one that signed the quote the CAS accepted.

    ``public_key`` comes from the LAS through the host; it is trusted only if it is the key whose
    id the accepted quote names (SHA-256 of its DER) and that quote's signature verifies under it.

    Raises:
        ChannelError: the key is not that platform's.
    """
    pid = quote.platform_id(public_key)
    try:
        quote.verify_quote(accepted_quote, {pid: public_key})
    except quote.QuoteError as e:
        raise ChannelError(f"the LAS's platform key is not the one the CAS trusted: {e}") from None
    return {pid: public_key}


def parent_proof(spawn_key: bytes | None, hello_msg: bytes, evidence_msg: bytes) -> bytes:
    """What a CAS-attested parent puts before the configuration: an HMAC of the transcript under the
    service's spawn key (which the CAS gives only to the service's attested enclaves), or 32 zero
    bytes without a CAS.  A child started with a CAS checks it, so a host cannot play its parent."""
    if spawn_key is None:
        return bytes(32)
    h = hmac.new(spawn_key, _PARENT_DOMAIN, hashlib.sha256)
    h.update(hashlib.sha256(hello_msg + evidence_msg).digest())
    return h.digest()


def check_parent_proof(spawn_key: bytes, proof: bytes, hello_msg: bytes, evidence_msg: bytes) -> None:
    """Raises ChannelError unless ``proof`` is the transcript's HMAC under ``spawn_key``."""
    if not hmac.compare_digest(proof, parent_proof(spawn_key, hello_msg, evidence_msg)):
        raise ChannelError("the parent is not an attested enclave of this service (no proof of its spawn key)")


def seal_config(key: bytes, config: bytes) -> bytes:
    return AESGCM(key).encrypt(_CONFIG_IV, config, _CONFIG_AAD)


def open_config(key: bytes, sealed: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(_CONFIG_IV, sealed, _CONFIG_AAD)
    except InvalidTag:
        raise ChannelError("the configuration does not open (not sealed for this channel)") from None


def seal_ready(key: bytes) -> bytes:
    return AESGCM(key).encrypt(_READY_IV, b"ready", _READY_AAD)


def check_ready(key: bytes, sealed: bytes) -> None:
    try:
        ok = AESGCM(key).decrypt(_READY_IV, sealed, _READY_AAD) == b"ready"
    except InvalidTag:
        ok = False
    if not ok:
        raise ChannelError("the child's acknowledgement does not open")
