"""The CAS against a hostile network, a hostile database writer and malformed input.

Each test performs the attack the way the host (or whoever writes the database)
would: captured owner requests replayed with a twin signature or sent to another CAS,
a TCP relay between the enclave and the CAS that drops reports (the network is the
host's), disks restored from a copy, SQLite rows rewritten with ``sqlite3``, and
requests that no client would send.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import write_app
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from test_cas import Service, World, _service, cli

from pyscone.cas import protocol
from pyscone.cas.client import Client, ClientError
from pyscone.platform import keys, quote

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("cas-hostile"))
    write_app(w.root, "print('hello')", "app.py")
    yield w
    w.stop()


def _cas(root: Path, name: str, *options: str) -> Service:
    return Service(["cas", "serve", "--dir", str(root / name), "--listen", "127.0.0.1:0", *options], r":(\d+);")


# -- owner requests: canonical signatures, replay memory of what was signed, the audience --------


@contextlib.contextmanager
def _captured() -> Iterator[list[tuple[tuple[Any, ...], dict[str, str]]]]:
    """Record every owner request the real client signs: what a network observer sees."""
    seen: list[tuple[tuple[Any, ...], dict[str, str]]] = []
    real = protocol.sign_request

    def spy(*args: Any) -> dict[str, str]:
        headers = real(*args)
        seen.append((args, headers))
        return headers

    protocol.sign_request = spy  # type: ignore[assignment]
    try:
        yield seen
    finally:
        protocol.sign_request = real  # type: ignore[assignment]


def _twin(headers: dict[str, str]) -> dict[str, str]:
    """The same request with the other valid ECDSA signature: (r, s) -> (r, n - s)."""
    r, s = decode_dss_signature(base64.b64decode(headers[protocol.H_SIGNATURE]))
    twin = encode_dss_signature(r, P256_ORDER - s)
    return {**headers, protocol.H_SIGNATURE: base64.b64encode(twin).decode()}


def _send(url: str, cert: Path, args: tuple[Any, ...], headers: dict[str, str]) -> httpx.Response:
    method, path, body = args[1], args[2], args[3]
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=30) as http:
        return http.request(method, url + path, content=body, headers=headers)


def test_a_revoked_platform_is_not_re_trusted_by_a_malleated_replay(world: World) -> None:
    assert cli("keygen", "admin.pem", cwd=world.root).returncode == 0
    cas = _cas(world.root, "cas-admin", "--admin", str(world.root / "admin.pem"))
    try:
        url, cert = f"https://127.0.0.1:{cas.port}", world.root / "cas-admin" / "cas-cert.pem"
        admin = Client(url, str(cert), keys.load_private((world.root / "admin.pem").read_bytes()))
        platform_pem = (world.root / "platform.pem").read_text()
        with _captured() as seen:
            pid = admin.trust_platform(platform_pem, "host 1")["platform_id"]
        [(trust_args, trust_headers)] = seen
        assert admin.distrust_platform(pid) == {"platform_id": pid}  # the admin revokes it
        # The attacker replays the captured "trust" within the time window, as is and with the twin.
        assert _send(url, cert, trust_args, trust_headers).status_code == 401
        replay = _send(url, cert, trust_args, _twin(trust_headers))
        assert replay.status_code == 401, replay.text
        assert "replay" in replay.json()["error"] or "canonical" in replay.json()["error"]
        # Any other signature of the same message (here a fresh one by the key itself, canonical)
        # is the same request: the replay memory holds what was signed, not how.
        key, method, path, body, _, audience = trust_args
        message = protocol._request_message(
            method, path, trust_headers[protocol.H_TIME], trust_headers[protocol.H_NONCE],
            protocol.owner_id(keys.public_der(key)), audience, body,
        )  # fmt: skip
        again = protocol.canonical_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
        resigned = {**trust_headers, protocol.H_SIGNATURE: base64.b64encode(again).decode()}
        assert resigned != trust_headers
        replay = _send(url, cert, trust_args, resigned)
        assert replay.status_code == 401 and "replay" in replay.json()["error"], replay.text
        r = cli("cas", "distrust", pid, "--cas", url, "--cas-cert", str(cert), "--key", "admin.pem", cwd=world.root)
        assert r.returncode == 2 and r.stderr == f"error: platform {pid} is not trusted\n"  # still revoked
        # A fresh request whose signature is the high-s twin is refused too: one form only.
        show = (key, "GET", "/v1/sessions/none", b"")
        headers = protocol.sign_request(*show, time.time(), audience)
        high = _twin(headers)
        assert decode_dss_signature(base64.b64decode(high[protocol.H_SIGNATURE]))[1] > P256_ORDER // 2
        refused = _send(url, cert, show, high)
        assert refused.status_code == 401 and "canonical" in refused.json()["error"]
        assert _send(url, cert, show, headers).status_code == 404  # the canonical one is fine
    finally:
        cas.stop()


def test_a_request_for_one_cas_is_refused_by_another(world: World) -> None:
    other = _cas(world.root, "cas-other")
    try:
        owner = Client(world.url, str(world.cert), keys.load_private((world.root / "owner.pem").read_bytes()))
        policy = world.policy("audience", _service("33" * 32)).read_text()
        with _captured() as seen:
            owner.put_session(policy)
        [(args, headers)] = seen
        other_url, other_cert = f"https://127.0.0.1:{other.port}", world.root / "cas-other" / "cas-cert.pem"
        moved = _send(other_url, other_cert, args, headers)
        assert moved.status_code == 401 and "another CAS" in moved.json()["error"], moved.text
        r = cli(
            "cas", "session", "show", "audience", "--cas", other_url, "--cas-cert", other_cert, "--key", "owner.pem",
            cwd=world.root,
        )  # fmt: skip
        assert r.returncode == 2 and "no session 'audience'" in r.stderr  # the other CAS did not create it
    finally:
        other.stop()


# -- malformed input: 400 with one line, bounded bodies, nothing stored for unknown names ----------


def _post(world: World, path: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(world.cert)), timeout=30) as http:
        return http.post(world.url + path, content=body, headers=headers or {})


TAGS = {"session": "s", "service": "app", "run": "ab" * 16, "seq": 1, "tags": ["cd" * 16], "mac": "ef" * 32}
MALFORMED: list[tuple[str, bytes]] = [
    ("/v1/tags", json.dumps({**TAGS, "seq": [1]}).encode()),
    ("/v1/tags", json.dumps({**TAGS, "seq": "9" * 5000}).encode()),
    ("/v1/tags", b'{"session": "s", "service": "app", "run": "x", "seq": ' + b"9" * 5000 + b', "tags": [], "mac": ""}'),
    ("/v1/tags", json.dumps({**TAGS, "seq": 1.5}).encode()),
    ("/v1/tags", json.dumps({**TAGS, "seq": True}).encode()),
    ("/v1/tags", json.dumps({**TAGS, "tags": "cd" * 16}).encode()),
    ("/v1/tags", json.dumps({**TAGS, "tags": [{"a": 1}]}).encode()),
    ("/v1/tags", json.dumps({**TAGS, "run": ["ab"]}).encode()),
    ("/v1/tags", json.dumps({**TAGS, "mac": None}).encode()),
    ("/v1/tags", json.dumps({k: v for k, v in TAGS.items() if k != "mac"}).encode()),
    ("/v1/tags", b"[" * 100_000 + b"]" * 100_000),
    ("/v1/tags", b"\xff\xfe{}"),
    ("/v1/tags", b'"just a string"'),
    ("/v1/challenge", json.dumps({"session": ["s"], "service": "app"}).encode()),
    ("/v1/challenge", json.dumps({"session": "s" * 100, "service": "app"}).encode()),
    ("/v1/challenge", json.dumps({"session": {"$ne": 1}, "service": "app"}).encode()),
    ("/v1/attest", json.dumps({"session": "s", "service": "app", "nonce": 7, "quote": "", "public_key": ""}).encode()),
    ("/v1/attest", json.dumps({"session": "s", "service": "a", "nonce": "zz", "quote": "q", "public_key": 1}).encode()),
]


@pytest.mark.parametrize(("path", "body"), MALFORMED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(MALFORMED)])
def test_malformed_enclave_requests_are_400_with_one_line(world: World, path: str, body: bytes) -> None:
    r = _post(world, path, body)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert isinstance(error, str) and "\n" not in error and len(error) < 200


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        ("name: deep\nservices: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested more than"),
        ("name: deep\nservices:\n  app: {argv: [x], mrsigner: '" + "a" * 64 + "', min_svn: !!int zz}\n", "not a valid"),
        (
            "name: deep\nservices:\n  app: {argv: [x], mrsigner: '"
            + "a" * 64
            + "', debug: !!python/name:os.system x}\n",
            "not a valid",
        ),
    ],
)
def test_malformed_policies_are_400_with_one_line(world: World, policy: str, reason: str) -> None:
    owner = Client(world.url, str(world.cert), keys.load_private((world.root / "owner.pem").read_bytes()))
    with pytest.raises(ClientError) as e:  # the CAS's answer, through the owner's real client
        owner.put_session(policy)
    assert str(e.value).startswith("invalid policy: line ") and reason in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def _raw_tls(world: World) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(world.cert))
    return ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", world.cas.port), timeout=10), server_hostname="127.0.0.1"
    )


def _status(tls: ssl.SSLSocket) -> int:
    head = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in head:
            chunk = tls.recv(4096)
            if not chunk:
                break
            head += chunk
    assert head.startswith(b"HTTP/1.1 "), head[:200]
    return int(head.split()[1])


def test_a_body_over_the_limit_is_refused_before_it_is_read(world: World) -> None:
    # A declared length past the limit: answered at once, nothing of it read.
    with _raw_tls(world) as tls:
        tls.sendall(b"POST /v1/tags HTTP/1.1\r\nHost: cas\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 65536)
        t0 = time.monotonic()
        assert _status(tls) == 413 and time.monotonic() - t0 < 5
    # No length (chunked): refused once the stream passes the limit, not at its end (which never comes).
    with _raw_tls(world) as tls:
        tls.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: cas\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"y" * 0x10000 + b"\r\n"
        with contextlib.suppress(OSError):  # the CAS may close while we still send
            for _ in range(16):  # 1 MiB, twice the limit, and no final chunk
                tls.sendall(chunk)
        assert _status(tls) == 413


def test_requests_for_unknown_sessions_store_nothing(world: World) -> None:
    db = world.cas_dir / "cas.db"
    for i in range(20):
        r = _post(world, "/v1/challenge", json.dumps({"session": f"made-up-{i}", "service": "app"}).encode())
        assert r.status_code == 200 and len(r.json()["nonce"]) == 64  # looks like any other answer
        nonce = r.json()["nonce"]
    doc = {"session": "made-up-19", "service": "app", "nonce": nonce, "quote": "00" * 64, "public_key": "00" * 65}
    refused = _post(world, "/v1/attest", json.dumps(doc).encode())
    assert refused.status_code == 403 and refused.json() == {"error": "attestation refused"}
    with contextlib.closing(sqlite3.connect(db)) as con:
        challenges = con.execute("SELECT count(*) FROM challenges WHERE session LIKE 'made-up-%'").fetchone()[0]
        audited = con.execute("SELECT count(*) FROM audit WHERE session LIKE 'made-up-%'").fetchone()[0]
    assert (challenges, audited) == (0, 0)
    # A session that exists still gets a stored, usable challenge.
    assert world.owner("session", "create", str(world.policy("known", _service("44" * 32)))).returncode == 0
    r = _post(world, "/v1/challenge", json.dumps({"session": "known", "service": "app"}).encode())
    with contextlib.closing(sqlite3.connect(db)) as con:
        stored = con.execute("SELECT session FROM challenges WHERE nonce = ?", (r.json()["nonce"],)).fetchall()
    assert stored == [("known",)]


# -- FSPF pins: per volume, and durable only when acknowledged --------------------------------------


class Relay:
    """The host's network between the enclave and the CAS: a TCP relay that forwards each
    connection, or cuts it when ``drop(n)`` says so (``n`` counts connections from 1)."""

    def __init__(self, upstream: Callable[[], int]) -> None:
        self.upstream = upstream
        self.drop: Callable[[int], bool] = lambda n: False
        self.count = 0
        self.dropped = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.count += 1
            if self.drop(self.count):
                self.dropped += 1
                client.close()  # the report never reaches the CAS
                continue
            server = socket.create_connection(("127.0.0.1", self.upstream()))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()


def _pin_reports(n: int) -> bool:
    """Connection 1 of a run attests; then each commit makes one: its pin report."""
    return n >= 2


@pytest.fixture(scope="module")
def relay(world: World) -> Iterator[Relay]:
    r = Relay(lambda: world.cas.port)
    yield r
    r.close()


def _volume(world: World, name: str) -> tuple[Path, Path, str, str]:
    """A new FSPF with one encrypted region: (fspf, data dir, key, tag)."""
    data = world.root / f"{name}-data"
    data.mkdir()
    fspf = world.root / f"{name}.fspf"
    assert cli("fspf", "create", fspf, cwd=world.root).returncode == 0
    assert cli("fspf", "addr", fspf, str(data), "--kind", "encrypted", cwd=world.root).returncode == 0
    tag = cli("fspf", "tag", fspf, cwd=world.root).stdout.strip()
    return fspf, data, (world.root / f"{name}.fspf.key").read_text().strip(), tag


def _snapshot(*paths: Path) -> dict[Path, bytes | None]:
    """What the host keeps of ``paths`` (files, or directories' trees); an FSPF with its
    second copy (``FSPF.1``, which the enclave writes at its commits)."""
    out: dict[Path, bytes | None] = {}
    for p in paths:
        copy = Path(f"{p}.1")
        for f in (
            [p, *([copy] if copy.is_file() else [])] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else []
        ):
            out[f] = f.read_bytes() if f.is_file() else None
    return out


def _restore(saved: dict[Path, bytes | None], *dirs: Path) -> None:
    """The host puts its copy of the disk back (and removes what is newer than it)."""
    for d in dirs:
        for f in sorted(d.rglob("*"), reverse=True):
            if f not in saved and f.is_file():
                f.unlink()
    for f in list(saved):
        if f.suffix == ".fspf" and Path(f"{f}.1") not in saved:
            Path(f"{f}.1").unlink(missing_ok=True)
    for f, content in saved.items():
        if content is not None:
            f.write_bytes(content)


def _run_via(world: World, relay: Relay, session: str) -> Any:
    las = f"127.0.0.1:{world.las.port}"
    pin = ["--cas", f"https://127.0.0.1:{relay.port}", "--cas-cert", str(world.cert)]
    relay.count = 0
    return cli("run", *pin, "--session", session, "--las", las, cwd=world.root)


def _measure_via(world: World, relay: Relay) -> str:
    r = cli("measure", "--cas", f"https://127.0.0.1:{relay.port}", "--cas-cert", str(world.cert), cwd=world.root)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_dropped_pin_report_fails_fsync_and_close_with_eio(world: World, relay: Relay) -> None:
    fspf, data, key, tag = _volume(world, "phase2")
    write_app(
        world.root,
        f"""
        import errno, os
        p = os.path.join({str(data)!r}, "n")
        try:
            with open(p, "w") as f:
                f.write("1")
                f.flush()
                os.fsync(f.fileno())
            print("fsync ok")
        except OSError as e:
            print("fsync", errno.errorcode.get(e.errno, e.errno), e.strerror)
        try:
            with open(p, "w") as f:
                f.write("2")
            print("close ok")
        except OSError as e:
            print("close", errno.errorcode.get(e.errno, e.errno), e.strerror)
        """,
        "phase2.py",
    )
    service = _service(
        _measure_via(world, relay), "[phase2.py]", f"    fspf: {{path: {fspf}, key: {key}, tag: {tag}}}\n"
    )
    assert world.owner("session", "create", str(world.policy("phase2", service))).returncode == 0
    relay.drop = _pin_reports
    try:
        r = _run_via(world, relay, "phase2/app")
    finally:
        relay.drop = lambda n: False
    assert relay.dropped >= 2, (relay.count, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("fsync EIO ") and "not durable" in lines[0], r.stdout + r.stderr
    assert lines[1].startswith("close EIO ") and "not durable" in lines[1], r.stdout + r.stderr
    assert "commit not durable: the pin did not acknowledge" in r.stderr


def test_pin_reports_share_one_connection_and_survive_the_cas_closing_it(world: World, relay: Relay) -> None:
    """The pin keeps its connection to the CAS between commits; when the CAS closes it (its idle
    timeout, 5 s), the next report goes over a new one and the commit still succeeds."""
    fspf, data, key, tag = _volume(world, "idle")
    write_app(
        world.root,
        f"""
        import os, time
        p = os.path.join({str(data)!r}, "n")
        for i in range(3):
            with open(p, "w") as f:
                f.write(str(i))
                f.flush()
                os.fsync(f.fileno())
        time.sleep(6)
        with open(p, "w") as f:
            f.write("after the idle timeout")
        print(open(p).read())
        """,
        "idle.py",
    )
    service = _service(_measure_via(world, relay), "[idle.py]", f"    fspf: {{path: {fspf}, key: {key}, tag: {tag}}}\n")
    assert world.owner("session", "create", str(world.policy("idle", service))).returncode == 0
    r = _run_via(world, relay, "idle/app")
    assert (r.returncode, r.stdout) == (0, "after the idle timeout\n"), r.stdout + r.stderr
    # The attestation, the reports before the pause on one connection, and one after it (a
    # report per connection would be at least 6).
    assert relay.count == 3, relay.count


def test_the_host_cannot_undo_an_acknowledged_commit_by_dropping_reports(world: World, relay: Relay) -> None:
    """The failed-login counter: each start records one attempt, durably, before it may check a
    password.  The host drops every pin report and puts its copy of the disk back
    before each start, hoping the counter never grows (unlimited guesses)."""
    fspf, data, key, tag = _volume(world, "login")
    write_app(
        world.root,
        f"""
        import os
        p = os.path.join({str(data)!r}, "attempts")
        n = int(open(p).read()) if os.path.exists(p) else 0
        print("attempts before", n, flush=True)
        try:
            with open(p, "w") as f:
                f.write(str(n + 1))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise SystemExit(f"attempt not recorded ({{e.strerror}}): no password check")
        print("recorded", n + 1)
        """,
        "login.py",
    )
    service = _service(
        _measure_via(world, relay), "[login.py]", f"    fspf: {{path: {fspf}, key: {key}, tag: {tag}}}\n"
    )
    assert world.owner("session", "create", str(world.policy("login", service))).returncode == 0
    saved = _snapshot(fspf, data)
    recorded = 0  # the highest count the app was told is durable
    for _ in range(3):
        relay.drop = _pin_reports
        try:
            r = _run_via(world, relay, "login/app")
        finally:
            relay.drop = lambda n: False
        before = r.stdout.splitlines()[0] if r.stdout else ""
        assert before.startswith("attempts before "), r.stdout + r.stderr
        assert int(before.split()[-1]) >= recorded, f"an acknowledged attempt was undone: {r.stdout}"
        if "recorded" in r.stdout:
            recorded = int(r.stdout.split()[-1])
        else:
            assert "attempt not recorded" in r.stderr and "not durable" in r.stderr, r.stderr
        _restore(saved, data)
    # An honest network: the attempt is acknowledged; the host's copy of the disk is now stale.
    r = _run_via(world, relay, "login/app")
    assert r.returncode == 0 and r.stdout.endswith("recorded 1\n"), r.stdout + r.stderr
    _restore(saved, data)
    r = _run_via(world, relay, "login/app")
    assert r.returncode == 70 and "not the pinned version" in r.stderr, r.stdout + r.stderr


def test_services_of_a_session_share_their_volume_and_its_pin(world: World) -> None:
    fspf, data, key, tag = _volume(world, "shared")
    write_app(
        world.root,
        f"""
        import os, sys
        p = os.path.join({str(data)!r}, "counter")
        n = int(open(p).read()) if os.path.exists(p) else 0
        if sys.argv[1:] == ["write"]:
            with open(p, "w") as f:
                f.write(str(n + 1))
            n += 1
        print(sys.argv[1], n)
        """,
        "shared.py",
    )
    mre = world.measure()
    fspf_yaml = f"fspf: {{path: {fspf}, key: {key}, tag: {tag}}}"
    path = world.root / "shared.yaml"
    path.write_text(
        "name: shared\nservices:\n"
        f"  writer: {{mrenclaves: [{mre}], cwd: {world.root}, argv: [shared.py, write], {fspf_yaml}}}\n"
        f"  reader: {{mrenclaves: [{mre}], cwd: {world.root}, argv: [shared.py, read], {fspf_yaml}}}\n"
    )
    assert world.owner("session", "create", str(path)).returncode == 0
    first = world.run("shared/writer")
    assert (first.returncode, first.stdout) == (0, "write 1\n"), first.stderr
    saved = _snapshot(fspf, data)
    read = world.run("shared/reader")  # the other service starts on the writer's commit
    assert (read.returncode, read.stdout) == (0, "read 1\n"), read.stderr
    second = world.run("shared/writer")
    assert (second.returncode, second.stdout) == (0, "write 2\n"), second.stderr
    _restore(saved, data)  # the host rolls the volume back one commit
    for svc in ("reader", "writer"):
        rolled = world.run(f"shared/{svc}")
        assert rolled.returncode == 70 and "not the pinned version" in rolled.stderr, rolled.stderr
    # Services naming one FSPF must agree on what it is.
    path.write_text(
        path.read_text().replace(
            f"argv: [shared.py, read], fspf: {{path: {fspf}, key: {key}, tag: {tag}}}",
            f"argv: [shared.py, read], fspf: {{path: {fspf}, key: {key}, tag: {'0' * 32}}}",
        )
    )
    r = world.owner("session", "create", str(path))
    assert r.returncode == 2 and "is also service writer's: give it the same key and tag" in r.stderr, r.stderr


# -- the database: a writer without the master key ---------------------------------------------------


def _rows(db: Path, table: str, where: str = "1", args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.row_factory = sqlite3.Row
        return con.execute(f"SELECT * FROM {table} WHERE {where}", args).fetchall()


def _sql(db: Path, statement: str, args: tuple[Any, ...] = ()) -> int:
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        return con.execute(statement, args).rowcount


def _insert(db: Path, table: str, row: sqlite3.Row) -> None:
    columns = row.keys()
    _sql(db, f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", tuple(row))


def _put_back(db: Path, table: str, key: str, rows: list[sqlite3.Row]) -> None:
    """Write saved rows back over the current ones (an older copy of part of the database)."""
    for row in rows:
        _sql(db, f"DELETE FROM {table} WHERE {key} = ?", (row[key],))
        _insert(db, table, row)


def _two_versions(world: World, name: str) -> tuple[Path, list[sqlite3.Row], list[sqlite3.Row]]:
    """A session updated once: the database, and its row before and after the update."""
    db = world.cas_dir / "cas.db"
    v1 = world.policy(name, _service("55" * 32, "[app.py, v1]"))
    created = world.owner("session", "create", str(v1))
    assert created.returncode == 0, created.stderr
    old_row = _rows(db, "sessions", "name = ?", (name,))
    v2 = world.root / f"{name}-2.yaml"
    v2.write_text(v1.read_text().replace("v1]", "v2]") + f"predecessor: {created.stdout.split()[-1]}\n")
    assert world.owner("session", "update", str(v2)).returncode == 0
    return db, old_row, _rows(db, "sessions", "name = ?", (name,))


def test_a_database_writer_cannot_put_an_old_policy_version_back(world: World) -> None:
    db, old_row, new_row = _two_versions(world, "victim-v")
    _put_back(db, "sessions", "name", old_row)
    r = world.owner("session", "show", "victim-v")
    assert r.returncode == 2, r.stdout
    assert (
        r.stderr
        == "error: the CAS's database was tampered with: session 'victim-v': an older version of it was put back\n"
    )
    assert world.run("victim-v/app").returncode == 70  # nor does an enclave get its configuration
    _put_back(db, "sessions", "name", new_row)
    assert world.owner("session", "show", "victim-v").returncode == 0


def test_a_database_writer_cannot_give_a_session_to_another_owner(world: World) -> None:
    db, _, new_row = _two_versions(world, "victim-o")
    if not (world.root / "thief.pem").exists():
        assert cli("keygen", "thief.pem", cwd=world.root).returncode == 0
    thief = protocol.owner_id(keys.public_der(keys.load_private((world.root / "thief.pem").read_bytes())))
    _sql(db, "UPDATE sessions SET owner = ? WHERE name = 'victim-o'", (thief,))
    r = world.owner("session", "show", "victim-o", key="thief.pem")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert "tampered with: session 'victim-o': altered or moved" in r.stderr, r.stderr
    r = world.owner("session", "show", "victim-o")
    assert r.returncode == 2 and "tampered with" in r.stderr
    _put_back(db, "sessions", "name", new_row)
    assert world.owner("session", "show", "victim-o").returncode == 0


def test_a_database_writer_cannot_delete_audit_events(world: World) -> None:
    db, _, _ = _two_versions(world, "victim-a")
    assert world.run("victim-a/app").returncode == 70  # a refused attestation: one more event
    assert world.owner("audit", "victim-a").returncode == 0
    for which in ("min", "max"):  # the first event (the middle of the chain), then the newest
        row = f"(SELECT {which}(rowid) FROM audit WHERE session = 'victim-a')"
        [saved] = _rows(db, "audit", f"rowid = {row}")
        assert _sql(db, f"DELETE FROM audit WHERE rowid = {row}") == 1
        r = world.owner("audit", "victim-a")
        assert r.returncode == 2 and "tampered with: the audit of session 'victim-a'" in r.stderr, r.stdout + r.stderr
        _insert(db, "audit", saved)
        assert world.owner("audit", "victim-a").returncode == 0, "the chain is whole again"
    [event] = _rows(db, "audit", "rowid = (SELECT max(rowid) FROM audit WHERE session = 'victim-a')")
    _sql(
        db,
        "UPDATE audit SET detail = 'nothing happened' WHERE rowid = (SELECT max(rowid) FROM audit WHERE session = 'victim-a')",
    )
    r = world.owner("audit", "victim-a")
    assert r.returncode == 2 and "was altered" in r.stderr, r.stdout + r.stderr
    assert event["detail"] != "nothing happened"


def test_a_revoked_platform_put_back_in_the_database_is_refused(world: World) -> None:
    db = world.cas_dir / "cas.db"
    mre = world.measure()
    assert world.owner("session", "create", str(world.policy("plat", _service(mre)))).returncode == 0
    assert world.run("plat/app").returncode == 0
    saved = _rows(db, "platforms")
    platform = keys.load_public((world.root / "platform.pem").read_bytes())
    pid = quote.platform_id(platform).hex()
    assert cli("cas", "distrust", "--dir", world.cas_dir, pid, cwd=world.root).returncode == 0
    assert world.run("plat/app").returncode == 70
    _sql(db, "DELETE FROM platforms")
    _put_back(db, "platforms", "platform_id", saved)  # the row from before the revocation
    r = world.run("plat/app")
    assert r.returncode == 70, r.stdout + r.stderr
    _sql(db, "DELETE FROM platforms")
    assert cli("cas", "trust", "--dir", world.cas_dir, "platform.pem", cwd=world.root).returncode == 0
    assert world.run("plat/app").returncode == 0  # trusted again, by the CAS's own tool


def test_a_restored_database_backup_cannot_roll_the_file_system_back(world: World) -> None:
    directory = world.root / "cas-backup"
    cas = _cas(world.root, "cas-backup")
    try:
        assert cli("cas", "trust", "--dir", directory, "platform.pem", cwd=world.root).returncode == 0
        pin = ["--cas", f"https://127.0.0.1:{cas.port}", "--cas-cert", str(directory / "cas-cert.pem")]
        fspf, data, key, tag = _volume(world, "backup")
        write_app(
            world.root,
            f"""
            import os
            p = os.path.join({str(data)!r}, "n")
            n = int(open(p).read()) if os.path.exists(p) else 0
            with open(p, "w") as f:
                f.write(str(n + 1))
            print("n", n + 1)
            """,
            "backup.py",
        )
        mre = cli("measure", *pin, cwd=world.root).stdout.strip()
        policy = world.policy(
            "backup", _service(mre, "[backup.py]", f"    fspf: {{path: {fspf}, key: {key}, tag: {tag}}}\n")
        )
        assert cli("cas", "session", "create", str(policy), *pin, "--key", "owner.pem", cwd=world.root).returncode == 0
        las = ["--las", f"127.0.0.1:{world.las.port}"]
        run = lambda: cli("run", *pin, "--session", "backup/app", *las, cwd=world.root)  # noqa: E731
        assert run().stdout == "n 1\n"
        port = cas.port
        disk = _snapshot(fspf, data)
        database = _snapshot(*directory.glob("cas.db*"))
        assert run().stdout == "n 2\n"
        cas.stop()
        _restore(disk, data)  # the host's disk and the database, both one commit back
        for f in directory.glob("cas.db*"):
            f.unlink()
        _restore(database)
        cas = Service(["cas", "serve", "--dir", str(directory), "--listen", f"127.0.0.1:{port}"], r":(\d+);")
        r = run()
        assert r.returncode == 70 and r.stdout == "", r.stdout + r.stderr
    finally:
        err = cas.stop()
    assert "tampered with: session 'backup': an older version" in err or "an older pin was put back" in err, err


def test_a_database_writer_is_refused_on_postgresql(world: World, postgres_url: str) -> None:
    directory = world.root / "cas-pg-tamper"
    engine = sa.create_engine(postgres_url)
    cas = _cas(world.root, "cas-pg-tamper", "--db", postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        pin = ["--cas", f"https://127.0.0.1:{cas.port}", "--cas-cert", str(directory / "cas-cert.pem")]
        policy = world.policy("pg-victim", _service("66" * 32))
        assert cli("cas", "session", "create", str(policy), *pin, "--key", "owner.pem", cwd=world.root).returncode == 0
        if not (world.root / "thief.pem").exists():
            assert cli("keygen", "thief.pem", cwd=world.root).returncode == 0
        thief = protocol.owner_id(keys.public_der(keys.load_private((world.root / "thief.pem").read_bytes())))
        with engine.begin() as db:
            db.execute(sa.text("UPDATE sessions SET owner = :o WHERE name = 'pg-victim'"), {"o": thief})
        r = cli("cas", "session", "show", "pg-victim", *pin, "--key", "thief.pem", cwd=world.root)
        assert r.returncode == 2 and "tampered with: session 'pg-victim'" in r.stderr, r.stdout + r.stderr
        with engine.begin() as db:
            db.execute(sa.text("DELETE FROM audit WHERE session = 'pg-victim'"))
        r = cli("cas", "audit", "pg-victim", *pin, "--key", "owner.pem", cwd=world.root)
        assert r.returncode == 2 and "tampered with" in r.stderr, r.stdout + r.stderr
    finally:
        cas.stop()
        engine.dispose()


def test_the_cas_log_has_no_traceback(world: World) -> None:
    """Runs after the malformed-input tests of this module (pytest keeps file order)."""
    port = world.cas.port
    err = world.cas.stop()
    world.cas = Service(["cas", "serve", "--dir", str(world.cas_dir), "--listen", f"127.0.0.1:{port}"], r":(\d+);")
    assert "Traceback" not in err and "Exception in ASGI" not in err, err[-3000:]
