"""``pyscone build``: a secure image of an app, reproducible (host side: the owner's build machine).

Theory of operation
-------------------
An image is three layers, each a directory tree under ``OUT/layers`` laid out as the
container will see it:

* **base**: the interpreter pyscone runs on (its executable, ``libpython`` and the
  standard library, at the path it has here: the measurement names files by what they
  are, not where they lie, but the interpreter finds its library from its own path),
  every shared library that it, its extension modules and the runtime's map (found with
  ``ldd``, and libseccomp, which the barrier opens by name), an ``ld.so.cache`` for them,
  and a minimal ``/etc``.  Nothing else: no shell, no package manager, no tests of the
  standard library, no ``__pycache__`` (the enclave keeps its own sealed bytecode cache);
* **runtime**: a virtual environment at ``/opt/pyscone`` holding pyscone and the
  packages its runtime loads, and the app's requirements (``pip install --target``, its
  wheels' files as they are, without bytecode or scripts);
* **app**: the app's own directory, protected into an *encrypted* FS-shield region at
  ``/app``, an empty encrypted region ``/data`` for what it writes, and the FSPF that
  lists them (``/srv/pyscone/app.fspf`` and its tag file).

The build measures the enclave the image will start (``pyscone measure`` with the
staged runtime: the same boot, stopped after the measurement) and writes
``OUT/manifest.json`` (MRENCLAVE, the FSPF's tag, the layers' digests) and
``OUT/policy.yaml``, a session policy skeleton for the CAS with the MRENCLAVE and the
FSPF key and tag filled in.  ``--oci`` adds ``OUT/oci`` (an OCI image layout) and
``OUT/image.tar`` (a docker-archive), written by ``image/oci.py``.

**Reproducible.**  The same inputs -- the app, the requirements (resolved to the same
wheels), the interpreter and libraries of this machine, the FSPF key -- give the same
bytes.  The FS shield draws keys, file ids and nonces at random; here they come from a
generator seeded with HKDF of the FSPF key and a digest of every path and plaintext it
protects, so a different app never reuses a key (and so never a key and a nonce).  The
FSPF key is an input: ``--fspf-key FILE`` (made on the first build if absent, mode
0600).  It is the owner's secret: it goes into the image only with ``--dev`` (a dev-mode
image that runs without a CAS, and says so); otherwise the CAS delivers it.

In a container the entry point is the launcher: with a CAS, ``PYSCONE_CAS`` is measured
into the image and ``PYSCONE_SESSION`` in the container's environment names the
session; the host passes no secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pyscone.image import oci

VENV = "/opt/pyscone"
APP = "/app"
DATA = "/data"
FSPF_PATH = "/srv/pyscone/app.fspf"
#: The distributions the enclave runtime and the launcher load.  Not the CAS's own, nor PyYAML (only
#: dev mode's ``--net-shield`` file is YAML on the host), nor pycparser (cffi needs it only to parse C).
RUNTIME_DISTS = ("greenlet", "cryptography", "cffi")
#: What those distributions ship that nothing runs (greenlet's own test suite, with test extensions).
RUNTIME_SKIP = ("greenlet/tests/",)
#: Parts of the standard library no app needs at run time (and the interpreter's build leftovers).
STDLIB_SKIP = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"})
_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


class BuildError(Exception):
    """A user mistake or a build that cannot proceed: one ``error: ...`` line."""


@dataclass
class Spec:
    app_dir: Path
    out: Path
    entry: str  # the program, relative to the app directory
    requirements: Path | None = None
    fspf_key_file: Path | None = None
    cas: str | None = None
    cas_cert: Path | None = None
    dev: bool = False
    oci: bool = False
    tag: str = "pyscone-app:latest"
    session: str = "app/app"  # the policy skeleton's NAME/SERVICE
    progress: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))


@dataclass
class Result:
    mrenclave: str
    fspf_tag: str
    layers: dict[str, str]  # layer name -> digest of its tar
    image_digest: str | None
    manifest: Path
    policy: Path


# -- deterministic randomness for the FS shield's build ----------------------------------------


class _Drbg:
    """HMAC-SHA256 in counter mode: a stream of bytes from a seed."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self.counter = 0

    def __call__(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            self.counter += 1
            out += hmac.digest(self.seed, self.counter.to_bytes(8, "big"), "sha256")
        return bytes(out[:n])


@contextlib.contextmanager
def _seeded(seed: bytes) -> Iterator[None]:
    from pyscone.protect import chunks

    saved = chunks.random_bytes
    chunks.random_bytes = _Drbg(seed)
    try:
        yield
    finally:
        chunks.random_bytes = saved


def _seed(fspf_key: bytes, contents: list[tuple[str, bytes]]) -> bytes:
    h = hashlib.sha256(b"pyscone image build v1\0")
    for path, data in contents:
        h.update(len(path).to_bytes(4, "big") + path.encode() + len(data).to_bytes(8, "big") + data)
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=h.digest(), info=b"pyscone image build randomness")
    return kdf.derive(fspf_key)


