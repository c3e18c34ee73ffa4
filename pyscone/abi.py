"""The system-call ABI shared by the enclave and the host.

Theory of operation
-------------------
Untrusted memory is one shared mapping, laid out as::

    [header 4 KiB][request ring][response ring][slot 0][slot 1]...

The header holds the magic, the ABI version, the sizes, the ring counters (each
on its own cache line) and the two "sleeping" flags that decide whether a side
must ring the other's doorbell.  The rings hold u32 slot ids.  A slot is a
128-byte header (opcode, flags, six i64 arguments, request data length; result,
errno and response data length) followed by ``slot_data`` bytes of data.

Everything both sides must agree on lives in this module: the opcodes, the
struct layouts and the codecs for the few structured payloads (stat results,
directory entries, socket addresses, address-info lists and poll sets).  The
decoders are strict: they raise :class:`ABIError` on anything malformed, and the
enclave turns that into a fail-stop ``HostViolation``.  Nothing here performs
I/O, so both sides and the tests drive the same code.

Memory ordering: the rings are single-producer/single-consumer with 64-bit
counters written after the entry they publish.  We assume x86-64 TSO, where a
store is never reordered with an earlier store, so a reader that sees the new
counter sees the entry.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import stat as stat_mod
import struct
from dataclasses import dataclass

MAGIC = 0x31454E4F43535950  # b"PYSCONE1" little-endian
ABI_VERSION = 1

HEADER_SIZE = 4096
#: Header fields: magic, version, nslots, slot_data, ring_size.
HEADER = struct.Struct("<QIIII")
OFF_REQ_TAIL = 64  # written by the enclave (producer)
OFF_REQ_HEAD = 128  # written by the host (consumer)
OFF_RESP_TAIL = 192  # written by the host (producer)
OFF_RESP_HEAD = 256  # written by the enclave (consumer)
OFF_HOST_SLEEPING = 320  # set by the host before it sleeps on its doorbell
OFF_ENCLAVE_SLEEPING = 384  # set by the enclave before it sleeps on its doorbell
#: Set by the host: 0 = no advice, else spin at most (value - 1) microseconds.  A family of
#: more enclaves than cores loses more to spinning than it gains (each side spins for the
#: other while the one it waits for needs the core); only speed depends on it.
OFF_SPIN_HINT = 448
OFF_FATAL = 1024  # u64 length + message: why the enclave stopped
FATAL_MAX = 2048

#: Counters, flags and the fatal-message length are native u64 words at these
#: offsets; ring entries are native u32 (see rings.py on why "native").

SLOT_HEADER = 128
#: Request part of a slot: op, flags, a0..a5, request data length.
REQ = struct.Struct("<II6qI")
#: Response part of a slot, at offset RESP_OFF: result, errno, response data length.
RESP = struct.Struct("<qiI")
RESP_OFF = 64

#: Request flag: the call is blocking from the app's view; the host parks it
#: on its reactor instead of answering EAGAIN.
FLAG_WAIT = 1

DEFAULT_SLOTS = 1024
DEFAULT_SLOT_DATA = 64 * 1024
MAX_SLOTS = 1 << 16
MAX_FD = 1 << 20
#: Largest errno the host may report (Linux uses 1..133).
MAX_ERRNO = 4095


class ABIError(ValueError):
    """A payload from the other side does not follow the ABI."""


class Op(enum.IntEnum):
    """Opcodes.  Arguments are listed as a0..a5; ``data`` is the request payload."""

    NOP = 0  # benchmark: the host answers at once
    CANCEL = 1  # a0 = slot id of a parked call to abandon (answered ECANCELED)
    # -- files and paths (paths are absolute, UTF-8 with surrogateescape) --
    OPEN = 10  # data=path a0=flags a1=mode -> fd
    CLOSE = 11  # a0=fd
    READ = 12  # a0=fd a1=count -> bytes
    WRITE = 13  # a0=fd data -> count
    PREAD = 14  # a0=fd a1=count a2=offset -> bytes
    PWRITE = 15  # a0=fd a1=offset data -> count
    LSEEK = 16  # a0=fd a1=offset a2=whence -> position
    FSTAT = 17  # a0=fd -> STAT
    STAT = 18  # data=path a0=follow_symlinks -> STAT
    LISTDIR = 19  # data=path a0=start index -> dirents
    MKDIR = 20  # data=path a0=mode
    RMDIR = 21  # data=path
    UNLINK = 22  # data=path
    RENAME = 23  # data=src NUL dst
    FSYNC = 24  # a0=fd, a1=1: fdatasync (the data and its size, not the times)
    FTRUNCATE = 25  # a0=fd a1=length
    ACCESS = 26  # data=path a0=mode
    CHMOD = 27  # data=path a0=mode
    UTIME = 28  # data=path a0=have_times a1=atime_ns a2=mtime_ns
    READLINK = 29  # data=path -> target
    SYMLINK = 30  # data=target NUL linkpath
    ISATTY = 31  # a0=fd -> 0/1
    # a0=fd a1=LOCK_FLOCK/LOCK_POSIX a2=flock op (LOCK_SH/EX/UN) or lock type (F_RDLCK/WRLCK/UNLCK)
    # a3=start a4=length a5=whence.  Never blocks on the host: a lock held elsewhere is EAGAIN (the
    # enclave retries, parking only the lthread that waits).
    LOCK = 32
    STATVFS = 33  # a0=fd, or -1 for data=path -> STATVFS
    # data=path a0=limit -> the file's first min(size, a0) bytes; result 1 if it has more, else 0.
    # Only for a regular file: anything else is EINVAL (the enclave then opens it as usual).
    # One call where an import would make three (open, read, close): imports read hundreds.
    READFILE = 34
    # a0=fd a1=offset a2=size to cut the file to after the write (-1: leave it) data -> count,
    # then fdatasync: a write that is durable when it returns, in one host call instead of two
    # or three (each FS-shield commit writes the FSPF's copy and the dev-mode tag file so).
    # Nothing is cut or synced after a short write.
    PWRITE_SYNC = 35
    # -- sockets (host sockets are always non-blocking; FLAG_WAIT parks) --
    SOCKET = 40  # a0=family a1=type a2=proto -> fd
    SOCKETPAIR = 41  # a0=family a1=type a2=proto -> fd, data=i32 second fd
    BIND = 42  # a0=fd data=sockaddr
    LISTEN = 43  # a0=fd a1=backlog
    ACCEPT = 44  # a0=fd -> fd, data=u32 peer length + peer sockaddr + local sockaddr
    CONNECT = 45  # a0=fd data=sockaddr -> 0
    SEND = 46  # a0=fd a1=flags data -> count
    RECV = 47  # a0=fd a1=count a2=flags -> bytes
    SENDTO = 48  # a0=fd a1=flags data=u32 addrlen + sockaddr + payload -> count
    RECVFROM = 49  # a0=fd a1=count a2=flags -> u32 addrlen + sockaddr + payload
    SHUTDOWN = 50  # a0=fd a1=how
    SETSOCKOPT = 51  # a0=fd a1=level a2=opt a3=is_bytes a4=int value; data=bytes value
    GETSOCKOPT = 52  # a0=fd a1=level a2=opt a3=buflen (0: int) -> int or bytes
    GETSOCKNAME = 53  # a0=fd -> sockaddr
    GETPEERNAME = 54  # a0=fd -> sockaddr
    GETADDRINFO = 55  # data=host NUL port a0=family a1=type a2=proto a3=flags -> addrinfos
    GETHOSTNAME = 56  # -> name
    GETNAMEINFO = 57  # data=sockaddr a0=family a1=flags -> host NUL port
    POLL = 58  # data=pollfds a0=count -> pollfds with revents, result=ready count
    # -- processes (60-69: fork, wait, kill), semaphores (70-79), spawn (80-89), family pipes (90-99) --
    # A fork: the host forks itself (its copy serves the child's lane, holding the same host fds)
    # and answers the lane the child will use, 1..lanes.  The enclave forks right after.
    FORK = 60
    FORK_DONE = 61  # a0=lane a1=the child's pid, or -1: the fork failed (the host frees the lane)
    KILL = 62  # a0=pid (as kill(2): <= 0 names a process group) a1=signal
    FUTIME = 63  # a0=fd a1=have_times a2=atime_ns a3=mtime_ns (os.utime of an open file)
    # Descriptors passed between processes over an AF_UNIX socket (SCM_RIGHTS: stdlib/fdpass.py).
    SENDMSG_FDS = 64  # a0=fd a1=flags a2=nfds; data = nfds i32 host fds + payload -> count of the payload
    # a0=fd a1=count a2=flags a3=most fds to take -> count; data = RECVMSG_HEAD (nfds, msg_flags),
    # nfds i32 host fds (new, the host's now) and the payload.
    RECVMSG_FDS = 65
    # -- semaphores (multiprocessing's SemLock), arbitrated by the host: a real POSIX semaphore there.
    # A handle is the host's number for one open semaphore (valid in a forked child's host too).
    SEM_NEW = 70  # data=name a0=value a1=maxvalue a2=unlink now -> handle
    SEM_OPEN = 71  # data=name a0=maxvalue -> handle (sem_open of an existing name)
    # a0=handle a1=blocking -> 1 acquired, 0 not (non-blocking only).  A blocking one waits on a
    # host thread of its own (never an S-thread) until acquired or CANCELed (the enclave's timeout).
    SEM_ACQUIRE = 72
    SEM_RELEASE = 73  # a0=handle; EOVERFLOW: the value is at its maximum already
    SEM_VALUE = 74  # a0=handle -> the value
    SEM_CLOSE = 75  # a0=handle
    SEM_UNLINK = 76  # data=name
    # spawn (80-89): a fresh child enclave of the same runtime (host/spawn.py, enclave/stdlib/spawn.py).
    # data = SPAWN_FD pairs (child fd, parent host fd; 0-2 not named: the host's own) -> pid, data=i32 channel fd
    # (a new AF_UNIX stream socket to the child, for the attested channel: enclave/spawnchan.py).
    SPAWN = 80
    # a0=pid a1=options (os.WNOHANG) -> pid (0: still running, with WNOHANG), data=i32 wait status.
    # Only for a pid SPAWN answered; FLAG_WAIT parks it on the host's reactor until the child exits.
    SPAWN_WAIT = 81
    SPAWN_KILL = 82  # a0=pid a1=signal (only for a pid SPAWN answered and not yet reaped)


#: The largest value of a semaphore (Linux's SEM_VALUE_MAX, INT_MAX).
SEM_VALUE_MAX = 2**31 - 1

#: ``Op.RECVMSG_FDS``'s answer starts with (how many fds, the msg_flags).
RECVMSG_HEAD = struct.Struct("<Ii")

#: ``Op.SPAWN``'s request: (child fd, host fd) pairs.
SPAWN_FD = struct.Struct("<ii")

#: ``Op.LOCK`` a1: which lock family.
LOCK_FLOCK, LOCK_POSIX = 0, 1

#: Opcodes whose result is a new host file descriptor.
NEW_FD_OPS = frozenset({Op.OPEN, Op.SOCKET, Op.SOCKETPAIR, Op.ACCEPT})


# -- stat -----------------------------------------------------------------------------

STAT = struct.Struct("<13q")


@dataclass(frozen=True, slots=True)
class StatResult:
    mode: int
    ino: int
    dev: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int
    blocks: int
    rdev: int

    def pack(self) -> bytes:
        return STAT.pack(
            self.mode, self.ino, self.dev, self.nlink, self.uid, self.gid, self.size,
            self.atime_ns, self.mtime_ns, self.ctime_ns, self.blksize, self.blocks, self.rdev,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes) -> StatResult:
        if len(data) != STAT.size:
            raise ABIError(f"stat payload is {len(data)} bytes, expected {STAT.size}")
        st = cls(*STAT.unpack(data))
        if not 0 <= st.mode < 1 << 16 or stat_mod.S_IFMT(st.mode) not in _FILE_KINDS:
            raise ABIError(f"stat mode {st.mode:#o} is not a valid file mode")
        if min(st.ino, st.nlink, st.uid, st.gid, st.size, st.blksize, st.blocks) < 0:
            raise ABIError("stat has a negative field")
        return st

    def to_os(self) -> object:
        """The ``os.stat_result`` the stdlib would return."""
        import os

        def sec(ns: int) -> float:
            return ns / 1e9

        fields = (
            self.mode, self.ino, self.dev, self.nlink, self.uid, self.gid, self.size,
            self.atime_ns // 10**9, self.mtime_ns // 10**9, self.ctime_ns // 10**9,
            sec(self.atime_ns), sec(self.mtime_ns), sec(self.ctime_ns),
            self.atime_ns, self.mtime_ns, self.ctime_ns,
            self.blksize, self.blocks, self.rdev,
        )  # fmt: skip
        return os.stat_result(fields)


_FILE_KINDS = frozenset(
    {
        stat_mod.S_IFREG,
        stat_mod.S_IFDIR,
        stat_mod.S_IFLNK,
        stat_mod.S_IFCHR,
        stat_mod.S_IFBLK,
        stat_mod.S_IFIFO,
        stat_mod.S_IFSOCK,
    }
)


def stat_from_os(st: object) -> StatResult:
    """Host side: pack an ``os.stat_result``."""
    g = st.__getattribute__
    return StatResult(
        g("st_mode"), g("st_ino"), g("st_dev"), g("st_nlink"), g("st_uid"), g("st_gid"),
        g("st_size"), g("st_atime_ns"), g("st_mtime_ns"), g("st_ctime_ns"),
        g("st_blksize"), g("st_blocks"), g("st_rdev"),
    )  # fmt: skip


# -- statvfs --------------------------------------------------------------------------

STATVFS = struct.Struct("<10qQ")


@dataclass(frozen=True, slots=True)
class StatvfsResult:
    """``statvfs(3)``: the ten fields of ``os.statvfs_result`` in order, then ``f_fsid``."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    flag: int
    namemax: int
    fsid: int

    def pack(self) -> bytes:
        return STATVFS.pack(
            self.bsize, self.frsize, self.blocks, self.bfree, self.bavail, self.files, self.ffree,
            self.favail, self.flag, self.namemax, self.fsid,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes) -> StatvfsResult:
        if len(data) != STATVFS.size:
            raise ABIError(f"statvfs payload is {len(data)} bytes, expected {STATVFS.size}")
        return cls(*STATVFS.unpack(data))

    @classmethod
    def from_os(cls, st: object) -> StatvfsResult:
        """Host side."""
        g = st.__getattribute__
        names = ("bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail", "flag", "namemax", "fsid")
        return cls.unpack(STATVFS.pack(*(g("f_" + n) for n in names)))

    def to_os(self) -> object:
        import os

        fields = (self.bsize, self.frsize, self.blocks, self.bfree, self.bavail, self.files, self.ffree)
        return os.statvfs_result((*fields, self.favail, self.flag, self.namemax), {"f_fsid": self.fsid})


