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
file mapping).  :func:`preload_extensions` maps them before lockdown from a
descriptor the loader keeps open; glibc then hands the already-loaded object back
to the later ``import`` of the same ``/proc/self/fd/N`` name without touching a
file.  An extension that was not preloaded fails with an ``ImportError`` that says
how to preload it.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import os
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pyscone.enclave import loader
from pyscone.enclave.stdlib import files


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


class EnclaveSourceLoader(importlib.machinery.SourceFileLoader):
    """Reads source through the enclave's file layer, measures it, compiles it."""

    def get_data(self, path: str) -> bytes:
        with files.open(path, "rb") as f:
            data: bytes = f.read()
        return data

    def path_stats(self, path: str) -> dict[str, Any]:
        st = files.stat(path)
        return {"mtime": st.st_mtime, "size": st.st_size}

    def get_code(self, fullname: str) -> Any:
        path = self.get_filename(fullname)
        data = self.get_data(path)
        code = compile(data, path, "exec", dont_inherit=True)
        # Loaded before the measurement (through the host): MRENCLAVE covers exactly this code.
        digest = loader.code_digest(code) if loader.measurement_pending() else ""
        record(path, data, "source", digest, fullname)
        return code

    def set_data(self, path: str, data: Any, *, _mode: int = 0o666) -> None:
        pass  # never write bytecode caches from inside the enclave


class EnclaveExtensionLoader(importlib.machinery.ExtensionFileLoader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        mapped = loader.mapped_path(self.path)
        if mapped is None:
            raise ImportError(
                f"C extension {spec.name!r} ({self.path}) was not loaded before lockdown; "
                f"run with --preload {spec.name.partition('.')[0]}",
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
        try:
            names: frozenset[str] | None = frozenset(files.listdir(d))
        except OSError:
            names = None
        self._dirs[d] = names
        return names

    def invalidate_caches(self) -> None:
        self._dirs.clear()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if loader.runtime_sealed():
            raise loader.SealedImportError(
                f"pyscone: the runtime imports {fullname} after the enclave was measured; "
                "it must be imported before the measurement (boot step 2)",
                name=fullname,
            )
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


def install() -> EnclaveFinder:
    """Route every later path-based import through the enclave."""
    finder = EnclaveFinder()
    gone = (importlib.machinery.PathFinder, loader.MeasuringFinder)
    sys.meta_path[:] = [f for f in sys.meta_path if f not in gone] + [finder]
    sys.path_hooks[:] = []
    sys.path_importer_cache.clear()
    sys.dont_write_bytecode = True
    return finder
