"""The enclave's measuring loader (TRUSTED): the first code the enclave interpreter runs.

Theory of operation
-------------------
MRENCLAVE must be a hash of exactly what the enclave runs.  A measurement taken
at the end of boot by reading the files again would hash what the disk holds
*then*, not what was compiled earlier: a ``.pyc`` beside a module, a file that
changed in between, a module read through the host, a ``.pth`` line or a
``sitecustomize`` that deleted itself all run without changing it.  So nothing is
measured twice: every byte is hashed as it is loaded, and MRENCLAVE is computed
from that :data:`record` (``enclave/attest.py``).

The launcher starts the interpreter as ``python -I -S -X utf8 -X frozen_modules=on
-X pycache_prefix=/proc/self/environ -c BOOTSTRAP ...``: no ``site`` (so no ``.pth``
and no ``sitecustomize`` run before we do), no environment, and the modules that
make up the import system are the frozen copies inside the interpreter binary
(measured with it).  The only modules the interpreter's own start-up imports from
disk are ``encodings`` and two of its submodules; the pycache prefix is a path
under a regular file, so they can only have been compiled from their sources,
which :func:`start` reads to measure them (see "Residual" below).

:data:`BOOTSTRAP` (the ``-c`` program) reads this file once, compiles those bytes
and calls :func:`start`, which:

1. checks that the interpreter runs with exactly :data:`INTERPRETER_FLAGS` and
   this bootstrap, and with an empty environment (a host that adds ``-O`` or
   ``LD_PRELOAD`` is refused: exit 86, a host violation);
2. puts :class:`MeasuringFinder` where ``PathFinder`` was.  It reads each source
   once, directly (before lockdown the enclave still may), hashes it, and runs
   either those bytes compiled or the ``__pycache__`` entry beside them when its
   header matches; in both cases the *code object* is hashed too
   (:func:`code_digest`), so a ``.pyc`` that is not what the source compiles to
   changes MRENCLAVE, and an honest cache gives the same MRENCLAVE as none;
   C extensions are mapped from the very descriptor whose bytes are hashed
   (``dlopen("/proc/self/fd/N")``), so a swap on disk cannot slip in between;
3. does what ``site`` would do, measured: the venv's site-packages, each ``.pth``
   file hashed as it is read (its path lines honoured, its ``import`` lines run
   from those bytes), ``sitecustomize`` through the same finder;
4. imports ``pyscone.enclave.boot`` (through the finder) and runs it.

This module may import only built-in and frozen modules (anything else would be
loaded before the finder exists), hence no ``from __future__``, no ``typing`` at
run time, and plain classes.

Residual: ``encodings`` (and ``encodings.aliases``, ``encodings.utf_8``) are read
by the interpreter before this code runs, and are measured by reading them again;
a host that swaps one of these three files only for the milliseconds of interpreter
start-up is not caught, like the interpreter binary and the shared libraries that
the kernel and the dynamic linker map before any enclave code can look.  Only a
hardware loader closes that.
"""

import _imp
import _io
import marshal
import posix
import posixpath
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ExtensionFileLoader, ModuleSpec, SourceFileLoader
    from types import CodeType, ModuleType
    from typing import Any, NoReturn, TypeVar
else:
    _ext_mod = sys.modules["_frozen_importlib_external"]
    ExtensionFileLoader = _ext_mod.ExtensionFileLoader
    SourceFileLoader = _ext_mod.SourceFileLoader
    ModuleSpec = sys.modules["_frozen_importlib"].ModuleSpec
    CodeType = type(compile("", "", "exec"))

_ext: "Any" = sys.modules["_frozen_importlib_external"]
_bootstrap: "Any" = sys.modules["_frozen_importlib"]

#: The interpreter options of every enclave (the launcher passes them; :func:`start` checks them).
INTERPRETER_FLAGS = (
    "-I",  # isolated: no PYTHON* variables, no user site, no script directory on sys.path
    "-S",  # no site: .pth files and sitecustomize run only through the measuring loader
    "-X", "utf8",
    "-X", "frozen_modules=on",  # the import system is the interpreter's own (frozen) copy
    # Under a regular file no directory can exist, so start-up never finds a .pyc.
    "-X", "pycache_prefix=/proc/self/environ",
)  # fmt: skip

