"""The console shield across fork: every process its own run, one log for the family.

The family decoder against a model (sans-IO: a random tree of processes, their records
interleaved as a host may receive them), then real enclaves that fork (children and a
grandchild print, end with ``sys.exit``, ``os._exit`` and multiprocessing's exit) decoded
by ``pyscone console``, with the nonces checked straight from the raw records, and the
host's edits of a child's lines reported against that child.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import PYSCONE, free_port, wait_port, write_app
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscone.protect import console as fmt

KEY = bytes(range(32))

# ----------------------------------------------------------------------------- the family decoder, sans-IO


@dataclass
class Proc:
    """A process of the model: what it writes, where it forks each child, how it ends."""

    writes: list[tuple[int, bytes]]
    status: int
    children: list[tuple[int, Proc]] = field(default_factory=list)  # (writes before the fork, child)
    run: bytes = b""
    lines: list[bytes] = field(default_factory=list)
    forked_at: list[int] = field(default_factory=list)  # for each child: how many of our lines precede it


writes_st = st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(min_size=1, max_size=40)), max_size=5)


def _proc(children: st.SearchStrategy[list[tuple[int, Proc]]]) -> st.SearchStrategy[Proc]:
    return st.builds(Proc, writes_st, st.integers(0, 255), children)


procs_st = st.recursive(
    _proc(st.just([])), lambda inner: _proc(st.lists(st.tuples(st.integers(0, 5), inner), max_size=2)), max_leaves=6
)


def _all(p: Proc) -> list[Proc]:
    return [p, *(q for _, c in p.children for q in _all(c))]


def _encode(p: Proc, lineage: fmt.Lineage | None, ids: list[int]) -> None:
    """Each process's lines, in its own order (a child's START names the parent's gseq at the fork)."""
    ids[0] += 1
    p.run = ids[0].to_bytes(16, "big")
    enc = fmt.Encoder(KEY, p.run, max_payload=16)
    p.lines = enc.start(lineage)
    forks = sorted(((min(at, len(p.writes)), c) for at, c in p.children), key=lambda t: t[0])
    p.children = forks
    done = 0
    for at, child in forks:
        for stream, data in p.writes[done:at]:
            p.lines += enc.write(fmt.Stream(stream), data)
        done = max(done, at)
        p.forked_at.append(len(p.lines))
        _encode(child, fmt.Lineage(p.run, enc.gseq, 1000 + ids[0]), ids)
    for stream, data in p.writes[done:]:
        p.lines += enc.write(fmt.Stream(stream), data)
    p.lines += enc.end(p.status, len(forks))


def _interleave(root: Proc, rnd: random.Random) -> list[bytes]:
    """One log as a host may receive it: each process's lines in order, a child's after its parent's before the fork."""
    procs = _all(root)
    at = {id(p): 0 for p in procs}
    gate = {id(c): (p, n) for p in procs for (_, c), n in zip(p.children, p.forked_at, strict=True)}
    log: list[bytes] = []
    while True:
        ready = [
            p
            for p in procs
            if at[id(p)] < len(p.lines) and (id(p) not in gate or at[id(gate[id(p)][0])] >= gate[id(p)][1])
        ]
        if not ready:
            return log
        p = rnd.choice(ready)
        log.append(p.lines[at[id(p)]])
        at[id(p)] += 1


def _decode(lines: list[bytes]) -> tuple[fmt.Decoder, list[fmt.Output]]:
    dec = fmt.Decoder(KEY)
    events = [ev for n, line in enumerate(lines, 1) for ev in dec.feed(line, n)] + dec.finish()
    return dec, [ev for ev in events if isinstance(ev, fmt.Output)]


