"""Shared helpers: run a script natively and inside an enclave, as real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PYSCONE = [sys.executable, "-m", "pyscone.cli"]


@pytest.fixture(autouse=True, scope="session")
def _bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every enclave of the suite shares one bytecode cache of its own, never the user's."""
    old = os.environ.get("PYSCONE_BYTECODE_CACHE")
    os.environ["PYSCONE_BYTECODE_CACHE"] = str(tmp_path_factory.mktemp("bytecode"))
    yield
    if old is None:
        os.environ.pop("PYSCONE_BYTECODE_CACHE", None)
    else:
        os.environ["PYSCONE_BYTECODE_CACHE"] = old


def write_app(tmp_path: Path, source: str, name: str = "app.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def run_enclave(
    *args: str | os.PathLike[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    input: bytes | None = None,  # noqa: A002
) -> subprocess.CompletedProcess[str]:
    """``pyscone run ARGS`` as a subprocess; returns its completed process (text mode)."""
    full_env = dict(os.environ)
    full_env.pop("PYSCONE_TEST_HOSTILE", None)
    full_env.update(env or {})
    return subprocess.run(
        [*PYSCONE, "run", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        timeout=timeout,
        input=input.decode() if input is not None else None,
        text=True,
    )


def run_native(
    script: Path, *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, capture_output=True, timeout=timeout, text=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"server exited with {proc.returncode} before listening: {out[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on port {port} after {timeout}s")


class Server:
    """An enclave server process, stopped with SIGINT (KeyboardInterrupt) at the end."""

    def __init__(self, args: list[str], cwd: Path, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen([*PYSCONE, "run", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_port(port, proc=self.proc)

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                out, err = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
        else:
            out, err = self.proc.communicate()
        return self.proc.returncode, out.decode(), err.decode()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server for this test run (scripts/setup.sh installs it)."""
    from pyscone.cas import localpg

    with localpg.cluster(tcp=True) as url:  # (tests/test_clib_sockets.py connects over TCP too)
        yield url


# -- the network shield's tests (tests/test_net_shield*.py) -----------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Any:
    """Two CAs and their certificates (tests/netshield_pki.py)."""
    from netshield_pki import make_pki

    return make_pki(tmp_path / "pki")


@pytest.fixture
def host() -> Iterator[Any]:
    """The host side of a network-shield test: relays and native servers (tests/netshield_apps.py)."""
    from netshield_apps import Host

    h = Host()
    yield h
    h.close()
