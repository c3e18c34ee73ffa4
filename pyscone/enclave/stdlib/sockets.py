"""``socket``, ``select`` and (through them) ``selectors``/``asyncio`` on host calls.

:class:`EnclaveSocket` subclasses the stdlib ``socket.socket`` so ``isinstance``
checks in libraries still hold, but it never creates a kernel socket in the
enclave: the C base object keeps fd -1 and every method is a host call on the
host fd.  The app's three socket modes map onto the ABI:

* blocking (timeout ``None``): ``FLAG_WAIT``, the host parks the call;
* timeout ``t``: ``FLAG_WAIT`` plus an enclave timer that cancels the call;
* non-blocking (timeout 0): no wait, the host answers ``EAGAIN`` at once.

``select.select``, ``select.poll`` and ``select.epoll`` are one host ``POLL`` call
each; ``selectors`` (and so ``socketserver`` and ``asyncio``) use them unchanged.

A socket's ``fileno()`` is the app's number, which may be a dup (``dups``): every
host call is made on the handle that number names *now* (``_live``), so a
``dup2`` onto it redirects the socket object, as in Linux.  A wait translates the
app's numbers to handles and the readiness back to every number asked about.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from typing import Any

from pyscone import abi
from pyscone.abi import Op
from pyscone.enclave import iago, scheduler
from pyscone.enclave.shields import famchan, net
from pyscone.enclave.stdlib import dups, fdpass, interpose, pipes
from pyscone.protect import fdseal

LISTEN_BACKLOG_FLOOR = 128

_fds = iago.fds
_slot_data = 65536
_StdSocket = socket.socket
_SOCK_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
# Plain ints: ``flags & socket.MSG_PEEK`` is an IntFlag operation, a few µs a call.
_MSG_PEEK, _MSG_DONTWAIT = int(socket.MSG_PEEK), int(getattr(socket, "MSG_DONTWAIT", 0))


def _note_timeout(fd: int, timeout: float | None) -> None:
    """The fd's O_NONBLOCK, as CPython sets it: on for a socket with any timeout (the flag is
    the open file's, so a dup shares it)."""
    if fd >= 0:
        try:
            h = dups.resolve(fd)
        except OSError:
            return  # a number closed under the socket object: its flag is gone with it
        (_fds.nonblocking.discard if timeout is None else _fds.nonblocking.add)(h)


def _raise(err: int) -> None:
    if err == errno.ETIMEDOUT:
        raise TimeoutError("timed out")
    raise OSError(err, os.strerror(err))


