"""The ``pyscone`` command line: a thin layer that parses and calls the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from pyscone import abi

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class UsageError(Exception):
    """A user mistake: reported as one ``error: ...`` line."""


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in SIZE_UNITS and t[-1:] else ""
    number = t[: len(t) - len(unit)]
    if not number.isdigit():
        raise UsageError(f"{text!r} is not a size (examples: 512M, 2G, 1048576)")
    return int(number) * SIZE_UNITS[unit]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse_size(raw)
    except UsageError:
        raise UsageError(f"{name}={raw!r} is not a number") from None


def add_identity_options(p: argparse.ArgumentParser) -> None:
    """Options that are part of the enclave's identity (measured into MRENCLAVE)."""
    p.add_argument(
        "--syscalls",
        choices=("async", "sync"),
        default=os.environ.get("PYSCONE_SYSCALLS", "async"),
        help="asynchronous (default) or synchronous system calls  [PYSCONE_SYSCALLS]",
    )
    p.add_argument(
        "--slots", type=int, default=None, help=f"syscall slots (default {abi.DEFAULT_SLOTS})  [PYSCONE_SLOTS]"
    )
    p.add_argument("--slot-size", default=None, help="data bytes per slot (default 64K)  [PYSCONE_SLOT_SIZE]")
    p.add_argument("--heap", default=None, help="enclave heap limit, e.g. 512M (default 1G)  [PYSCONE_HEAP]")
    p.add_argument(
        "--preload",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE before lockdown (rarely needed: every C extension on the app's sys.path is mapped anyway)",
    )
    p.add_argument("--no-barrier", action="store_true", help="DEBUG ONLY: do not install the seccomp barrier")
    p.add_argument(
        "--venv",
        metavar="DIR",
        help="the app's virtualenv: its packages are the app's (default: the active one, $VIRTUAL_ENV, "
        "except with --cas; part of MRENCLAVE)",
    )
    p.add_argument("--no-venv", action="store_true", help="ignore the active virtualenv ($VIRTUAL_ENV)")
    p.add_argument(
        "--cas",
        default=os.environ.get("PYSCONE_CAS") or None,
        metavar="URL",
        help="the CAS this enclave attests to (pinned by --cas-cert; part of MRENCLAVE)  [PYSCONE_CAS]",
    )
    p.add_argument(
        "--cas-cert",
        default=os.environ.get("PYSCONE_CAS_CERT") or None,
        metavar="FILE",
        help="the CAS's certificate (default ~/.pyscone/cas/cas-cert.pem)  [PYSCONE_CAS_CERT]",
    )


def _cas_pin(a: argparse.Namespace) -> dict[str, str] | None:
    """The CAS identity an enclave pins: its URL and the SHA-256 of its certificate."""
    if not a.cas:
        return None
    from pyscone.cas import cli as cas_cli
    from pyscone.cas.protocol import cert_fingerprint

    cert = a.cas_cert or str(cas_cli.default_dir() / "cas-cert.pem")
    try:
        with open(cert, "rb") as f:
            fingerprint = cert_fingerprint(f.read())
    except OSError as e:
        raise UsageError(f"--cas-cert {cert}: {e.strerror}") from None
    except ValueError:
        raise UsageError(f"--cas-cert {cert}: not a PEM certificate") from None
    if not a.cas.startswith("https://"):
        raise UsageError(f"--cas {a.cas}: the CAS URL starts with https://")
    return {"url": a.cas.rstrip("/"), "cert_sha256": fingerprint}


def _venv(a: argparse.Namespace, attested: bool) -> str | None:
    """The app's virtualenv: ``--venv``, else (not with a CAS) the active one; checked here.

    With a CAS the host's environment chooses nothing: only an explicit ``--venv``, which
    is measured, so that the session's policy (its MRENCLAVE or signer) decides whether
    the enclave may run with it.

    Raises:
        UsageError: the venv is missing, is not a venv, or is for another Python.
    """
    from pyscone.enclave import venv

    active = os.environ.get("VIRTUAL_ENV") or None
    if a.no_venv:
        return None
    if a.venv is not None:
        path, what = a.venv, f"--venv {a.venv}"
    elif active is not None and not attested:
        path, what = active, f"the active virtualenv (VIRTUAL_ENV={active})"
    else:
        if active is not None and not _same_dir(active, sys.prefix):
            print(
                f"pyscone: note: with --cas the active virtualenv ({active}) is not used; "
                "pass --venv DIR (it is part of MRENCLAVE)",
                file=sys.stderr,
            )
        return None
    path = os.path.abspath(path)
    if _same_dir(path, sys.prefix):
        return None  # pyscone's own environment: the enclave has it anyway
    if not os.path.isdir(path):
        raise UsageError(f"{what}: no such directory")
    try:
        with open(os.path.join(path, "pyvenv.cfg"), "rb") as f:
            spec = venv.parse_cfg(path, f.read())
    except FileNotFoundError:
        raise UsageError(f"{what}: not a virtualenv (no pyvenv.cfg in {path})") from None
    except OSError as e:
        raise UsageError(f"{what}: {e.strerror}") from None
    except venv.VenvError as e:
        raise UsageError(f"{what}: {e}") from None
    own = venv.site_dirs(venv.Venv(spec.path, spec.version, spec.implementation, False), sys.base_prefix)
    why = venv.problem(spec, own, [os.path.isdir(d) for d in own])
    if why is not None:
        hint = "; deactivate it or pass --no-venv" if a.venv is None else ""
        raise UsageError(f"{what}: {why}{hint}")
    return spec.path


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyscone", description="Secure containers for unmodified Python applications.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a Python program in a (simulated) enclave",
        description="Run an unmodified Python program in a simulated enclave. Arguments after the program go to it.",
    )
    run.add_argument(
        "-m",
        dest="module",
        metavar="MODULE",
        help="run a library module as a script, like python -m (ends the options)",
    )
    run.add_argument("-c", dest="code", metavar="CODE", help="run CODE, like python -c (ends the options)")
    add_identity_options(run)
    run.add_argument(
        "--sthreads",
        type=int,
        default=None,
        help="host S-threads: 1 dispatcher/reactor + N-1 pool threads (default 3)  [PYSCONE_STHREADS]",
    )
    run.add_argument(
        "--processes",
        type=int,
        default=None,
        help="how many forked enclaves of the family may run at once besides the first (default 8)"
        "  [PYSCONE_PROCESSES]",
    )
    run.add_argument(
        "--spin-us",
        type=int,
        default=None,
        help="max spin before sleeping, in microseconds (default 400; 0 in sync mode)  [PYSCONE_SPIN_US]",
    )
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the app (the host's environment never reaches the enclave)",
    )
    run.add_argument(
        "--fspf",
        metavar="PATH",
        default=os.environ.get("PYSCONE_FSPF") or None,
        help="mount the file-system shield described by this FSPF  [PYSCONE_FSPF]",
    )
    run.add_argument(
        "--fspf-key-file",
        metavar="FILE",
        help="DEV MODE: the FSPF key, hex (default PATH.key; in production the CAS delivers it)",
    )
    run.add_argument(
        "--fspf-tag",
        metavar="TAG",
        help="pin this FSPF tag: an older FSPF is refused (default: the one in PATH.tag)",
    )
    run.add_argument(
        "--fspf-tag-file",
        metavar="FILE",
        help="where the newest FSPF tag is kept and pinned from (default PATH.tag)",
    )
    run.add_argument(
        "--net-shield",
        metavar="FILE",
        help="DEV MODE: the network shield's rules (YAML: listen/connect/unlisted/udp, docs/network-shield.md); "
        "in production the session policy's 'network' gives them",
    )
    run.add_argument(
        "--session",
        metavar="NAME/SERVICE",
        default=os.environ.get("PYSCONE_SESSION") or None,
        help="with --cas: the session and service to attest for; the CAS supplies argv, env, files and the FSPF"
        "  [PYSCONE_SESSION]",
    )
    run.add_argument(
        "--las",
        default=os.environ.get("PYSCONE_LAS", "127.0.0.1:18766"),
        metavar="HOST:PORT",
        help="this host's attestation service (default 127.0.0.1:18766)  [PYSCONE_LAS]",
    )
    run.add_argument(
        "--signature",
        metavar="FILE",
        help="the enclave's signature (pyscone sign): it measures itself and refuses to run unless it matches",
    )
    run.add_argument(
        "--bytecode-cache",
        default=os.environ.get("PYSCONE_BYTECODE_CACHE") or None,
        metavar="DIR",
        help="where the enclave keeps the bytecode it compiled, sealed (default ~/.cache/pyscone/bytecode; "
        "'off': compile every import)  [PYSCONE_BYTECODE_CACHE]",
    )
    run.add_argument(
        "--console-key-file",
        metavar="FILE",
        help="DEV MODE (insecure: the key is on the host): turn the console shield on with this key (hex); "
        "in production the session policy's service says console: {key: ...}",
    )
    run.add_argument("--stats", action="store_true", help="print system-call statistics at exit")
    run.add_argument("program", nargs="?", help="the script to run (ends the options)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the program, as python passes them")

    from pyscone.host import console_tool

    console_tool.add_parser(sub)
    fs = sub.add_parser(
        "fspf",
        help="make and inspect file-system protection files (FSPF)",
        description="Make and inspect a file-system protection file (FSPF). Run on the owner's machine, "
        "where the plaintext is. FSPF.key holds the key (dev mode), FSPF.tag the newest tag.",
    )
    fsub = fs.add_subparsers(dest="fspf_command", required=True)
    c = fsub.add_parser("create", help="a new FSPF with one region: / unprotected; writes FSPF, FSPF.key, FSPF.tag")
    c.add_argument("fspf", metavar="FSPF")
    c.add_argument("--force", action="store_true", help="replace an existing FSPF and key")
    r = fsub.add_parser("addr", help="add (or change) a region: a path prefix and how files below it are protected")
    r.add_argument("fspf", metavar="FSPF")
    r.add_argument("prefix", help="an absolute path prefix, as the enclave sees it")
    r.add_argument("--kind", required=True, choices=("unprotected", "authenticated", "encrypted", "memory"))
    r.add_argument("--chunk-size", default="4K", help="chunk size for files in this region (default 4K)")
    f = fsub.add_parser("addf", help="protect a file or a directory tree into a protected region")
    f.add_argument("fspf", metavar="FSPF")
    f.add_argument("dest", help="where the files are in the enclave (written there on this machine)")
    f.add_argument("src", nargs="?", help="the plaintext file or directory (default: DEST itself, in place)")
    sh = fsub.add_parser("show", help="print regions, protected files and the tag")
    sh.add_argument("fspf", metavar="FSPF")
    t = fsub.add_parser("tag", help="print the FSPF's tag")
    t.add_argument("fspf", metavar="FSPF")
    ca = fsub.add_parser("cat", help="print a protected file's plaintext (the owner's check)")
    ca.add_argument("fspf", metavar="FSPF")
    ca.add_argument("path", help="the file's path in the enclave")
    for sp in (c, r, f, sh, t, ca):
        sp.add_argument("--key-file", help="the FSPF key file (default FSPF.key)")

    m = sub.add_parser("measure", help="print the enclave's MRENCLAVE (the same options as pyscone run)")
    tc = sub.add_parser("tcb", help="list exactly what MRENCLAVE covers: every measured file, with sizes")
    sg = sub.add_parser(
        "sign",
        help="sign the enclave: MRENCLAVE, product id, security version (an SGX SIGSTRUCT analogue)",
    )
    for sp in (m, tc, sg):
        add_identity_options(sp)
        sp.add_argument(
            "program",
            nargs="?",
            help="the app (only its directory matters: its extensions and --preload modules are measured)",
        )
    sg.add_argument("--key", required=True, help="the signer's private key (pyscone keygen)")
    sg.add_argument("--product-id", type=int, default=0, help="product id, 0-65535 (default 0)")
    sg.add_argument("--svn", type=int, default=0, help="security version, 0-65535 (default 0)")
    sg.add_argument("--debug", action="store_true", help="also allow the enclave to run as a debug enclave")
    sg.add_argument("-o", "--out", required=True, help="where to write the signature")
    from pyscone.cas import cli as cas_cli

    cas_cli.add_parser(sub)
    las = sub.add_parser("las", help="run the local attestation service (simulated platform; one per host)")
    las.add_argument("--dir", help="where the platform key is kept (default ~/.pyscone/las)  [PYSCONE_LAS_DIR]")
    las.add_argument("--listen", default="127.0.0.1:18766", help="HOST:PORT (default 127.0.0.1:18766)")
    las.add_argument("--show", action="store_true", help="print the platform's public key (for a CAS) and exit")
    b = sub.add_parser(
        "build",
        help="make a secure image of an app: interpreter, runtime, the app encrypted under the FS shield, the FSPF, "
        "a manifest with the MRENCLAVE and a policy skeleton (--oci: an OCI image and a docker-archive)",
    )
    b.add_argument("app_dir", metavar="APP_DIR", help="the app's directory (all of it is encrypted into /app)")
    b.add_argument("-o", "--out", required=True, metavar="OUT", help="where the image and its manifest go")
    b.add_argument("--entry", metavar="FILE", help="the program, relative to APP_DIR (default app.py or main.py)")
    b.add_argument("--requirements", metavar="FILE", help="the app's requirements (pip install -r) for the image")
    b.add_argument(
        "--fspf-key",
        metavar="FILE",
        help="the FSPF key (hex): the same key and inputs give the same image (default OUT/fspf.key, made once)",
    )
    b.add_argument("--cas", metavar="URL", help="the CAS the image's enclave attests to (part of MRENCLAVE)")
    b.add_argument("--cas-cert", metavar="FILE", help="the CAS's certificate (with --cas)")
    b.add_argument(
        "--dev",
        action="store_true",
        help="DEV MODE (insecure): an image that runs without a CAS, with the FSPF key inside it",
    )
    b.add_argument("--oci", action="store_true", help="also write OUT/oci (an OCI image layout) and OUT/image.tar")
    b.add_argument("--tag", default="pyscone-app:latest", help="the image's name:tag (default pyscone-app:latest)")
    b.add_argument("--session", default="app/app", metavar="NAME/SERVICE", help="for the policy skeleton")
    k = sub.add_parser("keygen", help="make an enclave signer key (ECDSA P-256, PEM, mode 0600)")
    k.add_argument("path")
    k.add_argument("--force", action="store_true", help="replace an existing key")
    return p


