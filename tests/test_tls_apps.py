"""``ssl`` for apps: CA bundles, certificate chains and keys loaded through the enclave, TLS over
enclave sockets; real clients (curl, openssl s_client) and real servers on loopback."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Server, free_port, run_enclave, write_app
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_fs_shield import FS

PASSWORD = "s3cret-pass"


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path
    key_pem: bytes
    encrypted_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_pki(root: Path) -> Pki:
    """A private CA, a server certificate for localhost/127.0.0.1 and its key, and an unrelated CA."""
    root.mkdir(exist_ok=True)
    ca_key, ca = _ca("pyscone test CA")
    _, other = _ca("some other CA")
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pki = Pki(root / "ca.pem", root / "other-ca.pem", root / "cert.pem", root / "key.pem", b"", root / "ekey.pem")
    pki.ca.write_bytes(ca.public_bytes(pem))
    pki.other_ca.write_bytes(other.public_bytes(pem))
    pki.cert.write_bytes(cert.public_bytes(pem))
    pki.key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pki.key.write_bytes(pki.key_pem)
    enc = serialization.BestAvailableEncryption(PASSWORD.encode())
    pki.encrypted_key.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, enc))
    return pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run scripts/setup.sh")


# -- (a) the default CA bundle -----------------------------------------------------------------

CA_COUNTS = """
    import json, ssl
    out = {"default": ssl.create_default_context().cert_store_stats()["x509_ca"]}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_default_certs()
    out["load_default_certs"] = ctx.cert_store_stats()["x509_ca"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_default_verify_paths()
    out["set_default_verify_paths"] = ctx.cert_store_stats()["x509_ca"]
    try:
        import certifi
    except ImportError:
        pass
    else:
        out["certifi"] = ssl.create_default_context(cafile=certifi.where()).cert_store_stats()["x509_ca"]
    print(json.dumps(out))
"""


def test_the_default_context_loads_the_system_cas_like_native_python(tmp_path: Path) -> None:
    app = write_app(tmp_path, CA_COUNTS)
    native = subprocess.run([sys.executable, str(app)], capture_output=True, text=True, timeout=60)
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    counts, expected = json.loads(r.stdout), json.loads(native.stdout)
    assert counts["default"] > 0
    assert counts == expected


# -- (b) an HTTPS server in the enclave --------------------------------------------------------

HTTPS_SERVER = """
    import http.server, ssl, sys
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key, password=sys.argv[4] if len(sys.argv) > 4 else None)
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"hello over TLS from the enclave\\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), Hello)
    srv.daemon_threads = True
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
"""


def _curl(port: int, ca: Path) -> subprocess.CompletedProcess[str]:
    url = f"https://localhost:{port}/"
    return subprocess.run(
        ["curl", "-sS", "--cacert", str(ca), "--resolve", f"localhost:{port}:127.0.0.1", url],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _s_client(port: int, ca: Path) -> str:
    r = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-CAfile", str(ca)],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    return r.stdout


def test_an_https_server_in_the_enclave_serves_curl_and_openssl(tmp_path: Path, pki: Pki, server: list[Server]) -> None:
    _need("curl")
    _need("openssl")
    app = write_app(tmp_path, HTTPS_SERVER)
    port = free_port()
    server.append(Server([str(app), str(port), str(pki.cert), str(pki.encrypted_key), PASSWORD], tmp_path, port))
    r = _curl(port, pki.ca)
    assert r.stdout == "hello over TLS from the enclave\n", r.stderr
    out = _s_client(port, pki.ca)
    assert "Verify return code: 0 (ok)" in out, out
    # The wrong CA: curl refuses the enclave's certificate (verification is real).
    bad = _curl(port, pki.other_ca)
    assert bad.returncode != 0 and "certificate" in bad.stderr.lower()
    code, _, err = server.pop().stop()
    assert code == 0, err


def test_the_servers_key_can_live_in_an_encrypted_region(tmp_path: Path, pki: Pki, server: list[Server]) -> None:
    _need("curl")
    fs = FS(tmp_path)
    fs.add(fs.enc / "key.pem", pki.key_pem)
    fs.add(fs.enc / "cert.pem", pki.cert.read_bytes())
    # What the host holds for the key is ciphertext.
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in fs.enc.rglob("*") if p.is_file())
    app = write_app(tmp_path, HTTPS_SERVER)
    port = free_port()
    args = ["--fspf", str(fs.fspf), str(app), str(port), str(fs.enc / "cert.pem"), str(fs.enc / "key.pem")]
    server.append(Server(args, tmp_path, port))
    r = _curl(port, pki.ca)
    assert r.stdout == "hello over TLS from the enclave\n", r.stderr
    code, _, err = server.pop().stop()
    assert code == 0, err
    assert not any(
        b"PRIVATE KEY" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "pki" not in p.parts
    )


BAD_CHAINS = """
    import ssl, sys
    cert, key, other = sys.argv[1:4]
    for args in ((cert, other), (cert, key + ".missing"), (cert, sys.argv[4]), (cert, sys.argv[4], "wrong")):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(*args)
        except (ssl.SSLError, OSError) as e:
            print(type(e).__name__)
        else:
            print("loaded")
