"""``multiprocessing.connection`` over Unix socket paths, sealed between the enclaves of a family.

Theory of operation
-------------------
A ``Manager`` (its server process and every proxy), and any ``Listener``/``Client``
of the default family ``'AF_UNIX'``, talk over a host Unix socket at a path: the
host relays every pickle, and any local process may connect.  So right after
``SocketListener.accept`` and ``SocketClient``'s ``connect`` (before
``multiprocessing``'s own authkey challenge, which then runs sealed), both ends run
the family hello (``protect/famhello.py``) on the host stream: each proves it holds
the family key, and they agree on a channel id that no other connection has.  The
stream then becomes a sealed end of ``shields/famchan.py``, as a socketpair that
crossed a fork is (the client writes direction 0, the server 1), so ``os.read``/
``os.write`` (``Connection``'s), socket ``send``/``recv`` and the waits of
``multiprocessing.connection.wait`` see plaintext, and the host only ever relays
records it can neither read, forge, replay into another connection nor reorder.
A record that does not open stops the enclave, as on every family channel.

Who gets what when the hello fails:

* the listening side refuses the connection: it closes it, logs one line to
  stderr and goes on accepting (the app's ``accept`` never returns a peer outside
  the family, and a ``Manager`` keeps serving its family);
* the connecting side closes it, logs one line, and ``Client`` raises
  ``multiprocessing.AuthenticationError`` (what a peer that fails the authkey
  challenge gives natively).

Waiting: the peer's part of the hello is waited for at most the app's default socket
timeout (``socket.setdefaulttimeout``), if it set one, else :data:`ACCEPT_TIMEOUT`
on the listening side (a peer that never speaks holds the accepting thread that
long, then is refused) and :data:`CONNECT_TIMEOUT` on the connecting side (which
waits for the listener's app to come to ``accept``).  A peer that does not speak
the hello at all (a native ``multiprocessing`` client, which sends a pickle) is
refused at its first bytes.  So ``Client`` returns once the listener accepted it,
as it does natively with an authkey, and an app that connects and only then
accepts *in the same thread* waits for the timeout and fails.

Not changed: ``'AF_INET'`` connections (the network shield's rules apply to them),
and a Unix connection the network shield wraps in TLS (a path its policy lists):
the policy, not the family, says who the peer is.  A forked child inherits a sealed
connection as it inherits a sealed socketpair; a spawned child given one gets its
channel from its parent (``stdlib/spawn.py``).

``multiprocessing.connection`` is patched when the app imports it (a finder that
only watches for it), not at boot: most apps never import it, and importing it costs
every enclave's start tens of milliseconds.
"""

from __future__ import annotations

import importlib.abc
import socket
import sys
import time
from typing import Any

from pyscone.enclave import family
from pyscone.enclave.shields import famchan, net
from pyscone.enclave.stdlib import dups, interpose
from pyscone.protect import famhello

#: How long the listening side waits for each message of a peer's hello (seconds).
ACCEPT_TIMEOUT = 10.0
#: How long the connecting side waits for the listener's answer (its app may be slow to accept).
CONNECT_TIMEOUT = 60.0
_MODULE = "multiprocessing.connection"
#: Direction each side writes on the sealed channel.
CLIENT_OUT, SERVER_OUT = 0, 1

_mpc: Any = None  # the module, once patched
_real_socket_client: Any = None
_real_accept: Any = None


