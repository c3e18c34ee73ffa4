"""The family hello: a mutual handshake between two enclaves of one family on a host stream (sans-IO).

Theory of operation
-------------------
A ``multiprocessing`` connection to a Unix socket path (a ``Manager``, a
``Listener``/``Client`` pair) is a host stream that any local process may connect
to and that the host relays.  Before its first byte of data, both ends prove that
they hold the family key (``enclave/family.py``) and agree on a channel id that no
other connection has; from then on the stream is a sealed channel of
``protect/famseal`` under that id (``enclave/stdlib/mpconn.py``).  Three messages,
each of a fixed size, each opening with ``magic (4) | version (1) | kind (1)``::

    HELLO    client -> server   head | Nc (16)
    ANSWER   server -> client   head | Ns (16) | HMAC(Km, "server" | HELLO | head | Ns)
    CONFIRM  client -> server   head | HMAC(Km, "client" | HELLO | ANSWER | head)

    Km         = HKDF-SHA256(family key, info = "pyscone family hello mac v1")
    channel id = HMAC(Ki, HELLO | ANSWER)[:16],
    Ki         = HKDF-SHA256(family key, info = "pyscone family hello channel v1")

Why each rule:

* Both sides contribute a fresh random nonce, and each MAC covers the whole
  transcript up to it: a MAC made for one connection verifies in no other.  A host
  that replays an earlier connection's bytes into a new one fails at the first MAC
  of the side whose nonce is new; a host that replays only the records that followed
  an earlier handshake sends them under another channel id, whose keys differ
  (famseal derives them from the id), so they do not open.
* The two MACs carry different labels, so a server's answer can never serve as a
  client's confirmation (a peer without the key that gets answers from one server
  learns nothing it can use to confirm to another, or to the same one).
* Km and Ki are derived from the family key with their own info strings, never the
  famseal channel keys' (``famseal._INFO``): no key of this handshake is a key of a
  channel, and the family key itself keys nothing directly.
* The sizes are fixed and each message opens with its own head, so a reader takes
  exactly one message off the stream (never a byte of what follows) and can tell
  from the first bytes that a peer does not speak the family hello at all
  (:func:`check_prefix`): a non-family process, or a native ``multiprocessing``
  peer, is refused without waiting for bytes it will never send.

What it does not hide: that two processes talk, when, and how much (the host sees
the lengths of the sealed records that follow), as for every family channel.

Nothing here does I/O or reads a clock (``os.urandom`` draws the nonces unless the
caller passes them): the enclave and the tests drive the same code.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"PSFH"
VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 16
MAC_SIZE = 32
CHANNEL_ID_SIZE = 16  # famseal.CHANNEL_ID_SIZE
_HEAD = struct.Struct(">4sBB")  # magic, version, kind
HELLO, ANSWER, CONFIRM = 1, 2, 3
_NAMES = {HELLO: "hello", ANSWER: "answer", CONFIRM: "confirmation"}
HELLO_SIZE = _HEAD.size + NONCE_SIZE
ANSWER_SIZE = _HEAD.size + NONCE_SIZE + MAC_SIZE
CONFIRM_SIZE = _HEAD.size + MAC_SIZE
#: The size of each kind of message.
SIZES = {HELLO: HELLO_SIZE, ANSWER: ANSWER_SIZE, CONFIRM: CONFIRM_SIZE}
_MAC_INFO = b"pyscone family hello mac v1"
_ID_INFO = b"pyscone family hello channel v1"
_SERVER_LABEL = b"server\0"
_CLIENT_LABEL = b"client\0"

# The two state machines (h11's "transitions as data"): (role, state, step) -> the next state.
# A step from any other state, or any step after a failure, is an error.
_TRANSITIONS = {
    ("client", "start", "hello"): "sent hello",
    ("client", "sent hello", "answer"): "done",
    ("server", "start", "hello"): "answered",
    ("server", "answered", "confirm"): "done",
}


class HelloError(Exception):
    """The peer (or the host between) did not complete the family hello: not a family member,
    a message changed, replayed, cut short or out of order.  Detail-free beyond a short reason."""


def _keys(family_key: bytes) -> tuple[bytes, bytes]:
    if len(family_key) != KEY_SIZE:
        raise ValueError("the family key must be 32 bytes")
    mac = HKDF(hashes.SHA256(), 32, salt=None, info=_MAC_INFO).derive(family_key)
    ident = HKDF(hashes.SHA256(), 32, salt=None, info=_ID_INFO).derive(family_key)
    return mac, ident


def _head(kind: int) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, kind)


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def check_prefix(kind: int, data: bytes | bytearray | memoryview) -> None:
    """Whether ``data`` (the first bytes received so far) can begin a message of ``kind``.

    Raises:
        HelloError: it cannot (another protocol, another version, another message).
    """
    got = bytes(data[: _HEAD.size])
    if got[: len(MAGIC)] != MAGIC[: len(got)]:
        raise HelloError("the peer does not speak the family hello (not a member of this family)")
    if len(got) > len(MAGIC) and got[len(MAGIC)] != VERSION:
        raise HelloError(f"the peer speaks version {got[len(MAGIC)]} of the family hello, this runtime {VERSION}")
    if len(got) > len(MAGIC) + 1 and got[len(MAGIC) + 1] != kind:
        raise HelloError(f"a family hello message out of order (expected the {_NAMES[kind]})")


def _parse(kind: int, msg: bytes | bytearray | memoryview) -> bytes:
    """The body of a whole message of ``kind``."""
    msg = bytes(msg)
    if len(msg) != SIZES[kind]:
        raise HelloError(f"a family hello {_NAMES[kind]} of {len(msg)} bytes (it has {SIZES[kind]})")
    check_prefix(kind, msg)
    return msg[_HEAD.size :]


class _Side:
    role = ""

    def __init__(self, family_key: bytes, nonce: bytes | None) -> None:
        self._mac_key, self._id_key = _keys(family_key)
        self.nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"a family hello nonce is {NONCE_SIZE} bytes")
        self.state = "start"
        self._channel_id: bytes | None = None

    def _step(self, step: str) -> None:
        nxt = _TRANSITIONS.get((self.role, self.state, step))
        if nxt is None:
            raise HelloError(f"the {self.role} of a family hello cannot take the {step} step now ({self.state})")
        self.state = nxt

    def _fail(self, reason: str) -> HelloError:
        self.state = "failed"
        return HelloError(reason)

    def _derive(self, hello: bytes, answer: bytes) -> None:
        self._channel_id = _mac(self._id_key, hello, answer)[:CHANNEL_ID_SIZE]

    @property
    def channel_id(self) -> bytes:
        """The connection's channel id (16 bytes), once the hello is done on this side.

        Raises:
            HelloError: it is not done.
        """
        if self.state != "done" or self._channel_id is None:
            raise HelloError("the family hello is not done")
        return self._channel_id


class Client(_Side):
    """The connecting side: :meth:`hello`, then :meth:`answer` with the server's answer."""

    role = "client"

    def __init__(self, family_key: bytes, nonce: bytes | None = None) -> None:
        super().__init__(family_key, nonce)
        self._hello = _head(HELLO) + self.nonce

    def hello(self) -> bytes:
        """The first message (:data:`HELLO_SIZE` bytes), to send."""
        self._step("hello")
        return self._hello

    def answer(self, msg: bytes | bytearray | memoryview) -> bytes:
        """Take the server's answer; return the confirmation to send (the channel id is then set).

        Raises:
            HelloError: the answer is not one of a member of this family, for this hello.
        """
        self._step("answer")
        try:
            body = _parse(ANSWER, msg)
        except HelloError as e:
            raise self._fail(str(e)) from None
        answer = bytes(msg)
        head, nonce, mac = answer[: _HEAD.size], body[:NONCE_SIZE], body[NONCE_SIZE:]
        if not hmac.compare_digest(mac, _mac(self._mac_key, _SERVER_LABEL, self._hello, head, nonce)):
            raise self._fail("the listener's family hello does not verify (not a member of this family, or changed)")
        confirm_head = _head(CONFIRM)
        self._derive(self._hello, answer)
        return confirm_head + _mac(self._mac_key, _CLIENT_LABEL, self._hello, answer, confirm_head)


