"""Boot of the enclave process: attach, interpose, lock down, run the app.

The order matters and is the security argument:

1. read the start-up configuration and attach to untrusted memory;
2. load what must be loaded from files while that is still possible: the
   runtime's own modules and every C extension the app may import (measured);
3. interpose the standard library (threads, files, sockets, select, console,
   processes, time) and route imports through the enclave importer;
4. scrub the environment, bound the heap, turn off dumping, and install the
   barrier: from here on a direct system call that could do I/O fails (EPERM);
5. run the app's ``__main__`` as the main lthread; then do what the interpreter
   does at exit (join non-daemon threads, run atexit, flush) and leave.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from typing import Any, NoReturn

from pyscone import rings
from pyscone.enclave import barrier, family, iago, importer, redact, scheduler
from pyscone.enclave.syscalls import SyscallClient

#: What a measured enclave imports in step 2 besides the modules it imports at their top:
#: what ECDSA imports on first use, and the codecs that json (a signature, the CAS's answers)
#: and host names may need, so that no input makes the runtime load code after the measurement.
_MEASURED_RUNTIME = (
    "pyscone.enclave.attest",
    "pyscone.platform.measure",
    "cryptography.hazmat.backends.openssl.backend",
    *(f"encodings.{c}" for c in ("ascii", "latin_1", "idna", "utf_16", "utf_16_be", "utf_16_le")),
    *(f"encodings.{c}" for c in ("utf_32", "utf_32_be", "utf_32_le")),
)


def _read_config(fd: int) -> dict[str, Any]:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    cfg: dict[str, Any] = json.loads(b"".join(chunks))
    return cfg


def _measure(cfg: dict[str, Any], geometry: Any) -> None:
    """Measure the enclave; write the TCB out and exit (``pyscone measure``), or admit it.

    The measurement is of what the loaders recorded as they loaded it (never a second read
    of the disk), so every module the attestation path uses was imported in step 2; from
    here until the app starts the runtime may load nothing new (``loader.seal``).
    """
    import posix

    from pyscone.enclave import attest, loader
    from pyscone.platform import measure

    cfg["slots"], cfg["slot_data"] = geometry.nslots, geometry.slot_data
    try:
        mrenclave, tcb = attest.measure_self(cfg)
    except attest.AdmissionError as e:
        _boot_error(f"refused to start: {e}")
    loader.seal()
    if cfg.get("measure_out"):
        doc = {
            "mrenclave": mrenclave.hex(),
            "config": measure.identity_config(cfg),
            "files": [[f.name, f.path, f.size, f.sha256, f.code, f.how] for f in tcb],
        }
        fd = posix.open(cfg["measure_out"], os.O_WRONLY | os.O_TRUNC)
        posix.write(fd, json.dumps(doc).encode())
        posix.close(fd)
        iago.exit_now(0)
    signature = bytes.fromhex(cfg["signature"]) if cfg.get("signature") else None
    try:
        attest.identity = attest.admit(mrenclave, signature, debug=not cfg["barrier"])
    except (attest.AdmissionError, loader.SealedImportError) as e:
        _boot_error(f"refused to start: {e}")


def _boot_error(message: str) -> NoReturn:
    print(f"pyscone: enclave boot failed: {message}", file=sys.stderr, flush=True)
    if (shield := sys.modules.get("pyscone.enclave.shields.console")) is not None:
        shield.finish(70)
    iago.exit_now(70)


def main() -> None:
    """The enclave's boot, run by the measuring loader (``loader.start``) once it is in place."""
    from pyscone.enclave import loader

    cfg = _read_config(int(sys.argv[1]))
    loader.expect_measurement(bool(cfg.get("measure")))
    region = rings.SharedRegion.attach(cfg["shm_fd"])
    iago.on_fatal(region.write_fatal)
    app_path = _enter_venv(str(cfg["venv"])) if cfg.get("venv") else None
    client = SyscallClient(region, cfg["bell_host"], cfg["bell_enclave"], cfg["spin_us"])
    sched = scheduler.Scheduler(client, sync=cfg["syscalls"] == "sync")
    scheduler.install(sched)
    family.start()

    # 2. Load from files while we still can.
    # Every C extension is mapped now (dlopen, no initialization): after lockdown no file can
    # be mapped.  The stdlib's, then those the app can import (its directory, site-packages).
    # One that cannot be mapped (e.g. _tkinter without Tk) fails when imported, with the reason.
    importer.preload_extensions(importer.extension_dirs())
    boot_path = list(sys.path)
    if app_path is not None:  # the app's, not the runtime's (those it imports are mapped as they load)
        sys.path[:] = app_path
    for warning in importer.map_app_extensions(None if cfg.get("cas") else _app_dir(cfg)):
        print(f"pyscone: warning: {warning}", file=sys.stderr, flush=True)
    sys.path[:] = boot_path
    from pyscone.enclave.stdlib import clib, console, fdops, files, forks, process, sockets, spawn, surface, threads

    forks.attach(cfg)  # the spare lanes of forked children: mapped while mapping is possible

    if cfg.get("fspf") or cfg.get("measure"):
        # The shield's crypto is a C extension: load it while loading is still possible.
        # A measured enclave always has it, so that its MRENCLAVE does not depend on the FSPF.
        import pyscone.enclave.shields.fs
    if cfg.get("console") or cfg.get("measure"):
        # The console shield's record format (its crypto), loaded while loading is possible; a
        # measured enclave always has it (the CAS may turn the shield on after attestation).
        import pyscone.protect.console
    if cfg.get("measure"):
        # Everything the measurement, the admission and the attestation run is loaded now,
        # by the measuring loader: after the measurement nothing new may load (loader.seal).
        for name in _MEASURED_RUNTIME:
            __import__(name)
    if cfg.get("cas"):
        import pyscone.enclave.cas_client  # noqa: F401 - TLS and the CAS protocol
    try:
        barrier._lib()  # libseccomp: mapped now, so that the measurement covers it
    except barrier.BarrierError:
        pass  # reported by lockdown, if there is one

    # 3. Interpose.
    if app_path is not None:  # the runtime's imports are done: from here on sys.path is the app's
        sys.path[:] = app_path
    threads.install()
    if cfg.get("cas") or cfg.get("spawn_channel") is not None:
        # Nothing path-like comes from the host in CAS mode: the working directory, the
        # program and sys.path[0] are the policy's, set once the enclave has attested
        # (a spawned child's: its parent's, over the attested channel).
        cfg["host_cwd"] = cfg["cwd"]
        cfg["cwd"], cfg["argv"], cfg["module"] = "/", [], False
    else:
        sys.path.insert(0, _path0(cfg))
    slot_data = region.geometry.slot_data
    cfg["slot_data"] = slot_data
    files.install(cfg["cwd"], slot_data)
    sockets.install(slot_data)
    __import__("pyscone.enclave.stdlib.tls", fromlist=["install"]).install()  # ssl, over those sockets
    process.install(cfg["cpu_count"])
    forks.install()
    spawn.install()  # after forks: a spawned child's pid is waited for and signalled through the host
    __import__("pyscone.enclave.stdlib.mpconn", fromlist=["install"]).install()  # Unix connections: sealed
    fdops.install()
    stdout_tty = os.isatty(1)
    console.install(slot_data, stdout_tty)
    if cfg.get("console") and (error := _console_on(cfg["console"], slot_data)):  # dev mode: before the app
        _boot_error(error)
    # After interposition: a preloaded module binds the enclave's socket, select and file
    # functions, as it would when the app imports it (asyncio imported earlier would not).
    for name in cfg["preload"]:
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 - a user mistake, reported in one line
            _boot_error(f"--preload {name}: {type(e).__name__}: {e}")
    importer.install()
    _adopt_finders()
    try:
        shim = clib.prepare()  # the libc layer, if the launcher preloaded it (bound now, armed below)
        if shim and cfg.get("console"):
            clib.console_streams()  # dev mode's shield is on already: C stdio's stdout/stderr into it
    except RuntimeError as e:
        _boot_error(str(e))
    if cfg.get("measure"):
        _measure(cfg, region.geometry)

    # 4. Scrub, bound, lock down.
    os.environ.clear()
    os.environ.update(cfg["env"])
    try:
        if cfg["heap"]:
            barrier.set_heap_limit(cfg["heap"])
        barrier.no_dump()
        surface.snapshot_limits()  # after the heap limit: what resource.getrlimit answers from now on
        barrier.die_with_host(cfg["host_pid"])
        if cfg["barrier"]:
            barrier.lockdown(**forks.barrier_fds(client))
    except (barrier.BarrierError, MemoryError) as e:
        _boot_error(str(e) or type(e).__name__)
    if shim:
        clib.arm()  # from here C libraries' file calls go through the Python layer and the shields
    surface.install(cfg["cpu_count"])  # last: the boot itself still used what it refuses (setrlimit)
    # The C traceback printer reads source lines with direct file I/O (refused by the
    # barrier); the pure-Python one reads them through the interposed open.  Outside a
    # debug enclave the runtime's reports hide protected code from the host's console.
    debug = not cfg["barrier"]
    redact.install(debug)
    if debug:

        def dump(signum: int, frame: object) -> None:
            sys.stderr.write("pyscone: debug enclave: lthread dump (kill -USR2)\n" + scheduler.dump_lthreads(sched))
            sys.stderr.flush()

        signal.signal(signal.SIGUSR2, dump)

    # 5. Run.
    status = [0]
    sched.run(lambda: _run_app(cfg, status))
    if cfg["stats"]:
        _print_stats(client)
    from pyscone.enclave.shields import console as console_shield

    console_shield.finish(status[0])  # the end records: a clean exit (nothing is printed after them)
    iago.exit_now(status[0])


