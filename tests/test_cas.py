"""The CAS end to end: a real HTTPS service, a real LAS, owners' CLI, attested enclaves."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import PYSCONE, write_app

from pyscone.cas import protocol
from pyscone.platform import keys, quote, sigstruct


def cli(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYSCONE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


class Service:
    """A pyscone service started as a real process, its address read from its first line."""

    def __init__(self, args: list[str], pattern: str) -> None:
        self.args = args
        self.proc = subprocess.Popen([*PYSCONE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline()
        m = re.search(pattern, self.line)
        if m is None:
            self.proc.kill()
            raise AssertionError(self.line + self.proc.communicate()[1])
        self.port = int(m.group(1))

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=15)
        return err


class World:
    """A CAS, a trusted LAS, an owner key and a directory for apps, like a small deployment."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cas_dir = root / "cas"
        self.cas = Service(["cas", "serve", "--dir", str(self.cas_dir), "--listen", "127.0.0.1:0"], r":(\d+);")
        self.las = Service(["las", "--dir", str(root / "las"), "--listen", "127.0.0.1:0"], r":(\d+)$")
        shown = cli("las", "--dir", root / "las", "--show", cwd=root)
        (root / "platform.pem").write_text(shown.stdout)
        assert cli("cas", "trust", "--dir", self.cas_dir, "platform.pem", cwd=root).returncode == 0
        assert cli("keygen", "owner.pem", cwd=root).returncode == 0
        self.url = f"https://127.0.0.1:{self.cas.port}"
        self.cert = self.cas_dir / "cas-cert.pem"
        self.pin = ["--cas", self.url, "--cas-cert", str(self.cert)]

    def owner(self, *args: str, key: str = "owner.pem") -> subprocess.CompletedProcess[str]:
        return cli("cas", *args, *self.pin, "--key", key, cwd=self.root)

    def measure(self, *options: str) -> str:
        r = cli("measure", *self.pin, *options, cwd=self.root)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def policy(self, name: str, service_yaml: str, extra: str = "") -> Path:
        if "    cwd:" not in service_yaml:  # the programs live in root (the default is /)
            service_yaml = f"    cwd: {self.root}\n{service_yaml}"
        path = self.root / f"{name}.yaml"
        path.write_text(f"name: {name}\nservices:\n  app:\n{service_yaml}{extra}")
        return path

    def run(
        self, session: str, *options: str, las_port: int | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        las = f"127.0.0.1:{las_port or self.las.port}"
        return cli("run", *self.pin, "--session", session, "--las", las, *options, cwd=cwd or self.root)

    def stop(self) -> None:
        self.cas.stop()
        self.las.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("cas"))
    write_app(w.root, "import os, sys\nprint('argv', sys.argv[1:], 'env', sorted(os.environ.items()))", "app.py")
    yield w
    w.stop()


def _service(mrenclave: str, argv: str = "[app.py]", more: str = "") -> str:
    return f"    mrenclaves: [{mrenclave}]\n    argv: {argv}\n{more}"


def test_an_attested_enclave_gets_its_configuration_and_secrets_and_the_host_none(world: World) -> None:
    mre = world.measure()
    secrets = "secrets:\n  pw: {kind: password, length: 16}\n  tls: {kind: x509, common_name: app.test}\n"
    policy = world.policy(
        "basic",
        _service(mre, '[app.py, "--password=${secret:pw}"]', "    env: {MODE: prod, CA: '${secret:tls.ca}'}\n"),
        secrets,
    )
    created = world.owner("session", "create", str(policy))
    assert created.returncode == 0, created.stderr
    r = world.run("basic/app", "app.py")  # the host may name the program: it must be the session's
    assert r.returncode == 0, r.stderr
    out = r.stdout
    wrong = world.run("basic/app", "other.py")
    assert wrong.returncode == 70, wrong.stderr
    assert f"the host started {world.root}/other.py, but session basic/app runs {world.root}/app.py" in wrong.stderr
    password = re.search(r"--password=([^']+)'", out)
    assert password is not None and len(password.group(1)) == 16
    assert "'MODE', 'prod'" in out and "BEGIN CERTIFICATE" in out
    again = world.run("basic/app")
    assert password.group(1) in again.stdout  # the same secret for every run
    shown = world.owner("session", "show", "basic")
    assert shown.returncode == 0 and password.group(1) not in shown.stdout  # no API returns it
    db = (world.cas_dir / "cas.db").read_bytes()
    assert password.group(1).encode() not in db  # encrypted at rest
    audit = world.owner("audit", "basic")
    assert audit.stdout.count(" attest  ok") == 3  # the wrong program attested, then its enclave refused it


