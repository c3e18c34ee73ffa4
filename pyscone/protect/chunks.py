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
from collections.abc import Sequence
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

#: What a chunk or record may be passed as.
Data = bytes | bytearray | memoryview

_AD_TAIL = struct.Struct("<QI")  # after prefix and file id: chunk index, plaintext length
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
        return cls(random_bytes(KEY_SIZE), random_bytes(FILE_ID_SIZE), encrypted, chunk_size)


#: Where keys, file ids and nonces come from: the OS's random bytes.  Only a reproducible image
#: build (``pyscone/image/build.py``, on the owner's machine) swaps in a generator seeded from a
#: secret key *and a digest of every plaintext it protects*, so that the same inputs give the same
#: bytes and different inputs never share a key (hence never a key and a nonce).  The enclave never
#: changes it.
random_bytes = os.urandom


@functools.lru_cache(maxsize=256)
def _aead(key: bytes) -> AESGCM:
    # Building the cipher object costs about as much as sealing a small chunk: keep it.
    return AESGCM(key)


def seal_chunk(fk: FileKey, index: int, plaintext: Data, *, nonce: bytes | None = None) -> bytes:
    """Seal chunk ``index`` of a file.  Returns the record to store.

    Args:
        fk: the file's key material.
        index: the chunk's position in the file (0-based).
        plaintext: at most ``fk.chunk_size`` bytes.
        nonce: only for known-answer tests; normally a fresh random nonce is drawn.

    Raises:
        ValueError: the chunk is too large or the nonce has the wrong size.
    """
    if nonce is not None and len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    record = bytearray(len(plaintext) + OVERHEAD)
    seal_run_into(fk, index, [plaintext], memoryview(record), nonces=nonce)
    return bytes(record)


def seal_run_into(
    fk: FileKey, first: int, plaintexts: Sequence[Data], out: memoryview, *, nonces: bytes | None = None
) -> list[bytes]:
    """Seal chunks ``first, first + 1, …`` into ``out``, their records back to back.

    Every plaintext but the last must be a full chunk (a short record ends a run), and
    ``out`` is exactly as long as the records.  One draw of random bytes gives the run
    its nonces (``nonces`` only for known-answer tests).  Returns the records' tags, in
    order.  This is the loop a writer spends its time in: no copy beyond the cipher's.

    Raises:
        ValueError: a chunk is too large, or ``out`` does not fit the records.
    """
    cs = fk.chunk_size
    n = len(plaintexts)
    if first < 0:
        raise ValueError("chunk index must not be negative")
    if n and (len(plaintexts[-1]) > cs or any(len(pt) != cs for pt in plaintexts[:-1])):
        raise ValueError(f"chunks exceed the chunk size {cs}, or a short one is not last")
    if len(out) != sum(len(pt) for pt in plaintexts) + n * OVERHEAD:
        raise ValueError("the output does not fit the records")
    nonces = random_bytes(NONCE_SIZE * n) if nonces is None else nonces
    aead = _aead(fk.key)
    head = _AD_PREFIX + fk.file_id
    pack = _AD_TAIL.pack
    tags = []
    p = 0
    for k, plaintext in enumerate(plaintexts):
        size = len(plaintext)
        nonce = nonces[k * NONCE_SIZE : (k + 1) * NONCE_SIZE]
        ad = head + pack(first + k, size)
        end = p + size + OVERHEAD
        out[p : p + NONCE_SIZE] = nonce
        if fk.encrypted:
            aead.encrypt_into(nonce, plaintext, ad, out[p + NONCE_SIZE : end])
        else:
            out[p + NONCE_SIZE : end - TAG_SIZE] = plaintext
            aead.encrypt_into(nonce, b"", ad + bytes(plaintext), out[end - TAG_SIZE : end])
        tags.append(out[end - TAG_SIZE : end].tobytes())
        p = end
    return tags


def record_tag(record: Data) -> bytes:
    """The tag of a record: what the FSPF keeps to pin the chunk's exact version."""
    if len(record) < OVERHEAD:
        raise IntegrityError("record too short")
    return bytes(record[-TAG_SIZE:])


def open_chunk(fk: FileKey, index: int, record: Data, expected_tag: bytes | None = None) -> bytes:
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
    out = bytearray(len(record) - OVERHEAD)
    tag = record_tag(record) if expected_tag is None else expected_tag
    open_run_into(fk, index, memoryview(record), memoryview(tag), memoryview(out))
    return bytes(out)


def open_run_into(fk: FileKey, first: int, blob: memoryview, tags: memoryview, out: memoryview) -> None:
    """Verify chunks ``first, first + 1, …`` and write their plaintext to ``out``.

    ``blob`` holds their records back to back, and must be enclave memory (a copy the
    host can no longer change); ``tags`` holds the tags the FSPF pins for them, back to
    back; ``out`` is as long as their plaintext.  Every chunk but the last is full.
    When verification fails ``out`` is zeroed before the error is raised: the caller's
    buffer never holds unverified plaintext.  This is the loop a reader spends its
    time in.

    Raises:
        IntegrityError: as :func:`open_chunk`.
    """
    cs = fk.chunk_size
    n = len(tags) // TAG_SIZE
    if first < 0:
        raise ValueError("chunk index must not be negative")
    if (
        len(tags) != n * TAG_SIZE
        or len(blob) != len(out) + n * OVERHEAD
        or len(out) > n * cs
        or (n > 1 and len(out) <= (n - 1) * cs)
    ):
        raise IntegrityError("record has an impossible size")
    aead = _aead(fk.key)
    head = _AD_PREFIX + fk.file_id
    pack = _AD_TAIL.pack
    encrypted = fk.encrypted
    p = d = t = 0
    last = first + n - 1
    tail = len(out) - (n - 1) * cs  # every chunk but the last is full
    try:
        for index in range(first, first + n):
            size = cs if index != last else tail
            end = p + size + OVERHEAD
            if blob[end - TAG_SIZE : end] != tags[t : t + TAG_SIZE]:
                raise IntegrityError("chunk is not the expected version")
            nonce, ad = blob[p : p + NONCE_SIZE], head + pack(index, size)
            if encrypted:
                aead.decrypt_into(nonce, blob[p + NONCE_SIZE : end], ad, out[d : d + size])
            else:
                plaintext = blob[p + NONCE_SIZE : end - TAG_SIZE]
                aead.decrypt(nonce, blob[end - TAG_SIZE : end], ad + plaintext.tobytes())
                out[d : d + size] = plaintext
            p = end
            d += size
            t += TAG_SIZE
    except (InvalidTag, IntegrityError) as e:
        out[:] = bytes(len(out))
        if isinstance(e, IntegrityError):
            raise
        raise IntegrityError("chunk failed verification") from None


def chunk_count(length: int, chunk_size: int) -> int:
    """How many chunks a file of ``length`` bytes has (an empty file has none)."""
    return -(-length // chunk_size)
