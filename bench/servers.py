"""Throughput of the compatibility matrix's servers: native Python against the enclave, with wrk.

    .venv/bin/python bench/servers.py [--quick]             # about 6 minutes (quick: 2)
    .venv/bin/python bench/run.py --only servers [--quick]  # the same, in bench/results/latest.json

Every server case of ``tests/compat/matrix.py`` (the ordinary apps of the compatibility
matrix, unmodified: Flask on waitress and on its dev server, Django, FastAPI on uvicorn and
hypercorn, aiohttp, tornado, bottle, CherryPy, falcon, the stdlib baselines) is started
with ``python ARGV`` and with ``pyscone run ARGV`` and driven by ``wrk -t1 -c16`` for D
seconds after one warm-up request; native and enclave alternate, for R rounds, and the
median req/s of each is compared.  Cases served over HTTPS, and those that do not work in
the enclave yet (``tests/compat/expected.json``), are listed but not measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from report import table  # bench/report.py, next to this script

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "compat"))
import matrix  # tests/compat/matrix.py: the cases and their drivers

Log = Callable[[str], None]


@dataclass
class ServerThroughput:
    case: str
    covers: str
    native: list[float] = field(default_factory=list)  # req/s per round
    enclave: list[float] = field(default_factory=list)
    skipped: str = ""  # why it was not measured

    @property
    def ratio(self) -> float | None:
        if not self.native or not self.enclave:
            return None
        return statistics.median(self.enclave) / statistics.median(self.native)


def bench_servers(quick: bool, log: Log, only: list[str] | None = None) -> list[ServerThroughput]:
    seconds, rounds = (3.0, 1) if quick else (5.0, 2)
    expected = matrix.expected()
    results = []
    with tempfile.TemporaryDirectory(prefix="pyscone-bench-servers-") as tmp:
        env = matrix.Env(Path(tmp))
        for case in matrix.CASES:
            if not case.server or (only and case.name not in only):
                continue
            res = ServerThroughput(case.name, case.covers)
            results.append(res)
            if case.https:
                res.skipped = "served over HTTPS (not compared with wrk)"
                continue
            if expected.get(case.name, {}).get("enclave") == "fails":
                res.skipped = "does not work in the enclave yet: " + expected[case.name].get("error", "")
                continue
            for i in range(rounds):
                for mode in matrix.MODES:
                    rps = matrix.throughput(case, mode, env, seconds)
                    if rps is None:
                        res.skipped = f"{mode} run did not serve"
                        break
                    (res.native if mode == "native" else res.enclave).append(rps)
                if res.skipped:
                    break
                n, e = res.native[-1], res.enclave[-1]
                log(f"servers: {case.name} round {i + 1}/{rounds}: native {n:,.0f}, enclave {e:,.0f} req/s")
    return results


def report_lines(results: list[ServerThroughput], quick: bool) -> list[str]:
    seconds, rounds = (3, 1) if quick else (5, 2)
    rows = []
    for r in results:
        if r.ratio is None:
            rows.append([r.case, "—", "—", "—", r.skipped[:70]])
            continue
        rows.append(
            [
                r.case,
                f"{statistics.median(r.native):,.0f}",
                f"{statistics.median(r.enclave):,.0f}",
                f"{r.ratio:.2f}x",
                " / ".join(f"{e / n:.2f}" for n, e in zip(r.native, r.enclave, strict=True)),
            ]
        )
    measured = [r for r in results if r.ratio is not None]
    worst = sorted(measured, key=lambda r: r.ratio or 0)[:3]
    head = (
        f"servers: the compatibility matrix's server apps, wrk -t1 -c16 -d{seconds}s after a warm-up request, "
        f"{rounds} round(s), native and enclave alternating; median req/s"
    )
    return [
        head,
        "",
        table(["case", "native req/s", "enclave req/s", "enclave/native", "per round / note"], rows),
        "",
        "slowest three against native: " + ", ".join(f"{r.case} {r.ratio:.2f}x" for r in worst),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--case", action="append", default=None, help="measure only this case (repeatable)")
    a = p.parse_args(argv)
    results = bench_servers(a.quick, lambda m: print(f"  {m}", file=sys.stderr, flush=True), a.case)
    print("\n".join(report_lines(results, a.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