def test_the_working_directory_is_the_policys_and_never_the_hosts(world: World) -> None:
    # The host starts the same attested enclave in a directory of its own, holding its own
    # app.py and module: what runs, and where relative paths land, is still the policy's.
    app, evil = world.root / "cwd-app", world.root / "cwd-evil"
    for d in (app, evil):
        (d / "data").mkdir(parents=True)
    write_app(app, "import os, cwdmod\nprint('genuine', os.getcwd())\nopen('data/x', 'w').write('from the app')")
    write_app(app, "print('genuine module')", "cwdmod.py")
    write_app(evil, "print('HOST CODE RAN')")
    write_app(evil, "print('HOST MODULE RAN')", "cwdmod.py")
    mre = world.measure()
    for name, argv in (("cwd", "[app.py]"), ("cwdm", "[-m, cwdmod]")):
        policy = world.policy(name, f"    cwd: {app}\n{_service(mre, argv)}")
        assert world.owner("session", "create", str(policy)).returncode == 0
    r = world.run("cwd/app", cwd=evil)
    assert r.returncode == 0, r.stderr
    assert "HOST" not in r.stdout and r.stdout == f"genuine module\ngenuine {app}\n"
    assert (app / "data" / "x").read_text() == "from the app" and not (evil / "data" / "x").exists()
    named = world.run("cwd/app", "app.py", cwd=evil)  # the host's app.py is not the session's
    assert named.returncode == 70, named.stderr
    assert f"the host started {evil}/app.py, but session cwd/app runs {app}/app.py" in named.stderr
    assert "HOST" not in named.stdout
    m = world.run("cwdm/app", cwd=evil)
    assert m.returncode == 0 and m.stdout == "genuine module\n", (m.stdout, m.stderr)
    gone = world.policy("cwdgone", f"    cwd: {app / 'nowhere'}\n{_service(mre)}")
    assert world.owner("session", "create", str(gone)).returncode == 0
    missing = world.run("cwdgone/app")
    assert missing.returncode == 70 and f"the session's working directory {app / 'nowhere'}" in missing.stderr


def test_the_bytecode_cache_of_an_attested_enclave_is_sealed_with_the_cas_key(world: World) -> None:
    # The host plants a dev-mode key of its own in the cache directory: an attested enclave
    # must seal with the CAS's key, so nothing it caches opens (or could be forged) with it.
    from pyscone.host import bytecode
    from pyscone.protect.codecache import CacheIntegrityError, CacheKey, interpreter_tag

    cache = world.root / "bytecode-cas"
    cache.mkdir()
    host_key = os.urandom(32)
    (cache / bytecode.KEY_FILE).write_text(host_key.hex() + "\n")
    (world.root / "bc").mkdir()
    write_app(world.root / "bc", "import bcmod\nprint(bcmod.WORD)", "app.py")
    write_app(world.root / "bc", "WORD = 'cached-by-the-enclave'", "bcmod.py")
    policy = world.policy("bc", f"    cwd: {world.root / 'bc'}\n{_service(world.measure())}")
    assert world.owner("session", "create", str(policy)).returncode == 0
    stats = []
    for _ in range(2):
        r = world.run("bc/app", "--stats", "--bytecode-cache", str(cache))
        assert r.returncode == 0 and r.stdout == "cached-by-the-enclave\n", r.stderr
        m = re.search(r"bytecode cache: (\d+) hits, (\d+) misses, (\d+) stored", r.stderr)
        assert m is not None, r.stderr
        stats.append(tuple(map(int, m.groups())))
    assert stats[0][2] >= 1 and stats[1][0] >= 1 and stats[1][2] == 0  # stored, then used
    as_host = CacheKey(host_key, interpreter_tag())
    assert not (cache / as_host.name(str(world.root / "bc" / "bcmod.py"))).exists()
    for entry in cache.iterdir():
        if entry.name != bytecode.KEY_FILE:
            with pytest.raises(CacheIntegrityError):
                as_host.open(entry.name, entry.read_bytes())


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong mrenclave", "MRENCLAVE"),
        ("wrong signer", "is not the expected signer"),
        ("svn too low", "security version 2 is below the minimum 3"),
        ("debug", "debug enclave"),
        ("untrusted platform", "untrusted platform"),
    ],
)
def test_refused_enclaves_are_told_nothing_and_the_operator_why(world: World, case: str, reason: str) -> None:
    name = case.replace(" ", "-")
    signer = sigstruct.mrsigner_of(keys.load_private(_signer(world, "signer.pem", debug=True)))
    options: list[str] = ["--signature", "signer.sig"]
    if case == "wrong mrenclave":
        service = _service(world.measure("--heap", "512M"))
        options = []
    elif case == "wrong signer":
        service = f"    mrsigner: {'ab' * 32}\n    argv: [app.py]\n"
    elif case == "svn too low":
        service = f"    mrsigner: {signer.hex()}\n    min_svn: 3\n    argv: [app.py]\n"
    else:
        service = f"    mrsigner: {signer.hex()}\n    argv: [app.py]\n"
    if case == "debug":
        options.append("--no-barrier")
    assert world.owner("session", "create", str(world.policy(name, service))).returncode == 0
    las = None
    if case == "untrusted platform":
        las = Service(["las", "--dir", str(world.root / "rogue-las"), "--listen", "127.0.0.1:0"], r":(\d+)$")
    try:
        r = world.run(f"{name}/app", *options, las_port=las.port if las else None)
    finally:
        if las is not None:
            las.stop()
    assert r.returncode == 70
    assert r.stderr.strip().endswith("attestation failed: the CAS refused this enclave (attestation refused)")
    assert reason not in r.stderr  # the enclave learns nothing
    audit = world.owner("audit", name).stdout
    assert "REFUSED" in audit and reason in audit, audit


