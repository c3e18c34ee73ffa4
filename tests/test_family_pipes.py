"""Pipes and socketpairs between the enclaves of a family: the sealed record format
(``protect/famseal.py``, property tests) and the channels that cross a fork (enclaves)."""

from __future__ import annotations

import os
import struct
import textwrap
from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app
from hypothesis import given, settings
from hypothesis import strategies as st

from pyscone.enclave.iago import EXIT_HOST_VIOLATION
from pyscone.protect import famseal
from pyscone.protect.famseal import Reader, SealError, Writer

KEY = bytes(range(32))
CHANNEL = bytes(range(100, 116))


def _pair(direction: int = 0, channel: bytes = CHANNEL) -> tuple[bytes, Reader]:
    key = famseal.channel_key(KEY, channel, direction)
    return key, Reader(key, channel, direction)


def _writer(member: bytes, direction: int = 0, channel: bytes = CHANNEL) -> Writer:
    return Writer(famseal.channel_key(KEY, channel, direction), channel, direction, member)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


# -- the record format ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=300)), max_size=12),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_any_interleaving_of_writers_in_any_split_opens_in_order(
    messages: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    """Each writer's records come out in its order, whatever the split and the interleaving."""
    writers = [_writer(bytes([i]) * 8) for i in range(3)]
    wire = b"".join(writers[w].seal(m) for w, m in messages)
    _, reader = _pair()
    got = []
    for piece in _split(wire, cuts):
        got += reader.feed(piece)
    reader.eof()
    assert got == [m for _, m in messages]
    assert not reader.pending()


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=0, max_size=200_000))
def test_seal_all_cuts_large_writes_and_reassembles(data: bytes) -> None:
    w = _writer(b"A" * 8)
    records = list(w.seal_all(data))
    assert all(len(r) <= famseal.MAX_RECORD for r in records)
    _, reader = _pair()
    assert b"".join(reader.feed(b"".join(records))) == data


def test_tampering_with_any_byte_is_refused() -> None:
    w = _writer(b"M" * 8)
    record = w.seal(b"attack at dawn")
    for i in range(len(record)):
        for flip in (0x01, 0x80):
            bad = bytearray(record)
            bad[i] ^= flip
            _, reader = _pair()
            with pytest.raises(SealError):
                got = reader.feed(bytes(bad))
                # A flip in the length field may leave the reader waiting for more bytes:
                # the end of the stream then says it was cut.
                assert not got
                reader.eof()


@settings(max_examples=100, deadline=None)
@given(count=st.integers(2, 6), which=st.data())
def test_a_replayed_or_reordered_record_is_refused(count: int, which: st.DataObject) -> None:
    w = _writer(b"R" * 8)
    records = [w.seal(bytes([i]) * 5) for i in range(count)]
    i = which.draw(st.integers(0, count - 1))
    j = which.draw(st.integers(0, count - 1).filter(lambda j: j != i))
    order = list(range(count))
    if which.draw(st.booleans()):
        order.insert(max(i, j) + 1, min(i, j))  # a replay of an earlier record later
    else:
        order[i], order[j] = order[j], order[i]  # two records swapped
    _, reader = _pair()
    with pytest.raises(SealError, match="replayed or reordered"):
        for k in order:
            reader.feed(records[k])


def test_a_gap_is_accepted_but_the_order_is_still_checked() -> None:
    """Several readers share one pipe: a reader sees a subset, so a gap is no error (the limit)."""
    w = _writer(b"G" * 8)
    records = [w.seal(bytes([i])) for i in range(4)]
    _, reader = _pair()
    assert reader.feed(records[0] + records[2]) == [b"\0", b"\2"]
    with pytest.raises(SealError):
        reader.feed(records[1])


