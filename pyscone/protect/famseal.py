"""Sealed stream records between the enclaves of a family (pipes, socketpairs): sans-IO.

Theory of operation
-------------------
A *channel* is one pipe or one socketpair that crossed a fork: its bytes travel
through the host, which may read, change, drop, replay, reorder or split them.
Each member that writes to it cuts what it writes into *records*::

    header = member (8) | seq (u64, big-endian) | length (u32, big-endian)
    record = header | AES-256-GCM(ciphertext of `length` bytes) | tag (16)

* The key is the channel's: HKDF-SHA256 of the family key, the 16-byte random
  channel id and the direction (a pipe has one; a socketpair two, one per end
  that writes).  A record of one channel, or of the other direction, does not
  open under another's key; the AAD binds the header, the channel id and the
  direction again (so the format says what it protects even without the KDF).
* The nonce is the 12 bytes ``member (8) | seq (its low 32 bits, 4)``, and a
  writer refuses to seal a 2**32nd record under one key (far beyond what a pipe
  carries), so no two records sealed under one key ever share a nonce.  Members are 8 random bytes,
  drawn again in every forked child (``enclave/family.py``), so two processes
  never write under one member id.
* A reader refuses a record whose ``seq`` is not greater than the last one it
  opened from the same member: a replay, or a reordering of one writer's records.

Known limits (what a reader can and cannot check)
-------------------------------------------------
* Several readers of one channel (a pipe whose read end two processes hold, as
  ``multiprocessing.Queue`` does) each receive a *subset* of every writer's
  records, whichever the kernel hands them.  A reader therefore checks only that
  each writer's sequence numbers *increase*; it cannot tell a record the host
  dropped from one another reader took.  The host can thus delete whole records
  (and, since one reader may be the only one, also cut the stream short at a record
  boundary: an early end of file).  Denial of service is out of the threat model;
  what the host can never do is make a reader accept bytes no member wrote, bytes
  of another channel or direction, a member's record twice, or a member's records
  out of order.
* Records of *different* writers carry no common order: the host may reorder
  them relative to each other, which is what concurrent writers look like anyway.
* The length of each record (so the sizes of the app's writes, cut at
  ``MAX_PLAIN``) and the timing are visible to the host.

Nothing here does I/O or reads a clock: the enclave (``shields/famchan.py``) and
the tests drive the same code.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MEMBER_SIZE = 8
CHANNEL_ID_SIZE = 16
KEY_SIZE = 32
TAG_SIZE = 16
HEADER = struct.Struct(">8sQI")  # member, seq, plaintext length
OVERHEAD = HEADER.size + TAG_SIZE
#: The largest plaintext of one record: a record then fits one 64 KiB host call with room to spare.
MAX_PLAIN = 65536 - 1024
MAX_RECORD = OVERHEAD + MAX_PLAIN
#: Sequence numbers a writer may use under one key (the nonce holds their low 32 bits).
MAX_SEQ = 1 << 32
_INFO = b"pyscone family channel v1"


class SealError(Exception):
    """A record that does not open: tampered, forged, replayed, reordered, truncated,
    oversized or of another channel.  Deliberately detail-free beyond a short reason."""


def channel_key(family_key: bytes, channel: bytes, direction: int) -> bytes:
    """The key of one direction of one channel."""
    if len(family_key) != KEY_SIZE:
        raise ValueError("the family key must be 32 bytes")
    if len(channel) != CHANNEL_ID_SIZE:
        raise ValueError("a channel id is 16 bytes")
    if direction not in (0, 1):
        raise ValueError("a direction is 0 or 1")
    hkdf = HKDF(hashes.SHA256(), KEY_SIZE, salt=None, info=_INFO + channel + bytes([direction]))
    return hkdf.derive(family_key)


def _aad(header: bytes, channel: bytes, direction: int) -> bytes:
    return header + channel + bytes([direction])


def _nonce(member: bytes, seq: int) -> bytes:
    return member + (seq & 0xFFFFFFFF).to_bytes(4, "big")


@dataclass
class Writer:
    """One member's sealing state for one direction of one channel.

    A forked child must not reuse its parent's ``Writer`` (it has a new member id:
    see :meth:`for_member`)."""

    key: bytes
    channel: bytes
    direction: int
    member: bytes
    seq: int = 0
    _aead: AESGCM = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.member) != MEMBER_SIZE:
            raise ValueError("a member id is 8 bytes")
        self._aead = AESGCM(self.key)

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """One record of ``data`` (at most :data:`MAX_PLAIN` bytes).

        Raises:
            ValueError: ``data`` is too long, or this writer used up its sequence numbers.
        """
        if len(data) > MAX_PLAIN:
            raise ValueError(f"a record holds at most {MAX_PLAIN} bytes")
        self.seq += 1
        if self.seq >= MAX_SEQ:
            raise ValueError("this writer sealed 2**32 records under one key")
        header = HEADER.pack(self.member, self.seq, len(data))
        ct = self._aead.encrypt(_nonce(self.member, self.seq), bytes(data), _aad(header, self.channel, self.direction))
        return header + ct

    def seal_all(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """``data`` cut into records of at most :data:`MAX_PLAIN` bytes (one empty record for b"")."""
        view = memoryview(data).cast("B")
        if not view:
            yield self.seal(b"")
        for i in range(0, len(view), MAX_PLAIN):
            yield self.seal(view[i : i + MAX_PLAIN])


class Reader:
    """The opening state of one reader of one direction of one channel: feed it bytes in
    any split, take whole plaintexts out.

    After a :class:`SealError` the reader stays broken (every later call raises it again):
    a stream that lost its framing cannot be trusted to regain it."""

    def __init__(self, key: bytes, channel: bytes, direction: int) -> None:
        self._aead = AESGCM(key)
        self.channel = channel
        self.direction = direction
        self._buf = bytearray()
        self._last: dict[bytes, int] = {}  # member -> last seq opened
        self._broken: str | None = None

    def _fail(self, reason: str) -> SealError:
        self._broken = reason
        self._buf.clear()
        return SealError(reason)

    def need(self) -> int:
        """How many more bytes complete the record at the front (the header's 16 if unknown)."""
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        n: int = HEADER.unpack_from(self._buf, 0)[2]
        return max(0, HEADER.size + min(n, MAX_PLAIN + 1) + TAG_SIZE - len(self._buf))

    def completes(self, more: bytes | bytearray | memoryview) -> bool:
        """Whether ``more`` bytes (peeked, not fed) would complete the record at the front."""
        if len(self._buf) + len(more) < HEADER.size:
            return False
        head = (bytes(self._buf) + bytes(more[: HEADER.size]))[: HEADER.size]
        n: int = HEADER.unpack(head)[2]
        return len(self._buf) + len(more) >= HEADER.size + min(n, MAX_PLAIN + 1) + TAG_SIZE

    def pending(self) -> bool:
        """Whether part of a record is buffered (an end of file now would be a truncation)."""
        return bool(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take ``data``; return the plaintexts of the records it completed (empty ones too).

        Raises:
            SealError: a record that does not open or arrives out of order.
        """
        if self._broken is not None:
            raise SealError(self._broken)
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            member, seq, n = HEADER.unpack_from(self._buf, 0)
            if n > MAX_PLAIN:
                raise self._fail("a sealed record is longer than any writer makes")
            end = HEADER.size + n + TAG_SIZE
            if len(self._buf) < end:
                break
            if not 0 < seq < MAX_SEQ:
                raise self._fail("a sealed record has an impossible sequence number")
            header = bytes(self._buf[: HEADER.size])
            body = bytes(self._buf[HEADER.size : end])
            try:
                plain = self._aead.decrypt(_nonce(member, seq), body, _aad(header, self.channel, self.direction))
            except InvalidTag:
                raise self._fail("a sealed record does not verify (changed, forged, or of another channel)") from None
            if seq <= self._last.get(member, 0):
                raise self._fail("a sealed record was replayed or reordered")
            self._last[member] = seq
            del self._buf[:end]
            out.append(plain)
        return out

    def abandon(self) -> int:
        """Forget the part of a record buffered (its writer died in the middle of sending it, on a
        stream that ended there); how many bytes were dropped.  None of them was ever delivered."""
        n = len(self._buf)
        self._buf.clear()
        return n

    def eof(self) -> None:
        """The stream ended.

        Raises:
            SealError: it ended inside a record (truncated).
        """
        if self._broken is not None:
            raise SealError(self._broken)
        if self._buf:
            raise self._fail("a sealed stream ends inside a record")