class EnclaveSocket(_StdSocket):
    """A socket whose kernel object lives on the host."""

    def __init__(self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None) -> None:  # noqa: A002
        # Deliberately no super().__init__(): that would create a kernel socket here.
        self._io_refs = 0
        self._closed = False
        timeout = socket.getdefaulttimeout()
        if fileno is None:
            family = socket.AF_INET if family == -1 else family
            type = socket.SOCK_STREAM if type == -1 else type  # noqa: A001
            proto = 0 if proto == -1 else proto
            if type & getattr(socket, "SOCK_NONBLOCK", 0):
                timeout = 0.0
            kind = type & ~_SOCK_FLAGS
            fd, _ = _call(Op.SOCKET, (family, kind, proto))
            type = kind  # noqa: A001
        else:
            fd = fileno
            h = dups.resolve(fd)
            if _fds.kind(h) != iago.FdTable.SOCKET:
                raise OSError(errno.ENOTSOCK, os.strerror(errno.ENOTSOCK))
            # What the enclave recorded when it made the socket; the host is asked only
            # for what it cannot know (and iago holds the answer to the record).
            if family == -1:
                family = _fds.families.get(h) or self._opt(h, socket.SO_DOMAIN)
            if type == -1:
                type = _fds.types.get(h) or self._opt(h, socket.SO_TYPE)  # noqa: A001
            if proto == -1:
                proto = _fds.protos.get(h, -1)
                if proto == -1:
                    proto = self._opt(h, socket.SO_PROTOCOL)
        self._fd = fd
        self._family = family
        self._kind = type
        self._proto = proto
        self._timeout: float | None = timeout
        self._sockname: Any = None
        self._listening = False
        if fileno is None or timeout is not None:
            # As CPython: a socket made on an existing fd leaves its O_NONBLOCK alone unless
            # a default timeout is set (the fd may be a dup whose flag another socket relies on).
            _note_timeout(fd, timeout)

    @classmethod
    def over(cls, fd: int) -> EnclaveSocket:
        """A socket object on the fd a C library holds, blocking as the fd's ``O_NONBLOCK`` says.

        The libc layer's view (stdlib/clibnet.py): made for one call and then :meth:`detach`-ed,
        never closed.  The fd's flag is the C library's (``fcntl``), not a default timeout's.
        """
        h = dups.resolve(fd)
        nonblocking = h in _fds.nonblocking
        sock = cls(fileno=fd)  # ENOTSOCK for a file, EBADF for a closed fd
        (_fds.nonblocking.add if nonblocking else _fds.nonblocking.discard)(h)
        sock._timeout = 0.0 if nonblocking else None
        return sock

    @staticmethod
    def _opt(fd: int, opt: int) -> int:
        _r, v = _call(Op.GETSOCKOPT, (fd, socket.SOL_SOCKET, opt, 0))
        return int(v)

    # -- identity -----------------------------------------------------------------------------

    @property
    def family(self) -> socket.AddressFamily:
        return socket._intenum_converter(self._family, socket.AddressFamily)  # type: ignore[attr-defined,no-any-return]

    @property
    def type(self) -> socket.SocketKind:
        return socket._intenum_converter(self._kind, socket.SocketKind)  # type: ignore[attr-defined,no-any-return]

    @property
    def proto(self) -> int:
        return self._proto

    @property
    def timeout(self) -> float | None:
        return self._timeout

    def fileno(self) -> int:
        return self._fd

    def _live(self) -> int:
        """The host fd to call on: the handle this socket's number names now."""
        if self._fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return dups.resolve(self._fd)

    def __repr__(self) -> str:
        s = f"<pyscone.EnclaveSocket fd={self._fd}, family={self._family}, type={self._kind}, proto={self._proto}"
        if self._fd >= 0:
            for what, fn in (("laddr", self.getsockname), ("raddr", self.getpeername)):
                try:
                    s += f", {what}={fn()}"
                except OSError:
                    pass
        return s + ">"

    # -- timeouts -----------------------------------------------------------------------------

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = value
        _note_timeout(self._fd, value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0
        _note_timeout(self._fd, self._timeout)

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def _io(self, op: int, args: tuple[int, ...], data: bytes = b"") -> tuple[int, Any]:
        """One socket operation honouring this socket's blocking mode."""
        t = self._timeout
        if t is None and args[0] in _fds.nonblocking:
            t = 0.0  # os.set_blocking(fd, False) under a blocking socket: it answers EAGAIN, as in Linux
        result, err, value = scheduler.get().host_call(op, args, data, wait=t != 0.0, timeout=t if t else None)
        if result < 0:
            _raise(err)
        return result, value

    def _shield_io(self, h: int, flags: int = 0) -> net.HostIO:
        t = self._timeout
        if (t is None and h in _fds.nonblocking) or flags & _MSG_DONTWAIT:
            t = 0.0
        return net.HostIO(h, t)

    # -- connection set-up --------------------------------------------------------------------

    def bind(self, address: Any) -> None:
        h = self._live()
        data = abi.encode_sockaddr(self._family, address)
        shield = net.shield()
        if shield is not None:
            shield.check_bind(h, self._family, self._kind, address)
        _call(Op.BIND, (h,), data)

    def listen(self, backlog: int = min(socket.SOMAXCONN, 128)) -> None:
        # At least LISTEN_BACKLOG_FLOOR: an accept loop in the enclave takes longer to come
        # round than a native one, and socketserver's default backlog of 5 then overflows under
        # a burst (the kernel drops handshakes and clients retry for seconds).  The backlog is
        # a hint the kernel caps anyway; a larger one changes no behaviour an app relies on.
        _call(Op.LISTEN, (self._live(), max(backlog, LISTEN_BACKLOG_FLOOR)))
        self._listening = True

    def _accept(self) -> tuple[int, Any]:
        _fd, (newfd, addr, _local) = self._io(Op.ACCEPT, (self._live(),))
        return newfd, addr

    def accept(self) -> tuple[EnclaveSocket, Any]:
        listener = self._live()
        _, (fd, addr, local) = self._io(Op.ACCEPT, (listener,))
        shield = net.shield()
        if shield is not None:
            shield.accepted(listener, fd, addr)
        sock = EnclaveSocket(self._family, self._kind, self._proto, fileno=fd)
        sock._sockname = local  # a connected socket's local address never changes
        if socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        return sock, addr

    def connect(self, address: Any) -> None:
        err = self.connect_ex(address)
        if err:
            if err in (errno.EINPROGRESS, errno.EAGAIN) and self._timeout == 0.0:
                raise BlockingIOError(err, os.strerror(err))
            _raise(err)

    def connect_ex(self, address: Any) -> int:
        t = self._timeout
        h = self._live()
        data = abi.encode_sockaddr(self._family, address)
        shield = net.shield()
        rule = None if shield is None else shield.connect_rule(h, self._family, self._kind, address)
        result, err, _ = scheduler.get().host_call(Op.CONNECT, (h,), data, wait=t != 0.0, timeout=t if t else None)
        if result < 0 and err == errno.EAGAIN and t == 0.0:
            err = errno.EINPROGRESS
        elif result < 0 and err == errno.ETIMEDOUT and t:
            raise TimeoutError("timed out")
        if rule is not None and shield is not None and (result >= 0 or err == errno.EINPROGRESS):
            conn = shield.client(h, rule)
            io = self._shield_io(h)
            if result >= 0 and io.blocking:
                conn.handshake(io)  # a bad certificate is connect's error
        return err if result < 0 else 0

    # -- data ---------------------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        view = memoryview(data).cast("B")[:_slot_data]
        h = self._live()
        conn = net.conn(h)
        if conn is not None:
            return conn.send(self._shield_io(h, flags), bytes(view))
        if h in famchan.sealed:
            return famchan.sock_send(h, view, self._shield_io(h, flags).timeout)
        n, _ = self._io(Op.SEND, (h, flags), bytes(view))
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        sent = 0
        while sent < len(view):
            sent += self.send(view[sent : sent + _slot_data], flags)

    def sendto(self, data: Any, flags_or_addr: Any, addr: Any = None) -> int:
        flags, address = (0, flags_or_addr) if addr is None else (flags_or_addr, addr)
        shield = net.shield()
        if shield is not None:
            h = self._live()
            if h in shield.conns:
                return self.send(data, flags)  # a connected stream socket ignores the address
            shield.check_datagram(h, self._family, self._kind, address)
        enc = abi.encode_sockaddr(self._family, address)
        payload = bytes(memoryview(data).cast("B")[: _slot_data - 4 - len(enc)])
        n, _ = self._io(Op.SENDTO, (self._live(), flags), struct.pack("<I", len(enc)) + enc + payload)
        return n

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        h = self._live()
        conn = net.conn(h)
        if conn is not None:
            return conn.recv(self._shield_io(h, flags), min(bufsize, _slot_data), bool(flags & _MSG_PEEK))
        if h in famchan.sealed:
            t = self._shield_io(h, flags).timeout
            return famchan.sock_recv(h, min(bufsize, _slot_data), t, bool(flags & _MSG_PEEK))
        _, data = self._io(Op.RECV, (h, min(bufsize, _slot_data), flags))
        return bytes(data)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        n = nbytes or len(view)
        data = self.recv(min(n, len(view)), flags)
        view[: len(data)] = data
        return len(data)

    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, Any]:
        if bufsize < 0:
            raise ValueError("negative buffersize in recvfrom")
        if net.conn(self._live()) is not None:
            return self.recv(bufsize, flags), None
        _, (data, addr) = self._io(Op.RECVFROM, (self._live(), min(bufsize, _slot_data), flags))
        return bytes(data), addr

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> tuple[int, Any]:
        view = memoryview(buffer).cast("B")
        data, addr = self.recvfrom(min(nbytes or len(view), len(view)), flags)
        view[: len(data)] = data
        return len(data), addr

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        payload = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        fds = fdpass.rights(ancdata)
        if fds:
            room = _slot_data - 4 * len(fds) - fdseal.HEAD.size - fdseal.MAX_BODY
            return fdpass.sendmsg(self, self._live(), payload[: max(room, 0)], fds, flags)
        if address is not None:
            return self.sendto(payload, flags, address)
        return self.send(payload, flags)

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> tuple[bytes, list[Any], int, Any]:
        if bufsize < 0:
            raise ValueError("negative buffer size in recvmsg()")
        if ancbufsize < 0:
            raise ValueError("negative buffer size in recvmsg()")
        h = self._live()
        unix_stream = self._family == socket.AF_UNIX and self._kind == socket.SOCK_STREAM
        passing = unix_stream and ancbufsize > socket.CMSG_LEN(0)
        if passing and h not in famchan.sealed and net.conn(h) is None and not flags & _MSG_PEEK:
            room = _slot_data - abi.RECVMSG_HEAD.size - 4 * fdseal.MAX_FDS
            return fdpass.recvmsg(self, h, min(bufsize, room), ancbufsize, flags)
        if self._kind == socket.SOCK_STREAM:
            return self.recv(bufsize, flags), [], 0, None
        data, addr = self.recvfrom(bufsize, flags)
        return data, [], 0, addr

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> tuple[int, list[Any], int, Any]:
        views = [memoryview(b).cast("B") for b in buffers]
        data, anc, mflags, addr = self.recvmsg(sum(len(v) for v in views), ancbufsize, flags)
        at = 0
        for v in views:
            piece = data[at : at + len(v)]
            v[: len(piece)] = piece
            at += len(piece)
        return len(data), anc, mflags, addr

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        return self._sendfile_use_send(file, offset, count)  # type: ignore[attr-defined,no-any-return]

    # -- options and names --------------------------------------------------------------------

    def setsockopt(self, level: int, optname: int, value: Any, optlen: int | None = None) -> None:
        if isinstance(value, int):
            args = (self._live(), level, optname, 0, value)
            infallible = (level, optname) in _INFALLIBLE_OPTIONS and self._kind == socket.SOCK_STREAM
            if infallible and -(2**31) <= value < 2**31:
                # Linux can fail these only with EBADF, ENOTSOCK, ENOPROTOOPT or a bad length, all
                # ruled out here (the fd is ours, a TCP socket, the value an int): post, don't wait.
                tcp = self._family in (socket.AF_INET, socket.AF_INET6) and self._proto in (0, socket.IPPROTO_TCP)
                if tcp or level == socket.SOL_SOCKET:
                    scheduler.get().post(Op.SETSOCKOPT, args)
                    return
            _call(Op.SETSOCKOPT, args)
        else:
            _call(Op.SETSOCKOPT, (self._live(), level, optname, 1, 0), bytes(value))

    def getsockopt(self, level: int, optname: int, buflen: int = 0) -> Any:
        _r, v = _call(Op.GETSOCKOPT, (self._live(), level, optname, buflen))
        return bytes(v) if buflen else v

    def getsockname(self) -> Any:
        if self._sockname is not None and self._fd >= 0:
            return self._sockname
        name = _call(Op.GETSOCKNAME, (self._live(),))[1]
        if self._listening:  # nor does a listening one's (gunicorn asks it once per request)
            self._sockname = name
        return name

    def getpeername(self) -> Any:
        return _call(Op.GETPEERNAME, (self._live(),))[1]

    def shutdown(self, how: int) -> None:
        h = self._live()
        conn = net.conn(h)
        if conn is not None and how in (socket.SHUT_WR, socket.SHUT_RDWR):
            conn.close_notify(self._shield_io(h))
        _call(Op.SHUTDOWN, (h, how))

    # -- life cycle ---------------------------------------------------------------------------

    def _real_close(self, _ss: Any = None) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            h = dups.unname(fd)  # EBADF if the app closed the number under the socket, as in Linux
            if h is None:
                return  # a dup still names the socket
            if h != fd or _fds.kinds.get(h) != iago.FdTable.SOCKET:
                dups.close_handle(h)  # the number named something else by then (a dup2 onto it)
                return
            conn = net.conn(h)
            if conn is not None:
                conn.close_notify(net.HostIO(h, 0.0))  # the peer sees a clean end, not a truncation
            _fds.forget(h)  # before the host can reuse the number (see files.close)
            # Posted, not awaited: a socket's close reports nothing worth a round trip,
            # and the host runs the ring in order, so no later call can overtake it.
            scheduler.get().post(Op.CLOSE, (h,))

    def detach(self) -> int:
        fd, self._fd = self._fd, -1
        self._closed = True
        return fd

    def dup(self) -> EnclaveSocket:
        """Another socket object on the same host socket (a new number, named in the enclave)."""
        sock = EnclaveSocket(self._family, self._kind, self._proto, fileno=dups.dup(self._live_number()))
        sock.settimeout(self._timeout)
        sock._sockname = self._sockname
        return sock

    def _live_number(self) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self._fd

    def __getstate__(self) -> object:
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def __del__(self) -> None:
        # An unclosed socket must not leak its host fd; but a finalizer may run in the
        # middle of anything, so it must not switch lthreads: the close is deferred.
        fd = getattr(self, "_fd", -1)
        if fd >= 0 and scheduler._scheduler is not None:
            self._fd = -1
            if dups.active():
                try:
                    h = dups.unname(fd)
                except OSError:
                    return
                if h is None or h not in _fds.kinds or h <= 2:
                    # Still named elsewhere, or (after a dup2 onto this number) a vfd or a pipe
                    # end, whose close cannot run in a finalizer: that handle stays open.
                    return
                fd = h
            _fds.forget(fd)
            scheduler._scheduler.defer(Op.CLOSE, (fd,))


