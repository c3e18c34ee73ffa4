"""``pyscone fspf``: make and inspect file-system protection files on the owner's machine.

The owner runs these where the plaintext is (a build machine), never on the
untrusted host: ``addf`` reads plaintext files and writes their protected form.
An FSPF is always sealed; next to it live two small files:

* ``FSPF.key`` — the FSPF key, hex (mode 0600).  **Dev mode only**: in production
  the key is given to the CAS and reaches the enclave after attestation.
* ``FSPF.tag`` — the tag of the newest version, which ``pyscone run`` pins (so an
  older FSPF is refused) and which the enclave updates at every commit.
"""

from __future__ import annotations

import os
import stat as stat_mod
from dataclasses import dataclass
from typing import BinaryIO

from pyscone.protect import fspf as fspf_mod
from pyscone.protect.chunks import FileKey, IntegrityError, chunk_count
from pyscone.protect.fspf import FSPF, FileEntry
from pyscone.protect.pfile import LocalStore, ProtectedFile


class ToolError(Exception):
    """A user mistake or an unusable file: one ``error: ...`` line."""


class FileStore(LocalStore):
    """A protected file's records in a local file."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self.f.fileno(), size, offset)

    def pwrite(self, offset: int, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.f.fileno(), view, offset)
            offset += n
            view = view[n:]


@dataclass
class Paths:
    fspf: str
    key: str
    tag: str

    @classmethod
    def of(cls, fspf: str, key_file: str | None = None, tag_file: str | None = None) -> Paths:
        return cls(fspf, key_file or fspf + ".key", tag_file or fspf + ".tag")


def _write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_key(path: str) -> bytes:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise ToolError(f"cannot read the FSPF key {path}: {e.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ToolError(f"{path} does not hold an FSPF key (64 hex digits)")
    return key


def _copies(paths: Paths) -> list[str]:
    """The FSPF's copies on disk (the enclave writes ``FSPF.1`` beside ``FSPF``, in turn)."""
    return [p for p in (paths.fspf, paths.fspf + ".1") if p == paths.fspf or os.path.exists(p)]


