"""Reproducible OCI images (pyscone/image/oci.py): the same trees give the same bytes, and real
container tools read what is written (skopeo inspects both formats, umoci unpacks the layout into a
bundle, runc runs it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyscone.image import oci

CFG = oci.ImageConfig(entrypoint=["/bin/sh", "-c"], cmd=["echo hello from the image"], env={"A": "1"})


def _tree(root: Path, files: dict[str, tuple[bytes, int]], links: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, mode) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    for name, target in (links or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / name)
    return root


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


NAMES = st.text(alphabet="abcdefghij_.-", min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))
TREES = st.dictionaries(
    st.lists(NAMES, min_size=1, max_size=3).map("/".join),
    st.tuples(st.binary(max_size=300), st.sampled_from([0o644, 0o755, 0o600, 0o700])),
    min_size=1,
    max_size=12,
)


def _plausible(files: dict[str, tuple[bytes, int]]) -> bool:
    """No name is both a file and a directory."""
    dirs = {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}
    return not dirs & set(files)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=TREES.filter(_plausible), data=st.data())
def test_the_same_tree_gives_the_same_image_whatever_its_times_owners_or_order(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, tuple[bytes, int]], data: st.DataObject
) -> None:
    base = tmp_path_factory.mktemp("img")
    a = _tree(base / "a", files)
    order = data.draw(st.permutations(sorted(files)))
    b = _tree(base / "b", {name: files[name] for name in order})  # made in another order
    for path in b.rglob("*"):
        os.utime(path, (data.draw(st.integers(0, 2**31)),) * 2)
        os.chown(path, data.draw(st.integers(0, 60000)), data.draw(st.integers(0, 60000)))
    da = oci.write_image(base / "la", [a], CFG, "t:1")
    db = oci.write_image(base / "lb", [b], CFG, "t:1")
    assert da == db
    oci.write_docker_archive(base / "la", base / "a.tar", "t:1")
    oci.write_docker_archive(base / "lb", base / "b.tar", "t:1")
    assert _digest(base / "a.tar") == _digest(base / "b.tar")
    # What the layer holds is the tree: every file's bytes and permission bits, owned by root.
    manifest, ref = oci.read_manifest(base / "la")
    assert ref == "t:1"
    with tarfile.open(oci.Layout(base / "la").blob_path(manifest["layers"][0]["digest"])) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name, (content, mode) in files.items():
            m = members[name]
            assert (m.mode, m.uid, m.gid, m.mtime, m.uname) == (mode, 0, 0, 0, "")
            f = tar.extractfile(m)
            assert f is not None and f.read() == content
        assert list(members) == sorted(members, key=lambda n: n.split("/"))  # parents first, sorted


def test_a_change_to_one_byte_or_mode_changes_the_digest(tmp_path: Path) -> None:
    files = {"bin/x": (b"abc", 0o755), "etc/y": (b"y", 0o644)}
    first = oci.write_image(tmp_path / "l1", [_tree(tmp_path / "t1", files)], CFG, "t:1")
    other = oci.write_image(tmp_path / "l2", [_tree(tmp_path / "t2", {**files, "etc/y": (b"z", 0o644)})], CFG, "t:1")
    mode = oci.write_image(tmp_path / "l3", [_tree(tmp_path / "t3", {**files, "etc/y": (b"y", 0o600)})], CFG, "t:1")
    cfg = oci.write_image(tmp_path / "l4", [tmp_path / "t1"], oci.ImageConfig(entrypoint=["/bin/true"]), "t:1")
    assert len({first, other, mode, cfg}) == 4


def test_what_cannot_be_a_layer_is_one_clear_error(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "t", {"a": (b"a", 0o644)})
    os.mkfifo(tree / "fifo")
    with pytest.raises(oci.ImageError, match="not a file, a directory or a symbolic link"):
        oci.write_image(tmp_path / "l", [tree], CFG, "t:1")
    with pytest.raises(oci.ImageError, match="not a directory"):
        oci.write_image(tmp_path / "l", [tmp_path / "missing"], CFG, "t:1")
    with pytest.raises(oci.ImageError, match="not readable as an OCI document"):
        oci.read_manifest(tmp_path / "nowhere")


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/setup.sh installs it")
    return path


def _shell_rootfs(root: Path) -> Path:
    """A tiny root file system: the host's /bin/sh and the shared libraries it needs."""
    sh = Path("/bin/sh").resolve()
    libs = subprocess.run(["ldd", str(sh)], capture_output=True, text=True, check=True).stdout.split()
    (root / "bin").mkdir(parents=True)
    shutil.copy(sh, root / "bin" / "sh")
    for lib in {w for w in libs if w.startswith("/")}:
        dest = root / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(lib).resolve(), dest)
    (root / "tmp").mkdir()
    os.symlink("sh", root / "bin" / "also-sh")
    return root


@pytest.mark.skipif(os.geteuid() != 0, reason="runc runs containers as root")
def test_container_tools_read_the_layout_and_the_archive_and_runc_runs_it(tmp_path: Path) -> None:
    base = _shell_rootfs(tmp_path / "base")
    top = _tree(tmp_path / "top", {"etc/greeting": (b"hello from a second layer\n", 0o644)})
    cfg = oci.ImageConfig(
        entrypoint=["/bin/also-sh", "-c"], cmd=["read line < /etc/greeting; echo $line; echo A=$A"], env={"A": "1"}
    )
    digest = oci.write_image(tmp_path / "layout", [base, top], cfg, "latest")
    oci.write_docker_archive(tmp_path / "layout", tmp_path / "image.tar", "localhost/pyscone-test:latest")

    skopeo = _tool("skopeo")
    seen = json.loads(
        subprocess.run(
            [skopeo, "inspect", f"oci:{tmp_path / 'layout'}:latest"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert seen["Digest"] == digest and len(seen["Layers"]) == 2
    archived = json.loads(
        subprocess.run(
            [skopeo, "inspect", f"docker-archive:{tmp_path / 'image.tar'}"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert archived["Layers"] == seen["Layers"] and "A=1" in archived["Env"]

    umoci, runc = _tool("umoci"), _tool("runc")
    bundle = tmp_path / "bundle"
    subprocess.run(
        [umoci, "unpack", "--image", f"{tmp_path / 'layout'}:latest", str(bundle)], check=True, capture_output=True
    )
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    (bundle / "config.json").write_text(json.dumps(spec))
    name = f"pyscone-test-{os.getpid()}"
    got = subprocess.run([runc, "run", "--bundle", str(bundle), name], capture_output=True, text=True, timeout=60)
    subprocess.run([runc, "delete", "--force", name], capture_output=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout.splitlines() == ["hello from a second layer", "A=1"]
