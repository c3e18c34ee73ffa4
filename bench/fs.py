"""File-system shield throughput: native Python against encrypted, authenticated and
unprotected files in an enclave, side by side in one run.

    .venv/bin/python bench/fs.py [--quick]             # about 1 minute (quick: 5 s); bench/results/fs.json
    .venv/bin/python bench/run.py --only fs [--quick]  # the same, in bench/results/latest.json

Four configurations run ``bench/apps/fs_io.py`` (every pattern, one process each):

* native: plain ``python`` on a plain temp directory;
* encrypted / authenticated: ``python -m pyscone.cli run --fspf FSPF`` with the file in a
  region of that kind (4 KiB chunks, the default), the FSPF made with ``pyscone.host.fspf_tool``;
* encrypted-64k: the same with an encrypted region of 64 KiB chunks (``fspf addr --chunk-size``);
* unprotected: the same enclave and FSPF, the file on an unprotected path (the plain host
  pass-through, for reference).

Every configuration runs in a fresh temp dir, removed afterwards; the configurations
alternate within a round and the result is the median over rounds.  The page cache is not
dropped (that needs root): every run is page-cache warm.  Also measured: sealing and
opening one 4 KiB chunk in-process, and where an encrypted sequential 64 KiB write and
read spend their time (``bench/apps/fs_breakdown.py``), in-process and in the enclave.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from report import table  # bench/report.py, next to this script

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
FS_IO_PY = BENCH / "apps" / "fs_io.py"
BREAKDOWN_PY = BENCH / "apps" / "fs_breakdown.py"
PYTHON = sys.executable
CONFIGS = ("native", "encrypted", "authenticated", "encrypted-64k", "unprotected")
ENCLAVE_CONFIGS = CONFIGS[1:]
SHORT_NAMES = ("enc", "auth", "enc64k", "unprot")
PATTERNS: tuple[str, ...] = runpy.run_path(str(FS_IO_PY))["PATTERNS"]  # the app's own list
CHUNK = 4096  # the default chunk size; the encrypted-64k region has 64 KiB chunks
APP_TIMEOUT_S = 300.0


class FsBenchError(Exception):
    """A benchmark run failed: reported in one line (plus the tail of its stderr)."""


Log = Callable[[str], None]


@dataclass
class Settings:
    size: int  # bytes of the file
    ops: int  # operations per random pattern
    rounds: int
    micro_chunks: int  # calls per micro-benchmark repetition (a call seals or opens a run)
    micro_repeats: int

    @classmethod
    def of(cls, quick: bool) -> Settings:
        if quick:
            return cls(size=8 << 20, ops=500, rounds=1, micro_chunks=300, micro_repeats=5)
        return cls(size=64 << 20, ops=2000, rounds=3, micro_chunks=1_000, micro_repeats=15)


# --------------------------------------------------------------------------- processes


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pyscone_run(fspf: Path) -> list[str]:
    return [PYTHON, "-m", "pyscone.cli", "run", "--fspf", str(fspf)]


def run_json(cmd: Sequence[str], what: str) -> tuple[list[dict[str, Any]], float, float]:
    """Run ``cmd`` in its own session; its JSON stdout lines, CPU s of its process tree, wall s.

    A timeout or ^C kills the whole group (an enclave included)."""
    cpu0, t0 = children_cpu(), time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            list(cmd), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
        try:
            rc = proc.wait(APP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise FsBenchError(f"{what}: no result after {APP_TIMEOUT_S:.0f} s") from None
        finally:  # also on ^C: the whole group, and anything the process left behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    lines = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    if rc != 0 or not lines:
        detail = "\n".join(stderr.splitlines()[-15:])
        raise FsBenchError(f"{what}: exit status {rc}, {len(lines)} result line(s)\n{detail}")
    return lines, children_cpu() - cpu0, time.monotonic() - t0


def fs_type(path: Path) -> str:
    """The file system a path lies on (from /proc/self/mounts), for the report."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mnt = parts[1]
            inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    return kind


# --------------------------------------------------------------------------- configurations


@contextlib.contextmanager
def config_dir(config: str) -> Iterator[tuple[Path, list[str]]]:
    """A fresh temp dir for one run: yields (data directory, command prefix)."""
    from pyscone.host import fspf_tool as tool

    root = Path(tempfile.mkdtemp(prefix=f"pyscone-bench-fs-{config}-")).resolve()
    try:
        data = root / "data"
        data.mkdir()
        if config == "native":
            yield data, [PYTHON]
            return
        fspf = root / "bench.fspf"
        paths = tool.Paths.of(str(fspf))
        tool.create(paths)
        if config != "unprotected":
            kind, _, big = config.partition("-")
            tool.add_region(paths, str(data), kind, 65536 if big else CHUNK)
        yield data, pyscone_run(fspf)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class PatternRun:
    pattern: str
    block: int
    bytes: int
    ops: int
    seconds: float
    mb_per_s: float