@settings(max_examples=60, deadline=None)
@given(procs_st, st.randoms(use_true_random=False))
def test_a_familys_interleaved_log_decodes_exactly_run_by_run(root: Proc, rnd: random.Random) -> None:
    _encode(root, None, [0])
    log = _interleave(root, rnd)
    dec, outputs = _decode(log)
    assert dec.clean, [p.message for p in dec.problems]
    procs = _all(root)
    assert set(dec.runs) == {p.run for p in procs} and dec.run == root.run
    for p in procs:
        got = [(int(ev.stream), ev.data) for ev in outputs if ev.run == p.run]
        assert b"".join(d for _, d in got) == b"".join(d for _, d in p.writes)  # (max_payload splits writes)
        run = dec.runs[p.run]
        assert run.status == p.status and run.started == len(p.children)
        assert sorted(run.children) == sorted(c.run for _, c in p.children)
    # Split as docker logs does (stdout, stderr), decode each, merge: each run's order is its own.
    logs = [[line for line in log if fmt.open_line(fmt._Keys(KEY, fmt.OUTPUT_LABEL), line).stream == s] for s in (1, 2)]
    decs = [_decode(one) for one in logs]
    assert all(d.clean for d, _ in decs), [p.message for d, _ in decs for p in d.problems]
    lineage = {r.run: r.lineage for d, _ in decs for r in d.runs.values()}
    merged, twice = fmt.merge([out for _, out in decs], lineage)
    assert twice == 0
    for p in procs:
        mine = [ev for ev in merged if ev.run == p.run]
        assert [ev.gseq for ev in mine] == sorted(ev.gseq for ev in mine)
        assert b"".join(ev.data for ev in mine) == b"".join(d for _, d in p.writes)
    position = {(ev.run, ev.gseq): i for i, ev in enumerate(merged)}
    for (run, _), i in position.items():
        link = lineage[run]
        if link is not None:  # the parent's output from before the fork came first
            assert all(j < i for (r, g), j in position.items() if r == link.parent and g < link.gseq)


@settings(max_examples=60, deadline=None)
@given(procs_st, st.randoms(use_true_random=False), st.sampled_from(["forge", "drop", "dup"]), st.integers(0, 999))
def test_any_edit_of_a_familys_log_is_reported(root: Proc, rnd: random.Random, what: str, i: int) -> None:
    _encode(root, None, [0])
    log = _interleave(root, rnd)
    i %= len(log)
    if what == "forge":
        line = bytearray(log[i])
        line[10] = ord("A") if line[10] != ord("A") else ord("B")
        log[i] = bytes(line)
    elif what == "drop":
        del log[i]
    else:
        log.insert(rnd.randint(i + 1, len(log)), log[i])
    dec, _ = _decode(log)
    assert not dec.clean
    kinds = {p.kind for p in dec.problems}
    if what == "dup":
        assert kinds == {"replayed"}, [p.message for p in dec.problems]
    if what == "drop" and len(dec.runs) == len(_all(root)):
        # A run that lost a record is named (a child by its id), and no other run is blamed.
        lost = fmt.open_line(fmt._Keys(KEY, fmt.OUTPUT_LABEL), _missing_line(root, log))
        named = [p for p in dec.problems if p.kind != "unstarted"]
        child = dec.runs[lost.run].lineage is not None
        assert all((lost.run.hex()[:12] in p.message) == child for p in named), [p.message for p in named]


def _missing_line(root: Proc, log: list[bytes]) -> bytes:
    """The line that is missing from ``log`` (which lost one)."""
    have = set(log)
    return next(line for p in _all(root) for line in p.lines if line not in have)


def test_a_child_of_no_run_in_the_log_is_reported_and_not_shown() -> None:
    parent = fmt.Encoder(KEY, b"P" * 16)
    other = fmt.Encoder(KEY, b"O" * 16)
    stranger = fmt.Encoder(KEY, b"S" * 16)
    log = parent.start() + parent.write(fmt.Stream.STDOUT, b"mine\n")
    log += stranger.start(fmt.Lineage(other.run, 3, 77)) + stranger.write(fmt.Stream.STDOUT, b"not mine\n")
    log += stranger.end(0) + parent.end(0)
    dec, outputs = _decode(log)
    assert [ev.data for ev in outputs] == [b"mine\n"]
    assert {p.kind for p in dec.problems} == {"unlinked"} and dec.tampered
    assert (
        len(dec.problems) == 1 and "pid 77" in dec.problems[0].message and "not in this log" in dec.problems[0].message
    )
    assert dec.status == 0  # the parent is not blamed: its run is clean


