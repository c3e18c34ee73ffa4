"""The compatibility matrix: ordinary apps on popular packages, each run natively and in an enclave.

A case is one small app from ``tests/compat/apps/`` (written the way its package's documentation
shows, never adapted to pyscone), the command line that starts it (``python ARGV`` natively,
``pyscone run ARGV`` in the enclave, the same ARGV), and a check: for a script, a string its own
output must contain; for a server, what a real HTTP client (``urllib``, or ``wrk`` in the report)
must get back.  Client apps talk to a fixture the driver starts on loopback: an HTTP server, an
HTTPS server whose certificate a private CA signed, or a real ``redis-server``.

``test_compat.py`` runs every case under pytest (marker ``compat``); ``report.py`` runs them all,
measures the servers with ``wrk`` and writes ``docs/compatibility.md`` and ``expected.json`` (what
today's runtime does: the pytest run fails a case expected to work that does not).
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
ROOT = HERE.parent.parent
EXPECTED_JSON = HERE / "expected.json"
PYTHON = sys.executable
PYSCONE = [PYTHON, "-m", "pyscone.cli", "run"]
MODES = ("native", "enclave")


@dataclass(frozen=True)
class Case:
    name: str
    covers: str  # what a reader of docs/compatibility.md looks for: the package and what is exercised
    files: tuple[str, ...]  # copied from apps/ into the case's fresh working directory
    argv: tuple[str, ...]  # after ``python`` / ``pyscone run``; {port} {url} {ca} {cert} {key} are filled in
    expect: str  # the script's stdout, or the server's response body, must contain this
    server: bool = False
    path: str = "/"  # for a server: what the client asks for
    https: bool = False  # the server itself speaks HTTPS (certificate from the private CA)
    fixture: str | None = None  # "http", "https", "redis" or "postgres": what a client app connects to
    timeout: float = 60.0
    # The app speaks plain HTTP; in the enclave the network shield carries it over TLS (a server:
    # its port is a listening rule, and the client checks the server against the private CA; a
    # client: its fixture speaks only HTTPS and a connect rule reaches it).  Natively: plain HTTP.
    shielded: bool = False


def _server(name: str, covers: str, files: tuple[str, ...], argv: tuple[str, ...], expect: str, **kw: object) -> Case:
    return Case(name, covers, files, argv, expect, server=True, **kw)  # type: ignore[arg-type]


DJANGO = ("django_site",)
# One case, one or two lines: the table reads as a table.
# fmt: off
CASES: tuple[Case, ...] = (
    # ---- web servers, driven by an HTTP client
    _server("flask-waitress", "Flask app served by waitress", ("flask_waitress.py",),
        ("flask_waitress.py", "{port}"), "hello from flask on waitress"),
    _server("flask-json", "Flask JSON route on waitress", ("flask_waitress.py",),
        ("flask_waitress.py", "{port}"), '"items":[0,1,2]', path="/api/items/3"),
    _server("flask-devserver", "Flask dev server (app.run, werkzeug)", ("flask_devserver.py",),
        ("flask_devserver.py", "{port}"), "hello from the flask dev server"),
    _server("flask-gunicorn", "Flask on gunicorn, 2 pre-fork sync workers (os.fork)", ("flask_gunicorn.py",),
        ("-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:{port}", "flask_gunicorn:app"), "hello from flask on gunicorn"),
    _server("flask-cli-run", "flask run (python -m flask, entry points)", ("flask_cli_app.py",),
        ("-m", "flask", "--app", "flask_cli_app", "run", "--port", "{port}", "--no-reload"), "hello from flask run"),
    _server("django-runserver", "Django manage.py runserver --noreload", DJANGO,
        ("django_site/manage.py", "runserver", "--noreload", "--settings", "mysite.settings_nodb", "127.0.0.1:{port}"), "hello from django"),
    _server("django-runserver-reload", "Django manage.py runserver with its auto-reloader (a spawned child)", DJANGO,
        ("django_site/manage.py", "runserver", "--settings", "mysite.settings_nodb", "127.0.0.1:{port}"), "hello from django",
        timeout=120.0),
    _server("django-admin", "Django admin login page (templates, CSRF, sessions)", DJANGO,
        ("django_site/manage.py", "runserver", "--noreload", "--settings", "mysite.settings_nodb", "127.0.0.1:{port}"), "Django administration", path="/admin/login/"),
    _server("fastapi-uvicorn", "FastAPI + pydantic on uvicorn.run", ("fastapi_uvicorn.py",),
        ("fastapi_uvicorn.py", "{port}"), '"hello":"from fastapi on uvicorn"'),
    _server("uvicorn-workers", "FastAPI on uvicorn --workers 2 (spawned worker enclaves)", ("fastapi_uvicorn.py",),
        ("-m", "uvicorn", "fastapi_uvicorn:app", "--workers", "2", "--port", "{port}"), '"hello":"from fastapi on uvicorn"',
        timeout=120.0),
    _server("fastapi-orjson", "FastAPI ORJSONResponse on uvicorn", ("fastapi_orjson.py",),
        ("fastapi_orjson.py", "{port}"), '"hello":"from fastapi with orjson"'),
    _server("fastapi-hypercorn", "FastAPI on hypercorn (asyncio serve)", ("fastapi_hypercorn.py",),
        ("fastapi_hypercorn.py", "{port}"), '"hello":"from fastapi on hypercorn"'),
    _server("starlette-uvicorn-cli", "Starlette via python -m uvicorn", ("starlette_app.py",),
        ("-m", "uvicorn", "starlette_app:app", "--port", "{port}", "--log-level", "warning"), "hello from starlette"),
    _server("starlette-hypercorn-cli", "Starlette via python -m hypercorn", ("starlette_app.py",),
        ("-m", "hypercorn", "starlette_app:app", "--bind", "127.0.0.1:{port}"), "hello from starlette"),
    _server("uvicorn-uvloop-installed", "uvicorn.run, loop=auto with uvloop installed (the enclave refuses uvloop: asyncio)",
        ("uvicorn_loop.py",), ("uvicorn_loop.py", "{port}"), "hello from uvicorn on "),
    _server("uvicorn-https", "uvicorn with ssl_certfile/ssl_keyfile", ("uvicorn_https.py",),
        ("uvicorn_https.py", "{port}", "{cert}", "{key}"), "hello from uvicorn over https", https=True),
    _server("aiohttp-server", "aiohttp web.run_app", ("aiohttp_server.py",),
        ("aiohttp_server.py", "{port}"), "hello from aiohttp"),
    _server("tornado", "tornado Application on asyncio", ("tornado_server.py",),
        ("tornado_server.py", "{port}"), "hello from tornado"),
    _server("bottle", "bottle run() (wsgiref)", ("bottle_server.py",),
        ("bottle_server.py", "{port}"), "hello from bottle"),
    _server("cherrypy", "CherryPy quickstart (cheroot)", ("cherrypy_server.py",),
        ("cherrypy_server.py", "{port}"), "hello from cherrypy"),
    _server("falcon-wsgiref", "falcon App on wsgiref.simple_server", ("falcon_wsgiref.py",),
        ("falcon_wsgiref.py", "{port}"), "hello from falcon"),
    _server("falcon-waitress", "falcon App on waitress", ("falcon_waitress.py",),
        ("falcon_waitress.py", "{port}"), '"hello": "from falcon on waitress"'),
    _server("asyncio-streams", "asyncio.start_server (stdlib baseline)", ("asyncio_server.py",),
        ("asyncio_server.py", "{port}"), "hello from asyncio streams"),
    _server("http-server", "python -m http.server (stdlib baseline)", ("sample.json",),
        ("-m", "http.server", "--bind", "127.0.0.1", "{port}"), '"a": "text"', path="/sample.json"),
    # ---- the same servers, HTTPS by the network shield (the app unchanged, plain HTTP natively)
    _server("flask-waitress-shielded", "Flask on waitress, HTTPS by the network shield", ("flask_waitress.py",),
        ("flask_waitress.py", "{port}"), "hello from flask on waitress", shielded=True),
    _server("fastapi-uvicorn-shielded", "FastAPI on uvicorn, HTTPS by the network shield", ("fastapi_uvicorn.py",),
        ("fastapi_uvicorn.py", "{port}"), '"hello":"from fastapi on uvicorn"', shielded=True),
    _server("django-shielded", "Django runserver, HTTPS by the network shield", DJANGO,
        ("django_site/manage.py", "runserver", "--noreload", "--settings", "mysite.settings_nodb", "127.0.0.1:{port}"), "hello from django", shielded=True),
    # ---- clients, against a fixture on loopback
    Case("requests-http", "requests Session over HTTP", ("requests_http.py",),
        ("requests_http.py", "{url}"), "200 hello from the fixture", fixture="http"),
    Case("requests-https-ca", "requests over HTTPS, verify= a private CA", ("requests_https_ca.py",),
        ("requests_https_ca.py", "{url}", "{ca}"), "200 hello from the fixture", fixture="https"),
    Case("httpx-sync", "httpx.Client over HTTP", ("httpx_sync.py",),
        ("httpx_sync.py", "{url}"), "200 hello from the fixture", fixture="http"),
    Case("requests-shielded", "requests over plain HTTP to an HTTPS-only server, by a connect rule", ("requests_http.py",),
        ("requests_http.py", "{url}"), "200 hello from the fixture", fixture="http", shielded=True),
    Case("httpx-async", "httpx.AsyncClient, 5 concurrent requests", ("httpx_async.py",),
        ("httpx_async.py", "{url}"), "5 hello from the fixture", fixture="http"),
    Case("httpx-https-ca", "httpx over HTTPS, ssl context from a private CA", ("httpx_https_ca.py",),
        ("httpx_https_ca.py", "{url}", "{ca}"), "200 hello from the fixture", fixture="https"),
    Case("urllib3-https-ca", "urllib3 PoolManager over HTTPS, ca_certs= a private CA", ("urllib3_https_ca.py",),
        ("urllib3_https_ca.py", "{url}", "{ca}"), "200 hello from the fixture", fixture="https"),
    Case("urllib3-https-certifi", "urllib3 with certifi's roots (loads them, rejects a private server)", ("urllib3_https_certifi.py",),
        ("urllib3_https_certifi.py", "{url}"), "roots>100=True private server rejected", fixture="https"),
    Case("urllib-request", "urllib.request (stdlib baseline)", ("urllib_request.py",),
        ("urllib_request.py", "{url}"), "200 hello from the fixture", fixture="http"),
    Case("aiohttp-client", "aiohttp ClientSession", ("aiohttp_client.py",),
        ("aiohttp_client.py", "{url}"), "200 hello from the fixture", fixture="http"),
    Case("redis", "redis-py against a real redis-server", ("redis_client.py",),
        ("redis_client.py", "{port}"), "hello from redis 5 2", fixture="redis"),
    # ---- libraries and the standard library, checked by the app's own output
    Case("pydantic", "pydantic v2 models, validation errors, JSON", ("pydantic_models.py",),
        ("pydantic_models.py",), '42 1815 {"id":42,"name":"Ada","born":"1815-12-10","tags":["math"]} errors: 3'),
    Case("jinja2", "jinja2 FileSystemLoader, autoescape", ("jinja2_templates.py", "templates"),
        ("jinja2_templates.py",), "<li>APPLE</li><li>PEAR</li></ul> &lt;script&gt;"),
    Case("pyyaml", "PyYAML safe_dump/safe_load to a file", ("pyyaml_docs.py",),
        ("pyyaml_docs.py",), "roundtrip True 2"),
    Case("pyyaml-libyaml", "PyYAML's libyaml CSafeLoader (no silent fallback)", ("pyyaml_cloader.py",),
        ("pyyaml_cloader.py",), "libyaml True {'a': [1, 2]}"),
    Case("c-speedups", "optional C speed-ups: markupsafe, multidict, aiohttp's HTTP parser", ("speedups.py",),
        ("speedups.py",), "markupsafe True multidict True aiohttp-parser True"),
    Case("cryptography", "cryptography AES-GCM, Ed25519, an X.509 certificate", ("cryptography_ops.py",),
        ("cryptography_ops.py",), "attack at dawn ed25519 ok CN=compat.example"),
    Case("orjson", "orjson dumps/loads", ("orjson_roundtrip.py",),
        ("orjson_roundtrip.py",), '"when":"2024-01-02T03:04:05"'),
    Case("numpy", "numpy linalg, fft, random", ("numpy_compute.py",),
        ("numpy_compute.py",), "identity True peak 4"),
    Case("numpy-save", "numpy save/load, savez_compressed, savetxt", ("numpy_save.py",),
        ("numpy_save.py",), "equal True True (2, 100)"),
    Case("pandas", "pandas groupby, date_range, rolling", ("pandas_compute.py",),
        ("pandas_compute.py",), "{'a': 10, 'b': 7, 'c': 4} 17.5"),
    Case("pandas-csv", "pandas to_csv/read_csv, to_json/read_json", ("pandas_csv.py",),
        ("pandas_csv.py",), "csv True json 100 15"),
    Case("pillow", "Pillow draw, blur, PNG and JPEG save/open", ("pillow_images.py",),
        ("pillow_images.py",), "PNG (120, 80) JPEG"),
    Case("lxml-parse-file", "lxml (libxml2, zlib) write/parse/iterparse of .xml and .xml.gz files", ("lxml_files.py",),
        ("lxml_files.py",), "lxml UTF-8 400 entry 399 400 400 111.0 True"),
    Case("matplotlib", "matplotlib Agg to PNG", ("matplotlib_agg.py",),
        ("matplotlib_agg.py",), "png True", timeout=90),
    Case("logging-rotating", "logging RotatingFileHandler, TimedRotatingFileHandler", ("logging_rotating.py",),
        ("logging_rotating.py",), "files ['app.log', 'app.log.1', 'app.log.2', 'app.log.3'] 200"),
    Case("shelve-dbm", "shelve and dbm", ("shelve_dbm.py",),
        ("shelve_dbm.py",), "shelve 42 ['a', 'b']"),
    Case("zipfile-tarfile", "zipfile and tarfile write/extract", ("zip_tar.py",),
        ("zip_tar.py",), "zip 5 tar 5 True"),
    Case("shutil-trees", "shutil copy2, copytree, move, make_archive, rmtree", ("shutil_trees.py",),
        ("shutil_trees.py",), "copy2 mode 0o640 restored two tree3 gone True disk True"),
    Case("json-tool", "python -m json.tool", ("sample.json",),
        ("-m", "json.tool", "--sort-keys", "sample.json"), '"a": "text",'),
    Case("pytest", "pytest running a small suite (fixtures, parametrize, tmp_path)", ("pytest_suite",),
        ("-m", "pytest", "-q", "-p", "no:cacheprovider", "pytest_suite/check_sample.py"), "6 passed"),
    Case("threads", "concurrent.futures thread pool, queue, locks", ("threads_pool.py",),
        ("threads_pool.py",), "threads 4950 100 {64}"),
    Case("multiprocessing-fork", "multiprocessing Pool, ProcessPoolExecutor, Queue, Process (fork)", ("process_pools.py",),
        ("process_pools.py", "fork"), "fork 328350 328350 from a child 0"),
    Case("multiprocessing-spawn", "the same with the spawn start method (fresh child enclaves)", ("process_pools.py",),
        ("process_pools.py", "spawn"), "spawn 328350 328350 from a child 0", timeout=120.0),
    Case("multiprocessing-forkserver", "the same with the forkserver start method (descriptors passed with SCM_RIGHTS)",
        ("process_pools.py",), ("process_pools.py", "forkserver"), "forkserver 328350 328350 from a child 0",
        timeout=120.0),
    Case("sqlite3", "sqlite3 (a C library doing its own I/O: the next issue)", ("sqlite_stdlib.py",),
        ("sqlite_stdlib.py",), "sqlite 3"),
    Case("django-migrate", "Django manage.py migrate on SQLite", DJANGO,
        ("django_site/manage.py", "migrate", "--noinput"), "Applying auth.0001_initial... OK", timeout=90),
    Case("django-orm-sqlite", "Django ORM on SQLite: migrate, CRUD, a rolled-back transaction (settings in code)",
        ("django_orm",), ("django_orm/orm.py",), "orm 50 [('ada', 25), ('bob', 25)] 75"),
    Case("django-migrate-postgres", "Django manage.py migrate on PostgreSQL (psycopg, libpq)", DJANGO,
        ("django_site/manage.py", "migrate", "--noinput", "--settings", "mysite.settings_pg"),
        "Applying auth.0001_initial... OK", fixture="postgres", timeout=90),
    Case("subprocess", "subprocess.run of python, its output captured (a spawned child enclave)", ("subprocess_run.py",),
        ("subprocess_run.py",), "subprocess child"),
)
# fmt: on
BY_NAME = {c.name: c for c in CASES}


# --------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    ok: bool
    error: str = ""  # the one line a user sees when it does not work
    seconds: float = 0.0
    detail: str = ""  # more of the output, for a failing test's message

    @property
    def label(self) -> str:
        return "works" if self.ok else "fails"


def expected() -> dict[str, dict[str, str]]:
    """What the last report run found, per case: {"enclave": "works"|"fails", "error": ...}."""
    try:
        data: dict[str, dict[str, str]] = json.loads(EXPECTED_JSON.read_text())
    except FileNotFoundError:
        return {}
    return data


def sanitize(text: str, workdir: Path | None = None) -> str:
    """No path of this machine in a report: the case's directory, the repository and the venv are named."""
    if workdir is not None:
        text = text.replace(str(workdir), "<app>")
    text = text.replace(sysconfig.get_paths()["purelib"], "<site-packages>")
    text = text.replace(str(Path(PYTHON).parent.parent), "<venv>").replace(str(ROOT), "<repo>")
    text = re.sub(r"/tmp/[\w./-]+", "<tmp>", text)
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    return re.sub(r"port=\d+", "port=PORT", re.sub(r"\('127\.0\.0\.1', \d+\)", "('127.0.0.1', PORT)", text))


