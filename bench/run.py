"""Run pyscone's benchmarks side by side with native Python and print one table.

    .venv/bin/python bench/run.py            # every part (sqlite about 4 minutes and pg about 2 of them)
    .venv/bin/python bench/run.py --quick    # short runs of every part
    .venv/bin/python bench/run.py --only fs  # one part: syscalls, http, fs, attest, imports, servers, sqlite, pg, tls
                                             # or console, procs

What is measured, native Python against ``pyscone run``:

* syscalls: ``bench/syscalls.py`` (``os.pread`` of 64 bytes from T threads,
  T = 1, 8, 64) natively, in an enclave with asynchronous system calls and in
  one with synchronous system calls;
* http.server: ``python -m http.server`` driven by ``wrk``;
* asyncio: ``bench/apps/aio_http.py`` driven by ``wrk``;
* fs: the file-system shield, ``bench/fs.py``: ``bench/apps/fs_io.py`` (sequential and
  random reads and writes, 4 KiB and 64 KiB blocks) natively and in an enclave on an
  encrypted, an authenticated and an unprotected path; a per-chunk crypto
  micro-benchmark; where an encrypted 64 KiB write and read spend their time;
* attest: ``bench/attest.py``: start-up of an attested run against native, dev-mode and
  signed runs; attestations per second of one CAS on SQLite and on PostgreSQL.
* imports: ``bench/imports.py``: ``import flask`` and ``django.setup()`` natively and in
  an enclave with and without its verified bytecode cache (in-process and wall time);
* servers: ``bench/servers.py``: every server app of the compatibility matrix
  (``tests/compat/``) natively and in an enclave, driven by ``wrk``;
* sqlite: ``bench/sqlite.py``: point selects and single-row commits (1 and 100 per
  transaction) natively and in an enclave on an unprotected path and in an encrypted region;
* pg: ``bench/pg.py``: psycopg 3 queries per second against one PostgreSQL (``select 1``
  and a point select by primary key), over TCP and a Unix socket, natively and in an enclave;
* tls: ``bench/tls.py``: the network shield: HTTPS requests/s and TLS handshakes/s of a plain
  asyncio server (and a Redis-protocol server under ``redis-benchmark --tls``) in an enclave behind
  the shield, natively behind stunnel4, natively with ``ssl``, and plain for reference;
* console: ``bench/console.py``: an app printing lines (buffered and flushed) and 64 KiB writes to
  a pipe, natively and in an enclave without and with the console shield.
* procs: ``bench/procs.py``: ``multiprocessing.Pool(2).map`` of small CPU tasks (tasks/s), natively and
  in an enclave.

Native and enclave runs alternate.  CPU time is that of the whole process tree
(host + enclave) from ``getrusage(RUSAGE_CHILDREN)`` deltas taken around each
run; for the servers the CPU of ``wrk`` (also a child) is measured separately
and subtracted.  Results also go to ``bench/results/latest.json``; server
stderr goes to ``bench/results/logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import attest  # bench/attest.py, next to this script
import console  # bench/console.py, next to this script
import fs  # bench/fs.py, next to this script
import imports  # bench/imports.py, next to this script
import pg  # bench/pg.py, next to this script
import procs as procs_bench  # bench/procs.py, next to this script
import servers  # bench/servers.py, next to this script
import sqlite  # bench/sqlite.py, next to this script
import tls  # bench/tls.py, next to this script
from report import table  # bench/report.py, next to this script

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
LOGS = RESULTS / "logs"
SYSCALLS_PY = BENCH / "syscalls.py"
AIO_HTTP_PY = BENCH / "apps" / "aio_http.py"
PYTHON = sys.executable
THREAD_COUNTS = (1, 8, 64)
BODY_BYTES = 100
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
SETTLE_S = 0.5  # after wrk, let the server drain its backlog before ^C


class BenchError(Exception):
    """A benchmark could not run: reported in one line."""


# --------------------------------------------------------------------------- helpers


def pyscone_cmd() -> list[str]:
    """The ``pyscone`` command of the interpreter running this script."""
    script = Path(PYTHON).parent / "pyscone"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [PYTHON, "-m", "pyscone.cli"]


def children_cpu() -> float:
    """User + system CPU seconds of all waited-for descendants so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