def _console_on(spec: Any, slot_data: int) -> str | None:
    """Turn the console shield on with the owner's key (``{"key": hex}``).  Returns an error."""
    from pyscone.enclave.shields import console as console_shield

    try:
        key = bytes.fromhex(str(spec["key"]))
        console_shield.turn_on(key, os.urandom(16), slot_data, console_shield.lineage_in(spec))  # (spawned: a parent)
    except (KeyError, TypeError, ValueError) as e:
        return f"cannot turn the console shield on: {e}"
    return None


def _enter_venv(path: str) -> list[str]:
    """Put the app's virtualenv on ``sys.path`` (``enclave/venv.py``); return the app's ``sys.path``.

    The app's path is the standard library, then the venv's site-packages with their
    ``.pth`` paths (measured), then the base site-packages if ``include-system-site-packages``:
    python's, without the runtime's own environment (pyscone's dependencies are not the
    app's).  Until boot step 3 the runtime's environment stays *first*, so that the
    runtime's own imports (cryptography, ...) never come from the app's venv.
    """
    from pyscone.enclave import loader, venv

    conf = path + "/pyvenv.cfg"
    try:
        with open(conf, "rb") as f:
            data = f.read()
        spec = venv.parse_cfg(path, data)
    except (OSError, venv.VenvError) as e:  # the host's CLI checked it: the host changed it since
        iago.fail_stop(f"the app's virtualenv {path}: {e}")
    loader.record.append(loader.Loaded("venv:pyvenv.cfg", conf, "config", data, "read"))
    own = venv.site_dirs(venv.Venv(spec.path, spec.version, spec.implementation, False), sys.base_prefix)
    why = venv.problem(spec, own, [os.path.isdir(d) for d in own])
    if why is not None:
        iago.fail_stop(f"the app's virtualenv {path}: {why}")
    # What python in the venv has: sys.prefix, and what site and sysconfig derive from it
    # (sysconfig was imported before this, and keeps the prefix it saw then, and its config vars).
    sys.prefix = sys.exec_prefix = spec.path
    import site
    import sysconfig

    site.PREFIXES[:] = [spec.path, sys.base_prefix] if spec.include_system else [spec.path]
    if hasattr(sysconfig, "_PREFIX"):
        reset: dict[str, object] = {"_PREFIX": spec.path, "_EXEC_PREFIX": spec.path, "_CONFIG_VARS": None}
        if hasattr(sysconfig, "_CONFIG_VARS_INITIALIZED"):  # 3.12+
            reset["_CONFIG_VARS_INITIALIZED"] = False
        for name, value in reset.items():
            setattr(sysconfig, name, value)
    runtime = [p for p in loader.site_entries if p in sys.path]
    stdlib = [p for p in sys.path if p not in runtime]
    sys.path[:] = stdlib  # the venv's .pth lines run as python runs them: without the runtime's site
    loader.add_sitedirs(venv.site_dirs(spec, sys.base_prefix))
    if "sitecustomize" not in sys.modules:  # as site does, unless the runtime's environment had one
        try:
            __import__("sitecustomize")  # through the measuring finder, like any module
        except Exception as e:  # noqa: BLE001 - site reports and goes on
            if not (isinstance(e, ImportError) and e.name == "sitecustomize"):
                print(f"Error in sitecustomize: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    app_path = list(sys.path)
    sys.path[:] = [*stdlib, *runtime, *(p for p in app_path if p not in stdlib and p not in runtime)]
    return app_path


class _AdoptedFinder:
    """A finder that the app's environment installed, whose file answers the enclave loads.

    An editable install made by setuptools puts a finder on ``sys.meta_path`` from a ``.pth``
    ``import`` line; it answers with the stdlib's file loaders, which read the disk directly:
    after lockdown that was a bare EPERM.  Its answers are loaded by the enclave importer's
    loaders instead (through the host, hashed, and verified by the FS shield if protected),
    as the measuring loader does before lockdown (``loader._delegate``).  Everything else is
    the finder's own (``find_distributions``, ``invalidate_caches``).
    """

    def __init__(self, finder: Any) -> None:
        self._finder = finder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._finder, name)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        import importlib.machinery
        import importlib.util

        from pyscone.enclave import loader

        spec = self._finder.find_spec(fullname, path, target)
        kind = type(getattr(spec, "loader", None))
        if spec is None or kind not in (importlib.machinery.SourceFileLoader, importlib.machinery.ExtensionFileLoader):
            return spec
        if loader.runtime_sealed():  # as the enclave finder refuses it (see loader.seal)
            raise loader.SealedImportError(
                f"pyscone: the runtime imports {fullname} after the enclave was measured", name=fullname
            )
        origin = str(spec.origin)
        ours: Any = (
            importer.EnclaveSourceLoader(fullname, origin)
            if kind is importlib.machinery.SourceFileLoader
            else importer.EnclaveExtensionLoader(fullname, origin)
        )
        locations = spec.submodule_search_locations
        return importlib.util.spec_from_file_location(
            fullname, origin, loader=ours, submodule_search_locations=list(locations) if locations is not None else None
        )


