"""The network shield: TLS beneath the app's plain sockets, by policy.

Theory of operation
-------------------
The app speaks plain TCP (or a Unix socket); the rules (``pyscone.protect.netpolicy``) say
which of its listening ports and destinations carry TLS on the wire.  Every such connection
gets a :class:`Conn`: an ``ssl.SSLObject`` on two memory BIOs, keyed by the host handle of the
socket, so the Python layer (``EnclaveSocket``) and the C layer (libc's ``send``/``recv``/
``poll`` come through the same socket methods, ``stdlib/clibnet.py``) share one engine.  The
host relays only ciphertext; certificates and keys exist only in enclave memory.

* **Data.** ``recv`` answers from the decrypted bytes a connection holds, and reads
  ciphertext from the host only when it holds none; ``send`` encrypts and sends the records.
  A non-blocking socket whose records the host did not take keeps them (``out``) and refuses
  more (``EAGAIN``) until they are gone, so back-pressure reaches the app as natively.
* **Readiness.** ``poll``/``select``/``epoll`` (:func:`poll`) decrypt eagerly: a shielded
  socket the host reports readable is read and its records opened, and the app is told
  ``POLLIN`` only when plaintext (or the end, or an error) is there -- a partial record, a
  handshake message or a session ticket is not data.  Unsent records are flushed when the host
  says the socket is writable, whatever the app waits for.  So a poll is still one host call,
  and the ``recv`` after it none.
* **Handshakes.** A server connection shakes hands lazily, as bytes arrive (the app's first
  ``recv``, or a poll).  A client connection does it in ``connect`` on a blocking socket (so a
  bad certificate is an error of ``connect``), and lazily on a non-blocking one, whose
  plaintext written before the handshake ends waits in ``early`` (bounded).
* **Failures** (a bad certificate, a plaintext peer, a torn record) are logged once, the host
  socket is shut down, and every later call on that socket raises the connection's error:
  ``ECONNRESET`` on a server connection, ``ECONNABORTED`` on a client one.  Nothing the host
  sends can make the app see bytes that were not in an authentic record.
* **Unlisted** destinations and ports, and UDP, are refused with ``EACCES`` or allowed in
  plaintext (logged once each), as the rules say.  The runtime's own connections (the CAS pin)
  are :func:`exempt`.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from pyscone import abi
from pyscone.abi import Op
from pyscone.enclave import iago, scheduler
from pyscone.protect.netpolicy import ConnectRule, ListenRule, NetPolicy, NetPolicyError

#: Plaintext a non-blocking client may write before its handshake has finished.
EARLY_LIMIT = 256 * 1024
_READ = 65536


class IO(Protocol):
    """The host socket under a connection, with its caller's blocking mode."""

    blocking: bool

    def send(self, data: bytes) -> int: ...  # raises BlockingIOError, TimeoutError, OSError

    def recv(self, n: int) -> bytes: ...

    def shutdown(self) -> None: ...  # best effort, never raises


class HostIO:
    """The host socket ``h`` under a connection, as one caller waits on it: ``timeout`` None
    (blocking), 0 (non-blocking: ``EAGAIN`` at once) or seconds (``TimeoutError``)."""

    __slots__ = ("blocking", "h", "timeout")

    def __init__(self, h: int, timeout: float | None) -> None:
        self.h = h
        self.timeout = timeout
        self.blocking = timeout != 0.0

    def _call(self, op: int, args: tuple[int, ...], data: bytes = b"") -> tuple[int, Any]:
        t = self.timeout
        result, err, value = scheduler.get().host_call(op, args, data, wait=t != 0.0, timeout=t if t else None)
        if result < 0:
            if err == errno.ETIMEDOUT:
                raise TimeoutError("timed out")
            raise OSError(err, os.strerror(err))
        return result, value

    def send(self, data: bytes) -> int:
        return self._call(Op.SEND, (self.h, 0), data)[0]

    def recv(self, n: int) -> bytes:
        return bytes(self._call(Op.RECV, (self.h, n, 0))[1])

    def shutdown(self) -> None:
        scheduler.get().post(Op.SHUTDOWN, (self.h, socket.SHUT_RDWR))


