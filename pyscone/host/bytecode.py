"""The host's side of the enclave's bytecode cache (UNTRUSTED): a directory, and a dev-mode key.

The enclave seals every entry it writes (``protect/codecache.py``); the host only
provides the place.  In dev mode, where the host provides every key (the FSPF's, the
signing key), it also keeps the cache's: ``dev.key`` in the directory, readable by its
owner only, made on first use.  With a CAS the key comes from the CAS after attestation
and no key file exists.
"""

from __future__ import annotations

import os
from pathlib import Path

KEY_FILE = "dev.key"
KEY_SIZE = 32


class CacheDirError(Exception):
    """The cache directory cannot be used (one line, for an ``error:``)."""


def default_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyscone" / "bytecode"


def prepare(directory: str | None, dev: bool) -> dict[str, str]:
    """Make the directory if needed; return the enclave's configuration of the cache.

    Raises:
        CacheDirError: the directory cannot be made or used, or its key file is damaged.
    """
    path = Path(directory).expanduser() if directory else default_directory()
    path = path.absolute()
    if path.exists() and not path.is_dir():
        raise CacheDirError("not a directory")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise CacheDirError(e.strerror or str(e)) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CacheDirError("not writable")
    config = {"dir": os.path.normpath(str(path))}
    if dev:
        config["key"] = _dev_key(path / KEY_FILE).hex()
    return config


def _dev_key(path: Path) -> bytes:
    """The key in ``path``, made first if there is none (published whole, with a link, so two
    first starts at once agree on one key)."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, os.urandom(KEY_SIZE).hex().encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another start made it first: use that one
            finally:
                os.unlink(tmp)
        except OSError as e:
            raise CacheDirError(f"{path.name}: {e.strerror}") from None
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise CacheDirError(f"{path.name}: not a key ({e})") from None
    if len(key) != KEY_SIZE:
        raise CacheDirError(f"{path.name}: not a {KEY_SIZE}-byte key")
    return key
