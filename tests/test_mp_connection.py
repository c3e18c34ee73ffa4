"""multiprocessing's Unix connections (Manager, Listener/Client) between the enclaves of a family: sealed
(enclave/stdlib/mpconn.py over protect/famhello.py and shields/famchan.py)."""

from __future__ import annotations

import multiprocessing.connection
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import PYSCONE, run_enclave, run_native, write_app

from pyscone.enclave.iago import EXIT_HOST_VIOLATION
from pyscone.protect import famhello

TESTS_DIR = Path(__file__).parent

MANAGER_APP = """
    import multiprocessing as mp, os, sys, threading
    def _hung():
        print("HUNG", flush=True)
        os._exit(3)
    _t = threading.Timer(60, _hung)
    _t.daemon = True
    _t.start()

    # Built at run time: the app's source (which the host serves) never spells it whole.
    MARK = "-".join(["SEALED", "MARKER", "7f3a"])
    INET_MARK = "-".join(["INET", "MARKER", "7f3a"])
    CONTROL = "PLAIN" + "CONTROL" + "42"

    def work(d, items, ns, lock):
        with lock:
            d["child"] = MARK
            items.append(MARK[::-1])
            ns.count += 1

    def talk(address, mark):
        from multiprocessing.connection import Client
        with Client(address, authkey=b"secret") as c:
            c.send({"from the child": mark})
            print("the child got", c.recv() == [mark, 2], flush=True)

    def use(c):
        c.send(MARK * 2)
        print("handed: the child got", c.recv() == MARK, flush=True)

    if __name__ == "__main__":
        ctx = mp.get_context(sys.argv[1])
        if len(sys.argv) > 2:  # the recorder's control: a socketpair used inside one enclave is plaintext
            import socket
            a, b = socket.socketpair()
            a.sendall(CONTROL.encode())
            assert b.recv(100) == CONTROL.encode()
        with ctx.Manager() as manager:  # a server process; proxies over a Unix socket at a path
            d, items, ns, lock = manager.dict(), manager.list(), manager.Namespace(), manager.Lock()
            d["parent"] = MARK
            ns.count = 0
            ps = [ctx.Process(target=work, args=(d, items, ns, lock)) for _ in range(2)]
            for p in ps:
                p.start()
            for p in ps:
                p.join(30)
            print("manager dict", sorted(d.items()) == [("child", MARK), ("parent", MARK)])
            print("manager list", list(items) == [MARK[::-1]] * 2, ns.count, [p.exitcode for p in ps])
        from multiprocessing.connection import Client, Listener
        with Listener(authkey=b"secret") as listener:  # the default family: AF_UNIX
            print("family", listener._listener._family)
            p = ctx.Process(target=talk, args=(listener.address, MARK))
            p.start()
            with listener.accept() as c:
                print("pair: the parent got", c.recv() == {"from the child": MARK}, flush=True)
                c.send([MARK, 2])
            p.join(30)
            print("pair exit", p.exitcode)
        with Listener() as listener:  # a connected end handed to a child (a spawned one gets its channel)
            got = []
            t = threading.Thread(target=lambda: got.append(listener.accept()))
            t.start()
            c = Client(listener.address)
            t.join(30)
            p = ctx.Process(target=use, args=(c,))
            p.start()
            print("handed: the parent got", got[0].recv() == MARK * 2, flush=True)
            got[0].send(MARK)
            p.join(30)
            print("handed exit", p.exitcode)
        # AF_INET: not the family's (the network shield's rules apply), unchanged: plaintext here.
        with Listener(("127.0.0.1", 0), authkey=b"secret") as inet:
            p = ctx.Process(target=talk, args=(inet.address, INET_MARK))
            p.start()
            with inet.accept() as c:
                print("inet: the parent got", c.recv() == {"from the child": INET_MARK}, flush=True)
                c.send([INET_MARK, 2])
            p.join(30)
            print("inet exit", p.exitcode)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_manager_and_a_listener_work_across_children_as_natively(tmp_path: Path, method: str) -> None:
    app = write_app(tmp_path, MANAGER_APP)
    native = run_native(app, method, cwd=tmp_path, timeout=90)
    assert native.returncode == 0, native.stderr
    assert "False" not in native.stdout and "HUNG" not in native.stdout
    r = run_enclave(app, method, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout == native.stdout
    assert "family connections" not in r.stderr  # nothing refused


def _records(path: Path) -> bytes:
    data = path.read_bytes() if path.exists() else b""
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return b"".join(out)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_host_relays_no_plaintext_of_a_manager_or_a_listener(tmp_path: Path, method: str) -> None:
    app = write_app(tmp_path, MANAGER_APP)
    seen = tmp_path / "relayed.bin"
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:famchan_liars:Recorder:{seen}"}
    r = run_enclave(app, method, "control", cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "False" not in r.stdout and "HUNG" not in r.stdout, r.stdout
    relayed = _records(seen)
    # The recording works: what one enclave sends itself over a socketpair is plaintext, by design ...
    assert b"PLAINCONTROL42" in relayed
    # ... the family hellos went through this host ...
    assert relayed.count(famhello.MAGIC) >= 6
    # ... the AF_INET pair (not the family's: unchanged) carried its pickles in the clear ...
    assert "-".join(["INET", "MARKER", "7f3a"]).encode() in relayed
    # ... and no pickle of the Manager or of the Unix Listener/Client pair did.
    assert "-".join(["SEALED", "MARKER", "7f3a"]).encode() not in relayed


TAMPER_APP = """
    import multiprocessing as mp, os, sys, threading
    from multiprocessing.connection import Client, Listener
    def _hung():
        print("HUNG", flush=True)
        os._exit(3)
    _t = threading.Timer(40, _hung)
    _t.daemon = True
    _t.start()

    def client(address):
        for i in range(3):
            try:
                c = Client(address)
            except mp.AuthenticationError:
                print("client", i, "refused", flush=True)
                continue
            c.send(f"message {i}")
            try:
                print("client", i, "got", c.recv(), flush=True)
            except EOFError:
                print("client", i, "EOF", flush=True)
            c.close()

    if __name__ == "__main__":
        ctx = mp.get_context("fork")
        with Listener() as listener:
            p = ctx.Process(target=client, args=(listener.address,))
            p.start()
            while True:
                with listener.accept() as c:
                    m = c.recv()
                    print("APP-SAW", m, flush=True)
                    c.send("ok")
                if m == "message 2":
                    break
            p.join(20)
            print("exit", p.exitcode)
