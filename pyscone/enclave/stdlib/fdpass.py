"""Descriptors passed between the enclaves of a family: ``sendmsg``/``recvmsg`` with ``SCM_RIGHTS``.

Theory of operation
-------------------
``multiprocessing``'s forkserver (and ``multiprocessing.reduction.sendfds``) hand a
process's descriptors to another over an AF_UNIX stream socket.  Here the kernel
still carries them -- as *host* fds: the sender's host passes them
(``Op.SENDMSG_FDS``), the receiver's host takes them (``Op.RECVMSG_FDS``) -- and
what the enclave must know about each one travels in a sealed *notice*
(``protect/fdseal.py``), the first bytes of the message the fds are attached to:

* a host socket or a host file: its family, type and protocol, or its open flags;
* a pipe end: the pipe moves to the host first, as at a fork (``stdlib/pipes.py``),
  and the notice names its sealed channel and direction, so the receiver reads and
  writes the same sealed records;
* a sealed socketpair end (one that crossed a fork): its channel and direction.

A receiver that already holds a channel uses the same channel state (one writer per
member and direction: no nonce is ever used twice), and a pipe end it already holds
becomes another number for that end.  The app gets its data and its new numbers as
natively.  Refused with one ``OSError`` each: files of the FS shield, TLS connections
of the network shield, the console, other ancillary data, and descriptors over
anything but an unsealed AF_UNIX stream socket.

Descriptors that came without a notice (from a process outside the family) are
closed and the app sees ``MSG_CTRUNC`` (logged once): the enclave cannot know what
they are.  A notice that does not open, is replayed, or names fewer descriptors than
the host handed over stops the enclave (the host lied).
"""

from __future__ import annotations

import array
import errno
import os
import socket
import sys
from typing import Any

from pyscone.abi import Op
from pyscone.enclave import family, iago, scheduler
from pyscone.enclave.shields import famchan, net
from pyscone.enclave.stdlib import dups, pipes
from pyscone.protect import fdseal

_fds = iago.fds
_replays = fdseal.Replays()
_sent_member, _sent_seq = b"", 0  # a member's last notice number (a forked child starts again)
_warned: set[str] = set()


def _refuse(what: str) -> OSError:
    return OSError(errno.ENOSYS, f"{what} is not supported inside a pyscone enclave")


def _log_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        sys.stderr.write(f"pyscone: {message}\n")


def rights(ancdata: Any) -> list[int]:
    """The fds of ``sendmsg``'s ancillary data (only ``SCM_RIGHTS`` is supported)."""
    out: list[int] = []
    for item in ancdata:
        level, kind, data = item
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            raise _refuse(f"ancillary data of level {level} type {kind}")
        raw = bytes(memoryview(data).cast("B"))
        fds = array.array("i")
        fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
        out += fds.tolist()
    return out


def _entry(fd: int) -> tuple[fdseal.Entry, int]:
    """What the notice says of the app's ``fd``, and the host fd that goes."""
    h = dups.resolve(fd)
    nonblocking = h in _fds.nonblocking
    if pipes.is_local(h):
        host, chan, reading = pipes.for_child(h)
        return ["pipe", chan.hex(), reading, nonblocking], host
    from pyscone.enclave.stdlib import files

    if files._vfd(h) is not None:
        raise _refuse("passing a file of the file-system shield to another process")
    kind = _fds.kind(h)  # EBADF if closed
    if kind == iago.FdTable.FILE:
        return ["file", _fds.flags.get(h, 0), nonblocking], h
    if kind != iago.FdTable.SOCKET:
        raise _refuse("passing the console to another process")
    if net.conn(h) is not None or ((sh := net.shield()) is not None and h in sh.listening):
        raise _refuse("passing a socket of the network shield to another process")
    known = (_fds.families.get(h, 0), _fds.types.get(h, 0), _fds.protos.get(h, 0))
    seal = famchan.seal_for_child(h)
    if seal is not None:
        return ["pair", seal[0].hex(), seal[1], *known, nonblocking], h
    return ["socket", *known, nonblocking], h


def _check_socket(h: int) -> None:
    if _fds.families.get(h) != socket.AF_UNIX or _fds.types.get(h) != socket.SOCK_STREAM:
        raise _refuse("passing descriptors over anything but an AF_UNIX stream socket")
    if h in famchan.sealed or net.conn(h) is not None:
        raise _refuse("passing descriptors over a sealed socketpair or a network-shield connection")


