"""Sockets, poll and name resolution from C libraries, through the libc layer (issue 11).

Before the layer's socket section (pyscone/enclave/clib/shim_net.c, stdlib/clibnet.py), a C library's
``socket()`` was refused (EPERM, one line): libpq under psycopg could not connect at all.  Now its
calls go to the Python layer's socket code (the same host calls and Iago checks as the app's own
``socket`` module).  The server side is always real and native: PostgreSQL from the Debian package
(conftest's ``postgres_url``), or an echo server in this test process, on loopback.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_enclave, run_native, write_app

from pyscone.enclave.iago import EXIT_HOST_VIOLATION

TESTS_DIR = Path(__file__).parent

# A C client as hiredis or libpq would write one: every call below is libc's, made from this
# library's own code (so the shim routes it), with the results printed one per line.
CLIENT_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* Blocking: resolve, connect, send, poll, recv, names, options; returns the fd (left open). */
int blocking(const char *host, const char *port, char *out, int n) {
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    int g = getaddrinfo(host, port, &hints, &res);
    if (g != 0) return snprintf(out, n, "getaddrinfo %d", g), -1;
    int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    if (fd < 0) return snprintf(out, n, "socket %s", strerror(errno)), -1;
    if (connect(fd, res->ai_addr, res->ai_addrlen) < 0) return snprintf(out, n, "connect %s", strerror(errno)), -1;
    freeaddrinfo(res);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int got = 0; socklen_t len = sizeof got;
    getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &got, &len);
    if (send(fd, "ping", 4, MSG_NOSIGNAL) != 4) return snprintf(out, n, "send %s", strerror(errno)), -1;
    struct pollfd p = {fd, POLLIN, 0};
    int ready = poll(&p, 1, 5000);
    char buf[64] = {0};
    ssize_t r = recv(fd, buf, sizeof buf - 1, 0);
    struct sockaddr_in peer; socklen_t plen = sizeof peer;
    getpeername(fd, (struct sockaddr *)&peer, &plen);
    struct sockaddr_in me; socklen_t mlen = sizeof me;
    getsockname(fd, (struct sockaddr *)&me, &mlen);
    snprintf(out, n, "poll %d revents %#x recv %zd %s nodelay %d peer %s:%d len %u local %s", ready, p.revents,
             r, buf, got != 0, inet_ntoa(peer.sin_addr), ntohs(peer.sin_port), plen,
             me.sin_port ? "bound" : "unbound");
    return fd;
}

/* A poll that nothing answers: its timeout is honoured.  Returns the poll's result. */
int poll_timeout(int fd, int ms, double *took) {
    struct pollfd p = {fd, POLLIN, 0};
    double t0 = now();
    int r = poll(&p, 1, ms);
    *took = now() - t0;
    return r;
}

/* Non-blocking, as libpq: EINPROGRESS, poll for POLLOUT, SO_ERROR; then EAGAIN from recv and
 * from read(2) on the socket, and write(2)/read(2) as a plain fd. */
int nonblocking(const char *ip, int port, char *out, int n) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    int c = connect(fd, (struct sockaddr *)&a, sizeof a);
    int cerr = c < 0 ? errno : 0;
    struct pollfd p = {fd, POLLOUT, 0};
    int ready = poll(&p, 1, 5000);
    int soerr = -1; socklen_t len = sizeof soerr;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
    char buf[16];
    ssize_t r1 = recv(fd, buf, sizeof buf, 0);
    int e1 = errno;
    ssize_t r2 = read(fd, buf, sizeof buf);
    int e2 = errno;
    ssize_t w = write(fd, "pong", 4);
    p.events = POLLIN;
    poll(&p, 1, 5000);
    ssize_t r3 = read(fd, buf, sizeof buf);
    snprintf(out, n, "connect %s poll %d SO_ERROR %d recv %zd %s read %zd %s write %zd read %.*s",
             cerr ? strerrorname_np(cerr) : "0", ready, soerr, r1, strerrorname_np(e1), r2, strerrorname_np(e2),
             w, (int)(r3 > 0 ? r3 : 0), buf);
    return fd;
}

/* poll on two fds for POLLIN; returns the count, the revents in *ra and *rb. */
int poll_pair(int a, int b, int ms, int *ra, int *rb, double *took) {
    struct pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
    double t0 = now();
    int r = poll(p, 2, ms);
    *took = now() - t0;
    *ra = p[0].revents;
    *rb = p[1].revents;
    return r;
}

/* select on one fd (read or write), and the sleeps: poll and select on no descriptors. */
int select_one(int fd, int write, int ms, double *took) {
    fd_set set;
    FD_ZERO(&set);
    FD_SET(fd, &set);
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    double t0 = now();
    int r = select(fd + 1, write ? NULL : &set, write ? &set : NULL, NULL, &tv);
    *took = now() - t0;
    return r < 0 ? -errno : r * 10 + FD_ISSET(fd, &set);
}

int sleeps(double *p_took, double *s_took) {
    double t0 = now();
    int a = poll(NULL, 0, 200);
    *p_took = now() - t0;
    struct timeval tv = {0, 150000};
    t0 = now();
    int b = select(0, NULL, NULL, NULL, &tv);
    *s_took = now() - t0;
    int c = poll(NULL, 0, -1) < 0 ? errno : 0; /* for ever: refused */
    return a * 100 + b * 10 + (c == EPERM);
}

/* A listening socket from C (bound to an ephemeral loopback port), and its accept. */
int serve_open(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 8) < 0) return -errno;
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

int serve_one(int lfd, char *out, int n) {
    struct sockaddr_in peer;
    socklen_t len = sizeof peer;
    int fd = accept4(lfd, (struct sockaddr *)&peer, &len, SOCK_CLOEXEC);
    if (fd < 0) return -errno;
    char buf[32] = {0};
    ssize_t r = recv(fd, buf, sizeof buf - 1, 0);
    send(fd, "served", 6, 0);
    snprintf(out, n, "accepted %s len %u recv %zd %s", inet_ntoa(peer.sin_addr), len, r, buf);
    return fd;
}

/* UDP: a datagram to a port and its echo, with the sender's address (sendmsg/recvmsg too). */
int udp(int port, char *out, int n) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {0}, from;
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    ssize_t w = sendto(fd, "dgram", 5, 0, (struct sockaddr *)&a, sizeof a);
    char buf[32] = {0};
    socklen_t len = sizeof from;
    ssize_t r = recvfrom(fd, buf, sizeof buf - 1, 0, (struct sockaddr *)&from, &len);
    struct iovec iov[2] = {{"vec", 3}, {"tor", 3}};
    struct msghdr m = {0};
    m.msg_name = &a;
    m.msg_namelen = sizeof a;
    m.msg_iov = iov;
    m.msg_iovlen = 2;
    ssize_t w2 = sendmsg(fd, &m, 0);
    char b1[2] = {0}, b2[8] = {0};
    struct iovec in[2] = {{b1, 2}, {b2, 7}};
    struct msghdr mi = {0};
    mi.msg_name = &from;
    mi.msg_namelen = sizeof from;
    mi.msg_iov = in;
    mi.msg_iovlen = 2;
    ssize_t r2 = recvmsg(fd, &mi, 0);
    snprintf(out, n, "sendto %zd recvfrom %zd %s from port %d len %u sendmsg %zd recvmsg %zd %.2s|%s", w, r, buf,
             ntohs(from.sin_port) == port, len, w2, r2, b1, b2);
    close(fd);
    return 0;
}
"""

