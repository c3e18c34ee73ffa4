"""Fresh child enclaves (UNTRUSTED): the host's side of ``subprocess``/``multiprocessing`` spawn of Python.

An enclave asks its host for a child with ``Op.SPAWN``, naming only which of its host
fds the child gets as which numbers (0-2 and ``pass_fds``).  The host starts a *helper*
process, ``python -m pyscone.host.spawn``, which arranges those fds and runs
``launcher.run`` for the child exactly as ``pyscone run`` does for any enclave (its own
region, doorbells, S-threads; the launcher's code, not a copy), with the parent's own
launch configuration stripped of everything the child must get from its parent
instead: argv, env and cwd stay the parent launcher's only so the child measures as
the parent does (dev mode scans the app's directory for extensions), and are replaced
by the parent's over the channel; the FSPF, network, console and bytecode-cache
settings are dropped.  The child's boot JSON adds ``spawn_channel``: the child's end of
a new socketpair whose other end the parent enclave gets (enclave/spawnchan.py runs
the attested handshake over it; the host only relays it).

The helper is the OS parent of the child enclave and the host's child: the pid the
enclave gets is the helper's.  Its exit status is the child enclave's (a child that
died of SIGTERM/SIGINT/SIGHUP/SIGQUIT is reported as such, by the helper re-raising
it; SIGKILL kills the helper, and the enclave dies with it by PR_SET_PDEATHSIG).  The
helper itself dies with the host that started it, so no enclave outlives the family's
launcher.  ``Op.SPAWN_WAIT`` parks on the reactor on a pidfd (no S-thread waits);
``Op.SPAWN_KILL`` signals the helper.

``PYSCONE_TEST_HOSTILE_SPAWN`` (tests only) makes this host lie about spawning:
``heap`` starts the child with another heap limit and no signature (another
MRENCLAVE); ``tamper`` flips a byte of the parent's sealed configuration on its way;
``replay`` gives the second child the first child's sealed configuration;
``record:PATH`` relays honestly and appends every frame it relays to PATH;
``las:HOST:PORT`` points the child at another LAS (one the parent's CAS does not trust);
``impostor`` plays the child's parent itself, with a program of its own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyscone import abi

if TYPE_CHECKING:
    from pyscone.host.executor import Answer, Executor
    from pyscone.host.launcher import EnclaveConfig, HostConfig

_PR_SET_PDEATHSIG = 1
#: Deaths by these signals the helper reports as deaths by signal (the launcher says 128 + N).
_REPORTED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


@dataclass
class _Child:
    popen: subprocess.Popen[bytes]
    pidfd: int


class SpawnHost:
    """The ``SPAWN*`` handlers of one executor (off until :meth:`configure`)."""

    def __init__(self, executor: Executor) -> None:
        self.ex = executor
        self.template: tuple[EnclaveConfig, HostConfig] | None = None
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._closing: list[int] = []  # pidfds of reaped children, closed once off the reactor
        self._hostile = os.environ.get("PYSCONE_TEST_HOSTILE_SPAWN") or None
        self._replayed: bytes | None = None

    def configure(self, enclave: EnclaveConfig, host: HostConfig) -> None:
        """Let this executor's enclave spawn children like itself (``launcher.run`` calls this)."""
        self.template = (enclave, host)

    # -- handlers (run by the executor: SPAWN on an S-thread, the others inline) -----------

    def spawn(self, a: tuple[int, ...], d: bytes) -> Answer:
        if self.template is None:
            return (-1, errno.ENOSYS, b"")
        if len(d) % abi.SPAWN_FD.size or len(d) > 4096:
            return (-1, errno.EINVAL, b"")
        fdmap = [abi.SPAWN_FD.unpack_from(d, i) for i in range(0, len(d), abi.SPAWN_FD.size)]
        if any(n < 0 or h < 0 for n, h in fdmap) or len({n for n, _ in fdmap}) != len(fdmap):
            return (-1, errno.EINVAL, b"")
        for _, h in fdmap:
            os.fstat(h)  # EBADF for a host fd that is not open
        enclave, host = self.template
        child_enclave = dataclasses.replace(
            enclave, env={}, fspf=None, network=None, console=None, bytecode_cache=None,
            measure_out=None, expect_program=None, stats=False,
        )  # fmt: skip
        if self._hostile == "heap":  # another runtime: another MRENCLAVE, no signature to refuse it
            child_enclave = dataclasses.replace(child_enclave, heap=enclave.heap // 2, signature=None)
        if (self._hostile or "").startswith("las:"):  # the child quotes at a LAS of the host's choosing
            child_enclave = dataclasses.replace(child_enclave, las=str(self._hostile)[len("las:") :])
        child_host = dataclasses.replace(host, hostile=None)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if self._hostile == "impostor":  # the host plays the parent; the enclave's end leads nowhere
            threading.Thread(target=_impostor, args=(parent_end,), daemon=True).start()
            parent_end, nowhere = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            nowhere.close()
        elif self._hostile in ("tamper", "replay") or self._recording():  # the enclave talks to a relay
            to_enclave, to_relay = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            threading.Thread(target=self._lie, args=(to_relay, parent_end), daemon=True).start()
            parent_end = to_enclave
        spec = {
            "enclave": dataclasses.asdict(child_enclave),
            "host": dataclasses.asdict(child_host),
            "map": fdmap,
            "channel": child_end.fileno(),
            "host_pid": os.getpid(),
        }
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "pyscone.host.spawn", json.dumps(spec)],
                pass_fds=sorted({h for _, h in fdmap} | {child_end.fileno()}),
            )
        finally:
            child_end.close()
        pidfd = os.pidfd_open(popen.pid)
        with self._lock:
            self._children[popen.pid] = _Child(popen, pidfd)
        fd = self.ex._adopt(parent_end)
        return (popen.pid, 0, struct.pack("<i", fd))

    def wait(self, a: tuple[int, ...], d: bytes) -> Answer:
        from pyscone.host.executor import _WouldBlock

        self._close_reaped()
        pid = a[0]
        with self._lock:
            child = self._children.get(pid)
        if child is None:
            return (-1, errno.ECHILD, b"")
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            raise _WouldBlock(
                child.pidfd, select.EPOLLIN, retry=lambda: self.wait(a, d), nowait=(0, 0, struct.pack("<i", 0))
            )
        with self._lock:
            del self._children[pid]
            self._closing.append(child.pidfd)
        child.popen.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        return (pid, 0, struct.pack("<i", status))

    def kill(self, a: tuple[int, ...], d: bytes) -> Answer:
        with self._lock:
            known = a[0] in self._children
        if not known:
            return (-1, errno.ESRCH, b"")
        os.kill(a[0], a[1])
        return (0, 0, b"")

    def _close_reaped(self) -> None:
        with self._lock:
            closing, self._closing = self._closing, []
        for fd in closing:
            os.close(fd)

    # -- tests only: a host that lies about the channel --------------------------------------

    def _lie(self, parent_side: socket.socket, child_side: socket.socket) -> None:
        """Relay the channel: record it, or change the parent's second message (the sealed configuration)."""
        frames_from_parent = 0

        def pump(src: socket.socket, dst: socket.socket, from_parent: bool) -> None:
            nonlocal frames_from_parent
            try:
                while head := _recv_exact(src, 4):
                    body = _recv_exact(src, struct.unpack(">I", head)[0])
                    if self._recording():
                        with open(str(self._hostile)[len("record:") :], "ab") as f:
                            f.write(head + body)
                    elif from_parent:
                        frames_from_parent += 1
                        if frames_from_parent == 2:
                            body = self._forge(body)
                    dst.sendall(struct.pack(">I", len(body)) + body)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(child_side, parent_side, False), daemon=True).start()
        pump(parent_side, child_side, True)

    def _recording(self) -> bool:
        return (self._hostile or "").startswith("record:")

    def _forge(self, sealed: bytes) -> bytes:
        if self._hostile == "tamper":
            return sealed[:-1] + bytes([sealed[-1] ^ 1])
        if self._replayed is None:
            self._replayed = sealed  # the first child gets the honest message
            return sealed
        return self._replayed