# -- directory entries ----------------------------------------------------------------

DIRENT = struct.Struct("<BH")  # d_type (one of DT_*), name length
DT_UNKNOWN, DT_REG, DT_DIR, DT_LNK, DT_OTHER = 0, 1, 2, 3, 4
DIRENTS_HEAD = struct.Struct("<IB")  # count, more-follows


@dataclass(frozen=True, slots=True)
class Dirent:
    name: str
    dtype: int


def encode_dirents(entries: list[Dirent], more: bool) -> bytes:
    out = [DIRENTS_HEAD.pack(len(entries), int(more))]
    for e in entries:
        raw = e.name.encode("utf-8", "surrogateescape")
        out.append(DIRENT.pack(e.dtype, len(raw)))
        out.append(raw)
    return b"".join(out)


def decode_dirents(data: bytes) -> tuple[list[Dirent], bool]:
    """Strictly decode a directory page.  Rejects '.', '..', '/' or NUL in names, duplicates."""
    if len(data) < DIRENTS_HEAD.size:
        raise ABIError("directory payload too short")
    count, more = DIRENTS_HEAD.unpack_from(data, 0)
    if more > 1:
        raise ABIError("directory 'more' flag is not a boolean")
    pos = DIRENTS_HEAD.size
    seen: set[str] = set()
    entries = []
    for _ in range(count):
        if pos + DIRENT.size > len(data):
            raise ABIError("directory entry runs past the payload")
        dtype, n = DIRENT.unpack_from(data, pos)
        pos += DIRENT.size
        raw = data[pos : pos + n]
        pos += n
        if len(raw) != n or n == 0 or dtype > DT_OTHER:
            raise ABIError("malformed directory entry")
        if b"/" in raw or b"\0" in raw or raw in (b".", b".."):
            raise ABIError(f"directory entry {raw[:40]!r} is not a valid file name")
        name = raw.decode("utf-8", "surrogateescape")
        if name in seen:
            raise ABIError(f"directory entry {name!r} listed twice")
        seen.add(name)
        entries.append(Dirent(name, dtype))
    if pos != len(data):
        raise ABIError("trailing bytes after directory entries")
    return entries, bool(more)


