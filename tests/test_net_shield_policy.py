"""The network shield, continued: what the rules do not list (unlisted TCP/Unix, UDP), 200 concurrent
TLS clients, asyncio servers and clients, and Unix sockets. Same harness as tests/test_net_shield.py:
unmodified plain-TCP apps in the enclave, real TLS peers and a recording relay on the host."""

from __future__ import annotations

import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import free_port, run_enclave, write_app
from netshield_apps import (
    ECHO_SERVER,
    STEPS,
    Host,
    fresh_secret,
    handshake_failure,
    plaintext_client,
    steps_of,
    tls_ctx,
    tls_line,
)
from netshield_pki import Pki, write_net_shield

# -- what the rules do not list ---------------------------------------------------------------------


def _udp_sink() -> socket.socket:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    u.settimeout(1.0)
    return u


def _received(u: socket.socket) -> list[bytes]:
    got = []
    try:
        while True:
            got.append(u.recv(65536))
    except TimeoutError:
        return got
    finally:
        u.close()


def test_unlisted_refuse_is_eacces_for_tcp_unix_and_bind(tmp_path: Path, pki: Pki, host: Host) -> None:
    plain = host.native()
    unix = host.native(str(tmp_path / "plain.sock"))
    listed = host.native(ident=pki.server)
    port = free_port()
    cfg = write_net_shield(
        tmp_path / "net.yaml",
        connect=[{"to": f"127.0.0.1:{listed.port}", "ca": pki.ca, "server_name": "localhost"}],
        unlisted="refuse",
    )
    secret = fresh_secret("request")
    steps = [f"tcp:127.0.0.1:{plain.port}", f"unix:{unix.address}", f"bind:{port}", "bind:0"]
    r = run_enclave(
        "--net-shield",
        cfg,
        write_app(tmp_path, STEPS),
        secret.decode(),
        *steps,
        f"tcp:127.0.0.1:{listed.port}",
        cwd=tmp_path,
    )
    got = steps_of(r)
    assert got[steps[0]].startswith("connect PermissionError EACCES"), got
    assert got[steps[1]].startswith("connect PermissionError EACCES"), got
    assert got[steps[2]].startswith("bind PermissionError EACCES"), got
    assert got["bind:0"].startswith("ok bound "), got  # an ephemeral port is no listening service
    assert got[f"tcp:127.0.0.1:{listed.port}"] == f"ok reply reply request {secret.decode()}"
    assert plain.seen == [] and unix.seen == [], "a refused connect() still reached the host's server"
    refused = [ln for ln in r.stderr.splitlines() if ln.startswith("pyscone: network shield: refused")]
    for what in (str(plain.port), str(unix.address), str(port)):
        assert any(what in ln for ln in refused), f"no refusal logged for {what}: {refused}"


def test_unlisted_allow_is_plaintext_logged_once_per_destination(tmp_path: Path, pki: Pki, host: Host) -> None:
    plain = host.native()
    sink = _udp_sink()
    port = free_port()
    cfg = write_net_shield(tmp_path / "net.yaml", connect=[], unlisted="allow", udp="allow")
    secret = fresh_secret("request")
    dest = f"tcp:127.0.0.1:{plain.port}"
    udp = f"udp-sendto:127.0.0.1:{sink.getsockname()[1]}"
    r = run_enclave(
        "--net-shield", cfg, write_app(tmp_path, STEPS), secret.decode(), dest, f"bind:{port}", udp, dest, cwd=tmp_path
    )
    got = steps_of(r)
    assert got[dest] == f"ok reply reply request {secret.decode()}" and got[f"bind:{port}"] == f"ok bound {port}", got
    assert got[udp] == "ok done"
    assert plain.lines() == [b"request " + secret + b"\n"] * 2  # it really is plaintext, as allowed
    assert _received(sink) == [b"datagram " + secret]
    logged = [ln for ln in r.stderr.splitlines() if ln.startswith("pyscone: network shield: plaintext")]
    assert len([ln for ln in logged if str(plain.port) in ln]) == 1, logged
    assert len([ln for ln in logged if str(port) in ln]) == 1, logged


