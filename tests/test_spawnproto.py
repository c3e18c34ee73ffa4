"""The spawn channel's sans-IO core (protect/spawnproto.py), with a real platform key."""

from __future__ import annotations

import os

import pytest

from pyscone.platform import keys, quote
from pyscone.protect import spawnproto
from pyscone.protect.spawnproto import ChannelError


def _identity(mrenclave: bytes = b"\x11" * 32, debug: bool = False) -> quote.Report:
    return quote.Report(mrenclave, b"\x22" * 32, 7, 2, debug, bytes(64))


def _handshake(
    parent: quote.Report | None,
    child: quote.Report | None,
    *,
    trusted: dict[bytes, object] | None = None,
    sign: object = None,
) -> tuple[bytes, bytes, bytes]:
    """Run both sides in memory; returns (the child's key, the parent's key, the sealed config)."""
    private, hello = spawnproto.hello(quote_required=trusted is not None)
    hello_msg = hello.pack()
    child_private, child_public = spawnproto.new_key()
    if child is None:
        evidence = spawnproto.Evidence(child_public, spawnproto.UNMEASURED, b"")
    else:
        report = quote.Report(*[getattr(child, f) for f in ("mrenclave", "mrsigner", "product_id", "svn", "debug")],
                              spawnproto.report_data(child_public, hello_msg))  # fmt: skip
        if sign is not None:
            evidence = spawnproto.Evidence(child_public, spawnproto.QUOTE, quote.sign_quote(report, sign))  # type: ignore[arg-type]
        else:
            evidence = spawnproto.Evidence(child_public, spawnproto.REPORT, report.pack())
    evidence_msg = spawnproto.Evidence.unpack(evidence.pack()).pack()
    spawnproto.check_evidence(hello_msg, spawnproto.Evidence.unpack(evidence_msg), parent, trusted)  # type: ignore[arg-type]
    parent_key = spawnproto.derive(private, child_public, hello_msg, evidence_msg)
    child_key = spawnproto.derive(child_private, hello.parent_key, hello_msg, evidence_msg)
    return child_key, parent_key, spawnproto.seal_config(parent_key, b'{"argv": []}')


def test_both_sides_derive_one_key_and_every_tampered_byte_is_caught() -> None:
    child_key, parent_key, sealed = _handshake(_identity(), _identity())
    assert child_key == parent_key
    assert spawnproto.open_config(child_key, sealed) == b'{"argv": []}'
    for i in range(len(sealed)):
        forged = sealed[:i] + bytes([sealed[i] ^ 0x80]) + sealed[i + 1 :]
        with pytest.raises(ChannelError, match="does not open"):
            spawnproto.open_config(child_key, forged)
    other_key, _, other_sealed = _handshake(_identity(), _identity())
    with pytest.raises(ChannelError):  # another channel's configuration (a replay) does not open
        spawnproto.open_config(child_key, other_sealed)
    spawnproto.check_ready(parent_key, spawnproto.seal_ready(child_key))
    with pytest.raises(ChannelError):
        spawnproto.check_ready(parent_key, spawnproto.seal_ready(other_key))


def test_the_parent_refuses_a_child_that_is_not_itself() -> None:
    with pytest.raises(ChannelError, match="not the parent's"):
        _handshake(_identity(), _identity(b"\x33" * 32))
    with pytest.raises(ChannelError, match="debug flag"):
        _handshake(_identity(), _identity(debug=True))
    with pytest.raises(ChannelError, match="not measured"):
        _handshake(_identity(), None)
    _handshake(None, None)  # dev mode without a measurement: the host chooses the code anyway


def test_evidence_made_for_another_hello_is_refused() -> None:
    _, hello = spawnproto.hello(False)
    _, child_public = spawnproto.new_key()
    _, old_hello = spawnproto.hello(False)
    me = _identity()
    stale = quote.Report(me.mrenclave, me.mrsigner, 7, 2, False, spawnproto.report_data(child_public, old_hello.pack()))
    evidence = spawnproto.Evidence(child_public, spawnproto.REPORT, stale.pack())
    with pytest.raises(ChannelError, match="not bound to this channel"):
        spawnproto.check_evidence(hello.pack(), evidence, me, None)


def test_a_parent_that_trusts_a_platform_needs_the_childs_quote_from_it() -> None:
    platform = keys.generate()
    trusted = {quote.platform_id(platform.public_key()): platform.public_key()}
    child_key, parent_key, _ = _handshake(_identity(), _identity(), trusted=trusted, sign=platform)  # type: ignore[arg-type]
    assert child_key == parent_key
    with pytest.raises(ChannelError, match="no platform quote"):
        _handshake(_identity(), _identity(), trusted=trusted)  # type: ignore[arg-type]
    with pytest.raises(ChannelError, match="untrusted platform"):
        _handshake(_identity(), _identity(), trusted=trusted, sign=keys.generate())  # type: ignore[arg-type]


def test_malformed_messages_are_channel_errors() -> None:
    _, hello = spawnproto.hello(False)
    good = hello.pack()
    empty, short, wrong_magic, wrong_version = b"", good[:-1], b"NOPE" + good[4:], good[:4] + b"\x09" + good[5:]
    for bad in (empty, short, wrong_magic, wrong_version):
        with pytest.raises(ChannelError):
            spawnproto.Hello.unpack(bad)
    for bad in (b"", bytes(32) + b"\x07\x00\x00", bytes(32) + b"\x00\x00\x01x", bytes(32) + b"\x01\x00\x05abc"):
        with pytest.raises(ChannelError):
            spawnproto.Evidence.unpack(bad)
    d = spawnproto.Deframer()
    d.feed(b"\xff\xff\xff\xff")
    with pytest.raises(ChannelError, match="oversized"):
        d.next()
    d = spawnproto.Deframer()
    d.feed(spawnproto.frame(b"one") + spawnproto.frame(b"two")[:3])
    assert d.next() == b"one" and d.next() is None


def test_the_platform_key_from_the_las_must_be_the_one_that_signed_the_accepted_quote() -> None:
    platform = keys.generate()
    accepted = quote.sign_quote(_identity(), platform)
    assert spawnproto.trusted_platform(accepted, platform.public_key()) == {
        quote.platform_id(platform.public_key()): platform.public_key()
    }
    with pytest.raises(ChannelError, match="not the one the CAS trusted"):
        spawnproto.trusted_platform(accepted, keys.generate().public_key())


def test_the_parents_proof_is_the_transcripts_hmac_under_the_spawn_key() -> None:
    key, other = os.urandom(32), os.urandom(32)
    proof = spawnproto.parent_proof(key, b"hello", b"evidence")
    spawnproto.check_parent_proof(key, proof, b"hello", b"evidence")
    for bad in (
        (other, proof, b"hello", b"evidence"),  # another service's key
        (key, proof, b"hello", b"other evidence"),  # another channel's transcript
        (key, spawnproto.parent_proof(None, b"hello", b"evidence"), b"hello", b"evidence"),  # no CAS
    ):
        with pytest.raises(ChannelError, match="not an attested enclave"):
            spawnproto.check_parent_proof(*bad)