#: Boolean-style options whose setsockopt cannot fail on a stream socket the enclave knows.
_INFALLIBLE_OPTIONS = frozenset(
    {
        (socket.IPPROTO_TCP, socket.TCP_NODELAY),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        (socket.SOL_SOCKET, socket.SO_REUSEADDR),
    }
)


def _call(op: int, args: tuple[int, ...] = (), data: bytes = b"") -> tuple[int, Any]:
    result, err, value = scheduler.get().host_call(op, args, data)
    if result < 0:
        _raise(err)
    return result, value


def runtime_connection(host: str, port: int, timeout: float) -> EnclaveSocket:
    """A TCP connection of the runtime itself (the CAS's pin reports), never under the network
    shield: the shield is for the app's traffic, and these carry their own pinned TLS."""
    problem: OSError | None = None
    for family, kind, proto, _, address in getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = EnclaveSocket(family, kind, proto)
        shield = net.shield()
        if shield is not None:
            shield.exempt.add(sock._live())
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as e:
            problem = e
            sock.close()
    raise problem or OSError(errno.EHOSTUNREACH, f"{host}: no address")


def socketpair(
    family: int = socket.AF_UNIX,
    type: int = socket.SOCK_STREAM,  # noqa: A002 - the stdlib's parameter name
    proto: int = 0,
) -> tuple[EnclaveSocket, EnclaveSocket]:
    _, (fd1, fd2) = _call(Op.SOCKETPAIR, (family, type & ~_SOCK_FLAGS, proto))
    if family == socket.AF_UNIX and type & ~_SOCK_FLAGS == socket.SOCK_STREAM:
        famchan.note_pair(fd1, fd2)  # sealed if it is still open when the enclave forks
    return (EnclaveSocket(family, type, proto, fileno=fd1), EnclaveSocket(family, type, proto, fileno=fd2))


