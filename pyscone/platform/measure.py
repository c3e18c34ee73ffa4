"""The enclave's measurement: MRENCLAVE and the trusted computing base it covers (sans-IO).

SGX measures an enclave page by page as it is built; pyscone's simulated enclave
records everything as it loads it (``enclave/loader.py``) and computes MRENCLAVE from
that record just before lockdown, when nothing else can load:

* the interpreter executable, and every other file mapped into the process (the
  shared libraries: ``libpython``, libc, OpenSSL, libseccomp, ``LD_PRELOAD``-ed ones);
* the bootstrap (the ``-c`` program that starts the measuring loader);
* every Python module loaded by then (pyscone's trusted runtime, the standard library
  it uses, ``cryptography``, ``greenlet``, ``--preload``-ed modules, ``sitecustomize``),
  by module name: the SHA-256 of the source that was read, and a digest of the code
  object that ran (compiled from those bytes, or from a ``__pycache__`` entry);
* every ``.pth`` file of the site-packages, by file name;
* every C extension mapped, by module name;
* the measured part of the enclave configuration (:func:`identity_config`).

Entries are named by what they are, not where they lie on the host, so the same
files give the same MRENCLAVE in any directory (a container and a developer's venv
agree when their files do), and an honest bytecode cache gives the same MRENCLAVE as
none.  Modules an app imports after lockdown are not in MRENCLAVE: they are checked
by the file-system shield when they live in a protected region, and are otherwise as
trustworthy as the host (``pyscone tcb`` says so).

MRENCLAVE = SHA-256("pyscone-mrenclave-v2\\0" || canonical JSON of {config, files}).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

MRENCLAVE_SIZE = 32
_DOMAIN = b"pyscone-mrenclave-v2\0"

#: The enclave configuration keys that are part of its identity.  Host-side tuning
#: (spin times, S-threads, statistics) is not: it cannot change what the enclave does.
IDENTITY_KEYS = ("heap", "syscalls", "preload", "slots", "slot_data", "cas")
#: Measured only when set, so that an enclave without one keeps the MRENCLAVE it had: the app's
#: virtualenv (its path decides which files the app's imports read, and which FSPF region covers them).
OPTIONAL_IDENTITY_KEYS = ("venv",)


@dataclass(frozen=True, slots=True)
class TcbFile:
    """One file the measurement covers."""

    name: str  # "interpreter", "module:json", "extension:_ssl", "mapped:libc.so.6", "pth:x.pth", "bootstrap"
    path: str  # where it was read (shown to people, not measured)
    size: int
    sha256: str  # hex, of the bytes
    code: str = ""  # hex, of the code object that ran (modules that may come from a cache)
    how: str = ""  # how the bytes reached the enclave (shown to people, not measured)


def hash_file(name: str, path: str, opener: Callable[[str], BinaryIO] | None = None, how: str = "") -> TcbFile:
    """Read and hash one file (host side, or in the enclave before lockdown).

    ``opener`` opens ``path`` for reading in binary (default: ``open``).
    """
    h = hashlib.sha256()
    size = 0
    with (opener or _open_binary)(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return TcbFile(name, path, size, h.hexdigest(), how=how)


def _open_binary(path: str) -> BinaryIO:
    return open(path, "rb")


def identity_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The measured part of an enclave configuration (missing keys measure as ``None``)."""
    optional = {key: cfg[key] for key in OPTIONAL_IDENTITY_KEYS if cfg.get(key) is not None}
    return {**{key: cfg.get(key) for key in IDENTITY_KEYS}, **optional}


def canonical(files: Sequence[TcbFile], config: Mapping[str, Any]) -> bytes:
    """The document MRENCLAVE hashes: the configuration and the files, sorted by name.

    Raises:
        ValueError: two files have the same name.
    """
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError("two measured files have the same name")
    doc = {
        "config": identity_config(config),
        "files": [
            [f.name, f.size, f.sha256, f.code] if f.code else [f.name, f.size, f.sha256]
            for f in sorted(files, key=lambda f: f.name)
        ],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def mrenclave(files: Sequence[TcbFile], config: Mapping[str, Any]) -> bytes:
    """MRENCLAVE of an enclave with these files and this configuration (32 bytes)."""
    return hashlib.sha256(_DOMAIN + canonical(files, config)).digest()
