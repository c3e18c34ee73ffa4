"""The enclave's identity (TRUSTED): its measurement, and the check of its signature.

:func:`measure_self` runs at the end of boot, before lockdown, when everything the
enclave runs unchecked has been loaded and nothing else can be (the loader's seal,
then the barrier).  It never reads a module again: MRENCLAVE is computed from what
the measuring loader (``enclave/loader.py``) and the enclave importer recorded as they
loaded it, plus the interpreter (read through ``/proc/self/exe``, the file that was
executed) and every other file mapped into the process (``/proc/self/maps``: the
shared libraries, ``LD_PRELOAD``-ed or not).  :func:`admit` is the simulated EINIT:
an enclave started with a signature refuses to run unless the signature verifies and
names its own MRENCLAVE, and unless it is a production enclave when the signature
does not allow debugging.

Discussion: in simulation the measurement is taken by the enclave itself, after the
code it measures has run, so code that was measured can still lie about the
measurement, as any simulated enclave's can (``gramine-direct``, SCONE_MODE=SIM), and
the simulated LAS signs any report anyway.  What pyscone does guarantee is that
nothing runs that is not in the record, that the record is of the bytes that were
compiled or mapped (a host cannot serve one thing and have another hashed), and the
exact TCB (``pyscone tcb``).  Libraries the dynamic linker maps by itself, and the
interpreter's own start-up modules, are hashed by a second read: only a hardware
loader measures those as it maps them.
"""

from __future__ import annotations

import _io
import dataclasses
import json
import os
import posix
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO

from pyscone.enclave import importer, loader
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
#: The quote a CAS accepted from this enclave (its platform is one the CAS trusts), if any.
accepted_quote: bytes | None = None


class AdmissionError(Exception):
    """The enclave does not match its signature: it must not run."""


def tcb_files() -> list[TcbFile]:
    """What MRENCLAVE covers: everything the enclave has loaded so far (before lockdown only).

    Raises:
        AdmissionError: something was loaded in a way that pyscone cannot measure.
    """
    files: dict[str, TcbFile] = {}

    def add(f: TcbFile) -> None:
        name, n = f.name, 1
        while name in files:
            if (files[name].sha256, files[name].code) == (f.sha256, f.code):
                return  # the same bytes loaded twice (a reload)
            n += 1
            name = f"{f.name}#{n}"
        files[name] = TcbFile(name, f.path, f.size, f.sha256, f.code, f.how)

    # os.* is the host's by now (interposed): the enclave's own view is posix.*.
    exe = posix.readlink("/proc/self/exe")
    # The executed inode itself: a file being executed cannot be written (ETXTBSY).
    add(dataclasses.replace(measure.hash_file("interpreter", "/proc/self/exe", _raw_open, how="mapped"), path=exe))
    for entry in loader.record:
        add(TcbFile(entry.name, entry.path, entry.size, entry.digest(), entry.code, entry.how))
    for m in importer.measured:
        if m.kind == "source" and m.code:
            add(TcbFile("module:" + m.name, m.path, m.size, m.sha256, m.code, "compiled (via the host)"))
    _check_modules()
    mapped = {e.path for e in loader.record if e.fd >= 0}
    inodes = {_inode(posix.fstat(e.fd)) for e in loader.record if e.fd >= 0}
    for path in sorted(_mapped_files()):  # by path, not address (ASLR): names that collide get #2 stably
        if path == exe or path in mapped or _inode_of(path) in inodes:
            continue
        add(measure.hash_file("mapped:" + path.rpartition("/")[2], path, _raw_open, how="re-read"))
    return sorted(files.values(), key=lambda f: f.name)


def _mapped_files() -> list[str]:
    """Every regular file mapped into this process, once (``/proc/self/maps``)."""
    with _raw_open("/proc/self/maps") as f:
        text = f.read().decode("utf-8", "surrogateescape")
    seen: dict[str, None] = {}
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue  # anonymous, [heap], [stack], [vdso]
        path = fields[5]
        if path.startswith(("/memfd:", "/dev/", "/proc/", "/SYSV")):
            continue  # shared memory (the host's rings), devices: not code
        if path.endswith(" (deleted)"):
            raise AdmissionError(f"{path[: -len(' (deleted)')]} is mapped but was deleted: it cannot be measured")
        seen[path] = None
    return list(seen)


def _inode(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _inode_of(path: str) -> tuple[int, int] | None:
    try:
        return _inode(posix.stat(path))
    except OSError:
        return None


def _check_modules() -> None:
    """Every module in ``sys.modules`` came through a measuring loader, or has no file."""
    ours = (
        loader.MeasuredSourceLoader,
        loader.MeasuredExtensionLoader,
        importer.EnclaveSourceLoader,
        importer.EnclaveExtensionLoader,
    )
    recorded = {e.name.partition(":")[2] for e in loader.record if e.name.startswith("module:")}
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if name in recorded or name == "__main__" or isinstance(getattr(spec, "loader", None), ours):
            continue
        if spec is not None and spec.origin in ("built-in", "frozen"):
            continue
        if getattr(module, "__file__", None) is None and (spec is None or spec.origin in (None, "namespace")):
            continue  # made in memory, or a namespace package: no file, no code of its own
        loaded_by = type(getattr(spec, "loader", None)).__name__
        raise AdmissionError(f"module {name} was loaded by {loaded_by}, which pyscone does not measure")


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
