"""Processes: fork, multiprocessing and subprocess natively and in an enclave, side by side.

    .venv/bin/python bench/procs.py [--quick] [--case NAME]   # a few minutes (quick: seconds)
    .venv/bin/python bench/run.py --only procs [--quick]      # the same, in bench/results/latest.json

``bench/apps/procs_work.py`` runs one case per process and times its measured part itself
(start-up excluded: a pool's workers are forked and warm before the clock starts), then
prints it as one JSON line.  Native (plain ``python``) and enclave (``pyscone run``) runs
alternate within a round; the median of the rounds is reported, with enclave / native.

To add a case: a function in ``procs_work.CASES`` and a :class:`Case` here (its sizes and
what its rate counts).
"""

from __future__ import annotations

import argparse
import json
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
APP = BENCH / "apps" / "procs_work.py"
PYTHON = sys.executable
CONFIGS = ("native", "enclave")
TIMEOUT_S = 300.0


class ProcsBenchError(Exception):
    """The benchmark could not run: reported in one line."""


@dataclass(frozen=True)
class Case:
    name: str
    quick: int  # the count for --quick
    full: int
    unit: str  # what count / seconds is
    what: str  # one line for the report


CASES = (
    Case("fork-100mb", 20, 200, "forks/s", "os.fork + exit + waitpid, a 100 MB heap (every page written)"),
    Case("subprocess-python", 3, 20, "runs/s", 'subprocess.run([sys.executable, "-c", "pass"])'),
    Case("pool-map", 2_000, 40_000, "tasks/s", "multiprocessing.Pool(2).map of ~50 us CPU tasks, default chunks"),
    Case("pool-map-chunk1", 200, 4_000, "tasks/s", "the same with chunksize=1: one pickle each way per task"),
    Case("sem-pingpong", 200, 5_000, "rounds/s", "parent and forked child hand a turn over two semaphores"),
    Case("forkserver-process", 3, 40, "starts/s", "Process start + join, forkserver start method (fds by SCM_RIGHTS)"),
)


@dataclass
class ProcsResult:
    case: str
    config: str
    count: int
    per_s: float
    unit: str
    rounds: int


def _run(config: str, root: Path, case: str, count: int) -> float:
    cmd = [PYTHON]
    if config == "enclave":
        cmd = [PYTHON, "-m", "pyscone.cli", "run", "--no-venv", "--bytecode-cache", str(root / "cache")]
    cmd += [str(APP), case, str(count)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=root)
    except subprocess.TimeoutExpired:
        raise ProcsBenchError(f"{config} {case}: no result in {TIMEOUT_S:.0f} s") from None
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ProcsBenchError(f"{config} {case}: exited {p.returncode}: {tail}")
    seconds = float(json.loads(lines[-1])["seconds"])
    return count / seconds


def bench_procs(quick: bool, log: Callable[[str], None], only: str | None = None) -> list[ProcsResult]:
    rounds = 1 if quick else 5
    results = []
    with tempfile.TemporaryDirectory(prefix="pyscone-bench-procs-") as tmp:
        root = Path(tmp)
        for case in CASES:
            if only is not None and case.name != only:
                continue
            count = case.quick if quick else case.full
            samples: dict[str, list[float]] = {c: [] for c in CONFIGS}
            for i in range(rounds):
                for config in CONFIGS:
                    samples[config].append(_run(config, root, case.name, count))
                log(f"procs: {case.name} round {i + 1}/{rounds}")
            for config in CONFIGS:
                rate = round(statistics.median(samples[config]), 1)
                results.append(ProcsResult(case.name, config, count, rate, case.unit, rounds))
    return results


def report_lines(results: list[ProcsResult]) -> list[str]:
    by = {(r.case, r.config): r for r in results}
    cases = {c.name: c for c in CASES}
    rows = []
    for name in dict.fromkeys(r.case for r in results):
        nat, enc = by[(name, "native")], by[(name, "enclave")]
        rows.append(
            [name, str(nat.count), nat.unit, f"{nat.per_s:,.0f}", f"{enc.per_s:,.0f}", f"{enc.per_s / nat.per_s:.2f}x"]
        )
    head = (
        f"procs: processes natively and in an enclave, median of {results[0].rounds} round(s) (configurations "
        "alternate), start-up excluded"
    )
    lines = [head, "", table(["case", "count", "unit", "native", "enclave", "enclave/native"], rows), ""]
    lines += [f"  {name}: {cases[name].what}" for name in dict.fromkeys(r.case for r in results)]
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--case", choices=[c.name for c in CASES], default=None, help="run one case only")
    a = p.parse_args(argv)
    try:
        results = bench_procs(a.quick, lambda m: print(f"  {m}", file=sys.stderr, flush=True), a.case)
    except ProcsBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(results)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "procs.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
