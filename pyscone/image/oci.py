"""Reproducible OCI images: an image layout and a ``docker-archive`` tar from directory trees.

Theory of operation
-------------------
A secure image must be *reproducible*: whoever rebuilds it from the same inputs gets
the same bytes, so the digest a policy or a deployment names can be checked by anyone.
Everything here is therefore a function of the trees' contents alone:

* each layer is an uncompressed tar of one directory tree, its entries in sorted
  order (parents first), with the owner root:root (0/0, no names), the permission
  bits of the file, and one fixed time (``epoch``, the ``SOURCE_DATE_EPOCH`` of
  reproducible-builds.org, 0 by default); regular files, directories and symbolic
  links only (a hard link is stored as a file of its own; a device, a fifo or a
  socket in a tree is refused);
* the config and the manifests are canonical JSON (sorted keys, no spaces), with no
  creation time;
* the docker-archive is a tar of those same blobs, written the same way.

The layout is the one ``skopeo``, ``umoci``, ``podman`` and containerd read
(``oci-layout``, ``index.json``, ``blobs/sha256/...``); the archive is the one
``docker load`` and ``podman load`` read (``manifest.json`` naming the config and
the layer tars).  Layers are not compressed: compression would add a dependency on
the compressor's version for reproducibility, and the tar is what is measured.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
_BLOCK = 1 << 20


class ImageError(Exception):
    """A tree that cannot become a layer, or a layout that cannot be read: one line for the user."""


@dataclass(frozen=True)
class ImageConfig:
    """What the container runs: the parts of an OCI image config a runtime reads."""

    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    labels: dict[str, str] = field(default_factory=dict)
    user: str = ""


@dataclass(frozen=True)
class Blob:
    digest: str  # "sha256:<hex>"
    size: int
    media_type: str

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _entries(root: Path, prefix: str = "") -> Iterator[tuple[str, Path]]:
    """(name in the tar, path) of every entry below ``root``, depth first in sorted order (so a
    directory comes right before what it holds)."""
    try:
        names = sorted(os.listdir(root))
    except OSError as e:
        raise ImageError(f"{root}: {e.strerror}") from None
    for name in names:
        path = root / name
        arc = f"{prefix}{name}"
        yield arc, path
        if path.is_dir() and not path.is_symlink():
            yield from _entries(path, f"{arc}/")


def _info(arc: str, path: Path, epoch: int) -> tarfile.TarInfo:
    st = path.lstat()
    info = tarfile.TarInfo(arc)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = epoch
    if stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISREG(st.st_mode):
        info.type = tarfile.REGTYPE
        info.size = st.st_size
    else:
        raise ImageError(f"{path}: not a file, a directory or a symbolic link (a device, fifo or socket)")
    return info


def write_layer(root: Path, out: BinaryIO, epoch: int = 0) -> None:
    """A reproducible tar of the tree at ``root`` (see the module doc)."""
    if not root.is_dir():
        raise ImageError(f"{root}: not a directory")
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for arc, path in _entries(root):
            info = _info(arc, path, epoch)
            if info.type == tarfile.REGTYPE:
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


class _Hashing:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def tell(self) -> int:  # tarfile asks where it is
        return self.size


def layer_digest(root: Path, epoch: int = 0) -> str:
    """The digest the layer of the tree at ``root`` has (nothing is written)."""

    class _Null:
        def write(self, data: bytes) -> int:
            return len(data)

    h = _Hashing(_Null())  # type: ignore[arg-type]
    write_layer(root, h, epoch)  # type: ignore[arg-type]
    return f"sha256:{h.sha.hexdigest()}"


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = path / "blobs" / "sha256"

    def _store(self, write: Any, media_type: str) -> Blob:
        self.blobs.mkdir(parents=True, exist_ok=True)
        tmp = self.blobs / f".incoming-{os.getpid()}"
        with tmp.open("wb") as f:
            h = _Hashing(f)
            write(h)
        digest = h.sha.hexdigest()
        os.replace(tmp, self.blobs / digest)
        return Blob(f"sha256:{digest}", h.size, media_type)

    def add_bytes(self, data: bytes, media_type: str) -> Blob:
        return self._store(lambda f: f.write(data), media_type)

    def add_layer(self, root: Path, epoch: int = 0) -> Blob:
        return self._store(lambda f: write_layer(root, f, epoch), MEDIA_LAYER)

    def blob_path(self, blob: Blob | str) -> Path:
        digest = blob.digest if isinstance(blob, Blob) else blob
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64:
            raise ImageError(f"{digest}: not a sha256 digest")
        return self.blobs / hexd


def image_config(cfg: ImageConfig, layers: Sequence[Blob]) -> dict[str, Any]:
    """The OCI image config document (its ``diff_ids`` are the layers' digests: they are not compressed)."""
    run: dict[str, Any] = {"Entrypoint": cfg.entrypoint, "WorkingDir": cfg.workdir}
    if cfg.cmd:
        run["Cmd"] = cfg.cmd
    if cfg.env:
        run["Env"] = [f"{k}={v}" for k, v in sorted(cfg.env.items())]
    if cfg.labels:
        run["Labels"] = dict(sorted(cfg.labels.items()))
    if cfg.user:
        run["User"] = cfg.user
    doc: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [b.digest for b in layers]},
    }
    return doc