def cmd_build(a: argparse.Namespace) -> int:
    from pathlib import Path

    from pyscone.image import build

    app_dir = Path(a.app_dir)
    entry = a.entry
    if entry is None:
        entry = next((n for n in ("app.py", "main.py") if (app_dir / n).is_file()), None)
        if entry is None:
            raise UsageError(f"{app_dir}: no app.py or main.py: name the program with --entry")
    spec = build.Spec(
        app_dir=app_dir.resolve(),
        out=Path(a.out).resolve(),
        entry=entry,
        requirements=Path(a.requirements).resolve() if a.requirements else None,
        fspf_key_file=Path(a.fspf_key).resolve() if a.fspf_key else None,
        cas=a.cas,
        cas_cert=Path(a.cas_cert).resolve() if a.cas_cert else None,
        dev=a.dev,
        oci=a.oci,
        tag=a.tag,
        session=a.session,
    )
    try:
        result = build.build(spec)
    except build.BuildError as e:
        raise UsageError(str(e)) from None
    print(f"MRENCLAVE {result.mrenclave}")
    if result.image_digest:
        print(f"image     {result.image_digest}")
    print(f"manifest  {result.manifest}")
    print(f"policy    {result.policy} (holds the FSPF key: give it to the CAS, keep it from the host)")
    return 0


