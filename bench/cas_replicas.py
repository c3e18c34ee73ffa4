"""Attestations per second with one against two CAS replicas on one PostgreSQL database.

    .venv/bin/python bench/cas_replicas.py [--quick]   # about 1.5 minutes (quick: 20 s)

Two ``pyscone cas serve`` processes share one identity (replica B gets a copy of replica A's
key, certificate and master key, as in docs/kubernetes.md) and one database on a local
PostgreSQL server started for the run.  The same number of client threads loops over
challenge, quote (from one LAS) and attest (``bench/attest.py``'s attestation), against
replica A only ("1 replica") or split half and half between A and B ("2 replicas").  Two
workloads: every client attests the same session (one audit chain, which both replicas
append to), or each client its own session.  The configurations take turns within a
round; the table shows the median of the rounds.  Clients, the LAS, both CAS replicas and
PostgreSQL share the machine's cores, so this measures what a second replica buys *on
this machine*, not on a cluster where each replica has cores of its own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from attest import (  # bench/attest.py, next to this script
    RESULTS,
    AttestBenchError,
    Log,
    _cas,
    _cli,
    _one_attestation,
    _service,
    _throughput_session,
)
from report import table

from pyscone.cas import localpg

IDENTITY = ("cas-key.pem", "cas-cert.pem", "master.key")


@dataclass
class Result:
    replicas: int
    workload: str  # "one session" or "a session per client"
    threads: int
    rounds: list[float]  # attestations/s of each round
    median_per_second: float
    p50_ms: float  # of the median round
    errors: int


def _load(
    urls: list[str], cafile: str, las_port: int, sessions: list[tuple[str, bytes]], threads: int, seconds: float
) -> tuple[float, float, int]:
    """``threads`` clients, client i on ``urls[i % len(urls)]`` and ``sessions[i % len(sessions)]``:
    (attestations/s, median latency ms, attestations that failed)."""
    tls = ssl.create_default_context(cafile=cafile)
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        url, (session, mre) = urls[i % len(urls)], sessions[i % len(sessions)]
        with httpx.Client(verify=tls, timeout=60) as http:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    _one_attestation(http, url, las_port, session, mre)
                except (AttestBenchError, httpx.HTTPError) as e:
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e3)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker, i) for i in range(threads)]:
            f.result()
    elapsed = time.perf_counter() - t0
    if not latencies:
        raise AttestBenchError(f"no attestation succeeded: {errors[:1]}")
    return len(latencies) / elapsed, statistics.median(latencies), len(errors)


def bench(quick: bool, threads: int, log: Log) -> list[Result]:
    rounds, seconds = (1, 2.0) if quick else (3, 5.0)
    root = Path(tempfile.mkdtemp(prefix="pyscone-bench-replicas-"))
    try:
        _cli("keygen", "owner.pem", cwd=root)
        las = ["las", "--dir", str(root / "las"), "--listen", "127.0.0.1:0"]
        with (
            _service(las, r":(\d+)$") as las_port,
            localpg.cluster() as pg,
        ):
            (root / "platform.pem").write_text(_cli("las", "--dir", root / "las", "--show", cwd=root))
            with _cas(root, pg) as (pin, a_dir):
                b_dir = root / "cas-b"
                b_dir.mkdir(mode=0o700)
                for name in IDENTITY:  # one identity: enclaves pin one certificate
                    shutil.copy2(a_dir / name, b_dir / name)
                b_args = ["cas", "serve", "--dir", str(b_dir), "--listen", "127.0.0.1:0", "--db", pg]
                with _service(b_args, r":(\d+);") as b_port:
                    url_a, cafile = pin[1], pin[3]
                    urls = {1: [url_a], 2: [url_a, f"https://127.0.0.1:{b_port}"]}
                    shared = [(f"replicas-{threads}", _throughput_session(root, pin, f"replicas-{threads}"))]
                    own = [(f"replicas-c{i}", _throughput_session(root, pin, f"replicas-c{i}")) for i in range(threads)]
                    workloads = {"one session": shared, "a session per client": own}
                    runs: dict[tuple[int, str], list[tuple[float, float, int]]] = {}
                    for r in range(rounds):
                        for workload, sessions in workloads.items():
                            for n in (1, 2) if r % 2 == 0 else (2, 1):  # take turns
                                got = _load(urls[n], cafile, las_port, sessions, threads, seconds)
                                runs.setdefault((n, workload), []).append(got)
                                log(f"round {r + 1}/{rounds}: {n} replica(s), {workload}: {got[0]:.1f} attest/s")
        results = []
        for (n, workload), got in runs.items():
            ordered = sorted(got)
            mid = ordered[len(ordered) // 2]
            results.append(
                Result(
                    n,
                    workload,
                    threads,
                    [round(g[0], 1) for g in got],
                    round(mid[0], 1),
                    round(mid[1], 1),
                    sum(g[2] for g in got),
                )
            )
        return sorted(results, key=lambda x: (x.workload != "one session", x.replicas))
    except localpg.LocalPgError as e:
        raise AttestBenchError(str(e)) from None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report_lines(results: list[Result]) -> list[str]:
    base = {r.workload: r.median_per_second for r in results if r.replicas == 1}
    rows = [
        [
            r.workload,
            str(r.replicas),
            str(r.threads),
            f"{r.median_per_second:,.1f}",
            f"{r.median_per_second / base[r.workload]:.2f}",
            f"{r.p50_ms:,.0f}",
            " ".join(f"{x:.0f}" for x in r.rounds),
            str(r.errors),
        ]
        for r in results
    ]
    return [
        "CAS replicas on one PostgreSQL: client threads loop challenge -> LAS quote -> attest -> open the "
        "configuration; with 2 replicas the clients are split half and half (clients, LAS, both replicas "
        "and PostgreSQL share the cores)",
        "",
        table(["workload", "replicas", "threads", "attest/s", "x 1 replica", "p50 ms", "rounds", "errors"], rows),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pyscone: attestations/s with one against two CAS replicas")
    p.add_argument("--quick", action="store_true", help="one round of 2 s per configuration")
    p.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    a = p.parse_args(argv)
    started = time.monotonic()
    try:
        results = bench(a.quick, a.threads, lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    except AttestBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"pyscone CAS replicas benchmark{' (quick)' if a.quick else ''}: Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {time.monotonic() - started:.0f} s\n"
    )
    print("\n".join(report_lines(results)), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cas_replicas.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
