"""Secrets the CAS makes for a session (random bytes, passwords, keys, X.509 certificates).

Values are text, addressed the way policies refer to them: ``NAME`` for the secret
itself, ``NAME.part`` for a part (``ecdsa``: ``NAME`` is the private key and
``NAME.public`` the public key; ``x509``: ``NAME.key``, ``NAME.cert`` and ``NAME.ca``,
the session CA's certificate that signed it).  A session has one CA, made with its
first x509 secret and kept with its secrets.
"""

from __future__ import annotations

import datetime
import secrets as _random
import string

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pyscone.cas.policy import SecretSpec
from pyscone.platform import keys

PASSWORD_ALPHABET = string.ascii_letters + string.digits + "-_.:+"
CA_KEY, CA_CERT = "@ca.key", "@ca.cert"  # where a session keeps its CA among its secret values
VALIDITY = datetime.timedelta(days=365)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def session_ca(session: str) -> dict[str, str]:
    """A new CA for a session: its key and self-signed certificate, as secret values."""
    key = keys.generate()
    cert = _certificate(f"pyscone session CA: {session}", key, None, key, ca=True)
    return {CA_KEY: keys.private_pem(key).decode(), CA_CERT: cert.public_bytes(serialization.Encoding.PEM).decode()}


def generate(spec: SecretSpec, values: dict[str, str], session: str) -> None:
    """Make ``spec``'s value(s) into ``values`` (which holds the session CA once made)."""
    if spec.kind == "random":
        values[spec.name] = _random.token_bytes(spec.size).hex()
    elif spec.kind == "password":
        values[spec.name] = "".join(_random.choice(PASSWORD_ALPHABET) for _ in range(spec.size))
    elif spec.kind == "ecdsa":
        key = keys.generate()
        values[spec.name] = keys.private_pem(key).decode()
        values[spec.name + ".public"] = keys.public_pem(key).decode()
    elif spec.kind == "x509":
        if CA_KEY not in values:
            values.update(session_ca(session))
        ca_key = serialization.load_pem_private_key(values[CA_KEY].encode(), password=None)
        ca_cert = x509.load_pem_x509_certificate(values[CA_CERT].encode())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = keys.generate()
        cert = _certificate(spec.common_name, key, ca_cert.subject, ca_key, ca=False)
        values[spec.name + ".key"] = keys.private_pem(key).decode()
        values[spec.name + ".cert"] = cert.public_bytes(serialization.Encoding.PEM).decode()
        values[spec.name + ".ca"] = values[CA_CERT]
    else:
        raise ValueError(f"unknown secret kind {spec.kind!r}")


def fill(specs: dict[str, SecretSpec], old: dict[str, str], old_kinds: dict[str, str], session: str) -> dict[str, str]:
    """The values of a session's secrets: kept where a secret of the same kind existed, else made.

    Args:
        specs: the secrets the (new) policy defines.
        old: the values the session had (empty for a new session).
        old_kinds: the kind each old secret had, by name.
    """
    values = {k: v for k, v in old.items() if k in (CA_KEY, CA_CERT)}
    for name, spec in specs.items():
        if old_kinds.get(name) == spec.kind and (name in old or name + ".key" in old):
            values.update({k: v for k, v in old.items() if k == name or k.startswith(name + ".")})
        else:
            generate(spec, values, session)
    return values