def test_a_childs_start_moved_behind_its_records_is_a_reordering_of_that_child() -> None:
    parent = fmt.Encoder(KEY, b"P" * 16)
    child = fmt.Encoder(KEY, b"C" * 16)
    log = parent.start()
    start = child.start(fmt.Lineage(parent.run, parent.gseq, 9))
    log += [child.write(fmt.Stream.STDOUT, b"c\n")[0], *start, *child.end(0), *parent.end(0, children=1)]
    keys = fmt._Keys(KEY, fmt.OUTPUT_LABEL)
    log = [line for line in log if fmt.open_line(keys, line).stream == fmt.Stream.STDOUT]  # (stdout's log alone)
    dec, outputs = _decode(log)
    assert [ev.data for ev in outputs] == [b"c\n"]
    assert {p.kind for p in dec.problems} == {"reordered"}, [p.message for p in dec.problems]
    assert all(child.run.hex()[:12] in p.message for p in dec.problems)


def test_a_childs_run_missing_altogether_is_unclean_not_tampering() -> None:
    parent = fmt.Encoder(KEY, b"P" * 16)
    log = parent.start() + parent.write(fmt.Stream.STDOUT, b"x\n") + parent.end(0, children=1)
    dec, _ = _decode(log)
    assert {p.kind for p in dec.problems} == {"unstarted"} and not dec.tampered
    # A record of a child whose START the host dropped: waits for it, then is another run's.
    child = fmt.Encoder(KEY, b"C" * 16)
    child.start(fmt.Lineage(parent.run, 2, 9))
    dec, outputs = _decode(log + child.write(fmt.Stream.STDOUT, b"y\n") + child.end(0))
    assert [ev.data for ev in outputs] == [b"x\n"] and {p.kind for p in dec.problems} == {"replayed", "unstarted"}


# ----------------------------------------------------------------------------- real enclaves

APP = """
import multiprocessing, os, sys

def say(who, what):
    sys.stdout.write(f"{who} {what}\\n")  # (one write: print makes several, which other processes may split)
    sys.stdout.flush()

def worker(n):
    say("M", n)

if __name__ == "__main__":
    say("P", 0)
    a = os.fork()
    if a == 0:
        say("A", 0)
        sys.stderr.write("A err\\n")
        g = os.fork()
        if g == 0:
            for i in range(3):
                say("G", i)
            os.write(1, b"G raw\\n")
            os._exit(5)
        say("A", 1)
        _, st = os.waitpid(g, 0)
        say("A", f"G={os.waitstatus_to_exitcode(st)}")
        sys.exit(3)
    for i in range(8):  # a burst: still queued (write-behind) when the fork comes
        say("P", f"1.{i}")
    b = os.fork()
    if b == 0:
        for i in range(50):  # a burst that is still queued (write-behind) at os._exit
            os.write(1, f"B {i}\\n".encode())
        os._exit(7)
    m = multiprocessing.get_context("fork").Process(target=worker, args=(1,))
    m.start()
    for i in range(2, 6):
        say("P", i)
    sys.stderr.write("P err\\n")
    say("P", f"A={os.waitstatus_to_exitcode(os.waitpid(a, 0)[1])}")
    say("P", f"B={os.waitstatus_to_exitcode(os.waitpid(b, 0)[1])}")
    m.join()
    say("P", f"M={m.exitcode}")
"""


def _pyscone(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*PYSCONE, *map(str, args)], cwd=cwd, capture_output=True, timeout=120)


def _run(tmp_path: Path, key: Path, app: Path, name: str, merged: bool = False) -> tuple[Path, Path]:
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        cmd = [*PYSCONE, "run", "--console-key-file", str(key), str(app)]
        ran = subprocess.run(cmd, cwd=tmp_path, stdout=o, stderr=subprocess.STDOUT if merged else e, timeout=120)
    assert ran.returncode == 0, err.read_text(errors="replace")[-2000:]
    return out, err


def _console(tmp_path: Path, key: Path, *logs: Path) -> tuple[int, bytes, bytes, str]:
    """``pyscone console``: its status, the app's stdout and stderr, and its own lines."""
    cmd = [*PYSCONE, "console", "--key-file", str(key), *map(str, logs)]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=120)
    own = [ln for ln in r.stderr.decode(errors="replace").splitlines() if ln.startswith("pyscone console:")]
    err = b"".join(ln for ln in r.stderr.splitlines(keepends=True) if not ln.startswith(b"pyscone console:"))
    return r.returncode, r.stdout, err, "\n".join(own)