def test_a_record_of_another_channel_or_direction_is_refused() -> None:
    other = bytes(16)
    for record in (
        _writer(b"X" * 8, channel=other).seal(b"hello"),
        _writer(b"X" * 8, direction=1).seal(b"hello"),
    ):
        _, reader = _pair()
        with pytest.raises(SealError, match="does not verify"):
            reader.feed(record)
    # Even with the right key, the AAD binds channel and direction.
    key = famseal.channel_key(KEY, CHANNEL, 0)
    forged = Writer(key, other, 0, b"Y" * 8).seal(b"hello")
    with pytest.raises(SealError):
        Reader(key, CHANNEL, 0).feed(forged)


def test_truncated_and_oversized_records_are_refused() -> None:
    record = _writer(b"T" * 8).seal(b"x" * 100)
    for cut in (1, famseal.HEADER.size, len(record) - 1):
        _, reader = _pair()
        assert reader.feed(record[:cut]) == []
        assert reader.pending()
        with pytest.raises(SealError, match="ends inside a record"):
            reader.eof()
    _, reader = _pair()
    huge = famseal.HEADER.pack(b"T" * 8, 1, famseal.MAX_PLAIN + 1)
    with pytest.raises(SealError, match="longer"):
        reader.feed(huge)
    with pytest.raises(ValueError):
        _writer(b"T" * 8).seal(b"x" * (famseal.MAX_PLAIN + 1))


def test_an_abandoned_partial_record_is_never_delivered() -> None:
    w = _writer(b"P" * 8)
    one, two = w.seal(b"whole"), w.seal(b"cut short")
    _, reader = _pair()
    assert reader.feed(one + two[:-3]) == [b"whole"]
    assert reader.abandon() == len(two) - 3
    reader.eof()  # nothing buffered any more: a clean end


def test_a_broken_reader_stays_broken() -> None:
    w = _writer(b"B" * 8)
    good = w.seal(b"fine")
    _, reader = _pair()
    with pytest.raises(SealError):
        reader.feed(b"\0" * 8 + struct.pack(">QI", 0, 1) + bytes(17))
    with pytest.raises(SealError):
        reader.feed(good)


def test_no_two_records_share_a_nonce() -> None:
    """Nonce = member | seq: distinct per writer; a forked child draws another member."""
    parent, child = _writer(os.urandom(8)), _writer(os.urandom(8))
    seen = set()
    for w in (parent, child):
        for _ in range(1000):
            r = w.seal(b"")
            member, seq, _ = famseal.HEADER.unpack_from(r, 0)
            nonce = member + (seq & 0xFFFFFFFF).to_bytes(4, "big")
            assert nonce not in seen
            seen.add(nonce)
    w = _writer(b"S" * 8)
    w.seq = famseal.MAX_SEQ - 2
    w.seal(b"last")
    with pytest.raises(ValueError, match="2\\*\\*32"):
        w.seal(b"one too many")


# -- across a fork, in real enclaves -------------------------------------------------------------

TESTS_DIR = Path(__file__).parent
MARK = "PLAINTEXT-MARKER"

