"""What keeps the CAS's database honest against a writer who lacks the master key.

Theory of operation.  The database (a SQLite file, or a PostgreSQL server that other
people administer) is not trusted with more than availability: whoever can write it
but cannot read ``DIR/master.key`` must not be able to change what the CAS decides.
Three tools, all keyed by the master key:

* **Sealing** (AES-256-GCM): a session's policy and secret values, and run keys, with
  associated data that names *every* column that gives them meaning (session, owner,
  version, generation; session, service, volume, run), so a ciphertext cannot be
  moved to another row or kept under a changed owner or version.
* **MACs** (HMAC-SHA256 under a key derived from the master key) over the plain rows
  that decide something: a trusted platform, an FSPF pin, a run's sequence number, and
  each audit event, which also MACs its predecessor's MAC (a hash chain per session),
  so an audit row cannot be altered, inserted or deleted from the middle unnoticed.
* **Generations and the anchor.**  A MAC'd row can still be *replaced by an older
  copy of itself* (a backup restored, a revoked platform's row put back, a pin moved
  back to an old FSPF tag).  Each such record carries a generation that every change
  increases, and the :class:`Anchor` remembers the newest generation this CAS has
  seen of each record, in memory and in ``DIR/anchor.json`` (next to the master key,
  where the database writer cannot reach).  A record older than the anchor, or
  missing while the anchor knows it, is refused.

A refusal is a :class:`Tampered` error that says which record and how; the CAS answers
it with one line and never acts on the record.  What the anchor cannot see: a CAS that
has never read a record (a new replica, or one whose directory was lost) accepts the
state it first finds.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_MAC_INFO = b"pyscone-cas-integrity-v1"
_DERIVE_INFO = b"pyscone-cas keys for enclaves v1"


class Tampered(Exception):
    """A record in the CAS's database was altered, moved back, or deleted by someone
    without the master key.  The message says which and how, in one line."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the CAS's database was tampered with: {what}")


class Keys:
    """The sealing and MAC recipes under one master key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("the master key is 32 bytes")
        self._aead = AESGCM(master_key)
        self._mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO).derive(master_key)
        self._derive_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DERIVE_INFO).derive(master_key)

    @staticmethod
    def _ad(kind: str, fields: tuple[Any, ...]) -> bytes:
        return json.dumps([kind, *fields], separators=(",", ":")).encode()

    def seal(self, data: bytes, kind: str, *bound: Any) -> bytes:
        """Encrypt ``data`` bound to ``kind`` and the ``bound`` fields (JSON values)."""
        iv = os.urandom(12)
        return iv + self._aead.encrypt(iv, data, self._ad(kind, bound))

    def open(self, blob: bytes, what: str, kind: str, *bound: Any) -> bytes:
        """The other side of :meth:`seal`.

        Raises:
            Tampered: ``blob`` was not sealed with these fields (``what`` names the record).
        """
        try:
            return self._aead.decrypt(blob[:12], blob[12:], self._ad(kind, bound))
        except (InvalidTag, ValueError):
            raise Tampered(f"{what}: altered or moved (it does not open under its own fields)") from None

    def mac(self, kind: str, *fields: Any) -> str:
        return hmac.new(self._mac_key, self._ad(kind, fields), hashlib.sha256).hexdigest()

    def derive(self, purpose: str, *fields: Any) -> bytes:
        """A 32-byte key for ``purpose`` and ``fields``, stable for the life of the master key.

        For keys the CAS hands to enclaves (never used for the database's own records).
        """
        return hmac.new(self._derive_key, self._ad(purpose, fields), hashlib.sha256).digest()

    def check(self, mac: str | None, what: str, kind: str, *fields: Any) -> None:
        """Raises:
        Tampered: ``mac`` is not the MAC of these fields."""
        if mac is None or not hmac.compare_digest(self.mac(kind, *fields), mac):
            raise Tampered(f"{what}: altered (its MAC does not verify)")


class Anchor:
    """The newest generation this CAS has seen of each record (by key), so that none moves back.

    Kept in memory and, with ``path``, in a JSON file that several processes on one CAS
    directory share (``cas serve`` and ``cas trust --dir``): each change is merged into
    the file under a lock and replaced atomically and durably.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        if path is not None:
            with self._lock:
                self._reload()

    def _reload(self) -> None:
        """Merge the file into memory if another process changed it (caller holds the lock)."""
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            doc = json.loads(self.path.read_text())
            if not isinstance(doc, dict) or not all(isinstance(v, int) for v in doc.values()):
                raise ValueError("not an object of generations")
        except (OSError, ValueError) as e:
            raise Tampered(f"{self.path}: unreadable ({e})") from None
        for key, gen in doc.items():
            if gen > self._seen.get(key, 0):
                self._seen[key] = gen
        self._stamp = stamp

    def snapshot(self) -> dict[str, int]:
        """What this CAS has seen so far: take it *before* reading the records it checks,
        so a change that another thread commits (and remembers) meanwhile is no false alarm."""
        with self._lock:
            if self.path is not None:
                self._reload()
            return dict(self._seen)

    def seen(self, key: str) -> int:
        return self.snapshot().get(key, 0)

    def check(self, mark: dict[str, int], key: str, gen: int, what: str) -> None:
        """Accept generation ``gen`` of record ``key`` (read after ``mark`` was taken), and
        remember it.

        Raises:
            Tampered: this CAS had seen a newer generation of it (``what`` says what it means).
        """
        if gen < mark.get(key, 0):
            raise Tampered(what)
        self.advance(key, gen)

    def advance(self, key: str, gen: int) -> None:
        with self._lock:
            if gen <= self._seen.get(key, 0):
                return
            self._seen[key] = gen
            if self.path is not None:
                self._persist()

    def _persist(self) -> None:
        assert self.path is not None
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._stamp = None
            self._reload()  # another process's newer generations are kept, not overwritten
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(self._seen, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            st = os.stat(self.path)
            self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