"""


def test_an_honest_host_passes_the_tamper_app(tmp_path: Path) -> None:
    r = run_enclave(write_app(tmp_path, TAMPER_APP), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("APP-SAW") == 3 and "exit 0" in r.stdout, r.stdout


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("record-flip", "a family socketpair: a sealed record does not verify"),
        ("replay-records", "a family socketpair: a sealed record does not verify"),
    ],
)
def test_a_host_that_changes_or_replays_a_record_stops_the_listener(tmp_path: Path, case: str, reason: str) -> None:
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": f"py:mpconn_liars:Tamper:{case}"}
    r = run_enclave(write_app(tmp_path, TAMPER_APP), cwd=tmp_path, env=env)
    assert "pyscone-test: lied about RECV: " + case in r.stderr, r.stderr
    assert r.returncode == EXIT_HOST_VIOLATION, r.stdout + r.stderr
    # The first connection's message is seen only when the lie is about the second one.
    assert r.stdout.count("APP-SAW") == (1 if case == "replay-records" else 0), r.stdout
    assert "APP-SAW message 1" not in r.stdout
    stopped = [line for line in r.stderr.splitlines() if line.startswith("pyscone: enclave stopped: host violation: ")]
    assert stopped and reason in stopped[0], r.stderr


def test_a_host_that_replays_a_connection_into_a_new_one_fails_its_hello(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(TESTS_DIR), "PYSCONE_TEST_HOSTILE": "py:mpconn_liars:Tamper:replay-hello"}
    r = run_enclave(write_app(tmp_path, TAMPER_APP), cwd=tmp_path, env=env)
    assert "pyscone-test: lied about RECV: replay-hello" in r.stderr, r.stderr
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    # The replayed connection is refused by both ends; the listener serves the next one.
    assert "client 1 refused" in lines, lines
    assert [x for x in lines if x.startswith("APP-SAW")] == ["APP-SAW message 0", "APP-SAW message 2"], lines
    assert "exit 0" in lines
    refusals = [x for x in r.stderr.splitlines() if x.startswith("pyscone: family connections: refused")]
    assert len(refusals) == 2, r.stderr
    assert any("the client's family hello does not verify" in x for x in refusals), refusals
    assert any("the listener's family hello does not verify" in x for x in refusals), refusals


LISTENER_APP = """
    import multiprocessing as mp, os, socket, sys, threading, time
    from multiprocessing.connection import Client, Listener
    def _hung():
        print("HUNG", flush=True)
        os._exit(3)
    _t = threading.Timer(60, _hung)
    _t.daemon = True
    _t.start()

    socket.setdefaulttimeout(1.5)  # bounds each message of a family hello (a peer that never speaks)
    address, go, native = sys.argv[1:4]

    def family_client():
        with Client(address, authkey=b"family") as c:
            c.send("a family member")

    def later():
        while not os.path.exists(go):
            time.sleep(0.05)
        try:
            Client(native, authkey=b"native")  # a native listener: no member of the family
        except mp.AuthenticationError as e:
            print("the native listener:", type(e).__name__, flush=True)
        mp.get_context("fork").Process(target=family_client).start()

    if __name__ == "__main__":
        with Listener(address, authkey=b"family") as listener:
            print("listening", flush=True)
            threading.Thread(target=later).start()
            with listener.accept() as c:  # natives come first: refused, and it goes on
                print("accepted", c.recv(), flush=True)
