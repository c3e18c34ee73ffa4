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

from collections.abc import Iterator, Sequence
from typing import Protocol

from pyscone.protect.chunks import (
    OVERHEAD,
    TAG_SIZE,
    chunk_count,
    open_chunk,
    open_run_into,
    seal_run_into,
)
from pyscone.protect.fspf import FileEntry

GROUP_BYTES = 256 * 1024  # plaintext per layout group
CACHE_BYTES = 1 << 20  # dirty plaintext kept in the enclave per file before early sealing
READ_AHEAD_BYTES = 256 * 1024  # plaintext a forward reader has requested ahead of it
CLEAN_CHUNKS = 8  # verified plaintext chunks kept per file for small reads (see ``_clean``)
STREAM_BYTES = 32 * 1024  # whole chunks written at once from this much up are sealed at once


class Store(Protocol):
    """Where records live: the host file (through host calls) or, in tests, memory."""

    def pread(self, offset: int, size: int) -> bytes | memoryview: ...

    def pwrite(self, offset: int, data: bytes | bytearray) -> None: ...

    def prefetch(self, offset: int, size: int) -> None:
        """A hint: ``pread(offset, size)`` is likely soon (a store may ignore it)."""

    def forget(self) -> None:
        """A hint: drop what :meth:`prefetch` asked for."""


class LocalStore:
    """Base of stores that are read synchronously: read-ahead hints are ignored."""

    def prefetch(self, offset: int, size: int) -> None:
        pass

    def forget(self) -> None:
        pass


def _put(out: memoryview, dst: int, chunk: bytes | bytearray, within: int, take: int) -> None:
    """Copy ``take`` bytes of ``chunk`` from ``within`` to ``out[dst:]``; zeros past its end."""
    piece = chunk[within : within + take]
    out[dst : dst + len(piece)] = piece
    if len(piece) < take:
        out[dst + len(piece) : dst + take] = bytes(take - len(piece))