CLIENT_APP = """
import ctypes, os, select, socket, sys
from cclient import lib
port = int(sys.argv[1])
out = ctypes.create_string_buffer(256)
fd = lib.blocking(b"localhost", str(port).encode(), out, 256)
print("blocking", out.value.decode())
took = ctypes.c_double()
print("poll timeout", lib.poll_timeout(fd, 300, ctypes.byref(took)), 0.25 < took.value < 3)
# The fd a C library holds is an ordinary enclave socket fd: Python's select and socket take it.
print("select", select.select([], [fd], [], 1)[1] == [fd])
s = socket.socket(fileno=os.dup(fd))
print("python socket", s.getpeername()[1] == port, s.family.name, s.type.name)
s.sendall(b"from python")
print("python recv", s.recv(64))
s.close()
os.close(fd)
fd = lib.nonblocking(b"127.0.0.1", port, out, 256)
print("nonblocking", out.value.decode())
os.close(fd)
"""


@pytest.fixture(scope="module")
def client_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cclient")
    (d / "client.c").write_text(CLIENT_C)
    lib = d / "libclient.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-o", str(lib), str(d / "client.c")], check=True)
    return lib


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A native echo server on loopback (a thread of this test process)."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # (an enclave stopped by a lie resets its connection)
            while data := conn.recv(4096):
                conn.sendall(data)

    def loop() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def _client_app(tmp_path: Path, lib: Path) -> Path:
    # The library is loaded before lockdown (--preload), as an app's C extensions are.
    (tmp_path / "cclient.py").write_text(f"import ctypes\nlib = ctypes.CDLL({str(lib)!r})\n")
    return write_app(tmp_path, CLIENT_APP)


