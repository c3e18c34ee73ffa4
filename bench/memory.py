"""Memory cost: proportional set size of the notes service after 200 requests, native vs enclave.

    .venv/bin/python bench/memory.py

PSS counts shared pages once across processes, so host + enclave can be added fairly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "examples" / "notes_app.py"


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(cmd: list[str]) -> list[tuple[str, float]]:
    port = free_port()
    data = tempfile.mkdtemp(prefix="pyscone-mem-")
    proc = subprocess.Popen([*cmd, str(APP), str(port), data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.05)
        base = f"http://127.0.0.1:{port}/notes"
        for i in range(200):
            urllib.request.urlopen(urllib.request.Request(base, data=b"note %d" % i, method="POST"), timeout=10).read()
        urllib.request.urlopen(base, timeout=10).read()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        out = [("launcher" if children else "python", pss_mib(proc.pid))]
        out += [("enclave", pss_mib(int(c))) for c in children]
        return out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    native = measure([sys.executable])
    enclave = measure([sys.executable, "-m", "pyscone.cli", "run"])
    n = sum(v for _, v in native)
    e = sum(v for _, v in enclave)
    print("notes service after 200 requests, PSS in MiB")
    print(f"  native : {n:6.1f}  ({', '.join(f'{k} {v:.1f}' for k, v in native)})")
    print(f"  enclave: {e:6.1f}  ({', '.join(f'{k} {v:.1f}' for k, v in enclave)})")
    print(f"  ratio  : {e / n:6.2f}x")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