def group_size(chunk_size: int) -> int:
    """Chunks per layout group: fixed by the chunk size, so part of the format."""
    return max(1, GROUP_BYTES // chunk_size)


def record_offset(chunk_size: int, index: int, slot: int) -> int:
    """Where slot ``slot`` of chunk ``index`` starts in the host file."""
    g = group_size(chunk_size)
    stride = chunk_size + OVERHEAD
    return ((index // g) * 2 * g + slot * g + index % g) * stride


class ProtectedFile:
    """One protected file's contents as the app sees them (not thread-safe: callers lock)."""

    def __init__(
        self,
        entry: FileEntry,
        store: Store,
        *,
        cache_bytes: int = CACHE_BYTES,
        stream_bytes: int = STREAM_BYTES,
        io_bytes: int | None = None,
    ) -> None:
        self.key = entry.key
        self.store = store
        self.length = entry.length
        self._committed = entry
        self._dirty: dict[int, bytes] = {}
        self._pending: dict[int, tuple[int, bytes, int]] = {}  # chunk -> its sealed record's slot, tag, size
        self._cache_chunks = max(1, cache_bytes // self.key.chunk_size)
        self._stream = max(1, stream_bytes // self.key.chunk_size) * self.key.chunk_size
        # Records per store write: as many as fit one store call (``io_bytes``), so that the
        # calls are full and few.
        stride = self.key.chunk_size + OVERHEAD
        self._per_write = max(1, io_bytes // stride) if io_bytes else 1 << 62
        # Committed bytes at or beyond this offset were truncated away: they read as zeros
        # if the file grows again, never as their old contents.
        self._valid_end = entry.length
        self._next_read = -1  # where a reader going forward reads next
        self._ahead_to = 0  # chunks before this one have been prefetched
        # Plaintext of chunks opened for a small read, verified when opened: SQLite reads its
        # 16-byte change counter at the start of every transaction, and without this each of
        # those reads is a host round trip and a decryption.  Any change to the file empties it.
        self._clean: dict[int, bytes] = {}
        # What :meth:`commit` replaced, for :meth:`undo_commit`.
        self._undo: tuple[FileEntry, dict[int, tuple[int, bytes, int]], int] | None = None
        #: Counts the changes to the contents (writes, truncations, commits): a cache of
        #: anything derived from them is valid while this is unchanged.
        self.mutations = 0

    @property
    def entry(self) -> FileEntry:
        """The last committed entry."""
        return self._committed

    # -- where a chunk's current record is --------------------------------------------------

    def _stored(self, i: int) -> tuple[int, bytes, int] | None:
        """(slot, tag, size) of chunk ``i``'s current sealed record, if it is on the store."""
        p = self._pending.get(i)
        if p is not None:
            return p
        cs, entry = self.key.chunk_size, self._committed
        if i < entry.chunks and i * cs < self._valid_end:
            return entry.slots[i], entry.tag(i), min(cs, entry.length - i * cs)
        return None

    def _chunk(self, i: int) -> bytes:
        """Chunk ``i`` as the app sees it now (may be shorter than its extent: zeros follow)."""
        dirty = self._dirty.get(i)
        if dirty is not None:
            return dirty
        where = self._stored(i)
        if where is None:
            return b""
        slot, tag, size = where
        record = self.store.pread(record_offset(self.key.chunk_size, i, slot), size + OVERHEAD)
        return open_chunk(self.key, i, record, tag)

    # -- reading ------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at end of file).

        Raises:
            IntegrityError: a chunk on the host was altered, moved, or rolled back.
        """
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        out = bytearray(max(0, min(size, self.length - offset)))
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, out: memoryview) -> int:
        """Read into ``out`` from ``offset``; returns how many bytes (fewer at end of file).

        Verified chunks are decrypted straight into ``out``; runs of records that are
        adjacent on the host are fetched with one store read.  On an error ``out`` holds
        nothing unverified.

        Raises:
            IntegrityError: a chunk on the host was altered, moved, or rolled back.
        """
        if offset < 0:
            raise ValueError("negative offset")
        end = min(self.length, offset + len(out))
        if end <= offset:
            return 0
        cs = self.key.chunk_size
        if self._clean and (clean := self._clean.get(offset // cs)) is not None:
            within = offset % cs
            if (end - 1) // cs == offset // cs and within + end - offset <= len(clean):
                out[: end - offset] = clean[within : within + end - offset]
                return end - offset
        forward, self._next_read = offset == self._next_read, end
        if not forward and self._ahead_to:
            self.store.forget()
            self._ahead_to = 0
        if not self._dirty and not self._pending and end <= self._valid_end:
            self._read_committed(offset, end, out, forward)
            return end - offset
        run: list[tuple[int, bytes, int, int, int, int]] = []  # index, tag, size, dst, within, take
        run_start = run_end = -1

        def fetch() -> None:
            blob = memoryview(self.store.pread(run_start, run_end - run_start))
            pos = 0
            for index, tag, size, dst, within, take in run:
                self._open_piece(index, blob[pos : pos + size + OVERHEAD], memoryview(tag), out, dst, within, take)
                pos += cs + OVERHEAD
            run.clear()

        dirty = self._dirty
        pos = offset
        while pos < end:
            i, within = divmod(pos, cs)
            take = min(cs - within, end - pos)
            dst = pos - offset
            pos += take
            chunk = dirty.get(i)
            if chunk is not None:
                _put(out, dst, chunk, within, take)
                continue
            where = self._stored(i)
            if where is None:
                out[dst : dst + take] = bytes(take)
                continue
            slot, tag, size = where
            off = record_offset(cs, i, slot)
            if run and (off != run_end or run[-1][2] != cs):
                fetch()
            if not run:
                run_start = off
            run.append((i, tag, size, dst, within, take))
            run_end = off + size + OVERHEAD
        if run:
            fetch()
        return end - offset

    def _open_piece(
        self, index: int, record: memoryview, tag: memoryview, out: memoryview, dst: int, within: int, take: int
    ) -> None:
        """Open chunk ``index`` and put ``take`` bytes of it, from ``within``, at ``out[dst:]``:
        straight into ``out`` when that is the whole chunk, through a copy when it is a piece."""
        size = len(record) - OVERHEAD
        if within == 0 and take == size:
            open_run_into(self.key, index, record, tag, out[dst : dst + size])
            return
        plaintext = bytearray(max(size, 0))
        open_run_into(self.key, index, record, tag, memoryview(plaintext))
        _put(out, dst, plaintext, within, take)
        cs = self.key.chunk_size
        if index not in self._dirty and size == min(cs, self.length - index * cs):  # (not a record the file outgrew)
            if len(self._clean) >= CLEAN_CHUNKS:
                del self._clean[next(iter(self._clean))]
            self._clean[index] = bytes(plaintext)

    def _committed_runs(self, first: int, last: int) -> Iterator[tuple[int, int, int, int]]:
        """Committed chunks ``first..last`` as runs whose records lie back to back on the
        host (same group, same slot): ``(i, j, offset, size)`` for chunks ``i..j-1``."""
        cs = self.key.chunk_size
        stride = cs + OVERHEAD
        g = group_size(cs)
        entry = self._committed
        slots = entry.slots
        i = first
        while i <= last:
            slot = slots[i]
            stop = min((i // g + 1) * g, last + 1)
            other = slots.find(1 - slot, i, stop)
            j = stop if other < 0 else other
            tail = min(cs, entry.length - (j - 1) * cs)  # the file's last chunk may be short
            yield i, j, record_offset(cs, i, slot), (j - i - 1) * stride + tail + OVERHEAD
            i = j

    def _read_committed(self, offset: int, end: int, out: memoryview, forward: bool) -> None:
        """``readinto`` when every chunk in range is committed (nothing written since).

        Each run of adjacent records is fetched with one store read; its whole chunks are
        opened in one :func:`open_run_into` pass, the partial ones at either end one by
        one.  A reader going forward has the records after these requested before it
        opens these, so the host reads them meanwhile.
        """
        key = self.key
        cs = key.chunk_size
        stride = cs + OVERHEAD
        entry = self._committed
        tags = memoryview(entry.tags)
        last = (end - 1) // cs
        for i, j, where, size in self._committed_runs(offset // cs, last):
            blob = memoryview(self.store.pread(where, size))
            if forward:
                self._read_ahead(last + 1)
                forward = False
            tail = size - (j - i - 1) * stride - OVERHEAD
            lo = i if i * cs >= offset else i + 1
            hi = max(lo, j if j * cs <= end and tail == cs else j - 1)
            if hi > lo:
                open_run_into(
                    key,
                    lo,
                    blob[(lo - i) * stride : (hi - i) * stride],
                    tags[lo * TAG_SIZE : hi * TAG_SIZE],
                    out[lo * cs - offset : hi * cs - offset],
                )
            for k in (*range(i, lo), *range(hi, j)):
                pos = (k - i) * stride
                record = blob[pos : pos + min(cs, entry.length - k * cs) + OVERHEAD]
                start = max(k * cs, offset)
                tag = tags[k * TAG_SIZE : (k + 1) * TAG_SIZE]
                self._open_piece(k, record, tag, out, start - offset, start - k * cs, min((k + 1) * cs, end) - start)

    def _read_ahead(self, first: int) -> None:
        cs = self.key.chunk_size
        first = max(first, self._ahead_to)
        stop = min(first + max(1, READ_AHEAD_BYTES // cs), chunk_count(self._valid_end, cs))
        if first >= stop:
            return
        for _, _, where, size in self._committed_runs(first, stop - 1):
            self.store.prefetch(where, size)
        self._ahead_to = stop

    # -- writing ------------------------------------------------------------------------------

    def _changed(self) -> None:
        self.mutations += 1
        self._clean.clear()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset`` (a gap past the end reads as zeros).  Not yet committed."""
        if offset < 0:
            raise ValueError("negative offset")
        self._changed()
        cs = self.key.chunk_size
        pos, view = offset, memoryview(data).cast("B")
        n = len(view)
        while view:
            i, within = divmod(pos, cs)
            if within == 0 and len(view) >= self._stream:
                # A large write of whole chunks (a buffered writer's flush, a copy) is sealed
                # now, straight from the caller's buffer: caching it would only cost a copy.
                whole = len(view) // cs
                dirty = self._dirty
                for k in range(i, i + whole) if dirty else ():
                    dirty.pop(k, None)
                # Whole chunks held back by the previous write join this run.
                first = i
                while first - 1 in dirty and len(dirty[first - 1]) == cs and i - first < self._per_write:
                    first -= 1
                run: list[bytes | memoryview] = [dirty.pop(k) for k in range(first, i)]
                run += [view[k * cs : (k + 1) * cs] for k in range(whole)]
                self.length = max(self.length, pos + whole * cs)  # before: a failed seal leaves it right
                held = self._seal(first, run, hold_tail=True)
                for k in range(len(run) - held, len(run)):
                    dirty[first + k] = bytes(run[k])  # too few to fill a store call: held for the next write
                view = view[whole * cs :]
                pos += whole * cs
                continue
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
        self._changed()
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
        dirty = self._dirty
        order = sorted(dirty)
        start = 0
        for k in range(1, len(order) + 1):
            # A run ends where the next record does not follow on the host, and after a short chunk.
            if k == len(order) or order[k] != order[k - 1] + 1 or len(dirty[order[k - 1]]) != self.key.chunk_size:
                self._seal(order[start], [dirty[i] for i in order[start:k]])
                start = k
        dirty.clear()

    def _seal(self, first: int, plaintexts: Sequence[bytes | memoryview], *, hold_tail: bool = False) -> int:
        """Seal chunks ``first, first + 1, …`` (all full but the last) into their free slots.

        Records that are adjacent on the host are sealed in place into one buffer and
        written with one store call (the store starts the write and returns); a call
        carries at most as many records as fit one store call.  With ``hold_tail`` a last
        call that would carry fewer is not made: returns how many chunks were held back.
        """
        cs, key = self.key.chunk_size, self.key
        g = group_size(cs)
        per = self._per_write
        slots = self._committed.slots
        n_committed = len(slots)
        n = len(plaintexts)
        i, k = first, 0
        while k < n:
            # Chunks i.. in one group, all with the same free slot, are back to back on the host.
            slot = 1 - slots[i] if i < n_committed else 0
            stop = min(n, k + (i // g + 1) * g - i, k + per)
            j = k + 1
            while j < stop and (1 - slots[first + j] if first + j < n_committed else 0) == slot:
                j += 1
            if hold_tail and j == n and j - k < per and (first + j) % g:
                return n - k
            run = plaintexts[k:j]
            sizes = [len(pt) for pt in run]
            buf = bytearray(sum(sizes) + OVERHEAD * len(run))
            tags = seal_run_into(key, i, run, memoryview(buf))
            self.store.pwrite(record_offset(cs, i, slot), buf)
            pending = self._pending
            for m, tag in enumerate(tags):
                pending[i + m] = (slot, tag, sizes[m])
            i += j - k
            k = j
        self._ahead_to = 0  # the store forgot its read-ahead when it was written
        return 0

    def commit(self) -> FileEntry:
        """Seal every changed chunk into its free slot; return the entry to put in the FSPF.

        The caller must flush the store before it replaces the FSPF with one holding the
        returned entry: that replacement is the commit point.  The work is proportional to
        the chunks that changed (plus a copy of the tag array), not to the file's size.
        """
        self._changed()
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
        for i, (slot, tag, _) in self._pending.items():
            tags[i * TAG_SIZE : (i + 1) * TAG_SIZE] = tag
            slots[i] = slot
        self._undo = (entry, dict(self._pending), self._valid_end)
        self._committed = FileEntry(entry.key, self.length, bytes(tags), bytes(slots), entry.store)
        self._pending.clear()
        self._valid_end = self.length
        return self._committed

    def undo_commit(self) -> None:
        """The entry the last :meth:`commit` returned was not committed (its records' sync or
        the FSPF's write failed, before any pin named it): go back to the previous entry, with
        the new records pending again.  So the next commit makes them durable (a retried
        ``fsync`` is not a no-op), and no later write reuses a slot the FSPF still names."""
        if self._undo is None:
            return
        self._committed, self._pending, self._valid_end = self._undo
        self._undo = None
        self._changed()