# -- copying trees -------------------------------------------------------------------------------


def _place(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _replicate(root: Path, src: str) -> None:
    """Copy the host file ``src`` into ``root`` at the same path, with every symbolic link on the
    way (``/lib`` -> ``usr/lib`` on a merged-/usr system, ``libfoo.so.1`` -> ``libfoo.so.1.2``)."""
    parts = Path(src).parts[1:]
    current = Path("/")
    for i, part in enumerate(parts):
        current = current / part
        dest = _place(root, str(current))
        if current.is_symlink():
            target = os.readlink(current)
            if not dest.is_symlink():
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, dest)
            resolved = (current.parent / target) if not target.startswith("/") else Path(target)
            rest = parts[i + 1 :]
            _replicate(root, os.path.normpath(str(resolved.joinpath(*rest))))
            return
    dest = _place(root, src)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def _copy_tree(src: Path, dest: Path, skip: Callable[[Path], bool] = lambda p: False) -> int:
    """Copy a tree (symlinks as links, no ``__pycache__``); returns the bytes copied."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if n != "__pycache__" and not skip(d / n))
        out = dest / d.relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in dirnames:
            if (d / name).is_symlink():
                os.symlink(os.readlink(d / name), out / name)
        dirnames[:] = [n for n in dirnames if not (d / n).is_symlink()]
        for name in sorted(filenames):
            path = d / name
            if skip(path) or name.endswith((".pyc", ".pyo")):
                continue
            if path.is_symlink():
                os.symlink(os.readlink(path), out / name)
            else:
                shutil.copy2(path, out / name)
                total += path.stat().st_size
    return total


def _elves(root: Path) -> list[Path]:
    """The ELF files in a tree (executables and shared objects)."""
    found = []
    for path in sorted(root.rglob("*")):
        if (
            path.is_file()
            and not path.is_symlink()
            and (path.suffix == ".so" or ".so." in path.name or os.access(path, os.X_OK))
        ):
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def _needed(elf: Path) -> set[str]:
    """The host paths of the shared libraries ``elf`` needs (and the dynamic linker)."""
    got = subprocess.run(["ldd", str(elf)], capture_output=True, text=True)
    if got.returncode != 0 and "not a dynamic executable" not in got.stdout + got.stderr:
        raise BuildError(f"ldd {elf}: {got.stderr.strip() or got.stdout.strip()}")
    if "not found" in got.stdout:
        missing = [line.split()[0] for line in got.stdout.splitlines() if "not found" in line]
        raise BuildError(f"{elf} needs {', '.join(missing)}, which this machine does not have")
    return {m.group(1) for line in got.stdout.splitlines() if (m := _LDD_LINE.search(line))}


def _libseccomp() -> str:
    import ctypes.util

    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/usr/lib"):
        candidate = Path(d) / "libseccomp.so.2"
        if candidate.exists():
            return str(candidate)
    name = ctypes.util.find_library("seccomp")
    raise BuildError(f"libseccomp.so.2 not found (find_library: {name}); install libseccomp2")


# -- the layers ------------------------------------------------------------------------------------


def _base_layer(base: Path, log: Callable[[str], None]) -> str:
    """The interpreter, its standard library and the shared libraries; returns the interpreter's path."""
    prefix = Path(sys.base_prefix)
    paths = sysconfig.get_paths(vars={"base": str(prefix), "platbase": str(prefix), "installed_base": str(prefix)})
    stdlib, platstdlib = Path(paths["stdlib"]), Path(paths["platstdlib"])
    exe = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if not exe.exists():
        exe = Path(os.path.realpath(sys.executable))
    _replicate(base, str(exe))
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and ldlib:
        for lib in sorted(Path(libdir).glob(ldlib + "*")):
            _replicate(base, str(lib))

    def skip(p: Path) -> bool:
        if p.parent == stdlib and p.name in STDLIB_SKIP:
            return True
        # (not one of lib-dynload: the enclave maps every extension there before lockdown, so all
        # of them are in MRENCLAVE, and the build measures with this machine's own copy)
        return p.parent == stdlib and p.name.startswith("config-")  # the static library, the makefiles

    size = _copy_tree(stdlib, _place(base, str(stdlib)), skip)
    if platstdlib != stdlib:
        size += _copy_tree(platstdlib, _place(base, str(platstdlib)), skip)
    (_place(base, str(stdlib)) / "site-packages").mkdir(exist_ok=True)
    log(f"pyscone build: [1/5] interpreter {exe} and its standard library ({size / 1e6:.1f} MB)")
    return str(exe)


