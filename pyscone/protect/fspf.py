"""The file-system protection file (FSPF): regions, per-file keys and chunk tags (sans-IO).

After SCONE's FSPF.  It says, for a path prefix (a *region*), how files below it are
protected; for every protected file, its key material, its length and the tag of
each of its chunks; and which directories of protected regions exist though no
listed file implies them (what exists there is the FSPF's alone: ``namespace.py``).
The chunk tags make every chunk fresh: a record that verifies but is not the one
the FSPF lists (an older version of the chunk) is refused.  The FSPF itself is sealed
with AES-256-GCM under the *FSPF key*; its GCM tag, the *FSPF tag*, names one exact
version, and pinning it (in the policy, at the CAS) catches a rollback of the whole
file system.

Region kinds:

* ``unprotected`` — passed through to the host as is;
* ``authenticated`` — plaintext on the host, every chunk integrity-protected;
* ``encrypted`` — ciphertext on the host, every chunk authenticated-encrypted;
* ``memory`` — kept in enclave memory only, never written to the host.

The longest matching prefix wins, matched by whole path components (``/data``
covers ``/data/x`` but not ``/database``); a root region ``/`` is required so
every path has exactly one answer.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pyscone.protect import chunks as _chunks
from pyscone.protect.chunks import (
    DEFAULT_CHUNK_SIZE,
    FILE_ID_SIZE,
    KEY_SIZE,
    MAX_CHUNK_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    FileKey,
    IntegrityError,
    chunk_count,
)

KINDS = ("unprotected", "authenticated", "encrypted", "memory")
FORMAT_VERSION = 1
_MAGIC = b"PYSFSPF1"


@dataclass(frozen=True, slots=True)
class Region:
    prefix: str
    kind: str
    chunk_size: int = DEFAULT_CHUNK_SIZE  # for files created in the region

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes")
        if self.kind not in KINDS:
            raise ValueError(f"region kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.prefix.startswith("/") or posixpath.normpath(self.prefix) != self.prefix:
            raise ValueError(f"region prefix {self.prefix!r} must be a normalized absolute path")

    def covers(self, path: str) -> bool:
        return self.prefix == "/" or path == self.prefix or path.startswith(self.prefix + "/")


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One protected file: its key material, committed length, chunk tags, and for each
    chunk which of its two record slots on the host holds the committed version.

    Packed, so that a commit of a large file copies memory instead of looping in Python:
    ``tags`` is every chunk's 16-byte tag end to end, ``slots`` one byte (0 or 1) a chunk.

    ``store`` is set only while a rename is in flight: the host path that still holds
    the records (normally they live at the file's own path).
    """

    key: FileKey
    length: int = 0
    tags: bytes = b""
    slots: bytes = b""
    store: str = ""

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError("file length must not be negative")
        n = chunk_count(self.length, self.key.chunk_size)
        if len(self.tags) != n * TAG_SIZE:
            raise ValueError(f"a file of {self.length} bytes has {n} chunks: {n * TAG_SIZE} bytes of tags")
        if not self.slots and self.tags:
            object.__setattr__(self, "slots", bytes(n))
        if len(self.slots) != n or self.slots.translate(None, b"\x00\x01"):
            raise ValueError("every chunk needs a slot bit (0 or 1)")

    @property
    def chunks(self) -> int:
        return len(self.slots)

    def tag(self, index: int) -> bytes:
        return self.tags[index * TAG_SIZE : (index + 1) * TAG_SIZE]


