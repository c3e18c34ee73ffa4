"""Start-up of big imports: native Python against the enclave, with and without its bytecode cache.

    .venv/bin/python bench/imports.py [--quick]             # about 1 minute (quick: 20 s)
    .venv/bin/python bench/run.py --only imports [--quick]  # the same, in bench/results/latest.json

For ``import flask``, ``django.setup()`` (the contrib apps of a new project) and an empty
program, ``bench/apps/imports.py`` reports the time of the import itself, measured inside
the process, and this script the wall time of the whole process, for three kinds that take
turns within each round: native ``python``; ``pyscone run`` with its verified bytecode cache
(warm: a first, untimed run fills it); ``pyscone run --bytecode-cache off`` (every import
compiled from source, as before the cache existed).  Medians over the rounds.

The app runs in a venv of its own, as a user's would (``--venv``; natively, that venv's
python): one that holds Flask and Django and what they require, linked from the environment
running this script, so nothing is downloaded.  One more row starts the empty program in the
environment running this script itself (pyscone's development venv, with its ~360 C
extensions, mypy's among them), to show what mapping every extension of a large venv costs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from report import table  # bench/report.py, next to this script

BENCH = Path(__file__).resolve().parent
APP = BENCH / "apps" / "imports.py"
PYSCONE = [sys.executable, "-m", "pyscone.cli", "run"]
IMPORTS = ("empty", "flask", "django")
KINDS = ("native", "enclave", "enclave-nocache")
APP_DISTRIBUTIONS = ("flask", "django")
Log = Callable[[str], None]


class ImportBenchError(Exception):
    """A run failed (one line, with the tail of what the process said)."""


@dataclass
class ImportResult:
    what: str
    kind: str
    import_ms: float  # median, inside the process
    wall_ms: float  # median, the whole process
    runs: int


def _requirements(name: str) -> list[str]:
    out = []
    for req in importlib.metadata.requires(name) or []:
        if "extra ==" in req:
            continue
        m = re.match(r"[A-Za-z0-9_.-]+", req)
        if m:
            out.append(m.group(0))
    return out


def lean_venv(dest: Path, roots: tuple[str, ...] = APP_DISTRIBUTIONS) -> Path:
    """A venv holding ``roots`` and what they require, linked from this environment's site-packages."""
    venv.create(dest, with_pip=False, symlinks=True)
    site = dest / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    here = Path(sysconfig.get_paths()["purelib"])
    todo, done = list(roots), set()
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in done:
            continue
        done.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (here / top).exists() and not (site / top).exists():
                os.symlink(here / top, site / top)
        todo.extend(_requirements(name))
    return dest


def _command(kind: str, what: str, cache: Path, env_dir: Path | None) -> list[str]:
    if kind == "native":
        python = str(env_dir / "bin" / "python") if env_dir else sys.executable
        return [python, str(APP), what]
    option = "off" if kind == "enclave-nocache" else str(cache)
    where = ["--venv", str(env_dir)] if env_dir else ["--no-venv"]
    return [*PYSCONE, *where, "--bytecode-cache", option, str(APP), what]


def _once(cmd: list[str], cwd: Path) -> tuple[float, float]:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    wall = (time.perf_counter() - t) * 1000
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ImportBenchError(f"{' '.join(cmd[-2:])} exited {r.returncode}: {tail}")
    return float(r.stdout.strip().splitlines()[-1]), wall


def bench_imports(quick: bool, log: Log) -> list[ImportResult]:
    rounds = 3 if quick else 9
    results = []
    with tempfile.TemporaryDirectory(prefix="pyscone-bench-imports-") as tmp:
        cache, cwd = Path(tmp) / "cache", Path(tmp)
        app_env = lean_venv(Path(tmp) / "venv")
        plan = [(what, app_env, what) for what in IMPORTS] + [("empty (dev venv)", None, "empty")]
        for label, env_dir, what in plan:
            _once(_command("enclave", what, cache, env_dir), cwd)  # fill the cache (and the page cache)
            _once(_command("native", what, cache, env_dir), cwd)
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
            for i in range(rounds):
                for kind in KINDS:
                    samples[kind].append(_once(_command(kind, what, cache, env_dir), cwd))
                log(f"imports: {label} round {i + 1}/{rounds}")
            for kind in KINDS:
                imp = statistics.median(s[0] for s in samples[kind])
                wall = statistics.median(s[1] for s in samples[kind])
                results.append(ImportResult(label, kind, round(imp, 1), round(wall, 1), rounds))
    return results


def report_lines(results: list[ImportResult]) -> list[str]:
    by = {(r.what, r.kind): r for r in results}
    rows = []
    for what in dict.fromkeys(r.what for r in results):
        nat = by[(what, "native")]
        for kind in KINDS:
            r = by[(what, kind)]
            ratio_imp = f"{r.import_ms / nat.import_ms:.2f}x" if kind != "native" and nat.import_ms >= 1 else ""
            ratio_wall = f"{r.wall_ms / nat.wall_ms:.2f}x" if kind != "native" else ""
            rows.append([what, kind, f"{r.import_ms:.1f}", ratio_imp, f"{r.wall_ms:.0f}", ratio_wall])
    head = (
        f"imports: time of the import inside the process and wall time of the process, median of "
        f"{results[0].runs} rounds (kinds alternate); the app in a venv of its own with Flask and Django "
        "(--venv); enclave = warm verified bytecode cache"
    )
    headers = ["import", "kind", "import ms", "vs native", "process ms", "vs native"]
    return [head, "", table(headers, rows), ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    try:
        results = bench_imports(a.quick, lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    except ImportBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