def load(paths: Paths) -> tuple[FSPF, bytes, str]:
    """The FSPF, its key and its tag: of its copies, the one the tag file names, else the
    newest that opens (``enclave/shields/fspfcopies.py``)."""
    key = read_key(paths.key)
    try:
        with open(paths.tag) as fh:
            pinned = set(fh.read().split())
    except OSError:
        pinned = set()
    found: list[tuple[bool, int, FSPF, str]] = []
    problem: ToolError | None = None
    for where in _copies(paths):
        try:
            with open(where, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise ToolError(f"cannot read {where}: {e.strerror}") from None
        try:
            table, tag = fspf_mod.open_sealed(blob, key), fspf_mod.tag_of(blob)
        except IntegrityError as e:
            problem = problem or ToolError(f"{where}: {e} (wrong key?)")
            continue
        except ValueError as e:
            problem = problem or ToolError(f"{where}: {e}")
            continue
        found.append((tag in pinned, table.generation, table, tag))
    if not found:
        assert problem is not None
        raise problem
    _, _, table, tag = max(found, key=lambda f: (f[0], f[1]))
    return table, key, tag


def save(paths: Paths, table: FSPF, key: bytes) -> str:
    """Write ``table`` as the FSPF's only copy (newer than any copy there was) and pin it."""
    table.generation += 1
    try:
        blob, tag = fspf_mod.seal(table, key)
    except ValueError as e:
        raise ToolError(str(e)) from None
    _write_atomic(paths.fspf, blob)
    _write_atomic(paths.tag, (tag + "\n").encode())
    try:
        os.unlink(paths.fspf + ".1")
    except FileNotFoundError:
        pass
    return tag


def create(paths: Paths, force: bool = False) -> str:
    for p in (paths.fspf, paths.key):
        if os.path.exists(p) and not force:
            raise ToolError(f"{p} exists (use --force to replace it)")
    key = fspf_mod.generate_fspf_key()
    _write_atomic(paths.key, (key.hex() + "\n").encode(), 0o600)
    os.chmod(paths.key, 0o600)
    return save(paths, FSPF(), key)


def _abs(prefix: str) -> str:
    if not prefix.startswith("/"):
        raise ToolError(f"{prefix!r}: a region or file path is an absolute path, as the enclave sees it")
    return os.path.normpath(prefix)


def add_region(paths: Paths, prefix: str, kind: str, chunk_size: int) -> str:
    table, key, _ = load(paths)
    p = _abs(prefix)
    existing = [r for r in table.regions if r.prefix == p]
    try:
        if existing:
            if any(table.region_for(f).prefix == p for f in table.files):
                raise ToolError(f"region {p} holds protected files; its kind cannot change")
            table.regions.remove(existing[0])
        table.add_region(p, kind, chunk_size)
        table.validate()
    except ValueError as e:
        raise ToolError(str(e)) from None
    return save(paths, table, key)


def _protect_one(table: FSPF, logical: str, plaintext: bytes) -> FileEntry:
    region = table.region_for(logical)
    if region.kind not in ("authenticated", "encrypted"):
        raise ToolError(f"{logical} lies in a {region.kind} region: only authenticated and encrypted files are added")
    fk = FileKey.generate(encrypted=region.kind == "encrypted", chunk_size=region.chunk_size)
    os.makedirs(os.path.dirname(logical), exist_ok=True)
    with open(logical, "wb+") as f:
        pf = ProtectedFile(FileEntry(fk), FileStore(f))
        pf.write(0, plaintext)
        entry = pf.commit()
        f.flush()
        os.fsync(f.fileno())
    return entry


def add_files(paths: Paths, dest: str, src: str) -> tuple[str, list[str]]:
    """Protect ``src`` (a file or a directory tree) into ``dest`` (its path in the enclave).

    The protected form is written at ``dest`` on this machine (the same path the enclave
    will use).  ``src`` may be ``dest`` itself: the files are then protected in place.
    """
    table, key, _ = load(paths)
    d = _abs(dest)
    if not os.path.exists(src):
        raise ToolError(f"{src}: no such file or directory")
    pairs: list[tuple[str, str]] = []
    if os.path.isdir(src):
        for root, dirs, names in os.walk(src):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                if stat_mod.S_ISREG(os.lstat(full).st_mode):
                    pairs.append((full, os.path.join(d, os.path.relpath(full, src))))
    else:
        pairs.append((src, d))
    fspf_files = {os.path.abspath(p) for p in (paths.fspf, paths.key, paths.tag)}
    pairs = [(s, t) for s, t in pairs if os.path.abspath(s) not in fspf_files]
    if not pairs:
        raise ToolError(f"{src}: no regular files to protect")
    for _, logical in pairs:
        kind = table.region_for(logical).kind
        if kind not in ("authenticated", "encrypted"):
            raise ToolError(f"{logical} lies in a {kind} region: add a protected region first (pyscone fspf addr)")
    # Read every plaintext first: protecting in place overwrites the sources.
    contents = []
    for source, logical in pairs:
        with open(source, "rb") as f:
            contents.append((logical, f.read()))
    for logical, plaintext in contents:
        table.files[logical] = _protect_one(table, logical, plaintext)
    return save(paths, table, key), [logical for logical, _ in contents]


def show(paths: Paths) -> str:
    table, _, tag = load(paths)
    lines = [f"FSPF {paths.fspf}", f"tag  {tag}", "regions:"]
    for r in sorted(table.regions, key=lambda r: r.prefix):
        lines.append(f"  {r.prefix:<30} {r.kind:<14} chunk {r.chunk_size}")
    lines.append(f"files: {len(table.files)}")
    for path, e in sorted(table.files.items()):
        kind = "encrypted" if e.key.encrypted else "authenticated"
        n = chunk_count(e.length, e.key.chunk_size)
        lines.append(f"  {path:<40} {kind:<14} {e.length:>10} bytes  {n} chunks")
    return "\n".join(lines) + "\n"


def cat(paths: Paths, logical: str, out: BinaryIO) -> None:
    table, _, _ = load(paths)
    p = _abs(logical)
    entry = table.files.get(p)
    if entry is None:
        raise ToolError(f"{p} is not a protected file of this FSPF")
    try:
        with open(entry.store or p, "rb") as f:
            pf = ProtectedFile(entry, FileStore(f))
            pos = 0
            while pos < entry.length:
                data = pf.read(pos, 1 << 20)
                out.write(data)
                pos += len(data)
    except OSError as e:
        raise ToolError(f"cannot read {p}: {e.strerror}") from None
    except IntegrityError as e:
        raise ToolError(f"{p}: {e}") from None
