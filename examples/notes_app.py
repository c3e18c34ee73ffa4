"""A small, ordinary Python web service: a threaded HTTP server that keeps notes in files.

Nothing here knows about pyscone.  Run it with plain ``python`` or inside an enclave:

    python examples/notes_app.py 8080 /tmp/notes
    pyscone run examples/notes_app.py 8080 /tmp/notes
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DATA = sys.argv[2] if len(sys.argv) > 2 else "notes"
LOCK = threading.Lock()


class Notes(BaseHTTPRequestHandler):
    def _send(self, code: int, body: object) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path == "/notes":
            with LOCK:
                notes = [open(os.path.join(DATA, n)).read() for n in sorted(os.listdir(DATA))]
            self._send(200, {"title": os.environ.get("NOTES_TITLE", "notes"), "notes": notes})
        elif self.path == "/escape":
            # Try to bypass the runtime: make the open(2) system call itself (libc's open()
            # would go through the enclave's libc layer, like any C library's I/O).
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.syscall(2, b"/etc/hostname", os.O_RDONLY)  # SYS_open on x86-64
            err = ctypes.get_errno()
            self._send(200, {"direct_open": fd, "errno": os.strerror(err) if fd < 0 else None})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        text = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        with LOCK:
            name = f"{len(os.listdir(DATA)):04d}.txt"
            with open(os.path.join(DATA, name), "w") as f:
                f.write(text)
        self._send(201, {"stored": name})


if __name__ == "__main__":
    os.makedirs(DATA, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Notes)
    print(f"notes service on port {sys.argv[1]}, data in {DATA}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("notes service stopped", flush=True)