# -- name resolution ----------------------------------------------------------------------------


def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> list[Any]:  # noqa: A002
    h = b"" if host is None else (host.encode("idna") if isinstance(host, str) else bytes(host))
    p = (
        b""
        if port is None
        else (str(port).encode() if isinstance(port, int) else port.encode() if isinstance(port, str) else bytes(port))
    )
    result, err, value = scheduler.get().host_call(Op.GETADDRINFO, (family, type, proto, flags), h + b"\0" + p)
    if result < 0:
        if err:
            _raise(err)
        raise socket.gaierror(value, _gai_message(value))
    shield = net.shield()
    if shield is not None and h:
        # A name a rule gives: its addresses now reach that rule (the host answered, so the
        # TLS handshake, not this answer, decides whether the server is the one named).
        shield.note_resolved(h.decode("ascii", "replace"), [str(sa[0]) for *_, sa in value if sa])
    return [
        (socket._intenum_converter(f, socket.AddressFamily), socket._intenum_converter(t, socket.SocketKind), pr, c, sa)  # type: ignore[attr-defined]
        for f, t, pr, c, sa in value
    ]


def _gai_message(code: int) -> str:
    return {
        socket.EAI_NONAME: "Name or service not known",
        socket.EAI_AGAIN: "Temporary failure in name resolution",
        socket.EAI_SERVICE: "Servname not supported for ai_socktype",
        socket.EAI_FAMILY: "ai_family not supported",
    }.get(code, "name resolution failed")


