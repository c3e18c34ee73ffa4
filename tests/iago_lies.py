"""Randomized lies of the right shape, per opcode, for the hostile-host fuzz.

:func:`draw_lie` turns the honest answer to one request into what a lying host
sends instead: sometimes the truth, sometimes a failure (errnos valid and
invalid), sometimes junk, and mostly a *shaped* lie, built the way that
opcode's answer is built (counts in and out of range, fds new, aliased and out
of range, stat records with random fields, directory pages with repeated or
bad names, addresses of every family, address-info lists, poll sets...).
Each lie is drawn from hypothesis, so a failure shrinks to a small one.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from pyscone import abi
from pyscone.abi import Op

Answer = tuple[int, int, bytes]
Draw = Callable[[st.SearchStrategy[Any]], Any]

ERRNOS = st.sampled_from([1, 2, 4, 5, 9, 11, 13, 17, 20, 21, 22, 28, 32, 104, 110, 111, 125, 133, 4095])
BAD_ERRNOS = st.sampled_from([0, -1, 4096, 99999, 2**31 - 1, -(2**31)])
NAMES = ["a", "b", "passwd", "x" * 200, "é", "\udcff", ".hidden", "...", "a b"]
BAD_NAMES = [".", "..", "a/b", "x\0y", "/"]
IPS4 = ["127.0.0.1", "10.6.6.6", "0.0.0.0", "255.255.255.255", "127.0.0.2"]
IPS6 = ["::1", "::", "fe80::1%1", "::ffff:127.0.0.1", "::ffff:10.6.6.6", "2001:db8::6"]
NOT_IPS = ["not-an-ip", "", "1.2.3", "localhost", "127.0.0.1 ", "::g"]


def near(draw: Draw, around: list[int], lo: int = -(2**40), hi: int = 2**40) -> int:
    """An integer near one of the interesting values, or anywhere in [lo, hi].

    (Every draw's bounds are constants: the honest answer only shifts a value, so hypothesis
    sees the same shape of choices whatever the host's state, and can replay and shrink.)
    """
    i = draw(st.integers(0, len(around)))
    if i == len(around):
        return int(draw(st.integers(lo, hi)))
    return int(around[i] + draw(st.integers(-2, 2)))


def fixed(values: list[Any], n: int, filler: Any) -> list[Any]:
    """Exactly ``n`` of ``values`` (padded with ``filler``): a choice list of constant length."""
    return (list(values) + [filler] * n)[:n]


# -- payload builders (they may encode values the ABI decoders must refuse) --------------------


def sockaddr(draw: Draw, family: int) -> bytes:
    if family == socket.AF_UNIX or draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"", b"/tmp/x", b"\0abstract", b"x" * 109, b"\xff\xfe"]))
    pool = IPS4 if family == socket.AF_INET else IPS6
    text = draw(st.sampled_from(pool + NOT_IPS + (IPS6 if family == socket.AF_INET else IPS4)))
    port = draw(st.sampled_from([0, 80, 443, 65535]) | st.integers(0, 65535))
    flow, scope = draw(st.sampled_from([(0, 0), (0, 0), (1, 0), (0, 7)]))
    return abi.INET_ADDR.pack(port, flow, scope) + text.encode("ascii")


STAT_FIELDS = ("mode", "ino", "dev", "nlink", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns", "blksize")
KINDS = [0o100000, 0o040000, 0o120000, 0o020000, 0o060000, 0o010000, 0o140000, 0o170000, 0]


def stat_record(draw: Draw, honest: abi.StatResult | None) -> bytes:
    """The honest stat with one field changed (often), or with every field drawn."""
    base = honest or abi.StatResult(0o100644, 1, 2, 1, 0, 0, 10, 0, 0, 0, 4096, 8, 0)
    mode = draw(
        st.sampled_from([base.mode])
        | st.builds(lambda k, p: k | p, st.sampled_from(KINDS), st.integers(0, 0o7777))
        | st.integers(-1, 1 << 17)
    )
    values = [
        draw(st.sampled_from([getattr(base, f), 0, -1, 1 << 32, 2**63 - 1]) | st.integers()) for f in STAT_FIELDS[1:]
    ]
    fields = [mode, *(max(min(v, 2**63 - 1), -(2**63)) for v in values)]
    if draw(st.booleans()):  # one field only
        one = draw(st.integers(0, len(STAT_FIELDS) - 1))
        fields = [fields[i] if i == one else getattr(base, f) for i, f in enumerate(STAT_FIELDS)]
    packed = abi.STAT.pack(*fields, draw(st.sampled_from([base.blocks, base.blocks, -1, 0])), base.rdev)
    cut = draw(st.sampled_from([None, None, None, None, 0, 8, abi.STAT.size - 1]))
    return packed if cut is None else packed[:cut]


def dirents(draw: Draw, honest_names: list[str], seen: set[str]) -> tuple[int, bytes]:
    pool = fixed(honest_names, 3, "a") + fixed(sorted(seen), 3, "b") + NAMES + BAD_NAMES
    names = draw(st.lists(st.sampled_from(pool), max_size=6))
    if draw(st.booleans()):  # the honest page with one name changed, added or dropped
        names = list(honest_names)
        i = draw(st.integers(0, 50)) % (len(names) + 1)
        how = draw(st.sampled_from(["replace", "insert", "drop"]))
        new = draw(st.sampled_from(pool))
        if how == "insert" or not names:
            names.insert(i, new)
        elif how == "replace":
            names[min(i, len(names) - 1)] = new
        else:
            del names[min(i, len(names) - 1)]
    out = []
    for name in names:
        raw = name.encode("utf-8", "surrogateescape")
        out.append(abi.DIRENT.pack(draw(st.integers(0, 6)), len(raw)) + raw)
    more = draw(st.sampled_from([0, 0, 1, 2]))
    count = len(names) + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    body = abi.DIRENTS_HEAD.pack(max(count, 0), more) + b"".join(out)
    if draw(st.integers(0, 15)) == 0:
        body += b"\0"  # trailing garbage
    return draw(st.sampled_from([len(names), len(names), count])), body


def addrinfo(draw: Draw, args: tuple[int, ...], req: bytes, honest_infos: list[Any]) -> tuple[int, bytes]:
    if draw(st.booleans()):
        return _mutated_addrinfo(draw, args, req, honest_infos)
    family, type_, proto = args[0], args[1], args[2]
    host = req.partition(b"\0")[0].decode(errors="replace")
    n = draw(st.integers(0, 4))
    out = [struct.pack("<H", n)]
    for _ in range(n):
        f = draw(st.sampled_from([family or socket.AF_INET, socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, 99]))
        t = draw(st.sampled_from([type_ or socket.SOCK_STREAM, 1, 2, 3, 5, 0, 99]))
        p = draw(st.sampled_from([proto, 0, 6, 17, 132]))
        canon = draw(st.sampled_from(["", "", "localhost", "evil.example", "\udcff"]))
        honest_ips = fixed([str(i[4][0]) for i in honest_infos], 2, "::1")
        ip = draw(st.sampled_from([*honest_ips, host, "10.6.6.6", "::ffff:127.0.0.1", "0.0.0.0", "::", "127.0.0.1"]))
        honest_ports = fixed([int(i[4][1]) for i in honest_infos], 1, 0)
        port = draw(st.sampled_from([*honest_ports, 0, 80, 6666]))
        flow, scope = draw(st.sampled_from([(0, 0), (0, 0), (0, 1)]))
        try:
            sa = abi.INET_ADDR.pack(port, flow, scope) + ip.encode("ascii")
            c = canon.encode("utf-8", "surrogateescape")
        except UnicodeError:
            continue
        out.append(abi.ADDRINFO.pack(f, t, p, len(c), len(sa)) + c + sa)
    return draw(st.sampled_from([n, n, n + 1])), b"".join(out)


def _mutated_addrinfo(draw: Draw, args: tuple[int, ...], req: bytes, honest: list[Any]) -> tuple[int, bytes]:
    """The honest answer with one aspect of one entry changed, or entries dropped or repeated."""
    infos = [list(i) for i in honest] or [[socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)]]
    i = draw(st.integers(0, 50)) % len(infos)
    what = draw(st.sampled_from(["family", "type", "proto", "canon", "ip", "port", "drop", "repeat", "none"]))
    entry = infos[i]
    other_family = socket.AF_INET6 if entry[0] == socket.AF_INET else socket.AF_INET
    if what == "family":
        entry[0] = other_family
        entry[4] = ("::1", entry[4][1], 0, 0) if other_family == socket.AF_INET6 else ("127.0.0.1", entry[4][1])
    elif what == "type":
        entry[1] = draw(st.sampled_from([1, 2, 3, 5, 99]))
    elif what == "proto":
        entry[2] = draw(st.sampled_from([0, 6, 17, 132]))
    elif what == "canon":
        entry[3] = draw(st.sampled_from(["", "evil.example", "localhost"]))
    elif what == "ip":
        pool = IPS4 if entry[0] == socket.AF_INET else IPS6
        entry[4] = (draw(st.sampled_from(pool)), *entry[4][1:])
    elif what == "port":
        entry[4] = (entry[4][0], draw(st.sampled_from([0, 80, 6666, 65535])), *entry[4][2:])
    elif what == "drop":
        infos = infos[: draw(st.integers(0, 1))]
    elif what == "repeat":
        infos.append(list(entry))
    return len(infos), abi.encode_addrinfo([tuple(e) for e in infos])  # type: ignore[misc]


# -- per-opcode shaped lies ---------------------------------------------------------------------


def _none(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    return draw(st.sampled_from([(0, 0, b""), (0, 0, b""), (1, 0, b""), (0, 0, b"x"), (7, 0, b"")]))


def _read(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    count = args[1]
    n = draw(st.integers(0, min(count + 2, 4096)))
    content = draw(st.sampled_from([honest[2][:n], b"FORGED" * (n // 6 + 1)]) | st.binary(min_size=n, max_size=n))[:n]
    result = draw(st.sampled_from([len(content), len(content), len(content) + 1, count, count + 1]))
    return (result, 0, content)


def _readfile(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    limit = args[0]
    n = draw(st.sampled_from([0, 1, 5, limit - 1, limit, limit + 1]))
    content = (honest[2] + b"FORGED" * (n // 6 + 1))[: max(0, n)]
    return (draw(st.sampled_from([0, 0, 1, 1, 2, -2])), 0, content)


def _count(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    given = len(req) - (4 + struct.unpack_from("<I", req, 0)[0] if op == Op.SENDTO else 0)
    result = near(draw, [0, honest[0], given], -3)
    return (result, 0, draw(st.sampled_from([b"", b"", b"", b"x"])))


def _fd(draw: Draw, ctx: Any, honest_fd: int) -> int:
    known = sorted(ctx.fds.kinds)
    return int(
        draw(
            st.sampled_from([honest_fd, 0, 1, 2, abi.MAX_FD - 1, abi.MAX_FD, 2**31 - 1, -1, *fixed(known[-4:], 4, 3)])
            | st.integers(3, 4096)
        )
    )


def _new_fd(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    fd = _fd(draw, ctx, honest[0])
    if op == Op.SOCKETPAIR:
        second = _fd(draw, ctx, struct.unpack("<i", honest[2])[0] if len(honest[2]) == 4 else min(fd + 1, 2**31 - 1))
        payload = draw(st.sampled_from([struct.pack("<i", second), b"", b"\0" * 8]))
        return (fd, 0, payload)
    if op == Op.ACCEPT:
        family = ctx.fds.families.get(args[0], socket.AF_INET)
        peer, local = sockaddr(draw, family), sockaddr(draw, family)
        if draw(st.booleans()) and honest[0] >= 0:
            (plen,) = struct.unpack_from("<I", honest[2], 0)
            peer, local = honest[2][4 : 4 + plen], honest[2][4 + plen :]
        plen = draw(st.sampled_from([len(peer), len(peer), len(peer) + len(local) + 1]))
        return (fd, 0, struct.pack("<I", plen) + peer + local)
    return (fd, 0, draw(st.sampled_from([b"", b"", b"", b"x"])))


def _lseek(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    offset = args[1]
    return (near(draw, [offset, honest[0], 0, offset + 10], -3), 0, b"")


def _stat(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    base = abi.StatResult.unpack(honest[2]) if honest[0] == 0 else None
    return (draw(st.sampled_from([0, 0, 0, 1])), 0, stat_record(draw, base))


def _statvfs(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    base = list(abi.STATVFS.unpack(honest[2])) if honest[0] == 0 else [4096, 4096, 100, 50, 40, 10, 5, 5, 0, 255, 1]
    edges = [0, -1, 1, 2**31, 2**32, 2**62, 4097, 1 << 16]
    for _ in range(draw(st.integers(0, 3))):  # a few fields moved, near the honest value or to an edge
        field = draw(st.integers(0, 10))
        value = near(draw, [base[field], *edges], 0 if field == 10 else -(2**40))
        base[field] = max(0, value) if field == 10 else value
    body = abi.STATVFS.pack(*base)
    body = draw(st.sampled_from([body, body, body, body[:-1], body + b"\0"]))
    return (draw(st.sampled_from([0, 0, 0, 1])), 0, body)


def _listdir(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    names = [e.name for e in abi.decode_dirents(honest[2])[0]] if honest[0] >= 0 else []
    count, body = dirents(draw, names, ctx.seen_names)
    return (count, 0, body)


def _bool(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    return (draw(st.sampled_from([0, 1, 1, 2, -1])), 0, draw(st.sampled_from([b"", b"", b"\1"])))


def _text(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    text = draw(
        st.sampled_from([b"", b"/etc/passwd", b"../../x", b"a\0b", b"x" * 64, b"x" * 65, b"y" * 4097, honest[2]])
        | st.binary(max_size=80)
    )
    return (draw(st.sampled_from([0, 0, 0, 1])), 0, text)


def _getsockopt(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    if args[3]:
        return (draw(st.sampled_from([0, 0, 1])), 0, draw(st.binary(max_size=args[3] + 2)))
    fd = args[0]
    recorded = [ctx.fds.types.get(fd, 1), ctx.fds.families.get(fd, 2), ctx.fds.protos.get(fd, 6)]
    value = draw(
        st.sampled_from([honest[0], *recorded, 0, 1, 2, 3, 5, 10, 17, 99999, -1, 2**31])
        | st.integers(-(2**63), 2**63 - 1)
    )
    return (value, 0, draw(st.sampled_from([b"", b"", b"", b"x"])))


def _sockname(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    family = draw(st.sampled_from([ctx.fds.families.get(args[0], socket.AF_INET)] * 3 + [socket.AF_INET6, 1]))
    return (draw(st.sampled_from([0, 0, 0, 1])), 0, sockaddr(draw, family))


def _recvfrom(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    family = ctx.fds.families.get(args[0], socket.AF_INET)
    addr = draw(st.sampled_from([b"", b"", sockaddr(draw, family)]))
    if draw(st.booleans()) and honest[0] >= 0:
        (alen,) = struct.unpack_from("<I", honest[2], 0)
        addr = draw(st.sampled_from([honest[2][4 : 4 + alen], b""]))
    count = args[1]
    n = draw(st.integers(0, min(count + 2, 3000)))
    payload = draw(st.sampled_from([b"FORGED" * (n // 6 + 1)]) | st.binary(min_size=n, max_size=n))[:n]
    alen = draw(st.sampled_from([len(addr), len(addr), len(addr) + len(payload) + 1]))
    result = draw(st.sampled_from([len(payload), len(payload), len(payload) + 1, count + 1]))
    return (result, 0, struct.pack("<I", alen) + addr + payload)


def _addrinfo(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    infos = abi.decode_addrinfo(honest[2]) if honest[0] >= 0 else []
    count, body = addrinfo(draw, args, req, infos)
    return (count, 0, body)


def _nameinfo(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    asked = req[abi.INET_ADDR.size :]
    h_host, _, h_port = honest[2].partition(b"\0")
    host = draw(st.sampled_from([h_host, asked, b"10.6.6.6", b"localhost", b"evil.example", b"", b"::1"]))
    port = draw(st.sampled_from([h_port, b"6666", b"http", b"", b"80", b"443"]))
    sep = draw(st.sampled_from([b"\0", b"\0", b"", b"\0\0"]))
    return (draw(st.sampled_from([0, 0, 0, 2])), 0, host + sep + port)


def _poll(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    asked = [abi.POLLFD.unpack_from(req, i * abi.POLLFD.size)[:2] for i in range(args[0])]
    out, ready = [], 0
    for fd, ev in asked:
        bits = ev | abi.POLLERR | abi.POLLHUP | abi.POLLNVAL
        revents = draw(st.sampled_from([0, 0, ev, abi.POLLHUP, abi.POLLNVAL, bits, abi.POLLOUT, 0x400]))
        rfd = draw(st.sampled_from([fd, fd, fd, fd + 1000]))
        out.append(abi.POLLFD.pack(rfd, ev, revents))
        ready += bool(revents)
    body = b"".join(out)
    body = draw(st.sampled_from([body, body, body, body[:-1], body + abi.POLLFD.pack(1, abi.POLLIN, abi.POLLIN)]))
    return (draw(st.sampled_from([ready, ready, ready + 1, max(ready - 1, 0)])), 0, body)


def _sem_number(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    """A semaphore's handle, its value, or "taken" (1) / "not taken" (0)."""
    value = near(draw, [honest[0], 0, 1, abi.SEM_VALUE_MAX + 1, 2**40], lo=-(2**40), hi=2**40)
    return (value, 0, draw(st.sampled_from([b"", b"", b"", b"\1"])))


def _lane(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    """A forked child's lane: the host names any number."""
    lane = near(draw, [1, 2, 8, 0, 2**40], lo=-(2**40), hi=2**40)
    return (lane, 0, draw(st.sampled_from([b"", b"", b"", b"\1"])))


def _spawn(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    """A spawned child's pid and its channel's fd, a wait's pid and status word."""
    if op == Op.SPAWN:
        pid = near(draw, [12345, 1, 0, 2**31 - 1, 2**31], lo=-(2**40), hi=2**40)
        fd = _fd(draw, ctx, 4000)
        return (pid, 0, draw(st.sampled_from([struct.pack("<i", fd), b"", b"\0" * 8])))
    pid = draw(st.sampled_from([args[0], args[0], 0, args[0] + 1, -1]))
    status = draw(st.sampled_from([0, 3 << 8, 9, 15, 0x137F, 0xFFFF, 0x80, 2**31 - 1]) | st.integers(0, 2**16))
    return (pid, 0, draw(st.sampled_from([struct.pack("<i", status), b"", b"\0" * 8])))


def _fd_message(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    """Bytes sent with fds; or a message received: its bytes, fds (fresh or not, repeated) and flags."""
    if op == Op.SENDMSG_FDS:
        given = len(req) - 4 * args[2]
        return (near(draw, [0, honest[0], given], -3), 0, draw(st.sampled_from([b"", b"", b"", b"x"])))
    n = draw(st.integers(0, 5))
    fds = [_fd(draw, ctx, 4000 + i) for i in range(n)]
    if n >= 2 and draw(st.booleans()):
        fds[1] = fds[0]
    content = draw(st.binary(max_size=300))
    flags = draw(st.sampled_from([0, 0, socket.MSG_CTRUNC, socket.MSG_TRUNC, socket.MSG_CMSG_CLOEXEC, 0x10000, -1]))
    claimed = draw(st.sampled_from([n, n, n, n + 1, max(n - 1, 0)]))
    result = draw(st.sampled_from([len(content), len(content), len(content) + 1, args[1] + 1]))
    body = b"".join(struct.pack("<i", fd) for fd in fds) + content
    return (result, 0, abi.RECVMSG_HEAD.pack(claimed, flags) + body)


SHAPED: dict[int, Callable[[Draw, int, tuple[int, ...], bytes, Answer, Any], Answer]] = {
    **{op: _none for op in (Op.NOP, Op.CANCEL, Op.CLOSE, Op.MKDIR, Op.RMDIR, Op.UNLINK, Op.RENAME, Op.FSYNC)},
    **{op: _none for op in (Op.FTRUNCATE, Op.CHMOD, Op.UTIME, Op.SYMLINK, Op.BIND, Op.LISTEN, Op.CONNECT)},
    **{op: _none for op in (Op.SHUTDOWN, Op.SETSOCKOPT, Op.LOCK, Op.FORK_DONE, Op.KILL, Op.FUTIME)},
    Op.FORK: _lane,
    **{op: _read for op in (Op.READ, Op.PREAD, Op.RECV)},
    **{op: _count for op in (Op.WRITE, Op.PWRITE, Op.PWRITE_SYNC, Op.SEND, Op.SENDTO)},
    **{op: _new_fd for op in (Op.OPEN, Op.SOCKET, Op.SOCKETPAIR, Op.ACCEPT)},
    Op.LSEEK: _lseek,
    Op.FSTAT: _stat,
    Op.STAT: _stat,
    Op.LISTDIR: _listdir,
    Op.ACCESS: _bool,
    Op.ISATTY: _bool,
    Op.STATVFS: _statvfs,
    Op.READFILE: _readfile,
    Op.READLINK: _text,
    Op.GETHOSTNAME: _text,
    Op.GETSOCKOPT: _getsockopt,
    Op.GETSOCKNAME: _sockname,
    Op.GETPEERNAME: _sockname,
    Op.RECVFROM: _recvfrom,
    Op.GETADDRINFO: _addrinfo,
    Op.GETNAMEINFO: _nameinfo,
    Op.POLL: _poll,
    **{op: _sem_number for op in (Op.SEM_NEW, Op.SEM_OPEN, Op.SEM_ACQUIRE, Op.SEM_VALUE)},
    **{op: _none for op in (Op.SEM_RELEASE, Op.SEM_CLOSE, Op.SEM_UNLINK)},
    Op.SPAWN: _spawn,
    Op.SPAWN_WAIT: _spawn,
    Op.SPAWN_KILL: _none,
    **{op: _fd_message for op in (Op.SENDMSG_FDS, Op.RECVMSG_FDS)},
}


def _failure(draw: Draw, op: int) -> Answer:
    if op in (Op.GETADDRINFO, Op.GETNAMEINFO) and draw(st.booleans()):
        code = draw(st.sampled_from([b"-2", b"-3", b"-8", b"0", b"-99999", b"--2", b"x", b"123456789"]))
        return (-1, 0, code)
    result = draw(st.sampled_from([-1, -1, -1, -2, -(2**40)]))
    err = draw(ERRNOS | BAD_ERRNOS)
    return (result, err, draw(st.sampled_from([b"", b"", b"", b"x"])))


def _junk(draw: Draw) -> Answer:
    return (
        draw(st.integers(-(2**63), 2**63 - 1) | st.integers(-3, 300)),
        draw(st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 0, 0, 5])),
        draw(st.binary(max_size=200)),
    )


def draw_lie(draw: Draw, op: int, args: tuple[int, ...], req: bytes, honest: Answer, ctx: Any) -> Answer:
    """What the lying host answers instead of ``honest``."""
    how = draw(st.sampled_from(["honest", "failure", "junk", "success-with-errno", "shaped", "shaped", "shaped"]))
    if how == "honest":
        return honest
    if how == "failure":
        return _failure(draw, op)
    if how == "junk":
        return _junk(draw)
    r, _, payload = SHAPED[op](draw, op, args, req, honest, ctx)
    if how == "success-with-errno":
        return (r, draw(ERRNOS), payload)
    return (r, 0, payload)