def conn(h: int) -> Conn | None:
    """The shielded connection on host socket ``h``, if there is one."""
    return None if _shield is None else _shield.conns.get(h)


def log(message: str) -> None:
    try:
        sys.stderr.write(f"pyscone: network shield: {message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed console must not hide the app's error
        pass


class Conn:
    """One shielded TCP or Unix connection: its TLS engine and what it holds."""

    def __init__(self, ctx: ssl.SSLContext, server_side: bool, name: str | None, where: str) -> None:
        self.inc = ssl.MemoryBIO()
        self.outb = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.outb, server_side=server_side, server_hostname=name)
        self.server_side = server_side
        self.where = where  # for the log: "peer -> port 8443" or "TLS to db:5432"
        self.out = bytearray()  # records not yet taken by the host
        # A TLS 1.3 server's session tickets: nobody waits for them, so they leave with the
        # app's first send (or close) instead of in a host call of their own.
        self.later = bytearray()
        self.plain = bytearray()  # opened, not yet given to the app
        self.early = bytearray()  # written before the handshake ended (non-blocking client)
        self.ready = False
        self.eof = False  # the peer closed (close_notify, or TCP EOF after the handshake)
        self.error: OSError | None = None
        self.shut = False  # the host socket was shut down after an error
        self.closing = False  # close_notify sent
        self.received = 0  # bytes of ciphertext the peer sent
        self.broken: OSError | None = None  # the host socket refused our records (the peer went away)
        if not server_side:
            self._step()  # the ClientHello, sent when the socket can send

    # -- the engine, no I/O ---------------------------------------------------------------------

    def _step(self) -> None:
        """Run the engine on what came in: the handshake, then records into ``plain``."""
        if self.error is not None:
            return
        try:
            if not self.ready:
                self.obj.do_handshake()
                self.ready = True
                if self.server_side and self.outb.pending and self.obj.version() == "TLSv1.3":
                    self.later += self.outb.read()
                if self.early:
                    self.obj.write(bytes(self.early))
                    self.early.clear()
            while not self.eof:
                chunk = self.obj.read(_READ)
                if not chunk:
                    self.eof = True
                self.plain += chunk
                if not self.inc.pending and not self.obj.pending():
                    break  # nothing more to open: spare the read that would raise SSLWantReadError
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.eof = True
        except ssl.SSLEOFError:
            if self.ready or not self.received:
                # A peer that closed without close_notify (most HTTP clients), or before it sent
                # anything (a TCP health check): the app sees the end, as natively.
                self.eof = True
            else:
                self._fail("the peer closed the connection during the handshake")
        except ssl.SSLError as e:
            self._fail(_reason(e))
        finally:
            if self.outb.pending:
                self._take_later()  # records leave in the order they were made
                self.out += self.outb.read()

    def _fail(self, reason: str) -> None:
        if self.server_side:
            log(f"{self.where}: TLS handshake failed: {reason}" if not self.ready else f"{self.where}: {reason}")
            self.error = ConnectionResetError(errno.ECONNRESET, f"network shield: {reason}")
        else:
            log(f"TLS to {self.where} failed: {reason}")
            self.error = OSError(errno.ECONNABORTED, f"network shield: TLS to {self.where} failed: {reason}")

    def readable(self) -> bool:
        """Whether a ``recv`` would answer without the host: plaintext, the end, or an error."""
        return bool(self.plain) or self.eof or self.error is not None

    # -- I/O through the host -------------------------------------------------------------------

    def flush(self, io: IO) -> None:
        """Send the records the host has not taken (raises BlockingIOError if it takes not all)."""
        while self.out:
            n = io.send(bytes(self.out[:_READ]))
            del self.out[:n]

    def fill(self, io: IO) -> None:
        """One read of ciphertext from the host, opened (raises BlockingIOError if none)."""
        data = io.recv(_READ)
        if data:
            self.received += len(data)
            self.inc.write(data)
        else:
            self.inc.write_eof()
        self._step()

    def _raise(self, io: IO) -> None:
        assert self.error is not None
        if not self.shut:
            self.shut = True
            try:
                self.flush(io)  # the alert, so that the peer learns why
            except OSError:
                pass
            io.shutdown()
        raise self.error

    def handshake(self, io: IO) -> None:
        """Shake hands now (a blocking client's ``connect``)."""
        while True:
            self._step()
            if self.error is not None:
                self._raise(io)
            self.flush(io)
            if self.ready:
                return
            self.fill(io)

    def recv(self, io: IO, n: int, peek: bool = False) -> bytes:
        while True:
            if self.plain:
                data = bytes(self.plain[:n])
                if not peek:
                    del self.plain[:n]
                return data
            if self.error is not None:
                self._raise(io)
            if self.eof or n == 0:
                return b""
            if self.out and not self._flush_for_reading(io) and io.blocking:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))  # (a timeout says so itself)
            self.fill(io)
            if self.out:
                self._flush_for_reading(io)  # sent when the host can take it (poll flushes it)

    def _flush_for_reading(self, io: IO) -> bool:
        """Send what waits (a handshake message, a session ticket) on the way to a read.

        Returns False if the host took not all of it.  A peer that has gone (``EPIPE``,
        ``ECONNRESET``) cannot take it any more: it is dropped, the reader goes on to the bytes
        and the end the peer sent, and the next ``send`` reports the error.
        """
        try:
            self.flush(io)
        except BlockingIOError:
            return False
        except TimeoutError:
            raise
        except OSError as e:
            self.out.clear()
            self.broken = e
        return True

    def send(self, io: IO, data: bytes) -> int:
        if self.error is not None:
            self._raise(io)
        if self.broken is not None:
            raise self.broken
        if self.closing:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        self.flush(io)  # non-blocking: EAGAIN while earlier records wait
        if not self.ready:
            if io.blocking:
                self.handshake(io)
            else:
                if len(self.early) + len(data) > EARLY_LIMIT:
                    raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
                self.early += data
                return len(data)
        try:
            self.obj.write(data)
        except ssl.SSLError as e:
            self._fail(_reason(e))
            self._raise(io)
        self._take_later()
        self.out += self.outb.read()
        try:
            self.flush(io)
        except BlockingIOError:
            if io.blocking:
                raise
        return len(data)

    def _take_later(self) -> None:
        if self.later:
            self.out += self.later
            self.later.clear()

    def close_notify(self, io: IO) -> None:
        """Say goodbye (``shutdown(SHUT_WR)``, or a close): the peer then sees a clean end."""
        if self.closing or not self.ready or self.error is not None:
            return
        self.closing = True
        try:
            self.obj.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: ours is written, the peer's is not awaited
        self._take_later()
        self.out += self.outb.read()
        try:
            self.flush(io)
        except OSError:
            pass