def cmd_cas(a: argparse.Namespace) -> int:
    from pyscone.cas import cli as cas_cli

    try:
        return cas_cli.run(a)
    except cas_cli.CliError as e:
        raise UsageError(str(e)) from None


def cmd_las(a: argparse.Namespace) -> int:
    from pathlib import Path

    from pyscone.platform import las

    try:
        return las.main(Path(a.dir) if a.dir else las.default_dir(), a.listen, a.show)
    except las.LasError as e:
        raise UsageError(str(e)) from None


def cmd_identity(a: argparse.Namespace) -> int:
    """``measure``, ``tcb``, ``sign`` and ``keygen``."""
    from pyscone.host import identity, launcher
    from pyscone.platform import sigstruct

    try:
        if a.command == "keygen":
            mrsigner = identity.keygen(a.path, a.force)
            print(f"wrote {a.path} (keep it secret); MRSIGNER {mrsigner.hex()}")
            return 0
        key = identity.read_signer_key(a.key) if a.command == "sign" else None
        program = a.program or "-"
        enclave, host = launch_configs(a, [program])
        doc = identity.measure_enclave(enclave, host)
    except identity.IdentityError as e:
        raise UsageError(str(e)) from None
    except launcher.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.command == "measure":
        print(doc["mrenclave"])
    elif a.command == "tcb":
        sys.stdout.write(identity.format_tcb(doc))
    else:
        assert key is not None
        try:
            s = sigstruct.sign(bytes.fromhex(doc["mrenclave"]), key, product_id=a.product_id, svn=a.svn, debug=a.debug)
        except ValueError as e:
            raise UsageError(str(e)) from None
        try:
            with open(a.out, "wb") as f:
                f.write(s.encode())
        except OSError as e:
            raise UsageError(f"{a.out}: {e.strerror}") from None
        print(
            f"signed MRENCLAVE {doc['mrenclave']}: MRSIGNER {s.mrsigner.hex()}, product id {s.product_id}, "
            f"security version {s.svn}, {'debug allowed' if s.debug else 'production only'}; wrote {a.out}"
        )
    return 0