def _impostor(child: socket.socket) -> None:
    """Play the parent: answer the child's evidence with a configuration of the host's own."""
    import json as json_mod

    from pyscone.protect import spawnproto

    try:
        private, hello = spawnproto.hello(quote_required=False)
        hello_msg = hello.pack()
        child.sendall(spawnproto.frame(hello_msg))
        evidence_msg = _recv_exact(child, struct.unpack(">I", _recv_exact(child, 4))[0])
        evidence = spawnproto.Evidence.unpack(evidence_msg)
        key = spawnproto.derive(private, evidence.child_key, hello_msg, evidence_msg)
        config = {
            "command": "print('HOST CODE RAN', flush=True)", "module": False, "argv": ["-c"], "env": {}, "cwd": "/",
            "family_key": "00" * 32, "fspf": None, "network": None, "console": None, "bytecode_cache": None, "fds": [],
        }  # fmt: skip
        proof = spawnproto.parent_proof(None, hello_msg, evidence_msg)
        child.sendall(spawnproto.frame(spawnproto.seal_config(key, proof + json_mod.dumps(config).encode())))
        child.recv(4096)
    except (OSError, ValueError, spawnproto.ChannelError, struct.error):
        pass
    finally:
        child.close()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            return b""
        out += chunk
    return out


# -- the helper process: one child enclave ----------------------------------------------------


def _arrange_fds(fdmap: list[list[int]], channel: int) -> int:
    """Put each host fd at the child's number; return the channel's fd (above all of them)."""
    base = max([n for n, _ in fdmap] + [2]) + 1
    sources = {h for _, h in fdmap} | {channel}
    temp = {h: fcntl.fcntl(h, fcntl.F_DUPFD_CLOEXEC, base) for h in sources}
    targets = {n for n, _ in fdmap}
    for h in sources:
        if h not in targets:
            os.close(h)
    for n, h in fdmap:
        os.dup2(temp[h], n, inheritable=n <= 2)  # 0-2 reach the enclave process (boot errors)
    for h, t in temp.items():
        if h != channel:
            os.close(t)
    return temp[channel]


def _die_with(host_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != host_pid:  # the host died before prctl: so do we
        os._exit(1)


def _helper(spec: dict[str, Any]) -> int:
    from pyscone.host import launcher

    _die_with(int(spec["host_pid"]))
    channel = _arrange_fds(spec["map"], int(spec["channel"]))
    enclave = launcher.EnclaveConfig(**spec["enclave"])
    host = launcher.HostConfig(**spec["host"])
    inherit = sorted({n for n, _ in spec["map"] if n > 2} | {channel})
    try:
        code = launcher.run(enclave, host, inherit=inherit, boot_extra={"spawn_channel": channel})
    except launcher.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if code - 128 in _REPORTED_SIGNALS:
        sys.stdout.flush()
        signal.signal(code - 128, signal.SIG_DFL)
        os.kill(os.getpid(), code - 128)
    return code


if __name__ == "__main__":
    sys.exit(_helper(json.loads(sys.argv[1])))
