"""A throwaway PKI for the network shield's tests, made with ``cryptography`` in a test's tmp_path.

Two unrelated CAs, each with a server certificate for ``localhost`` + 127.0.0.1 and a client
certificate, and a server certificate from the first CA for a name that is not ``localhost``: every
way a TLS peer can be wrong that the shield must refuse is one of these files. EC P-256 keys keep
the 200-connection test's handshakes cheap. Also: a writer for the dev-mode ``--net-shield`` YAML.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key, as PEM files (and the PEM text, for inline rules)."""

    cert: Path
    key: Path

    @property
    def cert_pem(self) -> str:
        return self.cert.read_text()

    @property
    def key_pem(self) -> str:
        return self.key.read_text()


@dataclass(frozen=True)
class Pki:
    root: Path
    ca: Path  # the CA every good peer's certificate comes from
    server: Identity  # CN/SAN localhost + IP 127.0.0.1, signed by ca
    client: Identity  # a client certificate signed by ca
    wrong_name: Identity  # signed by ca, but for wrong-name.example only
    other_ca: Path  # an unrelated CA
    other_server: Identity  # localhost + 127.0.0.1, signed by other_ca
    other_client: Identity  # a client certificate signed by other_ca


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, _validity(builder).sign(key, hashes.SHA256())


def _issue(
    root: Path,
    stem: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    cn: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = _validity(builder).sign(ca_key, hashes.SHA256())
    ident = Identity(root / f"{stem}.pem", root / f"{stem}.key")
    ident.cert.write_bytes(cert.public_bytes(PEM))
    ident.key.write_bytes(
        key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    ident.key.chmod(0o600)
    return ident


def make_pki(root: Path) -> Pki:
    """Write the two CAs and their certificates under ``root`` (created) and name them."""
    root.mkdir(parents=True, exist_ok=True)
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    ca_key, ca = _make_ca("pyscone net-shield test CA")
    other_key, other = _make_ca("an unrelated CA")
    (root / "ca.pem").write_bytes(ca.public_bytes(PEM))
    (root / "other-ca.pem").write_bytes(other.public_bytes(PEM))
    return Pki(
        root=root,
        ca=root / "ca.pem",
        server=_issue(root, "server", ca_key, ca, "localhost", local, server),
        client=_issue(root, "client", ca_key, ca, "pyscone test client", [], client),
        wrong_name=_issue(
            root, "wrong-name", ca_key, ca, "wrong-name.example", [x509.DNSName("wrong-name.example")], server
        ),
        other_ca=root / "other-ca.pem",
        other_server=_issue(root, "other-server", other_key, other, "localhost", local, server),
        other_client=_issue(root, "other-client", other_key, other, "someone else's client", [], client),
    )


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """A tiny YAML emitter for the rule files: mappings, lists and scalars (strings double-quoted,
    which YAML reads exactly as JSON does, so PEM text with its newlines survives inline)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines += _yaml(item, indent + 2)
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            sub = _yaml(item, indent + 2)
            lines.append(f"{pad}- {sub[0].lstrip()}")
            lines += sub[1:]
    else:
        lines.append(pad + _scalar(value))
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, dict | list):  # empty
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(value)


def write_net_shield(
    path: Path,
    listen: list[dict[str, Any]] | None = None,
    connect: list[dict[str, Any]] | None = None,
    unlisted: str | None = None,
    udp: str | None = None,
) -> Path:
    """Write a dev-mode ``--net-shield`` file. Values may be Paths (absolute), relative names
    (resolved by the shield against the file's directory) or inline PEM text.

    Returns:
        ``path``, for the command line.
    """
    doc: dict[str, Any] = {}
    if listen is not None:
        doc["listen"] = listen
    if connect is not None:
        doc["connect"] = connect
    if unlisted is not None:
        doc["unlisted"] = unlisted
    if udp is not None:
        doc["udp"] = udp
    path.write_text("\n".join(_yaml(doc)) + "\n")
    return path
