"""Session policies: the YAML a session owner gives the CAS (sans-IO).

A policy names the session, the version it replaces, the services it may start and
what each receives once its enclave has attested; and the secrets the CAS makes for
it.  Example::

    name: notes
    predecessor: null            # or the version (SHA-256 of the YAML) this one replaces
    platforms: [<platform id>]   # optional: only these platforms (else any the CAS trusts)
    services:
      api:
        mrenclaves: [<hex>]      # and/or a signer:
        mrsigner: <hex>
        product_id: 7
        min_svn: 2
        debug: false             # allow a debug enclave (default false)
        cwd: /srv/app            # the working directory (default /); a relative argv[0] is taken from it
        argv: [app.py, --port, "8443"]
        env: {DB_PASSWORD: "${secret:db_password}", MODE: production}
        files: {/run/secrets/api.key: "${secret:api_tls.key}"}
        fspf: {path: /data/app.fspf, key: <hex>, tag: <hex>}
        network:                 # the network shield (grammar: protect/netpolicy.py)
          listen: [{port: 8443, cert: "${secret:api_tls.cert}", key: "${secret:api_tls.key}"}]
          connect: [{to: "db.internal:5432", ca: <PEM>}]
          unlisted: refuse       # or allow (plaintext, logged)
        console: {key: <hex>}    # the console shield, under the owner's key (pyscone console)
    secrets:
      db_password: {kind: password, length: 24}
      token: {kind: random, bytes: 32}        # hex
      signing: {kind: ecdsa}                  # PEM private key; .public is the public key
      api_tls: {kind: x509, common_name: api.notes}   # .key, .cert, and .ca for the session CA

``${secret:NAME}`` (or ``NAME.part``) in argv, env and files is replaced by the
secret's value in the configuration an attested enclave receives; no API returns
it to anyone else.  A mistake is a :class:`PolicyError` that names the line.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from pyscone.platform.quote import Expected

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no '.': it separates a secret's parts
HEX32 = re.compile(r"^[0-9a-fA-F]{64}$")
SECRET_REF = re.compile(r"\$\{secret:([A-Za-z0-9_.-]+)\}")
SECRET_KINDS = {
    "random": {"bytes"},
    "password": {"length"},
    "ecdsa": set(),
    "x509": {"common_name"},
}
SECRET_PARTS = {"random": {""}, "password": {""}, "ecdsa": {"", "public"}, "x509": {"key", "cert", "ca"}}
MAX_POLICY = 256 * 1024
MAX_DEPTH = 16  # nesting of mappings and lists; a policy needs 5 (PyYAML's composer recurses)


class PolicyError(Exception):
    """A policy is not valid: the message names the line and the reason."""


@dataclass(frozen=True)
class SecretSpec:
    name: str
    kind: str
    size: int = 0  # bytes (random) or characters (password)
    common_name: str = ""


@dataclass(frozen=True)
class FspfSpec:
    path: str
    key: str  # hex, or a secret reference
    tag: str  # hex: the FSPF version the service must start from


@dataclass(frozen=True)
class Service:
    name: str
    expected: Expected
    argv: tuple[str, ...]
    env: Mapping[str, str]
    files: Mapping[str, str]
    fspf: FspfSpec | None
    cwd: str = "/"  # the enclave's working directory: never the host's
    network: Mapping[str, Any] | None = None  # the network shield's rules (protect/netpolicy.py)
    console_key: str | None = None  # hex: the console shield's key, the owner's (docs/console-shield.md)


@dataclass(frozen=True)
class Policy:
    name: str
    predecessor: str | None
    platforms: frozenset[bytes] | None
    services: Mapping[str, Service]
    secrets: Mapping[str, SecretSpec]
    text: str = field(repr=False)

    @property
    def version(self) -> str:
        """The policy's version: SHA-256 of its text (what a successor names as predecessor)."""
        return version_of(self.text)


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class _Node:
    """A YAML node with where it is, for messages."""

    def __init__(self, node: yaml.Node, path: str) -> None:
        self.node = node
        self.path = path

    def fail(self, why: str) -> PolicyError:
        return PolicyError(f"line {self.node.start_mark.line + 1}: {self.path}: {why}")

    def mapping(self, allowed: set[str], required: frozenset[str] | set[str] = frozenset()) -> dict[str, _Node]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.fail("expected a mapping")
        out: dict[str, _Node] = {}
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Node(key_node, self.path).fail("keys must be plain names")
            key = key_node.value
            child = _Node(value_node, f"{self.path}.{key}" if self.path else key)
            if key in out:
                raise child.fail("given twice")
            if allowed and key not in allowed:
                raise child.fail(f"unknown key (expected one of: {', '.join(sorted(allowed))})")
            out[key] = child
        for key in sorted(required - out.keys()):
            raise self.fail(f"missing {key!r}")
        return out

    def items(self) -> dict[str, _Node]:
        return self.mapping(set())

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.fail("expected a single value")
        try:
            return yaml.safe_load(yaml.serialize(self.node))
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):  # e.g. !!python/name:…, !!int x
            raise self.fail("not a valid value") from None

    def string(self, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        # The text as written: YAML would read an all-digit hex string as a number and drop
        # its leading zeros, or "1e5" as a float.
        if not isinstance(self.node, yaml.ScalarNode) or self.node.tag == "tag:yaml.org,2002:null":
            raise self.fail("expected a string")
        text = str(self.node.value)
        if pattern is not None and not pattern.match(text):
            raise self.fail(f"expected {what}")
        return text

    def integer(self, low: int, high: int) -> int:
        value = self.scalar()
        if type(value) is not int or not low <= value <= high:
            raise self.fail(f"expected an integer from {low} to {high}")
        return value

    def boolean(self) -> bool:
        value = self.scalar()
        if type(value) is not bool:
            raise self.fail("expected true or false")
        return value

    def sequence(self) -> list[_Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.fail("expected a list")
        return [_Node(n, f"{self.path}[{i}]") for i, n in enumerate(self.node.value)]


def parse(text: str) -> Policy:
    """Parse and validate a policy.

    Raises:
        PolicyError: the YAML is malformed or the policy is not valid (with the line).
    """
    if len(text) > MAX_POLICY:
        raise PolicyError(f"the policy is larger than {MAX_POLICY} bytes")
    try:
        _check_depth(text)
        root_node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise PolicyError(f"{where}not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if root_node is None:
        raise PolicyError("line 1: the policy is empty")
    root = _Node(root_node, "").mapping(
        {"name", "predecessor", "platforms", "services", "secrets"}, {"name", "services"}
    )
    name = root["name"].string(NAME, "a name of letters, digits, '_', '.', '-' (at most 64)")
    predecessor = None
    if "predecessor" in root and root["predecessor"].scalar() is not None:
        predecessor = root["predecessor"].string(HEX32, "the 64-hex-digit version of the policy this replaces")
    platforms = None
    if "platforms" in root:
        platforms = frozenset(
            bytes.fromhex(n.string(HEX32, "a 64-hex-digit platform id")) for n in root["platforms"].sequence()
        )
    secrets: dict[str, SecretSpec] = {}
    for sname, snode in (root["secrets"].items() if "secrets" in root else {}).items():
        secrets[sname] = _secret(sname, snode)
    services: dict[str, Service] = {}
    for svc_name, svc_node in root["services"].items().items():
        if not NAME.match(svc_name):
            raise svc_node.fail("a service name is letters, digits, '_', '.', '-'")
        services[svc_name] = _service(svc_name, svc_node, secrets)
    if not services:
        raise root["services"].fail("a session needs at least one service")
    _check_volumes(services, root["services"])
    return Policy(name, predecessor, platforms, services, secrets, text)


def _check_depth(text: str) -> None:
    """Refuse deep nesting before composing: PyYAML's composer recurses once per level, so
    ``[[[[…`` ten thousand deep was a ``RecursionError`` (an HTTP 500 from the CAS).

    Raises:
        PolicyError: nested more than :data:`MAX_DEPTH` deep (with the line).
        yaml.YAMLError: not YAML at all.
    """
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark is not None else 1
                raise PolicyError(f"line {line}: nested more than {MAX_DEPTH} deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_volumes(services: Mapping[str, Service], node: _Node) -> None:
    """Services that name one FSPF share its volume and its pin: the same key and tag."""
    seen: dict[str, tuple[str, FspfSpec]] = {}
    for name, svc in services.items():
        if svc.fspf is None:
            continue
        first = seen.setdefault(svc.fspf.path, (name, svc.fspf))
        if (first[1].key, first[1].tag.lower()) != (svc.fspf.key, svc.fspf.tag.lower()):
            raise node.fail(
                f"{name}.fspf: the FSPF {svc.fspf.path} is also service {first[0]}'s: give it the same key and tag"
            )


def _secret(name: str, node: _Node) -> SecretSpec:
    if not SECRET_NAME.match(name):
        raise node.fail("a secret name is letters, digits, '_' and '-'")
    m = node.mapping({"kind", "bytes", "length", "common_name"}, {"kind"})
    kind = m["kind"].string()
    if kind not in SECRET_KINDS:
        raise m["kind"].fail(f"unknown kind (expected one of: {', '.join(sorted(SECRET_KINDS))})")
    for key, child in m.items():
        if key != "kind" and key not in SECRET_KINDS[kind]:
            raise child.fail(f"not a setting of a {kind} secret")
    size = 0
    if kind == "random":
        size = m["bytes"].integer(1, 4096) if "bytes" in m else 32
    elif kind == "password":
        size = m["length"].integer(8, 256) if "length" in m else 24
    cn = m["common_name"].string() if "common_name" in m else (name if kind == "x509" else "")
    return SecretSpec(name, kind, size, cn)


def _service(name: str, node: _Node, secrets: Mapping[str, SecretSpec]) -> Service:
    keys = {"mrenclaves", "mrsigner", "product_id", "min_svn", "debug", "argv", "env", "files", "fspf", "cwd"}
    m = node.mapping(keys | {"network", "console"}, {"argv"})
    mrenclaves = frozenset(
        bytes.fromhex(n.string(HEX32, "a 64-hex-digit MRENCLAVE"))
        for n in (m["mrenclaves"].sequence() if "mrenclaves" in m else [])
    )
    mrsigner = bytes.fromhex(m["mrsigner"].string(HEX32, "a 64-hex-digit MRSIGNER")) if "mrsigner" in m else None
    if not mrenclaves and mrsigner is None:
        raise node.fail("a service needs 'mrenclaves' or 'mrsigner' (who may run it)")
    expected = Expected(
        mrenclaves=mrenclaves,
        mrsigner=mrsigner,
        product_id=m["product_id"].integer(0, 0xFFFF) if "product_id" in m else 0,
        min_svn=m["min_svn"].integer(0, 0xFFFF) if "min_svn" in m else 0,
        allow_debug=m["debug"].boolean() if "debug" in m else False,
    )
    check = _ref_checker(secrets)
    argv = tuple(check(n, n.string()) for n in m["argv"].sequence())
    if not argv:
        raise m["argv"].fail("argv needs at least the program")
    env = {k: check(v, v.string()) for k, v in (m["env"].items() if "env" in m else {}).items()}
    files = {}
    for path, v in (m["files"].items() if "files" in m else {}).items():
        if not path.startswith("/"):
            raise v.fail("an injected file's path is absolute")
        files[path] = check(v, v.string())
    fspf = None
    if "fspf" in m:
        f = m["fspf"].mapping({"path", "key", "tag"}, {"path", "key", "tag"})
        key = check(f["key"], f["key"].string())
        if not SECRET_REF.fullmatch(key) and not HEX32.match(key):
            raise f["key"].fail("expected the FSPF key (64 hex digits) or a secret reference")
        fspf = FspfSpec(
            f["path"].string(), key, f["tag"].string(re.compile(r"^[0-9a-fA-F]{32}$"), "a 32-hex-digit tag")
        )
    cwd = "/"
    if "cwd" in m:
        cwd = m["cwd"].string()
        if not cwd.startswith("/") or "\0" in cwd:
            raise m["cwd"].fail("the working directory is an absolute path")
        cwd = posixpath.normpath(cwd)
    network = _network(m["network"], check) if "network" in m else None
    console_key = _console_key(m["console"]) if "console" in m else None
    return Service(name, expected, argv, env, files, fspf, cwd, network=network, console_key=console_key)


def _network(node: _Node, check: Callable[[_Node, str], str]) -> dict[str, Any]:
    """A service's network-shield rules: validated by the one parser the enclave uses too."""
    from pyscone.protect import netpolicy

    if not isinstance(node.node, yaml.MappingNode):
        raise node.fail("expected a mapping")
    try:
        spec = yaml.safe_load(yaml.serialize(node.node))
    except (yaml.YAMLError, ValueError, TypeError, OverflowError):
        raise node.fail("not a valid value") from None

    def refs(value: Any) -> None:
        if isinstance(value, str):
            check(node, value)
        elif isinstance(value, dict):
            for v in value.values():
                refs(v)
        elif isinstance(value, list):
            for v in value:
                refs(v)

    refs(spec)
    try:
        netpolicy.parse(spec)
    except netpolicy.NetPolicyError as e:
        raise _locate(node, str(e)).fail(str(e)) from None
    return dict(spec)


def _locate(node: _Node, message: str) -> _Node:
    """The node a network-rule error names (``listen[0].port: ...``), for its line."""
    where = re.match(r"^([A-Za-z_]+(?:\[\d+\]|\.[A-Za-z_]+)*): ", message)
    current = node.node
    for step in re.findall(r"[A-Za-z_]+|\[\d+\]", where.group(1) if where else ""):
        if isinstance(current, yaml.MappingNode):
            found = [v for k, v in current.value if isinstance(k, yaml.ScalarNode) and k.value == step]
            if not found:
                break
            current = found[0]
        elif isinstance(current, yaml.SequenceNode) and step.startswith("["):
            i = int(step[1:-1])
            if i >= len(current.value):
                break
            current = current.value[i]
        else:
            break
    return _Node(current, node.path)


def _console_key(node: _Node) -> str:
    """``console: {key: <64 hex>}``: the owner's own key, since only the owner reads the output.

    A secret the CAS makes is never shown to anyone, so no one could decrypt records under it:
    a reference is refused, not accepted and made useless.
    """
    key = node.mapping({"key"}, {"key"})["key"]
    text = key.string()
    if SECRET_REF.search(text):
        raise key.fail("the console key is the owner's (64 hex digits): a secret the CAS makes is never shown")
    if not HEX32.match(text):
        raise key.fail("expected the console key: 64 hex digits (pyscone console --make-key --key-file FILE)")
    return text.lower()


def _ref_checker(secrets: Mapping[str, SecretSpec]) -> Callable[[_Node, str], str]:
    def check(node: _Node, text: str) -> str:
        for ref in SECRET_REF.findall(text):
            base, _, part = ref.partition(".")
            spec = secrets.get(base)
            if spec is None:
                raise node.fail(f"refers to an undefined secret {base!r}")
            if part not in SECRET_PARTS[spec.kind]:
                parts = ", ".join(repr(p) for p in sorted(SECRET_PARTS[spec.kind]) if p) or "none"
                raise node.fail(f"a {spec.kind} secret has no part {part!r} (parts: {parts})")
        return text

    return check


def render(text: str, values: Mapping[str, str]) -> str:
    """Replace every secret reference in ``text`` with its value (``values`` by reference)."""
    return SECRET_REF.sub(lambda m: values[m.group(1)], text)
