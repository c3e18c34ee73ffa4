"""The app's own virtualenv (TRUSTED; the host CLI uses the same checks): ``--venv DIR``.

Theory of operation
-------------------
pyscone is installed once (a venv of its own, pipx); each app brings its packages in
its own venv.  The enclave interpreter is pyscone's, so the app's venv must have been
made for the same Python (implementation and major.minor: a 3.12 venv's packages would
fail at import time, or worse, half work).  The host's CLI checks that first, so that
a user mistake is one ``error:`` line; the enclave checks it again from the bytes it
reads itself (a host that changed the file in between is a host violation).

What the venv decides is path-like (§12 of the design): which directories ``sys.path``
has, hence which files the app's imports read and which FSPF region protects them.  So
its absolute path is part of the measured configuration (``platform/measure.py``), its
``pyvenv.cfg`` is measured as it is read (``include-system-site-packages`` adds the base
site-packages), its ``.pth`` files are measured by the loader's site code, and the C
extensions below it are mapped and measured before lockdown like any other.

This module only parses and decides (no I/O of its own): callers pass what they read.
"""

from __future__ import annotations

import posixpath
import site
import sys
from dataclasses import dataclass


class VenvError(Exception):
    """Not a virtualenv this enclave can use; the message names it and says why."""


@dataclass(frozen=True)
class Venv:
    """What a ``pyvenv.cfg`` says that matters to the enclave."""

    path: str  # absolute, normalized: where the venv is
    version: tuple[int, int] | None  # the Python it was made for (None: the file does not say)
    implementation: str | None  # lower case ("cpython"), when the file says (virtualenv and uv do)
    include_system: bool  # include-system-site-packages = true


def parse_cfg(path: str, text: bytes) -> Venv:
    """The venv at ``path`` from its ``pyvenv.cfg`` bytes (``key = value`` lines, as ``site`` reads them).

    Raises:
        VenvError: the version it names is not a Python version.
    """
    keys: dict[str, str] = {}
    for line in text.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            keys[key.strip().lower()] = value.strip()
    version = None
    raw = keys.get("version_info") or keys.get("version")  # virtualenv/uv write version_info, venv version
    if raw:
        major, _, rest = raw.partition(".")
        minor = rest.partition(".")[0]
        if not (major.isdigit() and minor.isdigit()):
            raise VenvError(f"{path}/pyvenv.cfg: version {raw!r} is not a Python version")
        version = (int(major), int(minor))
    implementation = keys.get("implementation", "").lower() or None
    include_system = keys.get("include-system-site-packages", "false").lower() == "true"
    return Venv(posixpath.normpath(path), version, implementation, include_system)


def site_dirs(venv: Venv, base_prefix: str) -> list[str]:
    """The venv's site-packages, then (include-system-site-packages) the base interpreter's, as ``site`` orders them."""
    prefixes = [venv.path, base_prefix] if venv.include_system else [venv.path]
    return site.getsitepackages(prefixes)


def problem(venv: Venv, own_site: list[str], exists: list[bool]) -> str | None:
    """Why the enclave interpreter cannot use ``venv``, or None.

    ``own_site`` is :func:`site_dirs` of the venv without the base, ``exists`` whether each
    is a directory (the caller looks: this module does no I/O).
    """
    here = sys.version_info[:2]
    name = sys.implementation.name
    if venv.implementation is not None and venv.implementation != name:
        return f"it was made for {venv.implementation}, but the enclave interpreter is {name}"
    if venv.version is not None and venv.version != here:
        return (
            f"it was made for Python {venv.version[0]}.{venv.version[1]}, but the enclave runs "
            f"Python {here[0]}.{here[1]} (make it with python{here[0]}.{here[1]} -m venv)"
        )
    if not any(exists):
        wanted = posixpath.relpath(own_site[0], venv.path) if own_site else "site-packages"
        return f"it has no {wanted}: it was not made for Python {here[0]}.{here[1]}"
    return None