@dataclass
class FSPF:
    regions: list[Region] = field(default_factory=lambda: [Region("/", "unprotected")])
    files: dict[str, FileEntry] = field(default_factory=dict)
    #: Directories in protected regions that exist though no listed file lies below them
    #: (made by the app, or left when their last file went): see ``protect/namespace.py``.
    dirs: set[str] = field(default_factory=set)
    #: Counts the commits of this table: of two copies on the host the higher is the newer
    #: (``enclave/shields/fspfcopies.py``).  0 (a table the tools wrote) is not encoded.
    generation: int = 0

    def region_for(self, path: str) -> Region:
        """The region that governs ``path`` (a normalized absolute path): longest prefix wins."""
        best: Region | None = None
        for r in self.regions:
            if r.covers(path) and (best is None or len(r.prefix) > len(best.prefix)):
                best = r
        if best is None:
            raise ValueError("the FSPF has no root region")
        return best

    def add_region(self, prefix: str, kind: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        region = Region(prefix, kind, chunk_size)
        if any(r.prefix == prefix for r in self.regions):
            raise ValueError(f"a region for {prefix} already exists")
        self.regions.append(region)

    def validate(self) -> None:
        if not any(r.prefix == "/" for r in self.regions):
            raise ValueError("the FSPF needs a root region '/'")
        prefixes = [r.prefix for r in self.regions]
        if len(prefixes) != len(set(prefixes)):
            raise ValueError("two regions have the same prefix")
        for path, entry in self.files.items():
            kind = self.region_for(path).kind
            if kind not in ("authenticated", "encrypted"):
                raise ValueError(f"{path} has a file entry but lies in a {kind} region")
            if entry.key.encrypted != (kind == "encrypted"):
                raise ValueError(f"{path}: its key does not match its {kind} region")
        for d in self.dirs:
            if not isinstance(d, str) or not d.startswith("/") or posixpath.normpath(d) != d:
                raise ValueError(f"directory {d!r} is not a normalized absolute path")
            kind = self.region_for(d).kind
            if kind not in ("authenticated", "encrypted"):
                raise ValueError(f"directory {d} lies in a {kind} region")
            if d in self.files:
                raise ValueError(f"{d} is listed as a file and as a directory")

    # -- encoding ---------------------------------------------------------------------------

    def to_json(self) -> bytes:
        """Canonical encoding: the same FSPF always gives the same bytes."""
        doc: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "regions": [
                {"prefix": r.prefix, "kind": r.kind, "chunk_size": r.chunk_size}
                for r in sorted(self.regions, key=lambda r: r.prefix)
            ],
            "files": {
                path: {
                    "key": _b64(e.key.key),
                    "id": _b64(e.key.file_id),
                    "encrypted": e.key.encrypted,
                    "chunk_size": e.key.chunk_size,
                    "length": e.length,
                    "tags": _b64(e.tags),
                    "slots": e.slots.translate(_SLOT_DIGITS).decode(),
                    **({"store": e.store} if e.store else {}),
                }
                for path, e in sorted(self.files.items())
            },
        }
        if self.dirs:  # only when there are some: an FSPF without any keeps its encoding
            doc["dirs"] = sorted(self.dirs)
        if self.generation:
            doc["generation"] = self.generation
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> FSPF:
        try:
            doc = json.loads(raw)
            if doc["version"] != FORMAT_VERSION:
                raise ValueError(f"FSPF format version {doc['version']} is not supported")
            regions = [Region(r["prefix"], r["kind"], int(r["chunk_size"])) for r in doc["regions"]]
            files = {}
            for path, f in doc["files"].items():
                key = FileKey(_unb64(f["key"]), _unb64(f["id"]), bool(f["encrypted"]), int(f["chunk_size"]))
                slot_bits = str(f["slots"]).encode().translate(_SLOT_BITS)
                files[path] = FileEntry(key, int(f["length"]), _unb64(f["tags"]), slot_bits, str(f.get("store", "")))
            dirs = doc.get("dirs", [])
            if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
                raise ValueError("dirs is not a list of paths")
            generation = doc.get("generation", 0)
            if type(generation) is not int or generation < 0:
                raise ValueError("generation is not a count")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed FSPF: {e}") from None
        fspf = cls(regions, files, set(dirs), generation)
        fspf.validate()
        return fspf


_SLOT_DIGITS = bytes.maketrans(b"\x00\x01", b"01")
_SLOT_BITS = bytes.maketrans(b"01", b"\x00\x01")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode(), validate=True)


def generate_fspf_key() -> bytes:
    return os.urandom(KEY_SIZE)


def seal(fspf: FSPF, fspf_key: bytes, *, nonce: bytes | None = None) -> tuple[bytes, str]:
    """Seal an FSPF.  Returns the bytes to store and the FSPF tag (hex) that names them."""
    fspf.validate()
    nonce = _chunks.random_bytes(NONCE_SIZE) if nonce is None else nonce
    blob = _MAGIC + nonce + AESGCM(fspf_key).encrypt(nonce, fspf.to_json(), _MAGIC)
    return blob, blob[-TAG_SIZE:].hex()


def tag_of(blob: bytes) -> str:
    """The FSPF tag of a sealed FSPF, without opening it."""
    if len(blob) < len(_MAGIC) + NONCE_SIZE + TAG_SIZE or not blob.startswith(_MAGIC):
        raise IntegrityError("not a sealed FSPF")
    return blob[-TAG_SIZE:].hex()


def open_sealed(blob: bytes, fspf_key: bytes, expected_tag: str | None = None) -> FSPF:
    """Verify and open a sealed FSPF.

    Args:
        blob: the stored bytes.
        fspf_key: the FSPF key (from the CAS in production).
        expected_tag: the pinned FSPF tag; a valid but different (older) FSPF is refused.

    Raises:
        IntegrityError: wrong key, altered bytes, or not the pinned version.
    """
    tag = tag_of(blob)
    if expected_tag is not None and tag != expected_tag.lower():
        raise IntegrityError("the FSPF is not the pinned version")
    nonce = blob[len(_MAGIC) : len(_MAGIC) + NONCE_SIZE]
    try:
        raw = AESGCM(fspf_key).decrypt(nonce, blob[len(_MAGIC) + NONCE_SIZE :], _MAGIC)
    except InvalidTag:
        raise IntegrityError("the FSPF failed verification") from None
    return FSPF.from_json(raw)


__all__ = [
    "FILE_ID_SIZE", "FSPF", "KINDS", "FileEntry", "Region", "generate_fspf_key", "open_sealed", "seal", "tag_of",
]  # fmt: skip
