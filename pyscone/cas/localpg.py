"""A throwaway PostgreSQL server in a temporary directory (tests, benchmarks, demos).

It listens only on a Unix socket in its own directory and trusts local connections;
it is for a CAS under test, never for a deployment.  PostgreSQL must be installed
(``scripts/setup.sh`` does it); as root the server runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


class LocalPgError(Exception):
    """PostgreSQL is not installed or did not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def cluster(database: str = "cas", *, tcp: bool = False) -> Iterator[str]:
    """Start a fresh cluster with one empty database; yield its SQLAlchemy URL; remove it after.

    With ``tcp`` it also listens on 127.0.0.1 (the same port as its socket's name).
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        raise LocalPgError("PostgreSQL is not installed: run scripts/setup.sh")
    bindir = os.path.dirname(initdb)
    root = Path(tempfile.mkdtemp(prefix="pyscone-postgres-"))  # not a private temp dir: the server's user reads it
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(tool: str, *args: str) -> None:
        r = subprocess.run([*as_user, os.path.join(bindir, tool), *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise LocalPgError(f"{tool} failed: {r.stderr.strip() or r.stdout.strip()}")

    try:
        run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
        listen = "127.0.0.1" if tcp else ""
        options = f"-k {root} -p {port} -c listen_addresses='{listen}' -c fsync=off"
        run("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
        try:
            run("createdb", "-h", str(root), "-p", str(port), "-U", "postgres", database)
            yield f"postgresql+psycopg://postgres@/{database}?host={root}&port={port}"
        finally:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