def test_udp_refuse_is_eacces_and_unlisted_tcp_is_refused_by_default(tmp_path: Path, pki: Pki, host: Host) -> None:
    sink = _udp_sink()
    plain = host.native()
    listed = host.native(ident=pki.server)
    to = f"127.0.0.1:{sink.getsockname()[1]}"
    cfg = write_net_shield(
        tmp_path / "net.yaml", connect=[{"to": f"127.0.0.1:{listed.port}", "ca": pki.ca}], udp="refuse"
    )  # no 'unlisted': refuse is the default
    secret = fresh_secret("datagram")
    steps = ["udp-bind:0", f"udp-connect:{to}", f"udp-sendto:{to}", f"tcp:127.0.0.1:{plain.port}"]
    r = run_enclave(
        "--net-shield",
        cfg,
        write_app(tmp_path, STEPS),
        secret.decode(),
        *steps,
        f"tcp:127.0.0.1:{listed.port}",
        cwd=tmp_path,
    )
    got = steps_of(r)
    for step in steps[:3]:
        assert got[step].startswith(f"{step.split(':')[0]} PermissionError EACCES"), got
    assert got[steps[3]].startswith("connect PermissionError EACCES"), got
    assert got[f"tcp:127.0.0.1:{listed.port}"] == f"ok reply reply request {secret.decode()}"
    assert _received(sink) == [] and plain.seen == []


# -- load and non-blocking apps ---------------------------------------------------------------------


def test_two_hundred_concurrent_tls_clients_are_all_served(tmp_path: Path, pki: Pki, host: Host) -> None:
    n = 200
    port = free_port()
    cfg = write_net_shield(
        tmp_path / "net.yaml", listen=[{"port": port, "cert": pki.server.cert, "key": pki.server.key}]
    )
    srv = host.enclave(["--net-shield", cfg, write_app(tmp_path, ECHO_SERVER), port], tmp_path, port)
    ctx = tls_ctx(pki)
    # Every client holds its finished handshake until all 200 have one: the shield must run
    # them side by side, not one connection at a time.
    barrier = threading.Barrier(n, timeout=90)

    def one(i: int) -> bytes:
        raw = socket.create_connection(("127.0.0.1", port), timeout=90)
        with raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
            barrier.wait()
            s.sendall(f"client {i} says hello\n".encode())
            return s.makefile("rb").readline()

    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(one, range(n)))
    assert replies == [f"CLIENT {i} SAYS HELLO\n".encode() for i in range(n)]
    srv.wait_stdout(": served\n", n)
    code, out, err = srv.stop()
    assert code == 0, err[-3000:]
    assert out.count(": served\n") == n, out[-3000:]


def test_megabytes_both_ways(tmp_path: Path, pki: Pki, host: Host) -> None:
    """2.8 MB up and back: many full records in both directions, in step with the app's reads."""
    port = free_port()
    cfg = write_net_shield(
        tmp_path / "net.yaml", listen=[{"port": port, "cert": pki.server.cert, "key": pki.server.key}]
    )
    srv = host.enclave(["--net-shield", cfg, write_app(tmp_path, ECHO_SERVER), port], tmp_path, port)
    relay = host.relay(("127.0.0.1", port))
    marker = fresh_secret("bulk")
    lines = [b"%05d " % i + marker + b" " + b"x" * 50 + b"\n" for i in range(30000)]
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=60)
    # (The file object is closed too: while it is open, closing the socket leaves the connection up.)
    with raw, tls_ctx(pki).wrap_socket(raw, server_hostname="localhost") as s, s.makefile("rb") as f:
        # In rounds smaller than the socket buffers: one thread may not read and write one SSLSocket.
        for start in range(0, len(lines), 500):
            chunk = lines[start : start + 500]
            s.sendall(b"".join(chunk))
            assert [f.readline() for _ in chunk] == [ln.upper() for ln in chunk], f"round at line {start}"
    size = sum(map(len, lines))
    assert len(relay.up()) > size and len(relay.down()) > size  # all of it, as ciphertext
    relay.assert_hidden(marker, marker.upper())
    srv.wait_stdout(": served\n")
    code, out, err = srv.stop()
    assert code == 0 and out.count(": served\n") == 1, out + err[-3000:]