@dataclass
class AppRun:
    config: str
    round: int
    wall_s: float  # the whole process, start-up included
    cpu_s: float  # whole process tree (host + enclave), start-up included
    patterns: list[PatternRun]


def run_app_once(config: str, rnd: int, s: Settings) -> AppRun:
    with config_dir(config) as (data, prefix):
        cmd = [*prefix, str(FS_IO_PY), str(data), str(s.size), "all", "--ops", str(s.ops)]
        lines, cpu, wall = run_json(cmd, f"fs {config} round {rnd}")
    runs = [PatternRun(**{k: r[k] for k in PatternRun.__dataclass_fields__}) for r in lines]
    if [r.pattern for r in runs] != list(PATTERNS):
        raise FsBenchError(f"fs {config} round {rnd}: patterns {[r.pattern for r in runs]}")
    return AppRun(config, rnd, round(wall, 3), round(cpu, 3), runs)


@dataclass
class PatternResult:
    pattern: str
    config: str
    mb_per_s: float  # median over rounds
    mb_per_s_min: float
    mb_per_s_max: float
    rounds: int


def aggregate(runs: list[AppRun]) -> list[PatternResult]:
    out = []
    for config in CONFIGS:
        mine = [r for r in runs if r.config == config]
        for pattern in PATTERNS:
            values = [p.mb_per_s for r in mine for p in r.patterns if p.pattern == pattern]
            if values:
                out.append(
                    PatternResult(pattern, config, statistics.median(values), min(values), max(values), len(values))
                )
    return out


# --------------------------------------------------------------------------- chunk micro-benchmark


@dataclass
class ChunkMicro:
    what: str  # encrypted | authenticated | aes-gcm
    seal_us: float  # per 4 KiB chunk, best of the repetitions
    open_us: float
    seal_us_median: float
    open_us_median: float


def time_us(fns: dict[str, Callable[[], object]], n: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(best, median) µs per call of each function, over ``repeats`` loops of ``n`` calls.

    The functions take turns within each repetition, so a change of machine speed (a VM's
    can change by 1.5-2x for seconds at a time) hits them all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n * 1e6)
    return {name: (min(v), statistics.median(v)) for name, v in times.items()}


RUN = 16  # chunks per run in the micro-benchmark: what one 64 KiB read or write moves


