"""The enclave's measurement: MRENCLAVE and the trusted computing base it covers (sans-IO).

SGX measures an enclave page by page as it is built; pyscone's simulated enclave
measures itself just before lockdown, when everything it will run without checking
is loaded and nothing else can be (the barrier refuses to open files from then on):

* the interpreter executable and, when it is a shared build, ``libpython``;
* every Python module loaded at that point (pyscone's trusted runtime, the standard
  library it uses, ``cryptography`` and ``greenlet``), by module name;
* every C extension mapped before lockdown, by file name;
* the measured part of the enclave configuration (:func:`identity_config`).

Entries are named by what they are, not where they lie on the host, so the same
files give the same MRENCLAVE in any directory (a container and a developer's venv
agree when their files do).  Modules an app imports after lockdown are not in
MRENCLAVE: they are checked by the file-system shield when they live in a protected
region, and are otherwise as trustworthy as the host (``pyscone tcb`` says so).

MRENCLAVE = SHA-256("pyscone-mrenclave-v1\\0" || canonical JSON of {config, files}).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

MRENCLAVE_SIZE = 32
_DOMAIN = b"pyscone-mrenclave-v1\0"

#: The enclave configuration keys that are part of its identity.  Host-side tuning
#: (spin times, S-threads, statistics) is not: it cannot change what the enclave does.
IDENTITY_KEYS = ("heap", "syscalls", "preload", "slots", "slot_data", "cas")


@dataclass(frozen=True, slots=True)
class TcbFile:
    """One file the measurement covers."""

    name: str  # "interpreter", "libpython", "module:json", "extension:_ssl.cpython-311-x86_64-linux-gnu.so"
    path: str  # where it was read (shown to people, not measured)
    size: int
    sha256: str  # hex


def hash_file(name: str, path: str, opener: Callable[[str], BinaryIO] | None = None) -> TcbFile:
    """Read and hash one file (host side, or in the enclave before lockdown).

    ``opener`` opens ``path`` for reading in binary (default: ``open``).
    """
    h = hashlib.sha256()
    size = 0
    with (opener or _open_binary)(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return TcbFile(name, path, size, h.hexdigest())


def _open_binary(path: str) -> BinaryIO:
    return open(path, "rb")


def identity_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The measured part of an enclave configuration (missing keys measure as ``None``)."""
    return {key: cfg.get(key) for key in IDENTITY_KEYS}


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
        "files": [[f.name, f.size, f.sha256] for f in sorted(files, key=lambda f: f.name)],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def mrenclave(files: Sequence[TcbFile], config: Mapping[str, Any]) -> bytes:
    """MRENCLAVE of an enclave with these files and this configuration (32 bytes)."""
    return hashlib.sha256(_DOMAIN + canonical(files, config)).digest()
