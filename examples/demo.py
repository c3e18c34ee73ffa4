"""pyscone's main demo: run an unmodified web service in a simulated enclave and show,
from the host's side, what the enclave boundary means.  Embedded defaults: no CAS (dev mode)."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
PYSCONE = [sys.executable, "-m", "pyscone.cli", "run"]
FSPF_TOOL = [sys.executable, "-m", "pyscone.cli", "fspf"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None, ctx: ssl.SSLContext | None = None) -> object:
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        return json.loads(r.read())


def make_tls_identity(work: Path) -> None:
    """The owner's CA and the service's certificate (for localhost), as PEM files in ``work``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "demo owner CA")])
    day = datetime.timedelta(days=1)
    ca = (
        x509.CertificateBuilder(ca_name, ca_name, ca_key.public_key(), 1, now, now + day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder(ca_name, name, key.public_key(), 2, now, now + day)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (work / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (work / "notes.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    (work / "notes.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))


class RecordingRelay:
    """What the host does with the traffic it carries: here, it keeps a copy of every byte."""

    def __init__(self, target: int) -> None:
        self.carried = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.carried += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def tool(*args: str) -> None:
    print("$ pyscone fspf", " ".join(args))
    r = subprocess.run([*FSPF_TOOL, *args], capture_output=True, text=True, check=True)
    print(r.stdout.rstrip())


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="pyscone-demo-"))
    data = work / "notes"
    data.mkdir()
    fspf = work / "notes.fspf"
    port = free_port()
    say("The owner declares the notes directory an encrypted region of the file-system shield")
    tool("create", str(fspf))
    tool("addr", str(fspf), str(data), "--kind", "encrypted")
    say("... and gives the service a TLS identity: the network shield serves its port over TLS")
    make_tls_identity(work)
    rules = work / "net.yaml"
    rules.write_text(f"listen:\n  - port: {port}\n    cert: notes.pem\n    key: notes.key\nunlisted: refuse\n")
    print(f"$ cat {rules}\n{rules.read_text().rstrip()}")
    relay = RecordingRelay(port)
    base = f"https://localhost:{relay.port}"  # every request goes through the host's relay
    ctx = ssl.create_default_context(cafile=str(work / "ca.pem"))

    say("Start examples/notes_app.py, unmodified, inside an enclave, with the shield mounted")
    cmd = [
        *PYSCONE,
        "--stats",
        "--fspf",
        str(fspf),
        "--net-shield",
        str(rules),
        "--env",
        "NOTES_TITLE=enclave notes",
        str(ROOT / "examples/notes_app.py"),
        str(port),
        str(data),
    ]
    print(
        f"$ pyscone run --stats --fspf {fspf} --net-shield {rules} --env NOTES_TITLE='enclave notes' "
        f"examples/notes_app.py {port} {data}"
    )
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "SECRET_ON_HOST": "hunter2"}
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    print(proc.stderr.read().decode() if proc.stderr else "", file=sys.stderr)
                    return 1
                time.sleep(0.1)

        say("A real HTTPS client talks to the plain-HTTP app; its threads are lthreads, its syscalls use the rings")
        for text in ("buy milk", "attest the CAS", "ship pyscone"):
            print("POST /notes ->", http("POST", f"{base}/notes", text.encode(), ctx=ctx))
        print("GET /notes  ->", http("GET", f"{base}/notes", ctx=ctx))
        say("The host's view of the traffic it relayed: TLS records only")
        print(f"bytes relayed: {len(relay.carried)}; containing 'milk': {b'milk' in relay.carried}")
        try:
            http("GET", f"http://127.0.0.1:{port}/notes")
            print("plain HTTP to the port: answered (unexpected)")
        except OSError as e:
            print(f"plain HTTP to the port: no answer ({type(e).__name__}): the port speaks only TLS")
        say("The host's view of the notes: the files exist, their contents are ciphertext")
        print("files on the host:", sorted(p.name for p in data.iterdir()))
        leaked = [p.name for p in data.iterdir() if b"milk" in p.read_bytes()]
        print(f"host files containing 'milk': {leaked or 'none'}")

        say("The app tries to bypass the runtime with a raw open(2) system call: the barrier refuses it")
        print("GET /escape ->", http("GET", f"{base}/escape", ctx=ctx))

        say("The host's view of the enclave process")
        enclave = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0]
        status = dict(
            line.split(":\t", 1) for line in Path(f"/proc/{enclave}/status").read_text().splitlines() if ":\t" in line
        )
        environ = Path(f"/proc/{enclave}/environ").read_bytes()
        names = sorted(item.split(b"=", 1)[0].decode() for item in environ.split(b"\0") if item)
        print(
            f"enclave pid {enclave}: Seccomp={status['Seccomp'].strip()} (2 = filter), environment variables: "
            f"{names} (only the runtime's libc layer; SECRET_ON_HOST never reached it)"
        )

        say("^C: the service shuts down as it would under plain python")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        print(out.decode().rstrip())
        print("\n".join(line for line in err.decode().splitlines() if line.startswith("pyscone:")))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    say("The owner reads a note back with the FSPF key (on a trusted machine)")
    print(f"$ pyscone fspf cat {fspf} {data / '0000.txt'}")
    r = subprocess.run([*FSPF_TOOL, "cat", str(fspf), str(data / "0000.txt")], capture_output=True, text=True)
    print(r.stdout)

    say("The host flips one bit of a stored note: the enclave refuses it (EIO), never wrong data")
    note = data / "0001.txt"
    raw = bytearray(note.read_bytes())
    raw[20] ^= 1
    note.write_bytes(bytes(raw))
    reader = work / "read_note.py"
    reader.write_text(
        "import sys\ntry:\n    print(open(sys.argv[1]).read())\nexcept OSError as e:\n    print('the app sees:', e)\n"
    )
    r = subprocess.run([*PYSCONE, "--fspf", str(fspf), str(reader), str(note)], capture_output=True, text=True)
    print(r.stdout.rstrip())
    print("\n".join(line for line in r.stderr.splitlines() if "refused" in line))

    say("A lying host (Iago attack): the host claims a read returned more bytes than asked")
    probe = work / "probe.py"
    probe.write_text("print(open(__file__).read(5))\n")
    r = subprocess.run(
        [*PYSCONE, str(probe)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYSCONE_TEST_HOSTILE": "read-overflow"},
    )
    print(f"exit status {r.returncode}; stdout {r.stdout!r}")
    print(r.stderr.strip().splitlines()[-1])
    container(work)
    say(
        "Done: unmodified app, asynchronous system calls, encrypted files and traffic, a barrier that fails "
        "closed, an enclave that stops on a lie, a secure image that runc runs"
    )
    return 0


def container(work: Path) -> None:
    """The same service as a secure container image: ``pyscone build``, then runc runs it."""
    runc, umoci = shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin"), shutil.which("umoci")
    if os.geteuid() != 0 or runc is None or umoci is None:
        say("(skipped: the secure container needs root, runc and umoci; scripts/setup.sh installs them)")
        return
    say("The same service as a secure image (dev mode: its FSPF key is in the image), run by runc unchanged")
    app = work / "image-app"
    app.mkdir()
    shutil.copy(ROOT / "examples" / "notes_app.py", app / "app.py")
    print("$ pyscone build image-app -o image --dev --oci")
    r = subprocess.run(
        [sys.executable, "-m", "pyscone.cli", "build", str(app), "-o", str(work / "image"), "--dev", "--oci"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        print(r.stderr.strip().splitlines()[-1])
        return
    print(r.stdout.rstrip())
    manifest = json.loads((work / "image" / "manifest.json").read_text())
    bundle = work / "bundle"
    subprocess.run(
        [umoci, "unpack", "--image", f"{work / 'image' / 'oci'}:latest", str(bundle)], check=True, capture_output=True
    )
    port = free_port()
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = [*manifest["entrypoint"], str(port), "/data"]
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    (bundle / "config.json").write_text(json.dumps(spec))
    name = f"pyscone-demo-{os.getpid()}"
    print(f"$ umoci unpack --image image/oci:latest bundle && runc run --bundle bundle {name}")
    proc = subprocess.Popen(
        [runc, "run", "--bundle", str(bundle), name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                print("POST /notes ->", http("POST", f"http://127.0.0.1:{port}/notes", b"buy more milk"))
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    print("the container did not serve")
                    return
                time.sleep(0.2)
        print("GET /notes  ->", http("GET", f"http://127.0.0.1:{port}/notes"))
        stored = [p for p in (bundle / "rootfs" / "data").iterdir() if p.is_file()]
        leaked = [p.name for p in stored if b"milk" in p.read_bytes()]
        print(
            f"the container's /data on the host: {sorted(p.name for p in stored)}; containing 'milk': "
            f"{leaked or 'none'}"
        )
        code = (bundle / "rootfs" / "app" / "app.py").read_bytes()
        print(f"the image's copy of the app contains its source: {b'BaseHTTPRequestHandler' in code}")
    finally:
        subprocess.run([runc, "kill", name, "KILL"], capture_output=True)
        proc.wait(timeout=30)
        subprocess.run([runc, "delete", "--force", name], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