def _signer(world: World, name: str, debug: bool) -> bytes:
    """A signer key, and a signature (svn 2, product 0) for the enclave with the world's CAS pin."""
    if not (world.root / name).exists():
        assert cli("keygen", name, cwd=world.root).returncode == 0
        flags = ["--debug"] if debug else []
        r = cli("sign", *world.pin, "--key", name, "--svn", "2", *flags, "-o", "signer.sig", cwd=world.root)
        assert r.returncode == 0, r.stderr
    return (world.root / name).read_bytes()


def _tls(world: World) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(world.cert))


def _api(world: World, path: str, doc: dict[str, object]) -> httpx.Response:
    with httpx.Client(verify=_tls(world), timeout=30) as http:
        return http.post(world.url + path, json=doc)


def _fake_enclave_request(world: World, session: str, mrenclave: bytes) -> dict[str, object]:
    """What an enclave sends to /v1/attest, made here (the simulated LAS signs any report)."""
    nonce = _api(world, "/v1/challenge", {"session": session, "service": "app"}).json()["nonce"]
    key = keys.generate()
    public = keys.public_der(key)
    report = quote.Report(mrenclave, bytes(32), 0, 0, False, quote.report_data(public, bytes.fromhex(nonce)))
    with socket.create_connection(("127.0.0.1", world.las.port)) as s, s.makefile("rb") as f:
        s.sendall(json.dumps({"op": "quote", "report": report.pack().hex()}).encode() + b"\n")
        blob = json.loads(f.readline())["quote"]
    return {"session": session, "service": "app", "nonce": nonce, "quote": blob, "public_key": public.hex()}


def test_replayed_or_tampered_quotes_and_nonces_are_refused(world: World) -> None:
    mre = bytes(range(32))
    assert world.owner("session", "create", str(world.policy("replay", _service(mre.hex())))).returncode == 0
    request = _fake_enclave_request(world, "replay", mre)
    first = _api(world, "/v1/attest", request)
    assert first.status_code == 200 and "sealed" in first.json()
    assert _api(world, "/v1/attest", request).status_code == 403  # the same nonce and quote again
    fresh = _fake_enclave_request(world, "replay", mre)
    stale_quote = {**fresh, "quote": request["quote"]}  # an old quote with a new nonce
    assert _api(world, "/v1/attest", stale_quote).status_code == 403
    fresh = _fake_enclave_request(world, "replay", mre)  # (the stale quote used up the last nonce)
    tampered = bytearray(bytes.fromhex(str(fresh["quote"])))
    tampered[10] ^= 1
    assert _api(world, "/v1/attest", {**fresh, "quote": tampered.hex()}).json() == {"error": "attestation refused"}
    other_key = keys.public_der(keys.generate()).hex()
    fresh = _fake_enclave_request(world, "replay", mre)
    assert _api(world, "/v1/attest", {**fresh, "public_key": other_key}).status_code == 403  # key swapped
    audit = world.owner("audit", "replay").stdout
    for why in ("already used nonce", "not bound to this key and nonce", "does not verify"):
        assert why in audit, audit


