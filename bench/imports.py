"""Start-up of big imports: native Python against the enclave, with and without its bytecode cache.

    .venv/bin/python bench/imports.py [--quick]             # about 1 minute (quick: 20 s)
    .venv/bin/python bench/run.py --only imports [--quick]  # the same, in bench/results/latest.json

For ``import flask``, ``django.setup()`` (the contrib apps of a new project) and an empty
program, ``bench/apps/imports.py`` reports the time of the import itself, measured inside
the process, and this script the wall time of the whole process, for three kinds that take
turns within each round: native ``python``; ``pyscone run`` with its verified bytecode cache
(warm: a first, untimed run fills it); ``pyscone run --bytecode-cache off`` (every import
compiled from source, as before the cache existed).  Medians over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from report import table  # bench/report.py, next to this script

BENCH = Path(__file__).resolve().parent
APP = BENCH / "apps" / "imports.py"
PYSCONE = [sys.executable, "-m", "pyscone.cli", "run"]
IMPORTS = ("empty", "flask", "django")
KINDS = ("native", "enclave", "enclave-nocache")
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


def _command(kind: str, what: str, cache: Path) -> list[str]:
    if kind == "native":
        return [sys.executable, str(APP), what]
    option = "off" if kind == "enclave-nocache" else str(cache)
    return [*PYSCONE, "--bytecode-cache", option, str(APP), what]


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
        for what in IMPORTS:
            _once(_command("enclave", what, cache), cwd)  # fill the cache (and the page cache)
            _once(_command("native", what, cache), cwd)
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
            for i in range(rounds):
                for kind in KINDS:
                    samples[kind].append(_once(_command(kind, what, cache), cwd))
                log(f"imports: {what} round {i + 1}/{rounds}")
            for kind in KINDS:
                imp = statistics.median(s[0] for s in samples[kind])
                wall = statistics.median(s[1] for s in samples[kind])
                results.append(ImportResult(what, kind, round(imp, 1), round(wall, 1), rounds))
    return results


def report_lines(results: list[ImportResult]) -> list[str]:
    by = {(r.what, r.kind): r for r in results}
    rows = []
    for what in IMPORTS:
        nat = by[(what, "native")]
        for kind in KINDS:
            r = by[(what, kind)]
            ratio_imp = f"{r.import_ms / nat.import_ms:.2f}x" if kind != "native" and nat.import_ms >= 1 else ""
            ratio_wall = f"{r.wall_ms / nat.wall_ms:.2f}x" if kind != "native" else ""
            rows.append([what, kind, f"{r.import_ms:.1f}", ratio_imp, f"{r.wall_ms:.0f}", ratio_wall])
    head = (
        f"imports: time of the import inside the process and wall time of the process, median of "
        f"{results[0].runs} rounds (kinds alternate); enclave = warm verified bytecode cache"
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
