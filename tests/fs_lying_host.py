"""``pyscone run`` on a host whose executor lies about files (the test plays the host).

Run as ``python fs_lying_host.py RUN-ARGS...``, with the lies as JSON in
``PYSCONE_FS_LIES`` (read by the launcher process only; the enclave never sees it):

* ``"stat_dir": [PATH, ...]`` -- a ``STAT`` of PATH answers "a directory" (the
  parent's real stat), whatever PATH really is;
* ``"dirent_dir": [NAME, ...]`` -- a directory listing reports an entry NAME as
  a directory;
* ``"race": [[LINK, TARGET], ...]`` -- every answer is honest, but right after
  answering a ``STAT`` of LINK (a symlink) the host points LINK at TARGET: what
  the enclave opens next is not what it was told about.

The executor is the real one (:class:`pyscone.host.executor.Executor`) with
those handlers overridden; everything else, the enclave included, is unchanged.
"""

from __future__ import annotations

import json
import os
import sys

from pyscone import abi
from pyscone.host import executor, launcher

LIES = json.loads(os.environ.get("PYSCONE_FS_LIES", "{}"))
STAT_DIR = set(LIES.get("stat_dir", []))
DIRENT_DIR = set(LIES.get("dirent_dir", []))
RACE = {link: target for link, target in LIES.get("race", [])}


class LyingExecutor(executor.Executor):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        print("lying-host: serving the enclave", file=sys.stderr)  # the tests check the plug-in is in use

    def _stat(self, a: tuple[int, ...], d: bytes) -> executor.Answer:
        path = d.decode("utf-8", "surrogateescape")
        if path in STAT_DIR:
            st = abi.stat_from_os(os.stat(os.path.dirname(path)))
            print(f"lying-host: STAT {path}: said directory", file=sys.stderr)
            return (0, 0, st.pack())
        answer = super()._stat(a, d)
        if path in RACE:
            os.unlink(path)
            os.symlink(RACE[path], path)
            print(f"lying-host: STAT {path}: answered, then re-pointed it", file=sys.stderr)
        return answer

    def _listdir(self, a: tuple[int, ...], d: bytes) -> executor.Answer:
        result, err, payload = super()._listdir(a, d)
        if result < 0 or not DIRENT_DIR:
            return (result, err, payload)
        entries, more = abi.decode_dirents(payload)
        forged = [abi.Dirent(e.name, abi.DT_DIR) if e.name in DIRENT_DIR else e for e in entries]
        return (result, err, abi.encode_dirents(forged, more))


if __name__ == "__main__":
    launcher.Executor = LyingExecutor  # type: ignore[misc] # the plug-in: launcher.run builds this one
    from pyscone import cli

    sys.exit(cli.main(["run", *sys.argv[1:]]))
