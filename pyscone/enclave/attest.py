"""The enclave's identity (TRUSTED): its measurement, and the check of its signature.

:func:`measure_self` runs at the end of boot, before lockdown, when everything the
enclave runs unchecked has been loaded (see ``platform/measure.py`` for what is
covered).  :func:`admit` is the simulated EINIT: an enclave started with a signature
refuses to run unless the signature verifies and names its own MRENCLAVE, and unless
it is a production enclave when the signature does not allow debugging.

Discussion: in simulation the measurement is of the files the boot read, taken by
the enclave itself.  A host that controls those files before lockdown could make
the enclave run other code than it measured, as with any simulated enclave
(``gramine-direct``, SCONE_MODE=SIM): only hardware measures what it loads.  What
the simulation does give is the exact TCB (``pyscone tcb``), the protocol, and the
checks every verifier makes, ready for a real quote.
"""

from __future__ import annotations

import _io
import importlib.machinery
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Any, BinaryIO

from pyscone.enclave import importer
from pyscone.platform import measure, quote, sigstruct
from pyscone.platform.measure import TcbFile

MAX_REPLY = 64 * 1024


@dataclass(frozen=True)
class Identity:
    """Who this enclave is: what its reports say."""

    mrenclave: bytes
    mrsigner: bytes  # 32 zero bytes when unsigned
    product_id: int
    svn: int
    debug: bool


#: This enclave's identity, once :func:`admit` has accepted it (``None``: not measured).
identity: Identity | None = None


class AdmissionError(Exception):
    """The enclave does not match its signature: it must not run."""


def tcb_files() -> list[TcbFile]:
    """Hash everything the enclave has loaded so far (before lockdown only)."""
    found: dict[str, TcbFile] = {}

    def add(name: str, path: str) -> None:
        if name not in found:  # read directly: the interposed open would go through the host
            found[name] = measure.hash_file(name, path, _raw_open)

    add("interpreter", os.path.realpath(sys.executable))
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("LDLIBRARY") or "")
        if os.path.isfile(lib):
            add("libpython", os.path.realpath(lib))
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        spec = getattr(module, "__spec__", None)
        if not isinstance(path, str) or (spec is not None and spec.origin in ("frozen", "built-in")):
            continue  # part of the interpreter, measured with it
        if path.endswith(suffixes):
            add("extension:" + os.path.basename(path), path)
        elif os.path.isfile(path):
            add("module:" + module.__name__, path)
    for m in importer.measured:
        if m.kind == "extension":
            add("extension:" + os.path.basename(m.path), m.path)
    return sorted(found.values(), key=lambda f: f.name)


def _raw_open(path: str) -> BinaryIO:
    return _io.FileIO(path, "r")


def measure_self(cfg: dict[str, Any]) -> tuple[bytes, list[TcbFile]]:
    files = tcb_files()
    return measure.mrenclave(files, cfg), files


def admit(mrenclave: bytes, signature: bytes | None, debug: bool) -> Identity:
    """The simulated EINIT: check the enclave's signature against its measurement.

    Raises:
        AdmissionError: the signature is invalid, is for another enclave, or forbids debug.
    """
    if signature is None:
        return Identity(mrenclave, bytes(32), 0, 0, debug)
    try:
        s = sigstruct.decode(signature)
    except sigstruct.SignatureError as e:
        raise AdmissionError(str(e)) from None
    if s.mrenclave != mrenclave:
        raise AdmissionError(
            f"the enclave signature is for MRENCLAVE {s.mrenclave.hex()}, but this enclave is {mrenclave.hex()} "
            "(its files or its configuration differ from the signed ones: see pyscone tcb)"
        )
    if debug and not s.debug:
        raise AdmissionError("the enclave signature does not allow a debug enclave (--no-barrier)")
    return Identity(mrenclave, s.mrsigner, s.product_id, s.svn, debug)


class AttestationError(Exception):
    """Attestation could not be done (the LAS or the CAS failed or refused)."""


def my_report(data: bytes) -> quote.Report:
    """This enclave's report with ``data`` as report data (needs a measured enclave)."""
    me = identity
    if me is None:
        raise AttestationError("this enclave was not measured (start it with --signature or a CAS)")
    return quote.Report(me.mrenclave, me.mrsigner, me.product_id, me.svn, me.debug, data)


def request_quote(las: tuple[str, int], report: quote.Report, timeout: float = 10.0) -> bytes:
    """Have the LAS at ``las`` sign ``report`` (over the enclave's own sockets).

    Raises:
        AttestationError: the LAS cannot be reached, refuses, or answers with a quote
            for another report.
    """
    import socket  # the enclave's socket module: the connection goes through host calls

    body = report.pack()
    try:
        with socket.create_connection(las, timeout=timeout) as s:
            s.sendall(json.dumps({"op": "quote", "report": body.hex()}).encode() + b"\n")
            with s.makefile("rb") as f:
                line = f.readline(MAX_REPLY)
    except OSError as e:
        raise AttestationError(f"the LAS at {las[0]}:{las[1]} cannot be reached: {e.strerror or e}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    try:
        blob = bytes.fromhex(reply["quote"]) if isinstance(reply, dict) else b""
    except (KeyError, TypeError, ValueError):
        blob = b""
    if not blob:
        why = reply.get("error") if isinstance(reply, dict) else None
        raise AttestationError(f"the LAS refused: {why or 'malformed reply'}")
    if blob[len(quote.MAGIC) : len(quote.MAGIC) + quote.REPORT_SIZE] != body:
        raise AttestationError("the LAS returned a quote for another report")
    return blob
