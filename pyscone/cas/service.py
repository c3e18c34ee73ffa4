"""What the CAS does, without HTTP: sessions for their owners, configurations for attested enclaves.

Every refusal of an enclave is logged with its reason (the session's audit, if the
session exists, and the CAS's log) and answered with a bare "attestation refused":
the operator learns why, an attacker probing the CAS learns nothing.  Requests that
name no existing session store nothing: a challenge for one gets a nonce that is
never recorded (so it looks like any other and can only be refused later).

A record that fails its integrity check (``integrity.Tampered``) is never acted on:
owners get the one-line reason (HTTP 500: the CAS's storage, not the request, is
at fault), enclaves "attestation refused", and the CAS's log says which record.
"""

from __future__ import annotations

import secrets as _random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from pyscone.cas import policy as policy_mod
from pyscone.cas import protocol, secrets
from pyscone.cas.integrity import Tampered
from pyscone.cas.store import Conflict, Store
from pyscone.platform import keys, quote


@dataclass
class Answer:
    status: int
    body: dict[str, Any]


def _error(status: int, message: str) -> Answer:
    return Answer(status, {"error": message})


REFUSED = Answer(403, {"error": "attestation refused"})


class Cas:
    def __init__(self, store: Store, identity: str, log: Any = None, admin: str | None = None) -> None:
        """Args:
        identity: the SHA-256 of the CAS's certificate, which owners' requests must name.
        admin: the owner id of the CAS admin's key, who may trust platforms."""
        self.store = store
        self.identity = identity
        self.admin = admin
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))

    def tampered(self, e: Tampered) -> Answer:
        self._log(f"pyscone cas: refused to act on the database: {e}")
        return _error(500, str(e))

    # -- owners -------------------------------------------------------------------------------

    def owner(self, headers: Any, method: str, path: str, body: bytes) -> str:
        """The owner a request comes from.

        Raises:
            protocol.AuthError: not signed, stale, forged, or replayed.
        """
        now = time.time()
        owner, request_id = protocol.verify_request(headers, method, path, body, now, self.identity)
        if not self.store.use_request(request_id, now + 2 * protocol.MAX_SKEW):
            raise protocol.AuthError("the request was already used (a replay)")
        return owner

    def trust_platform(self, owner: str, public_key_pem: str, note: str) -> Answer:
        if self.admin is None or owner != self.admin:
            return _error(403, "only the CAS admin may trust platforms")
        try:
            key = keys.load_public(public_key_pem.encode())
        except ValueError as e:
            return _error(400, f"the platform key: {e}")
        pid = quote.platform_id(key).hex()
        self.store.trust_platform(pid, keys.public_pem(key).decode(), note)
        self._log(f"pyscone cas: the admin trusted platform {pid} ({note})")
        return Answer(200, {"platform_id": pid})

    def distrust_platform(self, owner: str, platform_id: str) -> Answer:
        if self.admin is None or owner != self.admin:
            return _error(403, "only the CAS admin may distrust platforms")
        if not self.store.distrust_platform(platform_id):
            return _error(404, f"platform {platform_id} is not trusted")
        self._log(f"pyscone cas: the admin distrusted platform {platform_id}")
        return Answer(200, {"platform_id": platform_id})

    def put_session(self, owner: str, text: str) -> Answer:
        try:
            new = policy_mod.parse(text)
        except policy_mod.PolicyError as e:
            return _error(400, f"invalid policy: {e}")
        old = self.store.session(new.name)
        if old is None:
            if new.predecessor is not None:
                return _error(409, f"session {new.name!r} does not exist: a new session has no predecessor")
            values = secrets.fill(dict(new.secrets), {}, {}, new.name)
        else:
            if old.owner != owner:
                self.store.log(new.name, "", "update", False, f"refused: not the owner ({owner[:16]})")
                return _error(403, f"session {new.name!r} belongs to another owner")
            if new.predecessor is None:
                return _error(409, f"session {new.name!r} exists: an update names its predecessor ({old.version})")
            if new.predecessor != old.version:
                return _error(
                    409, f"stale predecessor: session {new.name!r} is at version {old.version}, not {new.predecessor}"
                )
            values = secrets.fill(dict(new.secrets), old.values, old.kinds, new.name)
        kinds = {name: spec.kind for name, spec in new.secrets.items()}
        try:
            self.store.put_session(new.name, owner, new.version, text, values, kinds, old.version if old else None)
        except Conflict as e:
            return _error(409, f"session {new.name!r}: {e}")
        before = _volumes(policy_mod.parse(old.policy)) if old else {}
        for path, tag in _volumes(new).items():
            if before.get(path) != tag:  # a new volume, or the owner names a new starting point
                self.store.reset_volume(new.name, path, [tag])
        self.store.log(new.name, "", "create" if old is None else "update", True, f"version {new.version}")
        return Answer(201 if old is None else 200, {"name": new.name, "version": new.version})

    def get_session(self, owner: str, name: str) -> Answer:
        row = self.store.session(name)
        if row is None or row.owner != owner:
            return _error(404, f"no session {name!r} of yours")
        # The session CA's certificate is public: clients of the service's x509 secrets
        # (the network shield's server identity) trust it.
        ca = row.values.get(secrets.CA_CERT)
        return Answer(200, {"name": name, "version": row.version, "policy": row.policy, "ca": ca})

    def audit(self, owner: str, name: str) -> Answer:
        row = self.store.session(name)
        if row is None or row.owner != owner:
            return _error(404, f"no session {name!r} of yours")
        return Answer(200, {"name": name, "events": self.store.audit_of(name)})

    # -- enclaves -----------------------------------------------------------------------------

    def _policy(self, session: str) -> policy_mod.Policy | None:
        row = self.store.session(session)
        return policy_mod.parse(row.policy) if row is not None else None

    def challenge(self, session: str, service: str) -> Answer:
        try:
            pol = self._policy(session)
        except Tampered as e:
            self._log(f"pyscone cas: challenge for {session}/{service}: {e}")
            pol = None
        if pol is None or service not in pol.services:
            # Nothing is stored for a name anyone can make up; the answer looks the same.
            return Answer(200, {"nonce": _random.token_hex(32)})
        return Answer(200, {"nonce": self.store.new_challenge(session, service)})

    def _refuse(self, session: str, service: str, reason: str, exists: bool = True) -> Answer:
        if exists:
            try:
                self.store.log(session, service, "attest", False, reason)
            except Tampered as e:
                self._log(f"pyscone cas: {e}")
        self._log(f"pyscone cas: refused {session}/{service}: {reason}")
        return REFUSED

    def attest(self, session: str, service: str, nonce: str, quote_hex: str, public_hex: str) -> Answer:
        try:
            return self._attest(session, service, nonce, quote_hex, public_hex)
        except Tampered as e:
            return self._refuse(session, service, str(e), exists=False)

    def join(self, session: str, service: str, nonce: str, quote_hex: str, public_hex: str) -> Answer:
        """A spawned child of an attested enclave: attested as the service's enclaves are, it gets
        only the service's spawn key (to check that its parent is one of them), and no run starts."""
        try:
            return self._attest(session, service, nonce, quote_hex, public_hex, join=True)
        except Tampered as e:
            return self._refuse(session, service, str(e), exists=False)

    def _attest(
        self, session: str, service: str, nonce: str, quote_hex: str, public_hex: str, join: bool = False
    ) -> Answer:
        row = self.store.session(session)
        if row is None:
            return self._refuse(session, service, "no such session", exists=False)
        try:
            blob, public, nonce_bytes = bytes.fromhex(quote_hex), bytes.fromhex(public_hex), bytes.fromhex(nonce)
        except ValueError:
            return self._refuse(session, service, "malformed request")
        pol = policy_mod.parse(row.policy)
        svc = pol.services.get(service)
        if svc is None:
            return self._refuse(session, service, "no such service")
        if not self.store.take_challenge(nonce, session, service):
            return self._refuse(session, service, "unknown, expired or already used nonce (a replay?)")
        trusted: dict[bytes, ec.EllipticCurvePublicKey] = {}
        for pid, pem in self.store.platforms().items():
            if pol.platforms is None or bytes.fromhex(pid) in pol.platforms:
                trusted[bytes.fromhex(pid)] = keys.load_public(pem.encode())
        try:
            report = quote.verify_quote(blob, trusted)
            if report.report_data != quote.report_data(public, nonce_bytes):
                raise quote.QuoteError("the quote is not bound to this key and nonce")
            svc.expected.check(report)
        except quote.QuoteError as e:
            return self._refuse(session, service, str(e))
        # Every attested enclave of the service has it: its spawned children check their parent with it.
        spawn_key = self.store.keys.derive("spawn-family", session, service).hex()
        if join:
            sealed = protocol.seal_config(public, nonce_bytes, {"spawn_key": spawn_key})
            self.store.log(session, service, "join", True, f"MRENCLAVE {report.mrenclave.hex()} (a spawned child)")
            return Answer(200, {"sealed": sealed.hex()})
        volume = svc.fspf.path if svc.fspf else None
        tags, run_id, run_key = self.store.start_run(
            session, service, volume, [svc.fspf.tag.lower()] if svc.fspf else []
        )

        def render(text: str) -> str:
            return policy_mod.render(text, row.values)

        config: dict[str, Any] = {
            "argv": [render(a) for a in svc.argv],
            "cwd": svc.cwd,
            "env": {k: render(v) for k, v in svc.env.items()},
            "files": {p: render(v) for p, v in svc.files.items()},
            "fspf": None,
            "run": {"session": session, "service": service, "id": run_id, "key": run_key.hex()},
            # Seals the enclave's bytecode cache: every attested enclave of this service has it.
            "bytecode_key": self.store.keys.derive("bytecode-cache", session, service).hex(),
            "spawn_key": spawn_key,
        }
        if svc.console_key is not None:
            config["console"] = {"key": svc.console_key}
        if svc.fspf is not None:
            config["fspf"] = {"path": svc.fspf.path, "key": render(svc.fspf.key), "tags": tags}
        if svc.network is not None:
            config["network"] = _render_all(svc.network, render)
        try:
            sealed = protocol.seal_config(public, nonce_bytes, config)
        except ValueError as e:
            return self._refuse(session, service, str(e))
        self.store.log(
            session,
            service,
            "attest",
            True,
            f"MRENCLAVE {report.mrenclave.hex()} MRSIGNER {report.mrsigner.hex()} SVN {report.svn} run {run_id}",
        )
        return Answer(200, {"sealed": sealed.hex()})

    def report_tags(
        self, session: str, service: str, run_id: str, seq: int, tags: list[str], mac: str, after: str | None = None
    ) -> Answer:
        try:
            found = self.store.run_key(session, service, run_id)
            if found is None or not protocol.check_tag_mac(found.key, session, service, seq, tags, mac, after):
                return self._refuse_tags(session, service, f"refused: not authentic (run {run_id[:16]})", 403)
            why = self.store.pin_tags(session, service, run_id, seq, tags, after)
        except Tampered as e:
            self._log(f"pyscone cas: tag report of {session}/{service}: {e}")
            return _error(403, "tag report refused")
        if why is not None:
            return self._refuse_tags(session, service, f"refused: {why} (report {seq}, run {run_id[:16]})", 409)
        return Answer(200, {"tags": tags})

    def _refuse_tags(self, session: str, service: str, reason: str, status: int) -> Answer:
        self._log(f"pyscone cas: tag report of {session}/{service} {reason}")
        try:
            if self.store.session(session) is not None:
                self.store.log(session, service, "tags", False, reason)
        except Tampered as e:
            self._log(f"pyscone cas: {e}")
        return _error(status, "tag report refused" + (": stale" if status == 409 else ""))


def _volumes(pol: policy_mod.Policy) -> dict[str, str]:
    """The session's volumes: FSPF path -> the tag the policy names (shared by its services)."""
    return {svc.fspf.path: svc.fspf.tag.lower() for svc in pol.services.values() if svc.fspf is not None}


def _render_all(value: Any, render: Callable[[str], str]) -> Any:
    """``value`` (the network rules: mappings, lists, strings, numbers) with its secrets put in."""
    if isinstance(value, str):
        return render(value)
    if isinstance(value, Mapping):
        return {k: _render_all(v, render) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_all(v, render) for v in value]
    return value
