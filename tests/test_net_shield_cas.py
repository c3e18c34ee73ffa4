"""The network shield in production: its rules and its server identity come from the CAS.

The session's policy gives the service a listening rule whose certificate and key are an x509
secret the CAS made; the host passes nothing.  A real client (curl) trusts the session's CA, which
the owner reads with ``pyscone cas session show --ca``, and gets the app's page over TLS, while
the app itself is the stdlib's plain ``http.server``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from conftest import PYSCONE, free_port, wait_port
from test_cas import World, _service


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("net-cas"))
    (w.root / "page.txt").write_text("the page MARKER-7f3e\n")
    yield w
    w.stop()


def _network(port: int, unlisted: str = "refuse") -> str:
    return (
        "    network:\n"
        "      listen:\n"
        f"        - port: {port}\n"
        "          cert: '${secret:web.cert}'\n"
        "          key: '${secret:web.key}'\n"
        f"      unlisted: {unlisted}\n"
    )


def test_an_attested_server_gets_its_tls_identity_and_rules_from_the_cas(world: World) -> None:
    mre = world.measure()
    port = free_port()
    argv = f'["-m", "http.server", "{port}", "--bind", "127.0.0.1"]'
    secrets = "secrets:\n  web: {kind: x509, common_name: localhost}\n"
    policy = world.policy("net", _service(mre, argv, _network(port)), secrets)
    created = world.owner("session", "create", str(policy))
    assert created.returncode == 0, created.stderr
    shown = world.owner("session", "show", "net", "--ca")
    assert shown.returncode == 0 and shown.stdout.startswith("-----BEGIN CERTIFICATE-----"), shown.stderr
    (world.root / "session-ca.pem").write_text(shown.stdout)
    las = f"127.0.0.1:{world.las.port}"
    proc = subprocess.Popen(
        [*PYSCONE, "run", *world.pin, "--session", "net/app", "--las", las],
        cwd=world.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(port, proc=proc)
        url = f"https://localhost:{port}/page.txt"
        ok = subprocess.run(
            ["curl", "-sS", "--cacert", "session-ca.pem", url], cwd=world.root, capture_output=True, text=True
        )
        assert (ok.returncode, ok.stdout) == (0, "the page MARKER-7f3e\n"), ok.stderr
        # Without the session's CA the certificate is not trusted; in plaintext the port speaks TLS.
        untrusted = subprocess.run(["curl", "-sS", url], capture_output=True, text=True)
        assert untrusted.returncode == 60, untrusted.stderr
        plain = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{port}/page.txt"], capture_output=True, text=True)
        assert plain.returncode != 0 and "MARKER" not in plain.stdout
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "TLS handshake failed" in err, err
    assert "dev mode" not in err  # nothing came from the host


def test_a_policy_with_bad_network_rules_is_refused_with_its_line(world: World) -> None:
    mre = world.measure()
    bad = _network(443).replace("unlisted: refuse", "unlisted: maybe")
    policy = world.policy("badnet", _service(mre, "[app.py]", bad), "secrets:\n  web: {kind: x509}\n")
    r = world.owner("session", "create", str(policy))
    assert r.returncode != 0
    assert "line 12: services.app.network: unlisted: expected refuse or allow" in r.stderr, r.stderr
    undefined = world.policy("badnet2", _service(mre, "[app.py]", _network(443)))
    r = world.owner("session", "create", str(undefined))
    assert r.returncode != 0 and "undefined secret 'web'" in r.stderr, r.stderr