def _by_process(text: bytes) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for line in text.splitlines():
        out.setdefault(line.split(b" ")[0], []).append(line)
    return out


def _key(tmp_path: Path) -> Path:
    key = tmp_path / "console.key"
    assert _pyscone("console", "--make-key", "--key-file", key, cwd=tmp_path).returncode == 0
    return key


def _lines_of(key: Path, *logs: Path) -> list[tuple[bytes, fmt.Record | None]]:
    """Each line of the logs, with its record opened (the owner's view of the raw log)."""
    keys = fmt._Keys(fmt.parse_key(key.read_text()), fmt.OUTPUT_LABEL)
    return [
        (line, fmt.open_line(keys, line) if fmt.is_record(line) else None)
        for log in logs
        for line in log.read_bytes().splitlines(keepends=True)
    ]


def test_a_forking_app_decodes_clean_each_process_in_order_with_its_status(tmp_path: Path) -> None:
    key = _key(tmp_path)
    app = write_app(tmp_path, APP)
    native = subprocess.run([sys.executable, str(app)], capture_output=True, cwd=tmp_path, timeout=60)
    assert native.returncode == 0, native.stderr
    expected = _by_process(native.stdout)
    assert sorted(expected) == [b"A", b"B", b"G", b"M", b"P"] and len(expected[b"B"]) == 50
    out, err = _run(tmp_path, key, app, "split")
    assert b"P 0" not in out.read_bytes() + err.read_bytes()  # the host sees records only
    for logs in ((out, err), (out,)):
        status, plain, plain_err, own = _console(tmp_path, key, *logs)
        assert status == 0, own
        assert _by_process(plain) == expected, own  # every line, each process's in its order
        # Each child's status, from its END records: A sys.exit(3), G os._exit(5), B os._exit(7)
        # with its burst still queued, multiprocessing's child os._exit(0).
        assert sorted(int(n) for n in re.findall(r"\): exited with status (\d+)", own)) == [0, 3, 5, 7], own
        assert "ok:" in own and "and its 4 child runs, the app exited with status 0" in own
        order = plain.splitlines()
        assert order.index(b"P 1.7") < order.index(b"B 0"), order  # (two logs merged: the fork orders them)
        if len(logs) == 2:
            assert sorted(plain_err.splitlines()) == [b"A err", b"P err"]
    merged, _ = _run(tmp_path, key, app, "merged", merged=True)  # 2>&1: one live stream
    status, plain, plain_err, own = _console(tmp_path, key, merged)
    assert status == 0, own
    assert _by_process(plain) == expected and sorted(plain_err.splitlines()) == [b"A err", b"P err"]
    # What the parent wrote before a fork is on the host before anything of the child's.
    order = plain.splitlines()
    assert order.index(b"P 0") < order.index(b"A 0") and order.index(b"P 1.7") < order.index(b"B 0"), order

    # Nonces, from the raw records: no two records of the whole family share (run, gseq) -- and
    # each run has its own key, HKDF(owner key, salt=run) -- so no (key, nonce) is used twice.
    for logs in ((out, err), (merged,)):
        recs = [r for _, r in _lines_of(key, *logs) if r is not None]
        pairs = [(r.run, r.gseq) for r in recs]
        assert len(pairs) == len(set(pairs))
        runs = {r.run for r in recs}
        assert len(runs) == 5  # the app, A, G (A's child), B, and multiprocessing's child
        starts = {r.run: fmt.lineage_of(r.payload) for r in recs if r.kind == fmt.Kind.START}
        roots = [run for run, link in starts.items() if link is None]
        assert len(roots) == 1 and all(link is None or link.parent in runs for link in starts.values())


def _child_with(lines: list[tuple[bytes, fmt.Record | None]], mark: bytes) -> bytes:
    """The run of the child process whose output holds ``mark``."""
    return next(r.run for _, r in lines if r is not None and r.kind == fmt.Kind.DATA and mark in r.payload)