# -- socket addresses -----------------------------------------------------------------
#
# Requests carry the app's address as given (a host name is resolved by the host, as
# the stdlib would).  Responses carry numeric addresses only, which the enclave checks.

INET_ADDR = struct.Struct("<HII")  # port, flowinfo, scope_id; followed by the host text

SockAddr = tuple[str, int] | tuple[str, int, int, int] | str | bytes


def encode_sockaddr(family: int, addr: object) -> bytes:
    """Encode an address for the given family.  Raises TypeError/ValueError like the stdlib."""
    if family == socket.AF_UNIX:
        if isinstance(addr, str):
            return addr.encode("utf-8", "surrogateescape")
        if isinstance(addr, (bytes, bytearray, memoryview)):
            return bytes(addr)
        raise TypeError("a bytes-like object or str is required for AF_UNIX addresses")
    if family in (socket.AF_INET, socket.AF_INET6):
        if not isinstance(addr, tuple) or len(addr) not in ((2,) if family == socket.AF_INET else (2, 3, 4)):
            want = "(host, port)" if family == socket.AF_INET else "(host, port[, flowinfo[, scope_id]])"
            raise TypeError(f"AF_INET{'6' if family == socket.AF_INET6 else ''} address must be a tuple {want}")
        host, port = addr[0], addr[1]
        if not isinstance(host, (str, bytes, bytearray)):
            raise TypeError(f"str, bytes or bytearray expected, not {type(host).__name__}")
        if not isinstance(port, int):
            raise TypeError(f"'{type(port).__name__}' object cannot be interpreted as an integer")
        if not 0 <= port <= 0xFFFF:
            raise OverflowError("bind(): port must be 0-65535.")
        flow = addr[2] if len(addr) > 2 else 0
        scope = addr[3] if len(addr) > 3 else 0
        text = host if isinstance(host, str) else bytes(host).decode("idna")
        return INET_ADDR.pack(port, flow, scope) + text.encode("idna" if not text.isascii() else "ascii")
    raise OSError(97, f"address family {family} is not supported inside a pyscone enclave")


