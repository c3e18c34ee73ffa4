"""``pyscone build``: secure images of ordinary apps that runc runs unchanged (pyscone/image/build.py).

Each image is built by the CLI as a user would, unpacked with umoci into an OCI bundle and run with
runc as root on this machine (the container shares the host's network namespace, so a real client on
loopback reaches the app, and the app reaches a real CAS and LAS)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port
from test_cas import World

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runc runs containers as root")
PYSCONE = [sys.executable, "-m", "pyscone.cli"]
MARKER = "image-note-7d1f"

FLASK_APP = """\
import os, sys
from flask import Flask, request

app = Flask(__name__)

@app.post("/note")
def note():
    with open("/data/notes.txt", "a") as f:
        f.write(request.get_data(as_text=True) + "\\n")
    return "stored"

@app.get("/notes")
def notes():
    with open("/data/notes.txt") as f:
        return f.read()

@app.get("/whoami")
def whoami():
    return f"secret of {len(os.environ.get('API_TOKEN', ''))} chars, args {sys.argv[1:]}"

if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(sys.argv[1]))
"""


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/setup.sh installs it")
    return path


def build(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYSCONE, "build", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def _app(root: Path, source: str = FLASK_APP) -> Path:
    app = root / "app"
    app.mkdir(parents=True)
    (app / "app.py").write_text(source)
    (app / "templates").mkdir()
    (app / "templates" / "page.html").write_text(f"<p>{MARKER} template</p>\n")
    (root / "requirements.txt").write_text("flask>=3.0\n")
    return app


def bundle(out: Path, where: Path, args: list[str], env: dict[str, str] | None = None) -> Path:
    """The image as an OCI bundle (umoci), sharing the host's network, with these args."""
    subprocess.run(
        [_tool("umoci"), "unpack", "--image", f"{out / 'oci'}:latest", str(where)], check=True, capture_output=True
    )
    spec = json.loads((where / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = args
    spec["process"]["env"] += [f"{k}={v}" for k, v in (env or {}).items()]
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
    (where / "config.json").write_text(json.dumps(spec))
    return where


def add_volume(where: Path, host: Path, target: str) -> None:
    spec = json.loads((where / "config.json").read_text())
    spec["mounts"].append({"destination": target, "type": "bind", "source": str(host), "options": ["rbind", "rw"]})
    (where / "config.json").write_text(json.dumps(spec))


class Container:
    def __init__(self, where: Path) -> None:
        self.name = f"pyscone-{os.getpid()}-{where.name}"
        self.proc = subprocess.Popen(
            [_tool("runc"), "run", "--bundle", str(where), self.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> tuple[str, str]:
        subprocess.run([_tool("runc"), "kill", self.name, "KILL"], capture_output=True)
        try:
            out, err = self.proc.communicate(timeout=30)
        finally:
            subprocess.run([_tool("runc"), "delete", "--force", self.name], capture_output=True)
        return out, err


def _get(url: str, data: bytes | None = None) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
        return r.read().decode()


def _serving(port: int, c: Container, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.proc.poll() is not None:
            _, err = c.stop()
            pytest.fail(f"the container exited {c.proc.returncode}: {err[-3000:]}")
        try:
            _get(f"http://127.0.0.1:{port}/whoami")
            return
        except OSError:
            time.sleep(0.2)
    _, err = c.stop()
    pytest.fail(f"the app did not serve within {timeout} s: {err[-3000:]}")


@pytest.fixture(scope="module")
def dev_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("dev-image")
    _app(root)
    r = build("app", "-o", "out", "--requirements", "requirements.txt", "--dev", "--oci", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "[5/5] MRENCLAVE" in r.stderr  # the build shows its progress
    yield root / "out"


def test_a_dev_image_serves_a_flask_app_under_runc_and_keeps_its_code_and_data_encrypted(
    dev_image: Path, tmp_path: Path
) -> None:
    port = free_port()
    volume = tmp_path / "volume"
    volume.mkdir()
    manifest = json.loads((dev_image / "manifest.json").read_text())
    where = bundle(dev_image, tmp_path / "bundle", [*manifest["entrypoint"], str(port)])
    add_volume(where, volume, "/data")
    c = Container(where)
    try:
        _serving(port, c)
        assert _get(f"http://127.0.0.1:{port}/note", MARKER.encode()) == "stored"
        assert _get(f"http://127.0.0.1:{port}/notes") == MARKER + "\n"
    finally:
        _, err = c.stop()
    stored = b"".join(p.read_bytes() for p in volume.rglob("*") if p.is_file())
    assert stored and MARKER.encode() not in stored  # the volume holds ciphertext only
    code = (where / "rootfs" / "app" / "app.py").read_bytes()
    assert b"Flask" not in code and b"import" not in code  # so does the image's copy of the app
    assert MARKER.encode() not in (where / "rootfs" / "app" / "templates" / "page.html").read_bytes()
    assert "dev mode" in err


def test_the_enclave_in_the_image_measures_as_the_manifest_says(dev_image: Path, tmp_path: Path) -> None:
    where = bundle(dev_image, tmp_path / "bundle", ["/opt/pyscone/bin/python", "-m", "pyscone.cli", "measure"])
    got = subprocess.run(
        [_tool("runc"), "run", "--bundle", str(where), f"pyscone-m-{os.getpid()}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    subprocess.run([_tool("runc"), "delete", "--force", f"pyscone-m-{os.getpid()}"], capture_output=True)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == json.loads((dev_image / "manifest.json").read_text())["mrenclave"]


def test_the_same_inputs_give_the_same_image_bit_for_bit(tmp_path: Path) -> None:
    _app(tmp_path, "print('small')\n")
    first = build("app", "-o", "one", "--dev", "--oci", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = build("app", "-o", "two", "--dev", "--oci", "--fspf-key", "one/fspf.key", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    images = [json.loads((tmp_path / o / "manifest.json").read_text()) for o in ("one", "two")]
    assert images[0]["image"] == images[1]["image"] and images[0]["image"].startswith("sha256:")
    assert (tmp_path / "one" / "image.tar").read_bytes() == (tmp_path / "two" / "image.tar").read_bytes()
    (tmp_path / "app" / "app.py").write_text("print('small!')\n")
    changed = build("app", "-o", "three", "--dev", "--oci", "--fspf-key", "one/fspf.key", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    third = json.loads((tmp_path / "three" / "manifest.json").read_text())
    assert third["image"] != images[0]["image"]
    assert third["layers"]["base"] == images[0]["layers"]["base"]  # only the app's layer moved
    assert third["layers"]["runtime"] == images[0]["layers"]["runtime"]
    assert third["layers"]["app"] != images[0]["layers"]["app"]
    assert third["mrenclave"] == images[0]["mrenclave"]  # the app is protected by the FSPF, not measured


def test_an_attested_image_gets_its_secrets_from_the_cas_and_the_host_passes_none(tmp_path: Path) -> None:
    world = World(tmp_path / "world")
    try:
        _app(tmp_path)
        r = build(
            "app",
            "-o",
            "out",
            "--requirements",
            "requirements.txt",
            "--oci",
            "--cas",
            world.url,
            "--cas-cert",
            world.cert,
            "--session",
            "shop/api",
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        port = free_port()
        policy = (tmp_path / "out" / "policy.yaml").read_text()
        policy = policy.replace("    argv: [/app/app.py]\n", f"    argv: [/app/app.py, '{port}']\n")
        policy += "    env: {API_TOKEN: '${secret:token}'}\nsecrets:\n  token: {kind: random, bytes: 16}\n"
        (tmp_path / "policy.yaml").write_text(policy)
        created = world.owner("session", "create", str(tmp_path / "policy.yaml"))
        assert created.returncode == 0, created.stderr
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert (
            "--fspf-key-file" not in manifest["entrypoint"]
            and not (tmp_path / "out/layers/app/srv/pyscone/app.fspf.key").exists()
        )
        env = {"PYSCONE_SESSION": "shop/api", "PYSCONE_LAS": f"127.0.0.1:{world.las.port}"}
        where = bundle(tmp_path / "out", tmp_path / "bundle", manifest["entrypoint"], env)
        c = Container(where)
        try:
            _serving(port, c)
            assert _get(f"http://127.0.0.1:{port}/whoami") == f"secret of 32 chars, args ['{port}']"
            assert _get(f"http://127.0.0.1:{port}/note", MARKER.encode()) == "stored"
        finally:
            c.stop()
        audit = world.owner("audit", "shop")
        assert " attest  ok" in audit.stdout, audit.stdout
        spec = (where / "config.json").read_text()
        assert "API_TOKEN" not in spec  # the container's configuration names the session, no secret
    finally:
        world.stop()


def test_build_mistakes_are_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cases = [
        (("missing", "-o", "o1", "--dev"), "error: missing: no app.py or main.py: name the program with --entry"),
        (("empty", "-o", "o2", "--dev", "--entry", "x.py"), "error: "),
        (("empty", "-o", "o3", "--entry", "x.py", "--cas", "https://h:1"), "error: --cas and --cas-cert go together"),
    ]
    for args, says in cases:
        r = build(*args, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith(says) and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    _app(tmp_path / "bad", "print('x')\n")
    (tmp_path / "bad" / "requirements.txt").write_text("no-such-package-pyscone-test==0.0.1\n")
    r = build("bad/app", "-o", "o4", "--dev", "--requirements", "bad/requirements.txt", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith("error: pip install -r"), r.stderr


def test_podman_loads_the_archive_and_runs_the_same_image(dev_image: Path, tmp_path: Path) -> None:
    """podman (its own storage under tmp_path): the docker-archive loads and its image serves.  This
    sandbox refuses podman's default rlimits (RLIMIT_NOFILE 1048576, RLIMIT_NPROC): set lower ones."""
    runroot = Path(tempfile.mkdtemp(prefix="pyscone-podman-"))  # (podman wants a runroot under 50 characters)
    podman = [_tool("podman"), "--root", str(tmp_path / "root"), "--runroot", str(runroot)]
    loaded = subprocess.run(
        [*podman, "load", "-i", str(dev_image / "image.tar")], capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0 and "localhost/pyscone-app:latest" in loaded.stdout, loaded.stderr
    manifest = json.loads((dev_image / "manifest.json").read_text())
    inspected = json.loads(
        subprocess.run(
            [*podman, "image", "inspect", "localhost/pyscone-app:latest"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert inspected[0]["Labels"]["org.pyscone.mrenclave"] == manifest["mrenclave"]
    port = free_port()
    name = f"pyscone-podman-{os.getpid()}"
    limits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
    run = [*podman, "run", "--rm", "--name", name, "--network", "host", *limits, "localhost/pyscone-app:latest"]
    proc = subprocess.Popen([*run, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                assert _get(f"http://127.0.0.1:{port}/note", MARKER.encode()) == "stored"
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    _, err = proc.communicate(timeout=10)
                    pytest.fail(f"podman run did not serve: {err[-2000:]}")
                time.sleep(0.3)
        assert _get(f"http://127.0.0.1:{port}/notes") == MARKER + "\n"
    finally:
        subprocess.run([*podman, "kill", name], capture_output=True, timeout=60)
        proc.communicate(timeout=60)
        subprocess.run([*podman, "rm", "-f", name], capture_output=True, timeout=60)
        shutil.rmtree(runroot, ignore_errors=True)


def _run_once(where: Path) -> subprocess.CompletedProcess[str]:
    name = f"pyscone-once-{os.getpid()}-{where.name}"
    try:
        return subprocess.run(
            [_tool("runc"), "run", "--bundle", str(where), name], capture_output=True, text=True, timeout=120
        )
    finally:
        subprocess.run([_tool("runc"), "delete", "--force", name], capture_output=True)


def test_a_package_file_the_host_changes_or_adds_in_the_image_is_never_run(dev_image: Path, tmp_path: Path) -> None:
    """Every file of the stdlib and the runtime's site-packages is listed, with its hash, in the measured
    pyscone-files.json: a changed module stops the enclave, a planted one does not exist."""
    manifest = json.loads((dev_image / "manifest.json").read_text())
    where = bundle(dev_image, tmp_path / "changed", [*manifest["entrypoint"], "1"])
    (init,) = (where / "rootfs" / "opt" / "pyscone" / "lib").glob("python3.*/site-packages/flask/__init__.py")
    init.write_text(init.read_text() + "\nprint('the host was here')\n")
    got = _run_once(where)
    assert got.returncode == 86, got.stderr
    assert "flask/__init__.py is not the file the image was built with" in got.stderr
    assert "the host was here" not in got.stdout
    planted = bundle(
        dev_image,
        tmp_path / "planted",
        ["/opt/pyscone/bin/python", "-m", "pyscone.cli", "run", "-c", "import json; print('json ok'); import planted"],
    )
    (site,) = (planted / "rootfs" / "opt" / "pyscone" / "lib").glob("python3.*/site-packages")
    (site / "planted.py").write_text("print('the host was here')\n")
    got = _run_once(planted)
    assert "json ok" in got.stdout and "the host was here" not in got.stdout
    assert "ModuleNotFoundError: No module named 'planted'" in got.stderr
