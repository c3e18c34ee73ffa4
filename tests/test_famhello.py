"""The family hello (protect/famhello.py): a known answer, honest runs, and every way a run can be broken."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscone.protect import famhello
from pyscone.protect.famhello import HelloError

KEY = bytes(range(32))
keys = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=16, max_size=16)


def run(
    key: bytes, server_key: bytes | None = None, nc: bytes | None = None, ns: bytes | None = None
) -> tuple[famhello.Client, famhello.Server, list[bytes]]:
    """An honest run; returns both sides and the three messages."""
    c, s = famhello.Client(key, nc), famhello.Server(server_key or key, ns)
    hello = c.hello()
    answer = s.hello(hello)
    confirm = c.answer(answer)
    s.confirm(confirm)
    return c, s, [hello, answer, confirm]


def test_a_known_run() -> None:
    # Pins the format: a change to it (sizes, labels, info strings) must be deliberate.
    c, s, (hello, answer, confirm) = run(KEY, nc=b"\x01" * 16, ns=b"\x02" * 16)
    assert hello == b"PSFH\x01\x01" + b"\x01" * 16
    assert answer[:22] == b"PSFH\x01\x02" + b"\x02" * 16
    assert (len(hello), len(answer), len(confirm)) == (22, 54, 38)
    assert confirm[:6] == b"PSFH\x01\x03"
    assert answer.hex()[44:] == KNOWN_SERVER_MAC
    assert confirm.hex()[12:] == KNOWN_CLIENT_MAC
    assert c.channel_id == s.channel_id == bytes.fromhex(KNOWN_CHANNEL)


KNOWN_SERVER_MAC = "819840adfbfce1343d8de3bad36512bda065e043c8446daba486847d600230a1"
KNOWN_CLIENT_MAC = "c50fc4a4eae21b8f9c5a9605e22f10fbeb2f498f1b559f4cc1dc053f2fcdf9da"
KNOWN_CHANNEL = "6d31d30273db847d0e58407b8c62a03a"


def test_the_known_run_is_what_the_module_docstring_says() -> None:
    # The formulas of famhello's docstring, written out with hmac and HKDF (not the module's code).
    km = HKDF(hashes.SHA256(), 32, salt=None, info=b"pyscone family hello mac v1").derive(KEY)
    ki = HKDF(hashes.SHA256(), 32, salt=None, info=b"pyscone family hello channel v1").derive(KEY)
    hello = b"PSFH\x01\x01" + b"\x01" * 16
    head, ns = b"PSFH\x01\x02", b"\x02" * 16
    server_mac = hmac.new(km, b"server\0" + hello + head + ns, hashlib.sha256).digest()
    answer = head + ns + server_mac
    client_mac = hmac.new(km, b"client\0" + hello + answer + b"PSFH\x01\x03", hashlib.sha256).digest()
    channel = hmac.new(ki, hello + answer, hashlib.sha256).digest()[:16]
    assert (server_mac.hex(), client_mac.hex(), channel.hex()) == (KNOWN_SERVER_MAC, KNOWN_CLIENT_MAC, KNOWN_CHANNEL)


@given(keys, nonces, nonces)
def test_honest_runs_agree_on_a_channel_id(key: bytes, nc: bytes, ns: bytes) -> None:
    c, s, msgs = run(key, nc=nc, ns=ns)
    assert c.channel_id == s.channel_id
    assert len(c.channel_id) == famhello.CHANNEL_ID_SIZE
    assert [len(m) for m in msgs] == [famhello.HELLO_SIZE, famhello.ANSWER_SIZE, famhello.CONFIRM_SIZE]
    for i, m in enumerate(msgs):
        kind = (famhello.HELLO, famhello.ANSWER, famhello.CONFIRM)[i]
        for n in range(len(m) + 1):
            famhello.check_prefix(kind, m[:n])  # every prefix of a real message may go on


def test_every_run_has_a_channel_id_of_its_own() -> None:
    ids = {run(KEY)[0].channel_id for _ in range(200)}
    assert len(ids) == 200
    # Either side's fresh nonce alone makes a new id.
    nc, ns = os.urandom(16), os.urandom(16)
    base = run(KEY, nc=nc, ns=ns)[0].channel_id
    assert run(KEY, nc=nc, ns=ns)[0].channel_id == base
    assert run(KEY, nc=os.urandom(16), ns=ns)[0].channel_id != base
    assert run(KEY, nc=nc, ns=os.urandom(16))[0].channel_id != base
    assert run(os.urandom(32), nc=nc, ns=ns)[0].channel_id != base


@given(keys, keys)
def test_a_peer_without_the_family_key_fails_both_ways(key: bytes, other: bytes) -> None:
    if key == other:
        return
    c, s = famhello.Client(key), famhello.Server(other)
    with pytest.raises(HelloError, match="listener's family hello does not verify"):
        c.answer(s.hello(c.hello()))
    # A client without the key cannot confirm to a server that has it.
    c, s = famhello.Client(other), famhello.Server(key)
    answer = s.hello(c.hello())
    with pytest.raises(HelloError):
        c.answer(answer)
    with pytest.raises(HelloError, match="client's family hello does not verify"):
        s.confirm(b"PSFH\x01\x03" + os.urandom(32))


@settings(max_examples=300)
@given(st.sampled_from([1, 2]), st.data())
def test_a_changed_byte_anywhere_fails(which: int, data: st.DataObject) -> None:
    # The hello itself is only a nonce (a changed one is another hello, which the answer's MAC then
    # covers: the client, who sent the original, refuses the answer).  So: change one bit of the
    # hello on its way to the server, or of the answer, or of the confirmation.
    c, s = famhello.Client(KEY), famhello.Server(KEY)
    msgs = [c.hello()]
    pos = data.draw(st.integers(0, [famhello.HELLO_SIZE, famhello.ANSWER_SIZE, famhello.CONFIRM_SIZE][which] - 1))
    bit = data.draw(st.integers(0, 7))
    flip = data.draw(st.sampled_from(["hello", "later"]))

    def changed(m: bytes) -> bytes:
        return m[:pos] + bytes([m[pos] ^ (1 << bit)]) + m[pos + 1 :]

    if flip == "hello":
        pos %= famhello.HELLO_SIZE
        try:
            answer = s.hello(changed(msgs[0]))
        except HelloError:
            return  # its head changed: refused at once
        with pytest.raises(HelloError):
            c.answer(answer)
        return
    answer = s.hello(msgs[0])
    if which == 1:
        with pytest.raises(HelloError):
            c.answer(changed(answer))
        return
    confirm = c.answer(answer)
    with pytest.raises(HelloError):
        s.confirm(changed(confirm))


@given(st.sampled_from(["hello", "answer", "confirm"]), st.integers(0, 80))
def test_a_message_cut_short_or_too_long_fails(which: str, size: int) -> None:
    c, s = famhello.Client(KEY), famhello.Server(KEY)
    hello = c.hello()
    if which == "hello":
        if size == len(hello):
            return
        with pytest.raises(HelloError):
            s.hello((hello + os.urandom(80))[:size])
        return
    answer = s.hello(hello)
    if which == "answer":
        if size == len(answer):
            return
        with pytest.raises(HelloError):
            c.answer((answer + os.urandom(80))[:size])
        return
    confirm = c.answer(answer)
    if size == len(confirm):
        return
    with pytest.raises(HelloError):
        s.confirm((confirm + os.urandom(80))[:size])


def test_messages_of_another_run_fail() -> None:
    _, _, (hello, answer, confirm) = run(KEY)
    # The host replays an earlier connection's client side into a new one: the new server's nonce
    # is fresh, so the old confirmation does not verify.
    s = famhello.Server(KEY)
    s.hello(hello)
    with pytest.raises(HelloError, match="client's family hello does not verify"):
        s.confirm(confirm)
    # ... and its server side to a new client: the client's nonce is fresh.
    c = famhello.Client(KEY)
    c.hello()
    with pytest.raises(HelloError, match="listener's family hello does not verify"):
        c.answer(answer)


def test_a_server_answer_is_no_client_confirmation() -> None:
    # The two MACs carry different labels: an answer's MAC sent back as a confirmation fails.
    c, s = famhello.Client(KEY), famhello.Server(KEY)
    answer = s.hello(c.hello())
    with pytest.raises(HelloError):
        s.confirm(b"PSFH\x01\x03" + answer[-32:])


def test_steps_out_of_order_and_after_a_failure_fail() -> None:
    c, s = famhello.Client(KEY), famhello.Server(KEY)
    with pytest.raises(HelloError, match="cannot take the answer step"):
        c.answer(b"\0" * famhello.ANSWER_SIZE)
    with pytest.raises(HelloError, match="cannot take the confirm step"):
        s.confirm(b"\0" * famhello.CONFIRM_SIZE)
    with pytest.raises(HelloError, match="not done"):
        _ = s.channel_id
    hello = c.hello()
    with pytest.raises(HelloError, match="cannot take the hello step"):
        c.hello()
    answer = s.hello(hello)
    with pytest.raises(HelloError):
        s.hello(hello)
    with pytest.raises(HelloError):
        c.answer(answer[:-1] + bytes([answer[-1] ^ 1]))
    with pytest.raises(HelloError, match="failed"):
        c.answer(answer)  # the honest answer, after a failure: still refused
    with pytest.raises(HelloError, match="not done"):
        _ = c.channel_id


def test_a_peer_that_speaks_something_else_is_refused_at_its_first_bytes() -> None:
    # A native multiprocessing client's first message (a length, then a pickle), a native
    # listener's challenge, another version and another message kind.
    for data in (b"\x00\x00\x00\x1f\x80\x04", b"\x00\x00\x00\x1f#CHALLENGE#", b"GET / HTTP/1.1", b"X"):
        with pytest.raises(HelloError, match="does not speak the family hello"):
            famhello.check_prefix(famhello.HELLO, data)
    with pytest.raises(HelloError, match="version 2"):
        famhello.check_prefix(famhello.HELLO, b"PSFH\x02")
    with pytest.raises(HelloError, match="out of order"):
        famhello.check_prefix(famhello.ANSWER, b"PSFH\x01\x01")
    with pytest.raises(HelloError):
        famhello.Server(KEY).hello(b"PSFH\x01\x03" + bytes(16))


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        famhello.Client(b"short")
    with pytest.raises(ValueError, match="16 bytes"):
        famhello.Server(KEY, b"short")