ACCESS_LOG_LINE = re.compile(r"^\d+\.\d+\.\d+\.\d+ - - \[")  # http.server's per-request log


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a server's stderr, without http.server's access-log lines."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join([ln for ln in text.splitlines() if not ACCESS_LOG_LINE.match(ln)][-lines:])


EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit|Warning))\b")


def exception_summary(path: Path) -> dict[str, int]:
    """Exception names found at the start of stderr lines, with counts."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    return dict(Counter(m.group(1) for line in text.splitlines() if (m := EXC_LINE.match(line))))


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def reset_sigint() -> None:
    """In the child before exec: a ^C-able server even if our SIGINT is ignored
    (as it is for background jobs of a non-interactive shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --------------------------------------------------------------------------- processes


class Processes:
    """Every process we start; whatever is still alive is killed at the end."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: Sequence[str], stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=reset_sigint,
        )
        self.live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> str:
        """^C the process group, wait; SIGKILL it after STOP_TIMEOUT_S.  Returns how it ended."""
        how = "exited"
        if proc.poll() is None:
            how = "sigint"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                how = "sigkill"
        self._kill_group(proc)
        proc.wait()
        if proc in self.live:
            self.live.remove(proc)
        return how

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes]) -> None:
        # Also reaches an enclave child left behind by its host.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        for proc in list(self.live):
            self._kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)
            self.live.remove(proc)


# --------------------------------------------------------------------------- syscalls


SYSCALL_MODES: dict[str, list[str]] = {
    "native": [PYTHON, str(SYSCALLS_PY)],
    "async": [*pyscone_cmd(), "run", "--syscalls", "async", str(SYSCALLS_PY)],
    "sync": [*pyscone_cmd(), "run", "--syscalls", "sync", str(SYSCALLS_PY)],
    # One outstanding call like sync, but both sides spin: isolates what overlap alone buys.
    "sync+spin": [*pyscone_cmd(), "run", "--syscalls", "sync", "--spin-us", "50", str(SYSCALLS_PY)],
}


@dataclass
class SyscallRun:
    mode: str
    threads: int
    calls: int
    seconds: float
    calls_per_s: float
    us_per_call: float
    cpu_s: float  # whole process tree, whole run (start-up included)


def run_syscalls_once(procs: Processes, mode: str, threads: int, calls: int) -> SyscallRun:
    cmd = [*SYSCALL_MODES[mode], "--threads", str(threads), "--calls", str(calls)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        cpu0 = children_cpu()
        proc = procs.start(cmd, out, err)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            procs.stop(proc)
            raise BenchError(f"syscalls {mode} T={threads}: no result after 60 s") from None
        procs.live.remove(proc)
        cpu = children_cpu() - cpu0
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if rc != 0 or not lines:
        detail = "\n".join(stderr.splitlines()[-20:])
        raise BenchError(f"syscalls {mode} T={threads}: exit status {rc}, no result\n{detail}")
    r = json.loads(lines[-1])
    return SyscallRun(
        mode, threads, int(r["calls"]), float(r["seconds"]), float(r["calls_per_s"]), float(r["us_per_call"]), cpu
    )


@dataclass
class SyscallResult:
    mode: str
    threads: int
    calls: int
    calls_per_s: float  # median over repetitions
    us_per_call: float
    cpu_us_per_call: float  # net of a start-up baseline run (one call per thread)
    cpu_us_per_call_gross: float  # whole run's CPU / calls
    runs: list[SyscallRun] = field(default_factory=list)
    baseline: SyscallRun | None = None


def bench_syscalls(procs: Processes, calls: int, reps: int, log: Any) -> list[SyscallResult]:
    runs: dict[tuple[str, int], list[SyscallRun]] = {}
    baselines: dict[tuple[str, int], SyscallRun] = {}
    for threads in THREAD_COUNTS:
        for mode in SYSCALL_MODES:  # one baseline per config: start-up + exit cost
            baselines[mode, threads] = run_syscalls_once(procs, mode, threads, threads)
        for rep in range(reps):
            for mode in SYSCALL_MODES:  # native, async, sync alternate
                r = run_syscalls_once(procs, mode, threads, calls)
                runs.setdefault((mode, threads), []).append(r)
                log(f"syscalls T={threads:<2} {mode:<6} rep {rep + 1}: {r.calls_per_s:>12,.0f} calls/s")
    results = []
    for (mode, threads), rs in runs.items():
        base = baselines[mode, threads]
        n = rs[0].calls
        cpu = statistics.median(r.cpu_s for r in rs)
        results.append(
            SyscallResult(
                mode=mode,
                threads=threads,
                calls=n,
                calls_per_s=statistics.median(r.calls_per_s for r in rs),
                us_per_call=statistics.median(r.us_per_call for r in rs),
                cpu_us_per_call=max(0.0, cpu - base.cpu_s) / max(1, n - base.calls) * 1e6,
                cpu_us_per_call_gross=cpu / n * 1e6,
                runs=rs,
                baseline=base,
            )
        )
    return results


# --------------------------------------------------------------------------- http


@dataclass
class WrkResult:
    requests: int
    seconds: float
    requests_per_s: float
    latency_avg_ms: float
    latency_max_ms: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    socket_errors: dict[str, int]
    non_2xx: int
    cpu_s: float  # wrk's own CPU


TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise BenchError(f"wrk: cannot parse time {text!r}")
    return float(m.group(1)) * TIME_UNITS_MS[m.group(2)]


def parse_wrk(output: str, cpu_s: float) -> WrkResult:
    req = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", output, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    lat = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", output, re.M)
    if not (req and rps and lat):
        raise BenchError("wrk: unexpected output:\n" + output)
    pct = {p: parse_ms(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)", output, re.M)}
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        errors = dict(zip(errors, map(int, m.groups()), strict=True))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(req.group(1)),
        seconds=parse_ms(req.group(2) + req.group(3)) / 1e3,
        requests_per_s=float(rps.group(1)),
        latency_avg_ms=parse_ms(lat.group(1)),
        latency_max_ms=parse_ms(lat.group(3)),
        latency_p50_ms=pct.get("50"),
        latency_p99_ms=pct.get("99"),
        socket_errors=errors,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        cpu_s=cpu_s,
    )


def wait_ready(proc: subprocess.Popen[bytes], port: int) -> float:
    """Connect until the server accepts; returns seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < READY_TIMEOUT_S:
        if proc.poll() is not None:
            raise BenchError(f"server exited with status {proc.returncode} before accepting connections")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return time.monotonic() - t0
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"server did not accept connections on port {port} within {READY_TIMEOUT_S:.0f} s")


