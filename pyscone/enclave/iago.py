"""Iago checks: every answer from the host is validated here, once, per opcode.

The host may return anything from any system call (Checkoway & Shacham's Iago
attacks).  Every reply passes through :func:`validate` before any code in the
enclave looks at it: the payload has already been copied out of shared memory
exactly once, and the validator decodes it into a typed value.  A reply that
breaks a rule is a :class:`HostViolation`, and the enclave stops at once
(:func:`fail_stop`): corrupted data never reaches the app.

What can be checked
-------------------
A rule is written here whenever the enclave *knows* what the answer must be, or
what it cannot be, from what it asked and what it remembers (:class:`FdTable`):

* shapes: a read longer than asked, a write of more than was given, a payload
  that does not decode, an errno out of range, success with an errno;
* identity: an fd that is out of range or already open (aliasing), a socket
  option that contradicts how the enclave created the socket (``SO_TYPE``,
  ``SO_DOMAIN``, ``SO_PROTOCOL``), a stat kind that contradicts the fd (a socket
  that fstats as a file, ``stat`` that "followed" a link and found a link);
* echoes of the request: ``lseek(SEEK_SET)`` lands where asked, a numeric host
  "resolves" to itself and a numeric port to itself, ``getaddrinfo`` answers the
  family, type and protocol asked for, ``getnameinfo(NI_NUMERICHOST)`` gives
  the address back;
* protocol facts: a UDP datagram has a sender and TCP data has none, a
  directory listing names no file twice (across pages too), a poll answer
  names exactly the fds asked about.

What cannot be checked is what only the host knows: the bytes of an
unprotected file or socket, whether an unprotected operation succeeded, which
fresh fd number it picked, file metadata within its ranges, what a name
resolves to.  That is *unprotected-I/O trust*; ``docs/threat-model.md`` lists
it case by case, and the hostile-host tests hold this module to that list.

Errors the *app* causes (a bad fd, a closed socket) are ordinary ``OSError``s
raised before any host call; see ``FdTable``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat as stat_mod
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


def move_fatal(old: Callable[[str], None], new: Callable[[str], None]) -> None:
    """A forked child: its reason for a fail-stop goes to its own lane, not its parent's."""
    _fatal_sinks[:] = [new if sink == old else sink for sink in _fatal_sinks]


#: The process's own exit, bound before the app's ``os._exit`` is interposed (that one hands the
#: console shield's queue to the host first: the runtime's exits -- a fail-stop, a death by a
#: signal, a child whose parent is gone -- are no clean exit and send nothing).
exit_now: Callable[[int], NoReturn] = os._exit


def fail_stop(reason: str) -> NoReturn:
    """Stop the enclave now.  Nothing after this runs: no app code, no atexit, no flush."""
    message = f"host violation: {reason}"
    for sink in _fatal_sinks:
        try:
            sink(message)
        except Exception:  # noqa: BLE001 - we are stopping regardless
            pass
    exit_now(EXIT_HOST_VIOLATION)


_INET = (socket.AF_INET, socket.AF_INET6)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_O_PATH = getattr(os, "O_PATH", 0)
_SOCK_FLAGS = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)