def micro_chunks(s: Settings) -> list[ChunkMicro]:
    """Per 4 KiB chunk, in this process: ``seal_run_into`` / ``open_run_into`` over a run of
    ``RUN`` chunks (the path reads and writes take), and, as the floor, the AES-GCM library
    call alone on one chunk (``encrypt_into`` / ``decrypt_into``, no pyscone code around it)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from pyscone.protect.chunks import OVERHEAD, FileKey, open_run_into, seal_run_into

    plaintexts = [os.urandom(CHUNK) for _ in range(RUN)]
    fns: dict[str, Callable[[], object]] = {}
    for kind in ("encrypted", "authenticated"):
        fk = FileKey.generate(encrypted=kind == "encrypted", chunk_size=CHUNK)
        blob = memoryview(bytearray(RUN * (CHUNK + OVERHEAD)))
        out = memoryview(bytearray(RUN * CHUNK))
        tags = memoryview(b"".join(seal_run_into(fk, 7, plaintexts, blob)))
        open_run_into(fk, 7, blob, tags, out)
        if out != b"".join(plaintexts):
            raise FsBenchError(f"{kind} run does not open to its plaintext")
        sealed = memoryview(bytearray(blob))  # sealing again must not change what is opened
        fns[f"{kind} seal"] = functools.partial(seal_run_into, fk, 7, plaintexts, blob)
        fns[f"{kind} open"] = functools.partial(open_run_into, fk, 7, sealed, tags, out)
    aead, nonce, ad = AESGCM(os.urandom(32)), os.urandom(12), os.urandom(42)  # 42: the chunk AD's size
    one = plaintexts[0]
    sealed_one = aead.encrypt(nonce, one, ad)
    record, plain = bytearray(CHUNK + 16), bytearray(CHUNK)
    fns["aes-gcm seal"] = lambda: aead.encrypt_into(nonce, one, ad, record)
    fns["aes-gcm open"] = lambda: aead.decrypt_into(nonce, sealed_one, ad, plain)
    us = time_us(fns, s.micro_chunks, s.micro_repeats)
    out_rows = []
    for what in ("encrypted", "authenticated", "aes-gcm"):
        per = 1 if what == "aes-gcm" else RUN
        seal, opened = us[f"{what} seal"], us[f"{what} open"]
        out_rows.append(
            ChunkMicro(
                what,
                round(seal[0] / per, 3),
                round(opened[0] / per, 3),
                round(seal[1] / per, 3),
                round(opened[1] / per, 3),
            )
        )
    return out_rows


# --------------------------------------------------------------------------- breakdown


@dataclass
class Breakdown:
    pattern: str
    mode: str  # inprocess-encrypted | enclave
    round: int
    bytes: int
    seconds: float
    mb_per_s: float
    parts_s: dict[str, float]
    calls: dict[str, int]


PARTS = ("chunk_crypto", "host_calls", "fsync", "fspf_seal", "other")


def run_breakdown_once(rnd: int, s: Settings) -> list[Breakdown]:
    out = []
    with config_dir("native") as (data, _):
        lines, _, _ = run_json([PYTHON, str(BREAKDOWN_PY), "inprocess", str(data), str(s.size)], "breakdown in-process")
        out += lines
    with config_dir("encrypted") as (data, prefix):
        lines, _, _ = run_json([*prefix, str(BREAKDOWN_PY), "enclave", str(data), str(s.size)], "breakdown enclave")
        out += lines
    return [Breakdown(**{**r, "round": rnd}) for r in out]


def median_breakdowns(runs: list[Breakdown]) -> list[Breakdown]:
    """Per (pattern, mode): the run whose total time is the median (its parts add up)."""
    out = []
    for pattern in ("seq-write-64k", "seq-read-64k"):
        for mode in ("inprocess-encrypted", "enclave"):
            mine = sorted((b for b in runs if b.pattern == pattern and b.mode == mode), key=lambda b: b.seconds)
            if mine:
                out.append(mine[(len(mine) - 1) // 2])
    return out


# --------------------------------------------------------------------------- the benchmark


@dataclass
class FsReport:
    quick: bool
    size: int
    ops: int
    rounds: int
    tmpdir: str
    tmpdir_fs: str
    results: list[PatternResult]
    micro: list[ChunkMicro]
    breakdown: list[Breakdown]  # the median run per (pattern, mode)
    runs: list[AppRun] = field(default_factory=list)
    breakdown_runs: list[Breakdown] = field(default_factory=list)


def bench_fs(quick: bool, log: Log) -> FsReport:
    s = Settings.of(quick)
    tmp = Path(tempfile.gettempdir()).resolve()
    runs: list[AppRun] = []
    breakdowns: list[Breakdown] = []
    for rnd in range(1, s.rounds + 1):
        for config in CONFIGS:  # native and the enclave configurations alternate
            r = run_app_once(config, rnd, s)
            runs.append(r)
            speeds = " ".join(f"{p.mb_per_s:,.0f}" for p in r.patterns)
            log(f"fs {config:<13} round {rnd}: {r.wall_s:5.1f} s, MB/s by pattern: {speeds}")
        b = run_breakdown_once(rnd, s)
        breakdowns += b
        log(f"fs breakdown round {rnd}: " + ", ".join(f"{x.mode} {x.pattern} {x.mb_per_s:,.0f} MB/s" for x in b))
    micro = micro_chunks(s)
    log(
        "fs chunk micro-benchmark: "
        + ", ".join(f"{m.what} seal {m.seal_us:.2f} µs open {m.open_us:.2f} µs" for m in micro)
    )
    return FsReport(
        quick=quick,
        size=s.size,
        ops=s.ops,
        rounds=s.rounds,
        tmpdir=str(tmp),
        tmpdir_fs=fs_type(tmp),
        results=aggregate(runs),
        micro=micro,
        breakdown=median_breakdowns(breakdowns),
        runs=runs,
        breakdown_runs=breakdowns,
    )


# --------------------------------------------------------------------------- report


def mbs(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def throughput_table(results: list[PatternResult]) -> str:
    by = {(r.pattern, r.config): r.mb_per_s for r in results}
    rows = []
    for pattern in PATTERNS:
        native = by.get((pattern, "native"))
        row = [pattern, mbs(native)]
        for config in ENCLAVE_CONFIGS:
            v = by.get((pattern, config))
            row += [mbs(v), "-" if v is None or not native else f"{v / native:.3f}"]
        rows.append(row)
    headers = ["pattern", "native MB/s"]
    for config, short in zip(ENCLAVE_CONFIGS, SHORT_NAMES, strict=True):
        headers += [f"{config} MB/s", f"{short}/nat"]
    return table(headers, rows)


def micro_table(micro: list[ChunkMicro]) -> str:
    rows = []
    for m in micro:
        name = "AES-GCM call alone" if m.what == "aes-gcm" else m.what
        rows.append(
            [
                name,
                f"{m.seal_us:.2f}",
                f"{m.open_us:.2f}",
                f"{m.seal_us_median:.2f}",
                f"{m.open_us_median:.2f}",
                f"{CHUNK / m.seal_us:,.0f}",
                f"{CHUNK / m.open_us:,.0f}",
            ]
        )
    return table(["4 KiB chunk", "seal µs", "open µs", "seal µs med", "open µs med", "seal MB/s", "open MB/s"], rows)


def breakdown_table(breakdown: list[Breakdown]) -> str:
    rows = []
    for b in breakdown:
        cells = [b.pattern, "in-process" if b.mode.startswith("inprocess") else "enclave", mbs(b.mb_per_s)]
        cells.append(f"{b.seconds * 1e3:,.0f}")
        for part in PARTS:
            v = b.parts_s.get(part, 0.0)
            cells.append(f"{v * 1e3:,.0f} ({v / b.seconds:.0%})")
        cells.append(str(b.calls.get("host_calls", 0) + b.calls.get("fsync", 0)))
        rows.append(cells)
    return table(
        [
            "pattern",
            "where",
            "MB/s",
            "total ms",
            "crypto ms",
            "host calls ms",
            "fsync ms",
            "FSPF seal ms",
            "other ms",
            "calls",
        ],
        rows,
    )


def spread(results: list[PatternResult]) -> str:
    """How much the rounds disagree, per configuration: a VM's speed can change between runs."""
    parts = []
    for config in CONFIGS:
        values = [r.mb_per_s_max / r.mb_per_s_min - 1 for r in results if r.config == config and r.mb_per_s_min]
        if values:
            parts.append(f"{config} {statistics.median(values):.0%}")
    return ", ".join(parts)


