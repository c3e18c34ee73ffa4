"""SQLite through the libc layer: native Python against an enclave, on an unprotected path
and in an encrypted FS-shield region, side by side in one run.

    .venv/bin/python bench/sqlite.py [--quick]             # about 5 minutes (quick: under 1)
    .venv/bin/python bench/run.py --only sqlite [--quick]  # the same, in bench/results/latest.json

``bench/apps/sqlite_ops.py`` runs one workload per process and times it inside the process
(start-up excluded): 100,000 point selects by primary key from a 10,000-row table, and
10,000 single-row inserts committed one per transaction and 100 per transaction (quick:
a tenth, and 300 single-row commits; attested: a tenth of the single-row commits).  Python's
sqlite3 defaults: a rollback journal, ``synchronous=FULL``.  Four configurations, alternating
within a round:

* native: plain ``python`` on a temp directory;
* unprotected: ``pyscone run`` on a temp directory (every file call of SQLite is a host call);
* encrypted: ``pyscone run --fspf FSPF`` (dev mode) with the database in an encrypted region
  of 4 KiB chunks: the database, its journal and the FSPF are sealed, every commit is pinned in
  the dev-mode tag file;
* attested (the commit workloads only): the same region in production, the enclave attested to a
  CAS (on SQLite) through a LAS, its FSPF key from the CAS and every commit pinned at the CAS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import attest  # bench/attest.py, next to this script: its LAS and CAS
from report import table  # bench/report.py, next to this script

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
APP = BENCH / "apps" / "sqlite_ops.py"
PYTHON = sys.executable
CONFIGS = ("native", "unprotected", "encrypted", "attested")
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


@dataclass
class Cas:
    """A LAS and a CAS for the attested runs: the ``pyscone run`` options, the LAS's port."""

    root: Path
    pin: list[str]
    las_port: int
    mrenclave: str
    sessions: int = 0


@contextlib.contextmanager
def cas_world(root: Path) -> Iterator[Cas]:
    attest._cli("keygen", "owner.pem", cwd=root)
    with attest._service(["las", "--dir", str(root / "las"), "--listen", "127.0.0.1:0"], r":(\d+)$") as las_port:
        (root / "platform.pem").write_text(attest._cli("las", "--dir", root / "las", "--show", cwd=root))
        with attest._cas(root, None) as (pin, _):
            yield Cas(root, pin, las_port, attest._cli("measure", *pin, cwd=root).strip())


def _attested(cas: Cas, work: Path, data: Path, args: list[str]) -> list[str]:
    """A session for this one run (its argv, a new FSPF); the command that attests and runs it."""
    from pyscone.host import fspf_tool as tool

    paths = tool.Paths.of(str(work / "bench.fspf"))
    tool.create(paths)
    tool.add_region(paths, str(data), "encrypted", 4096)
    tag = tool.load(paths)[2]
    key = Path(paths.key).read_text().strip()
    cas.sessions += 1
    name = f"sqlite{cas.sessions}"
    argv = ", ".join(json.dumps(a) for a in args)
    (work / "policy.yaml").write_text(
        f"name: {name}\nservices:\n  app:\n    mrenclaves: [{cas.mrenclave}]\n    cwd: {work}\n"
        f"    argv: [{argv}]\n    fspf: {{path: {paths.fspf}, key: {key}, tag: {tag}}}\n"
    )
    attest._cli("cas", "session", "create", work / "policy.yaml", *cas.pin, "--key", cas.root / "owner.pem", cwd=work)
    Path(paths.key).unlink()  # only the CAS has it now
    las = ["--las", f"127.0.0.1:{cas.las_port}"]
    return [PYTHON, "-m", "pyscone.cli", "run", *cas.pin, "--session", f"{name}/app", *las]


def _run(config: str, root: Path, workload: str, count: int, cas: Cas | None = None) -> float:
    from pyscone.host import fspf_tool as tool

    work = Path(tempfile.mkdtemp(prefix=f"{config}-", dir=root))
    try:
        data = work / "data"
        data.mkdir()
        args = [str(APP), str(data / "bench.db"), workload, str(count)]
        cmd = [PYTHON]
        if config != "native":
            cmd = [PYTHON, "-m", "pyscone.cli", "run", "--no-venv"]
        if config == "encrypted":
            paths = tool.Paths.of(str(work / "bench.fspf"))
            tool.create(paths)
            tool.add_region(paths, str(data), "encrypted", 4096)
            cmd += ["--fspf", str(work / "bench.fspf")]
        if config == "attested":
            assert cas is not None
            shutil.copy(APP, work / "ops.py")
            cmd, args = _attested(cas, work, data, ["ops.py", *args[1:]]), []
        cmd += args
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
    with tempfile.TemporaryDirectory(prefix="pyscone-bench-sqlite-") as tmp, cas_world(Path(tmp)) as cas:
        root = Path(tmp)
        for workload, count in workloads(quick):
            configs = CONFIGS if workload != "select" else CONFIGS[:-1]  # (a select pins nothing)
            # The long single-row commit runs once per round at a tenth in the full run's
            # extra rounds: the first round has the whole count.
            samples: dict[str, list[float]] = {c: [] for c in configs}
            for i in range(rounds):
                n = count if i == 0 or workload != "commit-1" else max(count // 10, 100)
                for config in configs:
                    # Attested single-row commits are slow: a tenth of them (a thousand in a full run).
                    m = max(n // 10, 100) if config == "attested" and workload == "commit-1" else n
                    samples[config].append(_run(config, root, workload, m, cas))
                log(f"sqlite: {workload} round {i + 1}/{rounds}")
            for config in configs:
                results.append(
                    SqliteResult(workload, config, count, round(statistics.median(samples[config]), 1), rounds)
                )
    return results


LIMITS = {
    "select": "unprotected: 8 host round trips per select (4 locks, 2 stats, a read, an fstat); "
    "encrypted: none (the shim answers them from memory)",
    "commit-1": "encrypted: 4 FS-shield commits per transaction (the journal twice, the database, the "
    "journal's unlink), each the data's sync beside the sealed FSPF's write+sync, then the pinned tag's "
    "write+sync: 8 syncs in sequence and about 22 host calls in all",
    "commit-100": "as commit-1, over 100 rows: the per-transaction cost is shared",
    "attested": "each FS-shield commit is a pin report to the CAS (HTTPS, one kept-alive connection), "
    "which commits it to its database before it answers",
}


def report_lines(results: list[SqliteResult]) -> list[str]:
    by = {(r.workload, r.config): r for r in results}
    rows = []
    for workload in dict.fromkeys(r.workload for r in results):
        nat = by[(workload, "native")]
        row = [workload, str(nat.count)]
        for config in CONFIGS:
            r = by.get((workload, config))
            row.append(f"{r.ops_per_s:,.0f}" if r else "-")
            if config != "native":
                row.append(f"{r.ops_per_s / nat.ops_per_s:.2f}x" if r else "-")
        rows.append(row)
    head = (
        f"sqlite: operations/s inside the process, median of {results[0].rounds} round(s) (configurations "
        "alternate); select = point select by primary key, commit-N = single-row inserts committed N per "
        "transaction (rollback journal, synchronous=FULL)"
    )
    headers = ["workload", "count", "native/s", "unprot/s", "vs native", "encrypted/s", "vs native", "attested/s"]
    headers.append("vs native")
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