def decode_request_sockaddr(family: int, data: bytes) -> SockAddr:
    """Host side: turn an encoded request address back into a stdlib address."""
    if family == socket.AF_UNIX:
        return data.decode("utf-8", "surrogateescape") if data[:1] != b"\0" else data
    port, flow, scope = INET_ADDR.unpack_from(data, 0)
    host = data[INET_ADDR.size :].decode("ascii")
    if family == socket.AF_INET:
        return (host, port)
    return (host, port, flow, scope)


def decode_sockaddr(family: int, data: bytes) -> SockAddr:
    """Enclave side: strictly decode a numeric address from the host."""
    if family == socket.AF_UNIX:
        if len(data) > 108:
            raise ABIError("AF_UNIX address longer than sun_path")
        return data.decode("utf-8", "surrogateescape") if data[:1] != b"\0" else data
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ABIError(f"address of unknown family {family}")
    if len(data) < INET_ADDR.size:
        raise ABIError("socket address too short")
    port, flow, scope = INET_ADDR.unpack_from(data, 0)
    raw = data[INET_ADDR.size :]
    try:
        text = raw.decode("ascii")
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        raise ABIError(f"socket address {raw[:64]!r} is not a numeric IP address") from None
    if port > 0xFFFF:
        raise ABIError("port out of range")
    if family == socket.AF_INET:
        if ip.version != 4 or flow or scope:
            raise ABIError("AF_INET address is not IPv4")
        return (text, port)
    if ip.version != 6:
        raise ABIError("AF_INET6 address is not IPv6")
    return (text, port, flow, scope)


