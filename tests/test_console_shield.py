"""The console shield: the record format against a model, and real enclaves whose console the host edits.

The host's view is the bytes ``pyscone run`` wrote to its stdout and stderr; the owner's
is what ``pyscone console`` makes of them.  Each tamper case edits a real captured log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PYSCONE, write_app
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscone.cas import policy
from pyscone.cas.policy import PolicyError
from pyscone.protect import console as fmt

KEY = bytes(range(32))
RUN = bytes(16)

# ----------------------------------------------------------------------------- the format, sans-IO


def _encode(writes: list[tuple[int, bytes]], status: int = 0, run: bytes = RUN) -> list[bytes]:
    enc = fmt.Encoder(KEY, run, max_payload=64)
    lines = enc.start()
    for stream, data in writes:
        lines += enc.write(fmt.Stream(stream), data)
    return lines + enc.end(status)


def _decode(lines: list[bytes]) -> tuple[list[tuple[int, bytes]], fmt.Decoder]:
    dec = fmt.Decoder(KEY)
    events = [ev for n, line in enumerate(lines, 1) for ev in dec.feed(line, n)] + dec.finish()
    return [(int(ev.stream), ev.data) for ev in events if isinstance(ev, fmt.Output)], dec


def _kinds(dec: fmt.Decoder) -> set[str]:
    return {p.kind for p in dec.problems}


writes_st = st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(min_size=1, max_size=150)), max_size=12)


@given(writes_st, st.integers(0, 255))
def test_an_untouched_stream_decodes_exactly(writes: list[tuple[int, bytes]], status: int) -> None:
    lines = _encode(writes, status)
    assert all(line.isascii() and line.count(b"\n") == 1 and line.endswith(b"\n") for line in lines)
    out, dec = _decode(lines)
    joined = {s: b"".join(d for t, d in out if t == s) for s in (1, 2)}
    assert joined == {s: b"".join(d for t, d in writes if t == s) for s in (1, 2)}
    assert dec.clean and dec.status == status and dec.total == len(lines)


@dataclass(frozen=True)
class Op:
    """One thing a host does to a list of record lines (indices are taken modulo its length)."""

    what: str  # forge, swap, drop, dup, truncate, foreign
    i: int
    j: int = 0


ops_st = st.builds(Op, st.sampled_from(["forge", "swap", "drop", "dup", "truncate", "foreign"]), st.integers(0, 99))


def _apply(lines: list[bytes], op: Op, foreign: bytes) -> list[bytes]:
    out = list(lines)
    if not out:
        return out
    i = op.i % len(out)
    if op.what == "forge":  # a base64 character after the prefix changed to another one
        line = bytearray(out[i])
        pos = len(fmt.PREFIX) + (op.i * 7) % (len(line) - len(fmt.PREFIX) - 1)
        line[pos] = ord("A") if line[pos] != ord("A") else ord("B")
        out[i] = bytes(line)
    elif op.what == "swap":
        j = (i + 1 + op.j) % len(out)
        out[i], out[j] = out[j], out[i]
    elif op.what == "drop":
        del out[i]
    elif op.what == "dup":
        out.insert(i + 1, out[i])
    elif op.what == "truncate":
        del out[i:]
    elif op.what == "foreign":
        out.insert(i, foreign)
    return out


def _foreign() -> bytes:
    return _encode([(1, b"other run")], run=b"\x01" * 16)[2]


@settings(max_examples=300)
@given(writes_st, st.lists(ops_st, min_size=1, max_size=4))
def test_any_tampering_is_reported(writes: list[tuple[int, bytes]], ops: list[Op]) -> None:
    """Whatever the host does, a changed list never decodes as clean (the model: equality)."""
    lines = _encode(writes)
    tampered = lines
    for op in ops:
        tampered = _apply(tampered, op, _foreign())
    _, dec = _decode(tampered)
    # The model: the input is the run's, or exactly one stream of it (which the decoder says is absent).
    keys = fmt._Keys(KEY, fmt.OUTPUT_LABEL)
    one_stream = {s: [ln for ln in lines if fmt.open_line(keys, ln).stream == s] for s in (1, 2)}
    untouched = tampered == lines or any(
        tampered == one_stream[s] and set(dec.absent) == {fmt.Stream(3 - s)} for s in (1, 2)
    )
    assert dec.clean == untouched, (ops, [p.message for p in dec.problems])


@settings(max_examples=300)
@given(writes_st, ops_st)
def test_each_kind_of_tampering_is_named(writes: list[tuple[int, bytes]], op: Op) -> None:
    """One operation: the decoder names exactly what the host did (lists shorter than the window)."""
    lines = _encode(writes)
    tampered = _apply(lines, op, _foreign())
    if tampered == lines:
        return
    _, dec = _decode(tampered)
    kinds = _kinds(dec)
    i = op.i % len(lines)
    ends = {len(lines) - 2, len(lines) - 1}  # the END records of stdout and stderr
    if op.what == "forge":
        assert "forged" in kinds
    elif op.what == "swap":
        assert kinds == {"reordered"}, [p.message for p in dec.problems]
    elif op.what == "drop":
        assert kinds == ({"truncated"} if i in ends else {"dropped"}), [p.message for p in dec.problems]
    elif op.what in ("dup", "foreign"):
        assert kinds == {"replayed"}, [p.message for p in dec.problems]
    elif op.what == "truncate":  # the last line is always cut: an END record is missing
        assert kinds == {"truncated"} and not dec.tampered
        said = "did not exit cleanly" if tampered else "no console records at all"
        assert said in dec.problems[-1].message


def test_a_reordering_is_restored_and_a_swap_across_streams_is_seen() -> None:
    lines = _encode([(1, b"a"), (1, b"b"), (2, b"c"), (1, b"d")])
    swapped = [*lines[:2], lines[3], lines[2], *lines[4:]]  # stdout's a and b
    out, dec = _decode(swapped)
    assert [d for _, d in out] == [b"a", b"b", b"c", b"d"] and _kinds(dec) == {"reordered"}
    across = [*lines[:4], lines[5], lines[4], *lines[6:]]  # stdout's b and stderr's c
    _, dec = _decode(across)
    assert _kinds(dec) == {"reordered"} and "stdout and stderr" in dec.problems[0].message


def test_one_stream_alone_still_shows_its_drops() -> None:
    lines = _encode([(1, b"a"), (2, b"x"), (1, b"b"), (1, b"c")])
    stdout = [line for line in lines if fmt.open_line(fmt._Keys(KEY, fmt.OUTPUT_LABEL), line).stream == 1]
    out, dec = _decode(stdout)
    assert dec.clean and [d for _, d in out] == [b"a", b"b", b"c"]
    _, dec = _decode(stdout[:2] + stdout[3:])
    assert [p.message for p in dec.problems] == ["line 3: stdout: dropped 1 record (seq 2)"]


def test_output_records_are_not_input_and_input_is_strict() -> None:
    enc = fmt.Encoder(KEY, RUN, (fmt.Stream.STDIN,), fmt.INPUT_LABEL)
    records = b"".join(enc.start() + enc.write(fmt.Stream.STDIN, b"hello\n") + enc.end(0))
    reader = fmt.InputReader(KEY, 1 << 16)
    assert reader.feed(records[:10]) == b"" and reader.feed(records[10:]) == b"hello\n"
    reader.eof()
    output = b"".join(_encode([(1, b"hello\n")]))
    with pytest.raises(fmt.ConsoleError, match="forged"):
        fmt.InputReader(KEY, 1 << 16).feed(output)
    cut = fmt.InputReader(KEY, 1 << 16)
    cut.feed(records.split(b"\n", 2)[0] + b"\n")
    with pytest.raises(fmt.ConsoleError, match="without its end record"):
        cut.eof()
    with pytest.raises(fmt.ConsoleError, match="without its end record"):
        cut.feed(b"")  # and it stays failed
    fmt.InputReader(KEY, 1 << 16).eof()  # no input at all: an empty stdin


# ----------------------------------------------------------------------------- the policy


def _policy(console: str) -> str:
    return f"name: s\nservices:\n  app:\n    mrenclaves: ['{'0' * 64}']\n    argv: [a.py]\n    console: {console}\n"


def test_the_policy_takes_the_owners_console_key_and_nothing_else() -> None:
    assert policy.parse(_policy("{key: " + "Ab" * 32 + "}")).services["app"].console_key == "ab" * 32
    assert policy.parse(_policy("{key: " + "1" * 64 + "}")).services["app"].console_key == "1" * 64
    secret = "{key: '${secret:k}'}\nsecrets:\n  k: {kind: random, bytes: 32}"
    for bad, message in (
        (secret, "never shown"),
        ("{key: abc}", "64 hex digits"),
        ("{}", "key"),
        ("{key: " + "0" * 64 + ", other: 1}", "other"),
    ):
        with pytest.raises(PolicyError, match=message):
            policy.parse(_policy(bad))


# ----------------------------------------------------------------------------- real enclaves

APP = """
import ctypes, os, sys
print("MARK-print-1", flush=True)
sys.stderr.write("MARK-stderr-1\\n")
os.write(1, b"MARK-oswrite-1\\n")
os.write(2, b"MARK-oswrite-2\\n")
print("MARK-print-2", flush=True)
print("MARK-big", "x" * 100000, flush=True)
libc = ctypes.CDLL(None)
libc.printf(b"MARK-cprintf %d\\n", 42)
libc.fflush(None)
libc.fputs(b"MARK-cstderr\\n", ctypes.c_void_p.in_dll(libc, "stderr"))
sys.stderr.write("MARK-stderr-2\\n")
raise SystemExit(4)
"""


def _pyscone(
    *args: str | Path, cwd: Path, stdin: bytes | None = None, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*PYSCONE, *map(str, args)], cwd=cwd, input=stdin, capture_output=True, timeout=120, **kw)  # type: ignore[call-overload, no-any-return]


def _key(tmp_path: Path) -> Path:
    key = tmp_path / "console.key"
    assert _pyscone("console", "--make-key", "--key-file", key, cwd=tmp_path).returncode == 0
    return key


def _run_to_files(tmp_path: Path, key: Path, app: Path, merged: bool = False) -> tuple[Path, Path]:
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "wb") as o, open(err, "wb") as e:
        cmd = [*PYSCONE, "run", "--console-key-file", str(key), str(app)]
        subprocess.run(cmd, cwd=tmp_path, stdout=o, stderr=subprocess.STDOUT if merged else e, timeout=120)
    return out, err


def _console(tmp_path: Path, key: Path, *logs: Path) -> tuple[int, bytes, str]:
    """``pyscone console``: its exit status, stdout and stderr both in one pipe (the interleaving), and its own lines."""
    cmd = [*PYSCONE, "console", "--key-file", str(key), *(os.path.relpath(log, tmp_path) for log in logs)]
    r = subprocess.run(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    own = [ln for ln in r.stdout.decode(errors="replace").splitlines() if ln.startswith("pyscone console:")]
    app = b"".join(ln for ln in r.stdout.splitlines(keepends=True) if not ln.startswith(b"pyscone console:"))
    return r.returncode, app, "\n".join(own)


def test_the_host_sees_only_records_and_the_owner_the_exact_interleaved_output(tmp_path: Path) -> None:
    key = _key(tmp_path)
    app = write_app(tmp_path, APP)
    native = subprocess.run([sys.executable, str(app)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    assert native.returncode == 4
    out, err = _run_to_files(tmp_path, key, app)
    host = out.read_bytes() + err.read_bytes()
    assert b"MARK" not in host and b"xxxxxxxxxx" not in host
    records = out.read_bytes().splitlines() + err.read_bytes().splitlines()[1:]
    assert all(line.startswith(fmt.PREFIX) for line in records)
    warning = err.read_bytes().splitlines()[0]
    assert warning.startswith(b"pyscone: WARNING: INSECURE dev mode: the console key")
    status, plain, own = _console(tmp_path, key, out, err)
    assert status == 0, own
    assert "ok:" in own and "exited with status 4" in own
    assert b"MARK-cprintf 42\nMARK-cstderr\n" in plain  # C stdio's stdout and stderr: the shield's too
    assert plain == native.stdout


def test_each_tampering_of_a_real_log_is_named(tmp_path: Path) -> None:
    key = _key(tmp_path)
    app = write_app(
        tmp_path,
        "import sys\nfor i in range(6):\n    print('line', i, flush=True)\n    sys.stderr.write(f'err {i}\\n')\n",
    )
    out, _ = _run_to_files(tmp_path, key, app, merged=True)
    lines = out.read_bytes().splitlines(keepends=True)[1:]  # (the dev-mode warning: host text)
    assert _console(tmp_path, key, out)[0] == 0
    (tmp_path / "other").mkdir()
    other, _ = _run_to_files(tmp_path / "other", key, app, merged=True)
    foreign = other.read_bytes().splitlines(keepends=True)[5]
    flipped = bytearray(lines[6])
    flipped[20] ^= 0x01
    cases = {
        "flip": ([*lines[:6], bytes(flipped), *lines[7:]], "line 7: forged record (authentication failed)"),
        "swap": ([*lines[:4], lines[5], lines[4], *lines[6:]], "reordered"),
        "delete": ([*lines[:6], *lines[7:]], "dropped 1 record"),
        "duplicate": ([*lines[:6], lines[5], *lines[6:]], "again: replayed"),
        "paste": ([*lines[:6], foreign, *lines[6:]], "a record of another run"),
    }
    for case, (edited, message) in cases.items():
        path = tmp_path / f"{case}.log"
        path.write_bytes(b"".join(edited))
        status, _, own = _console(tmp_path, key, path)
        assert status == 1 and message in own and "TAMPERED" in own, (case, own)
    cut = tmp_path / "cut.log"
    cut.write_bytes(b"".join(lines[:-3]))
    status, plain, own = _console(tmp_path, key, cut)
    assert status == 3 and "no end record" in own and "tamper" not in own.lower(), own
    assert plain.startswith(b"line 0\nerr 0\n")


def test_a_killed_app_is_no_end_record_never_tampering(tmp_path: Path) -> None:
    key = _key(tmp_path)
    app = write_app(
        tmp_path, "import time\nfor i in range(10000):\n    print('tick', i, flush=True)\n    time.sleep(0.01)\n"
    )
    log = tmp_path / "out.log"
    with open(log, "wb") as o:
        proc = subprocess.Popen(
            [*PYSCONE, "run", "--console-key-file", str(key), str(app)],
            cwd=tmp_path,
            stdout=o,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while log.read_bytes().count(b"\n") < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()  # SIGKILL: the launcher, and with it the enclave
        proc.wait(30)
    status, plain, own = _console(tmp_path, key, log)
    assert status == 3, own
    assert "no end record" in own and "killed" in own and "tamper" not in own.lower(), own
    assert plain.startswith(b"tick 0\ntick 1\n")


def _decoded_so_far(tmp_path: Path, key: Path, log: Path) -> bytes:
    return _console(tmp_path, key, log)[1]


def test_a_line_is_on_the_host_while_the_app_still_runs_even_busy(tmp_path: Path) -> None:
    """Records are written behind the app's back (write-behind), but never held until exit."""
    key = _key(tmp_path)
    app = write_app(
        tmp_path,
        """
        import time
        print("one", flush=True)
        end = time.monotonic() + 12
        while time.monotonic() < end:  # busy: no host call, no switch
            pass
        print("two", flush=True)
        time.sleep(30)
        """,
    )
    log = tmp_path / "out.log"
    with open(log, "wb") as o:
        proc = subprocess.Popen(
            [*PYSCONE, "run", "--console-key-file", str(key), str(app)],
            cwd=tmp_path,
            stdout=o,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not log.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.05)
            deadline = time.monotonic() + 8  # (well within the busy loop)
            while _decoded_so_far(tmp_path, key, log) != b"one\n" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _decoded_so_far(tmp_path, key, log) == b"one\n"
            deadline = time.monotonic() + 30
            while _decoded_so_far(tmp_path, key, log) != b"one\ntwo\n" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _decoded_so_far(tmp_path, key, log) == b"one\ntwo\n"  # (while it sleeps)
        finally:
            proc.kill()
            proc.wait(30)


