"""The network shield's rules: what a service listens on and connects to, and how (sans-IO).

One parser for both sources of rules -- a session policy's ``network:`` mapping (the CAS
validates it when the owner uploads the policy, the enclave again when it receives it) and
the dev-mode ``--net-shield`` file (read on the host) -- so they cannot drift::

    listen:                       # the app's listening ports become TLS servers
      - port: 8443                # or  path: /run/app.sock  (a Unix socket)
        cert: <PEM chain>         # the server's identity
        key: <PEM key>
        client_ca: <PEM>          # optional: clients must present a certificate it signed
    connect:                      # the app's destinations become TLS clients
      - to: db.internal:5432      # host:port (an IP or a name), or an absolute Unix path
        ca: <PEM>                 # the CA that must have signed the server's certificate
        server_name: db.internal  # checked in the server's certificate (default: the host of 'to')
        cert: <PEM>               # optional: the client's identity (with key)
        key: <PEM>
    unlisted: refuse              # refuse (EACCES, the default) | allow (plaintext, logged)
    udp: refuse                   # refuse (the default) | allow

The PEM values are strings here; whether they parse as certificates and keys is checked
where they are used (the enclave, after the CAS has put the secrets in).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

MAX_RULES = 256
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")


class NetPolicyError(ValueError):
    """The rules are not valid: the message names the rule and the reason."""


@dataclass(frozen=True)
class ListenRule:
    port: int | None  # a TCP port, or None for a Unix socket
    path: str | None  # a Unix socket path
    cert: str
    key: str
    client_ca: str | None

    @property
    def where(self) -> str:
        return f"port {self.port}" if self.port is not None else str(self.path)


@dataclass(frozen=True)
class ConnectRule:
    host: str | None  # an IP literal or a name, lower case; None for a Unix path
    port: int | None
    path: str | None
    ca: str
    server_name: str
    cert: str | None
    key: str | None

    @property
    def where(self) -> str:
        if self.path is not None:
            return self.path
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NetPolicy:
    listen: tuple[ListenRule, ...]
    connect: tuple[ConnectRule, ...]
    unlisted: str  # "refuse" | "allow"
    udp: str  # "refuse" | "allow"

    def listen_rule(self, port: int | None = None, path: str | None = None) -> ListenRule | None:
        for rule in self.listen:
            if (port is not None and rule.port == port) or (path is not None and rule.path == path):
                return rule
        return None


_PEM_KEYS = ("cert", "key", "client_ca", "ca")


def parse(spec: Any) -> NetPolicy:
    """Validate ``spec`` (a mapping as YAML or JSON gives it) and return the rules.

    Raises:
        NetPolicyError: anything wrong, with where (``listen[0].port: ...``).
    """
    m = _mapping(spec, "network", {"listen", "connect", "unlisted", "udp"})
    listen = tuple(_listen(r, f"listen[{i}]") for i, r in enumerate(_list(m.get("listen", []), "listen")))
    connect = tuple(_connect(r, f"connect[{i}]") for i, r in enumerate(_list(m.get("connect", []), "connect")))
    seen: set[object] = set()
    for rule in listen:
        if rule.where in seen:
            raise NetPolicyError(f"listen: {rule.where} is listed twice")
        seen.add(rule.where)
    return NetPolicy(
        listen, connect, _choice(m, "unlisted", ("refuse", "allow")), _choice(m, "udp", ("refuse", "allow"))
    )


def _mapping(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise NetPolicyError(f"{where}: expected a mapping")
    for key in value:
        if key not in allowed:
            raise NetPolicyError(f"{where}: unknown key {key!r} (expected one of: {', '.join(sorted(allowed))})")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise NetPolicyError(f"{where}: expected a list")
    if len(value) > MAX_RULES:
        raise NetPolicyError(f"{where}: more than {MAX_RULES} rules")
    return value


def _choice(m: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = m.get(key, choices[0])
    if value not in choices:
        raise NetPolicyError(f"{key}: expected {' or '.join(choices)}")
    return str(value)


def _text(m: dict[str, Any], key: str, where: str, required: bool = True) -> str | None:
    if key not in m or m[key] is None:
        if required:
            raise NetPolicyError(f"{where}: missing {key!r}")
        return None
    value = m[key]
    if not isinstance(value, str) or not value.strip():
        raise NetPolicyError(f"{where}.{key}: expected {'PEM text' if key in _PEM_KEYS else 'a string'}")
    return value


def _port(value: Any, where: str) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        raise NetPolicyError(f"{where}: expected a port from 1 to 65535")
    return value


def _unix_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or len(value) > 107:
        raise NetPolicyError(f"{where}: expected an absolute Unix socket path (at most 107 bytes)")
    return value


def _listen(spec: Any, where: str) -> ListenRule:
    m = _mapping(spec, where, {"port", "path", "cert", "key", "client_ca"})
    if ("port" in m) == ("path" in m):
        raise NetPolicyError(f"{where}: give either 'port' or 'path'")
    port = _port(m["port"], f"{where}.port") if "port" in m else None
    path = _unix_path(m["path"], f"{where}.path") if "path" in m else None
    cert, key = _text(m, "cert", where), _text(m, "key", where)
    assert cert is not None and key is not None
    return ListenRule(port, path, cert, key, _text(m, "client_ca", where, required=False))


def _connect(spec: Any, where: str) -> ConnectRule:
    m = _mapping(spec, where, {"to", "ca", "server_name", "cert", "key"})
    to = m.get("to")
    if not isinstance(to, str) or not to:
        raise NetPolicyError(f"{where}: missing 'to' (host:port or a Unix socket path)")
    host: str | None = None
    port: int | None = None
    path: str | None = None
    if to.startswith("/"):
        path = _unix_path(to, f"{where}.to")
    else:
        host, port = _host_port(to, f"{where}.to")
    ca = _text(m, "ca", where)
    assert ca is not None
    cert, key = _text(m, "cert", where, required=False), _text(m, "key", where, required=False)
    if (cert is None) != (key is None):
        raise NetPolicyError(f"{where}: a client identity needs both 'cert' and 'key'")
    name = _text(m, "server_name", where, required=False)
    if name is None:
        if host is None:
            raise NetPolicyError(f"{where}: a Unix socket destination needs 'server_name'")
        name = host
    return ConnectRule(host, port, path, ca, name, cert, key)


def _host_port(text: str, where: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise NetPolicyError(f"{where}: expected [IPv6]:port")
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit():
        raise NetPolicyError(f"{where}: expected host:port")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOST.match(host):
            raise NetPolicyError(f"{where}: {host!r} is not an IP address or a host name") from None
        host = host.lower().rstrip(".")
    return host, _port(int(port_text), where)
