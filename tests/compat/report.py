"""Run the whole compatibility matrix and write docs/compatibility.md and tests/compat/expected.json.

    .venv/bin/python tests/compat/report.py               # every case, wrk for 3 s per server and mode
    .venv/bin/python tests/compat/report.py --wrk 0       # no throughput (faster)
    .venv/bin/python tests/compat/report.py --only flask-waitress --only redis --no-write

Each case runs natively and with ``pyscone run`` (the same command line); each server that serves
in a mode is then started again and measured with ``wrk`` (1 thread, 16 connections).  The file
``expected.json`` it writes is what ``test_compat.py`` holds the runtime to.  A case that fails
natively is reported as a broken case (exit status 1), never as an enclave result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from matrix import CASES, EXPECTED_JSON, ROOT, Case, Env, Outcome, expected, run_case, throughput

DOC = ROOT / "docs" / "compatibility.md"

# Why a failure happens.  Each pattern is looked for in the error line the user sees, then in the
# traceback above it (the match nearest the end wins: the call that failed).  The items are issue 10's
# (or the later issue that will fix it).
WHY: tuple[tuple[str, str], ...] = (
    (r"\bos\.pipe\b", "`os.pipe` is refused in the enclave (issue 10, item 4: in-enclave pipes)"),
    (r"\bos\.dup2?\b|\bdup2?\(", "`os.dup` is refused in the enclave (issue 10, item 4)"),
    (
        r"\bfcntl\b|\bflock\b|\blockf\b|set_inheritable|set_blocking",
        "an fd-level call (`fcntl`, `set_inheritable`, `set_blocking`) is not interposed (issue 10, item 3)",
    ),
    (r"\bumask\b", "`os.umask` is not interposed: -1 with errno 0 (issue 10, item 5)"),
    (
        r"listxattr|statvfs|raise_signal",
        "a stdlib call that is not interposed (`os.listxattr`, `os.statvfs`, `signal.raise_signal`; issue 10, item 5)",
    ),
    (
        r"--preload",
        "a C extension outside the standard library must be named with `--preload`, and the hint "
        "does not always name what works (issue 10, item 2)",
    ),
    (
        r"CSafeLoader|CLoader|__with_libyaml__|markupsafe True",
        "an optional C speed-up is silently missing (issue 10, item 2)",
    ),
    (
        r"PackageNotFoundError|No package metadata|importlib\.metadata|Unknown command",
        "`importlib.metadata`/`pkgutil` find nothing in the enclave (issue 10, item 6)",
    ),
    (
        r"pyscone: error: unrecognized arguments",
        "`pyscone run -m MODULE ARGS` parses the module's options as its own (issue 10, item 7)",
    ),
    (
        r"load_cert_chain|load_verify_locations|create_default_context|SSLError|\bssl\b",
        "`ssl`: OpenSSL opens CA, certificate and key files itself, outside the enclave (issue 10, item 1)",
    ),
    (
        r"No socket could be created",
        "cheroot sets `FD_CLOEXEC` with `fcntl` on the listening socket, gets a bare EPERM and reports it as "
        "this (issue 10, item 3)",
    ),
    (
        r"(?i)psycopg|libpq|connection to server",
        "psycopg does not load: its binary build is a C extension that needs `--preload` (issue 10, item 2), and "
        "libpq underneath is a C library doing its own socket I/O (the next issue)",
    ),
    (r"(?i)sqlite|unable to open database", "SQLite is a C library doing its own file I/O: the next issue"),
    (r"subprocess\.\w+ is not supported|\bfork\b|\bexecv", "processes (fork/exec/subprocess): a later issue"),
    (r"Operation not permitted", "a system call that is not interposed hit the barrier: a bare EPERM"),
)


def why(error: str, detail: str = "") -> str:
    """The first specific reason the error line names, else the one the traceback names nearest its end,
    else the generic one (the last of WHY) if it applies."""
    specific, generic = WHY[:-1], WHY[-1]
    for pattern, reason in specific:
        if re.search(pattern, error):
            return reason
    best: tuple[int, str] | None = None
    for pattern, reason in specific:
        for m in re.finditer(pattern, detail):
            if best is None or m.end() > best[0]:
                best = (m.end(), reason)
    if best is not None:
        return best[1]
    return generic[1] if re.search(generic[0], error + detail) else "not yet analysed"


def fmt_rps(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"  # noqa: RUF001


def cell(o: Outcome) -> str:
    return "works" if o.ok else "**fails**"


def esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[tuple[Case, Outcome, Outcome, float | None, float | None]], wrk_s: float, took: float) -> str:
    works = sum(1 for _, _, e, _, _ in rows if e.ok)
    native = sum(1 for _, n, _, _, _ in rows if n.ok)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Compatibility matrix",
        "",
        "<!-- Generated by tests/compat/report.py from a run; do not edit by hand. -->",
        "",
        "Ordinary apps built on popular packages, each written the way its package's documentation shows "
        "(`tests/compat/apps/`), started with `python ARGV` and with `pyscone run ARGV` (the same ARGV) and "
        "driven by a real client: `urllib`/`wrk` for servers; for client apps, an HTTP server, an HTTPS server "
        "whose certificate a private CA signed, or a real `redis-server` on loopback; for the rest, the app's own "
        "output. `pytest -m compat` runs the same cases and fails any case listed here as working that stops "
        "working; the failing ones are expected failures there, so a fix shows up as XPASS.",
        "",
        f"Run of {now} on {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}: **{works} of {len(rows)} cases work in the enclave**; {native} of {len(rows)} "
        f"work natively. Throughput: `wrk -t1 -c16` for {wrk_s:g} s per server and mode, native and enclave "
        f"alternating in the same run (a shared 2-core machine: compare the ratio, not the absolute numbers; even the ratio moved by up to a factor of 2 between two runs here). "
        f"The run took {took:.0f} s. Regenerate with `.venv/bin/python tests/compat/report.py`.",
        "",
        "| case | what it covers | native | enclave | req/s native | req/s enclave | enclave/native |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, n, e, rn, re_ in rows:
        out.append(
            f"| `{case.name}` | {esc(case.covers)} | {cell(n)} | {cell(e)} | "
            f"{fmt_rps(rn) if case.server else ''} | {fmt_rps(re_) if case.server else ''} | "
            f"{fmt_ratio(re_, rn) if case.server else ''} |"
        )
    failures = [(c, e) for c, n, e, _, _ in rows if n.ok and not e.ok]
    out += ["", "## What fails in the enclave, and why", ""]
    if not failures:
        out.append("Nothing.")
    else:
        out += [
            "The error is the line a user sees (the last line on stderr, or what the client got).",
            "",
            "| case | error the user sees | why |",
            "| --- | --- | --- |",
        ]
        out += [f"| `{c.name}` | `{esc(e.error)}` | {why(e.error, e.detail)} |" for c, e in failures]
    broken = [(c, n) for c, n, _, _, _ in rows if not n.ok]
    if broken:
        out += ["", "## Cases that fail natively (the case is wrong, not the runtime)", ""]
        out += [f"- `{c.name}`: `{esc(n.error)}`" for c, n in broken]
    out += [
        "",
        "## How each case runs",
        "",
        "| case | command (`python` natively, `pyscone run` in the enclave) | client and check |",
        "| --- | --- | --- |",
    ]
    for case, *_ in rows:
        if case.server:
            client = f"GET `{case.path}`{' over HTTPS (private CA)' if case.https else ''}; body contains"
        elif case.fixture:
            client = f"the app against a {case.fixture} fixture; its output contains"
        else:
            client = "the app's output contains"
        out.append(f"| `{case.name}` | `{esc(' '.join(case.argv))}` | {client} `{esc(case.expect)}` |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", action="append", default=[], metavar="CASE", help="run only these cases")
    ap.add_argument(
        "--wrk", type=float, default=3.0, metavar="SECONDS", help="wrk duration per server and mode (0: none)"
    )
    ap.add_argument("--no-write", action="store_true", help="print only; write neither the doc nor expected.json")
    args = ap.parse_args(argv)
    unknown = set(args.only) - {c.name for c in CASES}
    if unknown:
        print(f"error: no such case: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    cases = [c for c in CASES if not args.only or c.name in args.only]
    before = expected()
    rows: list[tuple[Case, Outcome, Outcome, float | None, float | None]] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyscone-compat-") as tmp:
        env = Env(Path(tmp))
        for case in cases:
            n = run_case(case, "native", env)
            e = run_case(case, "enclave", env)
            rn = re_ = None
            if case.server and args.wrk > 0:
                rn = throughput(case, "native", env, args.wrk) if n.ok else None
                re_ = throughput(case, "enclave", env, args.wrk) if e.ok else None
            rows.append((case, n, e, rn, re_))
            was = before.get(case.name, {}).get("enclave")
            change = "" if was is None or was == e.label else f"  (was {was})"
            rates = f"  {fmt_rps(rn)} vs {fmt_rps(re_)} req/s" if case.server and args.wrk > 0 else ""
            print(
                f"{case.name:26} native {n.label:5}  enclave {e.label:5}{rates}{change}"
                + (f"\n    {e.error}" if not e.ok else "")
                + (f"\n    NATIVE: {n.error}" if not n.ok else ""),
                flush=True,
            )
    took = time.monotonic() - start
    if not args.no_write:
        merged = dict(before) if args.only else {}
        for case, n, e, _, _ in rows:
            merged[case.name] = {"native": n.label, "enclave": e.label, "error": e.error}
        EXPECTED_JSON.write_text(
            json.dumps({c.name: merged[c.name] for c in CASES if c.name in merged}, indent=1) + "\n"
        )
        if not args.only:
            DOC.write_text(render(rows, args.wrk, took))
            print(f"wrote {DOC.relative_to(ROOT)} and {EXPECTED_JSON.relative_to(ROOT)}")
        else:
            print(f"wrote {EXPECTED_JSON.relative_to(ROOT)} (the doc needs a full run)")
    return 1 if any(not n.ok for _, n, _, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
