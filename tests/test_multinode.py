"""Several machines, simulated: nodes in network namespaces, two CAS replicas on one PostgreSQL.

Each node is a network namespace with its own loopback, a veth on a bridge in the root
namespace, and its own LAS (its own platform key, trusted by the CAS admin).  Two CAS
replicas share one identity and one PostgreSQL database and listen on two addresses of the
bridge, on the same port.  Every enclave is measured for one CAS URL, ``https://cas.test:PORT``;
each node's ``/etc/netns/NODE/hosts`` (bind-mounted over ``/etc/hosts`` by ``ip netns exec``)
resolves ``cas.test`` to its replica: half the nodes use replica A, half replica B.  Fifty
enclaves start over the nodes while replica A is killed (SIGKILL) and restarted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from conftest import PYSCONE, write_app

from pyscone.cas import protocol
from pyscone.platform import keys, quote

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.timeout(300),
]

NODES = 4  # nodes 0 and 2 use replica A, 1 and 3 replica B
ENCLAVES = 50
SESSIONS = 5
PARALLEL = 6  # concurrent `pyscone run`s (2 cores)
NETNS_ETC = Path("/etc/netns")


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _cli(
    *args: str | Path, cwd: Path, netns: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(
        [*prefix, *PYSCONE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _subnet() -> ipaddress.IPv4Network:
    """A /24 for this run, derived from the pid, that no interface of this machine is on."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    pid = os.getpid()
    for i in range(256):
        net = ipaddress.IPv4Network(f"10.{100 + (pid >> 8) % 100}.{(pid + i) % 256}.0/24")
        if f"{net.network_address}".rsplit(".", 1)[0] + "." not in used:
            return net
    raise AssertionError("no free /24 in 10.100-199.x")


