"""Just enough ELF to find the libraries a wheel keeps beside its extension (TRUSTED).

The measuring loader maps an extension from ``/proc/self/fd/N``, so glibc's ``$ORIGIN``
is ``/proc/self/fd`` and an ``RPATH``/``RUNPATH`` of ``$ORIGIN/../pkg.libs`` (what
auditwheel writes) finds nothing.  :func:`origin_dependencies` reads the dynamic section
and names the ``DT_NEEDED`` libraries that such a run path finds relative to the file's
real directory; the loader maps those first.  64-bit little-endian ELF only (x86-64);
anything else has no such dependencies as far as this module is concerned.

Imports only built-in modules: it runs inside the measuring loader.
"""

import posix
import posixpath  # frozen: pure string operations
import stat

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 10, 15, 29
_MAX_DYNAMIC = 1 << 20


def _u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def origin_dependencies(fd: int, origin: str) -> list[str]:
    """Paths of the ``$ORIGIN``-relative libraries that the ELF object open on ``fd`` needs.

    Args:
        fd: the object, open for reading.
        origin: the directory the object really is in (what ``$ORIGIN`` should have been).
    """
    try:
        needed, run_paths = _dynamic(fd)
    except (OSError, ValueError):
        return []
    found = []
    for name in needed:
        if "/" in name:
            continue
        for entry in run_paths:
            if "$ORIGIN" not in entry and "${ORIGIN}" not in entry:
                continue
            d = entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)
            path = posixpath.normpath(d + "/" + name)
            try:
                if stat.S_ISREG(posix.stat(path).st_mode):
                    found.append(path)
                    break
            except OSError:
                continue
    return found


def _dynamic(fd: int) -> tuple[list[str], list[str]]:
    """The ``DT_NEEDED`` names and the run-path entries of the object on ``fd``."""
    head = posix.pread(fd, 64, 0)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return [], []
    phoff, phentsize, phnum = _u(head, 32, 8), _u(head, 54, 2), _u(head, 56, 2)
    if phentsize < 56 or phnum > 4096:
        raise ValueError("implausible program headers")
    table = posix.pread(fd, phentsize * phnum, phoff)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        ph = table[i * phentsize : (i + 1) * phentsize]
        kind = _u(ph, 0, 4)
        if kind == _PT_LOAD:
            loads.append((_u(ph, 16, 8), _u(ph, 8, 8), _u(ph, 32, 8)))  # vaddr, offset, filesz
        elif kind == _PT_DYNAMIC:
            dynamic = (_u(ph, 8, 8), min(_u(ph, 32, 8), _MAX_DYNAMIC))
    if dynamic is None:
        return [], []
    dyn = posix.pread(fd, dynamic[1], dynamic[0])
    needed, paths = [], []
    strtab = strsz = None
    for j in range(0, len(dyn) - 15, 16):
        tag, value = _u(dyn, j, 8), _u(dyn, j + 8, 8)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed.append(value)
        elif tag in (_DT_RPATH, _DT_RUNPATH):
            paths.append(value)
        elif tag == _DT_STRTAB:
            strtab = value
        elif tag == _DT_STRSZ:
            strsz = value
    if strtab is None or strsz is None or not paths:
        return [], []
    offset = next((off + strtab - va for va, off, size in loads if va <= strtab < va + size), None)
    if offset is None:
        return [], []
    strings = posix.pread(fd, min(strsz, _MAX_DYNAMIC), offset)

    def string(at: int) -> str:
        end = strings.find(b"\0", at)
        return strings[at : end if end >= 0 else len(strings)].decode("utf-8", "surrogateescape")

    run_paths = [p for v in paths for p in string(v).split(":") if p]
    return [string(v) for v in needed], run_paths