def encode_result_sockaddr(family: int, addr: object) -> bytes:
    """Host side: encode an address returned by the kernel."""
    if family == socket.AF_UNIX:
        return addr if isinstance(addr, bytes) else str(addr).encode("utf-8", "surrogateescape")
    assert isinstance(addr, tuple)
    flow = addr[2] if len(addr) > 2 else 0
    scope = addr[3] if len(addr) > 3 else 0
    return INET_ADDR.pack(addr[1], flow, scope) + str(addr[0]).encode("ascii")


# -- getaddrinfo -----------------------------------------------------------------------

ADDRINFO = struct.Struct("<iiiHH")  # family, type, proto, canonname length, sockaddr length


def encode_addrinfo(infos: list[tuple[int, int, int, str, object]]) -> bytes:
    out = [struct.pack("<H", len(infos))]
    for family, type_, proto, canon, sa in infos:
        c = canon.encode("utf-8")
        a = encode_result_sockaddr(family, sa)
        out += [ADDRINFO.pack(family, type_, proto, len(c), len(a)), c, a]
    return b"".join(out)


def decode_addrinfo(data: bytes) -> list[tuple[int, int, int, str, SockAddr]]:
    if len(data) < 2:
        raise ABIError("address-info payload too short")
    (count,) = struct.unpack_from("<H", data, 0)
    pos = 2
    out = []
    for _ in range(count):
        if pos + ADDRINFO.size > len(data):
            raise ABIError("address-info entry runs past the payload")
        family, type_, proto, nc, na = ADDRINFO.unpack_from(data, pos)
        pos += ADDRINFO.size
        canon, sa = data[pos : pos + nc], data[pos + nc : pos + nc + na]
        pos += nc + na
        if len(canon) != nc or len(sa) != na or family not in (socket.AF_INET, socket.AF_INET6):
            raise ABIError("malformed address-info entry")
        try:
            canon_text = canon.decode("utf-8")
        except UnicodeDecodeError:
            raise ABIError("address-info canonical name is not UTF-8") from None
        out.append((family, type_, proto, canon_text, decode_sockaddr(family, sa)))
    if pos != len(data):
        raise ABIError("trailing bytes after address-info entries")
    return out