def sendmsg(sock: Any, h: int, payload: bytes, fds: list[int], flags: int) -> int:
    """Send ``payload`` with the app's ``fds`` on host socket ``h``; how many payload bytes went."""
    _check_socket(h)
    if not family.key:
        raise _refuse("passing descriptors without a family key")
    if len(fds) > fdseal.MAX_FDS:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    entries, hosts = zip(*(_entry(fd) for fd in fds), strict=True)
    global _sent_member, _sent_seq
    if _sent_member != family.member:
        _sent_member, _sent_seq = family.member, 0
    _sent_seq += 1
    notice = fdseal.Notice(family.member, _sent_seq, len(payload), list(entries))
    head = fdseal.seal(fdseal.notice_key(family.key), notice)
    n = len(hosts)
    data = b"".join(h.to_bytes(4, sys.byteorder, signed=True) for h in hosts) + head + payload
    sent, _ = sock._io(Op.SENDMSG_FDS, (h, flags, n), data)
    if sent < len(head):  # the stream holds part of the notice: finish it, whatever the app's mode
        rest = head[sent:]
        while rest:
            r, err, _ = scheduler.get().host_call(Op.SEND, (h, 0), rest, wait=True)
            if r < 0:
                raise OSError(err, os.strerror(err))
            if not 0 < r <= len(rest):
                iago.fail_stop(f"the host took {r} bytes of the {len(rest)} sent")
            rest = rest[r:]
        return 0
    return int(sent) - len(head)


def _recv_exact(h: int, n: int) -> bytes:
    """``n`` bytes of a message already in the host (the rest of a notice, or its payload)."""
    out = bytearray()
    while len(out) < n:
        r, err, value = scheduler.get().host_call(Op.RECV, (h, n - len(out), 0), wait=True)
        if r < 0:
            raise OSError(err, os.strerror(err))
        if not value:
            iago.fail_stop("a descriptor notice cut short")
        out += value
    return bytes(out)


def recvmsg(sock: Any, h: int, bufsize: int, ancbufsize: int, flags: int) -> tuple[bytes, list[Any], int, Any]:
    """``recvmsg`` on host socket ``h`` with room for descriptors."""
    most = max(0, (ancbufsize - socket.CMSG_LEN(0)) // 4)
    flags &= ~socket.MSG_CMSG_CLOEXEC  # (nothing is ever exec'd)
    _, (data, hosts, mflags) = sock._io(Op.RECVMSG_FDS, (h, bufsize, flags, min(most, fdseal.MAX_FDS)))
    if not hosts:
        return data, [], mflags, None
    if not family.key or not fdseal.starts_notice(data):
        for host in hosts:
            _drop(host)
        _log_once("descriptors from a process outside the enclave's family refused (closed)")
        return data, [], mflags | socket.MSG_CTRUNC, None
    buf = data
    if len(buf) < fdseal.HEAD.size:
        buf += _recv_exact(h, fdseal.HEAD.size - len(buf))
    try:
        size = fdseal.HEAD.size + fdseal.body_size(buf[: fdseal.HEAD.size])
        if len(buf) < size:
            buf += _recv_exact(h, size - len(buf))
        head, body = buf[: fdseal.HEAD.size], buf[fdseal.HEAD.size : size]
        notice = fdseal.open_notice(fdseal.notice_key(family.key), head, body)
        _replays.check(notice)
    except fdseal.NoticeError as e:
        iago.fail_stop(f"passed descriptors: {e}")
    if len(hosts) > len(notice.fds):
        iago.fail_stop(f"the host handed over {len(hosts)} descriptors for a notice of {len(notice.fds)}")
    if len(hosts) < len(notice.fds):
        mflags |= socket.MSG_CTRUNC  # (the app's room held fewer: the kernel closed the rest)
    payload = buf[size:]
    want = min(bufsize, notice.length)
    if len(payload) < want:
        payload += _recv_exact(h, want - len(payload))
    mine = [_adopt(host, entry) for host, entry in zip(hosts, notice.fds, strict=False)]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", mine).tobytes())]
    return payload, anc, mflags, None


def _drop(host: int) -> None:
    scheduler.get().post(Op.CLOSE, (host,))


def _adopt(host: int, e: fdseal.Entry) -> int:
    """The app's number for host fd ``host``, as entry ``e`` describes it."""
    kind, nonblocking = e[0], bool(e[-1])
    try:
        if kind == "pipe":
            _fds.adopt(host, iago.FdTable.SOCKET, socket.AF_UNIX, type=socket.SOCK_SEQPACKET)
            fd = pipes.adopt_passed(host, bytes.fromhex(str(e[1])), bool(e[2]))
        elif kind == "pair":
            _fds.adopt(host, iago.FdTable.SOCKET, int(e[3]), type=int(e[4]), proto=int(e[5]))
            famchan.adopt_sealed(host, bytes.fromhex(str(e[1])), int(e[2]))
            fd = host
        elif kind == "file":
            _fds.adopt(host, iago.FdTable.FILE, flags=int(e[1]))
            fd = host
        else:
            _fds.adopt(host, iago.FdTable.SOCKET, int(e[1]), type=int(e[2]), proto=int(e[3]))
            fd = host
    except (ValueError, TypeError) as err:
        iago.fail_stop(f"passed descriptors: a malformed entry ({err})")
    (_fds.nonblocking.add if nonblocking else _fds.nonblocking.discard)(fd)
    return fd
