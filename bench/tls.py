"""The network shield against what a user would pick instead: HTTPS and Redis-over-TLS servers.

    .venv/bin/python bench/tls.py [--quick]             # about 10 minutes (quick: about 1)
    .venv/bin/python bench/run.py --only tls [--quick]  # the same, in bench/results/latest.json

One unmodified plain-TCP server app, ``bench/apps/aio_keepalive.py`` (an asyncio HTTP/1.1
keep-alive server; why that one: its docstring), in five configurations that alternate within
each round (the order reverses every other round), each started afresh for every load:

* ``stunnel``: the app natively on plain HTTP behind stunnel4 (Debian's) on the same machine,
  TLS 1.3, TCP_NODELAY on both of its sockets;
* ``ssl``: the app natively doing TLS itself (``--cert/--key``: ``ssl=`` to ``create_server``),
  TLS 1.3;
* ``shield``: the plain app in an enclave, ``pyscone run --net-shield FILE``: the FILE (dev mode)
  lists the app's port with the same certificate and key;
* ``enclave-plain`` and ``native-plain``: the app on plain HTTP in an enclave and natively, for
  reference (what TLS costs at all).

Certificate: ECDSA P-256 from a CA made for the run with ``cryptography`` in a temp dir.  Before
it is measured, every configuration is checked with a real client that verifies the chain against
that CA and the body it gets, twice, the second connection offering the first's session (the
TLS version, the cipher and whether the server resumed are reported).  Three loads, each for D
seconds with 16 connections at once:

* ``keepalive``: HTTPS requests/s on 16 kept-alive connections, ``wrk -t1 -c16 --latency``;
* ``resumed``: the same with a ``Connection: close`` header: the app closes every connection
  after its answer and wrk opens a new one, so every request is a new TCP connection and a new
  TLS handshake, but wrk keeps its ``SSL`` object across reconnections (``SSL_clear``) and so
  offers the last session: a TLS 1.3 PSK resumption (still an ECDHE exchange, no certificate
  signature) wherever the server issues tickets.  Caveat: wrk spins while it waits for a
  handshake (its connecting socket stays registered for writability, so ``SSL_connect`` is
  retried in a loop), so its CPU per request grows with the server's handshake latency and takes
  a core from the server on a small machine: the slower the server, the more it is penalised;
* ``full``: ``ab -c 16`` (HTTP/1.0, no keep-alive, a fresh ``SSL`` per connection): a new
  connection and a full handshake, the server's ECDSA signature included, per request.  ab waits
  for the handshake in ``poll``: this is the fair handshakes/s figure.

For the two of them requests/s = handshakes/s (for the plain configurations: TCP connections/s).

And the same for a Redis-protocol server (``bench/apps/resp_server.py``: asyncio, PING/SET/GET)
under ``redis-benchmark --tls -c 16 -t set`` then ``-t get`` on one start (16 kept-alive
connections), when this redis-benchmark has ``--tls``.

CPU: the user + system time of each started process and its descendants (the app, or ``pyscone
run`` with its enclave; and stunnel) read from ``/proc/PID/stat`` just before and just after the
load, so per request it is the serving cost only, start-up and shutdown excluded; the client's
(wrk's, ab's, redis-benchmark's) own CPU is reported apart.  An enclave runs with ``--stats``
(counted anyway, printed at exit): its socket host calls per request are reported too.  Rates and
CPU per request are medians over the rounds.  The target (issue 12): the shield at >= 0.8x of the
app behind stunnel.  Alone, the results go to ``bench/results/tls.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tls_files import Keys, make_keys, shield_conf, stunnel_conf  # bench/tls_files.py
from tls_report import REDIS_LOADS, Run, TlsReport, failed, report_lines  # bench/tls_report.py

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
HTTP_APP = BENCH / "apps" / "aio_keepalive.py"
RESP_APP = BENCH / "apps" / "resp_server.py"
PYTHON = sys.executable
CONFIGS = ("stunnel", "ssl", "shield", "enclave-plain", "native-plain")
TLS_CONFIGS = ("stunnel", "ssl", "shield")
HTTP_LOADS = ("keepalive", "resumed", "full")
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
TICK = os.sysconf("SC_CLK_TCK")
BODY_PREFIX = b"pyscone TLS benchmark"
Log = Callable[[str], None]


class TlsBenchError(Exception):
    """A configuration could not run: one line, with what its processes said."""


# --------------------------------------------------------------------------- processes and CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _scan() -> tuple[dict[int, int], dict[int, float]]:
    """Every live process's parent and CPU seconds so far (utime + stime + its waited-for children's)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        parent[int(entry.name)] = int(fields[1])
        cpu[int(entry.name)] = sum(int(f) for f in fields[11:15]) / TICK
    return parent, cpu