def test_a_c_client_connects_sends_polls_and_receives_as_natively(
    tmp_path: Path, client_lib: Path, echo_port: int
) -> None:
    app = _client_app(tmp_path, client_lib)
    native = run_native(app, str(echo_port), cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave("--preload", "cclient", app, str(echo_port), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == native.stdout, (r.stdout, native.stdout)
    lines = r.stdout.splitlines()
    assert lines[0] == (
        f"blocking poll 1 revents 0x1 recv 4 ping nodelay 1 peer 127.0.0.1:{echo_port} len 16 local bound"
    )
    assert lines[1] == "poll timeout 0 True"
    assert lines[2:5] == ["select True", "python socket True AF_INET SOCK_STREAM", "python recv b'from python'"]
    assert lines[5] == (
        "nonblocking connect EINPROGRESS poll 1 SO_ERROR 0 recv -1 EAGAIN read -1 EAGAIN write 4 read pong"
    )


def _pg(url: str) -> tuple[str, int]:
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    return query["host"], int(query["port"])


PSYCOPG_APP = """
import sys
import psycopg
with psycopg.connect(sys.argv[1], autocommit=False) as c:
    table = sys.argv[2]
    c.execute(f"create table {table} (k int primary key, v text)")
    c.execute(f"insert into {table} values (%s, %s), (%s, %s)", (1, "one", 2, "two"))
    c.commit()
    with c.transaction():
        c.execute(f"insert into {table} values (3, 'three')")
    try:
        with c.transaction():
            c.execute(f"insert into {table} values (4, 'four')")
            raise RuntimeError("undo")
    except RuntimeError:
        pass
    print("rows", c.execute(f"select k, v from {table} order by k").fetchall())
    try:
        c.execute(f"insert into {table} values (1, 'again')")
    except psycopg.errors.UniqueViolation as e:
        print("server error", type(e).__name__, e.sqlstate)
        c.rollback()
    try:
        c.execute("selec 1")
    except psycopg.errors.SyntaxError as e:
        print("server error", type(e).__name__, e.sqlstate)
        c.rollback()
    print("after rollback", c.execute(f"select count(*) from {table}").fetchone())
    print("point", c.execute(f"select v from {table} where k = %s", (2,)).fetchone())
"""

PSYCOPG_OUT = [
    "rows [(1, 'one'), (2, 'two'), (3, 'three')]",
    "server error UniqueViolation 23505",
    "server error SyntaxError 42601",
    "after rollback (3,)",
    "point ('two',)",
]


def _run_client(tmp_path: Path, postgres_url: str, via: str, source: str, table: str) -> list[str]:
    """Run a PostgreSQL client app in the enclave, over TCP or the Unix socket; its output lines."""
    sockdir, port = _pg(postgres_url)
    host = "127.0.0.1" if via == "tcp" else sockdir
    conninfo = f"host={host} port={port} user=postgres dbname=cas connect_timeout=10"
    r = run_enclave(write_app(tmp_path, source), conninfo, f"{table}_{via}_{os.getpid()}", cwd=tmp_path)
    assert r.returncode == 0 and "pyscone: a C library" not in r.stderr, r.stderr
    return r.stdout.splitlines()


@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_psycopg_queries_postgresql_from_the_enclave(tmp_path: Path, postgres_url: str, via: str) -> None:
    assert _run_client(tmp_path, postgres_url, via, PSYCOPG_APP, "t") == PSYCOPG_OUT


PSYCOPG2_APP = """
import sys
import psycopg2, psycopg2.errors
c = psycopg2.connect(sys.argv[1])
table = sys.argv[2]
cur = c.cursor()
cur.execute(f"create table {table} (k int primary key, v text)")
cur.execute(f"insert into {table} values (%s, %s), (%s, %s)", (1, "one", 2, "two"))
c.commit()
try:
    cur.execute(f"insert into {table} values (1, 'again')")
except psycopg2.errors.UniqueViolation as e:
    print("server error", type(e).__name__, e.pgcode)
    c.rollback()
cur.execute(f"select k, v from {table} order by k")
print("rows", cur.fetchall())
c.close()
"""


@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_psycopg2_queries_postgresql_from_the_enclave(tmp_path: Path, postgres_url: str, via: str) -> None:
    """psycopg2's libpq waits in C (a blocking connect and ``poll``), unlike psycopg 3's."""
    out = _run_client(tmp_path, postgres_url, via, PSYCOPG2_APP, "t2")
    assert out == ["server error UniqueViolation 23505", "rows [(1, 'one'), (2, 'two')]"]


ASYNC_APP = """
import asyncio, sys, time
import psycopg
async def main():
    async with await psycopg.AsyncConnection.connect(sys.argv[1]) as c:
        cur = await c.execute("select 40 + %s", (2,))
        print("async", await cur.fetchone())
        ticks = []
        async def tick():
            while len(ticks) < 5:
                await asyncio.sleep(0.02)
                ticks.append(time.monotonic())
        t0 = time.monotonic()
        await asyncio.gather(c.execute("select pg_sleep(0.5)"), tick())
        # The loop ran while psycopg waited for the server (in Python, not in C).
        print("ticked during the query", len(ticks), ticks[-1] - t0 < 0.45)
        async with c.transaction():
            await c.execute("create temporary table a (k int)")
            await c.execute("insert into a values (1), (2)")
        print("sum", await (await c.execute("select sum(k) from a")).fetchone())
asyncio.run(main())
"""


def test_psycopgs_async_api_works_under_asyncio(tmp_path: Path, postgres_url: str) -> None:
    _, port = _pg(postgres_url)
    app = write_app(tmp_path, ASYNC_APP)
    r = run_enclave(app, f"host=127.0.0.1 port={port} user=postgres dbname=cas", cwd=tmp_path)
    assert (r.returncode, r.stdout.splitlines()) == (
        0,
        ["async (42,)", "ticked during the query 5 True", "sum (3,)"],
    ), r.stderr


def test_a_server_that_drops_the_connection_gives_operationalerror(tmp_path: Path, postgres_url: str) -> None:
    # The backend serving the query is killed in the middle of it (it terminates itself): libpq
    # sees the peer close, psycopg raises OperationalError, and the enclave goes on.
    _, port = _pg(postgres_url)
    app = write_app(
        tmp_path,
        """
        import sys
        import psycopg
        c = psycopg.connect(sys.argv[1], autocommit=True)
        try:
            c.execute("select pg_terminate_backend(pg_backend_pid())")
        except psycopg.OperationalError as e:
            print("dropped", isinstance(e, psycopg.OperationalError), type(e).__name__, c.closed)
        with psycopg.connect(sys.argv[1]) as again:
            print("still running", again.execute("select 1").fetchone())
        """,
    )
    r = run_enclave(app, f"host=127.0.0.1 port={port} user=postgres dbname=cas", cwd=tmp_path)
    assert (r.returncode, r.stdout.splitlines()) == (
        0,
        ["dropped True AdminShutdown True", "still running (1,)"],
    ), r.stderr


@pytest.mark.parametrize("lie", ["recv-overflow", "poll-stranger"])
def test_a_host_lying_about_a_c_librarys_socket_stops_the_enclave(
    tmp_path: Path, client_lib: Path, echo_port: int, lie: str
) -> None:
    app = _client_app(tmp_path, client_lib)
    hostile = {"PYSCONE_TEST_HOSTILE": f"py:clib_liars:SockLie:{lie}:{echo_port}", "PYTHONPATH": str(TESTS_DIR)}
    r = run_enclave("--preload", "cclient", app, str(echo_port), cwd=tmp_path, env=hostile)
    assert f"pyscone-test: lied about {'RECV' if lie == 'recv-overflow' else 'POLL'}" in r.stderr, r.stderr
    assert r.returncode == EXIT_HOST_VIOLATION, (r.stdout, r.stderr)
    assert "pyscone: enclave stopped: host violation:" in r.stderr
    assert "blocking" not in r.stdout  # nothing the lie touched reached the app


UNCOVERED_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <linux/netlink.h>

/* A thread the library starts before lockdown (at import), which later opens a socket on request. */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int asked, answered, thread_errno;
static void *worker(void *arg) {
    (void)arg;
    pthread_mutex_lock(&mu);
    while (!asked) pthread_cond_wait(&cv, &mu);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    thread_errno = fd < 0 ? errno : 0;
    answered = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return NULL;
}
int start(void) { pthread_t t; return pthread_create(&t, NULL, worker, NULL); }
int netlink(void) { return socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE) < 0 ? errno : 0; }
int epoll(void) { return epoll_create1(0) < 0 ? errno : 0; }
int from_thread(void) {
    pthread_mutex_lock(&mu);
    asked = 1;
    pthread_cond_broadcast(&cv);
    while (!answered) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    return thread_errno;
}
"""


def test_what_the_layer_does_not_carry_is_refused_with_one_line(tmp_path: Path) -> None:
    src = tmp_path / "uncovered.c"
    src.write_text(UNCOVERED_C)
    lib = tmp_path / "libuncovered.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-o", str(lib), str(src), "-lpthread"], check=True)
    (tmp_path / "uncovered.py").write_text(f"import ctypes\nlib = ctypes.CDLL({str(lib)!r})\nassert lib.start() == 0\n")
    app = write_app(
        tmp_path,
        """
        import errno
        from pyscone.enclave.stdlib import clib
        from uncovered import lib
        for name in ("netlink", "netlink", "epoll", "from_thread"):
            print(name, errno.errorcode.get(getattr(lib, name)(), "0"))
        print("foreign", clib.foreign_calls())
        """,
    )
    r = run_enclave("--preload", "uncovered", app, cwd=tmp_path)
    assert r.stdout.splitlines() == [
        "netlink EPERM",
        "netlink EPERM",
        "epoll EPERM",
        "from_thread EPERM",
        "foreign 1",
    ], r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("pyscone: a C library")]
    assert len(lines) == 2, r.stderr  # once each
    assert "AF_NETLINK" in lines[0] and "TCP, UDP and Unix-domain sockets only" in lines[0]
    assert "epoll" in lines[1] and "refused" in lines[1]
    assert "Traceback" not in r.stderr


def test_a_socket_made_through_ctypes_is_an_enclave_socket(tmp_path: Path) -> None:
    # (Until the layer's socket section, this socket() was refused with EPERM and one line.)
    app = write_app(
        tmp_path,
        """
        import ctypes, os, socket
        libc = ctypes.CDLL(None, use_errno=True)
        fds = [libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0) for _ in range(3)]
        print("fds", all(fd > 2 for fd in fds), len(set(fds)))
        s = socket.socket(fileno=fds[0])
        print("python sees", s.family.name, s.type.name, s.getblocking())
        # Python's default timeout is Python's: a C library's socket stays blocking, as natively.
        socket.setdefaulttimeout(5)
        fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
        nb = libc.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0)
        print("blocking", os.get_blocking(fd), os.get_blocking(nb))
        socket.setdefaulttimeout(None)
        os.close(fd)
        os.close(nb)
        s.close()
        for fd in fds[1:]:
            os.close(fd)
        try:
            os.close(fds[1])
        except OSError as e:
            print("closed", e.errno == 9)
        s = socket.socket()
        s.close()
        print("the socket module still works")
        """,
    )
    r = run_enclave(app, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "fds True 3",
        "python sees AF_INET SOCK_STREAM True",
        "blocking True False",
        "closed True",
        "the socket module still works",
    ], r.stderr
    assert "pyscone: a C library" not in r.stderr


SERVER_APP = """
import ctypes, socket, sys
from cclient import lib
port = ctypes.c_int()
lfd = lib.serve_open(ctypes.byref(port))
print("listening", lfd > 2, port.value > 0)
# The enclave's own Python socket connects to the C library's listening socket.
c = socket.create_connection(("127.0.0.1", port.value))
c.sendall(b"hello")
out = ctypes.create_string_buffer(160)
fd = lib.serve_one(lfd, out, 160)
print(out.value.decode(), c.recv(16))
c.close()
lib.udp(int(sys.argv[1]), out, 160)
print(out.value.decode())
"""


@pytest.fixture
def udp_echo_port() -> Iterator[int]:
    """A native UDP echo server on loopback (a thread of this test process)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                data, peer = srv.recvfrom(4096)
            except TimeoutError:
                continue
            srv.sendto(data, peer)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def test_a_c_library_can_listen_accept_and_use_udp(tmp_path: Path, client_lib: Path, udp_echo_port: int) -> None:
    app = _client_app(tmp_path, client_lib)
    app.write_text(SERVER_APP)
    native = run_native(app, str(udp_echo_port), cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave("--preload", "cclient", app, str(udp_echo_port), cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, native.stdout), r.stderr
    assert r.stdout.splitlines() == [
        "listening True True",
        "accepted 127.0.0.1 len 16 recv 5 hello b'served'",
        "sendto 5 recvfrom 5 dgram from port 1 len 16 sendmsg 6 recvmsg 6 ve|ctor",
    ], r.stderr


PIPE_APP = """
import ctypes, os, socket, sys
from cclient import lib
port = int(sys.argv[1])
out = ctypes.create_string_buffer(256)
sock = lib.blocking(b"127.0.0.1", str(port).encode(), out, 256)
r, w = os.pipe()
ra, rb, took = ctypes.c_int(), ctypes.c_int(), ctypes.c_double()
def pair(a, b, ms):
    n = lib.poll_pair(a, b, ms, ctypes.byref(ra), ctypes.byref(rb), ctypes.byref(took))
    return n, ra.value, rb.value, round(took.value, 1)
print("pipe+socket, nothing ready", pair(r, sock, 300))
os.write(w, b"x")
print("pipe ready", pair(r, sock, 5000))
os.read(r, 1)
print("pipe alone, blocking", pair(r, -1, -1))
"""


def test_a_poll_from_c_never_parks_on_an_enclave_pipe(tmp_path: Path, client_lib: Path, echo_port: int) -> None:
    # An enclave pipe (os.pipe) lives in enclave memory: waiting on it parks the lthread until
    # another one writes, which no lthread can do during a call from C.  Its readiness is looked
    # at once; the host fds are waited on with the timeout; a pipe alone answers at once.
    app = _client_app(tmp_path, client_lib)
    app.write_text(PIPE_APP)
    r = run_enclave("--preload", "cclient", app, str(echo_port), cwd=tmp_path, timeout=30)
    assert (r.returncode, r.stdout.splitlines()) == (
        0,
        [
            "pipe+socket, nothing ready (0, 0, 0, 0.3)",
            "pipe ready (1, 1, 0, 0.0)",
            "pipe alone, blocking (0, 0, 0, 0.0)",
        ],
    ), r.stderr
    assert r.stderr.count("polls an enclave pipe") == 1, r.stderr


GAI_APP = """
import ctypes, socket
libc = ctypes.CDLL(None, use_errno=True)
class AI(ctypes.Structure):
    pass
AI._fields_ = [("flags", ctypes.c_int), ("family", ctypes.c_int), ("socktype", ctypes.c_int), ("protocol", ctypes.c_int),
               ("addrlen", ctypes.c_uint32), ("addr", ctypes.c_void_p), ("canonname", ctypes.c_char_p), ("next", ctypes.POINTER(AI))]
def gai(node, service, family=0, socktype=0, flags=0):
    hints = AI(flags=flags, family=family, socktype=socktype)
    res = ctypes.POINTER(AI)()
    r = libc.getaddrinfo(node, service, ctypes.byref(hints), ctypes.byref(res))
    if r:
        return r
    out, p = [], res
    while p:
        a = p.contents
        raw = ctypes.string_at(a.addr, a.addrlen)
        out.append((a.family, a.socktype, a.addrlen, raw.hex(), a.canonname))
        p = a.next
    libc.freeaddrinfo(res)
    return sorted(out, key=repr)
print(gai(b"127.0.0.1", b"5432", socket.AF_INET, socket.SOCK_STREAM))
print(gai(b"localhost", b"80", 0, socket.SOCK_STREAM))
print(gai(None, b"8080", socket.AF_INET, socket.SOCK_STREAM, socket.AI_PASSIVE))
print(gai(b"localhost", None, socket.AF_INET, socket.SOCK_DGRAM, socket.AI_CANONNAME))
print(gai(b"no-such-host.invalid", b"80"))
print(gai(b"127.0.0.1", b"nosuchservice", socket.AF_INET, socket.SOCK_STREAM))
"""


def test_getaddrinfo_from_c_answers_as_natively(tmp_path: Path) -> None:
    # glibc's own resolver would open /etc/hosts and a netlink socket past the shim (the barrier):
    # the answer is the Python layer's, rebuilt as glibc's list, and freed by our freeaddrinfo.
    app = write_app(tmp_path, GAI_APP)
    native = run_native(app, cwd=tmp_path)
    assert native.returncode == 0, native.stderr
    r = run_enclave(app, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, native.stdout), r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[(2, 1, 16, '020015387f0000010000000000000000', None)]"
    assert lines[3].endswith("b'localhost')]") and lines[4:] == ["-2", "-8"]  # EAI_NONAME, EAI_SERVICE


SELECT_APP = """
import ctypes, os, sys
from cclient import lib
port = int(sys.argv[1])
out = ctypes.create_string_buffer(256)
sock = lib.blocking(b"127.0.0.1", str(port).encode(), out, 256)
took, took2 = ctypes.c_double(), ctypes.c_double()
print("writable", lib.select_one(sock, 1, 1000, ctypes.byref(took)), took.value < 0.5)
print("nothing to read", lib.select_one(sock, 0, 250, ctypes.byref(took)), 0.2 < took.value < 3)
os.write(sock, b"echo")
print("readable", lib.select_one(sock, 0, 5000, ctypes.byref(took)), took.value < 3)
print("sleeps", lib.sleeps(ctypes.byref(took), ctypes.byref(took2)), 0.15 < took.value < 3, 0.1 < took2.value < 3)
"""


def test_select_and_sleeps_from_c(tmp_path: Path, client_lib: Path, echo_port: int) -> None:
    # select is the shim's, as a poll; a wait on no descriptors is a sleep in place; for ever is refused.
    app = _client_app(tmp_path, client_lib)
    app.write_text(SELECT_APP)
    r = run_enclave("--preload", "cclient", app, str(echo_port), cwd=tmp_path, timeout=30)
    assert (r.returncode, r.stdout.splitlines()) == (
        0,
        ["writable 11 True", "nothing to read 0 True", "readable 11 True", "sleeps 1 True True"],
    ), r.stderr
    assert "waits for ever on no descriptors" in r.stderr, r.stderr


TICKER_APP = """
import sys, threading, time
import psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
ticks, done = [], threading.Event()
def ticker():
    while not done.is_set():
        time.sleep(0.02)
        ticks.append(1)
t = threading.Thread(target=ticker)
t.start()
time.sleep(0.05)
before = len(ticks)
c.execute("select pg_sleep(0.5)")
during = len(ticks) - before
done.set()
t.join()
print("ticks during the query", during >= 5)
"""


def test_with_psycopgs_python_wait_other_threads_run_during_a_query(tmp_path: Path, postgres_url: str) -> None:
    # psycopg's default sync wait is a C poll, which waits in place (other lthreads stall: see
    # docs/runtime.md); PSYCOPG_WAIT_FUNC=wait_poll makes it wait in the enclave's select.poll.
    _, port = _pg(postgres_url)
    app = write_app(tmp_path, TICKER_APP)
    conninfo = f"host=127.0.0.1 port={port} user=postgres dbname=cas"
    r = run_enclave("--env", "PSYCOPG_WAIT_FUNC=wait_poll", app, conninfo, cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "ticks during the query True\n"), r.stderr