def cmd_fspf(a: argparse.Namespace) -> int:
    from pyscone.host import fspf_tool as tool

    paths = tool.Paths.of(a.fspf, a.key_file)
    try:
        if a.fspf_command == "create":
            tag = tool.create(paths, a.force)
            print(f"created {paths.fspf} (key in {paths.key}, keep it secret); tag {tag}")
        elif a.fspf_command == "addr":
            tag = tool.add_region(paths, a.prefix, a.kind, parse_size(a.chunk_size))
            print(f"region {os.path.normpath(a.prefix)}: {a.kind}; tag {tag}")
        elif a.fspf_command == "addf":
            tag, added = tool.add_files(paths, a.dest, a.src if a.src is not None else a.dest)
            print(f"protected {len(added)} file(s) under {os.path.normpath(a.dest)}; tag {tag}")
        elif a.fspf_command == "show":
            sys.stdout.write(tool.show(paths))
        elif a.fspf_command == "tag":
            print(tool.load(paths)[2])
        elif a.fspf_command == "cat":
            sys.stdout.flush()
            tool.cat(paths, a.path, sys.stdout.buffer)
    except tool.ToolError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"{e.filename or paths.fspf}: {e.strerror}") from None
    return 0


def _fspf_config(a: argparse.Namespace) -> dict[str, object] | None:
    """Dev mode: the FSPF key and pinned tag, read on the host (the CAS replaces this)."""
    if not a.fspf:
        return None
    from pyscone.host import fspf_tool as tool

    path = os.path.abspath(a.fspf)
    if not os.path.isfile(path):
        raise UsageError(f"--fspf {a.fspf}: no such file (make one with: pyscone fspf create {a.fspf})")
    env_key = os.environ.get("PYSCONE_FSPF_KEY")
    if a.fspf_key_file or not env_key:
        try:
            key = tool.read_key(a.fspf_key_file or path + ".key").hex()
        except tool.ToolError as e:
            raise UsageError(str(e)) from None
    else:
        key = env_key
    tag_file = os.path.abspath(a.fspf_tag_file or path + ".tag")
    tags = [a.fspf_tag] if a.fspf_tag else None
    if tags is None and os.path.isfile(tag_file):
        with open(tag_file) as fh:
            tags = fh.read().split() or None
    if tags is None:  # nothing pins the FSPF: said at every run, as it is true at every run
        state = "is empty" if os.path.isfile(tag_file) else "is missing"
        print(
            f"pyscone: WARNING: dev mode: the tag file {tag_file} {state} and no --fspf-tag is given: "
            "rollback protection is OFF for this run (the host may put back any older FSPF and files).",
            file=sys.stderr,
        )
    print(
        "pyscone: WARNING: dev mode: the FSPF key comes from the host; "
        "in production the CAS delivers it only after attestation.",
        file=sys.stderr,
    )
    return {"path": path, "key": key, "tags": tags, "tag_file": tag_file}


