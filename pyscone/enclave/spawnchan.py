"""The attested channel between a parent enclave and the fresh child it spawned (TRUSTED).

The messages and the checks are ``protect/spawnproto.py`` (sans-IO); this module
runs them over the channel socket the host made (``Op.SPAWN``), on both sides:

* the parent (:func:`give`, called by ``enclave/stdlib/spawn.py`` before its
  ``Popen`` returns): hello, check the child's evidence, send the sealed
  configuration, wait for the sealed acknowledgement;
* the child (:func:`from_parent`, called by boot where a CAS-mode enclave attests):
  answer the hello with its evidence, open the configuration, acknowledge, and
  apply it exactly where boot applies the CAS's.

What the parent gives (:func:`child_config`) is the child's argv, env and cwd (from
the app's ``Popen`` call) and the parent's own secrets and shields: the FSPF (path,
key, the parent's current tag as the only one accepted, its tag file), the network
shield's rules, the console key, the bytecode cache, the family key; and which of its
host fds the child holds at which number, with what the parent knows about each.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any

from pyscone.enclave import attest, family, iago
from pyscone.platform import keys, quote
from pyscone.protect import spawnproto
from pyscone.protect.spawnproto import ChannelError

#: How long either side waits for the other's next message (a child boots in about a second).
TIMEOUT = 120.0
#: Platform keys whose quotes a child must bring (``None``: a bare report will do; dev mode).
trusted_platforms: dict[bytes, Any] | None = None

_own: dict[str, Any] = {}


def remember(cfg: dict[str, Any]) -> None:
    """At boot, once the app's configuration is final: what this enclave gives its children."""
    _own.clear()
    _own.update(cfg)


def _sock(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)  # the enclave's socket (interposed): host calls on fd
    sock.settimeout(TIMEOUT)
    return sock


def _recv(sock: socket.socket, deframer: spawnproto.Deframer, what: str) -> bytes:
    while (msg := deframer.next()) is None:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            raise ChannelError(f"no {what} within {TIMEOUT:.0f} s") from None
        except OSError as e:
            raise ChannelError(f"the channel failed before the {what}: {e.strerror or e}") from None
        if not data:
            raise ChannelError(f"the channel closed before the {what}")
        deframer.feed(data)
    return msg


def _send(sock: socket.socket, msg: bytes) -> None:
    try:
        sock.sendall(spawnproto.frame(msg))
    except OSError as e:
        raise ChannelError(f"the channel failed: {e.strerror or e}") from None


def _my_report(data: bytes) -> quote.Report | None:
    return attest.my_report(data) if attest.identity is not None else None


# -- the parent -----------------------------------------------------------------------------


def child_config(
    argv: dict[str, Any], env: dict[str, str], cwd: str, fds: list[list[Any]], given_pipes: list[Any]
) -> bytes:
    """The child's whole configuration, as the parent gives it (JSON)."""
    if not family.key:
        family.start()
    fspf = _own.get("fspf")
    given_fspf = None
    if fspf:
        from pyscone.enclave.shields import fs

        shield = fs.shield()
        if shield is not None:
            shield.family.before_spawn()  # all committed; from now on under the family's lock
        tags = [shield.tag] if shield is not None else fspf.get("tags")
        given_fspf = {"path": fspf["path"], "key": fspf["key"], "tags": tags, "tag_file": fspf.get("tag_file")}
    cache = _own.get("bytecode_cache") or {}
    key = _own.get("bytecode_key") if _own.get("cas") else cache.get("key")
    doc = {
        **argv,
        "env": env,
        "cwd": cwd,
        "family_key": family.key.hex(),
        "fspf": given_fspf,
        "network": _own.get("network"),
        "console": _console_spec(),
        "bytecode_cache": {"dir": cache["dir"], "key": key} if cache.get("dir") and key else None,
        "spawn_key": _own.get("spawn_key"),
        "fds": fds,
        "pipes": given_pipes,
    }
    return json.dumps(doc).encode()


