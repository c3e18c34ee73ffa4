"""The libc layer's sockets: what C libraries' ``socket``, ``connect``, ``recv``, ``poll``... become.

Theory of operation
-------------------
The shim (``clib/shim_net.c``; ``socket`` itself is in ``shim.c``) stands in front of the
socket, poll and resolver entry points that libpq (under psycopg), hiredis and libmemcached
call, and sends each to ``clib._dispatch``, which calls the handler here.  Where each function belongs:

* ``socket``, ``socketpair``, ``connect``, ``bind``, ``listen``, ``accept``/``accept4``,
  ``send``/``sendto``, ``recv``/``recvfrom``, ``getsockopt``/``setsockopt``,
  ``getsockname``/``getpeername``, ``shutdown``: the Python layer's
  :class:`~pyscone.enclave.stdlib.sockets.EnclaveSocket` methods, on a socket object made over
  the C library's fd for the one call (:meth:`EnclaveSocket.over`, then detached).  So the host
  calls, the Iago checks (a ``recv`` longer than asked, an address of the wrong family, an
  ``SO_ERROR`` that is no errno...) and the fd tables are the app's own; the fd a C library gets
  is an ordinary enclave socket fd, which Python's ``select``/``selectors``/``asyncio`` in the
  enclave wait on and ``socket.socket(fileno=...)``/``os.close`` accept.
* ``sendmsg``/``recvmsg``: flattened by the shim into one ``sendto``/``recvfrom`` (no
  ancillary data: ``SCM_RIGHTS`` would carry fds across the enclave boundary; refused).
* ``read``/``write``/``close``/``fcntl`` on a socket fd: the file calls the shim already routes
  (``files``, ``fdops``), which know socket fds (``O_NONBLOCK`` is ``fdops``'s).
* ``poll``/``ppoll`` (and ``select``/``pselect``, turned into a poll by the shim): the Python
  layer's ``select`` implementation (``sockets._poll``, one host ``POLL``; the host's answer must
  name exactly the fds and events asked).
* ``getaddrinfo``/``freeaddrinfo``: the Python layer's ``socket.getaddrinfo`` (one host call,
  its answer checked against the question).  glibc's own resolver cannot run here: it opens
  ``/etc/hosts``, ``/etc/nsswitch.conf`` and a netlink socket through internal calls that meet
  the barrier.  The shim rebuilds the list and frees only the lists it made.

Waiting.  A call from C runs with the scheduler in sync mode (``clib``: "How a call from C may
wait"): a blocking ``connect``/``recv``/``accept``/``poll`` waits in place for its host reply and
the enclave's other lthreads stall until it returns.  A non-blocking socket (``O_NONBLOCK``, as
libpq sets; ``SOCK_NONBLOCK``; ``MSG_DONTWAIT``) answers ``EAGAIN``/``EINPROGRESS`` at once, as
natively, so psycopg waits in Python (``selectors``, ``asyncio``), where lthreads keep running.
A poll's timeout is the enclave's timer cancelling the host call.

Not covered, refused with one line on the console: sockets of other families or kinds (netlink,
raw, packet), ``epoll`` instances made by C code (libuv's), ancillary data, ``ppoll`` with a
signal mask, and a ``poll``/``select`` on no fds for ever (one with a timeout is a sleep, done
by the shim in place).  ``select``/``pselect`` are the shim's, as a ``poll``.
A poll from C does not wait for an enclave pipe end (``os.pipe``; see :func:`_wait`), and
says so once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
from typing import Any

from pyscone import abi
from pyscone.enclave import iago
from pyscone.enclave.stdlib import dups, fdops, pipes
from pyscone.enclave.stdlib.sockets import EnclaveSocket, _poll, getaddrinfo, socketpair

_fds = iago.fds
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_SOCK_FLAGS = _SOCK_NONBLOCK | getattr(socket, "SOCK_CLOEXEC", 0)
_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_UNIX})
_KINDS = frozenset({socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET})
_POLLFD = struct.Struct("=iHH")  # struct pollfd (events and revents as the bits they are)
_ALWAYS = abi.POLLERR | abi.POLLHUP | abi.POLLNVAL
#: What ``C_UNCOVERED`` explains (shim_net.c's ``U_*``), and the line it prints once.
_UNCOVERED = {
    1: "a C library makes an epoll instance (libuv's event loop): epoll from C code does not go through the "
    "enclave: refused (Python's selectors and asyncio work)",
    2: "a C library sends ancillary data (sendmsg with msg_control: SCM_RIGHTS, credentials), which cannot "
    "cross the enclave boundary: refused",
    3: "a C library waits for ever on no descriptors (poll or select without a timeout), which nothing "
    "could end inside a call from C: refused",
    4: "a C library calls ppoll or pselect with a signal mask, which the enclave cannot swap atomically: refused",
    5: "a C library polls an enclave pipe (os.pipe), which no lthread can write during a call from C: the "
    "poll does not wait for it",
}
_explained: set[object] = set()


class _SockArg(ctypes.Structure):
    """shim_net.c's ``struct sockarg``: an address buffer and its length (in: size, out: full length)."""

    _fields_ = [("addr", ctypes.c_void_p), ("len", ctypes.c_longlong)]