def log(message: str) -> None:
    try:
        sys.stderr.write(f"pyscone: family connections: {message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed console must not hide the app's error
        pass


def _timeout(default: float) -> float:
    t = socket.getdefaulttimeout()
    return t if t else default


def _where(address: object) -> str:
    if isinstance(address, bytes | bytearray):
        address = bytes(address).decode("utf-8", "backslashreplace")
    return repr(address) if address else "an unnamed Unix socket"


def _recv_message(sock: Any, kind: int, deadline: float, timeout: float) -> bytes:
    """One whole hello message of ``kind`` from ``sock``, never a byte of what follows it, by ``deadline``."""
    need = famhello.SIZES[kind]
    buf = bytearray()
    while len(buf) < need:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(need - len(buf))
        except TimeoutError:
            raise famhello.HelloError(f"the peer sent no family hello within {timeout:g} s") from None
        except OSError as e:
            raise famhello.HelloError(f"the connection failed during the family hello: {e.strerror or e}") from None
        if not chunk:
            raise famhello.HelloError("the peer closed the connection during the family hello")
        buf += chunk
        famhello.check_prefix(kind, buf)
    return bytes(buf)


def _send_message(sock: Any, msg: bytes) -> None:
    """(Two small messages into an empty socket buffer: a send that waits is the host's doing.)"""
    try:
        sock.sendall(msg)
    except OSError as e:
        raise famhello.HelloError(f"the connection failed during the family hello: {e.strerror or e}") from None


def _handle(sock: Any) -> int | None:
    """The host socket under ``sock``, or ``None`` if the network shield owns it (TLS)."""
    h = dups.resolve(sock.fileno())
    return None if net.conn(h) is not None else h


def server_hello(sock: Any) -> None:
    """The listening side's hello on a just-accepted ``sock``; it is a sealed end afterwards.

    Raises:
        famhello.HelloError: the peer is not a member of this family (or the host lied).
    """
    h = _handle(sock)
    if h is None:
        return
    timeout = _timeout(ACCEPT_TIMEOUT)
    deadline = time.monotonic() + timeout
    side = famhello.Server(family.key)
    answer = side.hello(_recv_message(sock, famhello.HELLO, deadline, timeout))
    _send_message(sock, answer)
    side.confirm(_recv_message(sock, famhello.CONFIRM, deadline, timeout))
    famchan.adopt_sealed(h, side.channel_id, SERVER_OUT)


def client_hello(sock: Any) -> None:
    """The connecting side's hello on a just-connected ``sock``; it is a sealed end afterwards.

    Raises:
        famhello.HelloError: the listener is not a member of this family (or the host lied).
    """
    h = _handle(sock)
    if h is None:
        return
    timeout = _timeout(CONNECT_TIMEOUT)
    deadline = time.monotonic() + timeout
    side = famhello.Client(family.key)
    sock.settimeout(timeout)
    _send_message(sock, side.hello())
    confirm = side.answer(_recv_message(sock, famhello.ANSWER, deadline, timeout))
    _send_message(sock, confirm)
    famchan.adopt_sealed(h, side.channel_id, CLIENT_OUT)


def _accept(self: Any) -> Any:
    """``SocketListener.accept``: a family member's connection, sealed; others are refused."""
    if self._family != "AF_UNIX":
        return _real_accept(self)
    while True:
        s, self._last_accepted = self._socket.accept()
        try:
            server_hello(s)
        except famhello.HelloError as e:
            log(f"refused a connection to {_where(self._address)}: {e}")
            s.close()
            continue
        except BaseException:
            s.close()
            raise
        s.setblocking(True)
        return _mpc.Connection(s.detach())


def _socket_client(address: Any) -> Any:
    """``SocketClient``: a connection to a family member's listener, sealed."""
    if _mpc.address_type(address) != "AF_UNIX":
        return _real_socket_client(address)
    from multiprocessing import AuthenticationError

    with socket.socket(socket.AF_UNIX) as s:
        s.setblocking(True)
        s.connect(address)
        try:
            client_hello(s)
        except famhello.HelloError as e:
            log(f"refused the listener at {_where(address)}: {e}")
            raise AuthenticationError(f"the listener at {_where(address)} failed the family hello: {e}") from None
        s.setblocking(True)
        return _mpc.Connection(s.detach())


def patch(module: Any) -> None:
    """Seal ``module`` (``multiprocessing.connection``) from now on (again after a reload)."""
    global _mpc, _real_socket_client, _real_accept
    listener = module.SocketListener
    if module.SocketClient is _socket_client and listener.accept is _accept:
        return
    _mpc = module
    if module.SocketClient is not _socket_client:
        _real_socket_client = module.SocketClient
    if listener.accept is not _accept:
        _real_accept = listener.accept
    interpose(listener, accept=_accept)
    interpose(module, SocketClient=_socket_client)


class _PatchingLoader(importlib.abc.Loader):
    """The loader that found ``multiprocessing.connection``, patching it once it has run."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... (tracebacks, runpy)
        return getattr(self._inner, name)

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        patch(module)


class _Watch(importlib.abc.MetaPathFinder):
    """A finder that finds nothing of its own: it asks the others for ``multiprocessing.connection``
    and wraps their loader in :class:`_PatchingLoader`."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _MODULE or self._busy:
            return None
        self._busy = True  # (the others include this one, perhaps wrapped: boot._AdoptedFinder)
        try:
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                spec = find(fullname, path, target) if find is not None else None
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy = False
        if spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Seal ``multiprocessing.connection``'s Unix connections, now if it is imported, else on import."""
    module = sys.modules.get(_MODULE)
    if module is not None:
        patch(module)
    sys.meta_path.insert(0, _Watch())


__all__ = ["ACCEPT_TIMEOUT", "CONNECT_TIMEOUT", "client_hello", "install", "patch", "server_hello"]