FORK_APP = """
    import multiprocessing as mp, os, selectors, socket, sys, time
    from multiprocessing.connection import wait
    MARK = "PLAINTEXT-" + "MARKER"  # (the marker itself is not in the app's source either)
    CONTROL = "CONTROL-" + "MARKER"
    BIG = (MARK + "-big-") * 12000  # > 64 KiB

    # A pipe with unread bytes, a socketpair used before the fork (plaintext, by design).
    r, w = os.pipe()
    os.write(w, (MARK + "-buffered|").encode())
    s1, s2 = socket.socketpair()
    s1.sendall(CONTROL.encode())
    print("before the fork", s2.recv(100) == CONTROL.encode())
    q, qw = os.pipe()  # for the selector and non-blocking tests
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, (MARK + "-child|").encode())
        os.write(w, BIG.encode())
        os.close(w)
        s2.sendall((MARK + "-pair|" + BIG).encode())
        got = s2.recv(100)
        time.sleep(0.3)
        os.write(qw, got)
        os._exit(7)
    os.close(w)
    out = b""
    while d := os.read(r, 5000):
        out += d
    print("pipe: buffered bytes and the child's, then EOF", out == (MARK + "-buffered|" + MARK + "-child|" + BIG).encode())
    want = len(MARK + "-pair|" + BIG)
    got = b""
    while len(got) < want:
        got += s1.recv(65536)
    print("socketpair", got == (MARK + "-pair|" + BIG).encode())
    s1.sendall((MARK + "-answer").encode())
    sel = selectors.DefaultSelector()
    sel.register(q, selectors.EVENT_READ)
    os.set_blocking(q, False)
    try:
        os.read(q, 10)
    except BlockingIOError:
        print("non-blocking read of a moved pipe: EAGAIN")
    print("selector times out", sel.select(0.05) == [])
    print("selector wakes", [k.fd == q for k, _ in sel.select(10)], os.read(q, 100) == (MARK + "-answer").encode())
    print("wait", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

    def echo(conn, out, mine, theirs):
        mine.close()  # the parent's ends, which a forked child holds too
        theirs.close()
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            out.send({"echo": msg, "big": BIG})
        out.close()

    mp.set_start_method("fork")
    a, b = mp.Pipe()  # a socketpair
    cr, cw = mp.Pipe(duplex=False)  # os.pipe
    p = mp.Process(target=echo, args=(b, cw, a, cr))
    p.start()
    b.close()
    cw.close()
    a.send([MARK, 1, 2.5])
    print("mp poll", cr.poll(10))
    m = cr.recv()
    print("mp recv", m["echo"] == [MARK, 1, 2.5], m["big"] == BIG)
    a.send(BIG)
    print("mp big", cr.recv()["echo"] == BIG)
    a.close()
    print("mp sentinel", wait([p.sentinel], 10) == [p.sentinel])
    p.join(10)
    print("mp exit", p.exitcode)
    try:
        cr.recv()
    except EOFError:
        print("mp EOF once the child is gone")
"""


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes() if path.exists() else b""
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def test_parent_and_child_talk_over_pipes_socketpairs_and_multiprocessing(tmp_path: Path) -> None:
    app = write_app(tmp_path, FORK_APP)
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    seen = tmp_path / "relayed.bin"
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:famchan_liars:Recorder:{seen}"}
    r = run_enclave(app, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout
    assert "False" not in r.stdout
    relayed = _records(seen)
    everything = b"".join(relayed)
    # The recorder sees what the host relays: the socketpair's use before the fork is plaintext
    # (between the lthreads of one enclave, by design), which shows the recording works ...
    assert b"CONTROL-MARKER" in everything
    # ... and everything that crossed the fork went sealed: megabytes of it, no plaintext.
    assert len(everything) > 5 * len(MARK) * 12000
    assert MARK.encode() not in everything  # (the app's source, which the host serves, spells it apart)


MOVED_APP = """
    import os, select, selectors, sys, threading, time
    from pyscone.enclave import family
    moved = len(sys.argv) > 1
    def pipe(flags=0):
        fds = os.pipe2(flags)
        if moved:
            family.run_prepare()  # what a fork does first: the pipe moves to the host
        return fds
    r, w = pipe()
    def writer():
        time.sleep(0.1)
        os.write(w, b"hello")
        time.sleep(0.1)
        os.close(w)
    threading.Thread(target=writer).start()
    print("read parks until written", os.read(r, 100))
    print("eof when the write end closes", os.read(r, 100))
    os.close(r)
    r, w = pipe()
    os.close(r)
    try:
        os.write(w, b"x")
    except BrokenPipeError as e:
        print("epipe", e.errno)
    os.close(w)
    r, w = pipe()
    os.write(w, b"a" * 5000)
    print("a read takes at most n, the rest stays", len(os.read(r, 10)), len(os.read(r, 100000)))
    p = select.poll()
    p.register(r, select.POLLIN)
    p.register(w, select.POLLOUT)
    print("poll", p.poll(0) == [(w, select.POLLOUT)])
    os.write(w, b"z")
    print("poll readable", sorted(p.poll(1)))
    print(os.read(r, 1))
    d = os.dup(w)
    os.write(d, b"dup")
    os.close(w)
    print("dup", os.read(r, 10))
    os.close(d)
    print("eof after the last dup closes", os.read(r, 10))
    r, w = pipe(os.O_NONBLOCK)
    try:
        os.read(r, 1)
    except BlockingIOError as e:
        print("eagain", e.errno)
    chunks = []
    def reader():
        os.set_blocking(r, True)
        while c := os.read(r, 70000):
            chunks.append(c)
    t = threading.Thread(target=reader)
    t.start()
    os.set_blocking(w, True)
    for i in range(50):
        os.write(w, bytes([i]) * 4096)  # atomic writes, in order
    os.close(w)
    t.join()
    data = b"".join(chunks)
    print("50 atomic writes in order", data == b"".join(bytes([i]) * 4096 for i in range(50)))
"""


def test_a_moved_pipe_behaves_as_one_in_enclave_memory(tmp_path: Path) -> None:
    app = write_app(tmp_path, MOVED_APP)
    in_memory = run_enclave(app, cwd=tmp_path)
    assert in_memory.returncode == 0, in_memory.stderr
    moved = run_enclave(app, "moved", cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == in_memory.stdout
    assert "read parks until written b'hello'" in moved.stdout


TAMPER_APP = """
    import os, socket, sys, time
    what = sys.argv[1]
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        for i in range(3):
            os.write(w, b"record %d from the child" % i)
            s2.sendall(b"pair record %d" % i)
        time.sleep(2)
        os._exit(0)
    os.close(w)
    if what == "pair-flip":
        print("APP-SAW", s1.recv(100))
    else:
        for _ in range(3):
            print("APP-SAW", os.read(r, 100), flush=True)
"""


@pytest.mark.parametrize(
    ("case", "reason", "shown"),
    [
        ("pipe-flip", "a family pipe: a sealed record does not verify", 0),
        ("pipe-replay", "a family pipe: a sealed record was replayed or reordered", 1),
        ("pair-flip", "a family socketpair: a sealed record does not verify", 0),
    ],
)
def test_a_host_that_changes_or_replays_a_record_stops_the_reader(
    tmp_path: Path, case: str, reason: str, shown: int
) -> None:
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:famchan_liars:Tamper:{case}"}
    r = run_enclave(write_app(tmp_path, TAMPER_APP), case, cwd=tmp_path, env=env)
    assert "pyscone-test: lied" in r.stderr, r.stderr
    assert r.returncode == EXIT_HOST_VIOLATION, r.stderr
    assert r.stdout.count("APP-SAW") == shown, r.stdout  # nothing the host changed reached the app
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("pyscone: enclave stopped: host violation: ") and reason in last, last


PROCS_APP = """
    import os, select, socket, sys, threading, time
    # Three writers, one pipe: each write of PIPE_BUF bytes arrives whole.
    r, w = os.pipe()
    kids = []
    for letter in b"abc":
        pid = os.fork()
        if pid == 0:
            os.close(r)
            for _ in range(100):
                os.write(w, bytes([letter]) * 4096)
            os._exit(0)
        kids.append(pid)
    os.close(w)
    data = b""
    while d := os.read(r, 50000):
        data += d
    blocks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    print("writers", len(data), all(len(set(b)) == 1 for b in blocks), sorted({b[0] for b in blocks}))
    for pid in kids:
        os.waitpid(pid, 0)
    # Two readers, one pipe: each takes whole messages, together all of them.
    r, w = os.pipe()
    kids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            os.close(w)
            n = 0
            while (m := os.read(r, 4096)):
                assert len(m) == 4096 and len(set(m)) == 1, m[:20]
                n += 1
            os._exit(n)
        kids.append(pid)
    os.close(r)
    for i in range(200):
        os.write(w, bytes([i]) * 4096)
    os.close(w)
    counts = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids]
    print("readers", sum(counts))
    # After a fork, a new pipe lives in enclave memory; a select on a pipe and a socket
    # wakes in the parent and in the child at once (each has a bell of its own).
    def select_wakes():
        r, w = os.pipe()
        srv = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=lambda: (time.sleep(0.3), os.write(w, b"!"))).start()
        t0 = time.monotonic()
        ready = select.select([srv, r], [], [], 5)[0]
        return ready == [r] and time.monotonic() - t0 < 2, in_memory(r)
    def in_memory(fd):
        if "pyscone" not in sys.modules:
            return True
        from pyscone.enclave.stdlib import pipes
        return pipes._ends[fd].pipe.host is None
    select_wakes()  # (the bell exists before the fork)
    pid = os.fork()
    if pid == 0:
        ok, mem = select_wakes()
        os._exit(0 if ok and mem else 1)
    print("parent select", select_wakes())
    print("child select", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_many_writers_many_readers_and_pipes_after_the_fork(tmp_path: Path) -> None:
    app = write_app(tmp_path, PROCS_APP)
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave(app, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout
    assert "writers 1228800 True [97, 98, 99]" in r.stdout and "readers 200" in r.stdout
    assert "parent select (True, True)" in r.stdout and "child select 0" in r.stdout


PARTIAL_APP = """
    import os, select, socket
    s1, s2 = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        s2.sendall(b"".join(b"%06d" % i for i in range(20000)))
        os._exit(0)
    s2.close()
    s1.setblocking(False)
    got, waits = b"", 0
    while True:
        # Readable must mean a whole record (or the end): a non-blocking recv then never says EAGAIN.
        select.select([s1], [], [], 30)
        waits += 1
        d = s1.recv(100000)
        if not d:
            break
        got += d
    print("whole", got == b"".join(b"%06d" % i for i in range(20000)), waits > 1)
"""


def test_a_record_the_host_takes_in_parts_is_finished_before_the_next(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": "py:famchan_liars:PartialSends"}
    r = run_enclave(write_app(tmp_path, PARTIAL_APP), cwd=tmp_path, env=env, timeout=120)
    assert "pyscone-test: lied about SEND: partial" in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
    assert r.stdout == "whole True True\n"


def test_the_pipe_suite_behaves_natively_with_every_pipe_moved(tmp_path: Path) -> None:
    """tests/test_posix_pipes.py's app (select with sockets, asyncio, dups, multiprocessing's
    Connection), every pipe moved to the host as soon as it is made, as a fork would."""
    from test_posix_pipes import PIPES_APP

    prelude = """
        import os, sys
        if "pyscone" in sys.modules:
            from pyscone.enclave import family
            _pipe2 = os.pipe2
            def pipe2(flags=0):
                fds = _pipe2(flags)
                family.run_prepare()
                return fds
            os.pipe2 = pipe2
            os.pipe = lambda: pipe2(0)
    """
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(prelude) + textwrap.dedent(PIPES_APP))
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    def same(out: str) -> list[str]:  # a seqpacket channel holds another amount than a pipe
        return [line for line in out.splitlines() if not line.startswith("a full pipe holds")]

    assert same(r.stdout) == same(native.stdout)
    assert "a full pipe holds 65536" not in r.stdout  # (the pipes did move)


SEALED_PAIR_APP = """
    import asyncio, os, select, socket, sys, threading, time
    def pair(*args):
        a, b = socket.socketpair(*args)
        if "pyscone" in sys.modules:
            from pyscone.enclave import family
            family.run_prepare()  # what a fork does first: the pair is sealed
        return a, b
    a, b = pair()
    a.sendall(b"hello")
    print("peek", b.recv(3, socket.MSG_PEEK), "recv", b.recv(100))
    buf = bytearray(10)
    a.send(b"into")
    print("recv_into", b.recv_into(buf), bytes(buf[:4]))
    b.setblocking(False)
    try:
        b.recv(10)
    except BlockingIOError:
        print("non-blocking: EAGAIN")
    b.settimeout(0.1)
    try:
        b.recv(10)
    except TimeoutError:
        print("timeout")
    b.settimeout(None)
    threading.Thread(target=lambda: (time.sleep(0.1), a.sendall(b"x" * 300000))).start()
    got = 0
    while got < 300000:
        got += len(b.recv(70000))
    print("big", got)
    print("select", select.select([b], [], [], 0.05)[0] == [], end=" ")
    a.send(b"!")
    print(select.select([b], [], [], 5)[0] == [b], b.recv(1))
    f = b.makefile("rb")
    a.sendall(b"line one\\nline two\\n")
    print("makefile", f.readline(), f.readline())
    f.close()
    os.write(a.fileno(), b"os.write")
    print("os.read", os.read(b.fileno(), 100))
    a.shutdown(socket.SHUT_WR)
    print("eof after shutdown", b.recv(10))
    a.close()
    b.close()
    async def main():
        a, b = pair()
        r, w = await asyncio.open_connection(sock=a)
        r2, w2 = await asyncio.open_connection(sock=b)
        w.write(b"ping\\n")
        await w.drain()
        line = await r2.readline()
        w2.write(line.upper())
        await w2.drain()
        print("asyncio", line, await r.readline())
        w.close()
        print("asyncio eof", await r2.read())
        w2.close()
    asyncio.run(main())
"""


def test_a_sealed_socketpair_behaves_as_a_plain_one(tmp_path: Path) -> None:
    app = write_app(tmp_path, SEALED_PAIR_APP)
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout


THREADS_APP = """
    import os, sys, threading
    r, w = os.pipe()
    if "pyscone" in sys.modules:
        from pyscone.enclave import family
        family.run_prepare()  # the pipe moves to the host, as in a fork
    got = [[], [], []]
    def reader(i):
        while m := os.read(r, 4096):
            got[i].append(m)
    def writer(k):
        for _ in range(300):
            os.write(w, bytes([k]) * 4096)
    readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    writers = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    os.close(w)
    for t in readers:
        t.join()
    every = [m for g in got for m in g]
    print("three readers, three writers", len(every), all(len(m) == 4096 and len(set(m)) == 1 for m in every))
"""


def test_lthreads_take_turns_on_a_moved_pipe(tmp_path: Path) -> None:
    """Records are opened in the host's order and sent in the order they were sealed (without
    the turns, a reader sees a writer's records out of order and stops the enclave)."""
    app = write_app(tmp_path, THREADS_APP)
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == run_native(app, cwd=tmp_path).stdout == "three readers, three writers 900 True\n"


DRAIN_APP = """
    import os, socket
    A, B, C = ("UNREAD-" + "TO-S2|").encode(), ("UNREAD-" + "TO-S1|").encode(), ("FROM-" + "CHILD").encode()
    s1, s2 = socket.socketpair()
    s1.sendall(A)
    s2.sendall(B)
    pid = os.fork()
    if pid == 0:
        s2.sendall(C)
        print("child", s2.recv(100) == A, flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    got = b""
    while len(got) < len(B + C):  # (a read returns one record at most: a short read, as a stream may give)
        got += s1.recv(100)
    print("parent", got == B + C)
"""


def test_a_socketpair_s_unread_bytes_cross_the_fork_sealed(tmp_path: Path) -> None:
    app = write_app(tmp_path, DRAIN_APP)
    seen = tmp_path / "relayed.bin"
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:famchan_liars:Recorder:{seen}"}
    r = run_enclave(app, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == run_native(app, cwd=tmp_path).stdout == "child True\nparent True\n"
    relayed = b"".join(_records(seen))
    # In plaintext only as it was sent before the fork (between two lthreads' sockets) and read back
    # from the host when the pair was sealed; sent again sealed, and from then on only sealed.
    assert relayed.count(b"UNREAD-TO-S2|") == relayed.count(b"UNREAD-TO-S1|") == 2
    assert b"FROM-CHILD" not in relayed