def _adopt_finders() -> None:
    """Wrap the finders that are neither the interpreter's nor the enclave's (see :class:`_AdoptedFinder`)."""
    import importlib.machinery

    own = (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)
    sys.meta_path[:] = [
        f if f in own or isinstance(f, (importer.EnclaveFinder, _AdoptedFinder)) else _AdoptedFinder(f)
        for f in sys.meta_path
    ]


def _attest(cfg: dict[str, Any]) -> str | None:
    """Production start: attest to the CAS and take argv, env, files and the FSPF from it."""
    from pyscone.enclave import cas_client
    from pyscone.enclave.attest import AttestationError

    session, _, service = str(cfg.get("session") or "").partition("/")
    host, _, port = str(cfg.get("las") or "").rpartition(":")
    if not (session and service and host and port.isdigit()):
        return "attestation failed: the start-up configuration names no session/service or LAS"
    try:
        config = cas_client.attest_to(cfg["cas"], session, service, (host, int(port)))
    except AttestationError as e:
        return f"attestation failed: {e}"
    host_cwd = cfg["host_cwd"]
    argv = list(config["argv"])
    cfg["module"] = argv[0] == "-m"
    cfg["argv"] = argv[1:] if cfg["module"] else argv
    if argv[0] == "-c" and len(argv) > 1:  # python -c CODE ARGS: sys.argv is ["-c", *ARGS]
        cfg["command"], cfg["argv"] = argv[1], ["-c", *argv[2:]]
    if not cfg["argv"]:
        return "attestation failed: the CAS gave no program to run"
    cwd = config.get("cwd") or "/"
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        return "attestation failed: the CAS gave no absolute working directory"
    cfg["cwd"] = os.path.normpath(cwd)
    expected = cfg.get("expect_program")
    if cfg.get("command") is not None:
        program = "-c"
    elif cfg["module"]:
        program = "-m " + cfg["argv"][0]
    else:
        program = os.path.normpath(os.path.join(cfg["cwd"], cfg["argv"][0]))
    if expected and program != os.path.normpath(os.path.join(host_cwd, expected)):
        # Only ever a reason to refuse: what runs is the session's program in the session's cwd.
        return f"the host started {os.path.join(host_cwd, expected)}, but session {cfg['session']} runs {program}"
    os.environ.clear()
    os.environ.update(config["env"])
    cfg["files"] = config["files"]
    cfg["network"] = config.get("network")  # the CAS's rules, never the host's
    cfg["bytecode_key"] = config.get("bytecode_key")  # the CAS's, never the host's
    cfg["spawn_key"] = config.get("spawn_key")  # the CAS's: proves to a spawned child that we are its parent
    if config.get("fspf"):
        cfg["fspf"] = {**config["fspf"], "pin": cas_client.CasPin(cfg["cas"], config["run"])}
    cfg["console"] = config.get("console")  # (a spawned child gets it from this enclave)
    if config.get("console"):
        return _console_on(config["console"], cfg["slot_data"])
    return None


