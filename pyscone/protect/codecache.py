"""Sealing bytecode-cache entries (sans-IO): the recipes behind the enclave's verified cache.

Theory of operation
-------------------
Compiling a big framework from source at every start is most of an enclave's start-up
(``import django`` compiles ~400 files).  CPython's own cache (``__pycache__``) cannot be
used after the measurement: a ``.pyc`` is whatever the host wrote, and checking that it
is what the source compiles to costs the compilation it was meant to save.  So the
enclave keeps its own cache on untrusted storage, and trusts an entry only because it
sealed it itself:

* an entry is the ``marshal`` of a code object, sealed with AES-256-GCM under a key only
  enclaves of the same identity hold (the CAS derives it per session and service; in
  dev mode the launcher keeps one, as it keeps every other dev-mode key), so the host
  can neither read an entry (the bytecode of an encrypted source is as secret as the
  source) nor forge one;
* an entry holds the SHA-256 of the source it was compiled from, and is used only if
  that is the digest of the source bytes the enclave just read (and measured): the
  cache is keyed by the measured source, never by a host's timestamp;
* an entry is found by its *name*, a keyed hash of the path it was compiled as
  (``co_filename``) and the interpreter's bytecode format, so the enclave can ask for
  it while it reads the source (one round trip to the host, not two);
* the name is the entry's associated data: an entry moved to another name does not open.

What the host can still do is what it can do to any file: delete an entry (the enclave
compiles again, and stores a new one) or put back an older one (of an older source: not
used).  It can never make the enclave run code that is not what the measured source
compiles to, nor read the code of an encrypted source.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import os
import sys
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32
NONCE_SIZE = 12
DIGEST_SIZE = 32
MAGIC = b"pyscone-pyc\x01"
#: The first bytes of every entry's file; what follows is nonce || AES-GCM(marshal(code)).
HEADER = MAGIC


def interpreter_tag() -> bytes:
    """What makes one interpreter's bytecode unusable by another (magic number, tag, -O level)."""
    tag = sys.implementation.cache_tag or sys.implementation.name
    return importlib.util.MAGIC_NUMBER + f"|{tag}|O{sys.flags.optimize}".encode()


class CacheIntegrityError(Exception):
    """An entry did not open under its name and the cache key.  Deliberately says nothing more."""


def _subkey(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, b"pyscone-codecache\x00" + label, hashlib.sha256).digest()


@dataclass(frozen=True)
class CacheKey:
    """The two keys derived from one cache key: one names entries, one seals them.

    Args:
        key: 32 secret bytes (the CAS's or the dev-mode launcher's).
        interpreter: what makes bytecode of one interpreter unusable by another
            (``importlib.util.MAGIC_NUMBER``, the cache tag, the optimization level).

    Raises:
        ValueError: the key is not 32 bytes.
    """

    key: bytes = field(repr=False)
    interpreter: bytes
    _name_key: bytes = field(init=False, repr=False)
    _aead: AESGCM = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE:
            raise ValueError(f"a bytecode-cache key is {KEY_SIZE} bytes, not {len(self.key)}")
        object.__setattr__(self, "_name_key", _subkey(self.key, b"name"))
        object.__setattr__(self, "_aead", AESGCM(_subkey(self.key, b"seal")))

    def name(self, path: str) -> str:
        """The file name (hex) of the entry for the module compiled as ``path``.

        Keyed (the host learns nothing it does not know: it serves ``path``), and of the
        path alone, so the enclave can ask for the entry while it reads the source.
        """
        mac = hmac.new(self._name_key, digestmod=hashlib.sha256)
        for part in (self.interpreter, os.fsencode(path)):
            mac.update(len(part).to_bytes(4, "little") + part)
        return mac.hexdigest()[:40]

    def pack(self, name: str, source_sha256: bytes, code: bytes) -> bytes:
        """The sealed entry ``name``: the code (marshalled) of the source with this digest."""
        if len(source_sha256) != DIGEST_SIZE:
            raise ValueError("source_sha256 is a SHA-256 digest")
        return self.seal(name, source_sha256 + code)

    def unpack(self, name: str, blob: bytes, source_sha256: bytes) -> bytes | None:
        """The marshalled code in entry ``name`` if it is of this source (None: of another one).

        Raises:
            CacheIntegrityError: ``blob`` is not an entry this key sealed under ``name``.
        """
        payload = self.open(name, blob)
        if len(payload) < DIGEST_SIZE:
            raise CacheIntegrityError("bytecode-cache entry too short")
        if not hmac.compare_digest(payload[:DIGEST_SIZE], source_sha256):
            return None  # the source changed since (or the host put back an older entry)
        return payload[DIGEST_SIZE:]

    def seal(self, name: str, payload: bytes) -> bytes:
        """The bytes of the entry ``name`` holding ``payload`` (a marshalled code object)."""
        nonce = os.urandom(NONCE_SIZE)
        return HEADER + nonce + self._aead.encrypt(nonce, payload, name.encode())

    def open(self, name: str, blob: bytes) -> bytes:
        """The payload of the entry ``name``.

        Raises:
            CacheIntegrityError: ``blob`` is not an entry this key sealed under ``name``.
        """
        head = len(HEADER)
        if len(blob) < head + NONCE_SIZE + 16 or blob[:head] != HEADER:
            raise CacheIntegrityError("not a bytecode-cache entry")
        nonce = blob[head : head + NONCE_SIZE]
        try:
            return self._aead.decrypt(nonce, blob[head + NONCE_SIZE :], name.encode())
        except InvalidTag:
            raise CacheIntegrityError("bytecode-cache entry failed verification") from None