class Proc:
    """A pyscone service (optionally inside a node), its port read from its first line."""

    def __init__(self, args: list[str], pattern: str, netns: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen(
            [*prefix, *PYSCONE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline()
        m = re.search(pattern, self.line)
        if m is None:
            self.proc.kill()
            raise AssertionError(self.line + self.proc.communicate(timeout=15)[1])
        self.port = int(m.group(1))
        # Drain stderr so that a chatty service never blocks on a full pipe.
        self.err: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


@dataclass
class Node:
    netns: str
    address: str
    replica: str  # "A" or "B"
    las_dir: Path
    las: Proc | None = None


class Cluster:
    """The bridge, the nodes and their LASes; the two CAS replicas; torn down in :meth:`close`."""

    def __init__(self, root: Path, db: str) -> None:
        self.root, self.db = root, db
        tag = f"pys{os.getpid()}"
        self.bridge = f"{tag}br"
        self.nodes: list[Node] = []
        self.procs: list[Proc] = []
        self.replicas: dict[str, Proc] = {}
        net = _subnet()
        hosts = list(net.hosts())
        self.prefix = net.prefixlen
        self.addresses = {"A": str(hosts[0]), "B": str(hosts[1])}
        _ip("link", "add", self.bridge, "type", "bridge")
        self.bridge_made = True
        for address in self.addresses.values():
            _ip("addr", "add", f"{address}/{net.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(NODES):
            node = Node(f"{tag}n{i}", str(hosts[10 + i]), "AB"[i % 2], root / f"las-{i}")
            self.nodes.append(node)
            _ip("netns", "add", node.netns)
            host_side, node_side = f"{tag}v{i}", f"{tag}p{i}"
            _ip("link", "add", host_side, "type", "veth", "peer", "name", node_side, "netns", node.netns)
            _ip("link", "set", host_side, "master", self.bridge, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
            _ip("-n", node.netns, "addr", "add", f"{node.address}/{net.prefixlen}", "dev", node_side)
            _ip("-n", node.netns, "link", "set", node_side, "up")

    def cas_etc(self, port: int) -> None:
        """Each node's /etc/hosts: cas.test is its replica (``ip netns exec`` mounts it)."""
        for node in self.nodes:
            d = NETNS_ETC / node.netns
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(f"127.0.0.1 localhost\n{self.addresses[node.replica]} cas.test\n")

    def start_las(self) -> None:
        for i, node in enumerate(self.nodes):
            node.las = Proc(["las", "--dir", str(node.las_dir), "--listen", "127.0.0.1:0"], r":(\d+)$", node.netns)
            self.procs.append(node.las)
            shown = _cli("las", "--dir", node.las_dir, "--show", cwd=self.root)
            assert shown.returncode == 0, shown.stderr
            (self.root / f"platform-{i}.pem").write_text(shown.stdout)

    def replica(self, name: str, port: int) -> Proc:
        args = ["cas", "serve", "--dir", str(self.root / f"cas-{name}"), "--db", self.db]
        args += ["--listen", f"{self.addresses[name]}:{port}", "--name", "cas.test"]
        args += [arg for a in self.addresses.values() for arg in ("--name", a)]
        proc = Proc(args, r":(\d+);")
        self.replicas[name] = proc
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.stop()
        for node in self.nodes:
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
            shutil.rmtree(NETNS_ETC / node.netns, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only if no other run uses it
        if getattr(self, "bridge_made", False):
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    """A database of this test's own on the suite's PostgreSQL server, as a user writes its URL."""
    name = f"multinode_{os.getpid()}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as db:
        db.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = re.sub(r"/cas\?", f"/{name}?", postgres_url)
    yield url.replace("postgresql+psycopg://", "postgresql://")
    with admin.connect() as db:
        db.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def cluster(tmp_path: Path, database: str) -> Iterator[Cluster]:
    c: Cluster | None = None
    try:
        c = Cluster(tmp_path, database)
        yield c
    finally:
        if c is not None:
            c.close()
        else:  # the constructor failed half-way: remove what it made
            tag = f"pys{os.getpid()}"
            for i in range(NODES):
                subprocess.run(["ip", "netns", "del", f"{tag}n{i}"], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{tag}br"], capture_output=True)


def _tls(c: Cluster) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(c.root / "cas-A" / "cas-cert.pem"))


def _attest_directly(c: Cluster, node: int, challenge_at: str, attest_at: str, session: str, mre: bytes) -> dict:
    """What an enclave does, from the test: a nonce from one replica, a quote signed with the
    node's platform key, the attestation at (maybe) the other replica; returns the request."""
    port = c.replicas["A"].port
    with httpx.Client(verify=_tls(c), timeout=30) as http:
        url = f"https://{c.addresses[challenge_at]}:{port}"
        nonce = http.post(url + "/v1/challenge", json={"session": session, "service": "app"}).json()["nonce"]
    key = keys.generate()
    public = keys.public_der(key)
    report = quote.Report(mre, bytes(32), 0, 0, False, quote.report_data(public, bytes.fromhex(nonce)))
    platform = keys.load_private((c.nodes[node].las_dir / "platform-key.pem").read_bytes())
    blob = quote.sign_quote(report, platform).hex()
    request = {"session": session, "service": "app", "nonce": nonce, "quote": blob, "public_key": public.hex()}
    return {"request": request, "key": key, "nonce": nonce, "attest_at": attest_at}


def _post(c: Cluster, at: str, request: dict) -> httpx.Response:
    with httpx.Client(verify=_tls(c), timeout=30) as http:
        return http.post(f"https://{c.addresses[at]}:{c.replicas['A'].port}/v1/attest", json=request)


def test_fifty_enclaves_on_four_nodes_attest_while_a_cas_replica_is_killed_and_restarted(cluster: Cluster) -> None:
    c, root = cluster, cluster.root
    # -- the CAS: replica A makes the identity; B gets a copy; both on one database, one port.
    a = c.replica("A", 0)
    port = a.port
    (root / "cas-B").mkdir(mode=0o700)
    for f in ("cas-key.pem", "cas-cert.pem", "master.key"):
        shutil.copy2(root / "cas-A" / f, root / "cas-B" / f)
    b = c.replica("B", port)
    assert a.line.split("sha256 ")[1] == b.line.split("sha256 ")[1]  # one identity
    c.cas_etc(port)
    c.start_las()
    for i in range(NODES):  # the admin trusts each node's platform key
        trusted = _cli("cas", "trust", "--dir", root / "cas-A", "--db", c.db, f"platform-{i}.pem", cwd=root)
        assert trusted.returncode == 0, trusted.stderr
    # The node resolves cas.test to its replica (the executor's getaddrinfo reads the same
    # /etc/hosts); the root namespace does not know the name, so every enclave that starts
    # found its CAS through its node's hosts file.
    with contextlib.suppress(OSError):
        assert not set(c.addresses.values()) & {i[4][0] for i in socket.getaddrinfo("cas.test", port)}
    for node in c.nodes:
        seen = subprocess.run(
            ["ip", "netns", "exec", node.netns, "getent", "ahostsv4", "cas.test"], capture_output=True, text=True
        )
        assert seen.stdout.split()[0] == c.addresses[node.replica], seen.stdout
        # and it has no network beyond its loopback and the bridge's subnet (no default route).
        routes = subprocess.run(["ip", "-n", node.netns, "-4", "route"], capture_output=True, text=True).stdout
        assert routes.count("\n") == 1 and "default" not in routes, routes

    # -- the sessions: each app prints its session's name and its own secret.
    url = f"https://cas.test:{port}"
    pin = ["--cas", url, "--cas-cert", str(root / "cas-A" / "cas-cert.pem")]
    owner_pin = ["--cas", f"https://{c.addresses['B']}:{port}", "--cas-cert", str(root / "cas-A" / "cas-cert.pem")]
    assert _cli("keygen", "owner.pem", cwd=root).returncode == 0
    write_app(root, "import os, sys\nprint(sys.argv[1], os.environ['SECRET'])", "who.py")
    measured = _cli("measure", *pin, cwd=root)
    assert measured.returncode == 0, measured.stderr
    mre = measured.stdout.strip()
    names = [f"node-s{i}" for i in range(SESSIONS)]
    for name in names:
        (root / f"{name}.yaml").write_text(
            f"name: {name}\nservices:\n  app:\n    mrenclaves: [{mre}]\n    cwd: {root}\n"
            f"    argv: [who.py, {name}]\n    env: {{SECRET: '${{secret:id}}'}}\n"
            "secrets:\n  id: {kind: random, bytes: 16}\n"
        )
        made = _cli("cas", "session", "create", f"{name}.yaml", *owner_pin, "--key", "owner.pem", cwd=root)
        assert made.returncode == 0, made.stderr

    def start(job: int) -> tuple[int, float, float, subprocess.CompletedProcess[str]]:
        node = c.nodes[job % NODES]
        assert node.las is not None
        session = names[job % SESSIONS]
        t0 = time.monotonic()
        r = _cli(
            "run", *pin, "--session", f"{session}/app", "--las", f"127.0.0.1:{node.las.port}",
            cwd=root, netns=node.netns,
        )  # fmt: skip
        return job, t0, time.monotonic(), r

    # What each session prints, learnt on a B node before the storm (no API returns a secret).
    expected = {}
    for name in names:
        r = _cli(
            "run", *pin, "--session", f"{name}/app", "--las", f"127.0.0.1:{c.nodes[1].las.port}",  # type: ignore[union-attr]
            cwd=root, netns=c.nodes[1].netns,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == name and len(r.stdout.split()[1]) == 32, r.stdout
        expected[name] = r.stdout
    assert len(set(expected.values())) == SESSIONS  # the secrets differ per session

    # -- the storm: 50 enclaves over the nodes; replica A dies a third of the way in and comes back.
    killed_at = restarted_at = 0.0
    results = []
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(start, job) for job in range(ENCLAVES)]
        for done, f in enumerate(concurrent.futures.as_completed(futures), 1):
            results.append(f.result())
            if done == ENCLAVES // 3:
                a.kill()
                killed_at = time.monotonic()
                time.sleep(1.0)
                a = c.replica("A", port)  # the same address and port, directory and database
                restarted_at = time.monotonic()
    assert killed_at and restarted_at

    started = {"A": 0, "B": 0}
    failed = {"A": 0, "B": 0}
    overlapped = 0
    for job, t0, t1, r in sorted(results):
        node = c.nodes[job % NODES]
        session = names[job % SESSIONS]
        if t0 < killed_at < t1:
            overlapped += 1
        others = [v.split()[1] for k, v in expected.items() if k != session]
        assert not any(o in r.stdout or o in r.stderr for o in others), (job, r.stdout)  # never another's
        if r.returncode == 0:
            assert r.stdout == expected[session], (job, session, r.stdout)
            started[node.replica] += 1
        else:
            assert node.replica == "A", (job, node.netns, r.returncode, r.stderr)  # B's nodes always start
            # A clean refusal: exit 70 and one line; the app never ran.
            assert r.returncode == 70 and r.stdout == "", (job, r.returncode, r.stdout, r.stderr)
            assert re.fullmatch(r"pyscone: attestation failed: the CAS at \S+ cannot be reached: .*\n", r.stderr)
            failed[node.replica] += 1
    assert started["B"] == ENCLAVES // 2 and failed["B"] == 0
    assert overlapped > 0  # some enclaves were running when A died
    # After its restart, replica A serves A's nodes again.
    again = _cli(
        "run", *pin, "--session", f"{names[0]}/app", "--las", f"127.0.0.1:{c.nodes[0].las.port}",  # type: ignore[union-attr]
        cwd=root, netns=c.nodes[0].netns,
    )  # fmt: skip
    assert (again.returncode, again.stdout) == (0, expected[names[0]]), again.stderr
    print(f"\nmultinode: started {started}, failed cleanly {failed}, {overlapped} running at the kill")

    # -- nonces: a nonce from one replica is spent at the other, and then refused by both.
    probe_mre = bytes(range(32))
    probe = root / "probe.yaml"
    probe.write_text(f"name: node-probe\nservices:\n  app:\n    mrenclaves: ['{probe_mre.hex()}']\n    argv: [x.py]\n")
    assert _cli("cas", "session", "create", probe, *owner_pin, "--key", "owner.pem", cwd=root).returncode == 0
    for challenge_at, attest_at in (("A", "B"), ("B", "A")):
        p = _attest_directly(c, 0, challenge_at, attest_at, "node-probe", probe_mre)
        first = _post(c, attest_at, p["request"])
        assert first.status_code == 200, first.text
        protocol.open_config(p["key"], bytes.fromhex(p["nonce"]), bytes.fromhex(first.json()["sealed"]))
        for replica in ("A", "B"):
            assert _post(c, replica, p["request"]).status_code == 403  # the nonce is spent everywhere

    # -- the database: every attestation spent a nonce of its own, and made a run of its own.
    engine = sa.create_engine(c.db.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as db:
            used = db.execute(
                sa.text("SELECT nonce, session FROM challenges WHERE used AND session LIKE 'node-s%'")
            ).all()
            events = db.execute(
                sa.text("SELECT session, detail FROM audit WHERE event = 'attest' AND ok AND session LIKE 'node-s%'")
            ).all()
            refused = db.execute(
                sa.text("SELECT detail FROM audit WHERE event = 'attest' AND NOT ok AND session LIKE 'node-s%'")
            ).all()
    finally:
        engine.dispose()
    succeeded = sum(started.values()) + SESSIONS + 1  # the storm, the warm-up and the run after the restart
    runs = [re.search(r"run ([0-9a-f]{32})", d).group(1) for _, d in events]  # type: ignore[union-attr]
    assert len(set(runs)) == len(runs)  # each attestation its own run
    assert not refused, refused  # no enclave was refused (a replayed nonce would be)
    assert len({n for n, _ in used}) == len(used)
    # Every started enclave was attested once; an attestation needs a nonce of its own (the
    # killed replica may have spent a few nonces of enclaves whose answer it never sent).
    assert succeeded <= len(events) <= len(used) <= len(events) + PARALLEL
    print(f"multinode: {len(events)} attestations, {len(used)} nonces spent, {succeeded} enclaves started")
