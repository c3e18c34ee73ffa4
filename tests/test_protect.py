"""The FS shield's sans-IO core: chunk sealing and the FSPF, against tampering of every kind."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyscone.protect import chunks, fspf
from pyscone.protect.chunks import FileKey, IntegrityError, open_chunk, record_tag, seal_chunk

KEY = bytes(range(32))
FILE_ID = bytes(range(100, 116))
NONCE = bytes(12)


PINNED = {
    True: "00000000000000000000000066d9d9b2da00a3d866cbc5546e4971791e71b1425d58dc54a78e9c0ae52a",
    False: "00000000000000000000000068656c6c6f2c20656e636c617665ebfd0bf2a7eec6fcfe3ab7d59eeaed58",
}


@pytest.mark.parametrize("encrypted", [True, False])
def test_pinned_vectors_keep_the_format_stable(encrypted: bool) -> None:
    # Pinned records: a change to the record layout or the associated data breaks these.
    fk = FileKey(KEY, FILE_ID, encrypted)
    record = seal_chunk(fk, 3, b"hello, enclave", nonce=NONCE)
    assert record.hex() == PINNED[encrypted]
    # The construction, checked with the raw primitive: AES-256-GCM, AD = prefix || id || index || length.
    import struct

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ad = b"pyscone-chunk\x01" + struct.pack("<16sQI", FILE_ID, 3, 14)
    if encrypted:
        assert AESGCM(KEY).decrypt(NONCE, record[12:], ad) == b"hello, enclave"
    else:
        assert AESGCM(KEY).decrypt(NONCE, record[-16:], ad + b"hello, enclave") == b""
    assert open_chunk(fk, 3, record) == b"hello, enclave"
    assert (b"hello" in record) is (not encrypted)  # ciphertext on the host only when encrypted


@given(data=st.binary(max_size=300), index=st.integers(0, 2**40), encrypted=st.booleans())
def test_round_trip(data: bytes, index: int, encrypted: bool) -> None:
    fk = FileKey(KEY, FILE_ID, encrypted, chunk_size=300)
    record = seal_chunk(fk, index, data)
    assert open_chunk(fk, index, record, record_tag(record)) == data


@pytest.mark.parametrize("encrypted", [True, False])
def test_every_flipped_bit_is_refused(encrypted: bool) -> None:
    fk = FileKey(KEY, FILE_ID, encrypted, chunk_size=64)
    record = seal_chunk(fk, 0, b"x" * 40)
    for i in range(len(record)):
        for bit in (0x01, 0x80):
            bad = bytearray(record)
            bad[i] ^= bit
            with pytest.raises(IntegrityError):
                open_chunk(fk, 0, bytes(bad))


@pytest.mark.parametrize("encrypted", [True, False])
def test_moved_swapped_cut_or_foreign_chunks_are_refused(encrypted: bool) -> None:
    fk = FileKey(KEY, FILE_ID, encrypted, chunk_size=64)
    other = FileKey(bytes(32), bytes(16), encrypted, chunk_size=64)
    r0, r1 = seal_chunk(fk, 0, b"a" * 64), seal_chunk(fk, 1, b"b" * 64)
    with pytest.raises(IntegrityError):
        open_chunk(fk, 1, r0)  # swapped within the file
    with pytest.raises(IntegrityError):
        open_chunk(other, 0, r0)  # moved to another file
    same_key_other_id = FileKey(KEY, bytes(16), encrypted, chunk_size=64)
    with pytest.raises(IntegrityError):
        open_chunk(same_key_other_id, 0, r0)  # the file identity is bound, not just the key
    for cut in (1, 16, len(r1) - 1):
        with pytest.raises(IntegrityError):
            open_chunk(fk, 1, r1[:cut])
    with pytest.raises(IntegrityError):
        open_chunk(fk, 1, r1 + b"extra")


def test_an_old_version_of_a_chunk_is_refused_by_its_pinned_tag() -> None:
    fk = FileKey(KEY, FILE_ID)
    old = seal_chunk(fk, 0, b"balance: 100")
    new = seal_chunk(fk, 0, b"balance: 5")
    assert open_chunk(fk, 0, old) == b"balance: 100"  # valid on its own...
    with pytest.raises(IntegrityError):
        open_chunk(fk, 0, old, record_tag(new))  # ...but not the version the FSPF pins


def test_chunk_limits() -> None:
    fk = FileKey(KEY, FILE_ID, chunk_size=16)
    with pytest.raises(ValueError):
        seal_chunk(fk, 0, b"x" * 17)
    with pytest.raises(ValueError):
        FileKey(b"short", FILE_ID)
    assert chunks.chunk_count(0, 16) == 0 and chunks.chunk_count(16, 16) == 1 and chunks.chunk_count(17, 16) == 2


def _sample() -> fspf.FSPF:
    f = fspf.FSPF()
    f.add_region("/data", "encrypted")
    f.add_region("/data/public", "authenticated")
    f.add_region("/tmp", "memory")
    fk = FileKey(KEY, FILE_ID, encrypted=True, chunk_size=8)
    tags = b"".join(record_tag(seal_chunk(fk, i, b"12345678")) for i in range(2))
    f.files["/data/db.sqlite"] = fspf.FileEntry(fk, 13, tags)
    return f


def test_regions_longest_prefix_by_component() -> None:
    f = _sample()
    assert f.region_for("/data/db.sqlite").kind == "encrypted"
    assert f.region_for("/data/public/index.html").kind == "authenticated"
    assert f.region_for("/data").kind == "encrypted"
    assert f.region_for("/database").kind == "unprotected"  # not under /data
    assert f.region_for("/tmp/x").kind == "memory"
    with pytest.raises(ValueError):
        f.add_region("/data", "memory")
    with pytest.raises(ValueError):
        fspf.Region("relative", "encrypted")
    with pytest.raises(ValueError):
        fspf.Region("/x", "secret")


def test_fspf_seal_open_round_trip_and_canonical_encoding() -> None:
    f = _sample()
    blob, tag = fspf.seal(f, KEY)
    assert fspf.tag_of(blob) == tag and len(tag) == 32
    back = fspf.open_sealed(blob, KEY, expected_tag=tag)
    assert back.to_json() == f.to_json()
    assert b"db.sqlite" not in blob  # the FSPF itself is encrypted


def test_fspf_tampering_wrong_key_and_stale_version_are_refused() -> None:
    f = _sample()
    old_blob, old_tag = fspf.seal(f, KEY)
    f.files["/data/db.sqlite"] = fspf.FileEntry(f.files["/data/db.sqlite"].key, 0, b"")
    new_blob, new_tag = fspf.seal(f, KEY)
    for i in range(0, len(new_blob), 7):
        bad = bytearray(new_blob)
        bad[i] ^= 1
        with pytest.raises(IntegrityError):
            fspf.open_sealed(bytes(bad), KEY)
    with pytest.raises(IntegrityError):
        fspf.open_sealed(new_blob, bytes(32))
    with pytest.raises(IntegrityError):
        fspf.open_sealed(old_blob, KEY, expected_tag=new_tag)  # whole-FS rollback
    assert fspf.open_sealed(old_blob, KEY, expected_tag=old_tag).files["/data/db.sqlite"].length == 13


def test_fspf_consistency_rules() -> None:
    f = _sample()
    entry = f.files["/data/db.sqlite"]
    with pytest.raises(ValueError):
        fspf.FileEntry(entry.key, 100, entry.tags)  # tags do not cover the length
    f.files["/tmp/scratch"] = entry
    with pytest.raises(ValueError):
        f.validate()  # a memory region keeps no file entries
    g = fspf.FSPF(regions=[fspf.Region("/data", "encrypted")])
    with pytest.raises(ValueError):
        g.validate()  # no root region


# -- protected files -------------------------------------------------------------------------

from hypothesis import settings  # noqa: E402

from pyscone.protect.pfile import LocalStore, ProtectedFile, record_offset  # noqa: E402


class MemoryStore(LocalStore):
    """A host file, in memory: the backing store the sans-IO file writes records to."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0
        self.crash_after: int | None = None

    def pread(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])

    def pwrite(self, offset: int, data: bytes | bytearray) -> None:
        torn = self.crash_after is not None and self.writes >= self.crash_after
        if torn:
            data = data[: len(data) // 2]  # the kill lands in the middle of this write
        self.writes += 1
        if len(self.data) < offset + len(data):
            self.data.extend(bytes(offset + len(data) - len(self.data)))
        self.data[offset : offset + len(data)] = data
        if torn:
            raise KeyboardInterrupt("simulated kill")


ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 120), st.binary(min_size=1, max_size=50)),
        st.tuples(st.just("truncate"), st.integers(0, 120), st.just(b"")),
        st.tuples(st.just("read"), st.integers(0, 130), st.binary(max_size=60)),  # reads len(data) bytes
        st.tuples(st.just("commit"), st.just(0), st.just(b"")),
        st.tuples(st.just("reopen"), st.just(0), st.just(b"")),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    ops=ops,
    encrypted=st.booleans(),
    cache=st.sampled_from([16, 48, 1 << 20]),
    stream=st.sampled_from([16, 40, 1 << 20]),
    io=st.sampled_from([None, 88, 132]),
)
def test_protected_file_behaves_like_a_plain_file(
    ops: list[tuple[str, int, bytes]], encrypted: bool, cache: int, stream: int, io: int | None
) -> None:
    # cache=16 seals every write early into the free slot; 1 MiB keeps all of it dirty until
    # commit.  stream=16 seals every whole chunk a write covers at once; 1 MiB never does.
    # io=88 or 132: store writes of at most 2 or 3 records (44 bytes each), a short tail held back.
    fk = FileKey(KEY, FILE_ID, encrypted, chunk_size=16)
    store = MemoryStore()

    def opened(entry: fspf.FileEntry) -> ProtectedFile:
        return ProtectedFile(entry, store, cache_bytes=cache, stream_bytes=stream, io_bytes=io)

    pf = opened(fspf.FileEntry(fk))
    model, committed_model = bytearray(), b""
    entry = fspf.FileEntry(fk)
    for op, n, data in ops:
        if op == "write":
            if len(model) < n:
                model.extend(bytes(n - len(model)))
            model[n : n + len(data)] = data
            pf.write(n, data)
        elif op == "truncate":
            del model[n:]
            model.extend(bytes(max(0, n - len(model))))
            pf.truncate(n)
        elif op == "commit":
            entry = pf.commit()
            committed_model = bytes(model)
        elif op == "read":  # from n, then on from where it stopped (a reader going forward)
            out = bytearray(len(data))
            got = pf.readinto(n, memoryview(out))
            assert bytes(out[:got]) == bytes(model[n : n + len(data)])
            assert pf.read(n + got, 20) == bytes(model[n + got : n + got + 20])
        else:  # close without commit and reopen: only the committed state survives
            pf = opened(entry)
            model = bytearray(committed_model)
        assert pf.length == len(model)
        assert pf.read(0, 1000) == bytes(model)
        assert pf.read(5, 7) == bytes(model[5:12])


