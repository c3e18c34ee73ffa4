"""The network shield, adversarially: unmodified plain-TCP apps in the enclave, real TLS clients and
servers outside (curl, openssl s_client, redis-cli --tls, redis-server --tls-port, Python ssl), and a
recording relay in between that plays the host: it must carry only TLS records, never the app's
plaintext, and every refusal the shield makes must be the app's OSError, a log line, and no more.

The apps never import ssl: the shield (``pyscone run --net-shield FILE``, the dev-mode rule file;
see tests/netshield_pki.py for its shape) turns their listening ports into TLS servers and their
destinations into TLS clients. Two control tests run the same apps without the shield and show the
relay does see the plaintext then, so "the relay saw no secret" below means something.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, run_enclave, write_app
from netshield_apps import (
    ECHO_SERVER,
    STEPS,
    Host,
    fresh_secret,
    handshake_failure,
    need,
    plaintext_client,
    steps_of,
    tls_ctx,
    tls_line,
)
from netshield_pki import Pki, write_net_shield
from netshield_relay import is_listening


def _www(tmp_path: Path) -> tuple[bytes, bytes]:
    """A directory for http.server with one page: (the page's secret path, the secret in its body)."""
    path, marker = fresh_secret("path"), fresh_secret("body")
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / f"{path.decode()}.html").write_bytes(b"<p>" + marker + b"</p>\n")
    return path, marker


def _curl(port: int, path: bytes, *extra: str) -> subprocess.CompletedProcess[str]:
    url = f"https://localhost:{port}/{path.decode()}.html"
    return subprocess.run(
        ["curl", "-sS", "--resolve", f"localhost:{port}:127.0.0.1", *extra, url],
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- the controls: without the shield the relay sees everything -----------------------------------


def test_control_without_the_shield_the_relay_records_the_plaintext(tmp_path: Path, host: Host) -> None:
    need("curl")
    path, marker = _www(tmp_path)
    port = free_port()
    host.enclave(["-m", "http.server", port, "--bind", "127.0.0.1", "--directory", "www"], tmp_path, port)
    relay = host.relay(("127.0.0.1", port))
    r = subprocess.run(
        ["curl", "-sS", f"http://127.0.0.1:{relay.port}/{path.decode()}.html"], capture_output=True, timeout=30
    )
    assert marker in r.stdout, r.stderr
    assert path in relay.up() and marker in relay.down()
    with pytest.raises(AssertionError, match="TLS handshake record"):
        relay.assert_hidden(path, marker)
    # Outbound: the app's request and the server's reply cross the relay as they are.
    secret, reply = fresh_secret("request"), fresh_secret("reply")
    native = host.native(reply=reply + b" to ")
    out = host.relay(native.address)
    steps = steps_of(
        run_enclave(write_app(tmp_path, STEPS), secret.decode(), f"tcp:127.0.0.1:{out.port}", cwd=tmp_path)
    )
    assert steps[f"tcp:127.0.0.1:{out.port}"] == f"ok reply {reply.decode()} to request {secret.decode()}"
    assert secret in out.up() and reply in out.down()


# -- listened ports: real TLS clients, the host sees ciphertext -----------------------------------


def test_curl_gets_https_from_an_unmodified_http_server(tmp_path: Path, pki: Pki, host: Host) -> None:
    need("curl")
    path, marker = _www(tmp_path)
    port = free_port()
    # Relative names: resolved against the rule file's directory (the PKI's).
    cfg = write_net_shield(pki.root / "net.yaml", listen=[{"port": port, "cert": "server.pem", "key": "server.key"}])
    srv = host.enclave(
        ["--net-shield", cfg, "-m", "http.server", port, "--bind", "127.0.0.1", "--directory", "www"], tmp_path, port
    )
    relay = host.relay(("127.0.0.1", port))
    r = _curl(relay.port, path, "--cacert", str(pki.ca))
    assert r.returncode == 0 and r.stdout == f"<p>{marker.decode()}</p>\n", r.stderr
    relay.assert_hidden(path, marker, b"GET /", b"HTTP/1.")
    # The shield presents the configured identity: a client trusting another CA refuses it.
    bad = _curl(relay.port, path, "--cacert", str(pki.other_ca))
    assert bad.returncode != 0 and "certificate" in bad.stderr.lower(), bad.stderr
    code, _, err = srv.stop()
    assert code == 0, err[-3000:]
    # Dev mode says, loudly, that the keys come from the host's disk.
    assert re.search(r"^pyscone: warning: .*dev mode.*host", err, re.I | re.M), err[-3000:]
    assert f'GET /{path.decode()}.html HTTP/1.1" 200' in err  # the app itself saw the plaintext request


def test_openssl_s_client_with_a_client_certificate(tmp_path: Path, pki: Pki, host: Host) -> None:
    need("openssl")
    path, marker = _www(tmp_path)
    port = free_port()
    # Inline PEM text instead of paths.
    rule = {"port": port, "cert": pki.server.cert_pem, "key": pki.server.key_pem, "client_ca": pki.ca.read_text()}
    cfg = write_net_shield(tmp_path / "net.yaml", listen=[rule])
    host.enclave(
        ["--net-shield", cfg, "-m", "http.server", port, "--bind", "127.0.0.1", "--directory", "www"], tmp_path, port
    )
    relay = host.relay(("127.0.0.1", port))
    request = f"GET /{path.decode()}.html HTTP/1.0\r\nHost: localhost\r\n\r\n"
    r = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{relay.port}", "-servername", "localhost",
         "-CAfile", str(pki.ca), "-verify_return_error", "-cert", str(pki.client.cert), "-key", str(pki.client.key),
         "-ign_eof"],
        input=request, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in r.stdout, r.stdout + r.stderr
    assert re.search(r"Protocol\s*:\s*TLSv1\.[23]", r.stdout), r.stdout
    assert "HTTP/1.0 200 OK" in r.stdout and marker.decode() in r.stdout, r.stdout
    relay.assert_hidden(path, marker, b"GET /", b"HTTP/1.")