class FdTable:
    """The host file descriptors the enclave knows, and what it knows about them.

    A new fd from the host must not already be open here (no aliasing); an fd
    the app names must be one we handed out (else EBADF, without a host call).
    What is recorded comes from the enclave's own requests (the family, type
    and protocol a socket was created with, the flags a file was opened with),
    never from a host answer, except ``ftypes``: the file type the host's own
    ``fstat`` reported, which later answers about the same fd must agree with.
    """

    FILE, SOCKET, CONSOLE = "file", "socket", "console"

    def __init__(self) -> None:
        self.kinds: dict[int, str] = {0: self.CONSOLE, 1: self.CONSOLE, 2: self.CONSOLE}
        self.families: dict[int, int] = {}
        self.types: dict[int, int] = {}  # socket type (SOCK_STREAM, ...), without flags
        self.protos: dict[int, int] = {}  # effective protocol, when the enclave can know it
        self.flags: dict[int, int] = {}  # open(2) flags of a file
        self.ftypes: dict[int, int] = {}  # S_IFMT of a file, as its fstat said (or assumed at open)
        # fd-level flags (``fcntl``, ``os.set_inheritable``/``set_blocking``), kept in the enclave
        # alone: nothing can be exec'd, and the enclave decides how each call waits.  Virtual fds
        # (the FS shield's) are recorded here too.  As in Python, only 0..2 are inheritable.
        self.inheritable: set[int] = {0, 1, 2}
        self.nonblocking: set[int] = set()
        # Told of every fd the enclave forgets (the network shield drops the connection on it).
        self.forget_hooks: list[Callable[[int], None]] = []

    def adopt(self, fd: int, kind: str, family: int = 0, *, type: int = 0, proto: int = 0, flags: int = 0) -> None:  # noqa: A002
        if not 0 <= fd < abi.MAX_FD:
            raise HostViolation(f"host returned fd {fd}, outside 0..{abi.MAX_FD}")
        if fd in self.kinds:
            raise HostViolation(f"host returned fd {fd}, which is already open in the enclave")
        if fd < 3:
            # The enclave never closes the host's 0-2 (files.close), so a new fd can never be one
            # of them; and the app may have made 0-2 names of its own (os.dup2, stdlib/dups.py).
            raise HostViolation(f"host returned fd {fd}, one of the console's 0-2, which it never gave up")
        self.kinds[fd] = kind
        if family:
            self.families[fd] = family
        if kind == self.SOCKET:
            type &= ~_SOCK_FLAGS  # noqa: A001 - SO_TYPE reports the type without them
            if type:
                self.types[fd] = type
            effective = _effective_proto(family, type, proto)
            if effective is not None:
                self.protos[fd] = effective
        elif kind == self.FILE:
            self.flags[fd] = flags

    def kind(self, fd: int) -> str:
        try:
            return self.kinds[fd]
        except KeyError:
            raise OSError(9, os.strerror(9)) from None

    def forget(self, fd: int) -> None:
        self.kinds.pop(fd, None)
        for table in (self.families, self.types, self.protos, self.flags, self.ftypes):
            table.pop(fd, None)
        self.inheritable.discard(fd)
        self.nonblocking.discard(fd)
        for hook in self.forget_hooks:
            hook(fd)

    def snapshot(self) -> FdTable:
        """A copy of everything (for tests that validate replies in isolation)."""
        copy = FdTable()
        copy.restore(self)
        return copy

    def restore(self, saved: FdTable) -> None:
        self.kinds, self.families, self.types = dict(saved.kinds), dict(saved.families), dict(saved.types)
        self.protos, self.flags, self.ftypes = dict(saved.protos), dict(saved.flags), dict(saved.ftypes)
        self.inheritable, self.nonblocking = set(saved.inheritable), set(saved.nonblocking)


def _effective_proto(family: int, type_: int, proto: int) -> int | None:
    """The protocol the kernel reports for a socket made with (family, type, proto), if certain."""
    if proto:
        return proto
    if family == socket.AF_UNIX:
        return 0
    if family in _INET:
        known: dict[int, int] = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}
        return known.get(type_)
    return None


fds = FdTable()


class Listings:
    """Names already seen in directory listings that continue on a later page.

    The host pages a large directory (``LISTDIR`` with a start index); a name it
    gives on two pages of one listing is a lie (POSIX lets ``readdir`` skip or
    add a file created meanwhile, never repeat one, and the executor serves the
    pages of one listing from one snapshot).  State is kept per (path, next
    start index); two listings of the same directory may wait at the same index,
    so a page is matched to one it is consistent with.  Abandoned listings are
    forgotten oldest first beyond ``LIMIT``, which only loses the check for them.
    """

    LIMIT = 64

    def __init__(self) -> None:
        self.waiting: dict[tuple[bytes, int], list[set[str]]] = {}
        self.count = 0

    def page(self, path: bytes, start: int, names: list[str], more: bool) -> None:
        key = (path, start)
        seen: set[str] = set()
        if start:
            candidates = self.waiting.get(key)
            if candidates:
                for i, earlier in enumerate(candidates):
                    if earlier.isdisjoint(names):
                        seen = candidates.pop(i)
                        break
                else:
                    again = sorted(set(names) & candidates[0])[0]
                    raise HostViolation(f"directory entry {again!r} listed again on a later page")
                self.count -= 1
                if not candidates:
                    del self.waiting[key]
        if more:
            seen.update(names)
            self.waiting.setdefault((path, start + len(names)), []).append(seen)
            self.count += 1
            while self.count > self.LIMIT:
                oldest = next(iter(self.waiting))
                self.waiting[oldest].pop(0)
                self.count -= 1
                if not self.waiting[oldest]:
                    del self.waiting[oldest]