"""


def test_bad_chains_and_keys_fail_cleanly(tmp_path: Path, pki: Pki) -> None:
    app = write_app(tmp_path, BAD_CHAINS)
    r = run_enclave(app, pki.cert, pki.key, pki.other_ca, pki.encrypted_key, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # A certificate where the key should be, a missing key, an encrypted key without and with
    # a wrong password: as native Python, an SSLError or FileNotFoundError, never a prompt.
    assert r.stdout.split() == ["SSLError", "FileNotFoundError", "SSLError", "SSLError"]


# -- (c) HTTPS clients in the enclave ----------------------------------------------------------


@pytest.fixture
def native_https(pki: Pki) -> Iterator[int]:
    """An HTTPS server run natively by the test, with the private CA's certificate."""

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"x" * 100_000 if self.path == "/big" else b"native says hi"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert, pki.key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield int(srv.server_address[1])
    srv.shutdown()
    srv.server_close()


CLIENTS = """
    import ssl, sys, urllib.request
    url, ca, other = f"https://localhost:{sys.argv[1]}/", sys.argv[2], sys.argv[3]
    def clients(cafile):
        yield "urllib", lambda: urllib.request.urlopen(url, context=ssl.create_default_context(cafile=cafile), timeout=10).read()
        try:
            import requests
            yield "requests", lambda: requests.get(url, verify=cafile, timeout=10).content
        except ImportError:
            pass
        try:
            import httpx
            yield "httpx", lambda: httpx.get(url, verify=ssl.create_default_context(cafile=cafile), timeout=10).content
        except ImportError:
            pass
        try:
            import urllib3
            yield "urllib3", lambda: urllib3.PoolManager(ca_certs=cafile).request("GET", url, timeout=10).data
        except ImportError:
            pass
    for name, get in clients(ca):
        print(name, get().decode())
    for name, get in clients(other):
        try:
            get()
        except Exception as e:
            # Each library wraps it its own way (URLError.reason, MaxRetryError.reason, __cause__).
            seen, todo = [], [e]
            while todo:
                x = todo.pop(0)
                if isinstance(x, BaseException) and x not in seen:
                    seen.append(x)
                    todo += [x.__cause__, x.__context__, getattr(x, "reason", None), *x.args]
            found = [x for x in seen if isinstance(x, ssl.SSLCertVerificationError)]
            print(name, "refused", type(found[0]).__name__ if found else repr(e), found[0].verify_message if found else "")
        else:
            print(name, "accepted the wrong CA")
"""


def test_https_clients_in_the_enclave_verify_with_a_private_ca(tmp_path: Path, pki: Pki, native_https: int) -> None:
    app = write_app(tmp_path, CLIENTS)
    r = run_enclave(app, str(native_https), pki.ca, pki.other_ca, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    names = ["urllib"] + [m for m in ("requests", "httpx", "urllib3") if _importable(m)]
    assert [ln for ln in lines if "native says hi" in ln] == [f"{n} native says hi" for n in names], r.stdout
    refused = [ln for ln in lines if "refused" in ln]
    assert refused == [f"{n} refused SSLCertVerificationError unable to get local issuer certificate" for n in names]


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


FLIPPED = """
    import ssl, sys, urllib.request
    url = f"https://localhost:{sys.argv[1]}/big"
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    try:
        body = urllib.request.urlopen(url, context=ctx, timeout=10).read()
    except ssl.SSLError as e:
        print("refused:", e.reason)
    else:
        print("read", len(body), "bytes", set(body))
"""


def test_ciphertext_the_host_changes_is_a_clean_ssl_error(tmp_path: Path, pki: Pki, native_https: int) -> None:
    app = write_app(tmp_path, FLIPPED)
    env = {"PYTHONPATH": str(Path(__file__).parent), "PYSCONE_TEST_HOSTILE": "py:tls_liars:FlipCiphertext"}
    r = run_enclave(app, str(native_https), pki.ca, cwd=tmp_path, env=env)
    assert "pyscone-test: lied: flipped a byte" in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    assert r.stdout == "refused: DECRYPTION_FAILED_OR_BAD_RECORD_MAC\n"
    assert "Traceback" not in r.stderr