def test_only_the_owner_updates_and_only_from_the_current_version(world: World) -> None:
    service = _service("11" * 32)
    first = world.policy("owned", service, "secrets:\n  tok: {kind: random, bytes: 16}\n")
    created = world.owner("session", "create", str(first))
    assert created.returncode == 0, created.stderr
    version = created.stdout.split()[-1]
    assert cli("keygen", "intruder.pem", cwd=world.root).returncode == 0
    update = world.root / "owned-2.yaml"
    update.write_text(first.read_text() + f"predecessor: {version}\n")
    r = world.owner("session", "update", str(update), key="intruder.pem")
    assert r.returncode == 2 and r.stderr == "error: session 'owned' belongs to another owner\n"
    r = world.owner("session", "show", "owned", key="intruder.pem")
    assert r.returncode == 2 and r.stderr == "error: no session 'owned' of yours\n"
    stale = world.root / "owned-stale.yaml"
    stale.write_text(first.read_text() + f"predecessor: {'0' * 64}\n")
    r = world.owner("session", "update", str(stale))
    assert r.returncode == 2 and "stale predecessor" in r.stderr
    r = world.owner("session", "update", str(update))
    assert r.returncode == 0, r.stderr
    r = world.owner("session", "update", str(update))  # the same update again: now stale
    assert r.returncode == 2 and "stale predecessor" in r.stderr
    audit = world.owner("audit", "owned").stdout
    assert "REFUSED  refused: not the owner" in audit


def test_owner_requests_cannot_be_forged_or_replayed(world: World) -> None:
    key = keys.load_private((world.root / "owner.pem").read_bytes())
    body = world.policy("signed", _service("22" * 32)).read_bytes()
    cas = protocol.cert_fingerprint(world.cert.read_bytes())
    headers = protocol.sign_request(key, "POST", "/v1/sessions", body, time.time(), cas)
    with httpx.Client(verify=_tls(world), timeout=30) as http:
        assert http.post(world.url + "/v1/sessions", content=body + b"\n", headers=headers).status_code == 401
        assert http.post(world.url + "/v1/sessions", content=body, headers=headers).status_code == 201
        replay = http.post(world.url + "/v1/sessions", content=body, headers=headers)
        assert replay.status_code == 401 and "replay" in replay.json()["error"]
        old = protocol.sign_request(key, "GET", "/v1/sessions/signed", b"", time.time() - 3600, cas)
        assert http.get(world.url + "/v1/sessions/signed", headers=old).status_code == 401
        assert http.get(world.url + "/v1/sessions/signed").status_code == 401


def test_policy_mistakes_are_one_line_with_the_line_number(world: World) -> None:
    bad = world.root / "bad.yaml"
    bad.write_text("name: bad\nservices:\n  app:\n    mrenclaves: [nothex]\n    argv: [app.py]\n")
    r = world.owner("session", "create", str(bad))
    assert r.returncode == 2
    assert r.stderr == "error: invalid policy: line 4: services.app.mrenclaves[0]: expected a 64-hex-digit MRENCLAVE\n"
    bad.write_text("name: bad\nservices:\n  app:\n    mrenclaves: ['" + "a" * 64 + "']\n    argv: ['${secret:nope}']\n")
    r = world.owner("session", "create", str(bad))
    assert "line 5: services.app.argv[0]: refers to an undefined secret 'nope'" in r.stderr