class _GaiArg(ctypes.Structure):
    """shim_net.c's ``struct gaiarg``: getaddrinfo's node and service, and the answer buffer's size."""

    _fields_ = [("node", ctypes.c_char_p), ("service", ctypes.c_char_p), ("cap", ctypes.c_longlong)]


def _explain_once(key: object, line: str) -> None:
    if key not in _explained:
        _explained.add(key)
        print(f"pyscone: {line}", file=sys.stderr, flush=True)


def _efault() -> OSError:
    return OSError(errno.EFAULT, os.strerror(errno.EFAULT))


def _in(p: int | None, n: int) -> bytes:
    if n and not p:
        raise _efault()
    return ctypes.string_at(p or 0, n) if n else b""


def _out(q: int | None, data: bytes) -> int:
    if data:
        if not q:
            raise _efault()
        ctypes.memmove(q, data, len(data))
    return len(data)


# -- addresses: C's struct sockaddr <-> the Python layer's tuples ------------------------------


def _address(family: int, p: int | None, n: int) -> Any:
    """A C ``struct sockaddr`` of ``n`` bytes as the Python address for a socket of ``family``."""
    raw = _in(p, n)
    if len(raw) < 2:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    (got,) = struct.unpack_from("=H", raw)
    if got != family:
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
    if family == socket.AF_INET:
        if len(raw) < 16:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6:
        if len(raw) < 24:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        port, flow = struct.unpack_from("!HI", raw, 2)
        scope = struct.unpack_from("=I", raw, 24)[0] if len(raw) >= 28 else 0
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow, scope
    path = raw[2:]  # AF_UNIX: a path up to its NUL, or an abstract name (leading NUL) of exactly this length
    return path if path[:1] == b"\0" else path.split(b"\0", 1)[0]


def _sockaddr(family: int, address: Any) -> bytes:
    """A Python address (already checked by iago) as C's ``struct sockaddr``."""
    head = struct.pack("=H", family)
    if family == socket.AF_INET:
        host, port = address[0], address[1]
        return head + struct.pack("!H", port) + socket.inet_pton(socket.AF_INET, host) + bytes(8)
    if family == socket.AF_INET6:
        host, port = address[0], address[1]
        flow = address[2] if len(address) > 2 else 0
        scope = address[3] if len(address) > 3 else 0
        packed = socket.inet_pton(socket.AF_INET6, str(host).split("%", 1)[0])
        return head + struct.pack("!HI", port, flow) + packed + struct.pack("=I", scope)
    path = os.fsencode(address) if isinstance(address, str) else bytes(address or b"")
    return head + path + (b"\0" if path and path[:1] != b"\0" else b"")


def _put_address(arg: _SockArg, family: int, address: Any) -> None:
    """Write ``address`` into the caller's buffer (truncated to its size, as the kernel does)."""
    if address is None:
        arg.len = 0  # a stream socket's recvfrom: no sender address
        return
    data = _sockaddr(family, address)
    if arg.addr and arg.len > 0:
        ctypes.memmove(arg.addr, data, min(len(data), arg.len))
    arg.len = len(data)


def _arg(q: int | None) -> _SockArg:
    if not q:
        raise _efault()
    return _SockArg.from_address(q)