def _enter(cfg: dict[str, Any]) -> str | None:
    """CAS mode: go to the session's working directory (with the shield mounted, so a
    protected one is the FSPF's) and put the program's directory first on sys.path."""
    from pyscone.enclave.stdlib import files

    try:
        files.chdir(cfg["cwd"])
    except OSError as e:
        return f"the session's working directory {cfg['cwd']}: {e.strerror}"
    sys.path.insert(0, _path0(cfg))
    return None


def _use_bytecode_cache(cfg: dict[str, Any]) -> None:
    """Seal and reuse compiled imports in the host's cache directory, under the CAS's key
    (with a CAS) or the dev-mode launcher's (without one)."""
    from pyscone.enclave import codecache

    cache = cfg.get("bytecode_cache")
    key = cfg.get("bytecode_key") if cfg.get("cas") else (cache or {}).get("key")
    if not cache or not isinstance(key, str):
        return
    try:
        key_bytes = bytes.fromhex(key)
        warning = codecache.configure(os.path.normpath(str(cache["dir"])), key_bytes, _app_id(cfg))
    except (ValueError, TypeError, KeyError) as e:
        warning = f"bytecode cache: {e}; imports compile from source"
    if warning:
        print(f"pyscone: warning: {warning}", file=sys.stderr, flush=True)