def test_stdin_records_feed_input_and_a_bad_one_is_eio(tmp_path: Path) -> None:
    key = _key(tmp_path)
    app = write_app(
        tmp_path,
        """
        import errno, sys
        try:
            a, b = input("prompt> "), input()
            print("got", repr(a), repr(b), "rest", repr(sys.stdin.read()))
        except OSError as e:
            print("errno", errno.errorcode[e.errno])
        """,
    )
    records = _pyscone(
        "console", "--key-file", key, "--encode-input", cwd=tmp_path, stdin=b"MARK one\nMARK two\nthree\n"
    )
    assert records.returncode == 0 and b"MARK" not in records.stdout
    ran = _pyscone("run", "--console-key-file", key, app, cwd=tmp_path, stdin=records.stdout)
    (tmp_path / "out.log").write_bytes(ran.stdout)
    assert _console(tmp_path, key, tmp_path / "out.log")[1] == b"prompt> got 'MARK one' 'MARK two' rest 'three\\n'\n"
    lines = records.stdout.splitlines(keepends=True)
    for case, bad in (
        ("dropped", lines[:2] + lines[3:]),
        ("forged", [lines[0], lines[1][:-5] + b"AAAA\n", *lines[2:]]),
    ):
        ran = _pyscone("run", "--console-key-file", key, app, cwd=tmp_path, stdin=b"".join(bad))
        (tmp_path / "out.log").write_bytes(ran.stdout)
        (tmp_path / "err.log").write_bytes(ran.stderr)
        status, plain, _ = _console(tmp_path, key, tmp_path / "out.log", tmp_path / "err.log")
        assert status == 0 and plain.startswith(b"prompt> ") and plain.endswith(b"\nerrno EIO\n"), (case, plain)
        assert b"MARK" not in plain
        assert b"pyscone: console shield: refused input: stdin line" in plain and case.encode() in plain
    # The app's own output is not input: fed back, it does not verify.
    ran = _pyscone("run", "--console-key-file", key, app, cwd=tmp_path, stdin=ran.stdout)
    (tmp_path / "out.log").write_bytes(ran.stdout)
    assert _console(tmp_path, key, tmp_path / "out.log")[1] == b"prompt> errno EIO\n"