#: OpenSSL's reasons that need a word more for whoever reads the log.
_REASONS = {
    "HTTP_REQUEST": "the peer sent a plaintext HTTP request, not TLS",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (wrong version number)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client presented no certificate (the policy requires one)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
}


def _reason(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {e.verify_message}"
    reason = str(e.reason or "")
    return _REASONS.get(reason) or reason.lower().replace("_", " ") or str(e)


class Shield:
    """The rules, their TLS contexts, and the connections and listeners they apply to."""

    def __init__(self, policy: NetPolicy, use_chain_and_key: Callable[[ssl.SSLContext, bytes, bytes], None]) -> None:
        self.policy = policy
        self.servers: dict[ListenRule, ssl.SSLContext] = {}
        self.clients: dict[ConnectRule, ssl.SSLContext] = {}
        for rule in policy.listen:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            with _loading(f"listen {rule.where}"):
                use_chain_and_key(ctx, rule.cert.encode(), rule.key.encode())
                if rule.client_ca:
                    ctx.load_verify_locations(cadata=rule.client_ca)
                    ctx.verify_mode = ssl.CERT_REQUIRED
            self.servers[rule] = ctx
        for crule in policy.connect:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            with _loading(f"connect {crule.where}"):
                ctx.load_verify_locations(cadata=crule.ca)
                if crule.cert is not None and crule.key is not None:
                    use_chain_and_key(ctx, crule.cert.encode(), crule.key.encode())
            self.clients[crule] = ctx
        self.listening: dict[int, ListenRule] = {}  # host handle -> its rule
        self.conns: dict[int, Conn] = {}
        self.exempt: set[int] = set()
        self.names: dict[str, set[str]] = {}  # IP -> the names of rules the app resolved to it
        self._said: set[str] = set()

    def once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log(message)

    def forget(self, h: int) -> None:
        self.listening.pop(h, None)
        self.conns.pop(h, None)
        self.exempt.discard(h)

    # -- set-up checks ----------------------------------------------------------------------------

    def _refuse(self, what: str) -> PermissionError:
        log(f"refused {what} (not in the policy)")
        return PermissionError(errno.EACCES, f"network shield: {what} is not allowed by the policy")

    def _unlisted(self, what: str) -> None:
        if self.policy.unlisted == "refuse":
            raise self._refuse(what)
        self.once(f"plaintext: {what} (not in the policy)")

    def _udp(self, what: str) -> None:
        if self.policy.udp == "refuse":
            raise self._refuse(what)

    @staticmethod
    def _unix_path(address: object) -> str | None:
        """A Unix socket address as text ('' unnamed, a leading NUL for the abstract namespace)."""
        if isinstance(address, bytes | bytearray):
            return os.fsdecode(bytes(address))
        return address if isinstance(address, str) else None

    def check_bind(self, h: int, family: int, kind: int, address: object) -> None:
        """Record a listening rule for the socket, or refuse the bind (EACCES)."""
        if h in self.exempt:
            return
        inet = family in (socket.AF_INET, socket.AF_INET6)
        rule: ListenRule | None = None
        if inet and kind == socket.SOCK_DGRAM:
            self._udp("a UDP bind")
            return
        if inet and kind == socket.SOCK_STREAM and isinstance(address, tuple):
            port = int(address[1])
            if port == 0:
                return  # an ephemeral port: a client's, never a listed server's
            rule, what = self.policy.listen_rule(port=port), f"listening on port {port}"
        elif family == socket.AF_UNIX and (path := self._unix_path(address)):
            if kind == socket.SOCK_STREAM and not path.startswith("\0"):
                rule = self.policy.listen_rule(path=os.path.normpath(path))
            what = f"listening on the Unix socket {path!r}"
        else:
            return
        if rule is not None:
            self.listening[h] = rule
        else:
            self._unlisted(what)

    def check_datagram(self, h: int, family: int, kind: int, address: object = None) -> None:
        """``sendto`` on a socket that is not a shielded connection."""
        if h in self.exempt or kind != socket.SOCK_DGRAM:
            return
        if family in (socket.AF_INET, socket.AF_INET6):
            self._udp("UDP traffic")
        elif family == socket.AF_UNIX and (path := self._unix_path(address)):
            self._unlisted(f"a datagram to the Unix socket {path!r}")  # no TLS for datagrams

    def connect_rule(self, h: int, family: int, kind: int, address: object) -> ConnectRule | None:
        """The rule for a destination, or None for plaintext; EACCES if the policy refuses it."""
        if h in self.exempt:
            return None
        if family in (socket.AF_INET, socket.AF_INET6):
            if kind == socket.SOCK_DGRAM:
                self._udp("UDP traffic")
                return None
            if kind != socket.SOCK_STREAM or not isinstance(address, tuple):
                return None
            ip, port = _ip(str(address[0])), int(address[1])
            names = self.names.get(ip, set())
            for rule in self.policy.connect:
                if rule.port == port and (rule.host == ip or rule.host in names):
                    return rule
            what = f"a connection to {ip}:{port}" if ":" not in ip else f"a connection to [{ip}]:{port}"
        elif family == socket.AF_UNIX and (path := self._unix_path(address)):
            if kind == socket.SOCK_STREAM and not path.startswith("\0"):
                for rule in self.policy.connect:
                    if rule.path == os.path.normpath(path):
                        return rule
            what = f"a connection to the Unix socket {path!r}"
        else:
            return None
        self._unlisted(what)
        return None

    def note_resolved(self, host: str, addresses: list[str]) -> None:
        """The app resolved ``host``: its addresses now match the rules that name it."""
        name = host.lower().rstrip(".")
        if any(rule.host == name for rule in self.policy.connect):
            for a in addresses:
                self.names.setdefault(_ip(a), set()).add(name)

    def client(self, h: int, rule: ConnectRule) -> Conn:
        conn = Conn(self.clients[rule], False, rule.server_name, rule.where)
        self.conns[h] = conn
        return conn

    def accepted(self, listener: int, h: int, peer: object) -> None:
        rule = self.listening.get(listener)
        if rule is not None:
            self.conns[h] = Conn(self.servers[rule], True, None, f"{_peer(peer)} -> {rule.where}")


@contextlib.contextmanager
def _loading(where: str) -> Iterator[None]:
    try:
        yield
    except (ssl.SSLError, ValueError, OSError) as e:
        raise NetPolicyError(f"{where}: a certificate, key or CA does not load: {e}") from None


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return text.lower()


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return str(peer) or "a client"


# -- readiness ------------------------------------------------------------------------------------


def poll(
    shield: Shield,
    fds: list[tuple[int, int]],
    timeout: float | None,
    host_poll: Callable[[list[tuple[int, int]], float | None], list[tuple[int, int]]],
    io_for: Callable[[int], IO],
    clock: Callable[[], float],
) -> list[tuple[int, int]]:
    """``poll`` over host handles, some of them shielded (see the module's docstring)."""
    deadline = None if timeout is None else clock() + timeout
    wanted = dict(fds)
    while True:
        ready: dict[int, int] = {}
        asked: list[tuple[int, int]] = []
        for h, ev in fds:
            conn = shield.conns.get(h)
            if conn is None:
                asked.append((h, ev))
                continue
            if conn.out and conn.error is None:
                try:
                    conn.flush(io_for(h))
                except OSError:
                    pass  # the host may take them later; a broken socket says so below
            if ev & abi.POLLIN and conn.readable():
                ready[h] = abi.POLLIN
            host_ev = ev & ~abi.POLLIN
            if not conn.readable() and (ev & abi.POLLIN or not conn.ready):
                host_ev |= abi.POLLIN  # ciphertext to open before the app can be told anything
            if conn.out:
                host_ev |= abi.POLLOUT
            asked.append((h, host_ev))
        left = None if deadline is None else max(0.0, deadline - clock())
        answered = host_poll(asked, 0.0 if ready else left)
        for h, rev in answered:
            conn = shield.conns.get(h)
            if conn is None:
                ready[h] = ready.get(h, 0) | rev
                continue
            io = io_for(h)
            if rev & (abi.POLLIN | abi.POLLHUP | abi.POLLERR) and not conn.readable():
                try:
                    conn.fill(io)
                except BlockingIOError:
                    pass
                except OSError as e:  # a reset: the app's recv will say it
                    conn.error = conn.error or e
            if conn.out and rev & abi.POLLOUT and not rev & (abi.POLLERR | abi.POLLHUP):
                try:
                    conn.flush(io)
                except OSError:
                    pass
            ev = wanted.get(h, 0)
            app = 0
            if ev & abi.POLLIN and conn.readable():
                app |= abi.POLLIN
            if ev & abi.POLLOUT and rev & abi.POLLOUT and not conn.out:
                app |= abi.POLLOUT
            app |= rev & (abi.POLLERR | abi.POLLHUP | abi.POLLNVAL | (ev & abi.POLLPRI))
            if app & abi.POLLHUP and not conn.readable() and not app & abi.POLLERR:
                app &= ~abi.POLLHUP  # HUP with records still to open: said once they are opened
            if app:
                ready[h] = ready.get(h, 0) | app
        if ready or (deadline is not None and clock() >= deadline):
            return list(ready.items())


_shield: Shield | None = None


def install(spec: object, use_chain_and_key: Callable[[ssl.SSLContext, bytes, bytes], None]) -> Shield:
    """Turn the shield on with the rules ``spec`` (a mapping; see ``protect.netpolicy``).

    Raises:
        NetPolicyError: the rules are not valid, or a certificate, key or CA does not load.
    """
    from pyscone.protect import netpolicy

    global _shield
    _shield = Shield(netpolicy.parse(spec), use_chain_and_key)
    iago.fds.forget_hooks.append(_shield.forget)  # a closed socket's state goes with it
    return _shield


def shield() -> Shield | None:
    return _shield
