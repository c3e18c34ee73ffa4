"""pyscone's main demo: run an unmodified web service in a simulated enclave and show,
from the host's side, what the enclave boundary means.  Embedded defaults: no CAS (dev mode)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYSCONE = [sys.executable, "-m", "pyscone.cli", "run"]
FSPF_TOOL = [sys.executable, "-m", "pyscone.cli", "fspf"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None) -> object:
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


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
    base = f"http://127.0.0.1:{port}"
    say("The owner declares the notes directory an encrypted region of the file-system shield")
    tool("create", str(fspf))
    tool("addr", str(fspf), str(data), "--kind", "encrypted")

    say("Start examples/notes_app.py, unmodified, inside an enclave, with the shield mounted")
    cmd = [
        *PYSCONE,
        "--stats",
        "--fspf",
        str(fspf),
        "--env",
        "NOTES_TITLE=enclave notes",
        str(ROOT / "examples/notes_app.py"),
        str(port),
        str(data),
    ]
    print(f"$ pyscone run --stats --fspf {fspf} --env NOTES_TITLE='enclave notes' examples/notes_app.py", port, data)
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

        say("A real HTTP client talks to it; its threads are lthreads, its syscalls go through the rings")
        for text in ("buy milk", "attest the CAS", "ship pyscone"):
            print("POST /notes ->", http("POST", f"{base}/notes", text.encode()))
        print("GET /notes  ->", http("GET", f"{base}/notes"))
        say("The host's view of the notes: the files exist, their contents are ciphertext")
        print("files on the host:", sorted(p.name for p in data.iterdir()))
        leaked = [p.name for p in data.iterdir() if b"milk" in p.read_bytes()]
        print(f"host files containing 'milk': {leaked or 'none'}")

        say("The app tries to bypass the runtime with a raw open(2) system call: the barrier refuses it")
        print("GET /escape ->", http("GET", f"{base}/escape"))

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
    say(
        "Done: unmodified app, asynchronous system calls, encrypted files, a barrier that fails closed, "
        "an enclave that stops on a lie"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