def _trusted() -> dict[bytes, Any] | None:
    """The platform keys a child's quote must come from: with a CAS, the platform of this
    enclave's own accepted quote, its key fetched once from the LAS and checked against it."""
    global trusted_platforms
    if trusted_platforms is not None or attest.accepted_quote is None:
        return trusted_platforms
    host, _, port = str(_own.get("las") or "").rpartition(":")
    if not port.isdigit():
        raise ChannelError("this enclave attested to a CAS but knows no LAS")
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
            s.sendall(b'{"op": "platform"}\n')
            with s.makefile("rb") as f:
                line = f.readline(attest.MAX_REPLY)
        public = keys.load_public(str(json.loads(line)["public_key"]).encode())
    except OSError as e:
        raise ChannelError(f"the LAS cannot be reached: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ChannelError(f"the LAS's platform answer is malformed: {e}") from None
    trusted_platforms = spawnproto.trusted_platform(attest.accepted_quote, public)
    return trusted_platforms


def _console_spec() -> dict[str, Any] | None:
    """The console shield's settings for a child: the key and this run's lineage (its records follow ours)."""
    spec = _own.get("console")
    if not spec:
        return None
    from pyscone.enclave.shields import console as console_shield

    return console_shield.spawn_spec(dict(spec))


def started() -> None:
    """A spawned child acknowledged its configuration: it is one of the family's runs."""
    if _own.get("console"):
        from pyscone.enclave.shields import console as console_shield

        console_shield.child_started()


def give(fd: int, config: bytes) -> None:
    """Run the parent's side on the channel ``fd``: the child gets ``config`` only if it proves it is us.

    Raises:
        ChannelError: the child is not this enclave's runtime, or the channel was tampered
            with; the child got nothing.
    """
    trusted = _trusted()
    sock = _sock(fd)
    try:
        private, hello = spawnproto.hello(quote_required=trusted is not None)
        hello_msg = hello.pack()
        _send(sock, hello_msg)
        deframer = spawnproto.Deframer()
        evidence_msg = _recv(sock, deframer, "evidence from the child")
        evidence = spawnproto.Evidence.unpack(evidence_msg)
        spawnproto.check_evidence(hello_msg, evidence, _my_report(bytes(64)), trusted)
        key = spawnproto.derive(private, evidence.child_key, hello_msg, evidence_msg)
        spawn_key = bytes.fromhex(_own["spawn_key"]) if _own.get("spawn_key") else None
        proof = spawnproto.parent_proof(spawn_key, hello_msg, evidence_msg)
        _send(sock, spawnproto.seal_config(key, proof + config))
        spawnproto.check_ready(key, _recv(sock, deframer, "acknowledgement from the child"))
    finally:
        sock.close()


# -- the child ------------------------------------------------------------------------------


def receive(fd: int, las: str | None, cas: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the child's side on the channel ``fd``; return the parent's configuration.

    ``cas``: this enclave's CAS pin and session (``{"cas": ..., "session": "NAME/SERVICE"}``):
    the parent must prove it holds the service's spawn key, which the CAS gives us here.

    Raises:
        ChannelError: the hello or the configuration is not from our parent's channel.
    """
    iago.fds.adopt(fd, iago.FdTable.SOCKET, socket.AF_UNIX, type=socket.SOCK_STREAM)
    sock = _sock(fd)
    try:
        deframer = spawnproto.Deframer()
        hello_msg = _recv(sock, deframer, "hello from the parent")
        hello = spawnproto.Hello.unpack(hello_msg)
        private, public = spawnproto.new_key()
        report = _my_report(spawnproto.report_data(public, hello_msg))
        if report is None:
            evidence = spawnproto.Evidence(public, spawnproto.UNMEASURED, b"")
        elif hello.quote_required:
            host, _, port = (las or "").rpartition(":")
            if not port.isdigit():
                raise ChannelError("the parent wants a platform quote and this enclave knows no LAS")
            try:
                blob = attest.request_quote((host, int(port)), report)
            except attest.AttestationError as e:
                raise ChannelError(str(e)) from None
            evidence = spawnproto.Evidence(public, spawnproto.QUOTE, blob)
        else:
            evidence = spawnproto.Evidence(public, spawnproto.REPORT, report.pack())
        evidence_msg = evidence.pack()
        _send(sock, evidence_msg)
        key = spawnproto.derive(private, hello.parent_key, hello_msg, evidence_msg)
        opened = spawnproto.open_config(key, _recv(sock, deframer, "configuration from the parent"))
        proof, config = opened[:32], opened[32:]
        if cas is not None:
            spawnproto.check_parent_proof(_join(cas, las), proof, hello_msg, evidence_msg)
        _send(sock, spawnproto.seal_ready(key))
    finally:
        sock.close()
    try:
        doc = json.loads(config)
    except ValueError:
        raise ChannelError("the parent's configuration is not JSON") from None
    if not isinstance(doc, dict):
        raise ChannelError("the parent's configuration is not an object")
    return doc


def _join(cas: dict[str, Any], las: str | None) -> bytes:
    """With a CAS: attest to it as a spawned child of the session's service; its spawn key."""
    from pyscone.enclave import cas_client

    session, _, service = str(cas.get("session") or "").partition("/")
    host, _, port = (las or "").rpartition(":")
    if not (session and service and port.isdigit()):
        raise ChannelError("this enclave names no session/service or LAS to check its parent with")
    try:
        answer = cas_client.attest_to(cas["cas"], session, service, (host, int(port)), join=True)
        key = bytes.fromhex(str(answer["spawn_key"]))
    except attest.AttestationError as e:
        raise ChannelError(f"the CAS does not vouch for this child: {e}") from None
    except (KeyError, ValueError):
        raise ChannelError("the CAS gave no spawn key") from None
    return key


def from_parent(cfg: dict[str, Any]) -> str | None:
    """Boot of a spawned child: take the configuration from the parent.  Returns an error."""
    try:
        cas = {"cas": cfg["cas"], "session": cfg.get("session")} if cfg.get("cas") else None
        doc = receive(int(cfg["spawn_channel"]), cfg.get("las"), cas)
        _apply(cfg, doc)
    except ChannelError as e:
        return f"spawned child: {e}; it gets nothing from its parent and does not run"
    except (KeyError, TypeError, ValueError) as e:
        return f"spawned child: the parent's configuration is malformed ({type(e).__name__}: {e})"
    return None


def _apply(cfg: dict[str, Any], doc: dict[str, Any]) -> None:
    cfg["command"] = doc.get("command")
    cfg["module"] = bool(doc.get("module"))
    cfg["argv"] = [str(a) for a in doc["argv"]]
    cwd = doc["cwd"]
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise ValueError("no absolute working directory")
    cfg["cwd"] = os.path.normpath(cwd)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in doc["env"].items()})
    family.start(bytes.fromhex(doc["family_key"]))
    fspf = doc.get("fspf")
    if fspf:  # with a CAS, no pin the family can order commits by: read-only (fsfamily.py)
        cfg["fspf"] = {**fspf, "spawned": True, **({"pin": ReadOnlyPin()} if cfg.get("cas") else {})}
    else:
        cfg["fspf"] = None
    cfg["network"] = doc.get("network")
    cfg["console"] = doc.get("console")
    cfg["bytecode_cache"] = doc.get("bytecode_cache")
    if cfg["bytecode_cache"] and cfg.get("cas"):
        cfg["bytecode_key"] = cfg["bytecode_cache"]["key"]
    cfg["spawn_key"] = doc.get("spawn_key")  # (for the children it spawns)
    kinds = {v for k, v in vars(iago.FdTable).items() if k.isupper() and isinstance(v, str)}
    names: dict[int, list[int]] = {}  # a sealed socketpair end -> the app's numbers for it
    for n, kind, fam, typ, proto, flags, *sealed in doc["fds"]:
        if kind not in kinds - {iago.FdTable.CONSOLE}:
            raise ValueError(f"fd {n} of kind {kind}")
        n = int(n)
        if n not in iago.fds.kinds:  # (a socketpair end given as two of 0-2 comes twice)
            iago.fds.adopt(n, str(kind), int(fam), type=int(typ), proto=int(proto), flags=int(flags))
        if sealed:
            (chan, out), number = sealed
            from pyscone.enclave.shields import famchan

            famchan.adopt_sealed(n, bytes.fromhex(str(chan)), int(out))
            names.setdefault(n, []).append(int(number))
    for h, numbers in names.items():
        for number in numbers:
            if number != h:
                os.dup2(h, number)  # 0-2: the console follows the name
        if h not in numbers:
            os.close(h)
    _adopt_pipes(doc.get("pipes") or [])


