"""Secure images against plain ones of the same app: build time, size, start-up under runc.

    sudo .venv/bin/python bench/image.py [--rounds N]     # about two minutes; runc needs root

The app is ``bench/apps/image_app`` (Flask, with its ``requirements.txt``).  The secure image is
``pyscone build --dev --oci`` (dev mode: no CAS to reach); the plain image is the same app built
the same way without pyscone (``image/build.py``'s ``plain_image``: the interpreter, its
libraries, the requirements, the app in the clear), so the two differ by exactly what pyscone adds.
Start-up is the time from ``runc run`` to the first HTTP 200 from the app, with the container in
the host's network namespace; plain and secure runs alternate.  Results also go to
``bench/results/image.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from report import table  # bench/report.py, next to this script

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
APP = BENCH / "apps" / "image_app"
RESULTS = BENCH / "results"


class ImageBenchError(Exception):
    """The benchmark could not run: one line."""


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise ImageBenchError(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_secure(out: Path) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pyscone.cli", "build", str(APP), "-o", str(out), "--dev", "--oci"]
    got = subprocess.run([*cmd, "--requirements", str(APP / "requirements.txt")], capture_output=True, text=True)
    if got.returncode != 0:
        raise ImageBenchError(f"pyscone build: {got.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def build_plain(out: Path) -> float:
    sys.path.insert(0, str(ROOT))
    from pyscone.image import build

    start = time.perf_counter()
    build.plain_image(APP, "app.py", APP / "requirements.txt", out)
    return time.perf_counter() - start


def _bundle(out: Path, where: Path, args: list[str]) -> Path:
    subprocess.run(
        [_tool("umoci"), "unpack", "--image", f"{out / 'oci'}:latest", str(where)], check=True, capture_output=True
    )
    spec = json.loads((where / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = args
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    (where / "config.json").write_text(json.dumps(spec))
    return where


def start_up(where: Path, port: int, name: str) -> float:
    """Seconds from ``runc run`` to the app's first HTTP 200."""
    runc = _tool("runc")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [runc, "run", "--bundle", str(where), name], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while True:
            if proc.poll() is not None:
                raise ImageBenchError(f"{name} exited {proc.returncode}: {proc.stderr.read()[-500:]!r}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.01)
            if time.perf_counter() - start > 120:
                raise ImageBenchError(f"{name} did not serve in 120 s")
    finally:
        subprocess.run([runc, "kill", name, "KILL"], capture_output=True)
        proc.wait(timeout=30)
        subprocess.run([runc, "delete", "--force", name], capture_output=True)


def _size(path: Path) -> int:
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="start-ups of each image (default 5)")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("error: runc needs root: run this benchmark as root", file=sys.stderr)
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="pyscone-bench-image-") as tmp:
            root = Path(tmp)
            times = {"plain": build_plain(root / "plain"), "secure": build_secure(root / "secure")}
            warm = {"plain": build_plain(root / "plain2"), "secure": build_secure(root / "secure2")}
            sizes = {k: _size(root / k / "image.tar") for k in ("plain", "secure")}
            manifest = json.loads((root / "secure" / "manifest.json").read_text())
            port = _free_port()
            bundles = {
                "plain": _bundle(root / "plain", root / "b-plain", [*_plain_entry(root / "plain"), str(port)]),
                "secure": _bundle(root / "secure", root / "b-secure", [*manifest["entrypoint"], str(port)]),
            }
            starts: dict[str, list[float]] = {"plain": [], "secure": []}
            for i in range(a.rounds):
                for kind in ("plain", "secure"):
                    starts[kind].append(start_up(bundles[kind], port, f"pyscone-bench-{kind}-{os.getpid()}-{i}"))
                print(f"  image: start-up round {i + 1}/{a.rounds}", file=sys.stderr, flush=True)
    except (ImageBenchError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    med = {k: statistics.median(v) for k, v in starts.items()}
    rows = [
        [
            "build (pip cache cold, s)",
            f"{times['plain']:.1f}",
            f"{times['secure']:.1f}",
            f"{times['secure'] / times['plain']:.2f}x",
        ],
        ["build (again, s)", f"{warm['plain']:.1f}", f"{warm['secure']:.1f}", f"{warm['secure'] / warm['plain']:.2f}x"],
        [
            "image size (docker-archive, MB)",
            f"{sizes['plain'] / 1e6:.1f}",
            f"{sizes['secure'] / 1e6:.1f}",
            f"{sizes['secure'] / sizes['plain']:.2f}x",
        ],
        [
            f"start-up to first request (runc, median of {a.rounds}, s)",
            f"{med['plain']:.3f}",
            f"{med['secure']:.3f}",
            f"{med['secure'] / med['plain']:.2f}x",
        ],
    ]
    print("image: a Flask app as a plain image and as a secure one (pyscone build --dev --oci)\n")
    print(table(["", "plain", "secure", "secure/plain"], rows))
    RESULTS.mkdir(exist_ok=True)
    doc = {"build_s": times, "rebuild_s": warm, "size_bytes": sizes, "start_up_s": starts, "rounds": a.rounds}
    (RESULTS / "image.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _plain_entry(out: Path) -> list[str]:
    index = json.loads((out / "oci" / "index.json").read_text())
    blobs = out / "oci" / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    return list(config["config"]["Entrypoint"])


if __name__ == "__main__":
    raise SystemExit(main())