#: The ``-c`` program: read this module once, compile those bytes, start.  Its own text
#: is checked and measured by :func:`start`.  argv: [-c, config fd, pyscone package dir].
BOOTSTRAP = """\
import sys, _io
def _stage0(d):
    p = d + "/enclave/loader.py"
    with _io.FileIO(p, "r") as f:
        src = f.readall()
    m = type(sys)("pyscone.enclave.loader")
    m.__file__ = p
    sys.modules[m.__name__] = m
    exec(compile(src, p, "exec", dont_inherit=True), m.__dict__)
    m.start(src)
_stage0(sys.argv[2])
"""

#: What locale coercion (PEP 538) may put in the environment of ``python -I`` itself.
_COERCED = {b"LC_CTYPE": (b"C.UTF-8", b"C.utf8", b"UTF-8")}
_EXIT_HOST_VIOLATION = 86  # iago.EXIT_HOST_VIOLATION (iago cannot be imported this early)


class Loaded:
    """One thing the enclave loaded, as it was loaded (an entry of :data:`record`).

    ``sha256`` is of the bytes read (a source, a ``.pth``, a mapped file); ``code`` is
    :func:`code_digest` of the code object that ran, for modules that may come from a
    cache.  ``how`` says how the bytes reached the enclave (shown by ``pyscone tcb``):
    ``compiled``, ``cached``, ``mapped``, ``read``, or ``re-read`` (measured by a second
    read because something outside pyscone loaded it first).

    The digests are computed when the measurement is taken (:meth:`digest`), from the
    very bytes and code object that were used, which are kept until then; an enclave that
    is not measured drops them (:meth:`forget`) and never pays for hashing.
    """

    __slots__ = ("_code", "_data", "code", "fd", "how", "kind", "name", "path", "sha256", "size")

    def __init__(
        self,
        name: str,
        path: str,
        kind: str,
        data: "bytes | None",
        how: str,
        code: "CodeType | None" = None,
        fd: int = -1,
    ) -> None:
        self.name = name  # "module:json", "extension:_ssl", "pth:x.pth", "mapped:libffi.so.8", "bootstrap"
        self.path = path
        self.kind = kind  # "source" | "extension" | "library" | "pth" | "bootstrap"
        self.how = how
        self.fd = fd  # extensions and libraries: the descriptor they were mapped from (kept open)
        self.size = len(data) if data is not None else posix.fstat(fd).st_size
        self.sha256 = ""
        self.code = ""
        keep = _measuring and not _sealed
        self._data = data if keep else None
        self._code = code if keep else None

    def digest(self) -> str:
        """The SHA-256 of the bytes (and the code digest), computed now if not yet.

        Raises:
            RuntimeError: the enclave is not measured, so the bytes are gone.
        """
        if not self.sha256:
            if self._data is not None:
                self.sha256 = sha256(self._data)
            elif self.fd >= 0:  # a mapped file: read again from the descriptor it was mapped from
                self.sha256 = sha256(_read_fd(self.fd, self.size))
            else:
                raise RuntimeError(f"pyscone: {self.name} was loaded unmeasured")
            if self._code is not None:
                self.code = code_digest(self._code)
            self._data = self._code = None
        return self.sha256

    def forget(self) -> None:
        self._data = self._code = None


#: Everything loaded so far, in order.
record: list[Loaded] = []
_mapped: dict[str, Loaded] = {}  # path as found -> its extension or library entry
_sealed = False
_measuring = True  # until boot has read its configuration
_boot_main: object = None
_hash: "Callable[[bytes], Any] | None" = None
_pyscone_dir = ""


def sha256(data: bytes) -> str:
    if _hash is None:
        _load_hash()
    assert _hash is not None
    return str(_hash(data).hexdigest())


# -- the code that runs: a digest of a code object, whatever it was loaded from --------------------


