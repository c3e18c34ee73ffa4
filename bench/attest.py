"""Attestation costs: start-up latency of an attested run, and attestations per second of one CAS.

    .venv/bin/python bench/attest.py [--quick]             # about 1 minute (quick: 20 s)
    .venv/bin/python bench/run.py --only attest [--quick]  # the same, in bench/results/latest.json

* start-up: wall time of a program that prints one line, median over runs, for native
  ``python``, ``pyscone run`` in dev mode, ``pyscone run --signature`` (measured and
  admitted, no CAS) and ``pyscone run --cas --session`` (measured, quoted by the LAS,
  attested by the CAS, configuration received); the kinds take turns within a round.
* throughput: attestations per second of one CAS on SQLite and on PostgreSQL (a local
  server started for the run): client threads each loop over challenge, quote (from
  the LAS) and attest, and count the configurations received.  The client, the LAS
  and the CAS share the machine's cores, so this is a floor of the CAS's capacity.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from report import table  # bench/report.py, next to this script

from pyscone.cas import localpg, protocol
from pyscone.platform import keys, quote

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PYSCONE = [sys.executable, "-m", "pyscone.cli"]
KINDS = ("native", "dev", "signed", "attested")

Log = Callable[[str], None]


class AttestBenchError(Exception):
    """A benchmark step failed (one line, with the tail of what the process said)."""


@dataclass
class Startup:
    kind: str
    median_ms: float
    min_ms: float
    runs: int


@dataclass
class Throughput:
    db: str
    threads: int
    seconds: float
    attestations: int
    per_second: float
    p50_ms: float
    p99_ms: float


@dataclass
class AttestReport:
    startup: list[Startup]
    throughput: list[Throughput]


def _cli(*args: str | Path, cwd: Path) -> str:
    r = subprocess.run([*PYSCONE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise AttestBenchError(f"pyscone {' '.join(map(str, args[:3]))}: {r.stderr.strip()[-500:]}")
    return r.stdout


@contextlib.contextmanager
def _service(args: list[str], pattern: str) -> Iterator[int]:
    # The service's log goes to a file (an unread pipe would block it once full) and is shown on failure.
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([*PYSCONE, *args], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(pattern, line)
        if m is None:
            proc.kill()
            proc.wait()
            log.seek(0)
            raise AttestBenchError(f"pyscone {args[0]} did not start: {line}{log.read()[-500:]}")
        try:
            yield int(m.group(1))
        except AttestBenchError as e:
            log.seek(0)
            raise AttestBenchError(f"{e}\n{'-' * 20} pyscone {args[0]}'s log:\n{log.read()[-3000:]}") from None
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


@contextlib.contextmanager
def _cas(root: Path, db: str | None) -> Iterator[tuple[list[str], Path]]:
    """A CAS (on ``db``, or SQLite) that trusts the LAS whose key is in ``root/platform.pem``."""
    directory = Path(tempfile.mkdtemp(prefix="cas-", dir=root))
    args = ["cas", "serve", "--dir", str(directory), "--listen", "127.0.0.1:0"] + (["--db", db] if db else [])
    with _service(args, r":(\d+);") as port:
        _cli("cas", "trust", "--dir", directory, *(["--db", db] if db else []), "platform.pem", cwd=root)
        yield ["--cas", f"https://127.0.0.1:{port}", "--cas-cert", str(directory / "cas-cert.pem")], directory


def _time_run(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0 or r.stdout.strip() != "ready":
        raise AttestBenchError(f"{' '.join(cmd[3:6])}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return elapsed * 1e3


def bench_startup(root: Path, pin: list[str], las_port: int, runs: int, log: Log) -> list[Startup]:
    (root / "hello.py").write_text("print('ready')\n")
    _cli("keygen", "signer.pem", cwd=root)
    _cli("sign", "--key", "signer.pem", "-o", "hello.sig", cwd=root)
    mre = _cli("measure", *pin, cwd=root).strip()
    (root / "startup.yaml").write_text(
        f"name: startup\nservices:\n  app:\n    mrenclaves: [{mre}]\n    cwd: {root}\n    argv: [hello.py]\n"
    )
    _cli("cas", "session", "create", "startup.yaml", *pin, "--key", "owner.pem", cwd=root)
    cmds = {
        "native": [sys.executable, "hello.py"],
        "dev": [*PYSCONE, "run", "hello.py"],
        "signed": [*PYSCONE, "run", "--signature", "hello.sig", "hello.py"],
        "attested": [*PYSCONE, "run", *pin, "--session", "startup/app", "--las", f"127.0.0.1:{las_port}"],
    }
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(runs):
        for kind in KINDS:
            times[kind].append(_time_run(cmds[kind], root))
        log(f"attest start-up round {i + 1}/{runs}: " + ", ".join(f"{k} {times[k][-1]:.0f} ms" for k in KINDS))
    return [Startup(k, round(statistics.median(v), 1), round(min(v), 1), len(v)) for k, v in times.items()]


def _throughput_session(root: Path, pin: list[str], name: str) -> bytes:
    mre = os.urandom(32)
    (root / f"{name}.yaml").write_text(
        f"name: {name}\nservices:\n  app:\n    mrenclaves: ['{mre.hex()}']\n    argv: [app.py]\n"
        f"    env: {{TOKEN: '${{secret:tok}}'}}\nsecrets:\n  tok: {{kind: random}}\n"
    )
    _cli("cas", "session", "create", f"{name}.yaml", *pin, "--key", "owner.pem", cwd=root)
    return mre


def _one_attestation(http: httpx.Client, url: str, las_port: int, session: str, mre: bytes) -> None:
    nonce = http.post(url + "/v1/challenge", json={"session": session, "service": "app"}).json()["nonce"]
    key = keys.generate()
    public = keys.public_der(key)
    report = quote.Report(mre, bytes(32), 0, 0, False, quote.report_data(public, bytes.fromhex(nonce)))
    with socket.create_connection(("127.0.0.1", las_port)) as s, s.makefile("rb") as f:
        s.sendall(json.dumps({"op": "quote", "report": report.pack().hex()}).encode() + b"\n")
        blob = json.loads(f.readline())["quote"]
    doc = {"session": session, "service": "app", "nonce": nonce, "quote": blob, "public_key": public.hex()}
    r = http.post(url + "/v1/attest", json=doc)
    if r.status_code != 200:
        raise AttestBenchError(f"attestation refused: {r.text}")
    config = protocol.open_config(key, bytes.fromhex(nonce), bytes.fromhex(r.json()["sealed"]))
    if len(config["env"]["TOKEN"]) != 64:
        raise AttestBenchError("the configuration lacks its secret")


def bench_throughput(
    root: Path, pin: list[str], las_port: int, db: str, threads: int, seconds: float, log: Log
) -> Throughput:
    mre = _throughput_session(root, pin, f"load-{db}")
    url = pin[1]
    tls = ssl.create_default_context(cafile=pin[3])
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(verify=tls, timeout=60) as http:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                _one_attestation(http, url, las_port, f"load-{db}", mre)
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e3)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker) for _ in range(threads)]:
            f.result()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    result = Throughput(
        db,
        threads,
        round(elapsed, 2),
        len(latencies),
        round(len(latencies) / elapsed, 1),
        round(latencies[len(latencies) // 2], 1),
        round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
    )
    log(f"attest throughput {db}: {result.per_second} attestations/s ({result.attestations} in {result.seconds} s)")
    return result


def bench_attest(quick: bool, log: Log) -> AttestReport:
    runs, seconds, threads = (3, 3.0, 8) if quick else (10, 10.0, 8)
    root = Path(tempfile.mkdtemp(prefix="pyscone-bench-attest-"))
    try:
        _cli("keygen", "owner.pem", cwd=root)
        with _service(["las", "--dir", str(root / "las"), "--listen", "127.0.0.1:0"], r":(\d+)$") as las_port:
            (root / "platform.pem").write_text(_cli("las", "--dir", root / "las", "--show", cwd=root))
            with _cas(root, None) as (pin, _):
                startup = bench_startup(root, pin, las_port, runs, log)
                throughput = [bench_throughput(root, pin, las_port, "sqlite", threads, seconds, log)]
            with localpg.cluster() as pg, _cas(root, pg) as (pin, _):
                throughput.append(bench_throughput(root, pin, las_port, "postgresql", threads, seconds, log))
        return AttestReport(startup, throughput)
    except localpg.LocalPgError as e:
        raise AttestBenchError(str(e)) from None
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report_lines(r: AttestReport) -> list[str]:
    by = {s.kind: s for s in r.startup}
    native, dev = by["native"].median_ms, by["dev"].median_ms
    rows = [
        [s.kind, f"{s.median_ms:,.0f}", f"{s.min_ms:,.0f}", f"{s.median_ms / native:.1f}", f"{s.median_ms - dev:+,.0f}"]
        for s in r.startup
    ]
    trows = [
        [t.db, str(t.threads), f"{t.per_second:,.1f}", str(t.attestations), f"{t.p50_ms:,.0f}", f"{t.p99_ms:,.0f}"]
        for t in r.throughput
    ]
    return [
        f"attest start-up: a program that prints one line, wall time, median of {r.startup[0].runs} runs; "
        "x/native = median / native median; vs dev = median - dev-mode median",
        "",
        table(["start-up", "median ms", "min ms", "x/native", "vs dev ms"], rows),
        "",
        "attest throughput: one CAS, client threads looping challenge -> LAS quote -> attest -> open the "
        "configuration (client, LAS and CAS share the cores)",
        "",
        table(["database", "threads", "attest/s", "attestations", "p50 ms", "p99 ms"], trows),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pyscone attestation: start-up latency and CAS throughput")
    p.add_argument("--quick", action="store_true", help="3 start-up runs, 3 s of load per database")
    a = p.parse_args(argv)
    started = time.monotonic()
    try:
        report = bench_attest(a.quick, lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    except AttestBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"pyscone attestation benchmark{' (quick)' if a.quick else ''}: Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {time.monotonic() - started:.0f} s\n"
    )
    print("\n".join(report_lines(report)), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attest.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
