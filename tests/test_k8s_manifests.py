"""The Kubernetes manifests (deploy/kubernetes/), checked offline.

The kustomization is rendered by a real kustomize (``kubectl kustomize``: scripts/setup.sh installs
kubectl when the machine has none) and every object is validated against the Kubernetes JSON
schemas shipped by the ``kubernetes-validate`` package, strictly (an unknown field is an error), for
the oldest and the newest Kubernetes version we claim.  No network is used.

Schemas say nothing about what makes the deployment right, so :func:`problems` checks that too: the
CAS runs as two or more replicas that all present the one certificate the apps pin, its database
password comes only from a Secret, the LAS is a DaemonSet that keeps its key on the node and that
the apps find at their node's address, the app carries no secret, every pyscone command line parses
with pyscone's own CLI, and every image and every operator-made object is one the docs say how to
make.  Each check has a broken copy of the manifests that it catches.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # the dev extra: scripts/setup.sh installs it
import pytest
import yaml

from pyscone import cli

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
DOCS = ROOT / "docs" / "kubernetes.md"
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]  # the oldest we claim, and the newest schemas

Obj = dict[str, Any]


def render(directory: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render the kustomization: run scripts/setup.sh")
    r = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise ValueError(f"kustomize: {r.stderr.strip()}")
    return [o for o in yaml.safe_load_all(r.stdout) if o]


def schema_errors(objs: list[Obj]) -> list[str]:
    errors = []
    for o in objs:
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{o['kind']}/{o['metadata']['name']} (Kubernetes {version}): {e.message}")
    return errors


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def workloads(objs: list[Obj]) -> Iterator[Obj]:
    yield from (o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet"))


def containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def field_of(env: dict[str, Obj], name: str) -> str | None:
    """The downward-API field an environment variable comes from."""
    return env.get(name, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")


def mount_source(pod: Obj, container: Obj, path: str) -> tuple[str, str, str] | None:
    """(volume kind, its Secret/ConfigMap name, the key) of the file ``path`` in ``container``."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        volume = volumes[m["name"]]
        for kind, name_field in (("secret", "secretName"), ("configMap", "name")):
            if kind not in volume:
                continue
            source = volume[kind]
            if m["mountPath"] == path and "subPath" in m:
                relative = m["subPath"]
            elif path.startswith(m["mountPath"].rstrip("/") + "/") and "subPath" not in m:
                relative = path[len(m["mountPath"].rstrip("/")) + 1 :]
            else:
                continue
            if "items" not in source:
                return kind, source[name_field], relative
            keys = {i["path"]: i["key"] for i in source["items"]}
            return (kind, source[name_field], keys[relative]) if relative in keys else None  # else: no such file
    return None


class Refused(Exception):
    """A container's command line is not one pyscone takes."""


def parse_pyscone(container: Obj) -> Any:
    """The container's pyscone command line, parsed by pyscone's own CLI (so no invented option).

    Raises:
        Refused: not a pyscone command, or one that pyscone's parser refuses.
    """
    argv = [*container.get("command", []), *container.get("args", [])]
    if not argv or argv[0] != "pyscone":
        raise Refused(f"{container['name']}: not a pyscone command: {argv}")
    try:
        return cli.build_parser().parse_args(argv[1:])
    except SystemExit:
        raise Refused(f"{container['name']}: pyscone refuses {argv[1:]}") from None


def docs_section(title: str) -> str:
    text = DOCS.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/kubernetes.md has no '## {title}' section"
    return match.group(1)


def problems(objs: list[Obj]) -> list[str]:
    """What is wrong with the rendered manifests beyond their schemas (empty: nothing)."""
    try:
        out = placement(objs)
        found, las_listen = las(objs)
        out += found
        found, db_hosts = postgres(objs)
        out += found
        found, cas_cert, cas_services = cas(objs, db_hosts)
        out += found
        out += passwords(objs)
        out += app(objs, las_listen, cas_cert, cas_services)
        out += documented(objs)
    except Refused as e:
        return [str(e)]
    return out


def placement(objs: list[Obj]) -> list[str]:
    """Everything in the namespace pyscone, and nothing the operator makes (Secrets, ConfigMaps)."""
    out = [] if find(objs, "Namespace", "pyscone") else ["no Namespace pyscone"]
    for o in objs:
        what = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != "pyscone":
            out.append(f"{what} is not in the namespace pyscone")
        if o["kind"] in ("Secret", "ConfigMap"):
            out.append(f"{what} is committed: the operator makes it")
    return out