def gethostname() -> str:
    return bytes(_call(Op.GETHOSTNAME)[1]).decode("utf-8", "replace")


def gethostbyname(hostname: str) -> str:
    return str(getaddrinfo(hostname, None, socket.AF_INET)[0][4][0])


def gethostbyname_ex(hostname: str) -> tuple[str, list[str], list[str]]:
    infos = getaddrinfo(hostname, None, socket.AF_INET, 0, 0, socket.AI_CANONNAME)
    addrs = list(dict.fromkeys(i[4][0] for i in infos))
    return (infos[0][3] or hostname, [], addrs)


def getnameinfo(sockaddr: Any, flags: int) -> tuple[str, str]:
    family = socket.AF_INET6 if len(sockaddr) == 4 else socket.AF_INET
    data = abi.encode_sockaddr(family, sockaddr)
    result, err, value = scheduler.get().host_call(Op.GETNAMEINFO, (family, flags), data)
    if result < 0:
        if err:
            _raise(err)
        raise socket.gaierror(value, _gai_message(value))
    return value  # type: ignore[no-any-return]


def gethostbyaddr(ip: str) -> tuple[str, list[str], list[str]]:
    info = getaddrinfo(ip, None)[0]
    name, _ = getnameinfo(info[4], socket.NI_NAMEREQD)
    return (name, [], [info[4][0]])


