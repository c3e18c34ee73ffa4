"""pyscone's production path on one machine: the notes service started by the CAS after attestation.

A LAS (the simulated platform), a CAS and the service run here as separate processes.
The host that starts the service passes it nothing: no program arguments, no
environment, no FSPF key.  All of it comes from the CAS once the enclave has proven
what it is.  Run it with ``scripts/demo-attest.sh``.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from demo import free_port, http, say  # examples/demo.py

ROOT = Path(__file__).resolve().parent.parent
PYSCONE = [sys.executable, "-m", "pyscone.cli"]


def run(*args: str, check: bool = True, show: bool = True) -> subprocess.CompletedProcess[str]:
    if show:
        print("$ pyscone", " ".join(args))
    r = subprocess.run([*PYSCONE, *args], capture_output=True, text=True)
    if show and (r.stdout.strip() or r.stderr.strip()):
        print((r.stdout + r.stderr).rstrip())
    if check and r.returncode != 0:
        raise SystemExit(f"demo failed: pyscone {' '.join(args)} exited {r.returncode}")
    return r


def service(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([*PYSCONE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    print(line)
    m = re.search(r":(\d+)(;|$)", line)
    if m is None:
        raise SystemExit(f"demo failed: {args[0]} did not start: {proc.communicate()[1]}")
    return proc, int(m.group(1))


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="pyscone-attest-demo-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        return _demo(work, procs)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def _demo(work: Path, procs: list[subprocess.Popen[str]]) -> int:
    say("A platform (LAS) and a CAS, each its own process")
    las, las_port = service("las", "--dir", str(work / "las"), "--listen", "127.0.0.1:0")
    cas, cas_port = service("cas", "serve", "--dir", str(work / "cas"), "--listen", "127.0.0.1:0")
    procs += [las, cas]
    (work / "platform.pem").write_text(run("las", "--dir", str(work / "las"), "--show", show=False).stdout)
    run("cas", "trust", "--dir", str(work / "cas"), str(work / "platform.pem"), "--note", "this machine")
    pin = ["--cas", f"https://127.0.0.1:{cas_port}", "--cas-cert", str(work / "cas" / "cas-cert.pem")]
    owner = [*pin, "--key", str(work / "owner.pem")]

    say("The owner protects the app's code (authenticated) and its data (encrypted) with an FSPF")
    code, data, fspf = work / "code", work / "notes", work / "notes.fspf"
    code.mkdir()
    data.mkdir()
    shutil.copy(ROOT / "examples" / "notes_app.py", code / "notes_app.py")
    run("fspf", "create", str(fspf))
    run("fspf", "addr", str(fspf), str(code), "--kind", "authenticated")
    run("fspf", "addr", str(fspf), str(data), "--kind", "encrypted")
    run("fspf", "addf", str(fspf), str(code))
    key = Path(str(fspf) + ".key").read_text().strip()
    tag = run("fspf", "tag", str(fspf), show=False).stdout.strip()
    Path(str(fspf) + ".key").unlink()  # from now on only the CAS has it
    Path(str(fspf) + ".tag").unlink()
    print("(the FSPF key is deleted from this machine: only the CAS has it now)")

    say("The owner measures the enclave and writes a session policy for it")
    run("keygen", str(work / "owner.pem"))
    mrenclave = run("measure", *pin).stdout.strip()
    port = free_port()
    policy = work / "notes.yaml"
    policy.write_text(
        f"""name: notes
services:
  api:
    mrenclaves: [{mrenclave}]
    argv: [{code / "notes_app.py"}, "{port}", {data}]
    env: {{NOTES_TITLE: "team notes, token ${{secret:token}}"}}
    fspf: {{path: {fspf}, key: {key}, tag: {tag}}}
secrets:
  token: {{kind: random, bytes: 8}}
"""
    )
    print(policy.read_text().replace(key, key[:8] + "…"))
    run("cas", "session", "create", str(policy), *owner)

    say("The host starts the service: no program arguments, no environment, no key")
    cmd = ["run", *pin, "--session", "notes/api", "--las", f"127.0.0.1:{las_port}"]
    print("$ pyscone", " ".join(cmd))
    app = subprocess.Popen([*PYSCONE, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert app.stdout is not None
    print(app.stdout.readline().rstrip())
    base = f"http://127.0.0.1:{port}"
    http("POST", base + "/notes", b"the launch code is 0000")
    got = http("GET", base + "/notes")
    print(f"GET /notes -> {got}")
    token = re.search(r"token ([0-9a-f]{16})", str(got))
    print(f"the app received the CAS's secret: {'yes' if token else 'no'}")
    cmdline = Path(f"/proc/{app.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    leaked = token is not None and token.group(1) in cmdline
    print(f"the secret on the host's command line: {'yes' if leaked else 'no'}")
    hits = [p.name for p in work.rglob("*") if p.is_file() and b"launch code" in p.read_bytes()]
    print(f"host files containing the note: {hits or 'none'}")
    app.send_signal(signal.SIGINT)
    app.wait(timeout=20)

    say("A changed enclave (another heap limit) is refused; the owner's audit says why")
    run("run", *pin, "--heap", "512M", "--session", "notes/api", "--las", f"127.0.0.1:{las_port}", check=False)
    run("cas", "audit", "notes", *owner)

    say("The host rolls the file system back one version: the tag the CAS pinned refuses it")
    copy = Path(f"{fspf}.1")  # the FSPF's second copy, which the enclave writes in turn
    saved = {p: p.read_bytes() for p in [fspf, *([copy] if copy.exists() else []), *data.iterdir()]}
    app = subprocess.Popen([*PYSCONE, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert app.stdout is not None
    app.stdout.readline()
    http("POST", base + "/notes", b"a second note")
    app.send_signal(signal.SIGINT)
    app.wait(timeout=20)
    for p, content in saved.items():
        p.write_bytes(content)
    for extra in {*data.iterdir(), *([copy] if copy.exists() else [])} - set(saved):
        extra.unlink()
    r = run(*cmd, check=False)
    print(f"exit status {r.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