"""


def _native_peers(address: str) -> list[str]:
    """What three native (non-family) processes see when they connect to the enclave's listener."""
    seen = []
    # A native multiprocessing client, which speaks first (a pickle): refused at its first bytes.
    c = multiprocessing.connection.Client(address)
    c.send("not a family member")
    try:
        c.recv()
    except (EOFError, ConnectionResetError):  # (a reset: the enclave closed it with bytes unread)
        seen.append("talker: closed")
    c.close()
    # One that speaks the hello's format without the family key: answered, then refused.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(address)
        s.sendall(famhello.Client(os.urandom(32)).hello())
        answer = b""
        while len(answer) < famhello.ANSWER_SIZE and (got := s.recv(famhello.ANSWER_SIZE - len(answer))):
            answer += got
        seen.append(f"forger: answered {len(answer)} bytes")
        s.sendall(b"PSFH\x01\x03" + os.urandom(32))
        seen.append(f"forger: then {s.recv(100)!r}")
    # A native client with an authkey, which waits for the listener's challenge: it never speaks.
    start = time.monotonic()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(address)
        seen.append(f"silent: {s.recv(100)!r} after {'<10s' if time.monotonic() - start < 10 else '>10s'}")
    return seen


def test_a_native_process_is_refused_and_the_listener_serves_the_family_after(tmp_path: Path) -> None:
    address = str(tmp_path / "l.sock")
    native = str(tmp_path / "n.sock")
    go = tmp_path / "go"
    assert len(address) < 100
    app = write_app(tmp_path, LISTENER_APP)
    env = dict(os.environ)
    env.pop("PYSCONE_TEST_HOSTILE", None)
    proc = subprocess.Popen(
        [*PYSCONE, "run", str(app), address, str(go), native],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    native_seen: list[str] = []
    with multiprocessing.connection.Listener(native, authkey=b"native") as nl:

        def serve() -> None:
            try:
                nl.accept()
            except (OSError, EOFError, multiprocessing.AuthenticationError) as e:
                native_seen.append(type(e).__name__)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "listening\n"
            seen = _native_peers(address)
            go.touch()
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        t.join(10)
    assert proc.returncode == 0, out + err
    assert seen == [
        "talker: closed",
        f"forger: answered {famhello.ANSWER_SIZE} bytes",
        "forger: then b''",
        "silent: b'' after <10s",
    ], seen
    assert out.splitlines() == ["the native listener: AuthenticationError", "accepted a family member"], out
    assert native_seen, "the native listener saw nothing"
    refusals = [x for x in err.splitlines() if x.startswith("pyscone: family connections: refused")]
    assert len(refusals) == 4, err
    assert "does not speak the family hello" in refusals[0], refusals
    assert "the client's family hello does not verify" in refusals[1], refusals
    assert "sent no family hello within 1.5 s" in refusals[2], refusals
    assert "refused the listener at" in refusals[3] and "does not speak the family hello" in refusals[3], refusals