def _libraries(base: Path, runtime: Path, log: Callable[[str], None], *, secure: bool = True) -> None:
    needed: set[str] = {_libseccomp()} if secure else set()
    for elf in _elves(base) + _elves(runtime):
        needed |= _needed(elf)
    if secure:
        needed |= _needed(Path(_libseccomp()))
    for lib in sorted(needed):
        _replicate(base, lib)
    etc = base / "etc"
    etc.mkdir(exist_ok=True)
    dirs = sorted({str(Path(lib).parent) for lib in needed})
    (etc / "ld.so.conf").write_text("".join(f"{d}\n" for d in dirs))
    got = subprocess.run(["ldconfig", "-r", str(base), "-C", "/etc/ld.so.cache", "-X"], capture_output=True, text=True)
    if got.returncode != 0:
        raise BuildError(f"ldconfig: {got.stderr.strip()}")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "passwd").write_text("root:x:0:0:root:/root:/nonexistent\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    for d, mode in (("tmp", 0o1777), ("root", 0o700), ("dev", 0o755), ("proc", 0o755), ("sys", 0o755)):
        (base / d).mkdir(exist_ok=True)
        (base / d).chmod(mode)
    log(f"pyscone build: [3/5] {len(needed)} shared libraries (ldd of every executable and extension)")


def _dist_files(name: str) -> tuple[Path, list[Path]]:
    """A distribution's site-packages directory and its files there (relative)."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"{name} is not installed in pyscone's environment") from None
    root = Path(str(dist.locate_file("")))
    rel = [Path(str(f)) for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)]
    return root, rel


def _runtime_layer(runtime: Path, exe: str, spec: Spec, log: Callable[[str], None]) -> None:
    import pyscone

    venv = _place(runtime, VENV)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    site = venv / "lib" / f"python{version}" / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    os.symlink(exe, venv / "bin" / "python")
    os.symlink("python", venv / "bin" / f"python{version}")
    os.symlink("python", venv / "bin" / "python3")
    (venv / "pyvenv.cfg").write_text(
        f"home = {Path(exe).parent}\ninclude-system-site-packages = false\nversion = {sys.version.split()[0]}\n"
    )
    _copy_tree(Path(pyscone.__file__).parent, site / "pyscone", lambda p: p.name.endswith((".c", ".h")))
    meta = site / f"pyscone-{pyscone_version()}.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: pyscone\nVersion: {pyscone_version()}\n")
    pins = []
    for name in RUNTIME_DISTS:
        root, rel = _dist_files(name)
        for f in rel:
            if f.as_posix().startswith(RUNTIME_SKIP):
                continue
            dest = site / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / f, dest)
        pins.append(f"{name}=={importlib.metadata.version(name)}")
    added = 0
    if spec.requirements is not None:
        added = _requirements(site, spec.requirements, pins)
    log(f"pyscone build: [2/5] runtime at {VENV}: pyscone and {', '.join(RUNTIME_DISTS)}; {added} app packages")


def pyscone_version() -> str:
    try:
        return importlib.metadata.version("pyscone")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(site: Path, requirements: Path, pins: list[str]) -> int:
    """``pip install`` the app's requirements into ``site`` (the runtime's versions held)."""
    with tempfile.TemporaryDirectory(prefix="pyscone-build-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(p + "\n" for p in pins))
        target = Path(tmp) / "target"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check"]
        cmd += ["--no-warn-script-location", "--target", str(target), "-c", str(constraints), "-r", str(requirements)]
        got = subprocess.run(cmd, capture_output=True, text=True)
        if got.returncode != 0:
            lines = [line for line in (got.stderr or got.stdout).splitlines() if line.strip()]
            raise BuildError(f"pip install -r {requirements}: {lines[-1] if lines else 'failed'}")
        have = {_normalize(d.name.split("-")[0]) for d in site.glob("*.dist-info")}
        skip: set[str] = set()
        count = 0
        for info in sorted(target.glob("*.dist-info")):
            name = _normalize(info.name.rsplit("-", 1)[0])
            if name in have:  # one of the runtime's own, at its version: already here
                record = (info / "RECORD").read_text().splitlines()
                skip |= {line.split(",")[0].split("/")[0] for line in record if line}
            else:
                count += 1
        for entry in sorted(target.iterdir()):
            if entry.name in skip or entry.name == "bin":  # (scripts name the build machine's python)
                continue
            dest = site / entry.name
            if entry.is_dir() and not entry.is_symlink():
                _copy_tree(entry, dest)
            else:
                shutil.copy2(entry, dest)
        return count


def _image_files(base: Path, runtime: Path, log: Callable[[str], None]) -> None:
    """``/opt/pyscone/pyscone-files.json``: every file of the standard library and of the runtime's
    site-packages with its SHA-256.  The enclave measures this list (so MRENCLAVE covers each file)
    and imports nothing below those directories that is not byte for byte on it (enclave/importer.py)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
    roots = [(base, paths["stdlib"]), (runtime, f"{VENV}/lib/python{version}/site-packages")]
    files: dict[str, str] = {}
    for layer, root in roots:
        staged = _place(layer, root)
        for path in sorted(staged.rglob("*")):
            if path.is_file() and not path.is_symlink():
                files["/" + str(path.relative_to(layer))] = hashlib.sha256(path.read_bytes()).hexdigest()
    doc = {"roots": [root for _, root in roots], "files": files}
    (_place(runtime, VENV) / "pyscone-files.json").write_text(json.dumps(doc, sort_keys=True, indent=0) + "\n")
    log(f"pyscone build:       {len(files)} files of the standard library and the runtime listed, measured as one")