def launch_configs(a: argparse.Namespace, argv: list[str], module: bool = False) -> tuple[Any, Any]:
    """The enclave and host configurations from the options every enclave command shares."""
    from pyscone.host import launcher

    slots = a.slots if a.slots is not None else _env_int("PYSCONE_SLOTS", abi.DEFAULT_SLOTS)
    slot_data = parse_size(a.slot_size) if a.slot_size else _env_int("PYSCONE_SLOT_SIZE", abi.DEFAULT_SLOT_DATA)
    sthreads = getattr(a, "sthreads", None)
    sthreads = sthreads if sthreads is not None else _env_int("PYSCONE_STHREADS", 3)
    # Sync mode models an enclave exit per call: the thread leaves (hands the call to the host
    # through the kernel and sleeps), so by default neither side spins.  --spin-us overrides.
    spin_default = 0 if a.syscalls == "sync" else 400
    spin = getattr(a, "spin_us", None)
    spin = spin if spin is not None else _env_int("PYSCONE_SPIN_US", spin_default)
    heap = parse_size(a.heap) if a.heap else _env_int("PYSCONE_HEAP", 1 << 30)
    try:
        abi.Geometry(slots, slot_data)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if sthreads < 1:
        raise UsageError("--sthreads must be at least 1")
    processes = getattr(a, "processes", None)
    processes = processes if processes is not None else _env_int("PYSCONE_PROCESSES", 8)
    if not 0 <= processes <= 256:
        raise UsageError("--processes must be between 0 and 256")
    if spin < 0:
        raise UsageError("--spin-us must not be negative")
    enclave = launcher.EnclaveConfig(
        argv=argv,
        module=module,
        syscalls=a.syscalls,
        spin_us=spin,
        heap=heap,
        barrier=not a.no_barrier,
        preload=a.preload,
        cas=_cas_pin(a),
    )
    enclave.venv = _venv(a, attested=enclave.cas is not None)
    enclave.measure = enclave.cas is not None
    host = launcher.HostConfig(
        slots=slots,
        slot_data=slot_data,
        sthreads=sthreads,
        spin_us=spin,
        hostile=os.environ.get("PYSCONE_TEST_HOSTILE") or None,
        processes=processes,
    )
    return enclave, host


