"""The TLS benchmark's (``bench/tls.py``) results and its report: one table of medians over the rounds,
the target ratio, the host calls per request of the enclaves, what the check clients saw.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from report import table  # bench/report.py, next to this script

REDIS_LOADS = ("redis-set", "redis-get")
TARGET = 0.8  # issue 12: the shield at >= 0.8x of the app behind stunnel


@dataclass
class Run:
    load: str
    config: str
    round: int
    rate: float | None = None  # requests/s
    requests: int = 0
    p99_ms: float | None = None
    errors: int = 0  # wrk socket errors + non-2xx
    app_cpu_s: float = 0.0  # during the load
    stunnel_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    tls: str = ""  # the version and cipher the check saw
    stopped: str = ""
    # The session's (first run only): the shield's log lines, an enclave's host calls by kind.
    shield_log: dict[str, int] = field(default_factory=dict)
    host_calls: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def cpu_us_per_request(self) -> float | None:
        if not self.requests:
            return None
        return (self.app_cpu_s + self.stunnel_cpu_s) / self.requests * 1e6


@dataclass
class TlsReport:
    seconds: int
    rounds: int
    redis_requests: int
    redis: str  # "" when measured, else why not
    runs: list[Run] = field(default_factory=list)
    loadavg: tuple[float, float] = (0.0, 0.0)  # before, after: other work on the machine skews every row


@dataclass
class Row:
    load: str
    config: str
    rate: float | None
    p99_ms: float | None
    cpu_us: float | None
    stunnel_share: float | None
    client_cpu_us: float | None
    errors: int
    tls: str
    failures: list[str]
    host_calls: dict[str, float]  # an enclave's socket calls per request, by kind (the first round's)


SOCKET_CALLS = ("accept", "recv", "send", "poll", "setsockopt", "close", "shutdown", "connect")


def per_request_calls(report: TlsReport, first: Run) -> dict[str, float]:
    """The socket calls per request of ``first``'s session (its runs share one enclave)."""
    loads = REDIS_LOADS if first.load in REDIS_LOADS else (first.load,)
    same = [r for r in report.runs if r.config == first.config and r.round == first.round and r.load in loads]
    requests = sum(r.requests for r in same)
    calls = {k: n / requests for k, n in first.host_calls.items() if k in SOCKET_CALLS} if requests else {}
    return dict(sorted(calls.items(), key=lambda kv: -kv[1]))


def rows_of(report: TlsReport) -> list[Row]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in report.runs:
        groups.setdefault((r.load, r.config), []).append(r)
    rows = []
    for (load, config), runs in groups.items():
        ok = [r for r in runs if r.rate is not None and r.error is None]

        def med(values: list[float]) -> float | None:
            return statistics.median(values) if values else None

        cpus = [c for r in ok if (c := r.cpu_us_per_request) is not None]
        counted = [r for r in report.runs if r.config == config and r.host_calls and r.error is None]
        first = next((r for r in counted if r.load == load or (load in REDIS_LOADS and r.load in REDIS_LOADS)), None)
        total = sum(r.app_cpu_s + r.stunnel_cpu_s for r in ok)
        rows.append(
            Row(
                load,
                config,
                med([r.rate for r in ok if r.rate is not None]),
                med([r.p99_ms for r in ok if r.p99_ms is not None]),
                med(cpus),
                sum(r.stunnel_cpu_s for r in ok) / total if total and config == "stunnel" else None,
                med([r.client_cpu_s / r.requests * 1e6 for r in ok if r.requests]),
                sum(r.errors for r in ok),
                ok[0].tls if ok else "",
                sorted({r.error for r in runs if r.error}),
                per_request_calls(report, first) if first else {},
            )
        )
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def report_lines(report: TlsReport) -> list[str]:
    rows = rows_of(report)
    by = {(r.load, r.config): r for r in rows}
    cells = []
    for r in rows:
        vs_stunnel = ratio(r.rate, by[(r.load, "stunnel")].rate) if (r.load, "stunnel") in by else None
        vs_ssl = ratio(r.rate, by[(r.load, "ssl")].rate) if (r.load, "ssl") in by else None
        cells.append(
            [
                r.load,
                r.config,
                fmt(r.rate),
                fmt(r.p99_ms, ".2f"),
                str(r.errors),
                fmt(r.cpu_us, ".0f"),
                fmt(r.stunnel_share and r.stunnel_share * 100, ".0f"),
                fmt(r.client_cpu_us, ".0f"),
                fmt(vs_stunnel, ".2f"),
                fmt(vs_ssl, ".2f"),
            ]
        )
    head = (
        f"tls: one plain asyncio server natively behind stunnel4, natively with ssl, in an enclave behind "
        f"the network shield (and plain, natively and in an enclave); 16 connections for {report.seconds} s: "
        "keepalive = wrk on kept-alive connections, resumed = wrk with Connection: close (a new connection "
        "and a resumed TLS 1.3 handshake per request; wrk spins while a handshake is under way, so a slow "
        "server loses CPU to it), full = ab (a new connection and a full handshake per request, the fair "
        f"handshakes/s); redis-benchmark -c 16 -n {report.redis_requests}; median of {report.rounds} round(s), "
        "configurations alternating; cpu-us/req = the server's process trees (app + stunnel) during the load; "
        f"load average {report.loadavg[0]:.2f} before, {report.loadavg[1]:.2f} after"
    )
    headers = ["load", "config", "req/s", "p99 ms", "errors", "cpu-us/req", "stunnel %", "client cpu-us"]
    lines = [head, "", table([*headers, "vs stunnel", "vs ssl"], cells), ""]
    for load in dict.fromkeys(r.load for r in rows):
        s, n = by.get((load, "shield")), by.get((load, "stunnel"))
        if s and n:
            x = ratio(s.rate, n.rate)
            verdict = "not measured" if x is None else f"{x:.2f}x, {'meets' if x >= TARGET else 'below'} {TARGET}x"
            b = by.get((load, "ssl"))
            vs_ssl = ratio(s.rate, b.rate) if b else None
            lines.append(f"target {load}: shield/stunnel {verdict}" + (f"; shield/ssl {vs_ssl:.2f}x" if vs_ssl else ""))
    for r in rows:
        if r.host_calls and r.load != "redis-get":  # (the Redis loads share one enclave)
            what = "redis" if r.load == "redis-set" else r.load
            calls = ", ".join(f"{k} {n:.2f}" for k, n in r.host_calls.items() if n >= 0.01)
            lines.append(f"host calls per request, {r.config} {what}: {sum(r.host_calls.values()):.2f} ({calls})")
    seen = {f"{r.config}: {r.tls}" for r in rows if r.tls and r.tls != "plain"}
    lines += ["TLS seen by the check client: " + "; ".join(sorted(seen))] if seen else []
    logged: dict[str, int] = {}
    for run in report.runs:
        for kind, count in run.shield_log.items():
            logged[kind] = logged.get(kind, 0) + count
    lines.append(
        "network shield log lines: "
        + (", ".join(f"{k} x{n}" for k, n in logged.items()) or "none")
        + " (a timed load that ends cuts the handshakes under way: 'the peer closed the connection during the "
        "handshake')"
    )
    if report.redis:
        lines.append(f"redis: not measured: {report.redis}")
    failures: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for e in r.failures:
            failures.setdefault((r.config, e), []).append(r.load)
    lines += [f"FAILED {config} ({', '.join(loads)}): {e}" for (config, e), loads in failures.items()]
    return [*lines, ""]


def failed(report: TlsReport) -> bool:
    return any(r.error for r in report.runs)