def _under(pid: int, root: int, parent: dict[int, int]) -> bool:
    while pid > 1 and pid != root:
        pid = parent.get(pid, 0)
    return pid == root


def tree_cpu(roots: Sequence[int]) -> list[float]:
    """CPU seconds so far of each root process and all its live descendants (their threads, and the
    children they have waited for, included), from ``/proc``: what ``psutil`` would read.  By
    parentage, not by process group: ``pyscone run`` starts its enclave in a session of its own."""
    parent, cpu = _scan()
    return [sum(sec for pid, sec in cpu.items() if _under(pid, root, parent)) for root in roots]


def descendants(root: int) -> list[int]:
    parent, _ = _scan()
    return [pid for pid in parent if pid != root and _under(pid, root, parent)]


@dataclass
class Proc:
    role: str  # app | stunnel
    popen: subprocess.Popen[bytes]
    stderr: Path

    def tail(self, lines: int = 6) -> str:
        try:
            text = self.stderr.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def reset_sigint() -> None:
    """In the child before exec: a ^C-able server even if our SIGINT is ignored (a background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(role: str, cmd: list[str], cwd: Path, log_dir: Path) -> Proc:
    err = log_dir / f"{role}-{time.monotonic_ns()}.stderr"
    with open(err, "wb") as f:
        popen = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=f,
            start_new_session=True,
            preexec_fn=reset_sigint,
        )
    return Proc(role, popen, err)


def stop(proc: Proc) -> str:
    """^C (stunnel: SIGTERM) the process group, wait, SIGKILL what is left.  Returns how it ended."""
    how = "exited"
    below = descendants(proc.popen.pid)  # an enclave is in a session of its own
    if proc.popen.poll() is None:
        how = "stopped"
        sig = signal.SIGTERM if proc.role == "stunnel" else signal.SIGINT
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, sig)
        try:
            proc.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            how = "killed"
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait()
    for pid in below:  # an enclave left behind by its host (by pid: only what this run started)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return how


# --------------------------------------------------------------------------- one configuration


@dataclass
class Started:
    procs: list[Proc]
    port: int  # what the client connects to
    tls: bool


def client_context(keys: Keys) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(keys.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
PING = b"*1\r\n$4\r\nPING\r\n"


@dataclass
class Answer:
    tls: str  # "TLSv1.3 TLS_AES_256_GCM_SHA384", or "plain"
    session: ssl.SSLSession | None
    resumed: bool


def ask(kind: str, port: int, ctx: ssl.SSLContext | None, session: ssl.SSLSession | None) -> Answer:
    """One request on a new connection, TLS verified against our CA when ``ctx``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) if ctx is not None else raw
        with sock:
            sock.sendall(REQUEST if kind == "http" else PING)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
                if kind == "redis" and data.endswith(b"\r\n"):
                    break
            if kind == "http":
                good = data.startswith(b"HTTP/1.1 200 ") and BODY_PREFIX in data
            else:
                good = data == b"+PONG\r\n"
            if not good:
                raise TlsBenchError(f"unexpected answer: {data[:60]!r}")
            if not isinstance(sock, ssl.SSLSocket):
                return Answer("plain", None, False)
            cipher = sock.cipher()
            return Answer(f"{sock.version()} {cipher[0] if cipher else '?'}", sock.session, bool(sock.session_reused))