RESP_SERVER = """
    import asyncio, sys
    store = {}
    def bulk(value):
        return b"$-1\\r\\n" if value is None else b"$%d\\r\\n%s\\r\\n" % (len(value), value)
    async def handle(reader, writer):
        try:
            while line := await reader.readline():
                if line.startswith(b"*"):
                    args = []
                    for _ in range(int(line[1:])):
                        size = int((await reader.readline())[1:])
                        args.append((await reader.readexactly(size + 2))[:-2])
                else:
                    args = line.split()
                cmd = args[0].upper() if args else b""
                if cmd == b"PING":
                    writer.write(b"+PONG\\r\\n")
                elif cmd == b"SET":
                    store[args[1]] = args[2]
                    writer.write(b"+OK\\r\\n")
                elif cmd == b"GET":
                    writer.write(bulk(store.get(args[1])))
                elif cmd == b"COMMAND":
                    writer.write(b"*0\\r\\n")
                else:
                    writer.write(b"-ERR unknown command\\r\\n")
                await writer.drain()
        except OSError as e:
            print("client error:", type(e).__name__, flush=True)
        finally:
            writer.close()
    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
        async with srv:
            await srv.serve_forever()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
"""


def test_redis_cli_tls_reaches_a_plain_resp_server(tmp_path: Path, pki: Pki, host: Host) -> None:
    need("redis-cli")
    port = free_port()
    rule = {"port": port, "cert": pki.server.cert, "key": pki.server.key, "client_ca": pki.ca}
    cfg = write_net_shield(tmp_path / "net.yaml", listen=[rule])
    host.enclave(["--net-shield", cfg, write_app(tmp_path, RESP_SERVER), port], tmp_path, port)
    relay = host.relay(("127.0.0.1", port))
    key, value = fresh_secret("key"), fresh_secret("value")
    tls = ["--tls", "--cacert", str(pki.ca), "--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    cli = ["redis-cli", *tls, "--sni", "localhost", "-h", "127.0.0.1", "-p", str(relay.port)]
    for args, answer in ((["SET", key, value], b"OK"), (["GET", key], value), (["PING"], b"PONG")):
        r = subprocess.run([*cli, *args], capture_output=True, timeout=30)
        assert r.stdout.strip() == answer, r.stdout + r.stderr
    relay.assert_hidden(key, value, b"PONG", b"$3\r\nSET")


# -- destinations: the app speaks plain TCP to a TLS-only server ---------------------------------


def test_a_plain_socket_app_reaches_a_tls_server_with_a_client_certificate(
    tmp_path: Path, pki: Pki, host: Host
) -> None:
    secret, reply = fresh_secret("request"), fresh_secret("reply")
    native = host.native(ident=pki.server, client_ca=pki.ca, reply=reply + b" to ")
    relay = host.relay(native.address)
    dest = f"127.0.0.1:{relay.port}"  # server_name defaults to the host: the certificate's IP SAN
    rule = {"to": dest, "ca": pki.ca, "cert": pki.client.cert, "key": pki.client.key}
    cfg = write_net_shield(tmp_path / "net.yaml", connect=[rule])
    steps = steps_of(
        run_enclave(
            "--net-shield", cfg, write_app(tmp_path, STEPS), secret.decode(), f"tcp:{dest}", f"tcp:{dest}", cwd=tmp_path
        )
    )
    assert steps[f"tcp:{dest}"] == f"ok reply {reply.decode()} to request {secret.decode()}"
    assert [s.peer_cn for s in native.seen] == ["pyscone test client"] * 2, [s.error for s in native.seen]
    relay.assert_hidden(secret, reply, b"request ")


REDIS_CLIENT = """
    import sys, redis
    r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]), socket_timeout=20)
    r.set("shielded-key", sys.argv[2])
    print(r.get("shielded-key").decode(), r.incr("counter"), r.incr("counter"), flush=True)
"""


def test_redis_py_reaches_a_tls_only_redis_server(tmp_path: Path, pki: Pki, host: Host) -> None:
    need("redis-server")
    need("redis-cli")
    port = free_port()
    tls = ["--tls-cert-file", pki.server.cert, "--tls-key-file", pki.server.key, "--tls-ca-cert-file", pki.ca]
    args = ["redis-server", "--port", "0", "--tls-port", port, *tls, "--tls-auth-clients", "yes"]
    args += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp_path]
    server = host.process(subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    relay = host.relay(("127.0.0.1", port))

    for _ in range(200):
        if is_listening(port, None) or server.poll() is not None:
            break
        threading.Event().wait(0.05)
    assert server.poll() is None, "redis-server did not start (no TLS in this build?)"
    secret = fresh_secret("value")
    rule = {"to": f"127.0.0.1:{relay.port}", "ca": pki.ca, "server_name": "localhost"}
    rule |= {"cert": pki.client.cert, "key": pki.client.key}
    cfg = write_net_shield(tmp_path / "net.yaml", connect=[rule])
    r = run_enclave("--net-shield", cfg, write_app(tmp_path, REDIS_CLIENT), relay.port, secret.decode(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == f"{secret.decode()} 1 2\n"
    relay.assert_hidden(secret, b"shielded-key", b"counter")
    # It really is in the real server (read natively over TLS).
    cli = ["redis-cli", "--tls", "--cacert", str(pki.ca), "--cert", str(pki.client.cert), "--key", str(pki.client.key)]
    got = subprocess.run([*cli, "-p", str(port), "GET", "shielded-key"], capture_output=True, timeout=30)
    assert got.stdout.strip() == secret, got.stderr


def test_a_destination_named_by_host_name(tmp_path: Path, pki: Pki, host: Host) -> None:
    """A rule naming a host applies to the addresses the app itself resolved that name to; the name
    is what the server's certificate is checked against, and the SNI the server receives."""
    native = host.native(ident=pki.server)
    by_ip, by_name = f"tcp:127.0.0.1:{native.port}", f"tcp:localhost:{native.port}"
    cfg = write_net_shield(tmp_path / "net.yaml", connect=[{"to": f"localhost:{native.port}", "ca": pki.ca}])
    secret = fresh_secret("request")
    app = write_app(tmp_path, STEPS)
    # Before the app resolved "localhost", 127.0.0.1 is no listed destination.
    got = steps_of(run_enclave("--net-shield", cfg, app, secret.decode(), by_ip, cwd=tmp_path))
    assert got[by_ip].startswith("connect PermissionError EACCES"), got
    got = steps_of(run_enclave("--net-shield", cfg, app, secret.decode(), by_name, cwd=tmp_path))
    assert got[by_name] == f"ok reply reply request {secret.decode()}", got
    assert [(s.sni, s.line) for s in native.seen] == [("localhost", b"request " + secret + b"\n")]


def test_the_apps_half_close_becomes_a_close_notify(tmp_path: Path, pki: Pki, host: Host) -> None:
    """shutdown(SHUT_WR) after a request: the TLS server sees a clean end (close_notify), answers,
    and the app still reads the answer."""
    native = host.native(ident=pki.server, until_eof=True)
    relay = host.relay(native.address)
    dest = f"127.0.0.1:{relay.port}"
    cfg = write_net_shield(tmp_path / "net.yaml", connect=[{"to": dest, "ca": pki.ca}])
    secret = fresh_secret("request")
    got = steps_of(
        run_enclave("--net-shield", cfg, write_app(tmp_path, STEPS), secret.decode(), f"tcp-eof:{dest}", cwd=tmp_path)
    )
    assert got[f"tcp-eof:{dest}"] == f"ok reply reply request {secret.decode()}", got
    assert [(s.line, s.error) for s in native.seen] == [(b"request " + secret + b"\n", None)]
    relay.assert_hidden(secret)


# -- refusals on a listened port: the app sees ECONNRESET, others are still served ----------------


def _refused_then_served(
    tmp_path: Path, pki: Pki, host: Host, bad: Any, client_ca: bool = True
) -> tuple[bytes | str, str]:
    """Serve ECHO_SERVER behind a rule (client_ca: the good CA), run ``bad(port)`` -> (its local
    port, what it got), then a good client. Returns (what the bad client got, the log's reason)."""
    port = free_port()
    rule: dict[str, Any] = {"port": port, "cert": pki.server.cert, "key": pki.server.key}
    if client_ca:
        rule["client_ca"] = pki.ca
    cfg = write_net_shield(tmp_path / "net.yaml", listen=[rule])
    srv = host.enclave(["--net-shield", cfg, write_app(tmp_path, ECHO_SERVER), port], tmp_path, port)
    cport, got = bad(port)
    assert got != b"BAD CLIENT\n", "the shield let the bad client through to the app"
    assert not (isinstance(got, str) and got.startswith("TimeoutError")), "the refused connection was not closed"
    _, good = tls_line(("127.0.0.1", port), tls_ctx(pki, pki.client), b"good client\n")
    assert good == b"GOOD CLIENT\n", f"the enclave stopped serving after the refusal: {good!r}"
    srv.wait_stdout(f"peer {cport}: ")
    code, out, err = srv.stop()
    assert code == 0, err[-3000:]
    assert f"peer {cport}: ConnectionResetError ECONNRESET" in out.splitlines(), out
    assert "Traceback" not in err, err[-3000:]
    return got, handshake_failure(err, cport, port)


def test_refused_a_client_without_a_certificate(tmp_path: Path, pki: Pki, host: Host) -> None:
    got, reason = _refused_then_served(
        tmp_path, pki, host, lambda port: tls_line(("127.0.0.1", port), tls_ctx(pki), b"bad client\n")
    )
    assert isinstance(got, str), got  # an alert (certificate required) or the connection's end
    assert "certificate" in reason.lower(), reason


def test_refused_a_client_certificate_from_another_ca(tmp_path: Path, pki: Pki, host: Host) -> None:
    got, reason = _refused_then_served(
        tmp_path, pki, host, lambda port: tls_line(("127.0.0.1", port), tls_ctx(pki, pki.other_client), b"bad client\n")
    )
    assert isinstance(got, str), got
    assert "certificate" in reason.lower() or "unknown ca" in reason.lower(), reason


def test_refused_a_plaintext_client_on_a_shielded_port(tmp_path: Path, pki: Pki, host: Host) -> None:
    got, reason = _refused_then_served(tmp_path, pki, host, plaintext_client, client_ca=False)
    assert isinstance(got, bytes) and b"BAD CLIENT" not in got, got  # at most a TLS alert, then the end
    assert reason.strip(), "the log must say why"


def test_refused_a_tls_1_1_client(tmp_path: Path, pki: Pki, host: Host) -> None:
    """The wire carries TLS 1.2 or 1.3 only, whatever an old client offers."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(pki.ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL offer TLS 1.1 at all
    got, reason = _refused_then_served(
        tmp_path, pki, host, lambda port: tls_line(("127.0.0.1", port), old, b"bad client\n"), client_ca=False
    )
    assert isinstance(got, str), got
    assert "protocol" in reason.lower() or "version" in reason.lower(), reason


# -- refusals of destinations: ECONNABORTED from connect(), others still reached ------------------


def _destinations(tmp_path: Path, pki: Pki, host: Host, bad: list[dict[str, Any]]) -> tuple[dict[str, str], str, str]:
    """Run STEPS against each bad rule's destination, then a good TLS destination."""
    secret = fresh_secret("request")
    good = host.native(ident=pki.server)
    good_rule = {"to": f"127.0.0.1:{good.port}", "ca": pki.ca, "server_name": "localhost"}
    cfg = write_net_shield(tmp_path / "net.yaml", connect=[*bad, good_rule])
    args = [f"tcp:{rule['to']}" for rule in bad] + [f"tcp:127.0.0.1:{good.port}"]
    r = run_enclave("--net-shield", cfg, write_app(tmp_path, STEPS), secret.decode(), *args, cwd=tmp_path, timeout=45)
    steps = steps_of(r)
    assert steps[args[-1]] == f"ok reply reply request {secret.decode()}", "the good destination after the bad ones"
    assert [x.sni for x in good.seen] == ["localhost"]  # the rule's server_name, sent as SNI
    return steps, r.stderr, secret.decode()


def _aborted(steps: dict[str, str], err: str, to: str) -> str:
    """The app's connect() failed with ECONNABORTED and the shield logged it; returns the reason."""
    got = steps[f"tcp:{to}"]
    assert got.startswith("connect ConnectionAbortedError ECONNABORTED "), got
    assert f"network shield: TLS to {to} failed: " in got, got
    lines = [ln for ln in err.splitlines() if ln.startswith(f"pyscone: network shield: TLS to {to} failed: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0].lower()


def test_refused_a_server_certificate_from_another_ca(tmp_path: Path, pki: Pki, host: Host) -> None:
    impostor = host.native(ident=pki.other_server)
    to = f"127.0.0.1:{impostor.port}"
    steps, err, _ = _destinations(tmp_path, pki, host, [{"to": to, "ca": pki.ca, "server_name": "localhost"}])
    assert "certificate verify failed" in _aborted(steps, err, to)
    assert impostor.lines() == [], "the request reached a server the rule's CA did not sign"


def test_refused_a_server_certificate_with_the_wrong_name(tmp_path: Path, pki: Pki, host: Host) -> None:
    impostor = host.native(ident=pki.wrong_name)  # signed by the right CA, for wrong-name.example
    by_name = f"127.0.0.1:{impostor.port}"
    by_ip = f"127.0.0.1:{host.relay(impostor.address).port}"  # the default name: the IP, not in its SANs
    rules = [{"to": by_name, "ca": pki.ca, "server_name": "localhost"}, {"to": by_ip, "ca": pki.ca}]
    steps, err, _ = _destinations(tmp_path, pki, host, rules)
    assert "mismatch" in _aborted(steps, err, by_name)
    assert "mismatch" in _aborted(steps, err, by_ip)
    assert impostor.lines() == []