ASYNC_SERVER = """
    import asyncio, errno, sys
    async def handle(reader, writer):
        peer = writer.get_extra_info("peername")[1]
        try:
            while line := await reader.readline():
                writer.write(line.upper())
                await writer.drain()
            print(f"peer {peer}: served", flush=True)
        except OSError as e:
            print(f"peer {peer}: {type(e).__name__} {errno.errorcode.get(e.errno, e.errno)}", flush=True)
        finally:
            writer.close()
    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
        async with srv:
            await srv.serve_forever()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
"""


def test_an_asyncio_server_under_the_shield(tmp_path: Path, pki: Pki, host: Host) -> None:
    port = free_port()
    rule = {"port": port, "cert": pki.server.cert, "key": pki.server.key, "client_ca": pki.ca}
    cfg = write_net_shield(tmp_path / "net.yaml", listen=[rule])
    srv = host.enclave(["--net-shield", cfg, write_app(tmp_path, ASYNC_SERVER), port], tmp_path, port)
    relay = host.relay(("127.0.0.1", port))
    good = tls_ctx(pki, pki.client)
    secrets = [fresh_secret(f"line{i}") for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda s: tls_line(("127.0.0.1", relay.port), good, s + b"\n")[1], secrets))
    assert replies == [s.upper() + b"\n" for s in secrets]
    relay.assert_hidden(*secrets, *(s.upper() for s in secrets))
    bad_plain, got = plaintext_client(port)
    assert isinstance(got, bytes) and b"BAD CLIENT" not in got, got
    bad_cert, got = tls_line(("127.0.0.1", port), tls_ctx(pki), b"bad client\n")
    assert got != b"BAD CLIENT\n", got
    assert tls_line(("127.0.0.1", port), good, b"after\n")[1] == b"AFTER\n"
    srv.wait_stdout("peer ", 23)
    code, out, err = srv.stop()
    assert code == 0, err[-3000:]
    for cport in (bad_plain, bad_cert):
        assert f"peer {cport}: ConnectionResetError ECONNRESET" in out.splitlines(), out
        assert handshake_failure(err, cport, port)
    assert out.count(": served\n") == 21, out


ASYNC_CLIENT = """
    import asyncio, errno, sys
    secret, good, bad = sys.argv[1].encode(), sys.argv[2], sys.argv[3]
    async def attempt(dest):
        host, _, port = dest.rpartition(":")
        stage, reader = "open", None
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            stage = "write"
            writer.write(b"request " + secret + b"\\n")
            await writer.drain()
            stage = "read"
            line = await asyncio.wait_for(reader.readline(), 20)
            writer.close()
            return "reply " + line.decode().strip() if line else "eof"
        except OSError as e:
            # drain() reports a transport that died in write() as ConnectionResetError("Connection
            # lost"); what the socket raised is the reader's exception.
            if reader is not None and isinstance(reader.exception(), OSError):
                e = reader.exception()
            return f"{stage} {type(e).__name__} {errno.errorcode.get(e.errno, e.errno)} {e}"
    async def main():
        for got in await asyncio.gather(*(attempt(good) for _ in range(5))):
            print("good", got, flush=True)
        print("bad", await attempt(bad), flush=True)
        print("good", await attempt(good), flush=True)
    asyncio.run(main())
"""