def check_once(kind: str, port: int, keys: Keys | None) -> str:
    """Two real requests on new connections, verified against our CA when TLS, the second offering
    the first's session; returns what they saw, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384, resumes sessions"."""
    if keys is None:
        return ask(kind, port, None, None).tls
    ctx = client_context(keys)
    first = ask(kind, port, ctx, None)
    second = ask(kind, port, ctx, first.session)
    return f"{first.tls}, {'resumes' if second.resumed else 'does not resume'} sessions"


def wait_serving(kind: str, started: Started, port: int, keys: Keys | None) -> str:
    """Retry the check until it passes; a process that exits, or a TLS error, fails at once."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        for p in started.procs:
            if p.popen.poll() is not None:
                raise TlsBenchError(f"{p.role} exited with status {p.popen.returncode}: {p.tail() or '(no output)'}")
        try:
            return check_once(kind, port, keys)
        except ssl.SSLCertVerificationError as e:
            raise TlsBenchError(f"the server's certificate did not verify: {e}") from e
        except OSError as e:
            if time.monotonic() > deadline:
                raise TlsBenchError(f"not serving on port {port} after {READY_TIMEOUT_S:.0f} s: {e}") from e
            time.sleep(0.1)


def launch(kind: str, config: str, keys: Keys, work: Path, has_shield: bool) -> tuple[Started, str]:
    """Start one configuration of the app (``kind`` http or redis) and check it serves; returns it
    and what the check saw."""
    app = HTTP_APP if kind == "http" else RESP_APP
    port = free_port()
    if config == "shield" and not has_shield:
        raise TlsBenchError(
            "this pyscone has no `run --net-shield` (the network shield is not in this checkout): "
            "leave it out with --configs"
        )
    native = [PYTHON, str(app), str(port), "127.0.0.1"]
    enclave = [PYTHON, "-m", "pyscone.cli", "run", "--no-venv", "--stats"]  # (counted anyway; printed at exit)
    if config in ("native-plain", "stunnel"):
        cmd = native
    elif config == "ssl":
        cmd = [*native, "--cert", str(keys.cert), "--key", str(keys.key)]
    elif config == "shield":
        cmd = [*enclave, "--net-shield", str(shield_conf(keys, port)), *native[1:]]
    else:
        cmd = [*enclave, *native[1:]]
    started = Started([start("app", cmd, work, work)], port, config in TLS_CONFIGS)
    try:
        if config == "stunnel":
            wait_serving(kind, started, port, None)
            front = free_port()
            stunnel = ["stunnel4", str(stunnel_conf(keys, front, port))]
            started.procs.append(start("stunnel", stunnel, work, work))
            started.port = front
        seen = wait_serving(kind, started, started.port, keys if started.tls else None)
    except BaseException:
        for p in started.procs:
            stop(p)
        raise
    return started, seen


WRK_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
WRK_P99 = re.compile(r"^\s+99%\s+([\d.]+)(us|ms|s)", re.M)
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def measure(started: Started, cmd: list[str], run: Run) -> str:
    """Run the client ``cmd`` against the started configuration; fills the run's CPU; returns its output."""
    roots = [p.popen.pid for p in started.procs]
    before = tree_cpu(roots)
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        out, _ = client.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        client.kill()
        client.communicate()
        raise TlsBenchError(f"{cmd[0]} did not finish") from None
    finally:
        after = tree_cpu(roots)
    for p, b, a in zip(started.procs, before, after, strict=True):
        if p.role == "app":
            run.app_cpu_s += a - b
        else:
            run.stunnel_cpu_s += a - b
    text = out.decode(errors="replace")
    if client.returncode != 0:
        raise TlsBenchError(f"{cmd[0]} exited with status {client.returncode}: {text.strip()[-300:]}")
    for p in started.procs:
        if p.popen.poll() is not None:
            raise TlsBenchError(f"{p.role} exited with status {p.popen.returncode} under load: {p.tail()}")
    return text