def launch(enclave: Any, host: Any) -> int:
    from pyscone.host import launcher

    try:
        return launcher.run(enclave, host)
    except launcher.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def cmd_run(a: argparse.Namespace) -> int:
    if a.cas:
        return _run_attested(a)
    if a.session:
        raise UsageError("--session needs --cas (the CAS that holds the session)")
    if a.code is not None:
        argv = ["-c", *a.args]
    elif a.module:
        argv = [a.module, *a.args]
    elif a.program:
        if not os.path.isfile(a.program):
            raise UsageError(f"can't open file {a.program!r}: no such file")
        argv = [a.program, *a.args]
    else:
        raise UsageError(
            "pyscone run needs a program (pyscone run app.py), a module (-m module) or a command (-c code)"
        )
    env = {}
    for item in a.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    enclave, host = launch_configs(a, argv, bool(a.module))
    enclave.command = a.code
    enclave.env = env
    enclave.stats = a.stats
    enclave.signature = _signature(a)
    enclave.measure = enclave.measure or enclave.signature is not None
    if a.no_barrier:
        print(
            "pyscone: WARNING: --no-barrier: the enclave runs WITHOUT its seccomp barrier; "
            "un-interposed I/O reaches the host in the clear. Debugging only.",
            file=sys.stderr,
        )
    enclave.fspf = _fspf_config(a)
    enclave.network = _net_shield_config(a.net_shield)
    enclave.bytecode_cache = _bytecode_cache(a, dev=True)
    enclave.console = _console_config(a)
    return launch(enclave, host)