NOISE = re.compile(r"^(warning: |pyscone: warning|\s*$|[\^~ ]+$|Type '.*' for usage\.)", re.I)
# An exception's last line, or a program's "error: ..." (pyscone's own, argparse's, Django's "Unknown command").
ERROR_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(Error|Exception|Exit)\b|([a-z_]\w*\.)+[A-Z]\w*: |[\w.-]*:? ?error: |Unknown command: )"
)


def last_line(stderr: str, workdir: Path) -> str:
    """The line a user reads first: the last error line of stderr (an exception's, or an "error:" line),
    else its last meaningful line."""
    lines = [ln.strip() for ln in stderr.splitlines() if not NOISE.match(ln)]
    errors = [ln for ln in lines if ERROR_LINE.match(ln) and not ln.rstrip().endswith(":")]
    line = errors[-1] if errors else lines[-1] if lines else "(no output)"
    return sanitize(line, workdir)[:300]


# --------------------------------------------------------------------------- fixtures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PKI:
    """A private CA and a server certificate for 127.0.0.1 it signed, as PEM files."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path) -> PKI:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "compat private CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        pki = cls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pki.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return pki

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the fixture"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def http_fixture(pki: PKI | None) -> Iterator[str]:
    """A threaded HTTP (or, given a PKI, HTTPS) server in this process; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    if pki is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.cert, pki.key)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if pki else 'http'}://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def redis_fixture(directory: Path) -> Iterator[int]:
    """A real redis-server on loopback, without persistence; yields its port."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise CaseFailed("redis-server is not installed (scripts/setup.sh installs it)")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, 10.0, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def wait_listening(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> bool:
    """True once something accepts on the port; False if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- running a case


