"""The enclave's import system after lockdown: modules load through the system-call
interface, and every file is hashed as it is read.

Until boot step 3 the measuring loader (``enclave/loader.py``) loads everything,
directly from disk, measured.  :func:`install` then replaces it with
:class:`EnclaveFinder`: it lists ``sys.path`` directories with host calls, reads
source files through the enclave's file layer (so a file-system shield, when
mounted, verifies them), records ``(path, sha256, size)`` for each, and compiles the
bytes it hashed.  It never reads a ``.pyc``.  What it loads before the measurement
is part of MRENCLAVE like the rest; from the measurement until the app's
``__main__`` exists it refuses to load anything (the loader's seal), so nothing
unmeasured runs in the attestation path.

C extensions cannot be ``dlopen``-ed after lockdown (that needs ``open`` and a
file mapping).  So boot maps them all before lockdown, from a descriptor the loader
keeps open and hashes: the stdlib's (:func:`preload_extensions`) and every one the
app could import (:func:`map_app_extensions`: a walk of its directory and
site-packages).  Mapping runs no Python code; glibc hands the already-loaded object
back to the later ``import`` of the same ``/proc/self/fd/N`` name without touching a
file, and only then is the module initialized.  An extension that could not be
mapped fails its import with glibc's reason; one that appeared after the start, with
an ``ImportError`` that says so.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import os
import posix
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pyscone.enclave import codecache, loader
from pyscone.enclave.stdlib import files

#: Extension modules that make their own system calls from C, past both layers of interposition:
#: importing one would only move the failure to the barrier's bare EPERM in the middle of the app.
#: Refused at ``import`` instead (top-level name -> why), so that code written to fall back on
#: ``ImportError`` (uvicorn's ``--loop auto``, its default) does, and says why once on stderr.
OWN_SYSCALLS: dict[str, str] = {
    "uvloop": (
        "its libuv makes its own epoll, eventfd and socket system calls, which the libc layer does not "
        "interpose; asyncio's own event loop works (uvicorn's --loop auto falls back to it)"
    ),
}
_explained: set[str] = set()


def refused(fullname: str) -> ImportError | None:
    """The ``ImportError`` for a module of :data:`OWN_SYSCALLS`, or None (and explain it once)."""
    top = fullname.partition(".")[0]
    why = OWN_SYSCALLS.get(top)
    if why is None:
        return None
    message = f"pyscone: {top} is not supported inside a pyscone enclave: {why}"
    if top not in _explained:
        _explained.add(top)
        print(f"{message} (import {fullname} refused)", file=sys.stderr, flush=True)
    return ImportError(message, name=fullname)


@dataclass(frozen=True)
class Measured:
    path: str
    sha256: str
    size: int
    kind: str  # "source" | "extension"
    code: str = ""  # loader.code_digest of what ran, for a module loaded before the measurement
    name: str = ""  # the module's name, when it was imported


measured: list[Measured] = []


def record(path: str, data: bytes, kind: str, code: str = "", name: str = "") -> None:
    measured.append(Measured(path, hashlib.sha256(data).hexdigest(), len(data), kind, code, name))


def extension_dirs() -> list[str]:
    """Where the interpreter's own C extensions live (lib-dynload)."""
    d = sysconfig.get_config_var("DESTSHARED") or os.path.join(sys.base_prefix, "lib", "lib-dynload")
    return [d] if os.path.isdir(d) else []


def preload_extensions(dirs: Sequence[str]) -> list[str]:
    """Before lockdown: map (and measure) every extension module in ``dirs``.

    Returns the paths that could not be loaded (e.g. a missing system library);
    importing those modules later fails with a clear ImportError.
    """
    return loader.preload_extensions(dirs)


#: A walk of the app's sys.path stops after this many directory entries (a cwd of ``/``, say).
WALK_BUDGET = 200_000