def _app_layer(app: Path, spec: Spec, fspf_key: bytes, log: Callable[[str], None]) -> tuple[str, bytes]:
    """Protect the app into the encrypted region; returns the FSPF's tag and its sealed bytes."""
    from pyscone.host.fspf_tool import FileStore
    from pyscone.protect.chunks import FileKey
    from pyscone.protect.fspf import FSPF, FileEntry, seal
    from pyscone.protect.pfile import ProtectedFile

    contents: list[tuple[str, bytes]] = []
    for dirpath, dirnames, filenames in os.walk(spec.app_dir):
        dirnames[:] = sorted(n for n in dirnames if n not in ("__pycache__", ".git", ".venv"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file() or name.endswith((".pyc", ".pyo")):
                continue
            logical = f"{APP}/{path.relative_to(spec.app_dir).as_posix()}"
            contents.append((logical, path.read_bytes()))
    if not any(logical == f"{APP}/{spec.entry}" for logical, _ in contents):
        raise BuildError(f"{spec.app_dir}: no program {spec.entry} in the app directory (--entry)")
    table = FSPF()
    table.add_region(APP, "encrypted", 4096)
    table.add_region(DATA, "encrypted", 4096)
    total = 0
    with _seeded(_seed(fspf_key, contents)):
        for logical, data in contents:
            dest = _place(app, logical)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fk = FileKey.generate(encrypted=True, chunk_size=4096)
            with dest.open("wb+") as f:
                pf = ProtectedFile(FileEntry(fk), FileStore(f))
                pf.write(0, data)
                table.files[logical] = pf.commit()
            dest.chmod(0o644)
            total += len(data)
        table.generation = 1
        blob, tag = seal(table, fspf_key)
    _place(app, DATA).mkdir(parents=True)
    fspf = _place(app, FSPF_PATH)
    fspf.parent.mkdir(parents=True)
    fspf.write_bytes(blob)
    Path(str(fspf) + ".tag").write_text(tag + "\n")
    if spec.dev:
        key_file = Path(str(fspf) + ".key")
        key_file.write_text(fspf_key.hex() + "\n")
        key_file.chmod(0o600)
    log(
        f"pyscone build: [4/5] {len(contents)} app files ({total / 1e3:.1f} kB) encrypted into {APP}; "
        f"FSPF tag {tag[:16]}…"
    )
    return tag, blob


def _fspf_key(spec: Spec) -> bytes:
    path = spec.fspf_key_file or spec.out / "fspf.key"
    if path.exists():
        from pyscone.host.fspf_tool import ToolError, read_key

        try:
            return read_key(str(path))
        except ToolError as e:
            raise BuildError(str(e)) from None
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    spec.progress(f"pyscone build: made a new FSPF key in {path} (keep it: the same key rebuilds the same image)")
    return key


def _identity_args(spec: Spec, cert_in_image: str | None) -> list[str]:
    if spec.cas is None:
        return []
    assert cert_in_image is not None
    return ["--cas", spec.cas, "--cas-cert", cert_in_image]


def _measure(runtime: Path, spec: Spec) -> tuple[str, list[str]]:
    """The image enclave's MRENCLAVE, and the host files it mapped (``pyscone tcb`` with the staged
    runtime: the same boot, stopped after the measurement)."""
    python = _place(runtime, VENV) / "bin" / "python"
    cert = str(spec.cas_cert) if spec.cas_cert else None
    cmd = [str(python), "-B", "-m", "pyscone.cli", "tcb", *_identity_args(spec, cert)]  # (-B: no __pycache__ in it)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    got = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONDONTWRITEBYTECODE": "1"})
    for cache in sorted(runtime.rglob("__pycache__"), reverse=True):  # (whatever a host process wrote)
        shutil.rmtree(cache)
    lines = got.stdout.splitlines()
    if got.returncode != 0 or not lines or not re.fullmatch(r"MRENCLAVE [0-9a-f]{64}", lines[0]):
        tail = (got.stderr.strip().splitlines() or [got.stdout.strip()])[-1]
        raise BuildError(f"measuring the image's enclave failed: {tail}")
    mapped = [line.split()[-1] for line in lines if line.startswith(("mapped:", "interpreter "))]
    return lines[0].split()[1], mapped


def _entrypoint(spec: Spec) -> tuple[list[str], dict[str, str]]:
    run = [f"{VENV}/bin/python", "-m", "pyscone.cli", "run"]
    env = {"HOME": "/root", "PATH": f"{VENV}/bin"}
    if spec.cas is not None:
        env["PYSCONE_CAS"] = spec.cas
        env["PYSCONE_CAS_CERT"] = "/srv/pyscone/cas-cert.pem"
        return run, env
    if not spec.dev:
        raise BuildError("an image without a CAS must be built with --dev (its FSPF key is then in the image)")
    return [*run, "--fspf", FSPF_PATH, "--fspf-key-file", FSPF_PATH + ".key", f"{APP}/{spec.entry}"], env


def build(spec: Spec) -> Result:
    """Build the image that ``spec`` describes (see the module doc)."""
    log = spec.progress
    if not spec.app_dir.is_dir():
        raise BuildError(f"{spec.app_dir}: not a directory")
    if spec.requirements is not None and not spec.requirements.is_file():
        raise BuildError(f"{spec.requirements}: no such file")
    if (spec.cas is None) != (spec.cas_cert is None):
        raise BuildError("--cas and --cas-cert go together")
    if spec.cas_cert is not None and not spec.cas_cert.is_file():
        raise BuildError(f"--cas-cert {spec.cas_cert}: no such file")
    if not (spec.app_dir / spec.entry).is_file():
        raise BuildError(f"{spec.app_dir}: no program {spec.entry} in the app directory (--entry)")
    if spec.cas is None and not spec.dev:
        raise BuildError("an image without a CAS must be built with --dev (its FSPF key is then in the image)")
    spec.out.mkdir(parents=True, exist_ok=True)
    fspf_key = _fspf_key(spec)
    layers_dir = spec.out / "layers"
    if layers_dir.exists():
        shutil.rmtree(layers_dir)
    base, runtime, app = (layers_dir / n for n in ("base", "runtime", "app"))
    for d in (base, runtime, app):
        d.mkdir(parents=True)
    exe = _base_layer(base, log)
    _runtime_layer(runtime, exe, spec, log)
    _libraries(base, runtime, log)
    _image_files(base, runtime, log)
    tag, _ = _app_layer(app, spec, fspf_key, log)
    if spec.cas_cert is not None:
        shutil.copy(spec.cas_cert, _place(app, "/srv/pyscone/cas-cert.pem"))
    entry, env = _entrypoint(spec)
    mrenclave, mapped = _measure(runtime, spec)
    extra = [p for p in mapped if p.startswith("/") and not Path(p).resolve().is_relative_to(layers_dir.resolve())]
    for path in sorted(extra):  # what the enclave maps beyond the libraries: the C.UTF-8 locale, gconv
        _replicate(base, path)
    log(f"pyscone build: [5/5] MRENCLAVE {mrenclave}")
    digests = {name: oci.layer_digest(tree) for name, tree in (("base", base), ("runtime", runtime), ("app", app))}
    image_digest = None
    if spec.oci:
        cfg = oci.ImageConfig(entrypoint=entry, env=env, workdir=APP, labels={"org.pyscone.mrenclave": mrenclave})
        image_digest = oci.write_image(
            spec.out / "oci", [base, runtime, app], cfg, spec.tag.rpartition(":")[2] or "latest"
        )
        oci.write_docker_archive(spec.out / "oci", spec.out / "image.tar", spec.tag)
        log(f"pyscone build: OCI image {image_digest} in {spec.out / 'oci'} and {spec.out / 'image.tar'}")
    manifest: dict[str, Any] = {
        "mrenclave": mrenclave,
        "entrypoint": entry,
        "env": env,
        "program": f"{APP}/{spec.entry}",
        "fspf": {"path": FSPF_PATH, "tag": tag, "regions": {APP: "encrypted", DATA: "encrypted"}},
        "cas": spec.cas,
        "layers": digests,
        "image": image_digest,
        "dev": spec.dev,
    }
    (spec.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    name, _, service = spec.session.partition("/")
    policy = (
        f"# A session for the image {spec.tag} (pyscone build): review it, then `pyscone cas session create`.\n"
        f"name: {name}\nservices:\n  {service or 'app'}:\n    mrenclaves: [{mrenclave}]\n"
        f"    cwd: {APP}\n    argv: [{APP}/{spec.entry}]\n"
        f"    fspf: {{path: {FSPF_PATH}, key: {fspf_key.hex()}, tag: {tag}}}\n"
    )
    policy_path = spec.out / "policy.yaml"
    fd = os.open(policy_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the FSPF key
    with os.fdopen(fd, "w") as f:
        f.write(policy)
    return Result(mrenclave, tag, digests, image_digest, spec.out / "manifest.json", policy_path)


def plain_image(app_dir: Path, entry: str, requirements: Path | None, out: Path, tag: str = "plain-app:latest") -> str:
    """The same app as an ordinary image, built the same way (the interpreter, its libraries, the
    app's requirements in the interpreter's site-packages, the app's files in the clear): what
    ``bench/image.py`` compares a secure image with.  Returns its digest; writes ``out/oci`` and
    ``out/image.tar``."""
    layers_dir = out / "layers"
    if layers_dir.exists():
        shutil.rmtree(layers_dir)
    base, packages, app = (layers_dir / n for n in ("base", "packages", "app"))
    for d in (base, packages, app):
        d.mkdir(parents=True)
    quiet: Callable[[str], None] = lambda line: None  # noqa: E731
    exe = _base_layer(base, quiet)
    site = _place(packages, sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])
    site.mkdir(parents=True)
    if requirements is not None:
        _requirements(site, requirements, [])
    _libraries(base, packages, quiet, secure=False)
    _copy_tree(app_dir, _place(app, APP), lambda p: p.name in (".git", ".venv"))
    cfg = oci.ImageConfig(entrypoint=[exe, f"{APP}/{entry}"], env={"HOME": "/root"}, workdir=APP)
    digest = oci.write_image(out / "oci", [base, packages, app], cfg, tag.rpartition(":")[2] or "latest")
    oci.write_docker_archive(out / "oci", out / "image.tar", tag)
    return digest