listings = Listings()

#: A request's payload as the caller passed it (validators only measure or unpack it).
Req = bytes | bytearray | memoryview
Validator = Callable[[tuple[int, ...], Req, int, bytes], object]


def _none(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0 or data:
        raise HostViolation(f"expected an empty success, got result {result} with {len(data)} bytes")
    return None


def _lane(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    # (Whether the lane is one of this enclave's, and not its own, the fork code checks: it knows them.)
    if result < 1 or data:
        raise HostViolation(f"a fork's lane must be a positive number, got {result} with {len(data)} bytes")
    return result


def _readfile(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result not in (0, 1) or len(data) > args[0] or (result == 1 and len(data) != args[0]):
        raise HostViolation(f"readfile returned {len(data)} bytes with result {result} for a limit of {args[0]}")
    return data, bool(result)


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


def _lseek(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    fd, offset, whence = args[0], args[1], args[2]
    if result < 0 or data:
        raise HostViolation(f"host returned an impossible file position {result}")
    if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
        raise HostViolation(f"lseek with whence {whence} succeeded (Linux refuses it with EINVAL)")
    kind, ftype = fds.kinds.get(fd), fds.ftypes.get(fd)
    if kind == FdTable.SOCKET or ftype in (stat_mod.S_IFIFO, stat_mod.S_IFSOCK):
        raise HostViolation("lseek succeeded on a pipe or socket (Linux refuses it with ESPIPE)")
    if kind == FdTable.CONSOLE or ftype == stat_mod.S_IFCHR:
        return result  # a device keeps its own notion of position (/dev/null always says 0)
    if whence == os.SEEK_SET and result != offset:
        raise HostViolation(f"lseek to {offset} (SEEK_SET) landed at {result}")
    # SEEK_CUR/END: position + offset, size + offset; neither position nor size is negative.
    if whence != os.SEEK_SET and offset >= 0 and result < offset:
        raise HostViolation(f"lseek by {offset} from {('cur', 'end', 'data', 'hole')[whence - 1]} landed at {result}")
    return result


def _sem_handle(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result < 1 or data:
        raise HostViolation(f"a semaphore handle must be a positive number, got {result} with {len(data)} bytes")
    return result


def _sem_acquire(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    # A blocking acquire ends acquired, or fails (ECANCELED after the enclave's timeout): never "not acquired".
    if result not in (0, 1) or data or (args[1] and result != 1):
        raise HostViolation(f"a {'blocking ' if args[1] else ''}semaphore acquire answered {result}")
    return bool(result)


def _sem_value(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result > abi.SEM_VALUE_MAX or data:
        raise HostViolation(f"a semaphore's value of {result} is above SEM_VALUE_MAX")
    return result


def _bool(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result not in (0, 1) or data:
        raise HostViolation(f"host returned {result} where 0 or 1 was expected")
    return bool(result)


def _isatty(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    tty = _bool(args, req, result, data)
    ftype = fds.ftypes.get(args[0])
    if tty and (fds.kinds.get(args[0]) == FdTable.SOCKET or ftype not in (None, stat_mod.S_IFCHR)):
        raise HostViolation("isatty is true for an fd that is not a character device")
    return tty


def _stat_fields(st: abi.StatResult) -> abi.StatResult:
    # (ABI decoding already refused an unknown file type and negative counts.)
    if st.uid >= 1 << 32 or st.gid >= 1 << 32:
        raise HostViolation(f"stat owner {st.uid}:{st.gid} does not fit uid_t/gid_t")
    if not 0 < st.blksize < 1 << 32:
        raise HostViolation(f"stat block size {st.blksize} is impossible")
    return st


def _stat(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0:
        raise HostViolation("stat result is not 0")
    st = _stat_fields(abi.StatResult.unpack(data))
    kind = stat_mod.S_IFMT(st.mode)
    if args[0] and kind == stat_mod.S_IFLNK:
        raise HostViolation("stat followed a symbolic link and found a symbolic link")
    if bytes(req) == b"/" and kind != stat_mod.S_IFDIR:
        raise HostViolation("the root directory is not a directory")
    return st


def _statvfs(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0:
        raise HostViolation("statvfs result is not 0")
    st = abi.StatvfsResult.unpack(data)
    if not (0 < st.bsize < 1 << 32 and 0 < st.frsize < 1 << 32):
        raise HostViolation(f"statvfs block sizes {st.bsize}/{st.frsize} are impossible")
    if not (0 <= st.bavail <= st.bfree <= st.blocks and 0 <= st.favail <= st.ffree <= st.files):
        raise HostViolation("statvfs counts more free than there is")
    if not (0 <= st.flag < 1 << 16 and 0 < st.namemax <= 4096):
        raise HostViolation(f"statvfs flags {st.flag:#x} or name length {st.namemax} are impossible")
    return st


def _fstat(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0:
        raise HostViolation("stat result is not 0")
    st = _stat_fields(abi.StatResult.unpack(data))
    fd, kind = args[0], stat_mod.S_IFMT(st.mode)
    what = fds.kinds.get(fd)
    if what == FdTable.SOCKET and kind != stat_mod.S_IFSOCK:
        raise HostViolation(f"fstat of a socket says file type {kind:#o}")
    if what == FdTable.FILE:
        _check_file_kind(fds.flags.get(fd, 0), kind)
        fds.ftypes[fd] = kind
    return st


def _check_file_kind(flags: int, kind: int) -> None:
    """What ``open(2)`` with ``flags`` can have opened, checked against its fstat."""
    if flags & _O_PATH:
        if flags & os.O_DIRECTORY and kind != stat_mod.S_IFDIR:
            raise HostViolation("a file opened with O_DIRECTORY is not a directory")
        return  # O_PATH opens anything, links included, and ignores the other flags
    if kind in (stat_mod.S_IFSOCK, stat_mod.S_IFLNK):
        raise HostViolation(f"open(2) cannot return an fd of file type {kind:#o}")
    created = flags & (os.O_CREAT | os.O_EXCL) == os.O_CREAT | os.O_EXCL
    if (_O_TMPFILE and flags & _O_TMPFILE == _O_TMPFILE) or created:
        if kind != stat_mod.S_IFREG:
            raise HostViolation("a file open(2) created is not a regular file")
    elif flags & os.O_DIRECTORY and kind != stat_mod.S_IFDIR:
        raise HostViolation("a file opened with O_DIRECTORY is not a directory")
    if flags & os.O_ACCMODE != os.O_RDONLY and kind == stat_mod.S_IFDIR:
        raise HostViolation("a directory was opened for writing (Linux refuses it with EISDIR)")


def _dirents(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    entries, more = abi.decode_dirents(data)
    if result != len(entries):
        raise HostViolation("directory count does not match its entries")
    listings.page(bytes(req), args[0], [e.name for e in entries], more)
    return entries, more


def _open(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if data:
        raise HostViolation("unexpected payload with a new fd")
    fds.adopt(result, FdTable.FILE, flags=args[0])
    if bytes(req[:5]) == b"/dev/":
        # Devices may ignore lseek offsets; until an fstat says otherwise, assume one here.
        fds.ftypes[result] = stat_mod.S_IFCHR
    return result


def _socket(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if data:
        raise HostViolation("unexpected payload with a new fd")
    fds.adopt(result, FdTable.SOCKET, args[0], type=args[1], proto=args[2])
    return result


def _socketpair(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if len(data) != 4:
        raise HostViolation("socketpair payload is not one fd")
    (second,) = struct.unpack("<i", data)
    fds.adopt(result, FdTable.SOCKET, args[0], type=args[1], proto=args[2])
    fds.adopt(second, FdTable.SOCKET, args[0], type=args[1], proto=args[2])
    return result, second


def _accept(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    lfd = args[0]
    family = fds.families.get(lfd, 0)
    if len(data) < 4:
        raise HostViolation("accept payload too short")
    (plen,) = struct.unpack_from("<I", data, 0)
    if 4 + plen > len(data):
        raise HostViolation("accept peer address runs past the payload")
    peer = abi.decode_sockaddr(family, data[4 : 4 + plen])
    local = abi.decode_sockaddr(family, data[4 + plen :])
    fds.adopt(result, FdTable.SOCKET, family, type=fds.types.get(lfd, 0), proto=fds.protos.get(lfd, 0))
    return result, peer, local


def _sendmsg_fds(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    given = len(req) - 4 * args[2]
    if not 0 <= result <= given or data:
        raise HostViolation(f"host claims {result} bytes sent of {given}")
    return result


_RECVMSG_FLAGS = socket.MSG_TRUNC | socket.MSG_CTRUNC | socket.MSG_EOR | socket.MSG_CMSG_CLOEXEC


def _recvmsg_fds(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    """The payload, the host fds that came with it (new numbers, each a fresh fd), the msg_flags."""
    head = abi.RECVMSG_HEAD.size
    if len(data) < head:
        raise HostViolation("recvmsg answer too short")
    nfds, flags = abi.RECVMSG_HEAD.unpack_from(data, 0)
    if nfds > args[3] or len(data) != head + 4 * nfds + result or not 0 <= result <= args[1]:
        raise HostViolation(f"recvmsg answered {nfds} fds (of {args[3]}) and {result} bytes (of {args[1]})")
    if flags & ~_RECVMSG_FLAGS:
        raise HostViolation(f"recvmsg answered msg_flags {flags:#x}")
    new = list(struct.unpack_from(f"<{nfds}i", data, head))
    for fd in new:
        if not 3 <= fd < abi.MAX_FD or fd in fds.kinds:
            raise HostViolation(f"recvmsg answered fd {fd}, which is not a fresh descriptor")
    if len(set(new)) != nfds:
        raise HostViolation("recvmsg answered one fd twice")
    return data[head + 4 * nfds :], new, flags


def _sockaddr(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0:
        raise HostViolation("address query result is not 0")
    return abi.decode_sockaddr(fds.families.get(args[0], 0), data)


def _recvfrom(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    fd = args[0]
    if len(data) < 4:
        raise HostViolation("recvfrom payload too short")
    (alen,) = struct.unpack_from("<I", data, 0)
    if 4 + alen > len(data):
        raise HostViolation("recvfrom address runs past the payload")
    payload = data[4 + alen :]
    if result != len(payload) or result > args[1]:
        raise HostViolation(f"host returned {len(payload)} bytes for a recvfrom of {args[1]}")
    family, type_ = fds.families.get(fd, 0), fds.types.get(fd, 0)
    if family in _INET and type_ == socket.SOCK_DGRAM and not alen:
        raise HostViolation("a UDP datagram arrived without a sender address")
    if family in _INET and type_ == socket.SOCK_STREAM and alen:
        raise HostViolation("TCP data arrived with a sender address (Linux gives none)")
    addr = abi.decode_sockaddr(family, data[4 : 4 + alen]) if alen else None
    return payload, addr


#: Socket options whose value Linux reports as exactly 0 or 1.
_BOOL_OPTIONS = frozenset(
    {(socket.SOL_SOCKET, getattr(socket, n)) for n in ("SO_ACCEPTCONN", "SO_KEEPALIVE", "SO_BROADCAST", "SO_REUSEADDR")}
    | {(socket.SOL_SOCKET, getattr(socket, n)) for n in ("SO_REUSEPORT", "SO_OOBINLINE", "SO_DONTROUTE")}
    | {(socket.IPPROTO_TCP, socket.TCP_NODELAY)}
)


def _getsockopt(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    fd, level, opt = args[0], args[1], args[2]
    if args[3]:
        if len(data) > args[3] or result != 0:
            raise HostViolation("getsockopt returned more than the buffer")
        return data
    if data or not -(2**31) <= result < 2**31:
        raise HostViolation("getsockopt integer out of range")
    if level == socket.SOL_SOCKET:
        known = {socket.SO_TYPE: fds.types, socket.SO_DOMAIN: fds.families, socket.SO_PROTOCOL: fds.protos}
        table = known.get(opt)
        if table is not None and fd in table and result != table[fd]:
            raise HostViolation(f"getsockopt says option {opt} is {result}; the socket was made with {table[fd]}")
        if opt == socket.SO_ERROR and not 0 <= result <= abi.MAX_ERRNO:
            raise HostViolation(f"SO_ERROR {result} is not an errno")
    if (level, opt) in _BOOL_OPTIONS and result not in (0, 1):
        raise HostViolation(f"boolean socket option {opt} is {result}")
    return result


def _text(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if result != 0 or b"\0" in data or len(data) > 4096:
        raise HostViolation("malformed text reply")
    return data


def _readlink(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if not data:
        raise HostViolation("a symbolic link with an empty target")  # symlink(2) refuses to make one
    return _text(args, req, result, data)


def _hostname(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    if len(data) > 64:
        raise HostViolation("host name longer than HOST_NAME_MAX")
    return _text(args, req, result, data)


def _poll(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    asked = [abi.POLLFD.unpack_from(req, i * abi.POLLFD.size)[:2] for i in range(args[0])]
    ready = abi.decode_pollfds(asked, data)
    if result != len(ready):
        raise HostViolation("poll count does not match its events")
    return ready


# -- name resolution: what the answer must echo from the question ------------------------------


def _ip_literal(text: bytes | str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a numeric host names (glibc never resolves those), or None for a name."""
    s = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    try:
        return ipaddress.ip_address(s.split("%", 1)[0])
    except ValueError:
        return None


def _same_address(answer: str, literal: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    ip = _ip_literal(answer)
    if ip == literal:
        return True
    # AF_INET6 with AI_V4MAPPED answers an IPv4 literal as ::ffff:a.b.c.d
    return isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped == literal


def _numeric_port(port: bytes) -> int | None:
    """The port a numeric service names, as glibc computes it (strtoul, then a 16-bit store)."""
    if not port:
        return 0
    if port.isascii() and port.isdigit() and len(port) <= 9:
        return int(port) & 0xFFFF
    return None


_SOCK_TYPES = frozenset({socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET})


def _addrinfo(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    infos = abi.decode_addrinfo(data)
    if result != len(infos):
        raise HostViolation("address-info count does not match its entries")
    if not infos:
        raise HostViolation("getaddrinfo succeeded with no address (glibc fails with EAI_NONAME)")
    family, type_, proto, flags = args[0], args[1] & ~_SOCK_FLAGS, args[2], args[3]
    host, _, port = bytes(req).partition(b"\0")
    literal = _ip_literal(host) if host else None
    want_port = _numeric_port(port)
    if flags & socket.AI_NUMERICHOST and host and literal is None:
        raise HostViolation("getaddrinfo resolved a name although AI_NUMERICHOST was given")
    if flags & socket.AI_NUMERICSERV and want_port is None:
        raise HostViolation("getaddrinfo resolved a service name although AI_NUMERICSERV was given")
    for i, (f, t, p, canon, sa) in enumerate(infos):
        if family and f != family:
            raise HostViolation(f"getaddrinfo answered family {f} for a request of family {family}")
        if (type_ and t != type_) or t not in _SOCK_TYPES:
            raise HostViolation(f"getaddrinfo answered socket type {t} for a request of type {type_}")
        if proto and p != proto:
            raise HostViolation(f"getaddrinfo answered protocol {p} for a request of protocol {proto}")
        if canon and (i or not flags & socket.AI_CANONNAME):
            raise HostViolation("getaddrinfo gave a canonical name where none can be")
        assert isinstance(sa, tuple)
        addr, sport = str(sa[0]), int(sa[1])
        if literal is not None and not _same_address(addr, literal):
            raise HostViolation(f"getaddrinfo resolved the numeric host {host.decode()} to {addr}")
        if not host:
            ip = _ip_literal(addr)
            assert ip is not None
            ip4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
            if not (ip4.is_unspecified if flags & socket.AI_PASSIVE else ip4.is_loopback):
                raise HostViolation(f"getaddrinfo with no host gave {addr}")
        if want_port is not None and sport != want_port:
            raise HostViolation(f"getaddrinfo turned port {port.decode() or 'none'} into {sport}")
    return infos


def _nameinfo(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    host, sep, port = data.partition(b"\0")
    if not sep or b"\0" in port or result != 0:
        raise HostViolation("malformed name-info reply")
    flags = args[1]
    asked_port, _, _ = abi.INET_ADDR.unpack_from(req, 0)
    literal = _ip_literal(bytes(req[abi.INET_ADDR.size :]))
    if literal is None:
        # CPython's getnameinfo takes numeric hosts only (it resolves with AI_NUMERICHOST).
        raise HostViolation("getnameinfo succeeded for an address that is not numeric")
    if flags & socket.NI_NUMERICHOST and not (_ip_literal(host) == literal):
        raise HostViolation(f"getnameinfo with NI_NUMERICHOST turned {literal} into {host[:64]!r}")
    if flags & socket.NI_NUMERICSERV and port != str(asked_port).encode():
        raise HostViolation(f"getnameinfo with NI_NUMERICSERV turned port {asked_port} into {port[:16]!r}")
    return host.decode("utf-8", "replace"), port.decode("utf-8", "replace")


def _spawn(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    """A spawned child's pid and the channel to it: a new AF_UNIX stream socket of ours."""
    if len(data) != 4 or not 0 < result < 1 << 31:
        raise HostViolation(f"spawn answered pid {result} with {len(data)} bytes")
    (chan,) = struct.unpack("<i", data)
    fds.adopt(chan, FdTable.SOCKET, socket.AF_UNIX, type=socket.SOCK_STREAM)
    return result, chan


def _spawn_wait(args: tuple[int, ...], req: Req, result: int, data: bytes) -> object:
    """The child asked about, or 0 if it runs and the call did not wait; a wait(2) status word."""
    if len(data) != 4 or result not in ((args[0], 0) if args[1] & os.WNOHANG else (args[0],)):
        raise HostViolation(f"wait for pid {args[0]} answered pid {result} with {len(data)} bytes")
    (status,) = struct.unpack("<i", data)
    if result and not (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
        raise HostViolation(f"wait for pid {args[0]} answered status {status:#x}, which is no exit")
    if not result and status:
        raise HostViolation("a child that still runs has no status")
    return status


VALIDATORS: dict[int, Validator] = {
    Op.NOP: _none,
    Op.CANCEL: _none,
    Op.OPEN: _open,
    Op.CLOSE: _none,
    Op.READ: _bytes_upto(1),
    Op.WRITE: _count_upto_request,
    Op.PREAD: _bytes_upto(1),
    Op.PWRITE: _count_upto_request,
    Op.LSEEK: _lseek,
    Op.FSTAT: _fstat,
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
    Op.READLINK: _readlink,
    Op.SYMLINK: _none,
    Op.ISATTY: _isatty,
    Op.LOCK: _none,
    Op.STATVFS: _statvfs,
    Op.READFILE: _readfile,
    Op.PWRITE_SYNC: _count_upto_request,
    # semaphores: whether a lock is free is the host's to say (it arbitrates); these are the shapes
    Op.SEM_NEW: _sem_handle,
    Op.SEM_OPEN: _sem_handle,
    Op.SEM_ACQUIRE: _sem_acquire,
    Op.SEM_RELEASE: _none,
    Op.SEM_VALUE: _sem_value,
    Op.SEM_CLOSE: _none,
    Op.SEM_UNLINK: _none,
    Op.SOCKET: _socket,
    Op.SOCKETPAIR: _socketpair,
    Op.BIND: _none,
    Op.LISTEN: _none,
    Op.ACCEPT: _accept,
    Op.SENDMSG_FDS: _sendmsg_fds,
    Op.RECVMSG_FDS: _recvmsg_fds,
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
    Op.GETHOSTNAME: _hostname,
    Op.GETNAMEINFO: _nameinfo,
    Op.POLL: _poll,
    Op.FORK: _lane,
    Op.FORK_DONE: _none,
    Op.KILL: _none,
    Op.FUTIME: _none,
    Op.SPAWN: _spawn,
    Op.SPAWN_WAIT: _spawn_wait,
    Op.SPAWN_KILL: _none,
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
