"""The session owner's client for the CAS (``pyscone cas session …``, ``pyscone cas audit``)."""

from __future__ import annotations

import json
import ssl
import time
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ec

from pyscone.cas import protocol


class ClientError(Exception):
    """The CAS could not be reached or said no; the message is one line for the user."""


class Client:
    def __init__(self, url: str, cert_file: str, key: ec.EllipticCurvePrivateKey | None) -> None:
        self.url = url.rstrip("/")
        self.key = key
        try:
            self._tls = ssl.create_default_context(cafile=cert_file)
            with open(cert_file, "rb") as f:
                # Every signed request names the CAS it is for, so another CAS refuses it.
                self.audience = protocol.cert_fingerprint(f.read())
        except (OSError, ssl.SSLError) as e:
            raise ClientError(f"the CAS certificate {cert_file}: {getattr(e, 'strerror', None) or e}") from None
        except ValueError:
            raise ClientError(f"the CAS certificate {cert_file}: not a PEM certificate") from None

    def request(self, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        headers = {}
        if self.key is not None:
            headers = protocol.sign_request(self.key, method, path, body, time.time(), self.audience)
        try:
            with httpx.Client(verify=self._tls, timeout=30) as http:
                r = http.request(method, self.url + path, content=body, headers=headers)
        except httpx.HTTPError as e:
            raise ClientError(f"the CAS at {self.url} cannot be reached: {e}") from None
        try:
            doc: dict[str, Any] = r.json()
        except json.JSONDecodeError:
            raise ClientError(f"the CAS answered {r.status_code} with no JSON") from None
        if r.status_code >= 400:
            raise ClientError(str(doc.get("error", f"the CAS answered {r.status_code}")))
        return doc

    def put_session(self, text: str) -> dict[str, Any]:
        return self.request("POST", "/v1/sessions", text.encode())

    def session(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/sessions/{name}")

    def trust_platform(self, public_key_pem: str, note: str) -> dict[str, Any]:
        body = json.dumps({"public_key": public_key_pem, "note": note}).encode()
        return self.request("POST", "/v1/platforms", body)

    def distrust_platform(self, platform_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/platforms/{platform_id}")

    def audit(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/sessions/{name}/audit")