def wrk_load(started: Started, load: str, seconds: int, run: Run) -> None:
    scheme = "https" if started.tls else "http"
    cmd = ["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency"]
    if load == "resumed":
        cmd += ["-H", "Connection: close"]
    out = measure(started, [*cmd, f"{scheme}://127.0.0.1:{started.port}/"], run)
    m = WRK_REQUESTS.search(out)
    if not m:
        raise TlsBenchError("wrk: unexpected output: " + out.strip()[-300:])
    run.requests = int(m.group(1))
    run.rate = run.requests / (float(m.group(2)) * UNITS[m.group(3)])
    if p99 := WRK_P99.search(out):
        run.p99_ms = float(p99.group(1)) * UNITS[p99.group(2)] * 1e3
    if errs := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        run.errors += sum(map(int, errs.groups()))
    if non2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        run.errors += int(non2xx.group(1))


AB_NUMBER = re.compile(r"^(Complete requests|Failed requests|Non-2xx responses|Time taken for tests):\s+([\d.]+)", re.M)
AB_P99 = re.compile(r"^\s+99%\s+(\d+)", re.M)


def ab_load(started: Started, seconds: int, run: Run) -> None:
    """ab: HTTP/1.0 without keep-alive, a new connection and a full TLS handshake per request."""
    scheme = "https" if started.tls else "http"
    cmd = ["ab", "-q", "-r", "-c", "16", "-t", str(seconds), "-n", "1000000"]  # (a cap: -t ends it)
    out = measure(started, [*cmd, f"{scheme}://127.0.0.1:{started.port}/"], run)
    numbers = {k: float(v) for k, v in AB_NUMBER.findall(out)}
    if "Complete requests" not in numbers or not numbers.get("Time taken for tests"):
        raise TlsBenchError("ab: unexpected output: " + out.strip()[-300:])
    run.requests = int(numbers["Complete requests"])
    run.rate = run.requests / numbers["Time taken for tests"]
    run.errors += int(numbers.get("Failed requests", 0) + numbers.get("Non-2xx responses", 0))
    if p99 := AB_P99.search(out):
        run.p99_ms = float(p99.group(1))


def redis_load(started: Started, load: str, requests: int, keys: Keys, run: Run) -> None:
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(started.port), "-c", "16", "-n", str(requests)]
    cmd += ["-t", load.removeprefix("redis-"), "--csv"]
    if started.tls:
        cmd += ["--tls", "--cacert", str(keys.ca)]
    out = measure(started, cmd, run)
    rows = [r for r in csv.reader(io.StringIO(out)) if len(r) >= 7 and r[0] in ("SET", "GET")]
    if not rows:
        raise TlsBenchError("redis-benchmark: unexpected output: " + out.strip()[-300:])
    run.requests = requests
    run.rate = float(rows[0][1])
    run.p99_ms = float(rows[0][6])


def client_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def session(
    kind: str, loads: Sequence[str], config: str, rnd: int, keys: Keys, work: Path, opts: Options, log: Log
) -> list[Run]:
    """Start one configuration, run its loads one after another, stop it."""
    runs = [Run(load, config, rnd) for load in loads]
    try:
        started, seen = launch(kind, config, keys, work, opts.has_shield)
    except TlsBenchError as e:
        for r in runs:
            r.error = str(e)
        return runs
    try:
        for r in runs:
            r.tls = seen
            c0 = client_cpu()
            try:
                if r.load == "full":
                    ab_load(started, opts.seconds, r)
                elif kind == "http":
                    wrk_load(started, r.load, opts.seconds, r)
                else:
                    redis_load(started, r.load, opts.redis_requests, keys, r)
            except TlsBenchError as e:
                r.error = str(e)
            r.client_cpu_s = client_cpu() - c0
            rate = f"{r.rate:>9,.0f} req/s" if r.rate else "no result"
            log(f"tls: {r.load:<10} {config:<13} round {rnd}: {rate}" + (f", ERROR: {r.error}" if r.error else ""))
    finally:
        for p in started.procs:
            how = stop(p)
            if p.role == "app":
                for r in runs:
                    r.stopped = how
                runs[0].shield_log = shield_log_lines(p)
                runs[0].host_calls = host_calls(p)
    return runs


SHIELD_LINE = re.compile(r"^pyscone: network shield: (?:\S+ -> port \d+: )?(.*?)(?:: |$)")