def test_the_runtimes_own_lines_and_a_traceback_are_records(tmp_path: Path) -> None:
    key = _key(tmp_path)
    app = write_app(tmp_path, "def secret_function():\n    raise ValueError('MARK-secret')\nsecret_function()\n")
    ran = _pyscone("run", "--stats", "--console-key-file", key, app, cwd=tmp_path)
    assert ran.returncode == 1
    assert b"MARK" not in ran.stderr and b"pyscone: enclave:" not in ran.stderr and b"Traceback" not in ran.stderr
    (tmp_path / "err.log").write_bytes(ran.stderr)
    (tmp_path / "out.log").write_bytes(ran.stdout)
    status, plain, own = _console(tmp_path, key, tmp_path / "out.log", tmp_path / "err.log")
    assert status == 0 and "exited with status 1" in own, own
    assert b"ValueError: MARK-secret" in plain and b"pyscone: enclave:" in plain and b"host calls" in plain


def test_console_mistakes_are_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_text("nothex\n")
    app = write_app(tmp_path, "print(1)\n")
    for args in (
        ("run", "--console-key-file", "missing.key", app),
        ("run", "--console-key-file", "bad.key", app),
        ("console", "--key-file", "bad.key"),
        ("console", "--key-file", "missing.key", "x.log"),
    ):
        r = _pyscone(*args, cwd=tmp_path)
        lines = r.stderr.decode().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)


