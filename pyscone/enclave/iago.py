"""Iago checks: every answer from the host is validated here, once, per opcode.

The host may return anything from any system call (Checkoway & Shacham's Iago
attacks).  Every reply passes through :func:`validate` before any code in the
enclave looks at it: the payload has already been copied out of shared memory
exactly once, and the validator decodes it into a typed value.  A reply that
breaks a rule (a read longer than asked, an fd that is already open, a stat with
an impossible mode, a directory entry containing ``/``, a poll event for an fd
that was not asked about, ...) is a :class:`HostViolation`, and the enclave stops
at once (:func:`fail_stop`): corrupted data never reaches the app.

Errors the *app* causes (a bad fd, a closed socket) are ordinary ``OSError``s
raised before any host call; see ``FdTable``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import NoReturn

from pyscone import abi
from pyscone.abi import Op

EXIT_HOST_VIOLATION = 86
"""The enclave's exit status after a host violation (``pyscone run`` reports it)."""


class HostViolation(Exception):
    """The untrusted host broke the system-call contract."""


_fatal_sinks: list[Callable[[str], None]] = []


def on_fatal(sink: Callable[[str], None]) -> None:
    """Register where the reason for a fail-stop is written (the shared header)."""
    _fatal_sinks.append(sink)


def fail_stop(reason: str) -> NoReturn:
    """Stop the enclave now.  Nothing after this runs: no app code, no atexit, no flush."""
    message = f"host violation: {reason}"
    for sink in _fatal_sinks:
        try:
            sink(message)
        except Exception:  # noqa: BLE001 - we are stopping regardless
            pass
    os._exit(EXIT_HOST_VIOLATION)


class FdTable:
    """The host file descriptors the enclave knows, and what they are.

    A new fd from the host must not already be open here (no aliasing); an fd
    the app names must be one we handed out (else EBADF, without a host call).
    """

    FILE, SOCKET, CONSOLE = "file", "socket", "console"

    def __init__(self) -> None:
        self.kinds: dict[int, str] = {0: self.CONSOLE, 1: self.CONSOLE, 2: self.CONSOLE}
        self.families: dict[int, int] = {}

    def adopt(self, fd: int, kind: str, family: int = 0) -> None:
        if not 0 <= fd < abi.MAX_FD:
            raise HostViolation(f"host returned fd {fd}, outside 0..{abi.MAX_FD}")
        if fd in self.kinds:
            raise HostViolation(f"host returned fd {fd}, which is already open in the enclave")
        self.kinds[fd] = kind
        if family:
            self.families[fd] = family

    def kind(self, fd: int) -> str:
        try:
            return self.kinds[fd]
        except KeyError:
            raise OSError(9, os.strerror(9)) from None

    def forget(self, fd: int) -> None:
        self.kinds.pop(fd, None)
        self.families.pop(fd, None)


fds = FdTable()

#: A request's payload as the caller passed it (validators only measure or unpack it).
Req = bytes | bytearray | memoryview
Validator = Callable[[tuple[int, ...], Req, int, bytes], object]