def _app_id(cfg: dict[str, Any]) -> str:
    """What the app is, for its import manifest: the program, module or command, and the cwd."""
    if cfg.get("command") is not None:
        what = "-c " + hashlib.sha256(str(cfg["command"]).encode()).hexdigest()
    elif cfg["module"]:
        what = "-m " + str(cfg["argv"][0])
    else:
        what = os.path.normpath(os.path.join(str(cfg["cwd"]), str(cfg["argv"][0])))
    return f"{what}\0{cfg['cwd']}"


def _app_dir(cfg: dict[str, Any]) -> str:
    """The app's directory: the script's, or the cwd for -m and -c."""
    if cfg["module"] or cfg.get("command") is not None:
        return str(cfg["cwd"])
    return os.path.normpath(os.path.dirname(os.path.join(str(cfg["cwd"]), str(cfg["argv"][0]))))


def _path0(cfg: dict[str, Any]) -> str:
    """sys.path[0] as python sets it: the app's directory, or '' for -c."""
    return "" if cfg.get("command") is not None else _app_dir(cfg)


def _shield_network(spec: object) -> str | None:
    """Turn the network shield on, before the app runs (its rules from the CAS, or in dev mode
    from the host)."""
    from pyscone.enclave.shields import net
    from pyscone.enclave.stdlib import tls
    from pyscone.protect.netpolicy import NetPolicyError

    try:
        net.install(spec, tls._use_chain_and_key)
    except NetPolicyError as e:
        return f"network shield: {e}"
    return None


def _inject(injected: dict[str, str]) -> str | None:
    """Write the CAS's files into memory regions of the file-system shield."""
    from pyscone.enclave.shields import fs

    shield = fs.shield()
    for path, content in injected.items():
        if shield is None or shield.kind(path) != "memory":
            return f"the CAS injects {path}, which is not in a memory region of the FSPF"
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
    return None


def _mount(cfg: dict[str, Any], slot_data: int) -> str | None:
    """Mount the file-system shield, if the configuration names an FSPF.  Returns an error."""
    spec = cfg.get("fspf")
    if not spec:
        return None
    from pyscone.enclave.shields import fs
    from pyscone.protect.chunks import IntegrityError

    try:
        key = bytes.fromhex(spec["key"])
        if spec.get("spawned") and spec.get("tag_file"):
            table, tag, copy = _mount_spawned(spec, key, slot_data)
        else:
            table, tag, copy = fs.load(spec["path"], key, spec.get("tags") or None, slot_data)
    except IntegrityError as e:
        return f"cannot mount the file-system shield: {spec['path']}: {e}"
    except OSError as e:
        return f"cannot mount the file-system shield: {spec['path']}: {e.strerror}"
    except ValueError as e:
        return f"cannot mount the file-system shield: {e}"
    shield = fs.mount(table, key, spec["path"], tag, slot_data, copy)
    if spec.get("pin") is not None:
        shield.pin = spec["pin"]  # the CAS
    elif spec.get("tag_file"):
        shield.pin = TagFile(spec["tag_file"], slot_data)
        if spec.get("spawned"):  # (its parent pinned it: it commits under the family's lock, in place)
            shield.pin.adopt(shield.tag)
        else:
            shield.pin.commit(shield.tag, shield.tag)
    if spec.get("spawned"):
        shield.family.spawned()  # a member of the parent's family from the start (fsfamily.py)
    return None