# -- the handlers (clib._dispatch calls them with (a, b, c, p, q), as shim_net.c passes them) -----


def socket_(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    """``socket(domain, type, protocol)``: a host socket, as the socket module makes one."""
    kind = b & ~_SOCK_FLAGS
    if a not in _FAMILIES or kind not in _KINDS:
        try:
            family = socket.AddressFamily(a).name
        except ValueError:
            family = str(a)
        _explain_once(
            ("socket", a, kind),
            f"a C library opens a socket ({family}, type {kind}) of a kind the enclave does not carry "
            "(TCP, UDP and Unix-domain sockets only): refused",
        )
        return -errno.EPERM
    fd = EnclaveSocket(a, b, c).detach()
    _nonblocking(fd, b)
    return fd


def _nonblocking(fd: int, flags: int) -> None:
    """A new fd from C is blocking unless ``SOCK_NONBLOCK`` says otherwise, whatever the app's
    ``socket.setdefaulttimeout`` (Python's, which the socket objects made here would follow)."""
    (_fds.nonblocking.add if flags & _SOCK_NONBLOCK else _fds.nonblocking.discard)(fd)


def socketpair_(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    if not q:
        raise _efault()
    one, two = socketpair(a, b, c)
    fds = (one.detach(), two.detach())
    for fd in fds:
        _nonblocking(fd, b)
    (ctypes.c_int * 2).from_address(q)[:] = list(fds)
    return 0


class _Over:
    """``with _Over(fd, flags) as sock``: the socket object for one call, detached after it."""

    __slots__ = ("sock",)

    def __init__(self, fd: int, flags: int = 0) -> None:
        self.sock = EnclaveSocket.over(fd)
        if flags & socket.MSG_DONTWAIT:
            self.sock._timeout = 0.0  # this call only (the fd's flag is unchanged)

    def __enter__(self) -> EnclaveSocket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.detach()


def connect(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    with _Over(a) as s:
        err = s.connect_ex(_address(s._family, p, b))  # EINPROGRESS on a non-blocking socket
    return -err if err else 0


def bind(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    with _Over(a) as s:
        s.bind(_address(s._family, p, b))
    return 0


def listen(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    with _Over(a) as s:
        s.listen(b)
    return 0


def accept(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    arg = _arg(q)
    with _Over(a) as s:
        conn, peer = s.accept()
        family = s._family
    fd = conn.detach()
    _nonblocking(fd, b)
    _put_address(arg, family, peer)
    return fd


def send(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    with _Over(a, c) as s:
        return s.send(_in(p, b), c)


def sendto(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    arg = _arg(q)
    with _Over(a, c) as s:
        return s.sendto(_in(p, b), c, _address(s._family, arg.addr, arg.len))


def recv(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    with _Over(a, c) as s:
        data = s.recv(b, c)
    if len(data) > b:  # (iago holds the host to the size asked; the C buffer is exactly b bytes)
        iago.fail_stop(f"recv returned {len(data)} bytes for a buffer of {b}")
    return _out(q, data)


def recvfrom(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    arg = _arg(p)
    with _Over(a, c) as s:
        data, peer = s.recvfrom(b, c)
        family = s._family
    if len(data) > b:
        iago.fail_stop(f"recvfrom returned {len(data)} bytes for a buffer of {b}")
    _put_address(arg, family, peer)
    return _out(q, data)


def getsockopt(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    level, name = b >> 32, b & 0xFFFFFFFF
    if c < 0:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    with _Over(a) as s:
        if c == 4:
            # An int option: the integer form, which iago checks by option (SO_ERROR an errno,
            # SO_TYPE the socket's own type, booleans 0 or 1).
            return _out(q, struct.pack("=i", s.getsockopt(level, name)))
        return _out(q, bytes(s.getsockopt(level, name, c)) if c else b"")


def setsockopt(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    level, name = b >> 32, b & 0xFFFFFFFF
    raw = _in(p, c)
    with _Over(a) as s:
        if len(raw) == 4:
            s.setsockopt(level, name, struct.unpack("=i", raw)[0])
        else:
            s.setsockopt(level, name, raw)
    return 0


def _name(a: int, c: int, q: int | None, peer: bool) -> int:
    with _Over(a) as s:
        address = s.getpeername() if peer else s.getsockname()
        data = _sockaddr(s._family, address)
    if c > 0:
        _out(q, data[:c])
    return len(data)


def getsockname(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    return _name(a, c, q, peer=False)


def getpeername(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    return _name(a, c, q, peer=True)


def shutdown(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    with _Over(a) as s:
        s.shutdown(b)
    return 0


def poll(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    """``poll(fds, a, b ms)``: the Python layer's poll on the fds asked (negative ones ignored, as
    natively; one not open answers ``POLLNVAL`` and makes the poll not wait)."""
    if a < 0 or a > 65536:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if a and not q:
        raise _efault()
    entries = (ctypes.c_byte * (_POLLFD.size * a)).from_address(q or 0) if a else bytearray()
    asked = [_POLLFD.unpack_from(entries, i * _POLLFD.size)[:2] for i in range(a)]
    wanted: dict[int, int] = {}
    invalid: set[int] = set()
    for fd, events in asked:
        if fd < 0:
            continue
        try:
            fdops._kind(fd)
        except OSError:
            invalid.add(fd)
            continue
        wanted[fd] = wanted.get(fd, 0) | (events & 0xFFFF)
    timeout = None if b < 0 else b / 1000.0
    if not wanted and not invalid:
        if timeout == 0.0:
            return 0
        _explain_once(("uncovered", 3), _UNCOVERED[3])
        return -errno.EINVAL
    ready = _wait(wanted, 0.0 if invalid else timeout)
    count = 0
    for i, (fd, events) in enumerate(asked):
        revents = abi.POLLNVAL if fd in invalid else ready.get(fd, 0) & ((events & 0xFFFF) | _ALWAYS) if fd >= 0 else 0
        _POLLFD.pack_into(entries, i * _POLLFD.size, fd, events, revents)
        count += bool(revents)
    return count


def _wait(wanted: dict[int, int], timeout: float | None) -> dict[int, int]:
    """``sockets._poll``, except that a poll from C never waits on an enclave pipe end.

    Waiting on a pipe parks the lthread until another one writes (``pipes.wait``), and a call
    from C must never park (``clib``: "How a call from C may wait").  Nor can another lthread
    write meanwhile, so a pipe's readiness is what it is now: it is looked at once, and only the
    host fds are waited on (a set of pipes alone, none ready, is answered at once: 0).
    """
    local = [fd for fd in wanted if pipes.is_local(dups.resolve(fd))]
    if not local or timeout == 0.0:
        return dict(_poll(list(wanted.items()), timeout))
    _explain_once(("uncovered", 5), _UNCOVERED[5])
    now = dict(_poll(list(wanted.items()), 0.0))
    host = [(fd, ev) for fd, ev in wanted.items() if fd not in local]
    return now if now or not host else dict(_poll(host, timeout))


def getaddrinfo_(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    """The Python layer's ``socket.getaddrinfo``, its answer in the layout shim_net.c's ``gai_build`` reads."""
    if not p or not q:
        raise _efault()
    arg = _GaiArg.from_address(p)
    socktype, proto = b & 0xFFFFFFFF, b >> 32
    flags = c - (1 << 32) if c >= 1 << 31 else c
    try:
        infos = getaddrinfo(arg.node, arg.service, a, socktype, proto, flags)
    except socket.gaierror as e:
        if e.errno is None or e.errno >= 0:  # an errno, not a resolver code (EAI_SYSTEM)
            raise OSError(e.errno or errno.EIO, str(e)) from None
        return _out(q, struct.pack("=ii", e.errno, 0))
    parts = [struct.pack("=ii", 0, len(infos))]
    for family, kind, protocol, canon, address in infos:
        sa = _sockaddr(int(family), address)
        name = canon.encode("utf-8") if canon else b""
        parts += [struct.pack("=5i", int(family), int(kind), protocol, len(sa), len(name)), sa, name]
    answer = b"".join(parts)
    if len(answer) > arg.cap:
        raise OSError(errno.ENOMEM, "getaddrinfo's answer does not fit")
    return _out(q, answer)


def uncovered(a: int, b: int, c: int, p: int | None, q: int | None) -> int:
    _explain_once(("uncovered", a), _UNCOVERED.get(a, f"a C library makes call {a} the enclave does not carry"))
    return -errno.EPERM
