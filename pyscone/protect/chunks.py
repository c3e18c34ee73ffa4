"""Sealing file chunks: the file-system shield's cryptographic core (sans-IO).

A protected file is a sequence of chunks of at most ``chunk_size`` plaintext bytes.
Each chunk is stored as one *record*::

    nonce (12) || body || tag (16)

* ``encrypted`` regions: body = AES-256-GCM ciphertext of the chunk;
* ``authenticated`` regions: body = the plaintext itself, and the tag is a GCM tag
  over it (GMAC: the plaintext goes in as associated data, nothing is encrypted).

The associated data binds every record to its place: the file's identity (16
random bytes chosen when the file is created, never reused), the chunk's index,
and its plaintext length.  A record moved to another index or another file, or
cut short, no longer verifies.  Freshness is the FSPF's job: it keeps every
chunk's tag, so a record that verifies but is not the latest (a rolled-back
chunk) is refused because its tag is not the one the FSPF expects.

Nonces are random (96 bits) and each record gets a new one; a file key is used
for at most about 2^32 chunk writes before the file should be re-keyed (NIST
SP 800-38D), which the shield enforces by counting writes in the FSPF.

Nothing here touches a file, a socket or a clock: the enclave, the ``pyscone
fspf`` tools and the tests drive the same functions.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32
FILE_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
DEFAULT_CHUNK_SIZE = 4096
MAX_CHUNK_SIZE = 1 << 20

_AD = struct.Struct("<16sQI")  # file id, chunk index, plaintext length
_AD_PREFIX = b"pyscone-chunk\x01"


class IntegrityError(Exception):
    """Protected data failed verification.  Deliberately says nothing more."""


@dataclass(frozen=True, slots=True)
class FileKey:
    """What it takes to seal and open one file's chunks."""

    key: bytes
    file_id: bytes
    encrypted: bool = True
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE:
            raise ValueError(f"a file key is {KEY_SIZE} bytes, not {len(self.key)}")
        if len(self.file_id) != FILE_ID_SIZE:
            raise ValueError(f"a file id is {FILE_ID_SIZE} bytes, not {len(self.file_id)}")
        if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes")

    @classmethod
    def generate(cls, *, encrypted: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileKey:
        return cls(os.urandom(KEY_SIZE), os.urandom(FILE_ID_SIZE), encrypted, chunk_size)


@functools.lru_cache(maxsize=256)
def _aead(key: bytes) -> AESGCM:
    # Building the cipher object costs about as much as sealing a small chunk: keep it.
    return AESGCM(key)


def _ad(fk: FileKey, index: int, length: int) -> bytes:
    if index < 0:
        raise ValueError("chunk index must not be negative")
    return _AD_PREFIX + _AD.pack(fk.file_id, index, length)


def seal_chunk(fk: FileKey, index: int, plaintext: bytes, *, nonce: bytes | None = None) -> bytes:
    """Seal chunk ``index`` of a file.  Returns the record to store.

    Args:
        fk: the file's key material.
        index: the chunk's position in the file (0-based).
        plaintext: at most ``fk.chunk_size`` bytes.
        nonce: only for known-answer tests; normally a fresh random nonce is drawn.

    Raises:
        ValueError: the chunk is too large or the nonce has the wrong size.
    """
    if len(plaintext) > fk.chunk_size:
        raise ValueError(f"chunk of {len(plaintext)} bytes exceeds the chunk size {fk.chunk_size}")
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    ad = _ad(fk, index, len(plaintext))
    aead = _aead(fk.key)
    if fk.encrypted:
        return nonce + aead.encrypt(nonce, plaintext, ad)
    return nonce + plaintext + aead.encrypt(nonce, b"", ad + plaintext)


def record_tag(record: bytes) -> bytes:
    """The tag of a record: what the FSPF keeps to pin the chunk's exact version."""
    if len(record) < OVERHEAD:
        raise IntegrityError("record too short")
    return record[-TAG_SIZE:]


def open_chunk(fk: FileKey, index: int, record: bytes, expected_tag: bytes | None = None) -> bytes:
    """Verify and open chunk ``index``.  Returns its plaintext.

    Args:
        fk: the file's key material.
        index: where the caller expects this chunk to be.
        record: the stored record, exactly as read.
        expected_tag: the tag the FSPF pins for this chunk (``None`` only in tests).

    Raises:
        IntegrityError: the record was altered, moved, truncated, belongs to another
            file, or is not the version the FSPF expects.
    """
    if len(record) < OVERHEAD or len(record) - OVERHEAD > fk.chunk_size:
        raise IntegrityError("record has an impossible size")
    if expected_tag is not None and record[-TAG_SIZE:] != expected_tag:
        raise IntegrityError("chunk is not the expected version")
    nonce, body = record[:NONCE_SIZE], record[NONCE_SIZE:]
    length = len(body) - TAG_SIZE
    ad = _ad(fk, index, length)
    aead = _aead(fk.key)
    try:
        if fk.encrypted:
            return aead.decrypt(nonce, body, ad)
        plaintext = body[:length]
        aead.decrypt(nonce, body[length:], ad + plaintext)
        return plaintext
    except InvalidTag:
        raise IntegrityError("chunk failed verification") from None


def chunk_count(length: int, chunk_size: int) -> int:
    """How many chunks a file of ``length`` bytes has (an empty file has none)."""
    return -(-length // chunk_size)