def write_image(path: Path, trees: Sequence[Path], cfg: ImageConfig, ref: str, epoch: int = 0) -> str:
    """Write an OCI image layout at ``path`` (made, or emptied of a former image) with one layer per
    tree, tagged ``ref``; returns the manifest's digest (the image's identity)."""
    if not trees:
        raise ImageError("an image needs at least one layer")
    path.mkdir(parents=True, exist_ok=True)
    layout = Layout(path)
    for old in (path / "index.json", path / "oci-layout"):
        old.unlink(missing_ok=True)
    if layout.blobs.exists():
        for blob in layout.blobs.iterdir():
            blob.unlink()
    layers = [layout.add_layer(t, epoch) for t in trees]
    config = layout.add_bytes(canonical_json(image_config(cfg, layers)), MEDIA_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.descriptor(),
        "layers": [b.descriptor() for b in layers],
    }
    man = layout.add_bytes(canonical_json(manifest), MEDIA_MANIFEST)
    entry = man.descriptor(annotations={REF_ANNOTATION: ref})
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [entry]}
    (path / "index.json").write_bytes(canonical_json(index))
    (path / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    return man.digest


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ImageError(f"{path}: not readable as an OCI document ({e})") from None


def read_manifest(path: Path) -> tuple[dict[str, Any], str]:
    """The layout's one manifest and its ref name."""
    index = _read_json(path / "index.json")
    try:
        (entry,) = index["manifests"]
        ref = entry.get("annotations", {}).get(REF_ANNOTATION, "")
        manifest = _read_json(Layout(path).blob_path(entry["digest"]))
    except (KeyError, TypeError, ValueError):
        raise ImageError(f"{path}: not a layout of exactly one image") from None
    return manifest, str(ref)


def write_docker_archive(layout_path: Path, out_path: Path, repo_tag: str, epoch: int = 0) -> None:
    """The image of an OCI layout as a ``docker-archive`` tar (``docker load``, ``podman load``)."""
    layout = Layout(layout_path)
    manifest, _ = read_manifest(layout_path)
    config_hex = manifest["config"]["digest"].partition(":")[2]
    members: list[tuple[str, Path | bytes]] = [(f"{config_hex}.json", layout.blob_path(manifest["config"]["digest"]))]
    names = []
    for layer in manifest["layers"]:
        hexd = layer["digest"].partition(":")[2]
        names.append(f"{hexd}/layer.tar")
        members.append((names[-1], layout.blob_path(layer["digest"])))
    index = [{"Config": f"{config_hex}.json", "RepoTags": [repo_tag], "Layers": names}]
    members.append(("manifest.json", canonical_json(index)))
    repo, _, tag = repo_tag.rpartition(":")
    if repo and "/" not in tag:
        last = names[-1].partition("/")[0]
        members.append(("repositories", canonical_json({repo: {tag: last}})))
    tmp = out_path.with_name(out_path.name + ".incoming")
    with tmp.open("wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        made: set[str] = set()
        for name, src in sorted(members, key=lambda m: m[0]):
            parent = name.rpartition("/")[0]
            if parent and parent not in made:
                made.add(parent)
                d = tarfile.TarInfo(parent)
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, epoch
                tar.addfile(d)
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = 0o644, epoch
            if isinstance(src, bytes):
                info.size = len(src)
                tar.addfile(info, io.BytesIO(src))
            else:
                info.size = src.stat().st_size
                with src.open("rb") as blob:
                    tar.addfile(info, blob)
    os.replace(tmp, out_path)
