"""A protected file: random-access reads and writes over sealed chunks, committed
crash-consistently (sans-IO: the caller supplies the backing store).

Theory of operation
-------------------
On the host, a protected file is an array of record *slots*, two per chunk: chunk
``i`` lives at slot ``2*i`` or ``2*i + 1``, each slot ``chunk_size + 28`` bytes
wide.  The file's FSPF entry says, for every chunk, which slot holds its committed
version and that version's tag.

Writes change plaintext chunks held in the enclave (the dirty set).  A *commit*
(at ``fsync``, ``close`` or exit) seals every changed chunk into the slot that is
*not* the committed one, and returns a new FSPF entry naming the new slots and
tags.  The caller then flushes the store and replaces the FSPF atomically.  So a
kill at any point leaves a state the FSPF can read:

* before the FSPF is replaced: the old entry names the old slots, untouched;
* after: the new entry names the new slots, already written and flushed.

A committed record is never overwritten; a slot is reused only two commits later.
Freshness needs no version numbers: the FSPF pins each chunk's exact tag, so an
older record for the same chunk (a rollback by the host) fails to open.
"""

from __future__ import annotations

from typing import Protocol

from pyscone.protect.chunks import OVERHEAD, chunk_count, open_chunk, record_tag, seal_chunk
from pyscone.protect.fspf import FileEntry


class Store(Protocol):
    """Where records live: the host file (through host calls) or, in tests, memory."""

    def pread(self, offset: int, size: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes) -> None: ...


class ProtectedFile:
    def __init__(self, entry: FileEntry, store: Store) -> None:
        self.key = entry.key
        self.store = store
        self.length = entry.length
        self._committed = entry
        self._dirty: dict[int, bytes] = {}
        self._stride = self.key.chunk_size + OVERHEAD
        # Committed bytes at or beyond this offset were truncated away: they read as zeros
        # if the file grows again, never as their old contents.
        self._valid_end = entry.length

    # -- reading ------------------------------------------------------------------------------

    def _committed_chunk(self, i: int) -> bytes:
        entry, cs = self._committed, self.key.chunk_size
        if i >= len(entry.tags):
            return b""
        size = min(cs, entry.length - i * cs)
        slot = entry.slots[i]
        record = self.store.pread((2 * i + slot) * self._stride, size + OVERHEAD)
        return open_chunk(self.key, i, record, entry.tags[i])

    def _chunk(self, i: int) -> bytes:
        """Chunk ``i`` as the app sees it now (may be shorter than its extent: zeros follow)."""
        dirty = self._dirty.get(i)
        if dirty is not None:
            return dirty
        valid = self._valid_end - i * self.key.chunk_size
        return self._committed_chunk(i)[: max(valid, 0)] if valid > 0 else b""

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at end of file).

        Raises:
            IntegrityError: a chunk on the host was altered, moved, or rolled back.
        """
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(self.length, offset + size)
        cs = self.key.chunk_size
        out = []
        pos = offset
        while pos < end:
            i, within = divmod(pos, cs)
            take = min(cs - within, end - pos)
            piece = self._chunk(i)[within : within + take]
            out.append(piece + bytes(take - len(piece)))
            pos += take
        return b"".join(out)

    # -- writing ------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (a gap past the end reads as zeros).  Not yet committed."""
        if offset < 0:
            raise ValueError("negative offset")
        cs = self.key.chunk_size
        pos, view = offset, memoryview(data)
        while view:
            i, within = divmod(pos, cs)
            take = min(cs - within, len(view))
            old = self._chunk(i)
            if len(old) < within:
                old += bytes(within - len(old))
            self._dirty[i] = old[:within] + bytes(view[:take]) + old[within + take :]
            view = view[take:]
            pos += take
        self.length = max(self.length, offset + len(data))
        return len(data)

    def truncate(self, length: int) -> None:
        if length < 0:
            raise ValueError("negative length")
        cs = self.key.chunk_size
        for i in list(self._dirty):
            start = i * cs
            if start >= length:
                del self._dirty[i]
            elif start + len(self._dirty[i]) > length:
                self._dirty[i] = self._dirty[i][: length - start]
        self._valid_end = min(self._valid_end, length)
        self.length = length

    @property
    def dirty(self) -> bool:
        return bool(self._dirty) or self.length != self._committed.length or self._valid_end < self.length

    # -- committing ---------------------------------------------------------------------------

    def commit(self) -> FileEntry:
        """Seal every changed chunk into its free slot; return the entry to put in the FSPF.

        The caller must flush the store before it replaces the FSPF with one holding the
        returned entry: that replacement is the commit point.
        """
        entry, cs = self._committed, self.key.chunk_size
        n = chunk_count(self.length, cs)
        tags, slots = list(entry.tags[:n]), list(entry.slots[:n])
        for i in range(n):
            size = min(cs, self.length - i * cs)
            committed_size = min(cs, entry.length - i * cs) if i < len(entry.tags) else -1
            intact = (i + 1) * cs <= self._valid_end or self._valid_end >= entry.length
            if i not in self._dirty and size == committed_size and intact:
                continue  # unchanged, same extent: keep the committed record
            plaintext = self._chunk(i)[:size]
            plaintext += bytes(size - len(plaintext))
            slot = 1 - entry.slots[i] if i < len(entry.slots) else 0
            record = seal_chunk(self.key, i, plaintext)
            self.store.pwrite((2 * i + slot) * self._stride, record)
            if i < len(tags):
                tags[i], slots[i] = record_tag(record), slot
            else:
                tags.append(record_tag(record))
                slots.append(slot)
        self._committed = FileEntry(self.key, self.length, tuple(tags), tuple(slots))
        self._dirty.clear()
        self._valid_end = self.length
        return self._committed
