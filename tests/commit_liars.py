"""Lying (and slow) hosts for the FS shield's commit path (tests/test_fs_commit.py).

``PYSCONE_TEST_HOSTILE=py:commit_liars:CommitLie:CASE`` (with this directory on
``PYTHONPATH``).  The host knows which file each fd is (it opened them), so it can aim at
one step of a commit: the data file's sync, the write of an FSPF copy, the tag file's write.
Each lie is said on stderr (``pyscone-test: ...``), so a test knows it was told.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from typing import Any

from pyscone.abi import Op
from pyscone.host.hostile import Answer, Liar

VICTIM = "victim"  # the data file the lies aim at (its name ends so)


def _say(message: str) -> None:
    print(f"pyscone-test: {message}", file=sys.stderr, flush=True)


class CommitLie(Liar):
    """Cases:

    * ``data-sync-fails``: the second ``fdatasync`` of the victim fails (``EIO``) although its
      writes reached the file, while the FSPF's copy is written honestly beside it;
    * ``copy-short``: the second write of an FSPF copy claims one byte less than it was given
      (and writes nothing): a full disk;
    * ``copy-overcount``: a write of an FSPF copy claims one byte more than it was given;
    * ``slow-syncs``: every sync of a data file or an FSPF copy takes 30 ms; the host reports
      when two of them run at once (they overlap) and when the tag file is written while one
      is still running (a pin before its commit is durable).
    """

    CASES = ("data-sync-fails", "copy-short", "copy-overcount", "slow-syncs")

    def __init__(self, arg: str = "") -> None:
        super().__init__(arg)
        if arg not in self.CASES:
            raise ValueError(f"no lie called {arg!r}")
        self.paths: dict[int, str] = {}
        self.victim_syncs = 0
        self.copy_writes = 0
        self.running = 0
        self.overlapped = False
        self.lock = threading.Lock()  # handlers run on the dispatcher and the S-threads

    def _what(self, fd: int) -> str:
        path = self.paths.get(fd, "")
        if path.endswith(".tag"):
            return "tag"
        if path.endswith((".fspf", ".fspf.1")):
            return "copy"
        return "victim" if path.endswith(VICTIM) else "other"

    def handle(self, op: int, args: tuple[int, ...], data: bytes, ex: Any) -> Answer | None:
        if op not in (Op.FSYNC, Op.PWRITE_SYNC) or not args:
            return None
        what = self._what(args[0])
        if self.arg == "data-sync-fails" and op == Op.FSYNC and what == "victim":
            with self.lock:
                self.victim_syncs += 1
                if self.victim_syncs == 2:
                    _say("failed the victim's data sync")
                    return (-1, errno.EIO, b"")
        if self.arg == "copy-short" and op == Op.PWRITE_SYNC and what == "copy":
            with self.lock:
                self.copy_writes += 1
                if self.copy_writes == 2:
                    _say("a short write of an FSPF copy")
                    return (len(data) - 1, 0, b"")
        if self.arg == "slow-syncs" and what in ("victim", "other", "copy"):
            return self._slow(op, args, data)
        if self.arg == "slow-syncs" and what == "tag":
            with self.lock:
                if self.running:
                    _say(f"the tag file was written while {self.running} durable step(s) ran")
        return None

    def _slow(self, op: int, args: tuple[int, ...], data: bytes) -> Answer:
        with self.lock:
            self.running += 1
            if self.running > 1 and not self.overlapped:
                self.overlapped = True
                _say("two durable steps of a commit ran at once")
        try:
            time.sleep(0.03)
            if op == Op.FSYNC:
                os.fdatasync(args[0]) if args[1] else os.fsync(args[0])
                return (0, 0, b"")
            n = os.pwrite(args[0], data, args[1])
            if args[2] >= 0:
                os.ftruncate(args[0], args[2])
            os.fdatasync(args[0])
            return (n, 0, b"")
        except OSError as e:
            return (-1, e.errno or errno.EIO, b"")
        finally:
            with self.lock:
                self.running -= 1

    def lie(
        self, op: int, args: tuple[int, ...], result: int, err: int, payload: bytes, ex: Any, request: bytes
    ) -> Answer:
        if op == Op.OPEN and result >= 0:
            with self.lock:
                self.paths[result] = os.fsdecode(request)
        if self.arg == "copy-overcount" and op == Op.PWRITE_SYNC and result > 0 and self._what(args[0]) == "copy":
            _say("an FSPF copy's write claims one byte more than it was given")
            return (result + 1, 0, payload)
        return (result, err, payload)