@dataclass
class Env:
    """What the cases share in one run: a scratch directory and the private PKI."""

    scratch: Path
    pki: PKI = field(init=False)

    def __post_init__(self) -> None:
        self.pki = PKI.create(self.scratch / "pki")


def prepare(case: Case, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for name in case.files:
        src = APPS / name
        if src.is_dir():
            shutil.copytree(src, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, workdir / name)


def command(case: Case, mode: str, values: dict[str, str], shield: Path | None = None) -> list[str]:
    argv = [a.format(**values) for a in case.argv]
    if mode == "native":
        return [PYTHON, *argv]
    return [*PYSCONE, *(["--net-shield", str(shield)] if shield else []), *argv]


def shield_rules(case: Case, mode: str, pki: PKI, workdir: Path, port: int) -> Path | None:
    """The ``--net-shield`` file of a shielded case in the enclave (see ``Case.shielded``)."""
    if not case.shielded or mode == "native":
        return None
    if case.server:
        rule = f"listen:\n  - port: {port}\n    cert: {pki.cert}\n    key: {pki.key}\n"
    else:
        rule = f"connect:\n  - to: 127.0.0.1:{port}\n    ca: {pki.ca}\n"
    path = workdir.with_name(workdir.name + ".net.yaml")
    path.write_text(rule + "unlisted: refuse\n")
    return path


def child_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in [k for k in env if k.startswith(("PYTEST_", "PYSCONE_TEST_"))]:
        del env[name]  # the suite's own settings are not the app's
    env["HOME"] = str(workdir)  # matplotlib's and others' caches stay in the case's directory
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """^C the server's whole session (the launcher and the enclave), then kill what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(8)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _get(url: str, ctx: ssl.SSLContext | None, timeout: float = 15.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
        body: bytes = r.read()
        return body.decode(errors="replace")


@dataclass
class Running:
    base: str  # the server's base URL
    ctx: ssl.SSLContext | None  # what a client verifies it with (HTTPS cases)
    proc: subprocess.Popen[bytes]
    stderr: Path  # a file, not a pipe: a chatty server must never block on a full pipe
    workdir: Path

    def died(self, grace: float = 1.0) -> CaseFailed | None:
        """If the server exited (or exits within the grace period): the failure its stderr ends with."""
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            return None
        text = self.stderr.read_text(errors="replace")
        return CaseFailed(last_line(text, self.workdir), text[-3000:])


@contextlib.contextmanager
def serving(case: Case, mode: str, env: Env, workdir: Path) -> Iterator[Running]:
    """Start a server case; yields it once it listens. Raises CaseFailed if it never does."""
    port = free_port()
    values = {"port": str(port), "cert": str(env.pki.cert), "key": str(env.pki.key), "ca": str(env.pki.ca)}
    log = workdir.with_name(workdir.name + ".stderr")
    with log.open("wb") as err:
        proc = subprocess.Popen(
            command(case, mode, values, shield_rules(case, mode, env.pki, workdir, port)),
            cwd=workdir,
            env=child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        if not wait_listening(port, case.timeout, proc):
            exited = proc.poll() is not None
            _stop(proc)
            text = log.read_text(errors="replace")
            why = last_line(text, workdir) if exited else f"not listening after {case.timeout:.0f} s"
            raise CaseFailed(why, text[-3000:])
        tls = case.https or (case.shielded and mode != "native")
        scheme = "https" if tls else "http"
        ctx = env.pki.client_context() if tls else None
        yield Running(f"{scheme}://127.0.0.1:{port}", ctx, proc, log, workdir)
    finally:
        _stop(proc)


class CaseFailed(Exception):
    def __init__(self, line: str, detail: str = "") -> None:
        super().__init__(line)
        self.line = line
        self.detail = detail


def run_case(case: Case, mode: str, env: Env) -> Outcome:
    """Run one case natively or in the enclave, in a fresh directory; never raises for the app's failure."""
    workdir = env.scratch / f"{case.name}-{mode}"
    if workdir.exists():
        shutil.rmtree(workdir)
    prepare(case, workdir)
    start = time.monotonic()
    try:
        if case.server:
            with serving(case, mode, env, workdir) as server:
                try:
                    body = _get(server.base + case.path, server.ctx)
                except Exception as e:  # any client error is the case's outcome
                    # A server that listened and then crashed: what it printed is what the user sees.
                    raise server.died() or CaseFailed(sanitize(f"client: {type(e).__name__}: {e}", workdir)) from e
                if case.expect not in body:
                    raise CaseFailed(sanitize(f"response lacks {case.expect!r}: {body[:120]!r}", workdir))
        else:
            with contextlib.ExitStack() as stack:
                values = {"ca": str(env.pki.ca)}
                shield = None
                if case.fixture in ("http", "https"):
                    tls = case.fixture == "https" or (case.shielded and mode != "native")
                    url = stack.enter_context(http_fixture(env.pki if tls else None))
                    if case.shielded and mode != "native":  # the app speaks HTTP; the shield, TLS
                        url = "http://" + url.split("://", 1)[1]
                        shield = shield_rules(case, mode, env.pki, workdir, int(url.rsplit(":", 1)[1].split("/")[0]))
                    values["url"] = url
                elif case.fixture == "redis":
                    values["port"] = str(stack.enter_context(redis_fixture(workdir)))
                elif case.fixture == "postgres":
                    # A fresh cluster (Unix socket only); the app's settings read database.json next to its code.
                    from pyscone.cas import localpg

                    url = urllib.parse.urlsplit(stack.enter_context(localpg.cluster("compat")))
                    query = dict(urllib.parse.parse_qsl(url.query))
                    db = {"NAME": "compat", "USER": "postgres", "HOST": query["host"], "PORT": query["port"]}
                    (workdir / case.files[0] / "database.json").write_text(json.dumps(db))
                try:
                    proc = subprocess.run(
                        command(case, mode, values, shield),
                        cwd=workdir,
                        env=child_env(workdir),
                        stdin=subprocess.DEVNULL,
                        capture_output=True,
                        text=True,
                        timeout=case.timeout,
                    )
                except subprocess.TimeoutExpired as e:
                    raise CaseFailed(f"timed out after {case.timeout:.0f} s") from e
                if proc.returncode != 0:
                    line = last_line(proc.stderr, workdir)
                    raise CaseFailed(line, proc.stderr[-3000:])
                if case.expect not in proc.stdout:
                    got = sanitize(proc.stdout.strip()[-200:], workdir)
                    raise CaseFailed(f"output lacks {case.expect!r}: {got!r}", proc.stderr[-3000:])
    except CaseFailed as f:
        return Outcome(False, f.line, time.monotonic() - start, f.detail)
    return Outcome(True, "", time.monotonic() - start)


# --------------------------------------------------------------------------- throughput (report only)


def wrk(url: str, seconds: float, connections: int = 16) -> float | None:
    """req/s that ``wrk`` measures against a running server; None if wrk is missing or everything errored."""
    exe = shutil.which("wrk")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or (non2xx and total and int(non2xx.group(1)) == int(total.group(1))):
        return None
    return float(rps.group(1))


def throughput(case: Case, mode: str, env: Env, seconds: float) -> float | None:
    """Start the server case again and measure it; None when it does not serve."""
    if case.https or case.shielded:
        return None  # wrk's TLS is not what we compare here (bench/tls.py is); the case's own check covers it
    workdir = env.scratch / f"{case.name}-{mode}-wrk"
    if workdir.exists():
        shutil.rmtree(workdir)
    prepare(case, workdir)
    try:
        with serving(case, mode, env, workdir) as server:
            _get(server.base + case.path, None)  # warm: the first request may import lazily
            return wrk(server.base + case.path, seconds)
    except (CaseFailed, OSError):
        return None
