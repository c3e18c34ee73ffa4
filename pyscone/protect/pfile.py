"""A protected file: random-access reads and writes over sealed chunks, committed
crash-consistently (sans-IO: the caller supplies the backing store).

Theory of operation
-------------------
On the host, a protected file is an array of record *slots*, two per chunk, each
``chunk_size + 28`` bytes wide (the *stride*).  Chunks are laid out in groups of
``G`` (see :func:`group_size`): a group holds its ``G`` slot-0 records side by
side, then its ``G`` slot-1 records, so consecutive chunks that sit in the same
slot are consecutive on the host and move in one host call.  The file's FSPF
entry says, for every chunk, which slot holds its committed version and that
version's tag.

Writes change plaintext chunks held in the enclave (the *dirty* cache).  When the
cache grows past its limit, dirty chunks are sealed early into the slot that is
*not* the committed one (*pending*), which bounds enclave memory without touching
anything committed.  A *commit* (at ``fsync``, ``close`` or exit) seals what is
still dirty the same way and returns a new FSPF entry naming the new slots and
tags.  The caller then flushes the store and replaces the FSPF atomically.  So a
kill at any point leaves a state the FSPF can read:

* before the FSPF is replaced: the old entry names the old slots, untouched;
* after: the new entry names the new slots, already written and flushed.

A committed record is never overwritten; a slot is reused only after the next
commit.  Freshness needs no version numbers: the FSPF pins each chunk's exact
tag, so an older record for the same chunk (a rollback by the host) fails to open.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from pyscone.protect.chunks import OVERHEAD, TAG_SIZE, chunk_count, open_chunk, record_tag, seal_chunk
from pyscone.protect.fspf import FileEntry

GROUP_BYTES = 256 * 1024  # plaintext per layout group
CACHE_BYTES = 1 << 20  # dirty plaintext kept in the enclave per file before early sealing


class Store(Protocol):
    """Where records live: the host file (through host calls) or, in tests, memory."""

    def pread(self, offset: int, size: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes) -> None: ...


def group_size(chunk_size: int) -> int:
    """Chunks per layout group: fixed by the chunk size, so part of the format."""
    return max(1, GROUP_BYTES // chunk_size)


def record_offset(chunk_size: int, index: int, slot: int) -> int:
    """Where slot ``slot`` of chunk ``index`` starts in the host file."""
    g = group_size(chunk_size)
    stride = chunk_size + OVERHEAD
    return ((index // g) * 2 * g + slot * g + index % g) * stride


class _Pending(NamedTuple):
    slot: int
    tag: bytes
    size: int


class ProtectedFile:
    """One protected file's contents as the app sees them (not thread-safe: callers lock)."""

    def __init__(self, entry: FileEntry, store: Store, *, cache_bytes: int = CACHE_BYTES) -> None:
        self.key = entry.key
        self.store = store
        self.length = entry.length
        self._committed = entry
        self._dirty: dict[int, bytes] = {}
        self._pending: dict[int, _Pending] = {}
        self._cache_chunks = max(1, cache_bytes // self.key.chunk_size)
        # Committed bytes at or beyond this offset were truncated away: they read as zeros
        # if the file grows again, never as their old contents.
        self._valid_end = entry.length

    @property
    def entry(self) -> FileEntry:
        """The last committed entry."""
        return self._committed

    # -- where a chunk's current record is --------------------------------------------------

    def _free_slot(self, i: int) -> int:
        slots = self._committed.slots
        return 1 - slots[i] if i < len(slots) else 0

    def _stored(self, i: int) -> tuple[int, bytes, int] | None:
        """(slot, tag, size) of chunk ``i``'s current sealed record, if it is on the store."""
        p = self._pending.get(i)
        if p is not None:
            return p
        cs, entry = self.key.chunk_size, self._committed
        if i < entry.chunks and i * cs < self._valid_end:
            return entry.slots[i], entry.tag(i), min(cs, entry.length - i * cs)
        return None

    def _load(self, first: int, last: int) -> dict[int, bytes]:
        """Open chunks ``first..last`` that are not dirty, reading runs of adjacent records at once."""
        cs = self.key.chunk_size
        out: dict[int, bytes] = {}
        run: list[tuple[int, bytes, int]] = []  # (index, tag, size)
        run_start = run_end = -1

        def flush() -> None:
            if not run:
                return
            blob = self.store.pread(run_start, run_end - run_start)
            pos = 0
            for index, tag, size in run:
                out[index] = open_chunk(self.key, index, blob[pos : pos + size + OVERHEAD], tag)
                pos += cs + OVERHEAD
            run.clear()

        for i in range(first, last + 1):
            if i in self._dirty:
                continue
            where = self._stored(i)
            if where is None:
                out[i] = b""
                continue
            slot, tag, size = where
            off = record_offset(cs, i, slot)
            if run and (off != run_end or run[-1][2] != cs):
                flush()
            if not run:
                run_start = off
            run.append((i, tag, size))
            run_end = off + size + OVERHEAD
        flush()
        return out

    def _chunk(self, i: int) -> bytes:
        """Chunk ``i`` as the app sees it now (may be shorter than its extent: zeros follow)."""
        dirty = self._dirty.get(i)
        if dirty is not None:
            return dirty
        return self._load(i, i)[i]

    # -- reading ------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at end of file).

        Raises:
            IntegrityError: a chunk on the host was altered, moved, or rolled back.
        """
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(self.length, offset + size)
        if end <= offset:
            return b""
        cs = self.key.chunk_size
        first, last = offset // cs, (end - 1) // cs
        loaded = self._load(first, last)
        out = []
        pos = offset
        while pos < end:
            i, within = divmod(pos, cs)
            take = min(cs - within, end - pos)
            chunk = self._dirty.get(i)
            if chunk is None:
                chunk = loaded[i]
            piece = chunk[within : within + take] if within or take < len(chunk) else chunk
            out.append(piece if len(piece) == take else piece + bytes(take - len(piece)))
            pos += take
        return b"".join(out)

    # -- writing ------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset`` (a gap past the end reads as zeros).  Not yet committed."""
        if offset < 0:
            raise ValueError("negative offset")
        cs = self.key.chunk_size
        pos, view = offset, memoryview(data).cast("B")
        n = len(view)
        while view:
            i, within = divmod(pos, cs)
            take = min(cs - within, len(view))
            if within == 0 and (take == cs or pos + take >= self.length):
                # The chunk's old contents don't matter: all of it, or all that remains, is new.
                self._dirty[i] = bytes(view[:take])
            else:
                old = self._chunk(i)
                if len(old) < within:
                    old += bytes(within - len(old))
                self._dirty[i] = old[:within] + bytes(view[:take]) + old[within + take :]
            self._pending.pop(i, None)
            view = view[take:]
            pos += take
        self.length = max(self.length, offset + n)
        if len(self._dirty) > self._cache_chunks:
            self._seal_dirty()
        return n

    def truncate(self, length: int) -> None:
        if length < 0:
            raise ValueError("negative length")
        cs = self.key.chunk_size
        if length < self.length and length % cs:
            # The chunk the new end falls in keeps its head: make it dirty, cut to size.
            i = length // cs
            self._dirty[i] = self._chunk(i)[: length - i * cs]
            self._pending.pop(i, None)
        for i in [i for i in self._dirty if i * cs >= length]:
            del self._dirty[i]
        for i in [i for i in self._pending if i * cs >= length]:
            del self._pending[i]
        self._valid_end = min(self._valid_end, length)
        self.length = length

    @property
    def dirty(self) -> bool:
        return (
            bool(self._dirty)
            or bool(self._pending)
            or self.length != self._committed.length
            or self._valid_end < self.length
        )

    # -- sealing and committing ---------------------------------------------------------------

    def _seal_dirty(self) -> None:
        """Seal every dirty chunk into its free slot (nothing committed is touched)."""
        cs = self.key.chunk_size
        batch: list[bytes] = []
        batch_start = batch_end = -1
        for i in sorted(self._dirty):
            plaintext = self._dirty[i]
            slot = self._free_slot(i)
            record = seal_chunk(self.key, i, plaintext)
            off = record_offset(cs, i, slot)
            if batch and off != batch_end:
                self.store.pwrite(batch_start, b"".join(batch))
                batch.clear()
            if not batch:
                batch_start = off
            batch.append(record)
            # A short record ends a run: the next slot does not start where it ends.
            batch_end = off + cs + OVERHEAD if len(plaintext) == cs else -2
            self._pending[i] = _Pending(slot, record_tag(record), len(plaintext))
        if batch:
            self.store.pwrite(batch_start, b"".join(batch))
        self._dirty.clear()

    def commit(self) -> FileEntry:
        """Seal every changed chunk into its free slot; return the entry to put in the FSPF.

        The caller must flush the store before it replaces the FSPF with one holding the
        returned entry: that replacement is the commit point.  The work is proportional to
        the chunks that changed (plus a copy of the tag array), not to the file's size.
        """
        entry, cs = self._committed, self.key.chunk_size
        n = chunk_count(self.length, cs)
        # Chunks that must be (re)sealed besides the dirty ones: the committed ones whose
        # extent changed (the old last chunk), those the file grew over or truncated away,
        # and early-sealed ones that the file has since grown past.
        first_gone = min(entry.chunks, chunk_count(self._valid_end, cs))
        candidates = set(range(first_gone, n))
        candidates.update(i for i in self._pending if i < n)
        if entry.chunks:
            candidates.add(entry.chunks - 1)
        for i in sorted(candidates):
            if i >= n or i in self._dirty:
                continue
            size = min(cs, self.length - i * cs)
            where = self._stored(i)
            if where is None or where[2] != size:
                plaintext = self._chunk(i)[:size]
                self._dirty[i] = plaintext + bytes(size - len(plaintext))
        for i, chunk in list(self._dirty.items()):
            size = min(cs, self.length - i * cs)
            if len(chunk) != size:  # a dirty chunk the file has grown past: pad it to its extent
                self._dirty[i] = chunk[:size] + bytes(size - len(chunk))
        self._seal_dirty()
        tags = bytearray(entry.tags[: n * TAG_SIZE])
        tags.extend(bytes(n * TAG_SIZE - len(tags)))
        slots = bytearray(entry.slots[:n])
        slots.extend(bytes(n - len(slots)))
        for i, p in self._pending.items():
            tags[i * TAG_SIZE : (i + 1) * TAG_SIZE] = p.tag
            slots[i] = p.slot
        self._committed = FileEntry(entry.key, self.length, bytes(tags), bytes(slots), entry.store)
        self._pending.clear()
        self._valid_end = self.length
        return self._committed
