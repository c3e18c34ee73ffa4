"""What the TLS benchmark (``bench/tls.py``) gives its configurations: a CA made for the run, a server
certificate and key it signed (ECDSA P-256, for 127.0.0.1 and localhost), stunnel's configuration and
the network shield's dev-mode file.  Everything is written to the run's temp dir, never to the repo.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Keys:
    dir: Path
    ca: Path
    cert: Path
    key: Path


def make_keys(directory: Path) -> Keys:
    """A CA and a server certificate for 127.0.0.1 and localhost (ECDSA P-256), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pyscone TLS benchmark CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    keys = Keys(directory, directory / "ca.pem", directory / "server.pem", directory / "server.key")
    keys.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    keys.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    keys.key.touch(0o600)
    keys.key.write_bytes(pem)
    return keys


def stunnel_conf(keys: Keys, accept: int, connect: int) -> Path:
    """A foreground stunnel service: TLS 1.3 on ``accept``, plain TCP to the app on ``connect``."""
    path = keys.dir / f"stunnel-{accept}.conf"
    path.write_text(
        "foreground = yes\npid =\nsyslog = no\ndebug = 3\n"
        "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
        f"[bench]\naccept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\n"
        f"cert = {keys.cert}\nkey = {keys.key}\nsslVersionMin = TLSv1.3\n"
    )
    return path


def shield_conf(keys: Keys, port: int) -> Path:
    """The network shield's dev-mode file: the app's port is a TLS server with our certificate."""
    path = keys.dir / f"net-shield-{port}.yaml"
    path.write_text(
        f"listen:\n  - port: {port}\n    cert: {keys.cert.name}\n    key: {keys.key.name}\n"
        "unlisted: refuse\nudp: refuse\n"
    )
    return path