def _two_commits(crash_after: int | None) -> tuple[MemoryStore, fspf.FileEntry, ProtectedFile]:
    fk = FileKey(KEY, FILE_ID, chunk_size=16)
    store = MemoryStore()
    pf = ProtectedFile(fspf.FileEntry(fk), store)
    pf.write(0, b"A" * 70)
    committed = pf.commit()
    pf.write(5, b"B" * 50)
    pf.truncate(60)
    if crash_after is not None:
        store.crash_after = store.writes + crash_after
    return store, committed, pf


def test_a_kill_at_every_write_of_a_commit_leaves_the_last_committed_state() -> None:
    store, _, pf = _two_commits(None)
    before = store.writes
    pf.commit()
    writes = store.writes - before
    assert writes == 1  # the changed chunks are adjacent on the host: one batched write
    for crash_after in range(writes):
        store, committed, pf = _two_commits(crash_after)
        with pytest.raises(KeyboardInterrupt):
            pf.commit()
        # The FSPF was never replaced: the old entry still opens, with the old content.
        assert ProtectedFile(committed, store).read(0, 100) == b"A" * 70


def test_tampered_swapped_or_rolled_back_records_are_refused() -> None:
    fk = FileKey(KEY, FILE_ID, chunk_size=16)
    store = MemoryStore()
    pf = ProtectedFile(fspf.FileEntry(fk), store)
    pf.write(0, b"0123456789abcdef" * 3)
    first = pf.commit()
    snapshot = bytes(store.data)
    pf.write(0, b"X" * 16)
    second = pf.commit()
    # Flip a byte of the committed record of chunk 0.
    stride = 16 + chunks.OVERHEAD
    bad = MemoryStore()
    bad.data = bytearray(store.data)
    bad.data[record_offset(16, 0, second.slots[0]) + 20] ^= 1
    with pytest.raises(IntegrityError):
        ProtectedFile(second, bad).read(0, 16)
    # Swap the records of chunks 1 and 2 (both in slot 0).
    swapped = MemoryStore()
    swapped.data = bytearray(store.data)
    a, b = record_offset(16, 1, 0), record_offset(16, 2, 0)
    swapped.data[a : a + stride], swapped.data[b : b + stride] = store.data[b : b + stride], store.data[a : a + stride]
    with pytest.raises(IntegrityError):
        ProtectedFile(second, swapped).read(16, 32)
    # Roll the whole file back to the first version while the FSPF names the second.
    old = MemoryStore()
    old.data = bytearray(snapshot)
    gone = record_offset(16, 0, 1)
    old.data[gone : gone + stride] = b"\0" * stride  # the slot the second commit used is gone
    with pytest.raises(IntegrityError):
        ProtectedFile(second, old).read(0, 16)
    assert ProtectedFile(first, old).read(0, 16) == b"0123456789abcdef"