class ReadOnlyPin:
    """A CAS-mode spawned child's FS-shield pin: it has no run at the CAS to pin commits at, and
    the family cannot order commits by the CAS's pin (``fsfamily.py``): so it reads its parent's
    protected files and changes none (``EROFS`` from the family, and this refuses any commit).
    In dev mode a spawned child commits under the family's lock with the parent's tag file.
    """

    def commit(self, old: str, new: str) -> None:
        raise OSError(errno.EROFS, "a spawned child cannot commit its parent's FSPF yet")


def _adopt_pipes(given: list[Any]) -> None:
    """The parent's pipe ends, each at its number (0-2: a pipe end dup'ed there), sealed as at a fork."""
    from pyscone.enclave.stdlib import pipes

    ends: dict[tuple[int, bool], int] = {}  # (host fd, reading) -> the pipe number it is adopted at
    for n, host, chan, reading, nonblocking in given:
        n, host, reading = int(n), int(host), bool(reading)
        local = ends.get((host, reading))
        if local is None:
            if host not in iago.fds.kinds:
                iago.fds.adopt(host, iago.FdTable.SOCKET, socket.AF_UNIX, type=socket.SOCK_SEQPACKET)
            local = n if n > 2 else pipes.next_fd()
            pipes.adopt_from_parent(local, host, bytes.fromhex(str(chan)), reading)
            if nonblocking:
                iago.fds.nonblocking.add(local)
            ends[(host, reading)] = local
        if n <= 2:
            os.dup2(local, n)
    for (_, _), local in ends.items():
        if all(int(n) != local for n, *_ in given):
            os.close(local)  # (only the numbers 0-2 name it)