def test_the_fspf_is_pinned_by_the_cas_and_a_rolled_back_one_refused(world: World) -> None:
    data = world.root / "data"
    data.mkdir()
    fspf = world.root / "app.fspf"
    assert cli("fspf", "create", fspf, cwd=world.root).returncode == 0
    assert cli("fspf", "addr", fspf, str(data), "--kind", "encrypted", cwd=world.root).returncode == 0
    assert cli("fspf", "addr", fspf, str(world.root / "run"), "--kind", "memory", cwd=world.root).returncode == 0
    tag = cli("fspf", "tag", fspf, cwd=world.root).stdout.strip()
    key = (world.root / "app.fspf.key").read_text().strip()
    write_app(
        world.root,
        f"""
        import os
        print(open({str(world.root / "run" / "token")!r}).read())
        p = os.path.join({str(data)!r}, "counter")
        n = int(open(p).read()) if os.path.exists(p) else 0
        with open(p, "w") as f:
            f.write(str(n + 1))
        print("counter", n + 1)
        """,
        "counter.py",
    )
    service = _service(
        world.measure(),
        "[counter.py]",
        f"    fspf: {{path: {fspf}, key: {key}, tag: {tag}}}\n"
        f"    files: {{{world.root / 'run' / 'token'}: 'token ${{secret:tok}}'}}\n",
    )
    policy = world.policy("fs", service, "secrets:\n  tok: {kind: random, bytes: 8}\n")
    assert world.owner("session", "create", str(policy)).returncode == 0
    first = world.run("fs/app")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("token ") and first.stdout.endswith("counter 1\n")
    assert not (world.root / "run").exists()  # the injected file lived in enclave memory only
    saved = {p: p.read_bytes() for p in (fspf, data / "counter")}
    second = world.run("fs/app")
    assert second.returncode == 0 and second.stdout.endswith("counter 2\n"), second.stderr
    for p, content in saved.items():  # the host rolls the file system back one version
        p.write_bytes(content)
    rolled = world.run("fs/app")
    assert rolled.returncode == 70
    assert "cannot mount the file-system shield" in rolled.stderr and "pinned" in rolled.stderr
    stored = b"".join(p.read_bytes() for p in world.cas_dir.glob("cas.db*"))
    assert key.encode() not in stored  # the policy that holds the FSPF key is encrypted at rest


def test_fifty_enclaves_attesting_at_once_each_get_their_own_configuration(world: World) -> None:
    mre = world.measure()
    write_app(world.root, "import sys\nprint(sys.argv[1])", "who.py")
    for i in range(2):
        service = _service(mre, f"[who.py, 'session-{i}:${{secret:id}}']")
        policy = world.policy(f"many-{i}", service, "secrets:\n  id: {kind: random, bytes: 8}\n")
        assert world.owner("session", "create", str(policy)).returncode == 0
    sessions = [f"many-{i % 2}" for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda s: world.run(f"{s}/app"), sessions))
    outputs = {}
    for session, r in zip(sessions, results, strict=True):
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(session.replace("many", "session") + ":"), (session, r.stdout)
        outputs.setdefault(session, set()).add(r.stdout)
    assert all(len(v) == 1 for v in outputs.values())  # each session's secret, the same for all its runs
    assert outputs["many-0"] != outputs["many-1"]


def test_a_restarted_cas_keeps_its_sessions_identity_and_secrets(world: World) -> None:
    policy = world.policy(
        "restart", _service(world.measure(), "[app.py, '${secret:tok}']"), "secrets:\n  tok: {kind: random}\n"
    )
    assert world.owner("session", "create", str(policy)).returncode == 0
    before = world.run("restart/app")
    assert before.returncode == 0, before.stderr
    fingerprint = world.cas.line.split("sha256 ")[1].strip()
    world.cas.stop()
    world.cas = Service(
        ["cas", "serve", "--dir", str(world.cas_dir), "--listen", f"127.0.0.1:{world.cas.port}"], r":(\d+);"
    )
    assert world.cas.line.split("sha256 ")[1].strip() == fingerprint  # the same certificate: enclaves still pin it
    assert world.owner("session", "show", "restart").returncode == 0
    after = world.run("restart/app")
    assert (after.returncode, after.stdout) == (0, before.stdout), after.stderr  # the same secret


