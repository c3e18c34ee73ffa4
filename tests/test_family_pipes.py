"""Pipes and socketpairs between the enclaves of a family: the sealed record format
(``protect/famseal.py``, property tests) and the channels that cross a fork (enclaves)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscone.protect import famseal
from pyscone.protect.famseal import Reader, SealError, Writer

KEY = bytes(range(32))
CHANNEL = bytes(range(100, 116))


def _pair(direction: int = 0, channel: bytes = CHANNEL) -> tuple[bytes, Reader]:
    key = famseal.channel_key(KEY, channel, direction)
    return key, Reader(key, channel, direction)


def _writer(member: bytes, direction: int = 0, channel: bytes = CHANNEL) -> Writer:
    return Writer(famseal.channel_key(KEY, channel, direction), channel, direction, member)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


# -- the record format ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=300)), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_any_interleaving_of_writers_in_any_split_opens_in_order(
    messages: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    """Each writer's records come out in its order, whatever the split and the interleaving."""
    writers = [_writer(bytes([i]) * 8) for i in range(3)]
    wire = b"".join(writers[w].seal(m) for w, m in messages)
    _, reader = _pair()
    got = []
    for piece in _split(wire, cuts):
        got += reader.feed(piece)
    reader.eof()
    assert got == [m for _, m in messages]
    assert not reader.pending()


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=0, max_size=200_000))
def test_seal_all_cuts_large_writes_and_reassembles(data: bytes) -> None:
    w = _writer(b"A" * 8)
    records = list(w.seal_all(data))
    assert all(len(r) <= famseal.MAX_RECORD for r in records)
    _, reader = _pair()
    assert b"".join(reader.feed(b"".join(records))) == data


def test_tampering_with_any_byte_is_refused() -> None:
    w = _writer(b"M" * 8)
    record = w.seal(b"attack at dawn")
    for i in range(len(record)):
        for flip in (0x01, 0x80):
            bad = bytearray(record)
            bad[i] ^= flip
            _, reader = _pair()
            with pytest.raises(SealError):
                got = reader.feed(bytes(bad))
                # A flip in the length field may leave the reader waiting for more bytes:
                # the end of the stream then says it was cut.
                assert not got
                reader.eof()


@settings(max_examples=100, deadline=None)
@given(count=st.integers(2, 6), which=st.data())
def test_a_replayed_or_reordered_record_is_refused(count: int, which: st.DataObject) -> None:
    w = _writer(b"R" * 8)
    records = [w.seal(bytes([i]) * 5) for i in range(count)]
    i = which.draw(st.integers(0, count - 1))
    j = which.draw(st.integers(0, count - 1).filter(lambda j: j != i))
    order = list(range(count))
    if which.draw(st.booleans()):
        order.insert(max(i, j) + 1, min(i, j))  # a replay of an earlier record later
    else:
        order[i], order[j] = order[j], order[i]  # two records swapped
    _, reader = _pair()
    with pytest.raises(SealError, match="replayed or reordered"):
        for k in order:
            reader.feed(records[k])


def test_a_gap_is_accepted_but_the_order_is_still_checked() -> None:
    """Several readers share one pipe: a reader sees a subset, so a gap is no error (the limit)."""
    w = _writer(b"G" * 8)
    records = [w.seal(bytes([i])) for i in range(4)]
    _, reader = _pair()
    assert reader.feed(records[0] + records[2]) == [b"\0", b"\2"]
    with pytest.raises(SealError):
        reader.feed(records[1])


def test_a_record_of_another_channel_or_direction_is_refused() -> None:
    other = bytes(16)
    for record in (
        _writer(b"X" * 8, channel=other).seal(b"hello"),
        _writer(b"X" * 8, direction=1).seal(b"hello"),
    ):
        _, reader = _pair()
        with pytest.raises(SealError, match="does not verify"):
            reader.feed(record)
    # Even with the right key, the AAD binds channel and direction.
    key = famseal.channel_key(KEY, CHANNEL, 0)
    forged = Writer(key, other, 0, b"Y" * 8).seal(b"hello")
    with pytest.raises(SealError):
        Reader(key, CHANNEL, 0).feed(forged)


def test_truncated_and_oversized_records_are_refused() -> None:
    record = _writer(b"T" * 8).seal(b"x" * 100)
    for cut in (1, famseal.HEADER.size, len(record) - 1):
        _, reader = _pair()
        assert reader.feed(record[:cut]) == []
        assert reader.pending()
        with pytest.raises(SealError, match="ends inside a record"):
            reader.eof()
    _, reader = _pair()
    huge = famseal.HEADER.pack(b"T" * 8, 1, famseal.MAX_PLAIN + 1)
    with pytest.raises(SealError, match="longer"):
        reader.feed(huge)
    with pytest.raises(ValueError):
        _writer(b"T" * 8).seal(b"x" * (famseal.MAX_PLAIN + 1))


def test_a_broken_reader_stays_broken() -> None:
    w = _writer(b"B" * 8)
    good = w.seal(b"fine")
    _, reader = _pair()
    with pytest.raises(SealError):
        reader.feed(b"\0" * 8 + struct.pack(">QI", 0, 1) + bytes(17))
    with pytest.raises(SealError):
        reader.feed(good)


def test_no_two_records_share_a_nonce() -> None:
    """Nonce = member | seq: distinct per writer; a forked child draws another member."""
    parent, child = _writer(os.urandom(8)), _writer(os.urandom(8))
    seen = set()
    for w in (parent, child):
        for _ in range(1000):
            r = w.seal(b"")
            member, seq, _ = famseal.HEADER.unpack_from(r, 0)
            nonce = member + (seq & 0xFFFFFFFF).to_bytes(4, "big")
            assert nonce not in seen
            seen.add(nonce)
    w = _writer(b"S" * 8)
    w.seq = famseal.MAX_SEQ - 2
    w.seal(b"last")
    with pytest.raises(ValueError, match="2\\*\\*32"):
        w.seal(b"one too many")
