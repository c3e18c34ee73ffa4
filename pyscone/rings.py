"""Shared-memory rings and slots: the one piece of memory both sides touch.

The launcher creates the mapping (a memfd, so the enclave can map the same pages
after it starts) and the two eventfd doorbells; the enclave attaches to them by
file descriptor.  Each side keeps its own copy of the counters it owns and only
*reads* the other side's counters from shared memory, so a lying host cannot move
the enclave's own position.  The enclave-side reader of host-written counters
checks them (see ``enclave/syscalls.py``); this module only moves bytes.

Counters and ring entries are read and written through native-typed memoryviews
(``cast("Q")``/``cast("I")``): each access is one aligned 8- or 4-byte move, which
x86-64 performs atomically.  (``struct`` with an explicit byte order assembles
values byte by byte, so a reader could see half of a counter update: a tail that
jumps ahead by 255 entries.  We learned that the hard way.)
"""

from __future__ import annotations

import mmap
import os

from pyscone import abi


class SharedRegion:
    """The mapping plus its geometry.  Both sides hold one."""

    def __init__(self, fd: int, geometry: abi.Geometry) -> None:
        self.fd = fd
        self.geometry = geometry
        self.mm = mmap.mmap(fd, geometry.total_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buf = memoryview(self.mm)
        #: The header as u64 words: counters are at 64-byte offsets, word index off // 8.
        self.words = self.buf[: abi.HEADER_SIZE].cast("Q")
        self.ring_views = [
            self.buf[off : off + 4 * geometry.ring_size].cast("I")
            for off in (geometry.req_ring_off, geometry.resp_ring_off)
        ]

    @classmethod
    def create(cls, geometry: abi.Geometry) -> SharedRegion:
        """Launcher side: a fresh memfd sized and stamped for ``geometry``."""
        fd = os.memfd_create("pyscone-untrusted", 0)
        os.ftruncate(fd, geometry.total_size)
        region = cls(fd, geometry)
        abi.HEADER.pack_into(
            region.mm, 0, abi.MAGIC, abi.ABI_VERSION, geometry.nslots, geometry.slot_data, geometry.ring_size
        )
        return region

    @classmethod
    def attach(cls, fd: int) -> SharedRegion:
        """Enclave side: map an existing region and check its header."""
        head = os.pread(fd, abi.HEADER.size, 0)
        magic, version, nslots, slot_data, ring_size = abi.HEADER.unpack(head)
        if magic != abi.MAGIC or version != abi.ABI_VERSION:
            raise ValueError(f"shared memory has magic {magic:#x} version {version}, expected ABI {abi.ABI_VERSION}")
        geometry = abi.Geometry(nslots, slot_data)
        if ring_size != geometry.ring_size or os.fstat(fd).st_size < geometry.total_size:
            raise ValueError("shared memory geometry is inconsistent")
        return cls(fd, geometry)

    # -- counters and flags ---------------------------------------------------------------

    def load(self, off: int) -> int:
        return int(self.words[off >> 3])

    def flag(self, off: int) -> int:
        return int(self.words[off >> 3])

    def set_flag(self, off: int, value: int) -> None:
        self.words[off >> 3] = value

    def write_fatal(self, message: str) -> None:
        raw = message.encode("utf-8", "replace")[: abi.FATAL_MAX - 8]
        self.mm[abi.OFF_FATAL + 8 : abi.OFF_FATAL + 8 + len(raw)] = raw
        self.words[abi.OFF_FATAL >> 3] = len(raw)

    def read_fatal(self) -> str:
        n = min(int(self.words[abi.OFF_FATAL >> 3]), abi.FATAL_MAX - 8)
        return bytes(self.mm[abi.OFF_FATAL + 8 : abi.OFF_FATAL + 8 + n]).decode("utf-8", "replace")

    def close(self) -> None:
        for view in (*self.ring_views, self.words, self.buf):
            view.release()
        self.mm.close()
        os.close(self.fd)


class Producer:
    """The producing end of one SPSC ring: owns the tail counter."""

    __slots__ = ("_mask", "_ring", "_tail_word", "_words", "tail")

    def __init__(self, region: SharedRegion, ring: int, tail_off: int) -> None:
        self._ring = region.ring_views[ring]
        self._words = region.words
        self._mask = region.geometry.ring_size - 1
        self._tail_word = tail_off >> 3
        self.tail = region.load(tail_off)

    def push(self, slot: int) -> None:
        self._ring[self.tail & self._mask] = slot
        self.tail += 1
        self._words[self._tail_word] = self.tail  # publish after the entry (TSO)

    def push_many(self, slots: list[int]) -> None:
        ring, mask, tail = self._ring, self._mask, self.tail
        for slot in slots:
            ring[tail & mask] = slot
            tail += 1
        self.tail = tail
        self._words[self._tail_word] = tail


class Consumer:
    """The consuming end of one SPSC ring: owns the head counter.

    ``pop_all`` returns raw ids and the other side's claimed tail; checking that
    the tail is plausible is the caller's job (the enclave treats a bad one as a
    host violation, the host simply trusts its enclave).
    """

    __slots__ = ("_head_word", "_mask", "_ring", "_tail_word", "_words", "head")

    def __init__(self, region: SharedRegion, ring: int, head_off: int, tail_off: int) -> None:
        self._ring = region.ring_views[ring]
        self._words = region.words
        self._mask = region.geometry.ring_size - 1
        self._head_word = head_off >> 3
        self._tail_word = tail_off >> 3
        self.head = region.load(head_off)

    def peek_tail(self) -> int:
        return int(self._words[self._tail_word])

    def pending(self) -> bool:
        return bool(self._words[self._tail_word] != self.head)

    def take(self, tail: int) -> list[int]:
        """Consume entries up to ``tail`` (already validated by the caller)."""
        ring, mask, head = self._ring, self._mask, self.head
        a, b = head & mask, tail & mask
        if tail - head == 0:
            out: list[int] = []
        elif a < b:
            out = ring[a:b].tolist()
        else:
            out = ring[a:].tolist() + ring[:b].tolist()
        self.head = tail
        self._words[self._head_word] = tail
        return out


_REQ, _RESP = 0, 1


def request_producer(region: SharedRegion) -> Producer:
    return Producer(region, _REQ, abi.OFF_REQ_TAIL)


def request_consumer(region: SharedRegion) -> Consumer:
    return Consumer(region, _REQ, abi.OFF_REQ_HEAD, abi.OFF_REQ_TAIL)


def response_producer(region: SharedRegion) -> Producer:
    return Producer(region, _RESP, abi.OFF_RESP_TAIL)


def response_consumer(region: SharedRegion) -> Consumer:
    return Consumer(region, _RESP, abi.OFF_RESP_HEAD, abi.OFF_RESP_TAIL)