def report_lines(r: FsReport) -> list[str]:
    size = f"{r.size >> 20} MiB"
    by_config: dict[str, list[float]] = {}
    for run in r.runs:
        by_config.setdefault(run.config, []).append(run.cpu_s)
    cpu = ", ".join(f"{c} {statistics.median(v):.1f} s" for c, v in by_config.items())
    return [
        f"fs: bench/apps/fs_io.py, {size} file, random patterns {r.ops} ops each, median of {r.rounds} round(s); "
        "MB/s = 10^6 bytes/s; x/nat = enclave MB/s / native MB/s (1.0 = native speed)",
        f"    page-cache warm (the cache is not dropped); each configuration in a fresh temp dir under "
        f"{r.tmpdir} ({r.tmpdir_fs}); writes are timed open..fsync+close (the shield commits there); "
        "4 KiB chunks (the default) but for encrypted-64k, a region with 64 KiB chunks",
        "",
        throughput_table(r.results),
        "",
        f"    CPU s per whole app run (process tree, start-up included, median): {cpu}",
        *([f"    spread over rounds, max/min - 1, median over patterns: {spread(r.results)}"] if r.rounds > 1 else []),
        "",
        "chunk crypto in-process, per 4 KiB chunk (best and median of the repetitions): "
        f"pyscone.protect.chunks.seal_run_into / open_run_into over runs of {RUN} chunks, "
        "and the AES-GCM library call alone",
        "",
        micro_table(r.micro),
        "",
        f"where the time goes: encrypted region, 64 KiB blocks, {size}; instrumented runs "
        "(bench/apps/fs_breakdown.py: exclusive times, the run with the median total); "
        "in-process = ProtectedFile over a plain file, no enclave",
        "",
        breakdown_table(r.breakdown),
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pyscone file-system shield throughput against native Python")
    p.add_argument("--quick", action="store_true", help="an 8 MiB file, 500 random ops, one round")
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    try:
        report = bench_fs(a.quick, log)
    except FsBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    print(
        f"pyscone fs benchmark{' (quick)' if a.quick else ''}: Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {elapsed:.0f} s\n"
    )
    print("\n".join(report_lines(report)), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "fs.json"
    out.write_text(json.dumps({"elapsed_s": round(elapsed, 1), **asdict(report)}, indent=2) + "\n")
    print(f"results: {out.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