def code_digest(code: "CodeType") -> str:
    """SHA-256 of a canonical form of ``code`` and every code object nested in it.

    Everything the interpreter executes is in a code object's fields, so two code objects
    with the same digest run the same.  ``marshal`` at version 2 serializes all fields
    (bytecode, names, the kinds of the local variables, the exception table, ...) without
    back-references, whose presence depends on reference counts; the constants are
    encoded here instead, so that frozensets (whose order depends on the hash seed) can be
    sorted and strings do not depend on whether some other code interned them first.
    ``co_filename`` is left out: it says where the file was, not what it does.
    """
    out: list[bytes] = []
    _canon_code(code, out)
    return sha256(b"".join(out))


def _canon_code(code: "CodeType", out: list[bytes]) -> None:
    out.append(b"C")
    body = marshal.dumps(code.replace(co_consts=(), co_filename=""), 2)
    out.append(b"%d:" % len(body))
    out.append(body)
    out.append(b"%d:" % len(code.co_consts))
    for const in code.co_consts:
        _canon_const(const, out)


def _canon_const(value: "Any", out: list[bytes]) -> None:
    kind = type(value)
    if kind is CodeType:
        _canon_code(value, out)
    elif kind is str:
        raw = value.encode("utf-8", "surrogatepass")
        out.append(b"s%d:" % len(raw))
        out.append(raw)
    elif kind is tuple:
        out.append(b"t%d:" % len(value))
        for item in value:
            _canon_const(item, out)
    elif kind is frozenset:
        parts = []
        for item in value:
            one: list[bytes] = []
            _canon_const(item, one)
            parts.append(b"".join(one))
        parts.sort()
        out.append(b"f%d:" % len(parts))
        out.extend(parts)
    else:  # None, Ellipsis, bool, int, float, complex, bytes: marshal is canonical for these
        raw = marshal.dumps(value, 2)
        out.append(b"m%d:" % len(raw))
        out.append(raw)


# -- raw file access (before lockdown; never the interposed os/io functions) ---------------------