def test_a_cas_on_postgresql(world: World, postgres_url: str) -> None:
    directory = world.root / "cas-pg"
    url = postgres_url.replace("postgresql+psycopg://", "postgresql://")  # as a user writes it
    cas = Service(["cas", "serve", "--dir", str(directory), "--listen", "127.0.0.1:0", "--db", url], r":(\d+);")
    try:
        trust = cli("cas", "trust", "--dir", directory, "--db", url, "platform.pem", cwd=world.root)
        assert trust.returncode == 0, trust.stderr
        pin = ["--cas", f"https://127.0.0.1:{cas.port}", "--cas-cert", str(directory / "cas-cert.pem")]
        mre = cli("measure", *pin, cwd=world.root).stdout.strip()
        policy = world.policy("pg", _service(mre, "[app.py, '${secret:tok}']"), "secrets:\n  tok: {kind: random}\n")
        created = cli("cas", "session", "create", str(policy), *pin, "--key", "owner.pem", cwd=world.root)
        assert created.returncode == 0, created.stderr
        las = f"127.0.0.1:{world.las.port}"
        r = cli("run", *pin, "--session", "pg/app", "--las", las, cwd=world.root)
        assert r.returncode == 0, r.stderr
        assert re.search(r"argv \['[0-9a-f]{64}'\]", r.stdout), r.stdout
    finally:
        cas.stop()


