"""Host-side tools for an enclave's identity: measure it, list its TCB, sign it, make keys.

``pyscone measure`` and ``pyscone tcb`` start the enclave exactly as ``pyscone run``
would, up to the point where it measures itself, and have it write its measurement
out and stop before running anything: the numbers come from the same code that the
enclave uses when it is admitted, not from a second implementation that could drift.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from pyscone.host import launcher
from pyscone.platform import keys, sigstruct


class IdentityError(Exception):
    """A tool could not do its job; reported as one line."""


def measure_enclave(enclave: launcher.EnclaveConfig, host: launcher.HostConfig) -> dict[str, Any]:
    """Start the enclave in measure-only mode; return its measurement document.

    Returns:
        ``{"mrenclave": hex, "config": {...}, "files": [[name, path, size, sha256], ...]}``

    Raises:
        IdentityError: the enclave did not produce a measurement.
        launcher.LaunchError: the enclave could not be started.
    """
    fd, out = tempfile.mkstemp(prefix="pyscone-measure-", suffix=".json")
    os.close(fd)
    try:
        enclave.measure = True
        enclave.measure_out = out
        status = launcher.run(enclave, host)
        with open(out, "rb") as f:
            raw = f.read()
        if status != 0 or not raw:
            raise IdentityError(f"the enclave did not measure itself (exit status {status})")
        doc: dict[str, Any] = json.loads(raw)
        return doc
    finally:
        os.unlink(out)


#: What ``how`` means in ``pyscone tcb`` (the enclave's loaders say how each file reached it).
HOW = {
    "compiled": "read once; those bytes were compiled",
    "cached": "read once; the __pycache__ entry beside it ran (its code is measured: code column)",
    "compiled (via the host)": "read once through the host after the loader switch; those bytes were compiled",
    "mapped": "mapped from the very file descriptor that was hashed",
    "read": "read once; what was read is what was used",
    "re-read": "loaded before pyscone could (interpreter start-up, the dynamic linker); hashed by a second read",
}


def format_tcb(doc: dict[str, Any]) -> str:
    """``pyscone tcb``'s table: every measured file, its size and hashes, how it was loaded, and totals."""
    files = [[*f, "", ""][:6] for f in doc["files"]]  # a document from before 'code' and 'how'
    width = max(len(f[0]) for f in files)
    how_width = max(len(f[5]) for f in files)
    lines = [f"MRENCLAVE {doc['mrenclave']}", ""]
    lines.append("measured configuration: " + json.dumps(doc["config"], sort_keys=True))
    lines.append("")
    lines.append(f"{'name':<{width}}  {'bytes':>11}  {'sha256':<16}  {'code':<16}  {'how':<{how_width}}  path")
    for name, path, size, digest, code, how in files:
        lines.append(
            f"{name:<{width}}  {size:>11,}  {digest[:16]}  {(code or '-')[:16]:<16}  {how:<{how_width}}  {path}"
        )
    total = sum(f[2] for f in files)
    lines.append("")
    lines.append(f"{len(files)} files, {total:,} bytes (sha256 and code: the first 16 hex digits).")
    for how in sorted({f[5] for f in files if f[5]}):
        lines.append(f"  {how}: {HOW.get(how, how)}")
    lines.append(
        "Not measured: modules the app imports after lockdown. Put them in an authenticated or "
        "encrypted FS-shield region to have them verified."
    )
    return "\n".join(lines) + "\n"


def read_signer_key(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise IdentityError(f"{path}: {e.strerror} (make a signer key with: pyscone keygen {path})") from None
    try:
        return keys.load_private(pem)
    except ValueError as e:
        raise IdentityError(f"{path}: {e}") from None


def keygen(path: str, force: bool = False) -> bytes:
    """Write a new ECDSA P-256 signer key (mode 0600); return its MRSIGNER."""
    key = keys.generate()
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise IdentityError(f"{path} exists (--force replaces it)") from None
    except OSError as e:
        raise IdentityError(f"{path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(keys.private_pem(key))
    return sigstruct.mrsigner_of(key)