class Server(_Side):
    """The accepting side: :meth:`hello` with the client's hello, then :meth:`confirm`."""

    role = "server"

    def __init__(self, family_key: bytes, nonce: bytes | None = None) -> None:
        super().__init__(family_key, nonce)
        self._hello = b""
        self._answer = b""

    def hello(self, msg: bytes | bytearray | memoryview) -> bytes:
        """Take the client's hello; return the answer to send.

        Raises:
            HelloError: it is no family hello.
        """
        self._step("hello")
        try:
            _parse(HELLO, msg)
        except HelloError as e:
            raise self._fail(str(e)) from None
        self._hello = bytes(msg)
        head = _head(ANSWER)
        self._answer = head + self.nonce + _mac(self._mac_key, _SERVER_LABEL, self._hello, head, self.nonce)
        return self._answer

    def confirm(self, msg: bytes | bytearray | memoryview) -> None:
        """Take the client's confirmation (the channel id is then set).

        Raises:
            HelloError: it is not one of a member of this family, for this connection.
        """
        self._step("confirm")
        try:
            body = _parse(CONFIRM, msg)
        except HelloError as e:
            raise self._fail(str(e)) from None
        want = _mac(self._mac_key, _CLIENT_LABEL, self._hello, self._answer, bytes(msg)[: _HEAD.size])
        if not hmac.compare_digest(body, want):
            raise self._fail("the client's family hello does not verify (not a member of this family, or changed)")
        self._derive(self._hello, self._answer)


__all__ = [
    "ANSWER_SIZE",
    "CHANNEL_ID_SIZE",
    "CONFIRM_SIZE",
    "HELLO_SIZE",
    "Client",
    "HelloError",
    "Server",
    "check_prefix",
]