def test_generated_keys_and_the_dirty_flag() -> None:
    a, b = FileKey.generate(), FileKey.generate(encrypted=False, chunk_size=64)
    assert a.key != b.key and a.file_id != b.file_id and not b.encrypted and b.chunk_size == 64
    assert len(fspf.generate_fspf_key()) == 32
    pf = ProtectedFile(fspf.FileEntry(a), MemoryStore())
    assert not pf.dirty
    pf.write(0, b"x")
    assert pf.dirty
    pf.commit()
    assert not pf.dirty
    pf.truncate(0)
    assert pf.dirty


def test_a_large_write_over_chunks_in_both_slots_never_touches_committed_records() -> None:
    # Chunk 1 is committed in slot 1, its neighbours in slot 0: a write sealed at once over
    # all of them must put each chunk in its own free slot, so the committed version survives.
    fk = FileKey(KEY, FILE_ID, chunk_size=16)
    store = MemoryStore()
    pf = ProtectedFile(fspf.FileEntry(fk), store, stream_bytes=16)
    pf.write(0, b"a" * 64)
    pf.commit()
    pf.write(16, b"b" * 16)
    committed = pf.commit()
    assert committed.slots == b"\0\1\0\0"
    pf.write(0, b"c" * 64)  # sealed at once: four whole chunks
    assert ProtectedFile(committed, store).read(0, 64) == b"a" * 16 + b"b" * 16 + b"a" * 32
    assert ProtectedFile(pf.commit(), store).read(0, 64) == b"c" * 64


