"""What travels with descriptors one family member passes to another (``SCM_RIGHTS``): sans-IO.

Theory of operation
-------------------
The kernel carries the descriptors themselves (host fds: the host passes them
on); what an enclave must know about each one -- a host socket of which family
and type, a host file with which flags, a pipe end on which sealed channel and
in which direction, a sealed socketpair end -- comes from the sender inside a
*notice*, written as the first bytes of the message the descriptors are attached
to::

    head   = magic "PSFD" | body length (u16, big-endian)
    body   = nonce (12) | AES-256-GCM(JSON notice) | tag (16)     (AAD: the head)
    notice = {"member", "seq", "len": payload bytes after the notice, "fds": [entry, ...]}

The key is HKDF-SHA256 of the family key (its own info string), so only an
enclave of the family can write a notice another will open; the nonce is random
(96 bits, one key per family: far from a collision at any count a family sends).
The sender numbers its notices (``seq``, per member id, which every forked child
draws anew); a receiver refuses a notice whose number is not above the last one
it opened from that member (a replay to the same process).

Known limits: a notice binds neither the socket nor the receiver, so a host can
deliver a family member's notice to *another* member instead, or to two members
once each (what a host that connects sockets to listeners of its choosing can do
anyway); and it can drop a message, or any of the descriptors (denial of service).
What it cannot do is make an enclave believe a descriptor is a sealed channel no
member gave, or give one channel's descriptor as another's.

Nothing here does I/O: the enclave (``enclave/stdlib/fdpass.py``) and the tests
drive the same code.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"PSFD"
HEAD = struct.Struct(">4sH")
NONCE_SIZE = 12
TAG_SIZE = 16
#: The most descriptors one message carries (Linux's SCM_MAX_FD).
MAX_FDS = 253
#: The largest body: every descriptor's entry with room to spare; a notice fits one host call.
MAX_BODY = 32768
_INFO = b"pyscone descriptor notice v1"

#: An entry: ["socket", family, type, proto, nonblocking] | ["file", flags, nonblocking]
#: | ["pipe", channel id (hex), reading, nonblocking]
#: | ["pair", channel id (hex), out, family, type, proto, nonblocking]
Entry = list[Any]


class NoticeError(Exception):
    """A notice that does not open: forged, tampered, cut, of another family, malformed or replayed."""


@dataclass(frozen=True)
class Notice:
    member: bytes
    seq: int
    length: int  # the payload bytes the sender wrote after the notice
    fds: list[Entry]


def notice_key(family_key: bytes) -> bytes:
    if len(family_key) != 32:
        raise ValueError("the family key must be 32 bytes")
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO)
    return kdf.derive(family_key)


def seal(key: bytes, notice: Notice) -> bytes:
    """The bytes to send first: the head and the sealed body."""
    if not 0 < len(notice.fds) <= MAX_FDS:
        raise ValueError(f"a notice names 1 to {MAX_FDS} descriptors")
    plain = json.dumps(
        {"member": notice.member.hex(), "seq": notice.seq, "len": notice.length, "fds": notice.fds},
        separators=(",", ":"),
    ).encode()
    size = NONCE_SIZE + len(plain) + TAG_SIZE
    if size > MAX_BODY:
        raise ValueError("a notice too large")
    head = HEAD.pack(MAGIC, size)
    nonce = os.urandom(NONCE_SIZE)
    return head + nonce + AESGCM(key).encrypt(nonce, plain, head)


def starts_notice(data: bytes) -> bool:
    """Whether ``data`` (the first bytes that came with descriptors) may begin a notice."""
    n = min(len(data), len(MAGIC))
    return n > 0 and data[:n] == MAGIC[:n]


def body_size(head: bytes) -> int:
    """The body's size from a head (``HEAD.size`` bytes)."""
    if len(head) != HEAD.size:
        raise NoticeError("a cut notice")
    magic, size = HEAD.unpack(head)
    if magic != MAGIC:
        raise NoticeError("not a descriptor notice")
    if not NONCE_SIZE + TAG_SIZE < size <= MAX_BODY:
        raise NoticeError(f"a notice body of {size} bytes")
    return int(size)


_KINDS = {"socket": 5, "file": 3, "pipe": 4, "pair": 7}


def open_notice(key: bytes, head: bytes, body: bytes) -> Notice:
    """Open a notice (its ``head`` and ``body`` as received)."""
    if len(body) != body_size(head):
        raise NoticeError("a cut notice")
    try:
        plain = AESGCM(key).decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], head)
    except InvalidTag:
        raise NoticeError("a notice that does not open (forged, changed, or of another family)") from None
    try:
        doc = json.loads(plain)
        member, seq, length, fds = bytes.fromhex(doc["member"]), doc["seq"], doc["len"], doc["fds"]
    except (ValueError, KeyError, TypeError) as e:
        raise NoticeError(f"a malformed notice: {e}") from None
    ok = isinstance(seq, int) and isinstance(length, int) and seq >= 1 and length >= 0 and len(member) == 8
    if not ok or not isinstance(fds, list) or not 0 < len(fds) <= MAX_FDS:
        raise NoticeError("a malformed notice")
    for entry in fds:
        if not isinstance(entry, list) or not entry or _KINDS.get(entry[0]) != len(entry):
            raise NoticeError(f"a malformed descriptor entry {entry!r:.60}")
    return Notice(member, seq, length, fds)


class Replays:
    """The last notice number opened from each member, in this process."""

    def __init__(self) -> None:
        self._last: dict[bytes, int] = {}

    def check(self, notice: Notice) -> None:
        if notice.seq <= self._last.get(notice.member, 0):
            raise NoticeError(f"a replayed notice (number {notice.seq} of a member already past it)")
        self._last[notice.member] = notice.seq