# -- select -------------------------------------------------------------------------------------


def _fileno(obj: Any) -> int:
    fd = obj if isinstance(obj, int) else obj.fileno()
    if not isinstance(fd, int):
        raise TypeError("fileno() returned a non-integer")
    if fd < 0:
        raise ValueError(f"file descriptor cannot be a negative integer ({fd})")
    return fd


def _poll(fds: list[tuple[int, int]], timeout: float | None) -> list[tuple[int, int]]:
    """Wait until one of ``fds`` (the app's numbers) is ready or ``timeout`` seconds pass (None: forever)."""
    if not dups.active():
        return _poll_handles(fds, timeout)
    wanted: dict[int, int] = {}  # handle -> the events of every number that names it
    names: list[tuple[int, int, int]] = []  # (number, handle, events)
    for fd, ev in fds:
        h = dups.resolve(fd)  # EBADF for a closed number, as before
        wanted[h] = wanted.get(h, 0) | ev
        names.append((fd, h, ev))
    ready = dict(_poll_handles(list(wanted.items()), timeout))
    always = abi.POLLERR | abi.POLLHUP | abi.POLLNVAL
    return [(fd, r) for fd, h, ev in names if (r := ready.get(h, 0) & (ev | always))]


def _poll_handles(fds: list[tuple[int, int]], timeout: float | None) -> list[tuple[int, int]]:
    local = [(fd, ev) for fd, ev in fds if pipes.is_local(fd)]
    if not local:
        return _host_poll(fds, timeout)
    for fd, _ in local:
        pipes.fstat(fd)  # EBADF for a closed one
    return pipes.wait(local, [(fd, ev) for fd, ev in fds if not pipes.is_local(fd)], timeout, _host_poll)


def _host_poll(fds: list[tuple[int, int]], timeout: float | None) -> list[tuple[int, int]]:
    if famchan.sealed and any(h in famchan.sealed for h, _ in fds):
        return famchan.poll(fds, timeout, _net_poll)
    return _net_poll(fds, timeout)


def _net_poll(fds: list[tuple[int, int]], timeout: float | None) -> list[tuple[int, int]]:
    shield = net.shield()
    if shield is not None and shield.conns and any(h in shield.conns for h, _ in fds):
        return net.poll(shield, fds, timeout, _raw_host_poll, lambda h: net.HostIO(h, 0.0), time.monotonic)
    return _raw_host_poll(fds, timeout)


def _raw_host_poll(fds: list[tuple[int, int]], timeout: float | None) -> list[tuple[int, int]]:
    for fd, _ in fds:
        _fds.kind(fd)  # EBADF for a descriptor the enclave never opened
    if not fds:
        if timeout is None:
            raise OSError(errno.EINVAL, "waiting forever on nothing")
        scheduler.get().sleep(timeout)
        return []
    wait = timeout is None or timeout > 0
    result, err, value = scheduler.get().host_call(
        Op.POLL, (len(fds),), abi.encode_pollfds(fds), wait=wait, timeout=timeout if wait else None
    )
    if result < 0:
        if err == errno.ETIMEDOUT:
            return []
        _raise(err)
    return value  # type: ignore[no-any-return]