def test_cas_mistakes_are_one_error_line(world: World) -> None:
    cases = [
        (["cas", "serve", "--dir", str(world.cas_dir), "--listen", f"127.0.0.1:{world.cas.port}"], "cannot listen"),
        (
            ["cas", "serve", "--dir", str(world.root / "x"), "--db", "postgresql://nobody@/x?host=/nonexistent"],
            "cannot open the database",
        ),
        (["cas", "serve", "--listen", "nowhere"], "expected HOST:PORT"),
        (
            [
                "cas",
                "session",
                "show",
                "x",
                "--cas",
                "https://127.0.0.1:1",
                "--cas-cert",
                str(world.cert),
                "--key",
                "owner.pem",
            ],
            "cannot be reached",
        ),
        (["cas", "session", "show", "x", *world.pin], "an owner key is needed"),
        (["cas", "trust", "--dir", str(world.cas_dir), "missing.pem"], "missing.pem: No such file"),
        (["run", *world.pin], "--cas needs --session NAME/SERVICE"),
        (["run", *world.pin, "--session", "a/b", "--env", "A=1"], "the CAS supplies"),
        (["run", "--cas", "http://x", "--cas-cert", str(world.cert), "--session", "a/b"], "starts with https://"),
    ]
    for args, message in cases:
        r = cli(*args, cwd=world.root, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, (args, r.stderr)


def test_a_commit_while_the_cas_is_down_fails_and_loses_nothing_committed(world: World) -> None:
    data = world.root / "down-data"
    data.mkdir()
    fspf = world.root / "down.fspf"
    assert cli("fspf", "create", fspf, cwd=world.root).returncode == 0
    assert cli("fspf", "addr", fspf, str(data), "--kind", "encrypted", cwd=world.root).returncode == 0
    tag = cli("fspf", "tag", fspf, cwd=world.root).stdout.strip()
    key = (world.root / "down.fspf.key").read_text().strip()
    write_app(
        world.root,
        f"""
        import os, sys, time
        p = os.path.join({str(data)!r}, "n")
        if sys.argv[1:] == ["read"]:
            print("n =", open(p).read())
            raise SystemExit
        for i in range(1, 200):
            try:
                with open(p, "w") as f:
                    f.write(str(i))
                    f.flush()
                    os.fsync(f.fileno())
                print("ok", i, flush=True)
            except OSError as e:
                print("error", i, e, flush=True)
                break
            time.sleep(0.05)
        """,
        "writer.py",
    )
    mre = world.measure()
    fspf_yaml = f"    fspf: {{path: {fspf}, key: {key}, tag: {tag}}}\n"
    created = world.owner("session", "create", str(world.policy("down", _service(mre, "[writer.py]", fspf_yaml))))
    assert created.returncode == 0, created.stderr
    las = f"127.0.0.1:{world.las.port}"
    app = subprocess.Popen(
        [*PYSCONE, "run", *world.pin, "--session", "down/app", "--las", las],
        cwd=world.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert app.stdout is not None
    first = app.stdout.readline()
    assert first == "ok 1\n", first + app.communicate()[1]
    port = world.cas.port
    world.cas.stop()  # the CAS goes away while the app keeps committing
    lines = [first]
    while not lines[-1].startswith("error"):
        line = app.stdout.readline()
        assert line, "the app ended without an error: " + app.communicate()[1]
        lines.append(line)
    app.wait(timeout=30)
    last_ok = int(lines[-2].split()[1])
    assert "the CAS" in lines[-1], lines[-1]
    world.cas = Service(["cas", "serve", "--dir", str(world.cas_dir), "--listen", f"127.0.0.1:{port}"], r":(\d+);")
    # The pin names the last commit the CAS took: the next start mounts it, with that value.
    reader = world.policy(
        "down", _service(mre, "[writer.py, read]", fspf_yaml), f"predecessor: {created.stdout.split()[-1]}\n"
    )
    assert world.owner("session", "update", str(reader)).returncode == 0
    read = world.run("down/app")
    # If the CAS went away between the two phases of the failed commit, that commit reached the
    # disk but was reported not durable (EIO): the next start may then mount it, or the one before.
    possible = {f"n = {last_ok}\n"} | ({f"n = {last_ok + 1}\n"} if "not durable" in lines[-1] else set())
    assert read.returncode == 0 and read.stdout in possible, (lines[-1], read.stdout, read.stderr)


def test_the_cas_admin_trusts_platforms_remotely_and_nobody_else_can(world: World) -> None:
    assert cli("keygen", "admin.pem", cwd=world.root).returncode == 0
    directory = world.root / "cas-admin"
    cas = Service(
        ["cas", "serve", "--dir", str(directory), "--listen", "127.0.0.1:0", "--admin", str(world.root / "admin.pem")],
        r":(\d+);",
    )
    try:
        pin = ["--cas", f"https://127.0.0.1:{cas.port}", "--cas-cert", str(directory / "cas-cert.pem")]
        r = cli("cas", "trust", "platform.pem", *pin, "--key", "owner.pem", cwd=world.root)
        assert r.returncode == 2 and r.stderr == "error: only the CAS admin may trust platforms\n"
        r = cli("cas", "trust", "platform.pem", "--note", "host 1", *pin, "--key", "admin.pem", cwd=world.root)
        assert r.returncode == 0, r.stderr
        platform = keys.load_public((world.root / "platform.pem").read_bytes())
        assert r.stdout == f"trusted platform {quote.platform_id(platform).hex()}\n"
        mre = cli("measure", *pin, cwd=world.root).stdout.strip()
        policy = world.policy("admin", _service(mre))
        assert cli("cas", "session", "create", str(policy), *pin, "--key", "owner.pem", cwd=world.root).returncode == 0
        las = f"127.0.0.1:{world.las.port}"
        run = cli("run", *pin, "--session", "admin/app", "--las", las, cwd=world.root)
        assert run.returncode == 0, run.stderr  # the platform trusted remotely attests
        pid = quote.platform_id(platform).hex()
        r = cli("cas", "distrust", pid, *pin, "--key", "owner.pem", cwd=world.root)
        assert r.returncode == 2 and r.stderr == "error: only the CAS admin may distrust platforms\n"
        r = cli("cas", "distrust", "platform.pem", *pin, "--key", "admin.pem", cwd=world.root)
        assert (r.returncode, r.stdout) == (0, f"distrusted platform {pid}\n"), r.stderr
        run = cli("run", *pin, "--session", "admin/app", "--las", las, cwd=world.root)
        assert run.returncode == 70  # the platform is no longer trusted
        r = cli("cas", "distrust", pid, "--dir", directory, cwd=world.root)
        assert r.returncode == 2 and r.stderr == f"error: platform {pid} is not trusted\n"
        assert cli("cas", "trust", "platform.pem", "--dir", directory, cwd=world.root).returncode == 0
        run = cli("run", *pin, "--session", "admin/app", "--las", las, cwd=world.root)
        assert run.returncode == 0, run.stderr  # trusted again, directly in the database
    finally:
        cas.stop()


def test_a_forked_child_of_an_attested_enclave_has_its_secrets_and_does_not_attest_again(world: World) -> None:
    write_app(
        world.root,
        """
        import os, sys
        pid = os.fork()
        if pid == 0:
            print("child", os.environ["TOKEN"] == sys.argv[1], len(sys.argv[1]), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent", os.environ["TOKEN"] == sys.argv[1])
        """,
        "forker.py",
    )
    mre = world.measure()
    policy = world.policy(
        "forking",
        _service(mre, '[forker.py, "${secret:tok}"]', "    env: {TOKEN: '${secret:tok}'}\n"),
        "secrets:\n  tok: {kind: password, length: 20}\n",
    )
    assert world.owner("session", "create", str(policy)).returncode == 0
    r = world.run("forking/app")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["child True 20", "parent True"]
    audit = world.owner("audit", "forking")
    assert audit.stdout.count(" attest  ok") == 1  # the family attested once: the child is no stranger