# -- poll sets ---------------------------------------------------------------------------

POLLFD = struct.Struct("<ihh")  # fd, events, revents
POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP, POLLNVAL = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20


def encode_pollfds(fds: list[tuple[int, int]]) -> bytes:
    return b"".join(POLLFD.pack(fd, ev, 0) for fd, ev in fds)


def decode_pollfds(request: list[tuple[int, int]], data: bytes) -> list[tuple[int, int]]:
    """Enclave side: check the host answered exactly the poll set it was asked."""
    if len(data) != POLLFD.size * len(request):
        raise ABIError("poll answer has the wrong size")
    out = []
    for i, (fd, ev) in enumerate(request):
        rfd, rev, revents = POLLFD.unpack_from(data, i * POLLFD.size)
        if rfd != fd or rev != ev:
            raise ABIError("poll answer names a different file descriptor")
        if revents & ~(ev | POLLERR | POLLHUP | POLLNVAL) & 0xFFFF:
            raise ABIError(f"poll reports events {revents:#x} that were not asked for")
        if revents:
            out.append((fd, revents & 0xFFFF))
    return out


# -- shared header -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Geometry:
    """Sizes of the shared mapping, fixed when the launcher creates it."""

    nslots: int = DEFAULT_SLOTS
    slot_data: int = DEFAULT_SLOT_DATA

    def __post_init__(self) -> None:
        if not 1 <= self.nslots <= MAX_SLOTS:
            raise ValueError(f"slots must be between 1 and {MAX_SLOTS}")
        if not 4096 <= self.slot_data <= 1 << 24 or self.slot_data % 64:
            raise ValueError("slot data size must be a multiple of 64 between 4 KiB and 16 MiB")

    @property
    def ring_size(self) -> int:
        n = 1
        while n < self.nslots:
            n <<= 1
        return n

    @property
    def req_ring_off(self) -> int:
        return HEADER_SIZE

    @property
    def resp_ring_off(self) -> int:
        return HEADER_SIZE + 4 * self.ring_size

    @property
    def slot_stride(self) -> int:
        return SLOT_HEADER + self.slot_data

    @property
    def slots_off(self) -> int:
        end = self.resp_ring_off + 4 * self.ring_size
        return (end + 4095) & ~4095

    @property
    def total_size(self) -> int:
        return self.slots_off + self.nslots * self.slot_stride

    def slot_off(self, slot: int) -> int:
        return self.slots_off + slot * self.slot_stride