_PEM_FIELDS = ("cert", "key", "ca", "client_ca")


def _net_shield_config(path: str | None) -> dict[str, Any] | None:
    """Dev mode: the network shield's rules from a file on the host, its PEM files read here."""
    if path is None:
        return None
    import yaml

    from pyscone.protect import netpolicy

    try:
        with open(path, encoding="utf-8") as fh:
            spec = yaml.safe_load(fh)
    except OSError as e:
        raise UsageError(f"--net-shield {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"--net-shield {path}: not valid YAML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    if isinstance(spec, dict):
        for section in ("listen", "connect"):
            rules = spec.get(section)
            for i, rule in enumerate(rules if isinstance(rules, list) else []):
                for name in _PEM_FIELDS if isinstance(rule, dict) else ():
                    value = rule.get(name)
                    if isinstance(value, str) and "-----BEGIN" not in value:
                        try:
                            with open(os.path.join(base, value), encoding="ascii") as fh:
                                rule[name] = fh.read()
                        except (OSError, UnicodeDecodeError) as e:
                            why = getattr(e, "strerror", None) or "not a PEM file"
                            raise UsageError(f"--net-shield {path}: {section}[{i}].{name}: {value}: {why}") from None
    try:
        netpolicy.parse(spec)
    except netpolicy.NetPolicyError as e:
        raise UsageError(f"--net-shield {path}: {e}") from None
    print(
        "pyscone: WARNING: dev mode: the network shield's keys come from the host's disk; "
        "in production the CAS delivers them only after attestation.",
        file=sys.stderr,
    )
    assert isinstance(spec, dict)
    return spec


def _console_config(a: argparse.Namespace) -> dict[str, str] | None:
    """Dev mode's console shield: the key from a host file, said loudly before the records start."""
    if not a.console_key_file:
        return None
    from pyscone.host import console_tool

    try:
        key = console_tool.read_key(a.console_key_file)
    except console_tool.ToolError as e:
        raise UsageError(str(e)) from None
    print(
        "pyscone: WARNING: INSECURE dev mode: the console key comes from a file on the host; "
        "in production the session policy gives it after attestation.",
        file=sys.stderr,
        flush=True,
    )
    return {"key": key.hex()}


def _run_attested(a: argparse.Namespace) -> int:
    """``pyscone run --cas URL --session NAME/SERVICE``: nothing secret comes from the host."""
    if a.args or a.module or a.code is not None or a.env or a.fspf:
        raise UsageError("with --cas the CAS supplies the program's arguments, environment and FSPF")
    if a.console_key_file:
        raise UsageError("with --cas the console key is the session policy's (console: {key: ...})")
    name, sep, service = (a.session or "").partition("/")
    if not (name and sep and service):
        raise UsageError("--cas needs --session NAME/SERVICE")
    host, _, port = a.las.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--las {a.las!r}: expected HOST:PORT")
    enclave, host_cfg = launch_configs(a, ["-"])
    enclave.expect_program = a.program  # if named, the session must run this program
    enclave.session = a.session
    enclave.las = a.las
    enclave.stats = a.stats
    enclave.signature = _signature(a)
    enclave.bytecode_cache = _bytecode_cache(a, dev=False)
    return launch(enclave, host_cfg)


def _bytecode_cache(a: argparse.Namespace, dev: bool) -> dict[str, str] | None:
    """The bytecode cache's directory (made if missing), and in dev mode its key.

    The default directory is only used if it can be made; one named with
    ``--bytecode-cache`` must work, or it is an error.
    """
    from pyscone.host import bytecode

    named = a.bytecode_cache
    if named == "off":
        return None
    try:
        return bytecode.prepare(named, dev)
    except bytecode.CacheDirError as e:
        if named:
            raise UsageError(f"--bytecode-cache {named}: {e}") from None
        return None


def _signature(a: argparse.Namespace) -> str | None:
    """The enclave signature file named by ``--signature``, as hex for the enclave."""
    if not a.signature:
        return None
    try:
        with open(a.signature, "rb") as f:
            return f.read().hex()
    except OSError as e:
        raise UsageError(f"--signature {a.signature}: {e.strerror}") from None


def split_run(parser: argparse.ArgumentParser, args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``pyscone run``'s arguments split as python splits its own: (pyscone's, the app's).

    pyscone's options end at the program, at ``-m MODULE`` or at ``-c CODE`` (also written
    ``-mMODULE``, ``-cCODE``) or at ``--``; everything after is the app's argv, untouched,
    so ``pyscone run -m gunicorn -w 1 app:app`` gives ``-w 1`` to gunicorn.  The app's part
    starts with the program, ``-m MODULE`` or ``-c CODE`` itself.
    """
    takes_value = {}
    for action in parser._actions:
        for option in action.option_strings:
            takes_value[option] = action.nargs != 0
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            return list(args[:i]), list(args[i + 1 :])
        if tok in ("-m", "-c") or (tok[:2] in ("-m", "-c") and len(tok) > 2):
            return list(args[:i]), list(args[i:])
        if not tok.startswith("-") or tok == "-":
            return list(args[:i]), list(args[i:])
        name = tok.partition("=")[0]
        # An unambiguous prefix is the option, as argparse reads it; anything else is its error.
        matches = [o for o in takes_value if o == name] or [o for o in takes_value if o.startswith(name)]
        value = len(matches) == 1 and takes_value[matches[0]] and "=" not in tok
        i += 2 if value else 1
    return list(args), []


def _parse_run(parser: argparse.ArgumentParser, run: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``run ...``: pyscone's options by argparse, the rest as python would."""
    ours, app = split_run(run, argv[1:])
    a = parser.parse_args([argv[0], *ours])
    a.module = a.program = a.code = None
    a.args = []
    if app:
        first, rest = app[0], app[1:]
        if first[:2] in ("-m", "-c"):
            target = first[2:] or (rest.pop(0) if rest else None)
            if target is None:
                run.error(f"argument {first}: expected one argument")
            if first[:2] == "-m":
                a.module = target
            else:
                a.code = target
        else:
            a.program = first
        a.args = rest
    return a


def _run_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            run: argparse.ArgumentParser = action.choices["run"]
            return run
    raise AssertionError("pyscone has a run command")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"] and not {"-h", "--help"} & set(split_run(_run_parser(parser), args[1:])[0]):
        a = _parse_run(parser, _run_parser(parser), args)
    else:
        a = parser.parse_args(args)
    try:
        if a.command == "run":
            return cmd_run(a)
        if a.command == "fspf":
            return cmd_fspf(a)
        if a.command in ("measure", "tcb", "sign", "keygen"):
            return cmd_identity(a)
        if a.command == "las":
            return cmd_las(a)
        if a.command == "cas":
            return cmd_cas(a)
        if a.command == "build":
            return cmd_build(a)
        if a.command == "console":
            from pyscone.host import console_tool

            return console_tool.run(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # e.g. an unknown PYSCONE_TEST_HOSTILE mode
        print(f"error: {e}", file=sys.stderr)
        return 2

    parser.error(f"unknown command {a.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