def test_an_attested_service_gets_its_console_key_from_the_policy(tmp_path_factory: pytest.TempPathFactory) -> None:
    from test_cas import World, _service

    world = World(tmp_path_factory.mktemp("cas-console"))
    try:
        write_app(world.root, "import sys\nprint('MARK-attested', flush=True)\nsys.stderr.write('MARK-err\\n')\n")
        key = _key(world.root)
        mre = world.measure()
        more = f"    console: {{key: {key.read_text().strip()}}}\n"
        created = world.owner("session", "create", str(world.policy("cons", _service(mre, more=more))))
        assert created.returncode == 0, created.stderr
        r = world.run("cons/app")
        assert r.returncode == 0, r.stderr
        assert "MARK" not in r.stdout + r.stderr and "INSECURE" not in r.stderr
        (world.root / "out.log").write_text(r.stdout)
        (world.root / "err.log").write_text(r.stderr)
        status, plain, own = _console(world.root, key, world.root / "out.log", world.root / "err.log")
        assert status == 0 and plain == b"MARK-attested\nMARK-err\n", own
        assert world.run("cons/app", "--console-key-file", str(key)).returncode == 2  # the policy's, not the host's
    finally:
        world.stop()


def test_the_enclave_refuses_positional_io_on_the_shielded_console(tmp_path: Path) -> None:
    key = _key(tmp_path)
    app = write_app(
        tmp_path,
        """
        import errno, os
        for call in (lambda: os.pwrite(1, b"MARK", 0), lambda: os.pread(0, 4, 0)):
            try:
                call()
            except OSError as e:
                print(errno.errorcode[e.errno])
        """,
    )
    ran = _pyscone("run", "--console-key-file", key, app, cwd=tmp_path)
    (tmp_path / "out.log").write_bytes(ran.stdout)
    assert b"MARK" not in ran.stdout
    assert _console(tmp_path, key, tmp_path / "out.log")[1] == b"ESPIPE\nESPIPE\n"
    assert os.path.exists(key)