def select_(rlist: Any, wlist: Any, xlist: Any, timeout: float | None = None) -> tuple[list[Any], list[Any], list[Any]]:
    if timeout is not None:
        timeout = float(timeout)
        if timeout < 0:
            raise ValueError("timeout must be non-negative")
    want: dict[int, int] = {}
    objs: dict[tuple[int, int], list[Any]] = {}
    for lst, ev in ((rlist, abi.POLLIN), (wlist, abi.POLLOUT), (xlist, abi.POLLPRI)):
        for obj in lst:
            fd = _fileno(obj)
            want[fd] = want.get(fd, 0) | ev
            objs.setdefault((fd, ev), []).append(obj)
    ready = dict(_poll(list(want.items()), timeout))
    out: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
    for i, (lst, ev) in enumerate(((rlist, abi.POLLIN), (wlist, abi.POLLOUT), (xlist, abi.POLLPRI))):
        extra = abi.POLLHUP | abi.POLLERR if ev != abi.POLLPRI else 0
        for obj in lst:
            if ready.get(_fileno(obj), 0) & (ev | extra):
                out[i].append(obj)
    return out


class Poll:
    """``select.poll()`` in the enclave."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def register(self, fd: Any, eventmask: int = abi.POLLIN | abi.POLLPRI | abi.POLLOUT) -> None:
        self._fds[_fileno(fd)] = eventmask & 0xFFFF

    def modify(self, fd: Any, eventmask: int) -> None:
        f = _fileno(fd)
        if f not in self._fds:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        self._fds[f] = eventmask & 0xFFFF

    def unregister(self, fd: Any) -> None:
        del self._fds[_fileno(fd)]

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        t = None if timeout is None or timeout < 0 else timeout / 1000.0
        return _poll(list(self._fds.items()), t)


_EPOLL_TO_POLL = abi.POLLIN | abi.POLLPRI | abi.POLLOUT | abi.POLLERR | abi.POLLHUP


class Epoll:
    """``select.epoll()`` in the enclave (level-triggered)."""

    def __init__(self, sizehint: int = -1, flags: int = 0) -> None:
        self._fds: dict[int, int] = {}
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed epoll object")

    def register(self, fd: Any, eventmask: int = select.EPOLLIN | select.EPOLLPRI | select.EPOLLOUT) -> None:
        self._check()
        f = _fileno(fd)
        if f in self._fds:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        self._fds[f] = eventmask

    def modify(self, fd: Any, eventmask: int) -> None:
        self._check()
        f = _fileno(fd)
        if f not in self._fds:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        self._fds[f] = eventmask

    def unregister(self, fd: Any) -> None:
        self._check()
        f = _fileno(fd)
        if f not in self._fds:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        del self._fds[f]

    def poll(self, timeout: float | None = None, maxevents: int = -1) -> list[tuple[int, int]]:
        self._check()
        t = None if timeout is None or timeout < 0 else float(timeout)
        ready = _poll([(fd, ev & _EPOLL_TO_POLL) for fd, ev in self._fds.items()], t)
        return ready if maxevents < 0 else ready[:maxevents]

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return -1

    def __enter__(self) -> Epoll:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def install(slot_data: int) -> None:
    global _slot_data
    _slot_data = slot_data
    interpose(
        socket, socket=EnclaveSocket, SocketType=EnclaveSocket, socketpair=socketpair, getaddrinfo=getaddrinfo,
        gethostname=gethostname, gethostbyname=gethostbyname, gethostbyname_ex=gethostbyname_ex,
        gethostbyaddr=gethostbyaddr, getnameinfo=getnameinfo,
    )  # fmt: skip
    interpose(select, select=select_, poll=Poll, epoll=Epoll)
    for name in ("devpoll", "kqueue"):
        if hasattr(select, name):
            delattr(select, name)
    # selectors binds select.poll/select.epoll as class attributes at import time:
    # import it afresh so its selectors (and socketserver's, asyncio's) use ours.
    import sys

    for name in ("selectors", "socketserver", "subprocess"):
        sys.modules.pop(name, None)
    import selectors  # noqa: F401
