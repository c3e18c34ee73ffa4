"""The benchmark commands the docs quote keep working (quick runs; the numbers are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _quick(script: str) -> str:
    r = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_the_fs_benchmark_runs() -> None:
    out = _quick("fs.py")
    assert "seq-read-64k" in out and "encrypted-64k MB/s" in out and "AES-GCM call alone" in out
    report = json.loads((BENCH / "results" / "fs.json").read_text())
    assert {r["config"] for r in report["results"]} == {
        "native",
        "encrypted",
        "authenticated",
        "encrypted-64k",
        "unprotected",
    }


def test_the_attestation_benchmark_runs() -> None:
    out = _quick("attest.py")
    assert "attested" in out and "postgresql" in out
    report = json.loads((BENCH / "results" / "attest.json").read_text())
    assert [s["kind"] for s in report["startup"]] == ["native", "dev", "signed", "attested"]
    assert all(t["attestations"] > 0 for t in report["throughput"])


def test_the_cas_replicas_benchmark_runs() -> None:
    out = _quick("cas_replicas.py")
    assert "x 1 replica" in out and "a session per client" in out, out
    report = json.loads((BENCH / "results" / "cas_replicas.json").read_text())
    assert {(r["replicas"], r["workload"]) for r in report} == {
        (n, w) for n in (1, 2) for w in ("one session", "a session per client")
    }
    assert all(r["median_per_second"] > 0 and r["errors"] == 0 for r in report)


def test_the_imports_benchmark_runs() -> None:
    out = _quick("imports.py")
    for row in ("flask  ", "django  ", "enclave-nocache"):
        assert row in out, out


def test_the_servers_benchmark_runs_one_case() -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / "servers.py"), "--quick", "--case", "http-server"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "http-server" in r.stdout and "slowest three against native: http-server" in r.stdout, r.stdout


def test_the_psycopg_benchmark_runs() -> None:
    out = _quick("pg.py")
    assert "select1" in out and "point" in out and "enclave/native" in out, out
    report = json.loads((BENCH / "results" / "pg.json").read_text())
    assert {(r["query"], r["transport"], r["kind"]) for r in report["pg"]} == {
        (q, t, k) for q in ("select1", "point") for t in ("tcp", "unix") for k in ("native", "enclave")
    }
    assert all(r["qps"] > 0 for r in report["pg"])


def test_the_sqlite_benchmark_runs() -> None:
    out = _quick("sqlite.py")
    for row in ("select  ", "commit-1  ", "commit-100  ", "what limits each row"):
        assert row in out, out
    report = json.loads((BENCH / "results" / "sqlite.json").read_text())
    assert {r["config"] for r in report} == {"native", "unprotected", "encrypted", "attested"}
    assert all(r["ops_per_s"] > 0 for r in report)


def test_the_tls_benchmark_runs() -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / "tls.py"), "--quick", "--seconds", "1", "--redis-requests", "2000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "target keepalive: shield/stunnel" in r.stdout and "target full: shield/stunnel" in r.stdout, r.stdout
    report = json.loads((BENCH / "results" / "tls.json").read_text())
    configs = ("stunnel", "ssl", "shield", "enclave-plain", "native-plain")
    loads = ("keepalive", "resumed", "full", "redis-set", "redis-get")
    assert {(x["load"], x["config"]) for x in report["runs"]} == {(ld, c) for ld in loads for c in configs}
    for run in report["runs"]:
        assert run["error"] is None and run["rate"] > 0 and run["errors"] == 0, run
        assert run["app_cpu_s"] > 0 and (run["stunnel_cpu_s"] > 0) == (run["config"] == "stunnel"), run
        # Every TLS configuration was checked by a client that verified the chain, on TLS 1.3.
        assert run["tls"].startswith("TLSv1.3 ") if run["config"] in configs[:3] else run["tls"] == "plain", run


def test_the_console_benchmark_runs() -> None:
    out = _quick("console.py")
    for row in ("lines  ", "lines-flush  ", "bytes  ", "what limits each row"):
        assert row in out, out
    report = json.loads((BENCH / "results" / "console.json").read_text())
    assert {r["config"] for r in report} == {"native", "enclave", "shield"}
    assert all(r["per_s"] > 0 for r in report)


def test_the_processes_benchmark_runs() -> None:
    out = _quick("procs.py")
    for row in ("fork-100mb  ", "subprocess-python  ", "pool-map  ", "sem-pingpong  "):
        assert row in out, out
    report = json.loads((BENCH / "results" / "procs.json").read_text())
    assert {r["config"] for r in report} == {"native", "enclave"}
    assert all(r["per_s"] > 0 for r in report)
