"""SQLite through the libc layer: native Python against an enclave, on an unprotected path
and in an encrypted FS-shield region, side by side in one run.

    .venv/bin/python bench/sqlite.py [--quick]             # about 4 minutes (quick: 30 s)
    .venv/bin/python bench/run.py --only sqlite [--quick]  # the same, in bench/results/latest.json

``bench/apps/sqlite_ops.py`` runs one workload per process and times it inside the process
(start-up excluded): 100,000 point selects by primary key from a 10,000-row table, and
10,000 single-row inserts committed one per transaction and 100 per transaction (quick:
a tenth, and 300 single-row commits).  Python's sqlite3 defaults: a rollback journal,
``synchronous=FULL``.  Three configurations, alternating within a round:

* native: plain ``python`` on a temp directory;
* unprotected: ``pyscone run`` on a temp directory (every file call of SQLite is a host call);
* encrypted: ``pyscone run --fspf FSPF`` (dev mode) with the database in an encrypted region
  of 4 KiB chunks: the database, its journal and the FSPF are sealed, every commit is pinned.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from report import table  # bench/report.py, next to this script

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
APP = BENCH / "apps" / "sqlite_ops.py"
PYTHON = sys.executable
CONFIGS = ("native", "unprotected", "encrypted")
TIMEOUT_S = 600.0

Log = Callable[[str], None]


class SqliteBenchError(Exception):
    """The benchmark could not run: reported in one line."""


@dataclass
class SqliteResult:
    workload: str
    config: str
    count: int
    ops_per_s: float
    rounds: int


def workloads(quick: bool) -> list[tuple[str, int]]:
    if quick:
        return [("select", 10_000), ("commit-1", 300), ("commit-100", 1_000)]
    return [("select", 100_000), ("commit-1", 10_000), ("commit-100", 10_000)]


def _run(config: str, root: Path, workload: str, count: int) -> float:
    from pyscone.host import fspf_tool as tool

    work = Path(tempfile.mkdtemp(prefix=f"{config}-", dir=root))
    try:
        data = work / "data"
        data.mkdir()
        cmd = [PYTHON]
        if config != "native":
            cmd = [PYTHON, "-m", "pyscone.cli", "run", "--no-venv"]
        if config == "encrypted":
            paths = tool.Paths.of(str(work / "bench.fspf"))
            tool.create(paths)
            tool.add_region(paths, str(data), "encrypted", 4096)
            cmd += ["--fspf", str(work / "bench.fspf")]
        cmd += [str(APP), str(data / "bench.db"), workload, str(count)]
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=TIMEOUT_S)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SqliteBenchError(f"{config} {workload}: exited {r.returncode}: {tail}")
        return float(r.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_sqlite(quick: bool, log: Log) -> list[SqliteResult]:
    rounds = 1 if quick else 3
    results = []
    with tempfile.TemporaryDirectory(prefix="pyscone-bench-sqlite-") as tmp:
        root = Path(tmp)
        for workload, count in workloads(quick):
            # The long single-row commit runs once per round at a tenth in the full run's
            # extra rounds: the first round has the whole count.
            samples: dict[str, list[float]] = {c: [] for c in CONFIGS}
            for i in range(rounds):
                n = count if i == 0 or workload != "commit-1" else max(count // 10, 100)
                for config in CONFIGS:
                    samples[config].append(_run(config, root, workload, n))
                log(f"sqlite: {workload} round {i + 1}/{rounds}")
            for config in CONFIGS:
                results.append(
                    SqliteResult(workload, config, count, round(statistics.median(samples[config]), 1), rounds)
                )
    return results


LIMITS = {
    "select": "unprotected: 8 host round trips per select (4 locks, 2 stats, a read, an fstat); "
    "encrypted: none (the shim answers them from memory)",
    "commit-1": "encrypted: 4 FS-shield commits per transaction (the journal twice, the database, the "
    "journal's unlink), each a sealed FSPF written over its unpinned copy and a pinned tag write (2 fdatasyncs), "
    "about 35 host round trips in all",
    "commit-100": "as commit-1, over 100 rows: the per-transaction cost is shared",
}


def report_lines(results: list[SqliteResult]) -> list[str]:
    by = {(r.workload, r.config): r for r in results}
    rows = []
    for workload in dict.fromkeys(r.workload for r in results):
        nat = by[(workload, "native")]
        row = [workload, str(nat.count)]
        for config in CONFIGS:
            r = by[(workload, config)]
            row.append(f"{r.ops_per_s:,.0f}")
            if config != "native":
                row.append(f"{r.ops_per_s / nat.ops_per_s:.2f}x")
        rows.append(row)
    head = (
        f"sqlite: operations/s inside the process, median of {results[0].rounds} round(s) (configurations "
        "alternate); select = point select by primary key, commit-N = single-row inserts committed N per "
        "transaction (rollback journal, synchronous=FULL)"
    )
    headers = ["workload", "count", "native/s", "unprot/s", "vs native", "encrypted/s", "vs native"]
    lines = [head, "", table(headers, rows), "", "what limits each row:"]
    lines += [f"  {w}: {why}" for w, why in LIMITS.items()]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    try:
        results = bench_sqlite(a.quick, lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    except SqliteBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(results)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sqlite.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