HOST_CALLS = re.compile(r"^pyscone: host calls by kind: (.*)$", re.M)


def host_calls(proc: Proc) -> dict[str, int]:
    """An enclave's host calls by kind over its whole run (``--stats``, the ten most frequent)."""
    try:
        m = HOST_CALLS.search(proc.stderr.read_text(errors="replace"))
    except OSError:
        return {}
    return {k: int(n) for k, n in (item.rsplit(" ", 1) for item in m.group(1).split(", "))} if m else {}


def shield_log_lines(proc: Proc) -> dict[str, int]:
    """The network shield's log lines, by kind ("TLS handshake failed", ...): none is expected."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in proc.stderr.read_text(errors="replace").splitlines():
            if m := SHIELD_LINE.match(line):
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


@dataclass
class Options:
    seconds: int
    rounds: int
    redis_requests: int
    configs: tuple[str, ...]
    redis: bool
    has_shield: bool


def has_net_shield() -> bool:
    r = subprocess.run([PYTHON, "-m", "pyscone.cli", "run", "--help"], capture_output=True, text=True, timeout=60)
    return "--net-shield" in r.stdout


def redis_has_tls() -> bool:
    if shutil.which("redis-benchmark") is None:
        return False
    r = subprocess.run(["redis-benchmark", "--help"], capture_output=True, text=True, timeout=30)
    return "--tls" in r.stdout + r.stderr


def bench_tls(
    quick: bool,
    log: Log,
    configs: Sequence[str] = CONFIGS,
    rounds: int | None = None,
    seconds: int | None = None,
    redis_requests: int | None = None,
) -> TlsReport:
    for tool in ("wrk", "ab", "stunnel4"):
        if (tool != "stunnel4" or "stunnel" in configs) and shutil.which(tool) is None:
            raise TlsBenchError(f"{tool} not found: run scripts/setup.sh")
    opts = Options(
        seconds=seconds or (3 if quick else 10),
        rounds=rounds or (1 if quick else 3),
        redis_requests=redis_requests or (20_000 if quick else 100_000),
        configs=tuple(configs),
        redis=redis_has_tls(),
        has_shield=has_net_shield(),
    )
    report = TlsReport(
        opts.seconds, opts.rounds, opts.redis_requests, "" if opts.redis else "redis-benchmark has no --tls"
    )
    with tempfile.TemporaryDirectory(prefix="pyscone-bench-tls-") as tmp:
        work = Path(tmp)
        keys = make_keys(work)
        load_before = os.getloadavg()[0]
        for rnd in range(1, opts.rounds + 1):
            order = opts.configs if rnd % 2 else opts.configs[::-1]
            # A start per HTTP load (so that an enclave's host calls are the load's own); the Redis
            # loads share one (GET reads what SET wrote).
            parts = [("http", (load,)) for load in HTTP_LOADS] + ([("redis", REDIS_LOADS)] if opts.redis else [])
            for kind, loads in parts:
                for config in order:
                    report.runs += session(kind, loads, config, rnd, keys, work, opts, log)
        report.loadavg = (load_before, os.getloadavg()[0])
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 3 s loads")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (quick: 1)")
    p.add_argument("--seconds", type=int, default=None, help="per HTTP load (default 10, quick 3)")
    p.add_argument("--redis-requests", type=int, default=None, help="per Redis load (default 100000, quick 20000)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    a = p.parse_args(argv)
    configs = [c for c in a.configs.split(",") if c]
    if unknown := [c for c in configs if c not in CONFIGS]:
        print(f"error: unknown configuration {unknown[0]!r} (one of {', '.join(CONFIGS)})", file=sys.stderr)
        return 2
    try:
        log: Log = lambda m: print(f"  {m}", file=sys.stderr, flush=True)  # noqa: E731
        report = bench_tls(a.quick, log, configs, a.rounds, a.seconds, a.redis_requests)
    except TlsBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(report)))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tls.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(f"results: {(RESULTS / 'tls.json').relative_to(ROOT)}", flush=True)
    if failed(report):
        print("error: some configurations failed (above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