def _read_fd(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = posix.pread(fd, max(size - offset, 1 << 16), offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _read(path: str) -> "tuple[bytes, Any]":
    with _io.FileIO(path, "r") as f:
        st = posix.fstat(f.fileno())
        return f.readall(), st


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(posix.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _join(a: str, b: str) -> str:
    return a + b if a.endswith("/") else a + "/" + b


def _dirname(path: str) -> str:
    head = path.rpartition("/")[0]
    return head or "/"


# -- Python modules --------------------------------------------------------------------------------


class SealedImportError(ImportError):
    """The runtime imported something between its measurement and the app's start."""


class MeasuredSourceLoader(SourceFileLoader):
    """Reads a source once, hashes it, and runs those bytes compiled or their verified cache."""

    def get_code(self, fullname: str) -> "CodeType":
        path = self.path
        source, st = _read(path)
        code, how = _from_cache(fullname, path, source, st)
        if code is None:
            code = compile(source, path, "exec", dont_inherit=True)
            how = "compiled"
            _write_cache(self, path, code, st)
        _note(Loaded("module:" + fullname, path, "source", source, how, code=code))
        return code


def _cache_path(path: str) -> str:
    head, _, tail = path.rpartition("/")
    stem = tail.rpartition(".")[0]
    return f"{head}/__pycache__/{stem}.{sys.implementation.cache_tag}.pyc"


def _from_cache(fullname: str, path: str, source: bytes, st: "Any") -> "tuple[CodeType | None, str]":
    """The code in the ``__pycache__`` entry of ``path`` if its header says it is of this source.

    The header only says whether the cache is current (so a stale one is not used); what the
    cache holds is trusted for nothing: its code object is measured like a compiled one.
    """
    if sys.implementation.cache_tag is None:
        return None, ""
    try:
        data, _ = _read(_cache_path(path))
        details = {"name": fullname, "path": path}
        flags = _ext._classify_pyc(data, fullname, details)
        if flags & 0b1:
            _ext._validate_hash_pyc(data, _imp.source_hash(_ext._RAW_MAGIC_NUMBER, source), fullname, details)
        else:
            _ext._validate_timestamp_pyc(data, int(st.st_mtime), st.st_size, fullname, details)
        code = marshal.loads(memoryview(data)[16:])
    except (ImportError, OSError, EOFError, ValueError, TypeError):
        return None, ""
    if type(code) is not CodeType:
        return None, ""
    _imp._fix_co_filename(code, path)  # type: ignore[attr-defined]  # what SourceLoader does
    return code, "cached"


def _write_cache(loader: "SourceFileLoader", path: str, code: "CodeType", st: "Any") -> None:
    """Keep the next start fast: write the cache the stdlib would (it is measured when used)."""
    if sys.dont_write_bytecode or sys.implementation.cache_tag is None:
        return
    try:
        data = _ext._code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size)
        loader.set_data(_cache_path(path), data)  # atomic, with raw I/O; errors are ignored there
    except (OSError, ValueError):
        pass


# -- C extensions and the libraries they bring -----------------------------------------------------


class MeasuredExtensionLoader(ExtensionFileLoader):
    """Maps an extension from the descriptor its bytes are measured from."""

    def create_module(self, spec: "ModuleSpec") -> "ModuleType":
        entry = _open_mapped(self.path, "extension:" + spec.name, "extension")
        mapped = ModuleSpec(spec.name, self, origin=f"/proc/self/fd/{entry.fd}")

        def init() -> "ModuleType":
            module: ModuleType = _bootstrap._call_with_frames_removed(_imp.create_dynamic, mapped)
            return module

        if self.path not in _mapped:  # (a preloaded one is recorded already)
            # Whether it maps or not, code of it may run (its initialization): recorded either way.
            _mapped[self.path] = entry
            _note(entry)
        module = _with_dependencies(entry, init)
        module.__file__ = self.path
        return module


def mapped_path(path: str) -> "str | None":
    """The ``/proc/self/fd/N`` name under which the extension at ``path`` was mapped, if it was.

    glibc hands an already-loaded object back to a ``dlopen`` of the same name without
    opening anything, so after lockdown the enclave importer can still initialize it.
    """
    entry = _mapped.get(path)
    return None if entry is None else f"/proc/self/fd/{entry.fd}"


def _open_mapped(path: str, name: str, kind: str) -> Loaded:
    """The entry of the file at ``path``, opened once.

    Its descriptor stays open for the life of the enclave: glibc knows the object by the
    name ``/proc/self/fd/N``, and a reused number would hand back the wrong library.
    """
    entry = _mapped.get(path)
    if entry is None:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
        entry = Loaded(name, path, kind, None, "mapped", fd=fd)
    return entry


class _Cycle(Exception):
    """A library's dependencies lead back to it (wheels bundle such pairs: freetype and harfbuzz)."""


_in_progress: set[str] = set()


def _dlopen(entry: Loaded) -> None:
    """Map a library (no Python initialization) from its descriptor."""
    if entry.path in _mapped:
        return
    if entry.path in _in_progress:
        raise _Cycle(entry.path)
    _in_progress.add(entry.path)
    try:
        _with_dependencies(entry, lambda: _ctypes().dlopen(f"/proc/self/fd/{entry.fd}", sys.getdlopenflags()))
    finally:
        _in_progress.discard(entry.path)
    _mapped[entry.path] = entry
    _note(entry)


if TYPE_CHECKING:
    _T = TypeVar("_T")


def _with_dependencies(entry: Loaded, attempt: "Callable[[], _T]") -> "_T":
    """``attempt()`` to map ``entry``; if glibc cannot find a dependency, map those first.

    Wheels keep libraries in ``*.libs/`` beside the package and find them through an
    ``$ORIGIN`` run path, which for ``/proc/self/fd/N`` is ``/proc/self/fd``: such
    dependencies are mapped the same measured way first, and glibc matches them by soname.
    """
    try:
        return attempt()
    except (ImportError, OSError) as e:
        first = e
    from pyscone.enclave import elf

    deps = elf.origin_dependencies(entry.fd, _dirname(posix.readlink(f"/proc/self/fd/{entry.fd}")))
    if not deps:
        raise first
    cyclic = False
    for dep in deps:
        try:
            _dlopen(_open_mapped(dep, "mapped:" + dep.rpartition("/")[2], "library"))
        except _Cycle:
            cyclic = True
    try:
        if cyclic:
            # No order maps a cycle by descriptor (each needs the other's soname first): let
            # glibc map it by path, which finds the rest of the cycle through $ORIGIN.  The
            # path must still be the inode that was hashed; the libraries glibc maps itself
            # are covered by the measurement's walk of /proc/self/maps (a second read).
            real = posix.readlink(f"/proc/self/fd/{entry.fd}")
            held, named = posix.fstat(entry.fd), posix.stat(real)
            if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
                raise OSError(f"{real} changed while it was being mapped")
            _ctypes().dlopen(real, sys.getdlopenflags())
        return attempt()
    except OSError as e:
        raise ImportError(f"cannot map {entry.path}: {e}", path=entry.path) from None


def _ctypes() -> "Any":
    """``_ctypes``, for its ``dlopen`` (itself mapped the measured way on first use)."""
    return sys.modules.get("_ctypes") or __import__("_ctypes")


def preload_extensions(dirs: "Sequence[str]") -> list[str]:
    """Before lockdown: map (and measure) every extension module in ``dirs``, without running it.

    Returns the paths that could not be mapped (a missing system library, say); importing
    those later fails with a clear ``ImportError``.
    """
    failed = []
    suffixes = tuple(_ext.EXTENSION_SUFFIXES)
    for d in dirs:
        for name in sorted(posix.listdir(d)):
            if name.endswith(suffixes):
                path = _join(d, name)
                if map_extension(path, name.partition(".")[0]) is not None:
                    failed.append(path)
    return failed


#: Extensions that could not be mapped before lockdown: path -> why (glibc's message).
unmappable: dict[str, str] = {}


def map_extension(path: str, module: str) -> "str | None":
    """Map the extension at ``path`` (module ``module``) from a measured descriptor, not run it.

    Returns None, or why it cannot be mapped (also kept in :data:`unmappable`, so that the
    later ``import`` reports it instead of a bare "not found").
    """
    if path in _mapped:
        return None
    try:
        entry = _open_mapped(path, "extension:" + module, "extension")
    except OSError as e:
        unmappable[path] = f"cannot open it: {e.strerror}"
        return unmappable[path]
    try:
        _dlopen(entry)
    except (ImportError, OSError) as e:
        if entry.path not in _mapped:
            posix.close(entry.fd)
        unmappable[path] = str(e)
        return unmappable[path]
    return None


# -- the finder -------------------------------------------------------------------------------------


class MeasuringFinder:
    """``PathFinder`` for the enclave before lockdown: every module it finds is loaded measured.

    Search order is the stdlib's (a package directory, then a module, extensions before
    sources; a directory without ``__init__`` is a namespace portion).  What it does not find
    it asks the finders after it (an editable install's, say), and loads their file-based
    answers with the measuring loaders too.  Bytecode without its source is refused.
    """

    _listings: dict[str, "frozenset[str] | None"] = {}

    @classmethod
    def invalidate_caches(cls) -> None:
        cls._listings.clear()

    @classmethod
    def find_distributions(cls, *args: "Any", **kwargs: "Any") -> "Any":
        """What ``importlib.metadata`` asks ``PathFinder``: the same answer (metadata is data)."""
        return _ext.PathFinder.find_distributions(*args, **kwargs)

    @classmethod
    def _listing(cls, d: str) -> "frozenset[str] | None":
        try:
            return cls._listings[d]
        except KeyError:
            pass
        try:
            names: frozenset[str] | None = frozenset(posix.listdir(d))
        except (OSError, ValueError):
            names = None
        cls._listings[d] = names
        return names

    @classmethod
    def find_spec(
        cls, fullname: str, path: "Sequence[str] | None" = None, target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        if fullname == "pyscone":  # the runtime comes from the tree this loader came from
            return _file_spec(fullname, _join(_pyscone_dir, "__init__.py"), package=_pyscone_dir)
        tail = fullname.rpartition(".")[2]
        portions: list[str] = []
        for entry in sys.path if path is None else path:
            if not isinstance(entry, str) or not entry.startswith("/"):
                continue  # a relative entry would be the host's working directory
            names = cls._listing(entry)
            if not names:
                continue
            if tail in names:
                pkg = _join(entry, tail)
                sub = cls._listing(pkg)
                if sub is not None:
                    spec = cls._in(fullname, pkg, "__init__", sub, package=pkg)
                    if spec is not None:
                        return spec
                    portions.append(pkg)
            spec = cls._in(fullname, entry, tail, names, package=None)
            if spec is not None:
                return spec
        if portions:
            spec = ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = portions
            return spec
        return _delegate(cls, fullname, path, target)

    @staticmethod
    def _in(fullname: str, d: str, stem: str, names: "frozenset[str]", package: "str | None") -> "ModuleSpec | None":
        for suffix in _ext.EXTENSION_SUFFIXES:
            if stem + suffix in names:
                return _file_spec(fullname, _join(d, stem + suffix), package=package)
        if stem + ".py" in names:
            return _file_spec(fullname, _join(d, stem + ".py"), package=package)
        if stem + ".pyc" in names:
            raise ImportError(
                f"pyscone: {_join(d, stem + '.pyc')} is bytecode without its source; "
                "the enclave loads only sources (and caches it can check against them)",
                name=fullname,
            )
        return None


def _file_spec(fullname: str, path: str, package: "str | None") -> "ModuleSpec":
    loader: Any
    if path.endswith(".py"):
        loader = MeasuredSourceLoader(fullname, path)
    else:
        loader = MeasuredExtensionLoader(fullname, path)
    locations = [package] if package is not None else None
    spec: ModuleSpec = _ext.spec_from_file_location(fullname, path, loader=loader, submodule_search_locations=locations)
    return spec


def _delegate(
    me: object, fullname: str, path: "Sequence[str] | None", target: "ModuleType | None"
) -> "ModuleSpec | None":
    """Ask the finders after this one; load a file they name the measured way."""
    finders = list(sys.meta_path)
    after = finders[finders.index(me) + 1 :] if me in finders else []
    for finder in after:
        find = getattr(finder, "find_spec", None)
        spec: ModuleSpec | None = find(fullname, path, target) if find is not None else None
        if spec is None:
            continue
        if type(spec.loader) in (_ext.SourceFileLoader, MeasuredSourceLoader) or (
            type(spec.loader) in (_ext.ExtensionFileLoader, MeasuredExtensionLoader)
        ):
            package = spec.submodule_search_locations
            fixed = _file_spec(fullname, str(spec.origin), package=None)
            if package is not None:
                fixed.submodule_search_locations = list(package)
            return fixed
        if spec.loader is None or spec.origin in (None, "namespace"):
            return spec  # a namespace package: no code
        raise ImportError(
            f"pyscone: {fullname} would be loaded by {type(spec.loader).__name__}, which the enclave cannot measure",
            name=fullname,
        )
    return None


def _note(entry: Loaded) -> None:
    record.append(entry)


# -- sealing: nothing new loads between the measurement and the app ---------------------------------


def expect_measurement(on: bool) -> None:
    """Boot read its configuration: whether this enclave is measured.  If not, nothing is hashed."""
    global _measuring
    _measuring = on
    if not on:
        for entry in record:
            entry.forget()


def measurement_pending() -> bool:
    """Whether what loads now is part of the coming measurement."""
    return _measuring and not _sealed


def seal() -> None:
    """The measurement is taken: from now until the app starts, the runtime loads nothing new.

    Code loaded later would run in the attestation path (with the secrets) without being in
    MRENCLAVE; the enclave importer refuses it (see :func:`runtime_sealed`).
    """
    global _sealed
    _sealed = True


def runtime_sealed() -> bool:
    """Whether an import now would be the runtime's after its measurement (refused).

    The seal lifts when the app's ``__main__`` replaces the bootstrap's in ``sys.modules``:
    from then on imports are the app's, which MRENCLAVE never covered.
    """
    return _sealed and sys.modules.get("__main__") is _boot_main


# -- start -------------------------------------------------------------------------------------------


def _host_violation(reason: str) -> "NoReturn":
    posix.write(2, f"pyscone: enclave stopped: host violation: {reason}\n".encode())
    posix._exit(_EXIT_HOST_VIOLATION)


#: The libc layer's shim (``enclave/clib/shim.c``), relative to the pyscone package directory.
SHIM = "enclave/clib/libpyscone-shim.so"


def shim_path(pyscone_dir: str) -> str:
    """The one library the launcher may preload into the enclave (``LD_PRELOAD``)."""
    return _join(pyscone_dir, SHIM)


def _check_start() -> None:
    """The interpreter must run with pyscone's flags, its bootstrap and no environment
    but ``LD_PRELOAD`` of exactly this package's shim (measured later, as it is mapped)."""
    argv = list(sys.orig_argv)
    n = len(INTERPRETER_FLAGS)
    if argv[1 : n + 1] != list(INTERPRETER_FLAGS) or argv[n + 1 : n + 3] != ["-c", BOOTSTRAP] or len(argv) != n + 5:
        _host_violation(f"the enclave interpreter was started as {argv[1:-3]!r}, not with pyscone's flags")
    shim = shim_path(_dirname(_dirname(__file__))).encode()
    for key, value in posix.environ.items():
        if key == b"LD_PRELOAD" and value == shim:
            continue
        if value not in _COERCED.get(key, ()):
            _host_violation(f"the enclave interpreter was started with {key.decode(errors='replace')} set")
    try:
        if not stat.S_ISREG(posix.stat("/proc/self/environ").st_mode):
            raise OSError
    except OSError:
        _host_violation("/proc is not the kernel's: the interpreter's start-up cannot be checked")


def _startup_modules() -> list[tuple[str, str]]:
    """What the interpreter imported from disk before this code ran (``encodings``): (name, source)."""
    found = []
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if name in ("__main__", __name__) or (spec is not None and spec.origin in ("built-in", "frozen")):
            continue
        loader = getattr(spec, "loader", None)
        origin = getattr(spec, "origin", None)
        if type(loader) is not _ext.SourceFileLoader or not isinstance(origin, str) or not origin.endswith(".py"):
            _host_violation(f"the interpreter's start-up loaded {name} by {type(loader).__name__}, not from source")
        found.append((name, origin))
    return found


def _site() -> None:
    """What ``site`` does at start-up, with every file it reads measured."""
    import site  # frozen: importing it runs nothing (-S)

    known = {p for p in sys.path if isinstance(p, str)}
    prefixes = [sys.prefix]
    exe_dir = _dirname(sys.executable)
    for venv in (exe_dir, _dirname(exe_dir)):
        conf = _join(venv, "pyvenv.cfg")
        try:
            text, _ = _read(conf)
        except OSError:
            continue
        # Not measured: it only says where to look, and everything found there is.
        system = False
        for line in text.decode("utf-8", "replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip().lower() == "include-system-site-packages":
                system = value.strip().lower() == "true"
        sys.prefix = sys.exec_prefix = venv
        prefixes = [venv, sys.base_prefix] if system else [venv]
        _load_image_files(venv)
        break
    site.PREFIXES[:] = prefixes
    site.ENABLE_USER_SITE = False
    site_entries[:] = add_sitedirs(site.getsitepackages(prefixes), known)
    site.setquit()
    site.setcopyright()
    site.sethelper()
    try:
        __import__("sitecustomize")  # through the measuring finder, like any module
    except ImportError as e:
        if e.name != "sitecustomize":
            _warn(f"Error in sitecustomize: {type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - site reports and goes on
        _warn(f"Error in sitecustomize: {type(e).__name__}: {e}")


#: A secure image's list of the files it was built with (``image/build.py``: ``pyscone-files.json``
#: beside ``pyvenv.cfg``): its bytes, measured as they are read here, so MRENCLAVE covers every file it
#: names.  The importer holds every module under its roots to it (``importer.py``).  Empty outside an image.
image_files = b""


def _load_image_files(venv: str) -> None:
    global image_files
    path = _join(venv, "pyscone-files.json")
    try:
        data, _ = _read(path)
    except OSError:
        return
    _note(Loaded("files:pyscone-files.json", path, "pth", data, "read"))
    image_files = data


#: What :func:`_site` put on ``sys.path``: the runtime's own environment (boot takes it off
#: the app's ``sys.path`` when the app brings a venv of its own: ``enclave/venv.py``).
site_entries: list[str] = []


def add_sitedirs(sitedirs: "Sequence[str]", known: "set[str] | None" = None) -> list[str]:
    """Append each site directory and the paths of its ``.pth`` files (measured) to ``sys.path``.

    Returns the entries added, in order (``known``: entries not to add again, default ``sys.path``'s).
    """
    known = {p for p in sys.path if isinstance(p, str)} if known is None else known
    start = len(sys.path)
    for sitedir in sitedirs:
        if _is_dir(sitedir) and sitedir not in known:
            sys.path.append(sitedir)
            known.add(sitedir)
            _add_pth_files(sitedir, known)
    return [p for p in sys.path[start:] if isinstance(p, str)]


def _add_pth_files(sitedir: str, known: set[str]) -> None:
    # ``sitedir`` keeps site.addpackage's name: old namespace-package .pth lines read it from
    # their caller's frame (``sys._getframe(1).f_locals["sitedir"]``).
    try:
        names = sorted(n for n in posix.listdir(sitedir) if n.endswith(".pth") and not n.startswith("."))
    except OSError:
        return
    for name in names:
        path = _join(sitedir, name)
        try:
            data, _ = _read(path)
        except OSError:
            continue
        _note(Loaded("pth:" + name, path, "pth", data, "read"))
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            _warn(f"Error processing {path}: not UTF-8, skipped")
            continue
        for n, line in enumerate(lines, 1):
            if line.startswith("#") or not line.strip():
                continue
            try:
                if line.startswith(("import ", "import\t")):
                    exec(line, {"__name__": "__pth__"})  # the measured bytes, compiled now
                    continue
                entry = posixpath.normpath(posixpath.join(sitedir, line.rstrip()))  # as site's makepath
                if entry not in known and _is_dir(entry):
                    sys.path.append(entry)
                    known.add(entry)
            except Exception as e:  # noqa: BLE001 - site reports the line and skips the rest
                _warn(f"Error processing line {n} of {path}: {type(e).__name__}: {e}; remainder of file ignored")
                break


def _warn(message: str) -> None:
    posix.write(2, (message + "\n").encode("utf-8", "replace"))


def _load_hash() -> None:
    """Map the hash function first (OpenSSL's, or CPython's own); its bytes are hashed once it is."""
    global _hash
    for name, attr in (("_hashlib", "openssl_sha256"), ("_sha2", "sha256"), ("_sha256", "sha256")):
        try:
            _hash = getattr(__import__(name), attr)
            return
        except (ImportError, AttributeError):
            continue
    _host_violation("no SHA-256 implementation could be loaded")


def start(own_source: bytes) -> None:
    """The enclave interpreter's start: check it, install the finder, do ``site``, boot."""
    global _boot_main, _pyscone_dir
    _check_start()
    startup = _startup_modules()
    _pyscone_dir = _dirname(_dirname(__file__))
    _boot_main = sys.modules["__main__"]
    sys.meta_path[:] = [MeasuringFinder if f is _ext.PathFinder else f for f in sys.meta_path]
    sys.path_importer_cache.clear()
    sys.pycache_prefix = None  # the start-up's guard; this loader keeps caches where python does
    _load_hash()
    _note(Loaded("bootstrap", "-c", "bootstrap", BOOTSTRAP.encode(), "read"))
    _note(Loaded("module:" + __name__, __file__, "source", own_source, "compiled"))
    for name, origin in startup:  # compiled from source (no .pyc can exist there): measured by reading again
        _note(Loaded("module:" + name, origin, "source", _read(origin)[0], "re-read"))
    _site()
    import pyscone.enclave
    import pyscone.enclave.boot

    pyscone.enclave.loader = sys.modules[__name__]  # loaded before its package: set what import would
    pyscone.enclave.boot.main()