def _mount_spawned(spec: dict[str, Any], key: bytes, slot_data: int) -> Any:
    """A spawned child's FSPF: the one its parent was at, or a newer one the family's tag file pins
    (the family may have committed twice while the child booted, so the copy of the parent's tag
    was written over).  A few tries: a commit between reading the pin and the copy moves it again."""
    from pyscone.enclave.shields import fs
    from pyscone.enclave.stdlib import files
    from pyscone.protect.chunks import IntegrityError

    for attempt in range(20):
        pinned = files.read_whole(spec["tag_file"]).decode("ascii", "replace").lower().split()
        try:
            return fs.load(spec["path"], key, list(dict.fromkeys([*(spec.get("tags") or []), *pinned])), slot_data)
        except IntegrityError:
            if attempt == 19:
                raise
            scheduler.get().sleep(0.01)
    raise AssertionError("unreachable")


class TagFile:
    """Dev mode's pin: the tag the next run's launcher accepts (no CAS).

    A write that fails raises (``OSError`` from the host), never passes silently: the
    shield then fails the app's commit with ``EIO`` (a commit is durable only when its pin
    is).  The file is the host's, so dev mode has no rollback protection against a host
    that lies about writing it; only the CAS gives that.

    Each pin is written in place as a record of one fixed size (the tag on two lines, as
    the launcher reads them with ``split()``: a tag twice is one tag), then fsynced, both in
    one host call (``PWRITE_SYNC``): one small write into the file's first sector, which a kill
    cannot tear and a disk writes whole, so the file holds the old tag or the new and never
    needs the temporary file, rename and directory fsync of a whole-file replacement (each
    SQLite transaction pins four commits).
    The first write of a run (or one of another size) replaces the file whole.
    """

    def __init__(self, path: str, max_io: int) -> None:
        self.path = path
        self.max_io = max_io
        self._fd: int | None = None
        self._size = -1

    def commit(self, old: str, new: str) -> None:
        from pyscone.enclave.shields.store import DurableWrite

        record = f"{new}\n{new}\n".encode()
        if self._fd is None or len(record) != self._size:
            self._reopen(record)
            return
        DurableWrite(self._fd, record, self.max_io, cut=False).wait()  # one host call

    def current(self) -> list[str]:
        """The tags the file pins now (in a process family another process may have moved it)."""
        from pyscone.enclave.stdlib import files

        if self._fd is None:
            self._fd = files.host_open(self.path, os.O_RDWR, 0)
        raw = files.pread(self._fd, 4096, 0)
        return list(dict.fromkeys(raw.decode("ascii", "replace").lower().split()))

    def adopt(self, tag: str) -> None:
        """A spawned child's pin: write the family's tag file in place, as its parent does (a
        replacement would leave the other members' fds on the file that was replaced)."""
        from pyscone.enclave.stdlib import files

        self._fd = files.host_open(self.path, os.O_RDWR, 0)
        self._size = len(f"{tag}\n{tag}\n")

    def _reopen(self, record: bytes) -> None:
        from pyscone.enclave.shields.store import replace_host_file
        from pyscone.enclave.stdlib import files

        if self._fd is not None:
            files.close(self._fd)
            self._fd = None
        replace_host_file(self.path, record, self.max_io)
        self._fd = files.host_open(self.path, os.O_RDWR, 0)  # (read: current)
        self._size = len(record)