def test_an_asyncio_client_under_the_shield(tmp_path: Path, pki: Pki, host: Host) -> None:
    native = host.native(ident=pki.server, client_ca=pki.ca)
    relay = host.relay(native.address)
    impostor = host.native(ident=pki.other_server)
    good, bad = f"127.0.0.1:{relay.port}", f"127.0.0.1:{impostor.port}"
    ident = {"cert": pki.client.cert, "key": pki.client.key}
    rules = [{"to": good, "ca": pki.ca, **ident}, {"to": bad, "ca": pki.ca, "server_name": "localhost", **ident}]
    cfg = write_net_shield(tmp_path / "net.yaml", connect=rules)
    secret = fresh_secret("request")
    r = run_enclave("--net-shield", cfg, write_app(tmp_path, ASYNC_CLIENT), secret.decode(), good, bad, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines.count(f"good reply reply request {secret.decode()}") == 6, r.stdout
    (failed,) = [ln for ln in lines if ln.startswith("bad ")]
    # Non-blocking: connect() returns at once, the handshake's failure comes from the first send/recv.
    assert re.match(r"bad (write|read) ConnectionAbortedError ECONNABORTED ", failed), failed
    assert f"network shield: TLS to {bad} failed: " in failed and "certificate verify failed" in failed.lower()
    assert impostor.lines() == []
    relay.assert_hidden(secret)


# -- Unix sockets ------------------------------------------------------------------------------------


def test_unix_sockets_are_shielded_both_ways(tmp_path: Path, pki: Pki, host: Host) -> None:
    app_sock, native_sock = str(tmp_path / "app.sock"), str(tmp_path / "native.sock")
    secret, reply = fresh_secret("line"), fresh_secret("reply")
    native = host.native(native_sock, ident=pki.server, reply=reply + b" to ")
    cfg = write_net_shield(
        tmp_path / "net.yaml",
        listen=[{"path": app_sock, "cert": pki.server.cert, "key": pki.server.key}],
        connect=[{"to": native_sock, "ca": pki.ca, "server_name": "localhost"}],
    )
    srv = host.enclave(["--net-shield", cfg, write_app(tmp_path, ECHO_SERVER), app_sock], tmp_path, path=app_sock)
    relay = host.relay(app_sock)  # the host's view of the app's Unix socket
    assert tls_line(("127.0.0.1", relay.port), tls_ctx(pki), secret + b"\n")[1] == secret.upper() + b"\n"
    assert tls_line(app_sock, tls_ctx(pki), b"direct\n")[1] == b"DIRECT\n"
    relay.assert_hidden(secret, secret.upper())
    # Outbound to a Unix path: the host's server sees a TLS client (and the request, decrypted).
    steps = steps_of(
        run_enclave(
            "--net-shield",
            cfg,
            write_app(tmp_path, STEPS, "steps.py"),
            secret.decode(),
            f"unix:{native_sock}",
            cwd=tmp_path,
        )
    )
    assert steps[f"unix:{native_sock}"] == f"ok reply {reply.decode()} to request {secret.decode()}"
    assert native.lines() == [b"request " + secret + b"\n"]
    srv.wait_stdout("peer unix: ", 2)
    code, out, err = srv.stop()
    # (How the app sees these clients' ends is the next test's business.)
    assert code == 0 and out.count("peer unix: ") == 2, out + err[-3000:]


def test_a_client_that_closes_without_close_notify_is_an_eof_for_the_app(tmp_path: Path, pki: Pki, host: Host) -> None:
    """Most TLS clients (Python's ssl, curl on a timeout, browsers) just close the socket. A native
    ssl server reads that as the end (suppress_ragged_eofs), a plain-TCP app as b"": behind the
    shield too, not as an error. A Unix socket makes any write after the peer's close fail at
    once (EPIPE), so a shield that answers the ragged end with an alert and lets the failed write
    escape from recv() is caught here deterministically (on TCP the same write is swallowed)."""
    app_sock = str(tmp_path / "app.sock")
    cfg = write_net_shield(
        tmp_path / "net.yaml", listen=[{"path": app_sock, "cert": pki.server.cert, "key": pki.server.key}]
    )
    srv = host.enclave(["--net-shield", cfg, write_app(tmp_path, ECHO_SERVER), app_sock], tmp_path, path=app_sock)
    assert tls_line(app_sock, tls_ctx(pki), b"ragged\n")[1] == b"RAGGED\n"  # closes without close_notify
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(15)
    raw.connect(app_sock)
    with raw, tls_ctx(pki).wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"clean\n")
        assert s.makefile("rb").readline() == b"CLEAN\n"
        s.unwrap()  # close_notify, then the end
    srv.wait_stdout("peer unix: ", 2)
    code, out, err = srv.stop()
    assert code == 0, err[-3000:]
    assert out.splitlines() == ["peer unix: served"] * 2, out