@dataclass
class ServerRun:
    app: str
    runtime: str  # native | enclave
    round: int
    ready_s: float = 0.0
    stopped: str = ""  # sigint | sigkill | exited
    exit_status: int | None = None
    server_cpu_s: float = 0.0  # whole server process tree, start to exit, wrk excluded
    wrk: WrkResult | None = None
    error: str | None = None
    stderr_log: str = ""
    stderr_exceptions: dict[str, int] = field(default_factory=dict)
    stderr_tail: str | None = None  # kept when the server misbehaved

    @property
    def misbehaved(self) -> bool:
        """The server failed, answered nothing or wrongly, or did not stop on ^C.
        (wrk's socket errors alone are reported, not counted: a slow server times out.)"""
        w = self.wrk
        return bool(
            self.error
            or self.stopped != "sigint"
            or self.exit_status not in (0, 130)
            or w is None
            or w.requests == 0
            or w.non_2xx
        )


def server_cmd(app: str, runtime: str, port: int, www: Path) -> list[str]:
    if app == "http.server":
        args = ["-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(www)]
    elif app == "asyncio":
        args = [str(AIO_HTTP_PY), str(port), "127.0.0.1"]
    else:
        raise ValueError(app)
    return [PYTHON, *args] if runtime == "native" else [*pyscone_cmd(), "run", *args]


def run_server_once(procs: Processes, app: str, runtime: str, rnd: int, duration: int, www: Path) -> ServerRun:
    run = ServerRun(app, runtime, rnd)
    port = free_port()
    log_path = LOGS / f"{app}-{runtime}-{rnd}.stderr"
    run.stderr_log = str(log_path.relative_to(ROOT))
    url = f"http://127.0.0.1:{port}/index.html"
    wrk_cmd = ["wrk", "-t2", "-c16", f"-d{duration}s", "--latency", url]
    with open(log_path, "wb") as err:
        cpu0 = children_cpu()
        proc = procs.start(server_cmd(app, runtime, port, www), subprocess.DEVNULL, err)
        wrk_cpu = 0.0
        try:
            run.ready_s = wait_ready(proc, port)
            w0 = children_cpu()
            try:
                out = subprocess.run(
                    wrk_cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration + 30, check=False
                )
            finally:
                wrk_cpu = children_cpu() - w0
            if out.returncode != 0:
                raise BenchError(f"wrk exited with status {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
            run.wrk = parse_wrk(out.stdout, wrk_cpu)
            if proc.poll() is not None:
                raise BenchError(f"server exited with status {proc.returncode} during the run")
            time.sleep(SETTLE_S)
        except (BenchError, subprocess.TimeoutExpired) as e:
            run.error = str(e).splitlines()[0]
        finally:
            run.stopped = procs.stop(proc)
            run.exit_status = proc.returncode
            run.server_cpu_s = children_cpu() - cpu0 - wrk_cpu
    run.stderr_exceptions = exception_summary(log_path)
    if run.misbehaved:
        run.stderr_tail = tail(log_path)
    return run


@dataclass
class ServerResult:
    app: str
    runtime: str
    requests_per_s: float | None
    latency_avg_ms: float | None
    latency_p99_ms: float | None
    errors: int
    cpu_us_per_request: float | None
    runs: list[ServerRun]


def aggregate(app: str, runtime: str, runs: list[ServerRun]) -> ServerResult:
    ok = [r for r in runs if r.wrk is not None]
    if not ok:
        return ServerResult(app, runtime, None, None, None, 0, None, runs)
    walls = [r.wrk for r in ok if r.wrk]
    requests = sum(w.requests for w in walls)
    seconds = sum(w.seconds for w in walls)
    p99s = [w.latency_p99_ms for w in walls if w.latency_p99_ms is not None]
    return ServerResult(
        app=app,
        runtime=runtime,
        requests_per_s=requests / seconds if seconds else None,
        latency_avg_ms=statistics.fmean(w.latency_avg_ms for w in walls),
        latency_p99_ms=max(p99s) if p99s else None,
        errors=sum(sum(w.socket_errors.values()) + w.non_2xx for w in walls),
        cpu_us_per_request=sum(r.server_cpu_s for r in ok) / requests * 1e6 if requests else None,
        runs=runs,
    )


def bench_http(procs: Processes, duration: int, rounds: int, log: Any) -> list[ServerResult]:
    www = Path(tempfile.mkdtemp(prefix="pyscone-bench-www-"))
    try:
        (www / "index.html").write_bytes((b"<p>pyscone benchmark</p>" * 5)[: BODY_BYTES - 1] + b"\n")
        runs: dict[tuple[str, str], list[ServerRun]] = {}
        for rnd in range(1, rounds + 1):
            for app in ("http.server", "asyncio"):
                for runtime in ("native", "enclave"):
                    r = run_server_once(procs, app, runtime, rnd, duration, www)
                    runs.setdefault((app, runtime), []).append(r)
                    rps = f"{r.wrk.requests_per_s:>9,.0f} req/s" if r.wrk else "no result"
                    log(
                        f"{app:<11} {runtime:<7} round {rnd}: {rps}, stopped by {r.stopped}, "
                        f"status {r.exit_status}" + (f", ERROR: {r.error}" if r.error else "")
                    )
        return [aggregate(app, runtime, rs) for (app, runtime), rs in runs.items()]
    finally:
        shutil.rmtree(www, ignore_errors=True)


# --------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def syscall_table(results: list[SyscallResult]) -> str:
    by = {(r.mode, r.threads): r for r in results}
    rows = []
    for t in THREAD_COUNTS:
        n, a, s = by.get(("native", t)), by.get(("async", t)), by.get(("sync", t))
        ss = by.get(("sync+spin", t))
        if not (n and a and s and ss):
            continue
        rows.append(
            [
                str(t),
                fmt(n.calls_per_s),
                fmt(a.calls_per_s),
                fmt(s.calls_per_s),
                fmt(ss.calls_per_s),
                fmt_ratio(ratio(a.calls_per_s, s.calls_per_s)),
                fmt_ratio(ratio(a.calls_per_s, ss.calls_per_s)),
                fmt_ratio(ratio(a.calls_per_s, n.calls_per_s)),
                fmt_ratio(ratio(s.calls_per_s, n.calls_per_s)),
                fmt(n.cpu_us_per_call, ".2f"),
                fmt(a.cpu_us_per_call, ".2f"),
                fmt(s.cpu_us_per_call, ".2f"),
            ]
        )
    return table(
        [
            "threads",
            "native/s",
            "async/s",
            "sync/s",
            "sync+spin/s",
            "async/sync",
            "async/sync+spin",
            "async/nat",
            "sync/nat",
            "cpu-us nat",
            "cpu-us async",
            "cpu-us sync",
        ],
        rows,
    )


def http_table(results: list[ServerResult]) -> str:
    by = {(r.app, r.runtime): r for r in results}
    rows = []
    for r in results:
        native = by.get((r.app, "native"))
        enclave = r.runtime == "enclave" and native is not None
        rows.append(
            [
                r.app,
                r.runtime,
                fmt(r.requests_per_s),
                fmt(r.latency_avg_ms, ".2f", " ms"),
                fmt(r.latency_p99_ms, ".2f", " ms"),
                str(r.errors),
                fmt(r.cpu_us_per_request, ".0f"),
                fmt_ratio(ratio(r.requests_per_s, native.requests_per_s)) if enclave and native else "",
                fmt_ratio(ratio(r.cpu_us_per_request, native.cpu_us_per_request)) if enclave and native else "",
            ]
        )
    return table(
        [
            "server",
            "runtime",
            "req/s",
            "lat avg",
            "lat p99",
            "errors",
            "cpu-us/req",
            "req/s enc/nat",
            "cpu/req enc/nat",
        ],
        rows,
    )


def notes(results: list[ServerResult]) -> list[str]:
    out = []
    for res in results:
        for r in res.runs:
            exc = ", ".join(f"{k} x{v}" for k, v in sorted(r.stderr_exceptions.items()))
            w = r.wrk
            errs = "" if w is None else ", ".join(f"{k} {v}" for k, v in w.socket_errors.items() if v)
            if w is not None and w.non_2xx:
                errs += f"{', ' if errs else ''}non-2xx {w.non_2xx}"
            line = (
                f"{r.app} {r.runtime} round {r.round}: stopped by {r.stopped}, status {r.exit_status}, "
                f"ready in {r.ready_s:.2f} s"
                + (f"; wrk socket errors: {errs}" if errs else "")
                + (f"; stderr exceptions: {exc}" if exc else "")
                + (f"; ERROR: {r.error}" if r.error else "")
            )
            out.append(line)
            if r.stderr_tail is not None:
                out.append(f"  server misbehaved; tail of its stderr without access-log lines ({r.stderr_log}):")
                out.extend("    " + ln for ln in r.stderr_tail.splitlines() or ["(empty)"])
    return out


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pyscone benchmarks: enclave vs native Python, side by side")
    p.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    p.add_argument(
        "--calls", type=int, default=None, help="os.pread calls per syscalls run (default 50000, quick 20000)"
    )
    p.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 10, quick 3)")
    parts = ("syscalls", "http", "fs", "attest", "imports", "servers", "sqlite", "pg", "tls", "console", "procs")
    p.add_argument("--only", choices=parts, default=None, help="run one part only")
    a = p.parse_args(argv)
    calls = a.calls or (20_000 if a.quick else 50_000)
    duration = a.duration or (3 if a.quick else 10)
    reps = 1 if a.quick else 3
    rounds = 1 if a.quick else 2

    if a.only in (None, "http", "servers") and shutil.which("wrk") is None:
        print("error: wrk not found: run scripts/setup.sh", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    RESULTS.mkdir(exist_ok=True)
    LOGS.mkdir(exist_ok=True)

    def log(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    procs = Processes()
    load_before = os.getloadavg()[0]
    started_at = time.localtime()
    started = time.monotonic()
    sys_results: list[SyscallResult] = []
    http_results: list[ServerResult] = []
    fs_report: fs.FsReport | None = None
    attest_report: attest.AttestReport | None = None
    import_results: list[imports.ImportResult] = []
    server_results: list[servers.ServerThroughput] = []
    sqlite_results: list[sqlite.SqliteResult] = []
    pg_results: list[pg.PgResult] = []
    tls_report: tls.TlsReport | None = None
    console_results: list[console.ConsoleResult] = []
    procs_results: list[procs_bench.ProcsResult] = []
    try:
        if a.only in (None, "syscalls"):
            sys_results = bench_syscalls(procs, calls, reps, log)
        if a.only in (None, "http"):
            http_results = bench_http(procs, duration, rounds, log)
        if a.only in (None, "fs"):
            fs_report = fs.bench_fs(a.quick, log)
        if a.only in (None, "attest"):
            attest_report = attest.bench_attest(a.quick, log)
        if a.only in (None, "imports"):
            import_results = imports.bench_imports(a.quick, log)
        if a.only in (None, "servers"):
            server_results = servers.bench_servers(a.quick, log)
        if a.only in (None, "sqlite"):
            sqlite_results = sqlite.bench_sqlite(a.quick, log)
        if a.only in (None, "pg"):
            pg_results = pg.bench_pg(a.quick, log)
        if a.only in (None, "tls"):
            tls_report = tls.bench_tls(a.quick, log)
        if a.only in (None, "console"):
            console_results = console.bench_console(a.quick, log)
        if a.only in (None, "procs"):
            procs_results = procs_bench.bench_procs(a.quick, log)
    except (
        BenchError,
        fs.FsBenchError,
        attest.AttestBenchError,
        imports.ImportBenchError,
        sqlite.SqliteBenchError,
        pg.PgBenchError,
        tls.TlsBenchError,
        console.ConsoleBenchError,
        procs_bench.ProcsBenchError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.kill_all()
    elapsed = time.monotonic() - started

    header = (
        f"pyscone benchmarks{' (quick)' if a.quick else ''}: Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M:%S', started_at)}, {elapsed:.0f} s, "
        f"load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after"
    )
    out = [header, ""]
    if sys_results:
        out += [
            f"syscalls: os.pread(fd, 64, 0), {sys_results[0].calls} calls per run in total over T threads, "
            f"median of {reps}; cpu-us = CPU µs per call of the whole process tree, net of start-up",
            "",
            syscall_table(sys_results),
            "",
        ]
    if http_results:
        out += [
            f"http: wrk -t2 -c16 -d{duration}s --latency, {BODY_BYTES}-byte body, {rounds} round(s); "
            "cpu-us/req = server process tree CPU µs per request (start-up included)",
            "",
            http_table(http_results),
            "",
        ]
        out += notes(http_results)
    if fs_report is not None:
        out += ["", *fs.report_lines(fs_report)] if http_results else fs.report_lines(fs_report)
    if attest_report is not None:
        out += attest.report_lines(attest_report)
    if import_results:
        out += imports.report_lines(import_results)
    if server_results:
        out += servers.report_lines(server_results, a.quick)
    if sqlite_results:
        out += sqlite.report_lines(sqlite_results)
    if pg_results:
        out += pg.report_lines(pg_results)
    if tls_report is not None:
        out += tls.report_lines(tls_report)
    if console_results:
        out += console.report_lines(console_results)
    if procs_results:
        out += procs_bench.report_lines(procs_results)
    print("\n".join(out), flush=True)

    report = {
        "quick": a.quick,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", started_at),
        "elapsed_s": round(elapsed, 1),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
        "syscalls": [asdict(r) for r in sys_results],
        "http": [asdict(r) for r in http_results],
        "fs": asdict(fs_report) if fs_report is not None else None,
        "attest": asdict(attest_report) if attest_report is not None else None,
        "imports": [asdict(r) for r in import_results],
        "servers": [{**asdict(r), "ratio": r.ratio} for r in server_results],
        "sqlite": [asdict(r) for r in sqlite_results],
        "pg": [asdict(r) for r in pg_results],
        "tls": asdict(tls_report) if tls_report is not None else None,
        "console": [asdict(r) for r in console_results],
        "procs": [asdict(r) for r in procs_results],
    }
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {(RESULTS / 'latest.json').relative_to(ROOT)}", flush=True)
    if tls_report is not None and tls.failed(tls_report):
        print("error: some TLS configurations failed (above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
