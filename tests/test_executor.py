"""The host executor's positioned file I/O, driven through real shared-memory rings in one process."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pyscone import abi, rings
from pyscone.abi import Op
from pyscone.enclave.syscalls import SyscallClient
from pyscone.host.executor import Executor


def test_pread_and_pwrite_move_data_straight_through_the_slot_and_refuse_bad_requests(tmp_path: Path) -> None:
    geometry = abi.Geometry(8, 4096)
    region = rings.SharedRegion.create(geometry)
    bell_host = os.eventfd(0, os.EFD_NONBLOCK)
    bell_enclave = os.eventfd(0, os.EFD_NONBLOCK)
    executor = Executor(region, bell_host, bell_enclave, sthreads=1, spin_us=100)
    client = SyscallClient(rings.SharedRegion.attach(region.fd), bell_host, bell_enclave, spin_us=100)
    executor.start()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)

    def call(op: int, args: tuple[int, ...], data: bytes = b"") -> tuple[int, int, bytes]:
        sid = client.submit(op, 0, args, data)
        while not (done := client.collect()):
            client.wait(1.0)
        assert done == [sid]
        return client.read_reply(sid)

    try:
        assert call(Op.PWRITE, (fd, 10), b"hello") == (5, 0, b"")
        assert call(Op.PREAD, (fd, 100, 8)) == (7, 0, b"\0\0hello")  # short at the end of the file
        assert call(Op.PREAD, (fd, 4096 + 1, 0))[:2] == (-1, errno.EINVAL)  # more than a slot holds
        assert call(Op.PREAD, (9999, 10, 0))[:2] == (-1, errno.EBADF)
        assert call(Op.PWRITE, (9999, 0), b"x")[:2] == (-1, errno.EBADF)
        assert call(Op.PREAD, (fd, 10, -1))[:2] == (-1, errno.EINVAL)  # preadv would read at the position
        assert call(Op.PWRITE, (fd, -1), b"x")[:2] == (-1, errno.EINVAL)
    finally:
        executor.stop()
        os.close(fd)


def test_pwrite_sync_writes_cuts_and_syncs_in_one_call_on_an_s_thread(tmp_path: Path) -> None:
    """``PWRITE_SYNC`` (the FS shield's write of an FSPF copy or of the tag file): the data at the
    offset, the file cut to the size asked for (or left, for -1), durable when it answers."""
    geometry = abi.Geometry(8, 4096)
    region = rings.SharedRegion.create(geometry)
    bells = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    executor = Executor(region, *bells, sthreads=3, spin_us=100)
    client = SyscallClient(rings.SharedRegion.attach(region.fd), *bells, spin_us=100)
    executor.start()
    path = tmp_path / "copy"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDWR)

    def call(args: tuple[int, ...], data: bytes) -> tuple[int, int, bytes]:
        sid = client.submit(Op.PWRITE_SYNC, 0, args, data)
        while not (done := client.collect()):
            client.wait(1.0)
        assert done == [sid]
        return client.read_reply(sid)

    try:
        assert call((fd, 0, -1), b"hello") == (5, 0, b"")
        assert path.read_bytes() == b"hello" + b"x" * 95  # not cut
        assert call((fd, 2, 7), b"LLO!!") == (5, 0, b"")
        assert path.read_bytes() == b"heLLO!!"  # cut to 7
        assert call((fd, 0, 2), b"") == (0, 0, b"")
        assert path.read_bytes() == b"he"
        assert call((9999, 0, -1), b"x")[:2] == (-1, errno.EBADF)
        assert executor.stats.pooled == 4  # a sync may block on the device: never the dispatcher
    finally:
        executor.stop()
        os.close(fd)


def test_pages_of_one_listing_come_from_one_scan_while_the_directory_changes(tmp_path: Path) -> None:
    # Paging by index over a fresh scan each time would repeat or skip names when files come
    # and go between pages; the enclave refuses a repeated name, so an honest host must not.
    big = tmp_path / "big"
    big.mkdir()
    for i in range(300):
        (big / f"old-{i:04d}-xxxxxxxxxxxx").touch()
    geometry = abi.Geometry(8, 4096)
    region = rings.SharedRegion.create(geometry)
    bells = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    executor = Executor(region, *bells, sthreads=1, spin_us=0)
    client = SyscallClient(rings.SharedRegion.attach(region.fd), *bells, spin_us=0)

    def page(start: int) -> tuple[list[str], bool]:
        sid = client.submit(Op.LISTDIR, 0, (start,), str(big).encode())
        assert executor.serve_pending() == 1  # driven in this thread, no S-threads started
        assert client.collect() == [sid]
        result, err, data = client.read_reply(sid)
        assert result >= 0, os.strerror(err)
        entries, more = abi.decode_dirents(data)
        return [e.name for e in entries], more

    names, more = page(0)
    assert more
    for i in range(100):  # files created and removed between the pages
        (big / f"new-{i:04d}-xxxxxxxxxxxx").touch()
    for name in names[:50]:
        (big / name).unlink()
    while more:
        rest, more = page(len(names))
        names += rest
    assert len(names) == len(set(names)) == 300  # every name once: the directory as it was
    executor.stop()


def test_a_plugged_in_liar_answers_instead_of_the_host_or_rewrites_its_answer(tmp_path: Path) -> None:
    from pyscone.host.hostile import Answer, Liar, load

    class Forger(Liar):
        def handle(self, op: int, args: tuple[int, ...], data: bytes, ex: Executor) -> Answer | None:
            return (6, 0, b"FORGED") if op == Op.READ and self.arg == "handle" else None

        def lie(
            self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Executor, request: bytes
        ) -> Answer:
            if op == Op.STAT and self.arg == "lie":
                return (-1, errno.EACCES, request)  # (the request is there to be looked at)
            return (result, err, payload)

    (tmp_path / "f").write_bytes(b"honest bytes")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    region = rings.SharedRegion.create(abi.Geometry(8, 4096))
    bells = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    client = SyscallClient(rings.SharedRegion.attach(region.fd), *bells, spin_us=0)
    liar = Forger("handle")
    executor = Executor(region, *bells, sthreads=1, spin_us=0, hostile=liar)

    def call(op: int, args: tuple[int, ...], data: bytes = b"") -> tuple[int, int, bytes]:
        sid = client.submit(op, 0, args, data)
        executor.serve_pending()
        assert client.collect() == [sid]
        return client.read_reply(sid)

    try:
        assert call(Op.READ, (fd, 100)) == (6, 0, b"FORGED")
        liar.arg = "lie"
        assert call(Op.READ, (fd, 5)) == (5, 0, b"hones")  # the forged read never touched the file
        assert call(Op.STAT, (1,), str(tmp_path / "f").encode()) == (-1, errno.EACCES, str(tmp_path / "f").encode())
    finally:
        executor.stop()
        os.close(fd)
    with pytest.raises(ValueError, match=r"is not a pyscone\.host\.hostile\.Liar"):
        load("py:os:path")
    with pytest.raises(ValueError, match="cannot load the lying host"):
        load("py:no_such_module:Liar")
    with pytest.raises(ValueError, match="unknown hostile mode"):
        load("no-such-mode")
