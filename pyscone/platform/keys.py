"""ECDSA P-256 keys, the one kind pyscone uses (signers, owners, platforms, enclaves' ephemeral keys).

One place to make, store and load them, and to turn a public key into the bytes that
identify it (DER SubjectPublicKeyInfo, hashed for MRSIGNER, platform and owner ids).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PrivateKey = ec.EllipticCurvePrivateKey
PublicKey = ec.EllipticCurvePublicKey


def generate() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_der(key: PrivateKey | PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(key: PrivateKey | PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _p256(key: object, what: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise ValueError(f"not an ECDSA P-256 {what}")


def load_private(pem: bytes) -> PrivateKey:
    """Raises ValueError if ``pem`` is not an unencrypted ECDSA P-256 private key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not an unencrypted PEM private key ({e})") from None
    _p256(key, "key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def load_public(pem: bytes) -> PublicKey:
    """Raises ValueError if ``pem`` is not an ECDSA P-256 public key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM public key ({e})") from None
    _p256(key, "public key")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def load_public_der(der: bytes) -> PublicKey:
    """Raises ValueError if ``der`` is not an ECDSA P-256 public key."""
    key = serialization.load_der_public_key(der)
    _p256(key, "public key")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key
