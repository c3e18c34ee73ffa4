"""The host executor's positioned file I/O, driven through real shared-memory rings in one process."""

from __future__ import annotations

import errno
import os
from pathlib import Path

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