def _none(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0 or data:
        raise HostViolation(f"expected an empty success, got result {result} with {len(data)} bytes")
    return None


def _bytes_upto(limit_arg: int) -> Validator:
    def check(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
        if result != len(data) or result > args[limit_arg]:
            raise HostViolation(f"host returned {len(data)} bytes (result {result}) for a request of {args[limit_arg]}")
        return data

    return check


def _count_upto_request(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if not 0 <= result <= len(req) or data:
        raise HostViolation(f"host claims {result} bytes written of {len(req)}")
    return result


def _sendto(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    (alen,) = struct.unpack_from("<I", req, 0)
    if not 0 <= result <= len(req) - 4 - alen or data:
        raise HostViolation(f"host claims {result} bytes sent of {len(req) - 4 - alen}")
    return result


def _nonneg(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result < 0 or data:
        raise HostViolation(f"host returned an impossible result {result}")
    return result


def _bool(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result not in (0, 1) or data:
        raise HostViolation(f"host returned {result} where 0 or 1 was expected")
    return bool(result)


def _stat(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0:
        raise HostViolation("stat result is not 0")
    return abi.StatResult.unpack(data)


def _dirents(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    entries, more = abi.decode_dirents(data)
    if result != len(entries):
        raise HostViolation("directory count does not match its entries")
    return entries, more


def _new_fd(kind: str) -> Validator:
    def check(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
        if data:
            raise HostViolation("unexpected payload with a new fd")
        fds.adopt(result, kind, args[0] if kind == FdTable.SOCKET else 0)
        return result

    return check


def _socketpair(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if len(data) != 4:
        raise HostViolation("socketpair payload is not one fd")
    (second,) = struct.unpack("<i", data)
    fds.adopt(result, FdTable.SOCKET, args[0])
    fds.adopt(second, FdTable.SOCKET, args[0])
    return result, second


def _accept(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    family = fds.families.get(args[0], 0)
    if len(data) < 4:
        raise HostViolation("accept payload too short")
    (plen,) = struct.unpack_from("<I", data, 0)
    if 4 + plen > len(data):
        raise HostViolation("accept peer address runs past the payload")
    peer = abi.decode_sockaddr(family, data[4 : 4 + plen])
    local = abi.decode_sockaddr(family, data[4 + plen :])
    fds.adopt(result, FdTable.SOCKET, family)
    return result, peer, local


def _sockaddr(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0:
        raise HostViolation("address query result is not 0")
    return abi.decode_sockaddr(fds.families.get(args[0], 0), data)


def _recvfrom(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if len(data) < 4:
        raise HostViolation("recvfrom payload too short")
    (alen,) = struct.unpack_from("<I", data, 0)
    if 4 + alen > len(data):
        raise HostViolation("recvfrom address runs past the payload")
    payload = data[4 + alen :]
    if result != len(payload) or result > args[1]:
        raise HostViolation(f"host returned {len(payload)} bytes for a recvfrom of {args[1]}")
    addr = abi.decode_sockaddr(fds.families.get(args[0], 0), data[4 : 4 + alen]) if alen else None
    return payload, addr


def _getsockopt(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if args[3]:
        if len(data) > args[3] or result != 0:
            raise HostViolation("getsockopt returned more than the buffer")
        return data
    if data or not -(2**31) <= result < 2**31:
        raise HostViolation("getsockopt integer out of range")
    return result


def _text(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0 or b"\0" in data or len(data) > 4096:
        raise HostViolation("malformed text reply")
    return data


def _poll(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    asked = [abi.POLLFD.unpack_from(req, i * abi.POLLFD.size)[:2] for i in range(args[0])]
    ready = abi.decode_pollfds(asked, data)
    if result != len(ready):
        raise HostViolation("poll count does not match its events")
    return ready


def _addrinfo(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    infos = abi.decode_addrinfo(data)
    if result != len(infos):
        raise HostViolation("address-info count does not match its entries")
    return infos


def _nameinfo(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    host, sep, port = data.partition(b"\0")
    if not sep or b"\0" in port or result != 0:
        raise HostViolation("malformed name-info reply")
    return host.decode("utf-8", "replace"), port.decode("utf-8", "replace")


VALIDATORS: dict[int, Validator] = {
    Op.NOP: _none,
    Op.CANCEL: _none,
    Op.OPEN: _new_fd(FdTable.FILE),
    Op.CLOSE: _none,
    Op.READ: _bytes_upto(1),
    Op.WRITE: _count_upto_request,
    Op.PREAD: _bytes_upto(1),
    Op.PWRITE: _count_upto_request,
    Op.LSEEK: _nonneg,
    Op.FSTAT: _stat,
    Op.STAT: _stat,
    Op.LISTDIR: _dirents,
    Op.MKDIR: _none,
    Op.RMDIR: _none,
    Op.UNLINK: _none,
    Op.RENAME: _none,
    Op.FSYNC: _none,
    Op.FTRUNCATE: _none,
    Op.ACCESS: _bool,
    Op.CHMOD: _none,
    Op.UTIME: _none,
    Op.READLINK: _text,
    Op.SYMLINK: _none,
    Op.ISATTY: _bool,
    Op.SOCKET: _new_fd(FdTable.SOCKET),
    Op.SOCKETPAIR: _socketpair,
    Op.BIND: _none,
    Op.LISTEN: _none,
    Op.ACCEPT: _accept,
    Op.CONNECT: _none,
    Op.SEND: _count_upto_request,
    Op.RECV: _bytes_upto(1),
    Op.SENDTO: _sendto,
    Op.RECVFROM: _recvfrom,
    Op.SHUTDOWN: _none,
    Op.SETSOCKOPT: _none,
    Op.GETSOCKOPT: _getsockopt,
    Op.GETSOCKNAME: _sockaddr,
    Op.GETPEERNAME: _sockaddr,
    Op.GETADDRINFO: _addrinfo,
    Op.GETHOSTNAME: _text,
    Op.GETNAMEINFO: _nameinfo,
    Op.POLL: _poll,
}

#: Opcodes whose failure carries a resolver (gai) error code as text instead of errno.
_GAI_OPS = frozenset({Op.GETADDRINFO, Op.GETNAMEINFO})


def validate(op: int, args: tuple[int, ...], req: Req, result: int, err: int, data: bytes) -> tuple[int, int, object]:
    """Check one reply.  Returns (result, errno, decoded value); fail-stops on a lie."""
    try:
        if result < 0:
            if result != -1:
                raise HostViolation(f"{Op(op).name} returned {result}")
            if op in _GAI_OPS and err == 0:
                if not data.lstrip(b"-").isdigit() or len(data) > 8:
                    raise HostViolation("malformed resolver error")
                return -1, 0, int(data)
            if not 0 < err <= abi.MAX_ERRNO or data:
                raise HostViolation(f"{Op(op).name} failed with errno {err} and {len(data)} bytes")
            return -1, err, None
        if err:
            raise HostViolation(f"{Op(op).name} succeeded with errno {err}")
        return result, 0, VALIDATORS[op](args, req, result, data)
    except HostViolation as e:
        fail_stop(f"{Op(op).name}: {e}")
    except Exception as e:  # noqa: BLE001 - whatever a reply breaks, we fail closed
        fail_stop(f"{Op(op).name}: malformed reply ({type(e).__name__}: {e})")
