"""The ABI's codecs and the SPSC rings: round trips, strict decoding, no torn counters."""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyscone import abi, rings

names = st.text(
    st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40
).filter(lambda n: n not in (".", ".."))


@given(st.lists(st.tuples(names, st.integers(0, abi.DT_OTHER)), unique_by=lambda e: e[0], max_size=30), st.booleans())
def test_dirents_round_trip(entries: list[tuple[str, int]], more: bool) -> None:
    ds = [abi.Dirent(n, t) for n, t in entries]
    assert abi.decode_dirents(abi.encode_dirents(ds, more)) == (ds, more)


@pytest.mark.parametrize("bad", [".", "..", "a/b", "x\0y"])
def test_dirents_reject_bad_names(bad: str) -> None:
    raw = bad.encode()
    with pytest.raises(abi.ABIError):
        abi.decode_dirents(abi.DIRENTS_HEAD.pack(1, 0) + abi.DIRENT.pack(1, len(raw)) + raw)


def test_dirents_reject_duplicates_and_trailing_bytes() -> None:
    one = abi.encode_dirents([abi.Dirent("a", 1)], False)
    with pytest.raises(abi.ABIError):
        abi.decode_dirents(abi.DIRENTS_HEAD.pack(2, 0) + one[abi.DIRENTS_HEAD.size :] * 2)
    with pytest.raises(abi.ABIError):
        abi.decode_dirents(one + b"junk")


@given(st.binary(max_size=200))
def test_decoders_raise_only_abi_errors(data: bytes) -> None:
    for decode in (
        lambda: abi.decode_dirents(data),
        lambda: abi.decode_addrinfo(data),
        lambda: abi.decode_sockaddr(socket.AF_INET, data),
        lambda: abi.decode_sockaddr(socket.AF_INET6, data),
        lambda: abi.StatResult.unpack(data),
    ):
        try:
            decode()
        except abi.ABIError:
            pass


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_ipv4_addresses_round_trip(ip: object, port: int) -> None:
    enc = abi.encode_result_sockaddr(socket.AF_INET, (str(ip), port))
    assert abi.decode_sockaddr(socket.AF_INET, enc) == (str(ip), port)


def test_addrinfo_round_trip() -> None:
    infos = [(socket.AF_INET, 1, 6, "", ("127.0.0.1", 80)), (socket.AF_INET6, 1, 6, "localhost", ("::1", 80, 0, 0))]
    assert abi.decode_addrinfo(abi.encode_addrinfo(infos)) == infos  # type: ignore[arg-type]


def test_address_of_the_wrong_family_is_rejected() -> None:
    v6 = abi.encode_result_sockaddr(socket.AF_INET6, ("::1", 80, 0, 0))
    with pytest.raises(abi.ABIError):
        abi.decode_sockaddr(socket.AF_INET, v6)


def test_geometry_validation() -> None:
    with pytest.raises(ValueError):
        abi.Geometry(0)
    with pytest.raises(ValueError):
        abi.Geometry(8, 1000)
    g = abi.Geometry(5, 4096)
    assert g.ring_size == 8 and g.slots_off % 4096 == 0 and g.total_size == g.slots_off + 5 * (128 + 4096)


@given(st.lists(st.one_of(st.integers(1, 8).map(lambda n: ("push", n)), st.just(("take", 0))), max_size=60))
def test_ring_matches_a_fifo_model(ops: list[tuple[str, int]]) -> None:
    region = rings.SharedRegion.create(abi.Geometry(8, 4096))
    try:
        prod, cons = rings.request_producer(region), rings.request_consumer(region)
        model: deque[int] = deque()
        next_id = 0
        for kind, n in ops:
            if kind == "push":
                room = region.geometry.ring_size - len(model)
                batch = list(range(next_id, next_id + min(n, room)))
                next_id += len(batch)
                prod.push_many([i % 8 for i in batch])
                model.extend(i % 8 for i in batch)
            else:
                assert cons.take(cons.peek_tail()) == list(model)
                model.clear()
        assert cons.take(cons.peek_tail()) == list(model)
    finally:
        region.close()


def _produce(fd: int, count: int) -> None:
    region = rings.SharedRegion(fd, abi.Geometry(64, 4096))
    prod = rings.request_producer(region)
    sent = 0
    while sent < count:
        if prod.tail - region.load(abi.OFF_REQ_HEAD) < region.geometry.ring_size:
            prod.push(sent % 64)
            sent += 1
    os._exit(0)


def test_counters_are_never_torn_across_processes() -> None:
    # Regression: with byte-wise counter writes the consumer saw the tail jump ahead
    # (e.g. 0x1ff while going from 0xff to 0x100) and read entries never written.
    count = 60_000
    region = rings.SharedRegion.create(abi.Geometry(64, 4096))
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_produce, args=(region.fd, count))
    p.start()
    try:
        cons = rings.request_consumer(region)
        seen = 0
        while seen < count:
            tail = cons.peek_tail()
            assert 0 <= tail - cons.head <= region.geometry.ring_size, f"torn tail {tail} at head {cons.head}"
            for sid in cons.take(tail):
                assert sid == seen % 64
                seen += 1
    finally:
        p.join(10)
        region.close()