def test_the_hosts_edits_of_a_childs_lines_are_reported_against_that_child(tmp_path: Path) -> None:
    key = _key(tmp_path)
    app = write_app(tmp_path, APP)
    log, _ = _run(tmp_path, key, app, "one", merged=True)
    lines = _lines_of(key, log)
    g = _child_with(lines, b"G 1")
    gname = g.hex()[:12]
    data = [i for i, (_, r) in enumerate(lines) if r is not None and r.run == g and r.kind == fmt.Kind.DATA]

    def edited(name: str, new: list[bytes]) -> tuple[int, str]:
        path = tmp_path / name
        path.write_bytes(b"".join(new))
        status, _, _, own = _console(tmp_path, key, path)
        return status, own

    raw = [line for line, _ in lines]
    forged = list(raw)
    b64 = bytearray(forged[data[0]])
    b64[20] = ord("A") if b64[20] != ord("A") else ord("B")
    forged[data[0]] = bytes(b64)
    status, own = edited("forged.log", forged)
    assert status == 1 and "forged record (authentication failed)" in own and "TAMPERED" in own

    dropped = [line for i, line in enumerate(raw) if i != data[0]]
    status, own = edited("dropped.log", dropped)
    assert status == 1 and f"run {gname} (pid " in own and "stdout: dropped 1 record" in own, own
    problems = [ln for ln in own.splitlines() if "dropped" in ln and "TAMPERED" not in ln]
    assert problems and all(gname in ln for ln in problems), own  # the child's fault, not its parent's

    replayed = [*raw[: data[-1] + 1], raw[data[0]], *raw[data[-1] + 1 :]]
    status, own = edited("replayed.log", replayed)
    assert status == 1 and f"run {gname} (pid " in own and "again: replayed" in own, own

    # A child's whole run cut out: the parent's END counts its children, so it is seen.
    a = _child_with(lines, b"A 0")
    without = [line for line, r in lines if r is None or r.run != g]
    status, own = edited("no-g.log", without)
    assert status == 3 and f"run {a.hex()[:12]} (pid " in own and "not in this log" in own, own

    # A child run pasted from another run's log: its parent is no run here.
    other, _ = _run(tmp_path, key, app, "two", merged=True)
    olines = _lines_of(key, other)
    og = _child_with(olines, b"G 1")
    pasted = raw + [line for line, r in olines if r is not None and r.run == og]
    status, own = edited("pasted.log", pasted)
    assert status == 1 and "not in this log: a run of another log" in own, own


def test_os_exit_sends_what_was_written_and_the_end_records(tmp_path: Path) -> None:
    key = _key(tmp_path)
    app = write_app(
        tmp_path,
        """
        import os, sys
        print("buffered, never flushed: lost as natively")
        for i in range(200):
            os.write(1, b"line %d\\n" % i)
        sys.stderr.write("to stderr\\n")
        os._exit(9)
        """,
    )
    out, err = tmp_path / "x.out", tmp_path / "x.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        ran = subprocess.run(
            [*PYSCONE, "run", "--console-key-file", str(key), str(app)], cwd=tmp_path, stdout=o, stderr=e
        )
    assert ran.returncode == 9
    status, plain, plain_err, own = _console(tmp_path, key, out, err)
    assert status == 0 and "the app exited with status 9" in own, own
    assert plain == b"".join(b"line %d\n" % i for i in range(200)) and plain_err == b"to stderr\n"


def test_gunicorn_workers_are_runs_of_the_family(tmp_path: Path) -> None:
    pytest.importorskip("gunicorn")
    pytest.importorskip("flask")
    key = _key(tmp_path)
    shutil.copy(Path(__file__).parent / "compat" / "apps" / "flask_gunicorn.py", tmp_path)
    port = free_port()
    out, err = tmp_path / "g.out", tmp_path / "g.err"
    cmd = [*PYSCONE, "run", "--console-key-file", str(key), "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}"]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([*cmd, "flask_gunicorn:app"], cwd=tmp_path, stdout=o, stderr=e)
        try:
            wait_port(port)
            for _ in range(10):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
                    assert r.read().startswith(b"hello from flask on gunicorn worker")
        finally:
            proc.send_signal(signal.SIGTERM)  # gunicorn's graceful stop: its workers exit, then the master
            assert proc.wait(timeout=30) == 0
    status, _, plain_err, own = _console(tmp_path, key, out, err)
    assert status == 0, own
    assert own.count("): exited with status 0") == 2 and "and its 2 child runs, the app exited with status 0" in own, (
        own
    )
    assert plain_err.count(b"Worker exiting") == 2 and b"Shutting down: Master" in plain_err
