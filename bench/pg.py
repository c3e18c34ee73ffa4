"""psycopg 3 (libpq) against one PostgreSQL: simple queries per second, native against the enclave.

    .venv/bin/python bench/pg.py [--quick]             # about 1 minute (quick: 15 s)
    .venv/bin/python bench/run.py --only pg [--quick]  # the same, in bench/results/latest.json

(Not ``bench/psycopg.py``: this directory is on ``sys.path`` when a script here runs, and that
name would shadow the package.)

One PostgreSQL (``pyscone.cas.localpg``, listening on 127.0.0.1 and on a Unix socket) serves
every run.  ``bench/apps/pg_queries.py`` runs N queries on one connection, each a round trip
(``select 1``, and a point select by primary key from a 10,000-row table), natively and with
``pyscone run``, the two alternating within each round; over TCP and over the Unix socket.
Queries per second are the medians over the rounds; the ratio is enclave/native (the issue's
target: >= 0.7).  In the enclave every query is libpq's ``send``, ``poll`` and ``recv`` from C,
each one call through the libc layer (``clib/shim_net.c`` -> ``stdlib/clibnet.py``) and one host call.
Alone, the results go to ``bench/results/pg.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from report import table  # bench/report.py, next to this script

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
APP = BENCH / "apps" / "pg_queries.py"
QUERIES = ("select1", "point")
TRANSPORTS = ("tcp", "unix")
KINDS = ("native", "enclave")
TARGET = 0.7
Log = Callable[[str], None]


class PgBenchError(Exception):
    """A run failed (one line, with the tail of what the process said)."""


@dataclass
class PgResult:
    query: str
    transport: str
    kind: str
    qps: float  # median over the rounds
    samples: list[float]
    queries: int  # per run


def _command(kind: str, conninfo: str, *args: str) -> list[str]:
    py = [sys.executable, str(APP), conninfo, *args]
    return py if kind == "native" else [sys.executable, "-m", "pyscone.cli", "run", *py[1:]]


def _run(cmd: list[str], cwd: Path) -> dict[str, float]:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        raise PgBenchError(f"{' '.join(cmd[-3:])}: timed out") from e
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PgBenchError(f"{' '.join(cmd[-3:])} exited with {r.returncode}: {tail}")
    if not r.stdout.strip():
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def bench_pg(quick: bool, log: Log) -> list[PgResult]:
    from pyscone.cas import localpg

    try:
        with localpg.cluster("bench", tcp=True) as url:
            return _bench(url, quick, log)
    except localpg.LocalPgError as e:
        raise PgBenchError(str(e)) from e


def _bench(url: str, quick: bool, log: Log) -> list[PgResult]:
    rounds, n = (3, 2_000) if quick else (7, 10_000)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    hosts = {"tcp": "127.0.0.1", "unix": query["host"]}
    conninfo = {t: f"host={hosts[t]} port={query['port']} user=postgres dbname=bench" for t in TRANSPORTS}
    results = []
    with tempfile.TemporaryDirectory(prefix="pyscone-bench-pg-") as tmp:
        cwd = Path(tmp)
        _run(_command("native", conninfo["tcp"], "setup"), cwd)
        for what in QUERIES:
            for transport in TRANSPORTS:
                samples: dict[str, list[float]] = {k: [] for k in KINDS}
                for i in range(rounds):
                    for kind in KINDS if i % 2 == 0 else KINDS[::-1]:
                        out = _run(_command(kind, conninfo[transport], what, str(n)), cwd)
                        samples[kind].append(round(out["qps"], 1))
                    log(f"pg: {what} over {transport} round {i + 1}/{rounds}")
                for kind in KINDS:
                    results.append(PgResult(what, transport, kind, statistics.median(samples[kind]), samples[kind], n))
    return results


def report_lines(results: list[PgResult]) -> list[str]:
    by = {(r.query, r.transport, r.kind): r for r in results}
    rows = []
    for what, transport in dict.fromkeys((r.query, r.transport) for r in results):
        nat, enc = by[(what, transport, "native")], by[(what, transport, "enclave")]
        ratio = enc.qps / nat.qps if nat.qps else 0.0
        verdict = "meets" if ratio >= TARGET else "below"
        rows.append([what, transport, f"{nat.qps:,.0f}", f"{enc.qps:,.0f}", f"{ratio:.2f}x", f"{verdict} {TARGET}x"])
    head = (
        f"pg: psycopg 3 queries per second on one connection, median of {len(results[0].samples)} rounds of "
        f"{results[0].queries} queries (native and enclave alternate); select1 = 'select 1', point = a primary-key "
        "select from 10,000 rows"
    )
    headers = ["query", "via", "native q/s", "enclave q/s", "enclave/native", "target"]
    return [head, "", table(headers, rows), ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    started = time.time()
    try:
        results = bench_pg(a.quick, lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    except PgBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(results)))
    RESULTS.mkdir(exist_ok=True)
    report = {"started": started, "quick": a.quick, "pg": [asdict(r) for r in results]}
    (RESULTS / "pg.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {(RESULTS / 'pg.json').relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