def las(objs: list[Obj]) -> tuple[list[str], str | None]:
    """The LAS: one per node, its key on the node, at the node's address.  Returns (problems, --listen)."""
    sets = find(objs, "DaemonSet", "pyscone-las")
    if not sets:
        return ["the LAS is not a DaemonSet"], None
    out = []
    pod = sets[0]["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "las")
    a = parse_pyscone(container)
    if a.command != "las" or a.show:
        return ["the LAS container does not run pyscone las"], None
    env = env_of(container)
    if not (
        pod.get("hostNetwork") and field_of(env, "HOST_IP") == "status.hostIP" and a.listen.startswith("$(HOST_IP):")
    ):
        out.append("the LAS does not listen on its node's address (hostNetwork, status.hostIP)")
    key_dir = env.get("PYSCONE_LAS_DIR", {}).get("value")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    if key_dir not in mounts or "hostPath" not in volumes.get(mounts[key_dir], {}):
        out.append("the LAS's platform key is not kept on the node (hostPath at PYSCONE_LAS_DIR)")
    if "readinessProbe" not in container or "livenessProbe" not in container:
        out.append("the LAS has no readiness or liveness probe")
    return out, a.listen


def postgres(objs: list[Obj]) -> tuple[list[str], set[str]]:
    """StatefulSets with a volume claim template and a headless Service.  Returns (problems, pod host names)."""
    out, hosts = [], set()
    for sts in find(objs, "StatefulSet"):
        name, service = sts["metadata"]["name"], sts["spec"]["serviceName"]
        svc = find(objs, "Service", service)
        if not svc or svc[0]["spec"].get("clusterIP") != "None":
            out.append(f"StatefulSet/{name}: no headless Service")
        if not sts["spec"].get("volumeClaimTemplates"):
            out.append(f"StatefulSet/{name}: no volumeClaimTemplates")
        hosts |= {f"{name}-{i}.{service}" for i in range(sts["spec"].get("replicas", 1))}
    return out, hosts


def cas(objs: list[Obj], db_hosts: set[str]) -> tuple[list[str], tuple[str, str, str] | None, list[Obj]]:
    """The CAS: two or more replicas of one identity, on PostgreSQL.

    Returns:
        (problems, where its certificate comes from, the Services that select its pods)
    """
    deployments = find(objs, "Deployment", "pyscone-cas")
    if not deployments:
        return ["no Deployment pyscone-cas"], None, []
    out = []
    dep = deployments[0]
    if dep["spec"].get("replicas", 1) < 2:
        out.append(f"the CAS has {dep['spec'].get('replicas', 1)} replica(s); it needs two or more")
    pod = dep["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "cas")
    a = parse_pyscone(container)
    if (a.command, a.cas_command) != ("cas", "serve"):
        return [*out, "the CAS container does not run pyscone cas serve"], None, []
    db = a.db or ""
    if not db.startswith("postgresql://"):
        out.append(f"the CAS's --db is not PostgreSQL: {db!r}")
    if re.match(r"postgresql://[^@/]*:[^@/]*@", db):
        out.append("the CAS's --db URL holds a password")
    if db.split("@")[-1].split("/")[0].split(":")[0] not in db_hosts:
        out.append(f"the CAS's --db {db!r} names no PostgreSQL of these manifests ({sorted(db_hosts)})")
    # Every replica must find the same key, certificate and master key in its --dir, or it makes its own.
    identity = {f: mount_source(pod, container, f"{a.dir}/{f}") for f in ("cas-key.pem", "cas-cert.pem", "master.key")}
    for f in ("cas-key.pem", "master.key"):
        source = identity[f]
        if source is None or source[0] != "secret" or source[2] != f:
            out.append(f"the CAS's {f} is not mounted from a Secret's key {f}: each replica would make its own")
    cert = identity["cas-cert.pem"]
    if cert is None or cert[2] != "cas-cert.pem":
        out.append("the CAS's cas-cert.pem is not mounted: each replica would make its own")
    if a.admin and mount_source(pod, container, a.admin) is None:
        out.append(f"the CAS's --admin {a.admin} is not mounted")
    labels = dep["spec"]["template"]["metadata"]["labels"].items()
    services = [
        s for s in find(objs, "Service") if s["spec"].get("selector") and s["spec"]["selector"].items() <= labels
    ]
    if not services:
        out.append("no Service selects the CAS's pods")
    return out, cert, services


def passwords(objs: list[Obj]) -> list[str]:
    """A password, secret, token or key in a container's environment comes only from a Secret."""
    out = []
    for w in workloads(objs):
        for c in containers(w["spec"]["template"]["spec"]):
            for e in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|TOKEN|KEY$", e["name"]) and "secretKeyRef" not in e.get("valueFrom", {}):
                    out.append(f"{w['metadata']['name']}/{c['name']}: {e['name']} is not from a secretKeyRef")
    return out


def app(
    objs: list[Obj], las_listen: str | None, cas_cert: tuple[str, str, str] | None, cas_services: list[Obj]
) -> list[str]:
    """The app knows where the CAS, its session and its node's LAS are, and holds no secret."""
    apps = find(objs, "Deployment", "pyscone-example")
    if not apps:
        return ["no example app Deployment"]
    out = []
    for dep in apps:
        pod = dep["spec"]["template"]["spec"]
        for c in containers(pod):
            env = env_of(c)
            out += [
                f"the app has no {n}"
                for n in ("PYSCONE_CAS", "PYSCONE_SESSION", "PYSCONE_LAS", "PYSCONE_CAS_CERT")
                if "value" not in env.get(n, {})
            ]
            if not re.fullmatch(
                r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", env.get("PYSCONE_SESSION", {}).get("value", "")
            ):
                out.append("the app's PYSCONE_SESSION is not NAME/SERVICE")
            url = env.get("PYSCONE_CAS", {}).get("value", "")
            m = re.fullmatch(r"https://([^.:/]+)\.pyscone\.svc:(\d+)", url)
            if not (
                m
                and any(
                    s["metadata"]["name"] == m.group(1)
                    and any(p["port"] == int(m.group(2)) for p in s["spec"]["ports"])
                    for s in cas_services
                )
            ):
                out.append(f"the app's PYSCONE_CAS {url!r} is not the CAS Service's https URL")
            if las_listen is not None and env.get("PYSCONE_LAS", {}).get("value") != las_listen:
                out.append(f"the app's PYSCONE_LAS is not where the LAS listens ({las_listen})")
            if field_of(env, "HOST_IP") != "status.hostIP":
                out.append("the app's HOST_IP is not its node's (status.hostIP)")
            cert = mount_source(pod, c, env.get("PYSCONE_CAS_CERT", {}).get("value", ""))
            if cert is None or cert != cas_cert:
                out.append(f"the app's PYSCONE_CAS_CERT ({cert}) is not the certificate the CAS serves ({cas_cert})")
            if c.get("envFrom") or any("secretKeyRef" in e.get("valueFrom", {}) for e in c.get("env", [])):
                out.append("the app takes a value from a Secret: its secrets come from the CAS")
        if any("secret" in v for v in pod.get("volumes", [])):
            out.append("the app mounts a Secret: its secrets come from the CAS")
    return out


def documented(objs: list[Obj]) -> list[str]:
    """The docs say how to get every image and how to make every Secret and ConfigMap the pods use."""
    out = []
    images, made = docs_section("Images").splitlines(), docs_section("Secrets")
    for w in workloads(objs):
        pod = w["spec"]["template"]["spec"]
        for c in containers(pod):
            if not any(c["image"] in line and re.search(r"\b(build|pull|load)\b", line) for line in images):
                out.append(
                    f"{w['metadata']['name']}/{c['name']}: the docs do not say how to get the image {c['image']}"
                )
        names = {("secret", v["secret"]["secretName"]) for v in pod.get("volumes", []) if "secret" in v}
        names |= {("configmap", v["configMap"]["name"]) for v in pod.get("volumes", []) if "configMap" in v}
        for c in containers(pod):
            names |= {
                ("secret", e["valueFrom"]["secretKeyRef"]["name"])
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            }
        for kind, name in sorted(names):
            if (
                f"kubectl create -n pyscone {kind} generic {name} " not in made
                and f"kubectl create -n pyscone {kind} {name} " not in made
            ):
                out.append(f"{w['metadata']['name']}: the docs do not say how to make the {kind} {name}")
    return out


@pytest.fixture(scope="module")
def rendered() -> list[Obj]:
    return render(BASE)


def test_the_kustomization_renders_the_whole_deployment(rendered: list[Obj]) -> None:
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in rendered)
    assert kinds == [
        "DaemonSet/pyscone-las",
        "Deployment/pyscone-cas",
        "Deployment/pyscone-example",
        "Namespace/pyscone",
        "PodDisruptionBudget/pyscone-cas",
        "Service/pyscone-cas",
        "Service/pyscone-example",
        "Service/pyscone-postgres",
        "StatefulSet/pyscone-postgres",
    ]


def test_every_object_is_valid_against_the_kubernetes_schemas(rendered: list[Obj]) -> None:
    assert schema_errors(rendered) == []


def test_the_deployment_is_what_pyscone_needs(rendered: list[Obj]) -> None:
    assert problems(rendered) == []


def test_the_images_are_built_from_files_in_the_repository() -> None:
    images = docs_section("Images")
    assert (ROOT / "deploy" / "Containerfile").is_file()
    assert "-f deploy/Containerfile" in images and "pyscone build --oci" in images


def test_the_las_readiness_probe_speaks_the_las_protocol(rendered: list[Obj], tmp_path: Path) -> None:
    """The probe asks a real LAS for its platform id (and a server that is not a LAS fails it)."""
    las = find(rendered, "DaemonSet", "pyscone-las")[0]["spec"]["template"]["spec"]["containers"][0]
    command = las["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    server = subprocess.Popen(
        [sys.executable, "-m", "pyscone.cli", "las", "--listen", "127.0.0.1:0", "--dir", str(tmp_path / "las")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        port = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert port, line
        code = command[2].replace("18766", port.group(1))
        probe = subprocess.run(
            [sys.executable, "-c", code], env={"HOST_IP": "127.0.0.1"}, capture_output=True, timeout=30
        )
        assert probe.returncode == 0, probe.stderr
        assert code.count('"op": "platform"') == 1
        not_las = subprocess.run(
            [sys.executable, "-c", code.replace('"op": "platform"', '"op": "nope"')],
            env={"HOST_IP": "127.0.0.1"},
            capture_output=True,
            timeout=30,
        )
        assert not_las.returncode != 0  # an answer without a platform id is not ready
    finally:
        server.terminate()
        server.wait(timeout=10)


BROKEN = [
    # (file, what to replace, with what, what must catch it)
    ("cas.yaml", "  replicas: 2\n", "  replicas: 1\n", "needs two or more"),
    (
        "cas.yaml",
        "  replicas: 2\n",
        "  replica: 2\n",
        "Additional properties are not allowed ('replica' was unexpected)",
    ),
    (
        "cas.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesytem: true",
        "'readOnlyRootFilesytem' was unexpected",
    ),
    ("las.yaml", "kind: DaemonSet", "kind: Deployment", "the LAS is not a DaemonSet"),
    (
        "las.yaml",
        "hostPath:\n            path: /var/lib/pyscone/las",
        "emptyDir: {}\n          x:\n            path: /var/lib/pyscone/las",
        "not kept on the node",
    ),
    (
        "cas.yaml",
        "              subPath: master.key\n",
        "              subPath: master.key.x\n",
        "master.key is not mounted from a Secret",
    ),
    (
        "cas.yaml",
        "            - name: PGPASSWORD\n              valueFrom:\n                secretKeyRef:\n                  name: pyscone-postgres\n                  key: password\n",
        "            - name: PGPASSWORD\n              value: hunter2\n",
        "PGPASSWORD is not from a secretKeyRef",
    ),
    ("cas.yaml", "postgresql://pyscone@", "postgresql://pyscone:hunter2@", "URL holds a password"),
    ("cas.yaml", "            - --admin\n", "            - --admin-key\n", "pyscone refuses"),
    (
        "app.yaml",
        "            - name: PYSCONE_SESSION\n              value: example/app\n",
        "",
        "the app has no PYSCONE_SESSION",
    ),
    (
        "app.yaml",
        "value: https://pyscone-cas.pyscone.svc:8081",
        "value: https://pyscone-cas.pyscone.svc:8443",
        "not the CAS Service's https URL",
    ),
    (
        "app.yaml",
        "            - name: PYSCONE_SESSION\n",
        "            - name: DB\n              valueFrom:\n                secretKeyRef: {name: pyscone-postgres, key: password}\n            - name: PYSCONE_SESSION\n",
        "the app takes a value from a Secret",
    ),
    ("app.yaml", "value: $(HOST_IP):18766", "value: 127.0.0.1:18766", "not where the LAS listens"),
    (
        "app.yaml",
        "image: pyscone-example:latest",
        "image: pyscone-example:v2",
        "how to get the image pyscone-example:v2",
    ),
    ("kustomization.yaml", "  - postgres.yaml\n", "", "names no PostgreSQL of these manifests"),
]


@pytest.mark.parametrize(("file", "old", "new", "caught"), BROKEN, ids=[b[3][:40] for b in BROKEN])
def test_a_broken_copy_is_refused(file: str, old: str, new: str, caught: str, tmp_path: Path) -> None:
    copy = tmp_path / "kubernetes"
    shutil.copytree(BASE, copy)
    text = (copy / file).read_text()
    assert text.count(old) == 1, f"{file}: the change no longer applies"
    (copy / file).write_text(text.replace(old, new))
    objs = render(copy)
    found = schema_errors(objs) + problems(objs)
    assert any(caught in p for p in found), found