def find_extensions(roots: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Every C extension that ``import`` could find below ``roots``: ``(path, module name)``.

    Only directories whose names are identifiers can be packages, so the walk skips the rest
    (``.venv``, ``*.dist-info``, ``*.libs``, ``__pycache__``).  It uses raw ``posix`` calls:
    it runs before interposition, and must see the disk, not the host.  The second value
    names the roots where the walk stopped after :data:`WALK_BUDGET` entries (a cwd of
    ``/``, say); each root has its own budget, so a huge working directory does not keep
    site-packages from being walked.
    """
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)  # longest first, as the stdlib tries them
    found: list[tuple[str, str]] = []
    stopped: list[str] = []
    for root in roots:
        stack = [(root, "", 0)]
        budget = WALK_BUDGET
        while stack:
            d, prefix, depth = stack.pop()
            try:
                entries = sorted(posix.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            budget -= len(entries)
            if budget < 0:
                stopped.append(root)
                break
            for e in entries:
                name = e.name
                if name.endswith(suffixes):
                    stem = next(name[: -len(s)] for s in suffixes if name.endswith(s))
                    if stem.isidentifier() and e.is_file():
                        found.append((e.path, prefix + stem))
                elif name.isidentifier() and name != "__pycache__" and depth < 16 and e.is_dir():
                    stack.append((e.path, prefix + name + ".", depth + 1))
    return found, stopped


def app_extension_roots(app_dir: str | None) -> list[str]:
    """Where the app's extensions are: its directory and sys.path, less the standard library."""
    stdlib = {os.path.dirname(os.__file__), *extension_dirs()}
    roots = [] if app_dir is None else [os.path.normpath(app_dir)]
    for entry in sys.path:
        usable = isinstance(entry, str) and entry.startswith("/") and not entry.endswith(".zip")
        # Normalized as the enclave importer normalizes a path entry, so its paths match.
        if usable and (entry := os.path.normpath(entry)) not in stdlib and entry not in roots:
            roots.append(entry)
    return roots


def map_app_extensions(app_dir: str | None) -> list[str]:
    """Before lockdown: map (and measure) every extension the app could import.

    Mapping is dlopen without initialization: the app's later ``import`` runs ``PyInit``
    of the mapped object, exactly once, as python would.  Returns warnings (the walk was
    cut short) for boot to print; an extension that cannot be mapped is reported by the
    ``import`` of it.
    """
    found, stopped = find_extensions(app_extension_roots(app_dir))
    for path, module in found:
        if module.partition(".")[0] not in OWN_SYSCALLS:  # (never imported: neither mapped nor measured)
            loader.map_extension(path, module)
    return [
        f"more than {WALK_BUDGET} files below {root}: C extensions found after those cannot be imported"
        for root in stopped
    ]


class ImageFiles:
    """The files a secure image was built with (``loader.image_files``, measured): below its roots, a
    listing is the list's, not the host's, and a module that is not byte for byte what the list says
    stops the enclave (the host changed, removed or swapped a file of the image)."""

    def __init__(self, raw: bytes) -> None:
        import json

        doc = json.loads(raw)
        self.roots: tuple[str, ...] = tuple(os.path.normpath(r) + "/" for r in doc["roots"])
        self.files: dict[str, str] = {os.path.normpath(p): str(h) for p, h in doc["files"].items()}
        self.dirs: dict[str, set[str]] = {}  # a directory below a root -> the names in it
        for path in self.files:
            root = next((r for r in self.roots if path.startswith(r)), None)
            if root is None:
                raise ValueError(f"{path} lies outside the image's roots")
            d = root.rstrip("/")
            for part in path[len(root) :].split("/"):
                self.dirs.setdefault(d, set()).add(part)
                d = f"{d}/{part}"

    def covers(self, path: str) -> bool:
        """Whether ``path`` (absolute, normalized) is a root or lies below one."""
        return (path + "/").startswith(self.roots)

    def listing(self, d: str) -> frozenset[str] | None:
        names = self.dirs.get(os.path.normpath(d))
        return frozenset(names) if names is not None else None

    def check(self, path: str, digest: str) -> None:
        if self.files.get(path) != digest:
            from pyscone.enclave import iago

            iago.fail_stop(f"{path} is not the file the image was built with")


_image: ImageFiles | None = None


def image_files() -> ImageFiles | None:
    """The image's file list, parsed on first need (``None`` outside an image)."""
    global _image
    if _image is None and loader.image_files:
        _image = ImageFiles(loader.image_files)
    return _image


class EnclaveSourceLoader(importlib.machinery.SourceFileLoader):
    """Reads source through the enclave's file layer, measures it, compiles it."""

    def get_data(self, path: str) -> bytes:
        return files.read_whole(path)

    def path_stats(self, path: str) -> dict[str, Any]:
        st = files.stat(path)
        return {"mtime": st.st_mtime, "size": st.st_size}

    def get_code(self, fullname: str) -> Any:
        path = self.get_filename(fullname)
        cache = codecache.active
        source, entry = codecache.begin(path)  # both read ahead, or in flight together now
        image = image_files()
        listed = image is not None and image.covers(path)
        try:
            data = files.finish_read_whole(source, path)
        except OSError as e:
            if not listed:
                raise
            from pyscone.enclave import iago

            iago.fail_stop(f"{path}, a file of the image, cannot be read: {e.strerror}")
        digest = hashlib.sha256(data).digest()
        if listed:
            assert image is not None
            image.check(path, digest.hex())
        code = cache.load(entry, digest, path) if cache is not None and entry is not None else None
        if code is None:
            code = compile(data, path, "exec", dont_inherit=True)
            if cache is not None and entry is not None:
                cache.store(entry, digest, code)
        # Loaded before the measurement (through the host): MRENCLAVE covers exactly this code.
        measured_code = loader.code_digest(code) if loader.measurement_pending() else ""
        measured.append(Measured(path, digest.hex(), len(data), "source", measured_code, fullname))
        return code

    def set_data(self, path: str, data: Any, *, _mode: int = 0o666) -> None:
        pass  # never write bytecode caches from inside the enclave


class EnclaveExtensionLoader(importlib.machinery.ExtensionFileLoader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        mapped = loader.mapped_path(self.path)
        if mapped is None:
            why = loader.unmappable.get(self.path)
            if why is not None:  # what python's import would have said: the dlopen failed
                raise ImportError(f"{self.path}: {why}", name=spec.name, path=self.path)
            raise ImportError(
                f"C extension {spec.name!r} ({self.path}) was not on the app's sys.path when the "
                f"enclave started, so it could not be mapped before lockdown; run with --preload {spec.name}",
                name=spec.name,
                path=self.path,
            )
        # The name glibc knows it by: dlopen hands the mapped object back without opening a file.
        module: ModuleType = super().create_module(importlib.machinery.ModuleSpec(spec.name, self, origin=mapped))
        module.__file__ = self.path
        return module


class EnclaveFinder(importlib.abc.MetaPathFinder):
    """``PathFinder`` for the enclave: directory listings and files via host calls."""

    def __init__(self) -> None:
        self._dirs: dict[str, frozenset[str] | None] = {}

    def _listing(self, d: str) -> frozenset[str] | None:
        try:
            return self._dirs[d]
        except KeyError:
            pass
        image = image_files()
        if image is not None and image.covers(d):  # an image's own directory: its list, not the host's
            listed = image.listing(d)
            self._dirs[d] = listed
            return listed
        try:
            names: frozenset[str] | None = frozenset(files.listdir(d))
        except OSError:
            names = None
        self._dirs[d] = names
        return names

    def invalidate_caches(self) -> None:
        self._dirs.clear()

    @staticmethod
    def find_distributions(context: Any = None) -> Any:
        """``importlib.metadata``'s question: the installed distributions on ``context.path``.

        The stdlib's answer reads ``*.dist-info`` with ``os``/``open``, which after
        interposition are the enclave's file layer (the FS shield, when mounted, included).
        """
        import importlib.metadata

        if context is None:
            context = importlib.metadata.DistributionFinder.Context()
        return importlib.metadata.MetadataPathFinder.find_distributions(context)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if loader.runtime_sealed():
            raise loader.SealedImportError(
                f"pyscone: the runtime imports {fullname} after the enclave was measured; "
                "it must be imported before the measurement (boot step 2)",
                name=fullname,
            )
        error = refused(fullname)
        if error is not None:
            raise error
        tail = fullname.rpartition(".")[2]
        namespace: list[str] = []
        for entry in sys.path if path is None else path:
            if not isinstance(entry, str):
                continue
            base = files.abspath(entry or ".")
            names = self._listing(base)
            if not names:
                continue
            if tail in names:
                pkg = os.path.join(base, tail)
                sub = self._listing(pkg)
                if sub is not None:
                    spec = self._file_spec(fullname, pkg, "__init__", sub, package=True)
                    if spec is not None:
                        return spec
                    namespace.append(pkg)
            spec = self._file_spec(fullname, base, tail, names, package=False)
            if spec is not None:
                return spec
        if namespace:
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = namespace
            return spec
        return None

    @staticmethod
    def _file_spec(
        fullname: str, base: str, stem: str, names: frozenset[str], package: bool
    ) -> importlib.machinery.ModuleSpec | None:
        import importlib.util

        locations = [base] if package else None
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if stem + suffix in names:
                path = os.path.join(base, stem + suffix)
                ext_loader = EnclaveExtensionLoader(fullname, path)
                return importlib.util.spec_from_file_location(
                    fullname, path, loader=ext_loader, submodule_search_locations=locations
                )
        if stem + ".py" in names:
            path = os.path.join(base, stem + ".py")
            loader = EnclaveSourceLoader(fullname, path)
            return importlib.util.spec_from_file_location(
                fullname, path, loader=loader, submodule_search_locations=locations
            )
        return None


class EnclavePathEntryFinder:
    """The path-entry finder of one directory (``sys.path_hooks``), over the enclave's files.

    Imports go through :class:`EnclaveFinder` on ``sys.meta_path``; this is for what asks a
    path entry directly: ``pkgutil.iter_modules`` (Django finds its management commands
    that way), ``pkgutil.get_importer``, ``runpy``.  It answers as the stdlib's
    ``FileFinder`` would, from listings made through host calls.
    """

    def __init__(self, meta: EnclaveFinder, path: str) -> None:
        self._meta = meta
        self.path = path

    @classmethod
    def hook(cls, meta: EnclaveFinder) -> Any:
        def for_path(path: str) -> EnclavePathEntryFinder:
            if not isinstance(path, str) or meta._listing(files.abspath(path or ".")) is None:
                raise ImportError("not a directory", path=path)
            return cls(meta, path)

        return for_path

    def invalidate_caches(self) -> None:
        self._meta.invalidate_caches()

    def find_spec(self, fullname: str, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        return self._meta.find_spec(fullname, [self.path], target)

    def iter_modules(self, prefix: str = "") -> list[tuple[str, bool]]:
        """``(prefix + name, is_package)`` for each module here, sorted, as ``pkgutil`` lists them.

        Its rules, not the import statement's: any name without a dot, identifier or not
        (Django's migrations are ``0001_initial``), and a directory only if it holds an
        ``__init__``.
        """
        base = files.abspath(self.path or ".")
        names = self._meta._listing(base) or frozenset()
        suffixes = (*importlib.machinery.EXTENSION_SUFFIXES, ".py")
        found: dict[str, bool] = {}
        for name in sorted(names):
            stem = next((name[: -len(s)] for s in suffixes if name.endswith(s)), None)
            if stem is not None:
                if stem and "." not in stem and stem != "__init__":
                    found.setdefault(stem, False)
            elif "." not in name:
                sub = self._meta._listing(os.path.join(base, name))
                if sub is not None and any(f"__init__{s}" in sub for s in suffixes):
                    found.setdefault(name, True)
        return [(prefix + name, ispkg) for name, ispkg in sorted(found.items())]


def install() -> EnclaveFinder:
    """Route every later path-based import through the enclave."""
    finder = EnclaveFinder()
    gone = (importlib.machinery.PathFinder, loader.MeasuringFinder)
    sys.meta_path[:] = [f for f in sys.meta_path if f not in gone] + [finder]
    sys.path_hooks[:] = [EnclavePathEntryFinder.hook(finder)]
    sys.path_importer_cache.clear()
    sys.dont_write_bytecode = True
    return finder
