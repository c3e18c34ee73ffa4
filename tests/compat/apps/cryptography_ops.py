import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

key = AESGCM.generate_key(bit_length=256)
nonce = os.urandom(12)
ct = AESGCM(key).encrypt(nonce, b"attack at dawn", b"hdr")
pt = AESGCM(key).decrypt(nonce, ct, b"hdr")

sk = ed25519.Ed25519PrivateKey.generate()
sig = sk.sign(b"message")
sk.public_key().verify(sig, b"message")

ek = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "compat.example")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ek.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(ek, hashes.SHA256()))
with open("cert.pem", "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
with open("cert.pem", "rb") as f:
    loaded = x509.load_pem_x509_certificate(f.read())
print(pt.decode(), "ed25519 ok", loaded.subject.rfc4514_string())