def test_a_run_of_records_opens_as_one_and_refuses_as_one() -> None:
    fk = FileKey(KEY, FILE_ID, chunk_size=16)
    plaintexts = [bytes([65 + i]) * 16 for i in range(3)] + [b"tail"]
    blob = bytearray(sum(map(len, plaintexts)) + 4 * chunks.OVERHEAD)
    tags = b"".join(chunks.seal_run_into(fk, 5, plaintexts, memoryview(blob)))
    out = bytearray(52)
    chunks.open_run_into(fk, 5, memoryview(blob), memoryview(tags), memoryview(out))
    assert bytes(out) == b"".join(plaintexts)
    assert [open_chunk(fk, 5 + i, blob[i * 44 : i * 44 + 44]) for i in range(3)] == plaintexts[:3]
    zeroed, untouched = bytes(52), b"x" * 52
    for bad_blob, bad_tags, first, left in (
        (blob[:60] + bytes([blob[60] ^ 1]) + blob[61:], tags, 5, zeroed),  # a flipped bit in the second record
        (blob, tags[:16] + tags[32:48] + tags[16:32] + tags[48:], 5, zeroed),  # tags of chunks 1 and 2 swapped
        (blob, tags, 6, zeroed),  # the run moved
        (blob[:-1], tags, 5, untouched),  # cut short: refused before anything is opened
    ):
        out = bytearray(untouched)
        with pytest.raises(IntegrityError):
            chunks.open_run_into(fk, first, memoryview(bytearray(bad_blob)), memoryview(bad_tags), memoryview(out))
        assert out == left  # never any unverified plaintext