def _run_app(cfg: dict[str, Any], status: list[int]) -> None:
    import types

    from pyscone.enclave import spawnchan
    from pyscone.enclave.stdlib import files

    if cfg.get("spawn_channel") is not None:  # a spawned child: from its parent, never the host or the CAS
        error = spawnchan.from_parent(cfg)
        if error is None and cfg.get("console"):
            error = _console_on(cfg["console"], cfg["slot_data"])
    else:
        error = _attest(cfg) if cfg.get("cas") else None
    argv: list[str] = cfg["argv"]
    sys.argv = list(argv)
    if error is None:
        try:
            error = _mount(cfg, cfg["slot_data"])
        except Exception as e:  # noqa: BLE001 - reported in one line, the app never starts
            error = f"cannot mount the file-system shield: {type(e).__name__}: {e}"
    if error is None and cfg.get("files"):
        error = _inject(cfg["files"])
    if error is None and cfg.get("network"):
        error = _shield_network(cfg["network"])
    if error is None and (cfg.get("cas") or cfg.get("spawn_channel") is not None):
        error = _enter(cfg)
    if error is None:
        _use_bytecode_cache(cfg)
        spawnchan.remember(cfg)  # what this enclave gives the children it spawns
    if error is not None:
        print(f"pyscone: {error}", file=sys.stderr, flush=True)
        status[0] = 70
        return
    code = 0
    try:
        main_mod = types.ModuleType("__main__")
        main_mod.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = main_mod
        if cfg["module"]:
            import runpy

            runpy._run_module_as_main(argv[0], alter_argv=False)  # type: ignore[attr-defined]
        elif cfg.get("command") is not None:  # python -c: no __file__, the code is "<string>"
            command = str(cfg["command"])
            importer.record("-c", command.encode("utf-8", "surrogateescape"), "source")
            exec(compile(command, "<string>", "exec", dont_inherit=True), main_mod.__dict__)
        else:
            path = files.abspath(argv[0])
            try:
                with open(path, "rb") as f:
                    source = f.read()
            except OSError as e:  # what python says, in one line
                print(f"pyscone: can't open file {path!r}: [Errno {e.errno}] {e.strerror}", file=sys.stderr)
                status[0] = 2
                return
            importer.record(path, source, "source")
            main_mod.__file__ = argv[0]
            main_mod.__cached__ = None  # type: ignore[attr-defined]
            exec(compile(source, argv[0], "exec", dont_inherit=True), main_mod.__dict__)
    except SystemExit as e:
        code = _exit_code(e.code)
    except KeyboardInterrupt:
        redact.print_exc()
        code = 130
    except BaseException:  # noqa: BLE001 - the interpreter reports and exits 1
        sys.excepthook(*sys.exc_info())
        code = 1
    code = _finish(code)
    status[0] = code


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _finish(code: int) -> int:
    """What the interpreter does at exit: join threads, run atexit, flush."""
    import atexit

    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        atexit._run_exitfuncs()
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:  # noqa: BLE001
        redact.print_exc()
    try:
        from pyscone.enclave import codecache
        from pyscone.enclave.stdlib import files

        codecache.at_exit()  # keep the app's import manifest, if it is new
        files.at_exit()  # flush what the app left open; commit the shield's files
    except OSError as e:
        print(f"pyscone: at exit: {e}", file=sys.stderr)
        code = code or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed console must not turn exit into a crash
            pass
    return code


def _print_stats(client: SyscallClient) -> None:
    try:
        print(
            f"pyscone: enclave: {client.calls} host calls, {client.doorbells} doorbells, "
            f"{client.sleeps} sleeps, {client.watchdog_wakeups} watchdog wake-ups, "
            f"{len(importer.measured)} files measured",
            file=sys.stderr,
            flush=True,
        )
        from pyscone.enclave import codecache
        from pyscone.enclave.shields import fs

        if (cache := codecache.active) is not None:
            c = cache.stats
            print(
                f"pyscone: bytecode cache: {c.hits} hits, {c.misses} misses, {c.stored} stored, {c.refused} refused",
                file=sys.stderr,
                flush=True,
            )
        if (shield := fs.shield()) is not None:
            print(f"pyscone: fs shield: {shield.commits} commits, FSPF tag {shield.tag}", file=sys.stderr, flush=True)
        from pyscone.enclave.stdlib import clib

        if clib.active() and clib.dispatched():
            print(
                f"pyscone: libc layer: {clib.dispatched()} calls from C libraries, {clib.fast_answers()} answered "
                f"by the shim from memory, {clib.foreign_calls()} refused (other OS threads)",
                file=sys.stderr,
                flush=True,
            )
    except Exception:  # noqa: BLE001
        pass