def test_a_loop_that_only_prints_lets_other_lthreads_timers_and_ctrl_c_run(tmp_path: Path) -> None:
    """A shielded write does not wait for the host, so it must still be a turn and a safe point."""
    key = _key(tmp_path)
    daemon = write_app(
        tmp_path,
        """
        import threading, time
        def spam():
            while True:
                print("spam", flush=True)
        threading.Thread(target=spam, daemon=True).start()
        time.sleep(0.2)
        print("main done", flush=True)
        """,
        "daemon.py",
    )
    out, _ = _run_to_files(tmp_path, key, daemon)
    status, plain, own = _console(tmp_path, key, out)
    assert status == 0 and b"main done\n" in plain and b"spam\n" in plain, own
    loop = write_app(tmp_path, "while True:\n    print('loop', flush=True)\n", "loop.py")
    log, err = tmp_path / "loop.log", tmp_path / "loop.err"
    with open(log, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [*PYSCONE, "run", "--console-key-file", str(key), str(loop)], cwd=tmp_path, stdout=o, stderr=e
        )
        deadline = time.monotonic() + 60
        while log.read_bytes().count(b"\n") < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(2)  # ^C
        assert proc.wait(30) == 130
    status, plain, own = _console(tmp_path, key, log, err)
    assert status == 0 and "exited with status 130" in own and b"KeyboardInterrupt" in plain, own
