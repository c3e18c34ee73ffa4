"""The hostile-host fuzz's oracle: what an honest Linux host could have answered.

For a reply that passed the Iago checks and differs from the honest answer,
:func:`judge` says whether an honest host (Linux, glibc, CPython's socket
module) could have sent it, and if so which kind of *unprotected-I/O trust*
the difference is: the ids of :data:`TRUST`, the cases that
``docs/threat-model.md`` lists.  ``None`` means no honest host could have
sent it: a wrong value that a check could have caught, and a failed test.

The rules here are written from the system-call contracts, per opcode, not
from ``iago.py``; they read the same facts the enclave has (what it asked,
what it recorded about its fds, the names earlier pages of a listing gave).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyscone import abi
from pyscone.abi import Op
from pyscone.enclave.iago import FdTable

#: Unprotected-I/O trust: what the host decides and no check can refute.  Each id is a row of
#: docs/threat-model.md's table (a test holds the two to each other).
TRUST = {
    "outcome": "whether an unprotected operation succeeded (success claimed for a call that failed)",
    "fd-number": "which fresh descriptor number the host hands out",
    "content": "the bytes read from an unprotected file, socket, datagram or the console",
    "count": "how many bytes a write or send took, up to what was given",
    "file-position": "file positions and sizes: lseek SEEK_CUR/SEEK_END/SEEK_DATA/SEEK_HOLE, and devices",
    "metadata": "stat and statvfs fields within their ranges, access() and isatty() answers",
    "directory-content": "which names and types an unprotected directory holds",
    "link-target": "the target of a host symbolic link",
    "socket-address": "the peer and local addresses of sockets and datagram senders",
    "socket-option": "socket option values the enclave did not set at creation",
    "name-resolution": "what a host name resolves to, canonical and reverse names, the host name",
    "readiness": "which of the polled descriptors are ready, with which of the asked events",
    "semaphore": "whether a semaphore is free, its value, and the handle of a new one",
    "process": (
        "which of its spare lanes a forked child runs on, whether a signal reached another process, "
        "and a spawned child's pid and how it ended"
    ),
}


@dataclass
class Context:
    """What the enclave knew when it made the call."""

    fds: FdTable
    seen_names: set[str] = field(default_factory=set)  # earlier pages of this listing


Spec = Callable[[tuple[int, ...], bytes, int, Any, Any, Context], set[str] | None]


def _fresh(fd: object, ctx: Context) -> bool:
    # Never 0-2: the enclave does not close the host's console fds (and dup2 may have named them).
    return isinstance(fd, int) and 3 <= fd < abi.MAX_FD and fd not in ctx.fds.kinds


def _ip(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(str(text).split("%", 1)[0])
    except ValueError:
        return None


def _addr_ok(family: int, addr: object) -> bool:
    """A numeric address the kernel could report for a socket of ``family``."""
    if family == socket.AF_UNIX:
        return isinstance(addr, (str, bytes)) and len(addr) <= 108
    if not isinstance(addr, tuple):
        return False
    ip = _ip(addr[0])
    if family == socket.AF_INET:
        return len(addr) == 2 and isinstance(ip, ipaddress.IPv4Address) and 0 <= addr[1] <= 0xFFFF
    if family == socket.AF_INET6:
        return len(addr) == 4 and isinstance(ip, ipaddress.IPv6Address) and 0 <= addr[1] <= 0xFFFF
    return False


def _diff(ids: dict[str, bool]) -> set[str]:
    return {k for k, differs in ids.items() if differs}


def _void(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return set() if r == 0 and v is None else None


def _read(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return {"content"} if isinstance(v, bytes) and len(v) == r <= args[1] else None


def _readfile(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    # A file of any content and size; "more" only when the limit was filled.
    if not (isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], bytes) and v[1] is bool(r)):
        return None
    data, more = v
    return {"content"} if r in (0, 1) and len(data) <= args[0] and (not more or len(data) == args[0]) else None


def _count(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return {"count"} if v == r and 0 <= r <= len(req) else None


def _sendto(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    (alen,) = struct.unpack_from("<I", req, 0)
    return {"count"} if v == r and 0 <= r <= len(req) - 4 - alen else None


def _new_fd(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return {"fd-number"} if v == r and _fresh(v, ctx) else None


def _socketpair(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    a, b = v
    return {"fd-number"} if a == r and a != b and _fresh(a, ctx) and _fresh(b, ctx) else None


def _accept(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    fd, peer, local = v
    family = ctx.fds.families.get(args[0], 0)
    if not (fd == r and _fresh(fd, ctx) and _addr_ok(family, peer) and _addr_ok(family, local)):
        return None
    if hv is None:
        return {"socket-address"}
    return _diff({"fd-number": fd != hv[0], "socket-address": (peer, local) != hv[1:]})


def _lseek(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    fd, offset, whence = args[:3]
    kind, ftype = ctx.fds.kinds.get(fd), ctx.fds.ftypes.get(fd)
    if v != r or r < 0 or whence not in range(5):  # SEEK_SET..SEEK_HOLE; others are EINVAL
        return None
    if kind == FdTable.SOCKET or ftype in (stat.S_IFIFO, stat.S_IFSOCK):  # ESPIPE
        return None
    if kind == FdTable.CONSOLE or ftype == stat.S_IFCHR:
        return {"file-position"}  # a device's llseek decides (null_lseek always answers 0)
    if whence == os.SEEK_SET:
        return set() if r == offset else None
    # position + offset or size + offset (or, for DATA/HOLE, a place at or after offset)
    return {"file-position"} if offset < 0 or r >= offset else None


_KINDS = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK})


def _stat_ok(st: abi.StatResult) -> bool:
    return (
        stat.S_IFMT(st.mode) in _KINDS
        and 0 <= st.mode < 1 << 16
        and 0 <= st.uid < 1 << 32
        and 0 <= st.gid < 1 << 32
        and 0 < st.blksize < 1 << 32
        and min(st.ino, st.nlink, st.size, st.blocks) >= 0
    )


def _stat(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    if r != 0 or not isinstance(v, abi.StatResult) or not _stat_ok(v):
        return None
    kind = stat.S_IFMT(v.mode)
    if args[0] and kind == stat.S_IFLNK:  # stat(2) follows links to the end
        return None
    if req == b"/" and kind != stat.S_IFDIR:
        return None
    return {"metadata"}


def _openable(flags: int, kind: int) -> bool:
    """Could open(2) with ``flags`` return an fd of file type ``kind``?"""
    if flags & os.O_PATH:
        return not (flags & os.O_DIRECTORY) or kind == stat.S_IFDIR
    if kind in (stat.S_IFSOCK, stat.S_IFLNK):
        return False  # ENXIO for a socket, ELOOP (or the target) for a link
    if flags & os.O_TMPFILE == os.O_TMPFILE or flags & (os.O_CREAT | os.O_EXCL) == os.O_CREAT | os.O_EXCL:
        return kind == stat.S_IFREG
    if flags & os.O_DIRECTORY and kind != stat.S_IFDIR:
        return False
    return not (flags & os.O_ACCMODE != os.O_RDONLY and kind == stat.S_IFDIR)  # EISDIR


def _statvfs(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    if r != 0 or not isinstance(v, abi.StatvfsResult):
        return None
    sizes = 0 < v.bsize < 1 << 32 and 0 < v.frsize < 1 << 32 and 0 < v.namemax <= 4096 and 0 <= v.flag < 1 << 16
    counts = 0 <= v.bavail <= v.bfree <= v.blocks and 0 <= v.favail <= v.ffree <= v.files
    return {"metadata"} if sizes and counts else None


def _fstat(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    if r != 0 or not isinstance(v, abi.StatResult) or not _stat_ok(v):
        return None
    fd, kind = args[0], stat.S_IFMT(v.mode)
    what = ctx.fds.kinds.get(fd)
    if what == FdTable.SOCKET and kind != stat.S_IFSOCK:
        return None
    if what == FdTable.FILE and not _openable(ctx.fds.flags.get(fd, 0), kind):
        return None
    return {"metadata"}


def _listdir(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    entries, _more = v
    names = [e.name for e in entries]
    valid = all(n and "/" not in n and "\0" not in n and n not in (".", "..") for n in names)
    if r != len(entries) or not valid or len(set(names)) != len(names) or ctx.seen_names & set(names):
        return None
    if not all(0 <= e.dtype <= abi.DT_OTHER for e in entries):
        return None
    return {"directory-content"}


def _bool(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return {"metadata"} if v is bool(r) and r in (0, 1) else None


def _isatty(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    ftype = ctx.fds.ftypes.get(args[0])
    if v and (ctx.fds.kinds.get(args[0]) == FdTable.SOCKET or ftype not in (None, stat.S_IFCHR)):
        return None  # only a character device (a terminal) is a tty
    return _bool(args, req, r, v, hv, ctx)


def _readlink(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    ok = r == 0 and isinstance(v, bytes) and 0 < len(v) <= 4096 and b"\0" not in v
    return {"link-target"} if ok else None


def _getsockopt(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    fd, level, opt, buflen = args[:4]
    if buflen:
        return {"socket-option"} if r == 0 and isinstance(v, bytes) and len(v) <= buflen else None
    if v != r or not -(2**31) <= r < 2**31:
        return None
    f = ctx.fds
    if level == socket.SOL_SOCKET:
        exact = {socket.SO_TYPE: f.types, socket.SO_DOMAIN: f.families, socket.SO_PROTOCOL: f.protos}.get(opt)
        if exact is not None and fd in exact:
            return set() if r == exact[fd] else None  # how the enclave made the socket
        if opt == socket.SO_ERROR and not 0 <= r <= abi.MAX_ERRNO:
            return None
        booleans = (socket.SO_ACCEPTCONN, socket.SO_KEEPALIVE, socket.SO_BROADCAST, socket.SO_REUSEADDR)
        if opt in (*booleans, socket.SO_REUSEPORT, socket.SO_OOBINLINE, socket.SO_DONTROUTE) and r not in (0, 1):
            return None
    if (level, opt) == (socket.IPPROTO_TCP, socket.TCP_NODELAY) and r not in (0, 1):
        return None
    return {"socket-option"}


def _sendmsg_fds(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return {"count"} if v == r and 0 <= r <= len(req) - 4 * args[2] else None


_MSG_FLAGS = socket.MSG_TRUNC | socket.MSG_CTRUNC | socket.MSG_EOR | socket.MSG_CMSG_CLOEXEC


def _recvmsg_fds(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    # Any bytes up to the count, any fresh fds up to the room, the kernel's msg_flags: what came.
    data, new, flags = v
    if not (isinstance(data, bytes) and len(data) == r <= args[1] and len(new) <= args[3]):
        return None
    if len(set(new)) != len(new) or not all(_fresh(fd, ctx) for fd in new) or flags & ~_MSG_FLAGS:
        return None
    if hv is None:
        return {"content", "fd-number"}
    return _diff({"content": (data, len(new), flags) != (hv[0], len(hv[1]), hv[2]), "fd-number": new != hv[1]})


def _sockname(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return {"socket-address"} if r == 0 and _addr_ok(ctx.fds.families.get(args[0], 0), v) else None


def _recvfrom(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    payload, addr = v
    family, type_ = ctx.fds.families.get(args[0], 0), ctx.fds.types.get(args[0], 0)
    if not (isinstance(payload, bytes) and len(payload) == r <= args[1]):
        return None
    if family in (socket.AF_INET, socket.AF_INET6):
        if type_ == socket.SOCK_DGRAM and addr is None:  # every UDP datagram has a source
            return None
        if type_ == socket.SOCK_STREAM and addr is not None:  # TCP fills in no address
            return None
    if addr is not None and not _addr_ok(family, addr):
        return None
    if hv is None:
        return {"content", "socket-address"} if addr is not None else {"content"}
    return _diff({"content": payload != hv[0], "socket-address": addr != hv[1]})


def _addrinfo(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    family, type_, proto, flags = args[0], args[1], args[2], args[3]
    host, _, port = req.partition(b"\0")
    literal = _ip(host.decode()) if host else None
    want_port = 0 if not port else int(port) & 0xFFFF if port.isdigit() and len(port) <= 9 else None
    if not v or r != len(v):
        return None  # glibc never succeeds with nothing
    if flags & socket.AI_NUMERICHOST and host and literal is None:
        return None
    if flags & socket.AI_NUMERICSERV and want_port is None:
        return None
    for i, (f, t, p, canon, sa) in enumerate(v):
        if (family and f != family) or (type_ and t != type_) or (proto and p != proto):
            return None
        if t not in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET):
            return None
        if canon and (i or not flags & socket.AI_CANONNAME):
            return None
        if not _addr_ok(f, sa):
            return None
        ip = _ip(sa[0])
        assert ip is not None
        as4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
        if literal is not None and literal not in (ip, as4):
            return None  # glibc answers a numeric host with itself
        if not host and not (as4.is_unspecified if flags & socket.AI_PASSIVE else as4.is_loopback):
            return None  # no host: the wildcard (passive) or the loopback address
        if want_port is not None and sa[1] != want_port:
            return None
    return {"name-resolution"}


def _hostname(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return {"name-resolution"} if isinstance(v, bytes) and len(v) <= 64 and b"\0" not in v else None


def _nameinfo(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    host, port = v
    asked_port = struct.unpack_from("<H", req, 0)[0]
    literal = _ip(req[abi.INET_ADDR.size :].decode("ascii", "replace"))
    if r != 0 or literal is None:  # CPython resolves the address with AI_NUMERICHOST first
        return None
    if args[1] & socket.NI_NUMERICHOST and _ip(host) != literal:
        return None
    if args[1] & socket.NI_NUMERICSERV and port != str(asked_port):
        return None
    return {"name-resolution"}


def _poll(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    asked = [abi.POLLFD.unpack_from(req, i * abi.POLLFD.size)[:2] for i in range(args[0])]
    allowed = {fd: ev | abi.POLLERR | abi.POLLHUP | abi.POLLNVAL for fd, ev in asked}
    ready = [fd for fd, _ in v]
    if r != len(v) or ready != [fd for fd, _ in asked if fd in set(ready)]:  # the asked ones, in order
        return None
    if any(not revents or revents & ~allowed[fd] for fd, revents in v):
        return None
    return {"readiness"}


def _lane(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    # (iago takes any positive lane; whether it is a spare lane of this enclave, the fork code checks)
    return {"process"} if r >= 1 and v == r else None


def _sem_handle(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return {"semaphore"} if r >= 1 and v == r else None


def _sem_acquire(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    # Not waiting: taken (1) or not (0); waiting: it ends taken, or fails.
    ok = r in (0, 1) and v is bool(r) and (r == 1 or not args[1])
    return {"semaphore"} if ok else None


def _sem_value(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    return {"semaphore"} if 0 <= r <= abi.SEM_VALUE_MAX and v == r else None


def _spawn(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    pid, chan = v
    return {"process", "fd-number"} if 0 < r < 2**31 and pid == r and _fresh(chan, ctx) else None


def _spawn_wait(args: tuple[int, ...], req: bytes, r: int, v: Any, hv: Any, ctx: Context) -> set[str] | None:
    import os

    if r == 0:  # still running: only when the call did not wait, and then no status
        return {"process"} if args[1] & os.WNOHANG and v == 0 else None
    if r != args[0] or not (os.WIFEXITED(v) or os.WIFSIGNALED(v)):
        return None
    return {"process"}


SPECS: dict[int, Spec] = {
    Op.NOP: _void,
    Op.CANCEL: _void,
    Op.OPEN: _new_fd,
    Op.CLOSE: _void,
    Op.READ: _read,
    Op.WRITE: _count,
    Op.PREAD: _read,
    Op.PWRITE: _count,
    Op.PWRITE_SYNC: _count,
    Op.LSEEK: _lseek,
    Op.FSTAT: _fstat,
    Op.STAT: _stat,
    Op.LISTDIR: _listdir,
    Op.MKDIR: _void,
    Op.RMDIR: _void,
    Op.UNLINK: _void,
    Op.RENAME: _void,
    Op.FSYNC: _void,
    Op.FTRUNCATE: _void,
    Op.ACCESS: _bool,
    Op.CHMOD: _void,
    Op.UTIME: _void,
    Op.READLINK: _readlink,
    Op.SYMLINK: _void,
    Op.ISATTY: _isatty,
    Op.LOCK: _void,
    Op.STATVFS: _statvfs,
    Op.READFILE: _readfile,
    Op.SOCKET: _new_fd,
    Op.SOCKETPAIR: _socketpair,
    Op.BIND: _void,
    Op.LISTEN: _void,
    Op.ACCEPT: _accept,
    Op.CONNECT: _void,
    Op.SEND: _count,
    Op.RECV: _read,
    Op.SENDTO: _sendto,
    Op.RECVFROM: _recvfrom,
    Op.SHUTDOWN: _void,
    Op.SETSOCKOPT: _void,
    Op.GETSOCKOPT: _getsockopt,
    Op.GETSOCKNAME: _sockname,
    Op.GETPEERNAME: _sockname,
    Op.GETADDRINFO: _addrinfo,
    Op.GETHOSTNAME: _hostname,
    Op.GETNAMEINFO: _nameinfo,
    Op.POLL: _poll,
    Op.FORK: _lane,
    Op.FORK_DONE: _void,
    Op.KILL: _void,
    Op.FUTIME: _void,
    Op.SEM_NEW: _sem_handle,
    Op.SEM_OPEN: _sem_handle,
    Op.SEM_ACQUIRE: _sem_acquire,
    Op.SEM_RELEASE: _void,
    Op.SEM_VALUE: _sem_value,
    Op.SEM_CLOSE: _void,
    Op.SEM_UNLINK: _void,
    Op.SPAWN: _spawn,
    Op.SPAWN_WAIT: _spawn_wait,
    Op.SPAWN_KILL: _void,
    Op.SENDMSG_FDS: _sendmsg_fds,
    Op.RECVMSG_FDS: _recvmsg_fds,
}


def possible(op: int, args: tuple[int, ...], req: bytes, r: int, v: Any, ctx: Context) -> bool:
    """Could an honest host have answered ``op`` with success ``r``/value ``v``?"""
    return SPECS[op](args, req, r, v, None, ctx) is not None


def judge(
    op: int, args: tuple[int, ...], req: bytes, honest: tuple[int, Any], lie: tuple[int, Any], ctx: Context
) -> set[str] | None:
    """The trust ids that explain a successful ``lie`` unlike ``honest``, or None for a wrong value."""
    (hr, hv), (lr, lv) = honest, lie
    ids = SPECS[op](args, req, lr, lv, hv if hr >= 0 else None, ctx)
    if ids is None:
        return None
    if hr < 0:
        return ids | {"outcome"}  # the host says it worked; only the host knows
    assert ids, f"{Op(op).name}: {lie} differs from {honest} in no aspect the oracle knows"
    return ids
